"""python main.py --config=configs/lsun_bedroom256.py --workdir=/path

ADM on LSUN Bedroom 256x256, unconditional: 552,814,086 parameters.

Architecture and training from Dhariwal & Nichol 2021 (Table 11 / App. I and the
released guided-diffusion flags): BigGAN up/down-sampling residual blocks, AdaGN,
attention at 32, 16 and 8 pixels, learned variances (learned_range) trained with
the hybrid loss (Nichol & Dhariwal 2021, Eq. 16), T = 1000, Adam, EMA 0.9999, no
gradient clipping; the ImageNet-256 network without the class embedding, dropout
0.1, linear schedule, lr 1e-4, batch 256, 500k steps (the paper's bedroom run).
Sampled with all 1000 steps, which the paper finds best for LSUN.
"""

from configs import default


def get_config():
    """Returns the ADM LSUN Bedroom 256 config."""
    config = default.get_config()

    data = config.data
    data.dataset = 'lsun/bedroom'
    data.eval_split = 'validation'
    data.image_size = 256
    data.channels = 3
    data.center_crop = True

    model = config.model
    model.base_channels = 256
    model.channel_mult = (1, 1, 2, 2, 4, 4)
    model.num_res_blocks = 2
    model.attention_resolutions = (32, 16, 8)
    model.num_head_channels = 64
    model.dropout = 0.1
    model.resblock_updown = True
    model.use_scale_shift_norm = True
    model.learn_sigma = True
    model.dtype = 'bfloat16'

    diffusion = config.diffusion
    diffusion.var_type = 'learned_range'
    diffusion.loss_type = 'rescaled_mse'  # L_hybrid = L_simple + 0.001 L_vlb.

    optim = config.optim
    optim.learning_rate = 1e-4
    optim.grad_clip_norm = 0.0  # ADM does not clip gradients.

    train = config.train
    train.global_batch_size = 256
    train.num_train_steps = 500_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.keep_checkpoint_every_steps = 100_000
    train.sample_every_steps = 50_000
    train.num_grid_samples = 16

    sample = config.sample
    sample.num_images = 16
    sample.global_batch_size = 16
    config.eval.global_batch_size = 16
    return config
