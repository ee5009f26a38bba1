"""The first stage of the digits latent diffusion: a KL-f4 autoencoder on 16x16 digits.

    python main.py --config=configs/digits_autoencoder.py --workdir=/tmp/digits_ae

The bundled 8x8 digits, upsampled (bicubic) to 16x16, are encoded to 4x4x3 latents
(f = 4, three levels of width 16, 32, 32) with a KL-regularised latent (weight
1e-6, as LDM's KL autoencoders). L1 reconstruction throughout; the patch
discriminator (two stride-2 layers, GroupNorm) and the adaptive adversarial weight
switch on at step 300 of 500. Then train the latent diffusion model with
configs/digits_ldm.py, whose latent.autoencoder_workdir points here.

No LPIPS term by default (it needs two weight files, and at 16x16 its VGG16 costs
four times the autoencoder's FLOPs); 16x16 is LPIPS' smallest size and grey digits
are compared as RGB, so adding
`--config.autoencoder.lpips_weights_path=... --config.autoencoder.vgg16_weights_path=...`
turns it on (see configs/autoencoder_kl_f4.py).

Measured on a shared 2-core CPU (2026-11-29, jax 0.10.2): 283,294 parameters
(autoencoder 241k, discriminator 42k), 16 s to compile, 11-26 steps/s, 74 s for the
whole command; the L1 error per pixel falls from 0.26 (step 100) to 0.09 (step 500).
Grids show rows of the first batch's digits alternating with their EMA
reconstructions.
"""

from configs import default


def get_config():
    """Returns the digits first-stage config."""
    config = default.get_config()
    config.task = 'autoencoder'

    config.data.dataset = 'digits'
    config.data.image_size = 16
    config.data.channels = 1
    config.data.random_flip = False

    # Validated for every task; no attention at the 16x16 image's (1, 2) levels.
    config.model.attention_resolutions = ()

    a = config.autoencoder
    a.kind = 'kl'
    a.base_channels = 16
    a.channel_mult = (1, 2, 2)  # f = 4: 16x16 -> 4x4.
    a.num_res_blocks = 1
    a.attention_resolutions = ()
    a.z_channels = 3
    a.num_groups = 8
    a.kl_weight = 1e-6
    a.disc_start = 300
    a.disc_weight = 0.5
    a.disc_base_channels = 16
    a.disc_num_layers = 2
    a.disc_num_groups = 8

    # taming/LDM: Adam with betas (0.5, 0.9), constant rate.
    config.optim.learning_rate = 1e-3
    config.optim.b1, config.optim.b2 = 0.5, 0.9
    config.optim.lr_schedule = 'constant'
    config.optim.warmup_steps = 0
    config.optim.ema_decays = (0.99,)

    config.train.global_batch_size = 32
    config.train.num_train_steps = 500
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 250
    config.train.num_grid_samples = 16
    return config
