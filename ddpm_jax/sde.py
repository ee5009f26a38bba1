"""Stochastic differential equations of score-based diffusion (Song et al. 2021b).

This module owns the continuous-time view: the forward SDEs dx = f(x, t) dt + g(t) dw
on t in [0, 1] (VP, sub-VP and VE; Song et al. 2021b, "Score-Based Generative Modeling
through Stochastic Differential Equations", Sec. 3.4 and App. B/C, and their code's
`sde_lib`), their Gaussian marginals, priors and discretisations, the reverse-time SDE
and probability-flow ODE drifts given a score function s(x, t) ~ grad_x log p_t(x), and
the "VP view" that turns any trained discrete-time DDPM/ADM model (eps, x0, v or xprev,
`ddpm_jax.diffusion`'s conventions) into such a score function without retraining.

An SDE is a NamedTuple of parameters (`VPSDE`, `SubVPSDE`, `VESDE`, `DiscreteVPSDE`) and
every function here is a pure function of it and of arrays. Close over an SDE (or pass
it as a static argument; the three parametric ones are hashable) rather than passing it
through `jit` as a traced argument: `num_scales` must stay a Python int. Times `t` are
float arrays of shape [B] (one time per example) and `x` is [B, ...].
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.schedules import Schedule

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


class VPSDE(NamedTuple):
    """Variance-preserving SDE: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw,
    beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021b, Eq. 11 and 32).

    Its discretisation with `num_scales` steps is the DDPM chain of the linear schedule
    (`vp_discrete_betas`)."""
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_scales: int = 1000


class SubVPSDE(NamedTuple):
    """Sub-VP SDE: dx = -beta(t) x / 2 dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dw
    (Song et al. 2021b, Eq. 12); its marginal variance is bounded by the VP one."""
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_scales: int = 1000


class VESDE(NamedTuple):
    """Variance-exploding SDE: dx = sqrt(d sigma^2(t) / dt) dw with geometric
    sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021b, Eq. 9 and 30;
    NCSN's noise levels, Song & Ermon 2019). Defaults: the paper's CIFAR-10 values.

    `prior_mean` is the mean of the prior N(prior_mean, sigma_max^2 I) (every entry):
    0, or -1 for score_sde's VE models run in our units: their prior N(0, sigma_max^2)
    on [0, 1] data is N(-1, (2 sigma_max)^2) in y = 2x - 1 (`tasks.score.create_sde`)."""
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    prior_mean: float = 0.0


class DiscreteVPSDE(NamedTuple):
    """The VP SDE of a discrete `Schedule` ("VP view"; build it with `vp_view`).

    Knot k = 0..N-1 sits at t_k = k / (N - 1) with abar(t_k) = abar_k of the schedule
    (score_sde's map t -> t (N - 1) for DDPM models). Between knots the log-SNR
    lambda = log(abar / (1 - abar)) / 2 is linear in t, so abar(t) = sigmoid(2 lambda(t))
    is continuous and decreasing and beta(t) = -d log abar / dt = -2 (1 - abar) lambda'(t)
    is piecewise smooth: every sampler and the likelihood see a genuine VP SDE that
    passes exactly through the noise levels the model was trained at.

    Attributes:
        log_snr: float32 [N] lambda_k of the schedule's steps, decreasing.
        betas: float32 [N] the schedule's betas (its discretisation, `discretize`).
        timesteps: int32 [N] the original training timestep of each step (what the
            model is called with).
    """
    log_snr: Array
    betas: Array
    timesteps: Array

    @property
    def num_scales(self) -> int:
        return int(self.betas.shape[0])


SDE = Union[VPSDE, SubVPSDE, VESDE, DiscreteVPSDE]
VP_TYPES = (VPSDE, SubVPSDE, DiscreteVPSDE)


def validate_sde(sde: Any) -> None:
    """Checks an SDE's parameters (concrete values only).

    Raises:
        ValueError: Not an SDE, or parameters naming the bad field.
    """
    if isinstance(sde, (VPSDE, SubVPSDE)):
        if not 0.0 < float(sde.beta_min) < float(sde.beta_max):
            raise ValueError(f'{type(sde).__name__}: need 0 < beta_min < beta_max, got '
                             f'beta_min={sde.beta_min}, beta_max={sde.beta_max}.')
    elif isinstance(sde, VESDE):
        if not 0.0 < float(sde.sigma_min) < float(sde.sigma_max):
            raise ValueError(f'VESDE: need 0 < sigma_min < sigma_max, got '
                             f'sigma_min={sde.sigma_min}, sigma_max={sde.sigma_max}.')
        if not math.isfinite(float(sde.prior_mean)):
            raise ValueError(f'VESDE: prior_mean must be finite, got {sde.prior_mean}.')
    elif isinstance(sde, DiscreteVPSDE):
        pass
    else:
        raise ValueError(f'sde must be one of VPSDE, SubVPSDE, VESDE, DiscreteVPSDE; got '
                         f'{type(sde).__name__}.')
    n = sde.num_scales
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f'{type(sde).__name__}: num_scales must be an int >= 2, got {n!r}.')
    if isinstance(sde, (VPSDE, SubVPSDE)) and float(sde.beta_max) / n >= 1.0:
        raise ValueError(f'{type(sde).__name__}: num_scales={n} makes the discrete beta '
                         f'beta_max / num_scales = {float(sde.beta_max) / n} >= 1; use more '
                         'scales.')


def _bcast(v: Array, x: Array) -> Array:
    """[B] (or scalar) -> broadcastable against x [B, ...]."""
    v = jnp.asarray(v, x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _batch_t(t: Array, x: Array) -> Array:
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))


def _sum_flat(x: Array) -> Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


# ---------------------------------------------------------------------------
# The discrete VP view's interpolated log-SNR.
# ---------------------------------------------------------------------------


def _discrete_lambda(sde: DiscreteVPSDE, t: Array) -> tuple[Array, Array]:
    """lambda(t) and d lambda / dt, linear between the knots t_k = k / (N - 1)."""
    n = sde.num_scales
    u = jnp.asarray(t, jnp.float32) * (n - 1)
    k = jnp.clip(jnp.floor(u), 0, n - 2).astype(jnp.int32)
    lo, hi = sde.log_snr[k], sde.log_snr[k + 1]
    slope = hi - lo
    return lo + (u - k) * slope, slope * (n - 1)


def t_to_step(sde: DiscreteVPSDE, t: Array) -> Array:
    """The schedule step nearest to time t: round(t (N - 1)) (`make_vp_score_fn`'s
    'nearest' rule).

    score_sde feeds a DDPM model the label t (N - 1) (their `get_score_fn`); our models
    take integer timesteps, so it is rounded: at the knots it is exact, and in between the
    model sees the nearest trained noise level (a log-SNR error below half a step, i.e.
    < 0.3 % of the range for N = 1000). Interpolating two model calls in log-SNR would
    cost two evaluations per score, which every sampler here would pay.
    """
    n = sde.num_scales
    return jnp.clip(jnp.round(jnp.asarray(t, jnp.float32) * (n - 1)), 0, n - 1).astype(
        jnp.int32)


# ---------------------------------------------------------------------------
# Forward SDE, marginals and prior.
# ---------------------------------------------------------------------------


def _vp_log_mean_coeff(sde, t):
    # log alpha(t) = -int_0^t beta / 2 = -t^2 (b1 - b0) / 4 - t b0 / 2 (Song et al. 2021b,
    # Eq. 33).
    return -0.25 * t ** 2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min


def beta(sde: SDE, t: Array) -> Array:
    """beta(t) = -d log abar(t) / dt of a VP-type SDE, [B].

    Raises:
        ValueError: For a VESDE (it has no beta).
    """
    t = jnp.asarray(t, jnp.float32)
    if isinstance(sde, (VPSDE, SubVPSDE)):
        return sde.beta_min + t * (sde.beta_max - sde.beta_min)
    if isinstance(sde, DiscreteVPSDE):
        lam, dlam = _discrete_lambda(sde, t)
        return -2.0 * jax.nn.sigmoid(-2.0 * lam) * dlam
    raise ValueError(f'beta is defined for VP-type SDEs, got {type(sde).__name__}.')


def ve_sigma(sde: VESDE, t: Array) -> Array:
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021b, App. C)."""
    return sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** jnp.asarray(t, jnp.float32)


def drift_diffusion(sde: SDE, x: Array, t: Array) -> tuple[Array, Array]:
    """f(x, t) and g(t) of the forward SDE dx = f dt + g dw.

    Args:
        sde: The SDE.
        x: [B, ...] state.
        t: [B] (or scalar) times in [0, 1].

    Returns:
        (drift [B, ...], diffusion [B]).
    """
    t = _batch_t(t, x)
    if isinstance(sde, VESDE):
        sigma = ve_sigma(sde, t)
        # d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min) (Song et al. 2021b, Eq. 30).
        g = sigma * math.sqrt(2.0 * (math.log(sde.sigma_max) - math.log(sde.sigma_min)))
        return jnp.zeros_like(x), g
    b = beta(sde, t)
    drift = -0.5 * _bcast(b, x) * x
    if isinstance(sde, SubVPSDE):
        # Song et al. 2021b, Eq. 12: g^2 = beta(t) (1 - exp(-2 int_0^t beta)).
        discount = -jnp.expm1(4.0 * _vp_log_mean_coeff(sde, t))
        return drift, jnp.sqrt(b * discount)
    return drift, jnp.sqrt(b)


def marginal_coefs(sde: SDE, t: Array) -> tuple[Array, Array]:
    """alpha(t), std(t) of the perturbation kernel p_0t(x_t | x_0) = N(alpha x_0, std^2 I).

    VP: alpha = exp(-int beta / 2), std = sqrt(1 - alpha^2); sub-VP: std = 1 - alpha^2
    (Song et al. 2021b, Eq. 29 and 34); VE: alpha = 1, std = sigma(t) (score_sde's
    convention, which drops the sigma_min^2 that the SDE started at t = 0 would subtract).

    Args:
        sde: The SDE.
        t: Times, any shape.

    Returns:
        (alpha, std), each shaped like t.
    """
    t = jnp.asarray(t, jnp.float32)
    if isinstance(sde, VESDE):
        return jnp.ones_like(t), ve_sigma(sde, t)
    if isinstance(sde, DiscreteVPSDE):
        lam, _ = _discrete_lambda(sde, t)
        # abar = sigmoid(2 lambda), 1 - abar = sigmoid(-2 lambda): no cancellation.
        return jnp.sqrt(jax.nn.sigmoid(2.0 * lam)), jnp.sqrt(jax.nn.sigmoid(-2.0 * lam))
    lmc = _vp_log_mean_coeff(sde, t)
    one_minus = -jnp.expm1(2.0 * lmc)
    if isinstance(sde, SubVPSDE):
        return jnp.exp(lmc), one_minus
    return jnp.exp(lmc), jnp.sqrt(one_minus)


def marginal_prob(sde: SDE, x0: Array, t: Array) -> tuple[Array, Array]:
    """Mean [B, ...] and std [B] of p_0t(x_t | x_0) (score_sde's `marginal_prob`)."""
    alpha, std = marginal_coefs(sde, _batch_t(t, x0))
    return _bcast(alpha, x0) * x0, std


def perturb(sde: SDE, x0: Array, t: Array, noise: Array) -> Array:
    """x_t = alpha(t) x_0 + std(t) noise, a sample of p_0t(x_t | x_0)."""
    mean, std = marginal_prob(sde, x0, t)
    return mean + _bcast(std, x0) * noise


def prior_std(sde: SDE) -> float:
    """Standard deviation of the prior p_1 = N(0, std^2 I): sigma_max for VE, else 1."""
    return float(sde.sigma_max) if isinstance(sde, VESDE) else 1.0


def prior_mean(sde: SDE) -> float:
    """Mean of the prior p_1 (every entry): a `VESDE`'s `prior_mean`, else 0."""
    return float(sde.prior_mean) if isinstance(sde, VESDE) else 0.0


def prior_sample(sde: SDE, rng: Array, shape) -> Array:
    """Draws x_1 ~ N(prior_mean, prior_std^2 I) of the given shape (float32)."""
    return prior_mean(sde) + prior_std(sde) * jax.random.normal(rng, tuple(shape),
                                                                jnp.float32)


def prior_logp(sde: SDE, z: Array) -> Array:
    """log N(z; prior_mean, prior_std^2 I) per example, [B], in nats."""
    s = prior_std(sde)
    d = math.prod(z.shape[1:])
    return (-0.5 * d * math.log(2.0 * math.pi * s * s)
            - 0.5 * _sum_flat(jnp.square(z - prior_mean(sde))) / (s * s))


# ---------------------------------------------------------------------------
# Discretisations.
# ---------------------------------------------------------------------------


def vp_discrete_betas(sde: Union[VPSDE, SubVPSDE]) -> np.ndarray:
    """The N betas of the VP SDE's discretisation, float64 [N]:

    beta_i = beta_min / N + i (beta_max - beta_min) / (N (N - 1)), i = 0..N-1
    (Song et al. 2021b, App. B), i.e. linspace(beta_min / N, beta_max / N, N): for
    beta_min = 0.1, beta_max = 20, N = 1000 this is Ho et al.'s linear schedule.
    """
    n = sde.num_scales
    return np.linspace(sde.beta_min / n, sde.beta_max / n, n, dtype=np.float64)


def ve_discrete_sigmas(sde: VESDE) -> np.ndarray:
    """score_sde's VE noise ladder: exp(linspace(log sigma_min, log sigma_max, N)),
    increasing, float64 [N]; sigma_i = sigma(i / (N - 1))."""
    return np.exp(np.linspace(math.log(sde.sigma_min), math.log(sde.sigma_max),
                              sde.num_scales, dtype=np.float64))


def ncsn_sigmas(sigma_1: float, sigma_L: float, num_levels: int) -> np.ndarray:
    """NCSN's noise levels: a geometric sequence sigma_1 > ... > sigma_L, float64 [L]
    (Song & Ermon 2019, Sec. 4.2: sigma_1 = 1, sigma_L = 0.01, L = 10).

    Raises:
        ValueError: Unless sigma_1 > sigma_L > 0 and num_levels >= 2.
    """
    if not float(sigma_1) > float(sigma_L) > 0.0:
        raise ValueError(f'need sigma_1 > sigma_L > 0, got sigma_1={sigma_1}, '
                         f'sigma_L={sigma_L}.')
    if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)) or (
            num_levels < 2):
        raise ValueError(f'num_levels must be an int >= 2, got {num_levels!r}.')
    return np.exp(np.linspace(math.log(sigma_1), math.log(sigma_L), num_levels))


def _step_index(sde: SDE, t: Array) -> Array:
    # score_sde's `discretize`: timestep = int(t (N - 1) / T), truncated. The small
    # relative margin keeps a knot t = i / (N - 1), which float32 may put just below i,
    # at step i (score_sde would fall to i - 1 there).
    u = jnp.asarray(t, jnp.float32) * (sde.num_scales - 1)
    u = u + 1e-5 * jnp.maximum(u, 1.0)
    return jnp.clip(jnp.floor(u).astype(jnp.int32), 0, sde.num_scales - 1)


def discretize(sde: SDE, x: Array, t: Array) -> tuple[Array, Array]:
    """One step of the forward chain x_{i+1} = x_i + f_i + G_i z (score_sde's `discretize`).

    VP: f_i = (sqrt(1 - beta_i) - 1) x, G_i = sqrt(beta_i) with `vp_discrete_betas`
    (the DDPM chain; for a `DiscreteVPSDE` the schedule's own betas). VE: f_i = 0,
    G_i = sqrt(sigma_i^2 - sigma_{i-1}^2) on `ve_discrete_sigmas` (sigma_{-1} = 0, the
    SMLD chain). Sub-VP: Euler-Maruyama, f_i = f dt, G_i = g sqrt(dt) with dt = 1 / N.
    The step is i = int(t (N - 1)).

    Returns:
        (f_i [B, ...], G_i [B]).
    """
    t = _batch_t(t, x)
    i = _step_index(sde, t)
    if isinstance(sde, VESDE):
        sigmas = jnp.asarray(ve_discrete_sigmas(sde), jnp.float32)
        adjacent = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
        return jnp.zeros_like(x), jnp.sqrt(sigmas[i] ** 2 - adjacent ** 2)
    if isinstance(sde, SubVPSDE):
        drift, g = drift_diffusion(sde, x, t)
        dt = 1.0 / sde.num_scales
        return drift * dt, g * math.sqrt(dt)
    if isinstance(sde, DiscreteVPSDE):
        b = sde.betas[i]
    else:
        b = jnp.asarray(vp_discrete_betas(sde), jnp.float32)[i]
    return (_bcast(jnp.sqrt(1.0 - b), x) - 1.0) * x, jnp.sqrt(b)


def ancestral_step(sde: SDE, score_fn: ScoreFn, x: Array, t: Array) -> tuple[Array, Array]:
    """One step of the discrete chain's ancestral sampler from step i = int(t (N - 1))
    to i - 1 (score_sde's `AncestralSamplingPredictor`; Song et al. 2021b, App. F):

    * VP (the DDPM chain, `vp_discrete_betas` or a `DiscreteVPSDE`'s own betas):
      x_mean = (x + beta_i s) / sqrt(1 - beta_i), std = sqrt(beta_i);
    * VE (the SMLD chain on `ve_discrete_sigmas`, sigma_{-1} = 0):
      x_mean = x + (sigma_i^2 - sigma_{i-1}^2) s,
      std = sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2),

    with s = score_fn(x, t). Sub-VP has no such chain (score_sde refuses it too).

    Returns:
        (x_mean [B, ...], std [B]): the step is x_mean + std z.

    Raises:
        ValueError: For a sub-VP SDE.
    """
    if isinstance(sde, SubVPSDE):
        raise ValueError("The 'ancestral_sampling' predictor takes a VP or VE SDE (the "
                         'DDPM or SMLD chain); a sub-VP SDE has no such chain.')
    t = _batch_t(t, x)
    i = _step_index(sde, t)
    score = score_fn(x, t)
    if isinstance(sde, VESDE):
        sigmas = jnp.asarray(ve_discrete_sigmas(sde), jnp.float32)
        sigma2 = jnp.square(sigmas[i])
        adjacent2 = jnp.where(i == 0, 0.0, jnp.square(sigmas[jnp.maximum(i - 1, 0)]))
        x_mean = x + _bcast(sigma2 - adjacent2, x) * score
        return x_mean, jnp.sqrt(adjacent2 * (sigma2 - adjacent2) / sigma2)
    if isinstance(sde, DiscreteVPSDE):
        b = sde.betas[i]
    else:
        b = jnp.asarray(vp_discrete_betas(sde), jnp.float32)[i]
    x_mean = (x + _bcast(b, x) * score) / _bcast(jnp.sqrt(1.0 - b), x)
    return x_mean, jnp.sqrt(b)


def discrete_alphas(sde: SDE, t: Array) -> Array:
    """alpha_i = 1 - beta_i of the VP chain at step int(t (N - 1)) ([B]; sub-VP uses the
    VP betas); 1 for VE. The Langevin corrector scales its step by it (score_sde)."""
    if isinstance(sde, VESDE):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))
    i = _step_index(sde, t)
    if isinstance(sde, DiscreteVPSDE):
        return 1.0 - sde.betas[i]
    # Sub-VP shares the VP's beta(t), so its chain's alphas (score_sde's subVPSDE has no
    # `alphas`, so its Langevin corrector does not run on sub-VP: no reference to match).
    return 1.0 - jnp.asarray(vp_discrete_betas(sde), jnp.float32)[i]


# ---------------------------------------------------------------------------
# Reverse-time SDE and probability-flow ODE.
# ---------------------------------------------------------------------------


def reverse_drift_diffusion(sde: SDE, score_fn: ScoreFn, x: Array, t: Array, *,
                            probability_flow: bool = False) -> tuple[Array, Array]:
    """Drift and diffusion of the reverse-time SDE (run with dt < 0):

    dx = [f - g^2 s(x, t)] dt + g dw-bar (Song et al. 2021b, Eq. 6), or with
    `probability_flow` the ODE dx = [f - g^2 s / 2] dt (Eq. 13), whose diffusion is 0.

    Args:
        sde: The SDE.
        score_fn: s(x [B, ...], t [B]) -> [B, ...].
        x: [B, ...] state.
        t: [B] (or scalar) times.
        probability_flow: The ODE instead of the SDE.

    Returns:
        (drift [B, ...], diffusion [B]).
    """
    t = _batch_t(t, x)
    f, g = drift_diffusion(sde, x, t)
    s = score_fn(x, t)
    w = 0.5 if probability_flow else 1.0
    drift = f - w * _bcast(jnp.square(g), x) * s
    return drift, (jnp.zeros_like(g) if probability_flow else g)


def ode_drift(sde: SDE, score_fn: ScoreFn, x: Array, t: Array) -> Array:
    """dx/dt of the probability-flow ODE, f - g^2 s / 2 (Song et al. 2021b, Eq. 13)."""
    return reverse_drift_diffusion(sde, score_fn, x, t, probability_flow=True)[0]


def reverse_discretize(sde: SDE, score_fn: ScoreFn, x: Array, t: Array, *,
                       probability_flow: bool = False) -> tuple[Array, Array]:
    """The reverse of `discretize`: rev_f = f_i - G_i^2 s (x 1/2 for the ODE), rev_G = G_i
    (0 for the ODE), so x_{i-1} = x_i - rev_f + rev_G z (score_sde's reverse-diffusion
    predictor, Song et al. 2021b, Eq. 46-47)."""
    t = _batch_t(t, x)
    f, g = discretize(sde, x, t)
    s = score_fn(x, t)
    w = 0.5 if probability_flow else 1.0
    rev_f = f - w * _bcast(jnp.square(g), x) * s
    return rev_f, (jnp.zeros_like(g) if probability_flow else g)


# ---------------------------------------------------------------------------
# The VP view of a discrete-time model.
# ---------------------------------------------------------------------------


def vp_view(sched: Schedule) -> DiscreteVPSDE:
    """The `DiscreteVPSDE` whose knots are the steps of `sched` (see its docstring).

    Raises:
        ValueError: A schedule of fewer than 2 steps or one that reaches abar = 0.
    """
    n = sched.num_timesteps
    if n < 2:
        raise ValueError(f'vp_view needs a schedule of >= 2 steps, got {n}.')
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    if np.any(abar <= 0.0):
        raise ValueError('vp_view: the schedule reaches alphas_cumprod = 0 (e.g. "jsd"); '
                         'its log-SNR is -inf.')
    # 1 - abar from the float64-derived sqrt, which keeps precision at small t.
    one_minus = np.square(np.asarray(sched.sqrt_one_minus_alphas_cumprod, np.float64))
    log_snr = 0.5 * (np.log(abar) - np.log(one_minus))
    return DiscreteVPSDE(log_snr=jnp.asarray(log_snr, jnp.float32),
                         betas=jnp.asarray(sched.betas, jnp.float32),
                         timesteps=jnp.asarray(sched.timesteps, jnp.int32))


VP_VIEW_STEPS = ('nearest', 'chain')  # `make_vp_score_fn`'s rules for the model's step.


def make_vp_score_fn(model_fn: Callable[..., Array], sched: Schedule, *,
                     mean_type: str = 'eps', var_type: str = 'fixed_small',
                     clip_denoised: bool = False,
                     denoised_fn: Optional[Callable[[Array], Array]] = None,
                     model_kwargs: Optional[Mapping[str, Any]] = None,
                     cond_fn: Optional[Callable[..., Array]] = None,
                     classifier_scale: float = 1.0, step: str = 'nearest'
                     ) -> tuple[DiscreteVPSDE, ScoreFn]:
    """The VP view of a discrete-time model: its SDE and score function s(x, t).

    For t in [0, 1] the model is called once, at a step i of the schedule (its original
    timestep `sched.timesteps[i]`), its output turned into eps by
    `diffusion.p_mean_variance` (any mean type; with `clip_denoised` the eps consistent
    with the clipped x_0), and s = -eps / sqrt(1 - abar_i) (Song et al. 2021b, App. C;
    score_sde's `get_score_fn` for DDPM models, which divides by the discrete std too).

    `step` chooses i. 'nearest': `t_to_step`, round(t (N - 1)), the trained level
    nearest to t (the ODE, Heun and Langevin samplers). 'chain': int(t (N - 1)), the
    step whose beta_i the discrete chain's steps take (`discretize`, `ancestral_step`,
    `discrete_alphas`) and whose std score_sde divides by; the predictor-corrector
    samplers use it, so that each of their steps pairs the model, its std and beta_i of
    one step i: on score_sde's grid t = linspace(1, eps, N) (eps < 1 / N) the steps are
    then N - 1, ..., 0, each the chain's own. (score_sde feeds the network the float
    label t (N - 1), between the two; ours take integer steps.)

    Args:
        model_fn: `model_fn(x, t_int [B], **model_kwargs)`, as the samplers take.
        sched: The model's (training, or respaced) schedule. Use the full training
            schedule for continuous-time samplers: the knots are its steps.
        mean_type, var_type: `diffusion.MEAN_TYPES` / `VAR_TYPES` (the variance is unused).
        clip_denoised: Clip the implied x_0 to [-1, 1].
        denoised_fn: Optional map of the implied x_0 (before clipping), as the samplers.
        model_kwargs: Extra keyword arguments for `model_fn` (and `cond_fn`).
        cond_fn: Optional classifier guidance `cond_fn(x, t_int, **model_kwargs)` =
            grad_x log p(y | x_t); the score becomes s + classifier_scale grad, the same
            shift as `samplers.ddim_sample`'s eps - sqrt(1 - abar) s grad (Dhariwal &
            Nichol 2021, Alg. 2).
        classifier_scale: The guidance scale.
        step: 'nearest' or 'chain' (above).

    Returns:
        (sde, score_fn) with score_fn(x [B, ...], t [B] float) -> [B, ...].

    Raises:
        ValueError: Unknown mean/var type, step rule, or schedule as in `vp_view`.
    """
    diffusion.validate_types(mean_type, var_type)
    if step not in VP_VIEW_STEPS:
        raise ValueError(f'step must be one of {VP_VIEW_STEPS}, got {step!r}.')
    sde = vp_view(sched)
    kwargs = dict(model_kwargs or {})
    step_of = t_to_step if step == 'nearest' else _step_index

    def score_fn(x, t):
        i = step_of(sde, _batch_t(t, x))
        t_int = sched.timesteps[i]
        out = model_fn(x, t_int, **kwargs)
        terms = diffusion.p_mean_variance(sched, out, x, i, mean_type=mean_type,
                                          var_type=var_type, clip_denoised=clip_denoised,
                                          denoised_fn=denoised_fn)
        std = sched.sqrt_one_minus_alphas_cumprod[i]
        score = -terms['eps'] / _bcast(std, x)
        if cond_fn is not None:
            grad = cond_fn(x, t_int, **kwargs)
            if tuple(grad.shape) != tuple(x.shape):
                raise ValueError(f'cond_fn returned shape {tuple(grad.shape)}, expected '
                                 f'{tuple(x.shape)}.')
            score = score + classifier_scale * grad.astype(score.dtype)
        return score

    return sde, score_fn


# ---------------------------------------------------------------------------
# The "VE" (Karras et al. 2022) variables y = x / alpha, sigma = std / alpha.
# ---------------------------------------------------------------------------


def sigma_of_t(sde: SDE, t: Array) -> Array:
    """sigma(t) = std(t) / alpha(t), the noise level of y = x / alpha (Karras et al. 2022,
    Eq. 4's sigma with s(t) = alpha(t))."""
    alpha, std = marginal_coefs(sde, t)
    return std / alpha


def t_of_sigma(sde: SDE, sigma: Array) -> Array:
    """Inverse of `sigma_of_t` (every SDE here).

    VP and sub-VP: with c = -2 log alpha(t) = t^2 (b1 - b0) / 2 + t b0 (Song et al. 2021b,
    Eq. 33), a quadratic in t whose positive root is taken. VP: sigma^2 = 1 / alpha^2 - 1,
    so c = log(1 + sigma^2). Sub-VP: std = 1 - alpha^2 (Eq. 29), so sigma = 1 / alpha -
    alpha, alpha = (sqrt(sigma^2 + 4) - sigma) / 2 and c = 2 asinh(sigma / 2). Discrete
    VP: lambda = -log sigma, inverted on its piecewise-linear knots. VE:
    t = log(sigma / sigma_min) / log(sigma_max / sigma_min).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    if isinstance(sde, VESDE):
        return jnp.log(sigma / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)
    if isinstance(sde, (VPSDE, SubVPSDE)):
        if isinstance(sde, SubVPSDE):
            c = 2.0 * jnp.arcsinh(0.5 * sigma)
        else:
            c = jnp.log1p(jnp.square(sigma))
        a = 0.5 * (sde.beta_max - sde.beta_min)
        b = sde.beta_min
        # The positive root, written to avoid cancellation: 2c / (b + sqrt(b^2 + 4ac)).
        return 2.0 * c / (b + jnp.sqrt(b * b + 4.0 * a * c))
    if isinstance(sde, DiscreteVPSDE):
        n = sde.num_scales
        knots = jnp.linspace(0.0, 1.0, n, dtype=jnp.float32)
        # lambda decreases with t; interp needs increasing x: use -lambda.
        return jnp.interp(jnp.log(sigma), -sde.log_snr, knots, left=0.0, right=1.0)
    raise ValueError(f't_of_sigma is not defined for {type(sde).__name__}.')


def sigma_score_from_score(sde: SDE, score_fn: ScoreFn) -> Callable[[Array, Array], Array]:
    """The score of y = x / alpha at noise level sigma, from a score s(x, t) of x:

    grad_y log p(y; sigma) = alpha s(alpha y, t(sigma)) (the change of variables
    x = alpha y, at the t where std / alpha = sigma; Karras et al. 2022, Eq. 4). In these
    variables every SDE is a VE one, y = x_0 + sigma n, which annealed Langevin dynamics
    expects (Song & Ermon 2019). For a VE SDE (alpha = 1) it is s(y, t(sigma)).

    Returns:
        score(y [B, ...], sigma [B] or scalar) -> [B, ...].
    """
    def score(y, sigma):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (y.shape[0],))
        t = t_of_sigma(sde, sigma)
        alpha, _ = marginal_coefs(sde, t)
        a = _bcast(alpha, y)
        return a * score_fn(a * y, t)
    return score


def denoiser_from_score(sde: SDE, score_fn: ScoreFn) -> Callable[[Array, Array], Array]:
    """A denoiser D(y, sigma) ~ E[x_0 | y] in Karras et al.'s variables from a score.

    With x = alpha(t) y at the t where std/alpha = sigma, the score of y is
    alpha s(x, t) (`sigma_score_from_score`), and Tweedie's formula gives
    D = y + sigma^2 alpha s(alpha y, t) (Karras et al. 2022, Eq. 3). For the VP view of an
    eps model this is exactly y - sigma eps, the DDIM denoiser.

    Returns:
        D(y [B, ...], sigma [B] or scalar) -> [B, ...].
    """
    score = sigma_score_from_score(sde, score_fn)

    def denoise(y, sigma):
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (y.shape[0],))
        return y + _bcast(jnp.square(sigma), y) * score(y, sigma)
    return denoise
