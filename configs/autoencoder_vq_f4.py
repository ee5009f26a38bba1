"""python main.py --config=configs/autoencoder_vq_f4.py --workdir=/path/to/vq_f4

LDM's VQ-f4 first stage (Rombach et al. 2022, Tab. 8; the released
models/first_stage_models/vq-f4/config.yaml), the first stage of the LDM-4 CelebA-HQ
and class-conditional ImageNet models: 256x256x3 images to 64x64x3 latents quantised
against 8,192 codes of width 3, channels 128 with multipliers 1, 2, 4, two residual
blocks per level, no attention but the middle block's; codebook + 0.25 commitment
loss; the patch discriminator on from step 0 with adaptive weight x 0.75. Adam
(0.5, 0.9) at 4.5e-6 per image of the batch of 8. Trained here on ImageNet (the
released weights saw OpenImages); no LPIPS term (not implemented). Parameters
(jax.eval_shape): autoencoder 55,322,782, discriminator 2,765,633.
"""

from configs import default


def get_config():
    """Returns the VQ-f4 autoencoder config."""
    config = default.get_config()
    config.task = 'autoencoder'

    data = config.data
    data.dataset = 'imagenet2012'
    data.image_size = 256
    data.channels = 3
    data.center_crop = True

    config.model.attention_resolutions = ()  # Validated for every task; unused here.

    a = config.autoencoder
    a.kind = 'vq'
    a.base_channels = 128
    a.channel_mult = (1, 2, 4)
    a.num_res_blocks = 2
    a.attention_resolutions = ()
    a.z_channels = 3
    a.codebook_size = 8192
    a.vq_beta = 0.25
    a.num_groups = 32
    a.disc_start = 0
    a.disc_weight = 0.75
    a.disc_base_channels = 64
    a.disc_num_layers = 3
    a.disc_num_groups = 32

    optim = config.optim
    optim.optimizer = 'adam'
    optim.b1, optim.b2 = 0.5, 0.9
    optim.learning_rate = 4.5e-6 * 8
    optim.lr_schedule = 'constant'
    optim.grad_clip_norm = 0.0
    optim.ema_decays = (0.999,)  # For the reconstruction grids only.

    train = config.train
    train.global_batch_size = 8
    train.num_train_steps = 200_000
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.num_grid_samples = 8
    return config
