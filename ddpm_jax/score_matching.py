"""Denoising score matching in continuous time: the network's conditioning and output
conventions, the loss weightings, and importance sampling of t for the likelihood weighting.

This module owns the maths of training a score model s_theta(x, t) ~ grad_x log p_t(x) on
an SDE of `ddpm_jax.sde` (Song et al. 2021b, "Score-Based Generative Modeling through
SDEs", Eq. 7; Song et al. 2021a, "Maximum Likelihood Training of Score-Based Diffusion
Models", Sec. 4-5):

* `noise_label`: what the network is conditioned on, 999 t or sigma(t). For VP /
  sub-VP 999 t is score_sde's label for its continuous DDPM++ models. For VE, score_sde
  feeds sigma(t) itself, which NCSN++ embeds as log sigma in random Fourier features
  ('sigma'); our UNet's sinusoidal embedding takes 999 t instead, as t = log(sigma /
  sigma_min) / log(sigma_max / sigma_min) is affine in log sigma: an embedding of the
  noise level scaled to the range the sinusoids are built for.
* `score_from_output`: the network output read as a score, score_sde's convention
  (`models/utils.get_score_fn`): VP / sub-VP s = -output / std(t) (the network predicts
  the noise eps); VE s = output / sigma(t) (NCSN++'s scale_by_sigma; the network
  predicts -eps).
* `dsm_loss`: per-example || std s + z ||^2 ('standard', lambda(t) = std^2, Song et al.
  2021b, Eq. 7) or g(t)^2 || s + z / std ||^2 ('likelihood', lambda = g^2, Song et al.
  2021a, Thm. 1), reduced by the mean over dimensions or half their sum (score_sde's
  `reduce_mean`).
* `importance_cdf` / `sample_importance_t` / `importance_density`: t drawn on [eps, 1]
  with density proportional to g(t)^2 / std(t)^2 (Song et al. 2021a, Sec. 5), with which
  the likelihood-weighted loss becomes the standard one up to the constant normaliser
  (score_flow's `sample_importance_weighted_time_for_likelihood`; here the CDF is
  inverted in closed form instead of by bisection).

Everything here is pure JAX: no Flax, no I/O, no global state.
"""

import math

import jax
import jax.numpy as jnp

from ddpm_jax import sde as sde_lib

Array = jax.Array

WEIGHTINGS = ('standard', 'likelihood')
# The network sees 999 t (score_sde's continuous VP label; see the module docstring).
LABEL_SCALE = 999.0


def _bcast(v: Array, x: Array) -> Array:
    return jnp.asarray(v, x.dtype).reshape(v.shape + (1,) * (x.ndim - v.ndim))


LABELS = ('time', 'sigma')


def noise_label(t: Array, sde=None, label: str = 'time') -> Array:
    """The network's conditioning input for times t ([B]), float32.

    Args:
        t: [B] times.
        sde: the SDE (needed for 'sigma').
        label: 'time': 999 t; 'sigma': the marginal std(t), which for VE is sigma(t)
            (score_sde's label for continuous VE models, whose NCSN++ embeds log sigma).
    """
    t = jnp.asarray(t, jnp.float32)
    if label == 'sigma':
        return sde_lib.marginal_coefs(sde, t)[1].astype(jnp.float32)
    if label != 'time':
        raise ValueError(f'label={label!r} is not one of {LABELS}.')
    return LABEL_SCALE * t


def score_from_output(sde, output: Array, t: Array) -> Array:
    """The score of a network output at times t (score_sde's convention).

    Args:
        sde: A `VPSDE`, `SubVPSDE` or `VESDE`.
        output: [B, ...] the network's output.
        t: [B] times.

    Returns:
        [B, ...]: -output / std(t) (VP, sub-VP) or output / sigma(t) (VE).
    """
    _, std = sde_lib.marginal_coefs(sde, t)
    if isinstance(sde, sde_lib.VESDE):
        return output / _bcast(std, output)
    return -output / _bcast(std, output)


def _reduce(x: Array, reduce_mean: bool) -> Array:
    flat = x.reshape(x.shape[0], -1)
    return jnp.mean(flat, axis=-1) if reduce_mean else 0.5 * jnp.sum(flat, axis=-1)


def dsm_loss(score: Array, noise: Array, std: Array, g2: Array, *, weighting: str,
             reduce_mean: bool = True) -> Array:
    """The denoising score matching loss per example (Song et al. 2021b, Eq. 7).

    For x_t = alpha x_0 + std z the target score is -z / std, so
    'standard': lambda = std^2, loss = reduce(|| std s + z ||^2);
    'likelihood': lambda = g^2, loss = g^2 reduce(|| s + z / std ||^2).
    With t drawn by `sample_importance_t`, pass weighting='standard': that is the
    likelihood weighting's importance-sampled estimator up to the constant
    `importance_normalizer` (score_flow's `losses.py`).

    Args:
        score: [B, ...] s(x_t, t).
        noise: [B, ...] z.
        std: [B] std(t).
        g2: [B] g(t)^2 (read only by 'likelihood').
        weighting: One of `WEIGHTINGS`.
        reduce_mean: Mean over dimensions (True) or half their sum (score_sde's
            reduce_mean=False).

    Returns:
        [B] losses.

    Raises:
        ValueError: Unknown weighting.
    """
    if weighting == 'standard':
        return _reduce(jnp.square(_bcast(std, score) * score + noise), reduce_mean)
    if weighting == 'likelihood':
        return g2 * _reduce(jnp.square(score + noise / _bcast(std, noise)), reduce_mean)
    raise ValueError(f'Unknown weighting {weighting!r}; valid: {WEIGHTINGS}.')


# ---------------------------------------------------------------------------
# Importance sampling of t for the likelihood weighting (Song et al. 2021a, Sec. 5).
# ---------------------------------------------------------------------------


def _integrated_beta(sde, t: Array) -> Array:
    # B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2.
    return sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * jnp.square(t)


def _log_expm1(b: Array) -> Array:
    # log(e^b - 1) for b > 0, accurate for small b (log(expm1)) and large b (b + log1p).
    return jnp.where(b < 20.0, jnp.log(jnp.expm1(jnp.minimum(b, 20.0))),
                     b + jnp.log1p(-jnp.exp(-jnp.maximum(b, 20.0))))


def _antiderivative(sde, t: Array) -> Array:
    """F(t) with F' = g^2 / std^2.

    VP: std^2 = 1 - e^{-B}, g^2 = beta, F = log(e^B - 1).
    Sub-VP: std^2 = (1 - e^{-B})^2, g^2 = beta (1 - e^{-2B}), F = 2 log(e^B - 1) - B.
    VE: g^2 / sigma^2 = 2 log(sigma_max / sigma_min), a constant: F = that t.
    (score_flow's `likelihood_importance_cum_weight` is F(t) - F(eps).)
    """
    t = jnp.asarray(t, jnp.float32)
    if isinstance(sde, sde_lib.VESDE):
        return 2.0 * math.log(sde.sigma_max / sde.sigma_min) * t
    b = _integrated_beta(sde, t)
    if isinstance(sde, sde_lib.SubVPSDE):
        return 2.0 * _log_expm1(b) - b
    if isinstance(sde, sde_lib.VPSDE):
        return _log_expm1(b)
    raise ValueError(f'Importance sampling is defined for VPSDE, SubVPSDE and VESDE, got '
                     f'{type(sde).__name__}.')


def importance_normalizer(sde, eps: float) -> Array:
    """Z = int_eps^1 g^2 / std^2 dt, the normaliser of the importance density."""
    return _antiderivative(sde, 1.0) - _antiderivative(sde, eps)


def importance_density(sde, t: Array, eps: float) -> Array:
    """p(t) = g(t)^2 / (std(t)^2 Z) on [eps, 1] (Song et al. 2021a, Sec. 5)."""
    t = jnp.asarray(t, jnp.float32)
    _, g = sde_lib.drift_diffusion(sde, jnp.zeros(t.shape + (1,)), t)
    _, std = sde_lib.marginal_coefs(sde, t)
    return jnp.square(g) / jnp.square(std) / importance_normalizer(sde, eps)


def _inverse_antiderivative(sde, f: Array) -> Array:
    if isinstance(sde, sde_lib.VESDE):
        return f / (2.0 * math.log(sde.sigma_max / sde.sigma_min))
    if isinstance(sde, sde_lib.SubVPSDE):
        # F = 2 log(e^B - 1) - B = 2 log(2 sinh(B / 2)), so B = 2 asinh(e^{F/2} / 2).
        b = 2.0 * jnp.arcsinh(0.5 * jnp.exp(0.5 * f))
    else:
        b = jax.nn.softplus(f)  # F = log(e^B - 1), so B = log(1 + e^F).
    # The positive root of (b1 - b0) t^2 / 2 + b0 t - B = 0, without cancellation.
    a = sde.beta_max - sde.beta_min
    return 2.0 * b / (sde.beta_min + jnp.sqrt(sde.beta_min ** 2 + 2.0 * a * b))


def sample_importance_t(sde, rng: Array, shape, eps: float) -> Array:
    """Draws t in [eps, 1] with density `importance_density` by inverting its CDF
    (F(t) - F(eps)) / Z in closed form.

    Args:
        sde: A `VPSDE`, `SubVPSDE` or `VESDE` (for VE the density is uniform).
        rng: A key.
        shape: Output shape, e.g. (B,).
        eps: The smallest time.

    Returns:
        float32 times of `shape`.
    """
    u = jax.random.uniform(rng, tuple(shape), jnp.float32)
    f_eps = _antiderivative(sde, eps)
    f = f_eps + u * (_antiderivative(sde, 1.0) - f_eps)
    return jnp.clip(_inverse_antiderivative(sde, f), eps, 1.0)
