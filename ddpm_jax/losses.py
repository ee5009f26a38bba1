"""Training losses of the denoiser.

This module owns the per-example diffusion training objectives: simple MSE on the
eps / x0 / v / x_{t-1} target, the hybrid MSE + VB loss for learned variances, and the
pure VB / KL losses. Which timesteps they are evaluated at is `timestep_sampling`'s.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax import likelihood
from ddpm_jax.schedules import Schedule

LOSS_TYPES = ('mse', 'rescaled_mse', 'kl', 'rescaled_kl')


def training_losses(model_fn: Callable, sched: Schedule, x0, i, noise, *,
                    mean_type: str = 'eps', var_type: str = 'fixed_small',
                    loss_type: str = 'mse', model_kwargs: dict | None = None) -> dict:
    """Per-example training loss at step indices i.

    x_i = q_sample(x0, i, noise) and the model is called with schedule.timesteps[i].

    - 'mse' / 'rescaled_mse': mean over non-batch dims of (target - mean output)^2 with
      target eps (Ho et al. 2020, Eq. 14), x_0, v (Salimans & Ho 2022) or the posterior
      mean (for 'xprev'). With a learned variance the hybrid loss
      L_simple + lambda L_vlb is used (Nichol & Dhariwal 2021, Eq. 16), the VB term
      seeing the mean output through stop_gradient so it trains only the variance
      (Sec. 3.1); 'rescaled_mse' sets lambda = N / 1000, 'mse' lambda = 1.
    - 'kl': the VB term L_{t-1} (bits/dim) alone; 'rescaled_kl' multiplies it by N so
      that its expectation over uniform i equals the whole bound.

    Args:
        model_fn: model_fn(x, t int32 [B], **model_kwargs) -> [B, ..., C or 2C].
        sched: The schedule.
        x0: [B, ...] data in [-1, 1].
        i: [B] int32 step indices.
        noise: eps ~ N(0, I), shaped like x0.
        mean_type: One of `diffusion.MEAN_TYPES`.
        var_type: One of `diffusion.VAR_TYPES`.
        loss_type: One of `LOSS_TYPES`.
        model_kwargs: Extra keyword arguments to the model.

    Returns:
        dict with 'loss' [B] always, 'mse' [B] for mse types and 'vb' [B] for learned
        variances or kl types.

    Raises:
        ValueError: Unknown type names, x0 / noise shape mismatch, or model output
            channels that do not fit var_type.
    """
    diffusion.validate_types(mean_type, var_type)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f'Unknown loss_type {loss_type!r}; valid: {LOSS_TYPES}.')
    model_kwargs = {} if model_kwargs is None else model_kwargs
    x_t = diffusion.q_sample(sched, x0, i, noise)
    output = model_fn(x_t, sched.timesteps[i], **model_kwargs)
    n = sched.num_timesteps

    if loss_type in ('kl', 'rescaled_kl'):
        vb = likelihood.vb_terms_bpd(sched, output, x0, x_t, i, mean_type=mean_type,
                                     var_type=var_type, clip_denoised=False)['output']
        if loss_type == 'rescaled_kl':
            vb = vb * n
        return {'loss': vb, 'vb': vb}

    mean_out, var_out = diffusion.split_model_output(output, x_t, var_type)
    terms = {}
    if var_out is not None:
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
        vb = likelihood.vb_terms_bpd(sched, frozen, x0, x_t, i, mean_type=mean_type,
                                     var_type=var_type, clip_denoised=False)['output']
        if loss_type == 'rescaled_mse':
            vb = vb * (n / 1000.0)
        terms['vb'] = vb
    if mean_type == 'eps':
        target = noise
    elif mean_type == 'x0':
        target = x0
    elif mean_type == 'v':
        target = diffusion.get_v(sched, x0, i, noise)
    else:  # 'xprev'
        target, _, _ = diffusion.q_posterior_mean_variance(sched, x0, x_t, i)
    terms['mse'] = diffusion.mean_flat(jnp.square(target - mean_out))
    terms['loss'] = terms['mse'] + terms['vb'] if 'vb' in terms else terms['mse']
    return terms
