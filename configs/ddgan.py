"""Shared settings of the denoising diffusion GAN configs (Xiao et al. 2022).

Not a runnable config: `cifar10_ddgan.py`, `celebahq256_ddgan.py` and
`digits_ddgan.py` apply `make_ddgan` to their dataset's config.
"""


def make_ddgan(config, *, num_timesteps: int, latent_dim: int, mapping_layers: int):
    """Turns a denoiser config into a DDGAN one: the task, a generator G(x_t, z, t)
    whose mapped latent drives AdaGN, x_0 prediction stepped with the posterior on
    the discretised VP schedule, DDGAN's Adam (betas 0.5, 0.9, cosine decay, no
    clipping) and the 'ddgan' sampler."""
    config.task = 'ddgan'
    config.model.use_scale_shift_norm = True  # The latent enters through AdaGN.
    config.model.latent_dim = latent_dim
    config.model.mapping_layers = mapping_layers
    config.model.class_dropout_prob = 0.0  # No classifier-free guidance for a GAN.
    diffusion = config.diffusion
    diffusion.num_timesteps = num_timesteps
    diffusion.schedule = 'vp'
    diffusion.mean_type = 'x0'
    diffusion.var_type = 'fixed_small'
    config.gan.b1, config.gan.b2 = 0.5, 0.9
    config.optim.lr_schedule = 'cosine'
    config.optim.warmup_steps = 0
    config.optim.grad_clip_norm = 0.0
    config.sample.sampler = 'ddgan'
    config.sample.respacing = ''
    config.sample.guidance_scale = 1.0
    return config
