"""python main.py --config=configs/celebahq256_ddgan.py --workdir=/path

Denoising diffusion GAN on CelebA-HQ 256 with T = 2 (Xiao et al. 2022; FID 7.64):
the settings of DDGAN's released CelebA-HQ command (readme.md of
NVlabs/denoising-diffusion-gan: --num_timesteps 2 --num_channels_dae 64 --ch_mult 1 1
2 2 4 4 --num_res_blocks 2 --batch_size 4 --num_epoch 800 --ngf 64 --use_ema
--r1_gamma 2. --z_emb_dim 256 --lr_d 1e-4 --lr_g 2e-4 --lazy_reg 10
--num_process_per_node 8; --nz 100, --n_mlp 3 and --t_emb_dim 256 by default). It
passes no --ema_decay, so the EMA decay is train_ddgan.py's default 0.9999. Adam
betas (0.5, 0.9), cosine decay to 1e-5. Batch 4 per process on 8 processes, 32 in
all. Steps: their CelebA-HQ LMDB train split has 27,000 images
(datasets_prep/lmdb_datasets.py), 3,375 per process, 843 full batches of 4
(drop_last), for epochs 0..800 (range(0, num_epoch + 1)): 801 x 843 = 675,243 steps.
We train on TFDS's celeb_a_hq/256 (all 30,000 images; its only split), so an
epoch here is 937 steps and the run is ~720 of our epochs. The generator is their
NCSN++ with adaptive group norms (39,726,979 parameters, as theirs). Not as theirs:
the generator computes in bfloat16 (float32 parameters, optimiser state and
normalisation statistics; `model.dtype`), theirs in float32; the discriminator and
its R1 penalty stay float32. Set --config.model.dtype=float32 for theirs.
"""

from configs import ddgan, default


def get_config():
    """Returns the DDGAN CelebA-HQ 256 config."""
    config = ddgan.make_ddgan(default.get_config(), num_timesteps=2, latent_dim=100, n_mlp=3)

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

    config.optim.ema_decays = (0.9999,)  # train_ddgan.py's --ema_decay default.

    train = config.train
    train.global_batch_size = 32
    train.num_train_steps = 675_243  # 801 epochs x 843 steps (see the docstring).
    train.log_every_steps = 100
    train.checkpoint_every_steps = 10_000
    train.sample_every_steps = 25_000
    train.num_grid_samples = 16

    config.sample.num_images = 16
    config.sample.global_batch_size = 16
    return config
