"""A denoising diffusion GAN on the bundled 8x8 digits: 4 steps, class-conditional, CPU.

    python main.py --config=configs/digits_ddgan.py --workdir=/tmp/digits_ddgan
    python main.py --config=configs/digits_ddgan.py --workdir=/tmp/digits_ddgan --mode=fid

Xiao et al. 2022 on the quick start's data: a generator G(x_t, z, t, y) (the quick
start's UNet plus a 3-layer latent mapping network into its adaptive group norms)
and a time- and class-conditional discriminator D(x_{t-1}, x_t, t), trained
alternately in one step with DDGAN's Adam settings and R1 penalty, on T = 4 steps
of the discretised VP schedule. Sampling is 4 generator calls.
"""

from configs import ddgan, digits


def get_config():
    """Returns the digits DDGAN config."""
    config = ddgan.make_ddgan(digits.get_config(), num_timesteps=4, latent_dim=32,
                              mapping_layers=3)

    config.gan.disc_base_channels = 32
    config.gan.disc_channel_mult = (1, 2)
    config.gan.disc_num_res_blocks = 1
    config.gan.lr_generator = 1.6e-4
    config.gan.lr_discriminator = 1.25e-4
    config.gan.r1_gamma = 0.02
    config.gan.lazy_reg = 15

    config.optim.ema_decays = (0.999,)

    config.train.num_train_steps = 1500
    config.train.global_batch_size = 128

    return config
