"""Noise schedules: beta schedules, timestep respacing and the precomputed `Schedule`.

This module owns every per-timestep constant of a Gaussian diffusion. All arithmetic is
done once in float64 NumPy; the result is a `Schedule`, a NamedTuple pytree of float32
JAX arrays (plus the int32 map `timesteps` from step index to original training
timestep), so it can be closed over or passed through `jit`, `vmap` and `grad`.

Notation (Ho et al. 2020, Sec. 2): beta_t is the variance of the forward step
q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), alpha_t = 1 - beta_t and
abar_t = prod_{s <= t} alpha_s (Ho et al. 2020, Eq. 4).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ('linear', 'cosine', 'sigmoid', 'quadratic', 'constant', 'jsd',
                  'warmup10', 'warmup50', 'vp')
# The schedules defined by a first and last beta (`beta_start` / `beta_end`).
ENDPOINT_SCHEDULES = ('linear', 'sigmoid', 'quadratic', 'constant', 'warmup10', 'warmup50')

# Ho et al. 2020 (Sec. 4): linear betas from 1e-4 to 0.02 for T = 1000.
_BETA_START_1000 = 1e-4
_BETA_END_1000 = 0.02
# Largest beta allowed by the schedules that would otherwise reach 1 (Nichol & Dhariwal
# 2021, Sec. 3.2 clip the cosine schedule here to avoid singularities near t = T).
MAX_BETA = 0.999


class Schedule(NamedTuple):
    """Per-step constants of a (possibly respaced) Gaussian diffusion.

    Every field is a float32 JAX array of shape [N] (N = number of steps), except
    `timesteps` (int32 [N]): the original training timestep of each step, which is
    what the model is called with.
    """

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    alphas_cumprod_next: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    timesteps: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        """Number of steps N (static: read from the shape)."""
        return int(self.betas.shape[0])


def _check_num_timesteps(num_timesteps) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ValueError(f'num_timesteps must be an int, got {num_timesteps!r}.')
    if num_timesteps < 1:
        raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}.')
    return int(num_timesteps)


def betas_from_alpha_bar(alpha_bar_fn: Callable[[float], float], num_timesteps: int,
                         max_beta: float = MAX_BETA) -> np.ndarray:
    """Discretises a continuous abar(t), t in [0, 1], into betas.

    beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta)
    (Nichol & Dhariwal 2021, Sec. 3.2).

    Args:
        alpha_bar_fn: Maps t in [0, 1] to the cumulative product abar(t), decreasing,
            with abar(0) > 0.
        num_timesteps: T, the number of steps.
        max_beta: Upper cap on each beta (prevents abar reaching 0).

    Returns:
        float64 [T] betas.

    Raises:
        ValueError: If T < 1, max_beta is outside (0, 1], or the betas are outside (0, 1].
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f'max_beta must be in (0, 1], got {max_beta}.')
    betas = []
    for i in range(num_timesteps):
        a1 = float(alpha_bar_fn(i / num_timesteps))
        a2 = float(alpha_bar_fn((i + 1) / num_timesteps))
        if a1 <= 0.0:
            raise ValueError(f'alpha_bar_fn({i / num_timesteps}) = {a1} must be > 0.')
        betas.append(min(1.0 - a2 / a1, max_beta))
    betas = np.asarray(betas, dtype=np.float64)
    _check_betas(betas)
    return betas


def _cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    # Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2((t + s)/(1 + s) pi/2).
    # Dividing by f(0) cancels in the ratio of betas_from_alpha_bar, so f is used directly.
    return math.cos((t + s) / (1.0 + s) * math.pi / 2.0) ** 2


# The variance-preserving SDE discretised by Xiao et al. 2022 (DDGAN, their App. B and
# code): beta(t) linear from 0.1 to 20 on t in [1e-3, 1].
VP_BETA_MIN, VP_BETA_MAX, VP_T_MIN = 0.1, 20.0, 1e-3


def vp_alpha_bar(s: float) -> float:
    """abar of the VP SDE at s in [0, 1]: exp(-t^2 (b_max - b_min) / 2 - t b_min) with
    t = t_min + s (1 - t_min) (Song et al. 2021b, Eq. 33; Xiao et al. 2022's schedule)."""
    t = VP_T_MIN + s * (1.0 - VP_T_MIN)
    return math.exp(-0.5 * t * t * (VP_BETA_MAX - VP_BETA_MIN) - t * VP_BETA_MIN)


def get_beta_schedule(name: str, num_timesteps: int, beta_start: float = 0.0,
                      beta_end: float = 0.0) -> np.ndarray:
    """Returns the named beta schedule.

    Schedules with endpoints (`ENDPOINT_SCHEDULES`: linear, quadratic, sigmoid,
    constant, warmup*) run from `beta_start` to `beta_end` when both are given (> 0),
    as they are; by default (0) from Ho et al.'s 1e-4 .. 0.02 scaled by 1000 / T, so
    that any T gives the same total noise as T = 1000 (Nichol & Dhariwal 2021, Sec. 3.2
    / their code). Betas are then capped at `MAX_BETA` = 0.999, which matters only for
    T <= 20 with the defaults (where 0.02 * 1000 / T >= 1). Latent diffusion's
    'linear' schedule is 'quadratic' from 0.0015 to 0.0195 here (LDM's
    `make_beta_schedule`: linspace(sqrt(linear_start), sqrt(linear_end), T) ** 2).

    - 'linear': linspace(beta_start, beta_end, T) (Ho et al. 2020, Sec. 4).
    - 'cosine': Nichol & Dhariwal 2021, Eq. 17 with s = 0.008, betas capped at 0.999.
    - 'sigmoid': sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start.
    - 'quadratic': linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2.
    - 'constant': beta_end everywhere.
    - 'jsd': 1/T, 1/(T-1), ..., 1 (Ho et al.'s diffusion_utils; abar_{T-1} = 0).
    - 'warmup10' / 'warmup50': linear from beta_start to beta_end over the first
      int(0.1 T) / int(0.5 T) steps, then beta_end.
    - 'vp': the VP SDE discretised into T steps, for few-step models (DDGAN, T = 2..8):
      beta_i = 1 - abar(t_{i+1}) / abar(t_i) of `vp_alpha_bar`, uncapped (Xiao et al.
      2022's betas; the last one is 0.99945 for T = 2).

    Args:
        name: One of `BETA_SCHEDULES`.
        num_timesteps: T.
        beta_start, beta_end: The endpoints (0 < beta_start < beta_end <= 1), or both 0
            for the defaults above; only for `ENDPOINT_SCHEDULES`.

    Returns:
        float64 [T] betas in (0, 1].

    Raises:
        ValueError: Unknown name, T < 1, or bad endpoints.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if name not in BETA_SCHEDULES:
        raise ValueError(f'Unknown beta schedule {name!r}; valid: {BETA_SCHEDULES}.')
    check_beta_endpoints(name, beta_start, beta_end)
    scale = 1000.0 / num_timesteps
    start, end = scale * _BETA_START_1000, scale * _BETA_END_1000
    if beta_end > 0:
        start, end = float(beta_start), float(beta_end)
    t = num_timesteps
    if name == 'linear':
        betas = np.linspace(start, end, t, dtype=np.float64)
    elif name == 'cosine':
        return betas_from_alpha_bar(_cosine_alpha_bar, t, max_beta=MAX_BETA)
    elif name == 'vp':
        return betas_from_alpha_bar(vp_alpha_bar, t, max_beta=1.0)
    elif name == 'sigmoid':
        x = np.linspace(-6.0, 6.0, t, dtype=np.float64)
        betas = 1.0 / (1.0 + np.exp(-x)) * (end - start) + start
    elif name == 'quadratic':
        betas = np.linspace(start ** 0.5, end ** 0.5, t, dtype=np.float64) ** 2
    elif name == 'constant':
        betas = np.full([t], end, dtype=np.float64)
    elif name == 'jsd':
        betas = 1.0 / np.linspace(t, 1, t, dtype=np.float64)
    else:  # warmup10 / warmup50
        frac = 0.1 if name == 'warmup10' else 0.5
        betas = np.full([t], end, dtype=np.float64)
        warmup = int(t * frac)
        betas[:warmup] = np.linspace(start, end, warmup, dtype=np.float64)
    if name != 'jsd':
        betas = np.minimum(betas, MAX_BETA)
    _check_betas(betas)
    return betas


def space_timesteps(num_timesteps: int,
                    section_counts: str | Sequence[int] | None) -> list[int]:
    """Chooses which of the original timesteps a respaced schedule keeps.

    - "" or None: all T steps.
    - "ddimN": range(0, T, stride) for the integer stride giving exactly N steps
      (Song et al. 2021, DDIM's uniform skip).
    - "a,b,c" (or "a"): split 0..T-1 into len(counts) near-equal contiguous sections
      (the first T % len(counts) one step longer) and take `count` evenly spaced steps
      in each, first and last included, rounding fractional strides (Nichol & Dhariwal
      2021, Sec. 4.1 / their `space_timesteps`).
    - a sequence of ints: exactly those steps.

    Args:
        num_timesteps: T, the original number of steps.
        section_counts: As above.

    Returns:
        Sorted list of distinct kept timesteps in [0, T).

    Raises:
        ValueError: Unparsable input, a section asked for more steps than it has,
            "ddimN" impossible, or explicit steps out of range / duplicated / empty.
    """
    num_timesteps = _check_num_timesteps(num_timesteps)
    if section_counts is None or (isinstance(section_counts, str)
                                  and section_counts.strip() == ''):
        return list(range(num_timesteps))
    if not isinstance(section_counts, str):
        steps = [int(s) for s in np.asarray(section_counts).reshape(-1)]
        if not steps:
            raise ValueError('An explicit list of timesteps must not be empty.')
        if len(set(steps)) != len(steps):
            raise ValueError(f'Duplicate timesteps in {steps}.')
        bad = [s for s in steps if not 0 <= s < num_timesteps]
        if bad:
            raise ValueError(f'Timesteps {bad} out of range [0, {num_timesteps}).')
        return sorted(steps)
    spec = section_counts.strip()
    if spec.startswith('ddim'):
        try:
            desired = int(spec[len('ddim'):])
        except ValueError:
            raise ValueError(f'Cannot parse respacing {section_counts!r}; '
                             'expected "ddimN" with integer N.') from None
        if desired < 1:
            raise ValueError(f'Respacing {section_counts!r}: N must be >= 1.')
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f'Cannot create exactly {desired} steps from {num_timesteps} '
                         f'with an integer stride (respacing {section_counts!r}).')
    try:
        counts = [int(c) for c in spec.split(',')]
    except ValueError:
        raise ValueError(f'Cannot parse respacing {section_counts!r}; expected "ddimN", '
                         '"N" or comma-separated section counts like "10,15,20".') from None
    if any(c < 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f'Section counts in {section_counts!r} must be >= 0 and not '
                         'all zero.')
    if len(counts) > num_timesteps:
        raise ValueError(f'{len(counts)} sections do not fit in {num_timesteps} steps.')
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if count > size:
            raise ValueError(f'Cannot take {count} steps from a section of {size} steps '
                             f'(respacing {section_counts!r}, T={num_timesteps}).')
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulated float index and Python's round (half to even), exactly as Nichol &
        # Dhariwal's code, so that the same spec keeps the same steps.
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, use_timesteps) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the chain that visits only `use_timesteps`, same marginals there.

    beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}} (abar_{t_{-1}} = 1), so that
    q'(x_k | x_0) = q(x_{t_k} | x_0) (Nichol & Dhariwal 2021, Sec. 4.1).

    Args:
        betas: float [T] original betas.
        use_timesteps: Iterable of kept step indices into `betas`.

    Returns:
        (float64 [N] new betas, int64 [N] sorted kept indices).

    Raises:
        ValueError: Invalid betas or kept indices.
    """
    betas = np.asarray(betas, dtype=np.float64)
    _check_betas(betas)
    kept = space_timesteps(betas.shape[0], list(use_timesteps))
    alphas_cumprod = np.cumprod(1.0 - betas)
    new_betas, last = [], 1.0
    for t in kept:
        if last == 0.0:
            new_betas.append(1.0)
        else:
            new_betas.append(1.0 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    return np.asarray(new_betas, dtype=np.float64), np.asarray(kept, dtype=np.int64)


def _check_betas(betas: np.ndarray) -> None:
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f'betas must be a non-empty 1-D array, got shape {betas.shape}.')
    if not np.all(np.isfinite(betas)):
        raise ValueError('betas must be finite.')
    bad = np.nonzero((betas <= 0.0) | (betas > 1.0))[0]
    if bad.size:
        raise ValueError(f'betas must lie in (0, 1]; beta[{bad[0]}] = {betas[bad[0]]}.')


# Where abar_t = 0 (a beta of 1, e.g. the end of 'jsd'), x_0 is unidentifiable from x_t;
# flooring abar here keeps 1 / sqrt(abar) finite in float32 so no NaN appears later.
_MIN_ALPHA_BAR = 1e-20


def create_schedule(betas: np.ndarray, timesteps=None) -> Schedule:
    """Precomputes every per-step constant from betas.

    All maths in float64 NumPy, cast to float32 JAX arrays at the end:
    abar_t (Ho et al. 2020, Eq. 4); the posterior q(x_{t-1} | x_t, x_0) variance
    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (Ho et al. 2020, Eq. 7) and mean
    coefficients coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
    coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) (Eq. 7).
    `posterior_log_variance_clipped` replaces the (zero) variance at t=0 by the one at
    t=1 (for N = 1, by beta_0) so its log is finite.

    Args:
        betas: [N] betas in (0, 1].
        timesteps: [N] original timestep of each step; defaults to arange(N).

    Returns:
        The `Schedule`.

    Raises:
        ValueError: Invalid betas, or timesteps of the wrong shape / negative.
    """
    betas = np.asarray(betas, dtype=np.float64)
    _check_betas(betas)
    n = betas.shape[0]
    if timesteps is None:
        timesteps = np.arange(n)
    timesteps = np.asarray(timesteps)
    if timesteps.shape != (n,):
        raise ValueError(f'timesteps must have shape ({n},), got {timesteps.shape}.')
    if not np.issubdtype(timesteps.dtype, np.integer):
        raise ValueError(f'timesteps must be integers, got dtype {timesteps.dtype}.')
    if np.any(timesteps < 0) or np.any(np.diff(timesteps) <= 0):
        raise ValueError('timesteps must be non-negative and strictly increasing.')

    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
    safe_ac = np.maximum(alphas_cumprod, _MIN_ALPHA_BAR)
    one_minus_ac = 1.0 - alphas_cumprod  # > 0: beta_0 > 0.
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / one_minus_ac
    first = posterior_variance[1] if n > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
    posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / one_minus_ac
    posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_ac

    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(alphas_cumprod),
        alphas_cumprod_prev=f32(alphas_cumprod_prev),
        alphas_cumprod_next=f32(alphas_cumprod_next),
        sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(one_minus_ac)),
        log_one_minus_alphas_cumprod=f32(np.log(one_minus_ac)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / safe_ac)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / safe_ac - 1.0)),
        posterior_variance=f32(posterior_variance),
        posterior_log_variance_clipped=f32(posterior_log_variance_clipped),
        posterior_mean_coef1=f32(posterior_mean_coef1),
        posterior_mean_coef2=f32(posterior_mean_coef2),
        timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
    )


def check_beta_endpoints(name: str, beta_start: float, beta_end: float) -> None:
    """Raises a ValueError naming `beta_start` / `beta_end` unless both are 0 (the
    defaults) or 0 < beta_start < beta_end <= 1 for a schedule with endpoints
    (`ENDPOINT_SCHEDULES`; 'constant' uses beta_end only, but takes both)."""
    if beta_start == 0 and beta_end == 0:
        return
    if name not in ENDPOINT_SCHEDULES:
        raise ValueError(f'beta_start={beta_start}, beta_end={beta_end}: schedule {name!r} '
                         f'has no endpoints (those of {ENDPOINT_SCHEDULES} do); use 0.')
    if not 0.0 < beta_start < beta_end <= 1.0:
        raise ValueError(f'beta_start={beta_start}, beta_end={beta_end}: need 0 < beta_start '
                         '< beta_end <= 1, or both 0 (Ho et al.\'s, scaled by 1000 / T).')


def make_schedule(name: str, num_timesteps: int,
                  respacing: str | Sequence[int] | None = None, *,
                  beta_start: float = 0.0, beta_end: float = 0.0) -> Schedule:
    """Builds a named schedule, optionally respaced (in float64 from the original betas).

    Args:
        name: One of `BETA_SCHEDULES`.
        num_timesteps: T, the training timesteps.
        respacing: Anything `space_timesteps` accepts; None or "" keeps all steps.
        beta_start, beta_end: `get_beta_schedule`'s endpoints (0: the defaults).

    Returns:
        The `Schedule`; its `timesteps` are the kept original timesteps.

    Raises:
        ValueError: See `get_beta_schedule` and `space_timesteps`.
    """
    betas = get_beta_schedule(name, num_timesteps, beta_start, beta_end)
    if respacing is None or (isinstance(respacing, str) and respacing.strip() == ''):
        return create_schedule(betas)
    new_betas, kept = respace_betas(betas, space_timesteps(num_timesteps, respacing))
    return create_schedule(new_betas, kept)


def respace(schedule: Schedule, section_counts) -> Schedule:
    """Respaces an existing (possibly already respaced) schedule.

    The steps are chosen among the N steps of `schedule` (as `space_timesteps(N, ...)`)
    and the maps compose: the result's `timesteps` are original training timesteps.
    The betas are recomputed in float64 from `schedule.betas`. Needs concrete arrays
    (call outside `jit`).

    Args:
        schedule: A `Schedule`.
        section_counts: Anything `space_timesteps` accepts.

    Returns:
        The respaced `Schedule`.

    Raises:
        ValueError: See `space_timesteps`.
    """
    betas = np.asarray(schedule.betas, dtype=np.float64)
    kept = space_timesteps(betas.shape[0], section_counts)
    new_betas, kept = respace_betas(betas, kept)
    timesteps = np.asarray(schedule.timesteps)[kept]
    return create_schedule(new_betas, timesteps)
