"""python main.py --config=configs/imagenet512.py --workdir=/path

ADM on ImageNet 512x512, class-conditional: 558,997,638 parameters (559M).

Architecture and training from Dhariwal & Nichol 2021 (Table 11 / App. I and the
released guided-diffusion flags): BigGAN up/down-sampling residual blocks, AdaGN,
attention at 32, 16 and 8 pixels, learned variances (learned_range) trained with
the hybrid loss (Nichol & Dhariwal 2021, Eq. 16), T = 1000, Adam, EMA 0.9999, no
gradient clipping; 256 base channels, 2 residual blocks per level, multipliers
0.5,1,1,2,2,4,4 (128 channels at 512x512), 64 channels per head, no dropout, linear
schedule, lr 1e-4, batch 256, 1940k steps; released in float32 (use_fp16 False).
Sampled with 250 respaced steps.
"""

from configs import default


def get_config():
    """Returns the ADM ImageNet 512 config."""
    config = default.get_config()

    data = config.data
    data.dataset = 'imagenet2012'
    data.eval_split = 'validation'
    data.image_size = 512
    data.channels = 3
    data.center_crop = True

    model = config.model
    model.base_channels = 256
    model.channel_mult = (0.5, 1, 1, 2, 2, 4, 4)
    model.num_res_blocks = 2
    model.attention_resolutions = (32, 16, 8)
    model.num_head_channels = 64
    model.resblock_updown = True
    model.use_scale_shift_norm = True
    model.num_classes = 1000
    model.learn_sigma = True

    diffusion = config.diffusion
    diffusion.var_type = 'learned_range'
    diffusion.loss_type = 'rescaled_mse'  # L_hybrid = L_simple + 0.001 L_vlb.

    optim = config.optim
    optim.learning_rate = 1e-4
    optim.grad_clip_norm = 0.0  # ADM does not clip gradients.

    train = config.train
    train.global_batch_size = 256
    train.num_train_steps = 1_940_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.keep_checkpoint_every_steps = 100_000
    train.sample_every_steps = 50_000
    train.num_grid_samples = 16

    sample = config.sample
    sample.respacing = '250'
    sample.num_images = 16
    sample.global_batch_size = 16
    config.eval.global_batch_size = 16
    return config
