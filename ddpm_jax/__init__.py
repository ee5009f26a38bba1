"""ddpm_jax: denoising diffusion models (DDPM, Improved DDPM, DDIM, ADM) in JAX/Flax.

The diffusion maths is importable on its own and acts on any model function
`model_fn(x, t, **model_kwargs)`:

    from ddpm_jax import schedules, samplers
    sched = schedules.make_schedule('cosine', 1000, respacing='ddim50')
    x0 = jax.jit(lambda rng: samplers.ddim_sample(model_fn, sched, (16, 32, 32, 3), rng))(rng)

Training, data, checkpointing and evaluation live in their own modules
(`ddpm_jax.train`, `ddpm_jax.data`, ...), imported on demand so that the maths
does not pull in TFDS or orbax.
"""

from ddpm_jax import diffusion, likelihood, losses, samplers, schedules
from ddpm_jax.schedules import Schedule, make_schedule

__all__ = ['Schedule', 'diffusion', 'likelihood', 'losses', 'make_schedule', 'samplers',
           'schedules']
__version__ = '0.1.0'
