"""Gaussian diffusion terms: forward process, posterior, parameterisations, p(x_{t-1}|x_t).

This module owns the closed-form Gaussian algebra of a DDPM given a `Schedule`: the
marginal q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), conversions between the
eps / x0 / v / x_{t-1} parameterisations, and the model's reverse step
p(x_{t-1} | x_t) for every mean and variance type. Everything is a pure function of
arrays (jit / vmap / grad safe). Step indices `i` index the (possibly respaced)
schedule, never original timesteps.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from ddpm_jax.schedules import Schedule

MEAN_TYPES = ('eps', 'x0', 'xprev', 'v')
VAR_TYPES = ('fixed_small', 'fixed_large', 'learned', 'learned_range')
LEARNED_VAR_TYPES = ('learned', 'learned_range')


def extract(arr: jnp.ndarray, i: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """Gathers arr[i] and reshapes it to broadcast against a rank-`ndim` batch.

    Args:
        arr: [N] per-step constants.
        i: int step indices, [B] (or a scalar).
        ndim: Rank of the array the result multiplies (e.g. 4 for NHWC).

    Returns:
        arr[i] with shape [B, 1, ..., 1] (rank `ndim`), or [1, ..., 1] for scalar i.
    """
    vals = jnp.asarray(arr)[jnp.asarray(i)]
    return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    """Mean over every axis but the leading (batch) one: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


NUM_QUARTERS = 4  # Nichol & Dhariwal 2021 report loss terms per quarter of the steps.


def timestep_quarter(i: jnp.ndarray, num_timesteps: int) -> jnp.ndarray:
    """Which quarter of the N steps each step index lies in: floor(4 i / N), in 0..3."""
    return (i * NUM_QUARTERS) // num_timesteps


def _check_same_shape(a, b, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f'{name_a} and {name_b} must have the same shape, got '
                         f'{a.shape} and {b.shape}.')


def q_mean_variance(sched: Schedule, x0: jnp.ndarray, i: jnp.ndarray):
    """Marginal q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, Eq. 4).

    Args:
        sched: The schedule.
        x0: [B, ...] clean data.
        i: [B] int step indices.

    Returns:
        (mean [B, ...], variance [B, 1, ..], log_variance [B, 1, ..]).
    """
    mean = extract(sched.sqrt_alphas_cumprod, i, x0.ndim) * x0
    # Squared from the float64-derived sqrt: 1 - abar in float32 cancels at small t.
    variance = extract(jnp.square(sched.sqrt_one_minus_alphas_cumprod), i, x0.ndim)
    log_variance = extract(sched.log_one_minus_alphas_cumprod, i, x0.ndim)
    return mean, variance, log_variance


def q_sample(sched: Schedule, x0: jnp.ndarray, i: jnp.ndarray,
             noise: jnp.ndarray) -> jnp.ndarray:
    """Samples x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4).

    Args:
        sched: The schedule.
        x0: [B, ...] clean data.
        i: [B] int step indices.
        noise: eps ~ N(0, I), same shape as x0.

    Returns:
        x_t, same shape as x0.

    Raises:
        ValueError: If x0 and noise shapes differ.
    """
    _check_same_shape(x0, noise, 'x0', 'noise')
    return (extract(sched.sqrt_alphas_cumprod, i, x0.ndim) * x0
            + extract(sched.sqrt_one_minus_alphas_cumprod, i, x0.ndim) * noise)


def q_posterior_mean_variance(sched: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray,
                              i: jnp.ndarray):
    """Posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eqs. 6-7).

    mean = coef1_t x_0 + coef2_t x_t, variance = beta~_t.

    Args:
        sched: The schedule.
        x0: [B, ...] clean data (or a prediction of it).
        x_t: [B, ...] noisy data at step i.
        i: [B] int step indices.

    Returns:
        (mean [B, ...], variance [B, 1, ..], log_variance_clipped [B, 1, ..]).

    Raises:
        ValueError: If x0 and x_t shapes differ.
    """
    _check_same_shape(x0, x_t, 'x0', 'x_t')
    mean = (extract(sched.posterior_mean_coef1, i, x_t.ndim) * x0
            + extract(sched.posterior_mean_coef2, i, x_t.ndim) * x_t)
    variance = extract(sched.posterior_variance, i, x_t.ndim)
    log_variance = extract(sched.posterior_log_variance_clipped, i, x_t.ndim)
    return mean, variance, log_variance


def predict_x0_from_eps(sched: Schedule, x_t, i, eps):
    """x_0 = x_t / sqrt(abar_t) - sqrt(1 / abar_t - 1) eps (inverts Ho et al. 2020, Eq. 4)."""
    _check_same_shape(x_t, eps, 'x_t', 'eps')
    return (extract(sched.sqrt_recip_alphas_cumprod, i, x_t.ndim) * x_t
            - extract(sched.sqrt_recipm1_alphas_cumprod, i, x_t.ndim) * eps)


def predict_eps_from_x0(sched: Schedule, x_t, i, x0):
    """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1) (inverts Eq. 4)."""
    _check_same_shape(x_t, x0, 'x_t', 'x0')
    return ((extract(sched.sqrt_recip_alphas_cumprod, i, x_t.ndim) * x_t - x0)
            / extract(sched.sqrt_recipm1_alphas_cumprod, i, x_t.ndim))


def get_v(sched: Schedule, x0, i, noise):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, v-prediction)."""
    _check_same_shape(x0, noise, 'x0', 'noise')
    return (extract(sched.sqrt_alphas_cumprod, i, x0.ndim) * noise
            - extract(sched.sqrt_one_minus_alphas_cumprod, i, x0.ndim) * x0)


def predict_x0_from_v(sched: Schedule, x_t, i, v):
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, Sec. 4)."""
    _check_same_shape(x_t, v, 'x_t', 'v')
    return (extract(sched.sqrt_alphas_cumprod, i, x_t.ndim) * x_t
            - extract(sched.sqrt_one_minus_alphas_cumprod, i, x_t.ndim) * v)


def predict_x0_from_xprev(sched: Schedule, x_t, i, xprev):
    """x_0 = (x_{t-1} - coef2_t x_t) / coef1_t, inverting the posterior mean (Eq. 7)."""
    _check_same_shape(x_t, xprev, 'x_t', 'xprev')
    return ((xprev - extract(sched.posterior_mean_coef2, i, x_t.ndim) * x_t)
            / extract(sched.posterior_mean_coef1, i, x_t.ndim))


def validate_types(mean_type: str, var_type: str) -> None:
    """Checks the parameterisation names.

    Raises:
        ValueError: If `mean_type` is not in `MEAN_TYPES` or `var_type` not in `VAR_TYPES`.
    """
    if mean_type not in MEAN_TYPES:
        raise ValueError(f'Unknown mean_type {mean_type!r}; valid: {MEAN_TYPES}.')
    if var_type not in VAR_TYPES:
        raise ValueError(f'Unknown var_type {var_type!r}; valid: {VAR_TYPES}.')


def split_model_output(output: jnp.ndarray, x_t: jnp.ndarray, var_type: str):
    """Splits a model output into its mean part and (for learned variances) variance part.

    Args:
        output: [B, ..., C] for fixed variances, [B, ..., 2C] for learned ones.
        x_t: [B, ..., C] the model input.
        var_type: One of `VAR_TYPES`.

    Returns:
        (mean_out [B, ..., C], var_out [B, ..., C] or None for fixed variances).

    Raises:
        ValueError: Unknown var_type or a channel count / shape that does not fit it.
    """
    if var_type not in VAR_TYPES:
        raise ValueError(f'Unknown var_type {var_type!r}; valid: {VAR_TYPES}.')
    c = x_t.shape[-1]
    if output.shape[:-1] != x_t.shape[:-1]:
        raise ValueError(f'Model output shape {output.shape} does not match x_t shape '
                         f'{x_t.shape} outside the channel axis.')
    if var_type in LEARNED_VAR_TYPES:
        if output.shape[-1] != 2 * c:
            raise ValueError(f'var_type {var_type!r} needs a model output with 2C = {2 * c} '
                             f'channels (mean and variance), got {output.shape[-1]}.')
        return output[..., :c], output[..., c:]
    if output.shape[-1] != c:
        raise ValueError(f'var_type {var_type!r} needs a model output with C = {c} '
                         f'channels, got {output.shape[-1]}'
                         + (' (2C: did you mean a learned var_type?)'
                            if output.shape[-1] == 2 * c else '') + '.')
    return output, None


def _fixed_large_variance(sched: Schedule) -> jnp.ndarray:
    # Ho et al. 2020 (Sec. 3.2) use sigma_t^2 = beta_t; at t=0 the posterior variance of
    # t=1 replaces beta_0 for a better decoder likelihood (as in their code).
    if sched.num_timesteps == 1:
        return sched.betas
    return sched.betas.at[0].set(sched.posterior_variance[1])


def p_mean_variance(sched: Schedule, model_output: jnp.ndarray, x_t: jnp.ndarray,
                    i: jnp.ndarray, *, mean_type: str = 'eps',
                    var_type: str = 'fixed_small', clip_denoised: bool = True,
                    denoised_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None
                    ) -> dict:
    """The model's reverse step p(x_{t-1} | x_t) = N(mean, variance).

    Mean: for 'eps', 'x0' and 'v' the model's x_0 prediction (Ho et al. 2020, Eq. 11 /
    15; Salimans & Ho 2022) is passed through `denoised_fn`, then clipped to [-1, 1]
    if `clip_denoised`, then plugged into the posterior mean (Eq. 7). For 'xprev' the
    mean IS the model output and pred_x0 is derived from it.

    Variance: 'fixed_small' = beta~_t (log clipped at t=0), 'fixed_large' = beta_t with
    beta~_1 at t=0 (Ho et al. 2020, Sec. 3.2), 'learned' = the model's log-variance,
    'learned_range' = exp(frac log beta_t + (1 - frac) log beta~_t) with
    frac = (v + 1) / 2 (Nichol & Dhariwal 2021, Eq. 15).

    Args:
        sched: The schedule.
        model_output: [B, ..., C] or [B, ..., 2C] (learned variances).
        x_t: [B, ..., C] noisy input at step i.
        i: [B] int step indices.
        mean_type: One of `MEAN_TYPES`.
        var_type: One of `VAR_TYPES`.
        clip_denoised: Clip pred_x0 to [-1, 1].
        denoised_fn: Optional map applied to pred_x0 before clipping.

    Returns:
        dict with 'mean', 'variance', 'log_variance', 'pred_x0' and 'eps' (the noise
        consistent with the final pred_x0, as DDIM uses), all shaped like x_t.

    Raises:
        ValueError: Unknown mean/var type or output channels that do not fit var_type.
    """
    validate_types(mean_type, var_type)
    mean_out, var_out = split_model_output(model_output, x_t, var_type)
    nd = x_t.ndim

    if var_type == 'learned':
        log_variance = var_out
        variance = jnp.exp(log_variance)
    elif var_type == 'learned_range':
        min_log = extract(sched.posterior_log_variance_clipped, i, nd)
        max_log = extract(jnp.log(sched.betas), i, nd)
        frac = (var_out + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        variance = jnp.exp(log_variance)
    else:
        if var_type == 'fixed_small':
            var_arr = sched.posterior_variance
            log_arr = sched.posterior_log_variance_clipped
        else:
            var_arr = _fixed_large_variance(sched)
            log_arr = jnp.log(var_arr)
        variance = jnp.broadcast_to(extract(var_arr, i, nd), x_t.shape)
        log_variance = jnp.broadcast_to(extract(log_arr, i, nd), x_t.shape)

    def process(x0):
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        return x0

    if mean_type == 'xprev':
        pred_x0 = process(predict_x0_from_xprev(sched, x_t, i, mean_out))
        mean = mean_out
    else:
        if mean_type == 'eps':
            raw_x0 = predict_x0_from_eps(sched, x_t, i, mean_out)
        elif mean_type == 'x0':
            raw_x0 = mean_out
        else:  # 'v'
            raw_x0 = predict_x0_from_v(sched, x_t, i, mean_out)
        pred_x0 = process(raw_x0)
        mean, _, _ = q_posterior_mean_variance(sched, pred_x0, x_t, i)

    if mean_type == 'eps' and denoised_fn is None and not clip_denoised:
        eps = mean_out  # Exact: avoids amplifying rounding through 1/sqrt(1/abar - 1).
    else:
        eps = predict_eps_from_x0(sched, x_t, i, pred_x0)
    return {'mean': mean, 'variance': variance, 'log_variance': log_variance,
            'pred_x0': pred_x0, 'eps': eps}
