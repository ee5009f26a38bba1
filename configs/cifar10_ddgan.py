"""python main.py --config=configs/cifar10_ddgan.py --workdir=/path

Denoising diffusion GAN on CIFAR-10 (Xiao et al. 2022; FID 3.75 with T = 4): the
settings of DDGAN's released CIFAR-10 command (--num_timesteps 4 --num_channels_dae
128 --ch_mult 1 2 2 2 --num_res_blocks 2 --nz 100 --z_emb_dim 256 --n_mlp 4 --r1_gamma
0.02 --lazy_reg 15 --lr_d 1.25e-4 --lr_g 1.6e-4 --ema_decay 0.9999 --batch_size 64
--num_process_per_node 4 --num_epoch 1800), Adam betas (0.5, 0.9), cosine decay to
1e-5. Steps: each of the 4 processes sees 50,000 / 4 = 12,500 images, 195 full
batches of 64 (drop_last), for epochs 0..1800 (range(0, num_epoch + 1)): 1801 x 195 =
351,195 steps of 256. The generator is theirs: NCSN++ with adaptive group norms
(`model.name='ncsnpp'`, train_ddgan.py's defaults: FIR resampling, the residual input
pyramid, the sinusoidal step embedding, z mapped by pixel norm and 5 SiLU layers to
256), 48,432,515 parameters as the paper's; the discriminator is the paper's small one
with t_emb_dim 256 (models/ddgan_discriminator.py), 12,741,633 parameters.
"""

from configs import ddgan, default


def get_config():
    """Returns the DDGAN CIFAR-10 config."""
    config = ddgan.make_ddgan(default.get_config(), num_timesteps=4, latent_dim=100, n_mlp=4)

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
    train.num_train_steps = 351_195  # 1801 epochs x 195 steps (see the docstring).
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.sample_every_steps = 25_000

    return config
