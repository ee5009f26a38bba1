"""python main.py --config=configs/imagenet64.py --workdir=/path

ADM on ImageNet 64x64, class-conditional: 295,904,454 parameters.

Architecture and training from Dhariwal & Nichol 2021 (Table 11 / App. I and the
released guided-diffusion flags): BigGAN up/down-sampling residual blocks, AdaGN,
attention at 32, 16 and 8 pixels, learned variances (learned_range) trained with
the hybrid loss (Nichol & Dhariwal 2021, Eq. 16), T = 1000, Adam, EMA 0.9999, no
gradient clipping; 192 channels, 3 residual blocks per level, multipliers 1,2,3,4,
64 channels per head, dropout 0.1, cosine schedule, lr 3e-4, batch 2048, 540k
steps. Sampled with 250 respaced steps.
"""

from configs import default


def get_config():
    """Returns the ADM ImageNet 64 config."""
    config = default.get_config()

    data = config.data
    data.dataset = 'imagenet_resized/64x64'
    data.eval_split = 'validation'
    data.image_size = 64
    data.channels = 3

    model = config.model
    model.base_channels = 192
    model.channel_mult = (1, 2, 3, 4)
    model.num_res_blocks = 3
    model.attention_resolutions = (32, 16, 8)
    model.num_head_channels = 64
    model.dropout = 0.1
    model.resblock_updown = True
    model.use_scale_shift_norm = True
    model.num_classes = 1000
    model.learn_sigma = True
    model.dtype = 'bfloat16'

    diffusion = config.diffusion
    diffusion.schedule = 'cosine'
    diffusion.var_type = 'learned_range'
    diffusion.loss_type = 'rescaled_mse'  # L_hybrid = L_simple + 0.001 L_vlb.

    optim = config.optim
    optim.learning_rate = 3e-4
    optim.grad_clip_norm = 0.0  # ADM does not clip gradients.

    train = config.train
    train.global_batch_size = 2048
    train.num_train_steps = 540_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.keep_checkpoint_every_steps = 100_000
    train.sample_every_steps = 50_000

    sample = config.sample
    sample.respacing = '250'
    return config
