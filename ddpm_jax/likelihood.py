"""Variational bound (bits/dim) of a diffusion model on 8-bit data.

This module owns the likelihood side of a DDPM: the Gaussian KL, the discretized
Gaussian decoder for 8-bit images in [-1, 1] (Ho et al. 2020, Eq. 13), the per-step
terms L_{t-1} / L_0 of the bound (Ho et al. 2020, Eq. 5), the prior term L_T, and
`calc_bpd_loop`, the whole bound as a single `lax.scan`. Everything is in bits per
dimension: nats divided by log(2), averaged over all non-batch dimensions.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax.schedules import Schedule

_LOG2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    KL = 0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2)
              + (mean1 - mean2)^2 exp(-logvar2)).

    Args:
        mean1, logvar1, mean2, logvar2: Broadcastable arrays.

    Returns:
        The elementwise KL, broadcast shape.
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Phi(x) ~= 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (Page 1977).

    Monotone in x, so the discretized likelihood below is a proper distribution.
    """
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of 8-bit data under a Gaussian integrated over x's bin (Ho et al. 2020, Eq. 13).

    Bins have width 2/255 centred on the 256 values of [-1, 1]; the first and last
    bins extend to -inf / +inf, so the 256 probabilities sum to one.

    Args:
        x: [B, ...] data in [-1, 1], on the 8-bit grid.
        means: Gaussian means, same shape as x.
        log_scales: Log standard deviations, broadcastable to x.

    Returns:
        [B, ...] log-probabilities in nats.

    Raises:
        ValueError: If x and means shapes differ.
    """
    if x.shape != means.shape:
        raise ValueError(f'x and means must have the same shape, got {x.shape} and '
                         f'{means.shape}.')
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    # Thresholds at +-0.999 pick the edge bins (their centres are exactly +-1).
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(sched: Schedule, model_output, x0, x_t, i, *, mean_type: str,
                 var_type: str, clip_denoised: bool = True) -> dict:
    """One term of the bound at step i, in bits/dim (Ho et al. 2020, Eq. 5).

    For i > 0: L_{i-1} = KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i)).
    For i = 0: L_0 = -log p(x_0 | x_1), the discretized Gaussian decoder (Eq. 13).

    Args:
        sched: The schedule.
        model_output: Model output at (x_t, schedule.timesteps[i]).
        x0: [B, ...] data on the 8-bit grid in [-1, 1].
        x_t: [B, ...] sample of q(x_t | x_0) at step i.
        i: [B] int step indices.
        mean_type: One of `diffusion.MEAN_TYPES`.
        var_type: One of `diffusion.VAR_TYPES`.
        clip_denoised: Clip pred_x0 to [-1, 1] in the model mean.

    Returns:
        dict(output=[B] bits/dim, pred_x0=[B, ...]).

    Raises:
        ValueError: Bad types or shapes (see `diffusion.p_mean_variance`).
    """
    true_mean, _, true_log_var = diffusion.q_posterior_mean_variance(sched, x0, x_t, i)
    out = diffusion.p_mean_variance(sched, model_output, x_t, i, mean_type=mean_type,
                                    var_type=var_type, clip_denoised=clip_denoised)
    kl = normal_kl(true_mean, true_log_var, out['mean'], out['log_variance'])
    kl = diffusion.mean_flat(kl) / _LOG2
    decoder_nll = -discretized_gaussian_log_likelihood(
        x0, out['mean'], 0.5 * out['log_variance'])
    decoder_nll = diffusion.mean_flat(decoder_nll) / _LOG2
    i = jnp.broadcast_to(jnp.asarray(i), kl.shape)
    return {'output': jnp.where(i == 0, decoder_nll, kl), 'pred_x0': out['pred_x0']}


def prior_bpd(sched: Schedule, x0) -> jnp.ndarray:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim (Ho et al. 2020, Eq. 5).

    Args:
        sched: The schedule (its last step is T).
        x0: [B, ...] data.

    Returns:
        [B] bits/dim.
    """
    i = jnp.full([x0.shape[0]], sched.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = diffusion.q_mean_variance(sched, x0, i)
    kl = normal_kl(mean, log_var, 0.0, 0.0)
    return diffusion.mean_flat(jnp.broadcast_to(kl, x0.shape)) / _LOG2


def calc_bpd_loop(model_fn: Callable, sched: Schedule, x0, rng, *, mean_type: str = 'eps',
                  var_type: str = 'fixed_small', clip_denoised: bool = True,
                  model_kwargs: dict | None = None) -> dict:
    """The full variational bound L_T + sum_t L_{t-1} + L_0 in bits/dim, one `lax.scan`.

    Each step i draws its own x_i ~ q(x_i | x_0) with noise from fold_in(rng, i) and
    calls `model_fn(x_i, schedule.timesteps[i], **model_kwargs)`.

    Args:
        model_fn: model_fn(x [B, ...], t int32 [B], **model_kwargs) -> output.
        sched: The (possibly respaced) schedule; the bound is over its N steps.
        x0: [B, ...] data on the 8-bit grid in [-1, 1].
        rng: A JAX PRNG key.
        mean_type: One of `diffusion.MEAN_TYPES`.
        var_type: One of `diffusion.VAR_TYPES`.
        clip_denoised: Clip pred_x0 to [-1, 1].
        model_kwargs: Extra keyword arguments to the model (e.g. labels).

    Returns:
        dict with total_bpd [B], prior_bpd [B], and per-step terms indexed by step i
        (column i is step i): vb [B, N] (bits/dim), xstart_mse [B, N] and mse [B, N]
        (of the eps implied by pred_x0).

    Raises:
        ValueError: Bad types or shapes.
    """
    diffusion.validate_types(mean_type, var_type)
    if x0.ndim < 2:
        raise ValueError(f'x0 must be batched [B, ...], got shape {x0.shape}.')
    model_kwargs = {} if model_kwargs is None else model_kwargs
    batch = x0.shape[0]

    def step(carry, idx):
        i = jnp.full([batch], idx, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(rng, idx), x0.shape, x0.dtype)
        x_t = diffusion.q_sample(sched, x0, i, noise)
        t = jnp.full([batch], sched.timesteps[idx], dtype=jnp.int32)
        output = model_fn(x_t, t, **model_kwargs)
        terms = vb_terms_bpd(sched, output, x0, x_t, i, mean_type=mean_type,
                             var_type=var_type, clip_denoised=clip_denoised)
        eps = diffusion.predict_eps_from_x0(sched, x_t, i, terms['pred_x0'])
        return carry, (terms['output'], diffusion.mean_flat(jnp.square(terms['pred_x0'] - x0)),
                       diffusion.mean_flat(jnp.square(eps - noise)))

    _, (vb, xstart_mse, mse) = jax.lax.scan(
        step, None, jnp.arange(sched.num_timesteps, dtype=jnp.int32))
    prior = prior_bpd(sched, x0)
    vb, xstart_mse, mse = vb.T, xstart_mse.T, mse.T  # [N, B] -> [B, N]
    return {'total_bpd': jnp.sum(vb, axis=1) + prior, 'prior_bpd': prior, 'vb': vb,
            'xstart_mse': xstart_mse, 'mse': mse}
