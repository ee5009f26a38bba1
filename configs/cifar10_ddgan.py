"""python main.py --config=configs/cifar10_ddgan.py --workdir=/path

Denoising diffusion GAN on CIFAR-10 (Xiao et al. 2022; FID 3.75 with T = 4): the
settings of DDGAN's released CIFAR-10 command (--num_timesteps 4 --num_channels_dae
128 --ch_mult 1 2 2 2 --num_res_blocks 2 --nz 100 --z_emb_dim 256 --n_mlp 4 --r1_gamma
0.02 --lazy_reg 15 --lr_d 1.25e-4 --lr_g 1.6e-4 --ema_decay 0.9999, batch 64 on each of
4 GPUs, 1800 epochs = 351,562 steps of 256), Adam betas (0.5, 0.9), cosine decay.
The generator is this library's UNet (ADM blocks, AdaGN driven by the time embedding
plus the mapped latent), not the paper's NCSN++, so its parameter count differs from
the paper's; the discriminator is the paper's small one (models/ddgan_discriminator.py).
"""

from configs import ddgan, default


def get_config():
    """Returns the DDGAN CIFAR-10 config."""
    config = ddgan.make_ddgan(default.get_config(), num_timesteps=4, latent_dim=100,
                              mapping_layers=4)

    data = config.data
    data.dataset = 'cifar10'
    data.image_size = 32
    data.channels = 3

    model = config.model
    model.base_channels = 128
    model.channel_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attention_resolutions = (16,)

    gan = config.gan
    # The paper's small discriminator (ngf 64): 128 -> 128, 256, 512, 512 channels.
    gan.disc_base_channels = 128
    gan.disc_channel_mult = (1, 2, 4, 4)
    gan.lr_generator = 1.6e-4
    gan.lr_discriminator = 1.25e-4
    gan.r1_gamma = 0.02
    gan.lazy_reg = 15

    config.optim.ema_decays = (0.9999,)

    train = config.train
    train.global_batch_size = 256
    train.num_train_steps = 351_562
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.sample_every_steps = 25_000

    return config
