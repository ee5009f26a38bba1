"""python main.py --config=configs/celebahq256_ddgan.py --workdir=/path

Denoising diffusion GAN on CelebA-HQ 256 with T = 2 (Xiao et al. 2022; FID 7.64):
the settings of DDGAN's CelebA-HQ command as published in its repository and
repeated by its follow-ups (--num_timesteps 2 --num_channels_dae 64 --ch_mult 1 1 2
2 4 4 --num_res_blocks 2 --nz 100 --z_emb_dim 256 --n_mlp 3 --r1_gamma 2.
--lazy_reg 10 --lr_d 1e-4 --lr_g 2e-4 --ema_decay 0.999, 800 epochs), Adam betas
(0.5, 0.9), cosine decay. The global batch (32 per process in their launcher) and
the learning rates are as recalled there, not re-checked against the paper's table.
The generator is this library's UNet, not NCSN++ (its parameter count differs).
"""

from configs import ddgan, default


def get_config():
    """Returns the DDGAN CelebA-HQ 256 config."""
    config = ddgan.make_ddgan(default.get_config(), num_timesteps=2, latent_dim=100,
                              mapping_layers=3)

    data = config.data
    data.dataset = 'celeb_a_hq/256'
    data.eval_split = 'train'  # The TFDS dataset has only a train split.
    data.image_size = 256
    data.channels = 3

    model = config.model
    model.base_channels = 64
    model.channel_mult = (1, 1, 2, 2, 4, 4)
    model.num_res_blocks = 2
    model.attention_resolutions = (16,)
    model.dtype = 'bfloat16'

    gan = config.gan
    # The paper's large discriminator (ngf 64): a 1x1 conv to 128 channels, then six
    # halving blocks of 256, 512, 512, 512, 512, 512 channels down to 4x4.
    gan.disc_base_channels = 128
    gan.disc_channel_mult = (2, 4, 4, 4, 4, 4)
    gan.disc_downsample_first = True
    gan.lr_generator = 2e-4
    gan.lr_discriminator = 1e-4
    gan.r1_gamma = 2.0
    gan.lazy_reg = 10

    config.optim.ema_decays = (0.999,)

    train = config.train
    train.global_batch_size = 32
    train.num_train_steps = 750_000  # 800 epochs of the 30,000 images at batch 32.
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.sample_every_steps = 25_000
    train.num_grid_samples = 16

    config.sample.num_images = 16
    config.sample.global_batch_size = 16
    return config
