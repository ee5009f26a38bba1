"""Score-based and fast ODE samplers: Langevin, reverse SDE, PC, probability-flow ODE,
Karras et al.'s Heun sampler and DPM-Solver++ (3M and 2S).

This module owns the samplers of the continuous-time view (`ddpm_jax.sde`):

* `annealed_langevin_sample`: NCSN's annealed Langevin dynamics (Song & Ermon 2019, Alg. 1),
  `sde_langevin_sample` on any SDE's model, NCSNv2's step-size rule (`ncsnv2_step_size`);
* `pc_sample`: reverse-time SDE samplers, Euler-Maruyama or the reverse-diffusion
  predictor, optionally with the Langevin corrector (Song et al. 2021b, Alg. 1-5);
* `ode_sample`: the probability-flow ODE with an adaptive diffrax solver (Tsit5 or Dopri5,
  PID step-size control), the whole solve under `jit`;
* `karras_sample`: Karras et al. 2022's 2nd-order Heun sampler with their sigma schedule
  and optional churn, on a denoiser D(x, sigma); `make_vp_denoiser` adapts a discrete
  VP model to it, and `make_round_sigma` is EDM's rounding to its trained levels;

and, on a discrete `Schedule` with the signature of `samplers.SAMPLERS`' functions
(`fn(model_fn, sched, shape, rng, *, mean_type, var_type, clip_denoised, ...)`),

* `dpm_solver_3m_sample` and `dpm_solver_2s_sample`: DPM-Solver++(3M) and (2S)
  (Lu et al. 2022b), beside `samplers.dpm_solver_sample`'s 2M;
* `vp_ode_sample`, `vp_pc_sample`, `vp_heun_sample` and `vp_langevin_sample`: the ODE,
  PC, Heun and annealed Langevin samplers for a trained discrete-time model through its
  VP view (`sde.make_vp_score_fn`).

Every sampler is one `lax.scan` or one diffrax solve, so jitting it with the score /
model / denoiser function static compiles one program per shape. The score-based
samplers return `SampleOutput(samples, nfe)`; the schedule-based ones return what
`samplers.ddpm_sample` returns, and `(that, nfe)` with `return_nfe=True`. NFE counts
the model (score / denoiser) evaluations actually executed.

Everything here is pure JAX: no Flax, no I/O, no global state.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax import samplers
from ddpm_jax import sde as sde_lib
from ddpm_jax.schedules import Schedule

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
DenoiserFn = Callable[[Array, Array], Array]

PREDICTORS = ('euler_maruyama', 'reverse_diffusion', 'ancestral_sampling', 'none')
CORRECTORS = ('langevin', 'ald', 'none')
ODE_SOLVERS = ('tsit5', 'dopri5')
# Model evaluations per diffrax step: both are 7-stage FSAL Runge-Kutta methods, so a
# step (accepted or rejected) costs 6 new evaluations, plus 1 for the first stage at t0
# (measured with a counting vector field and checked by the tests).
_EVALS_PER_STEP = {'tsit5': 6, 'dopri5': 6}


class SampleOutput(NamedTuple):
    """samples: [B, ...]; nfe: int32 scalar, model evaluations executed."""
    samples: Array
    nfe: Array


def _bcast(v: Array, x: Array) -> Array:
    v = jnp.asarray(v, x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')
    return int(value)


def _check_positive(name: str, value: Any) -> None:
    v = samplers._concrete_float(value)
    if v is not None and not v > 0.0:
        raise ValueError(f'{name} must be > 0, got {value!r}.')


def _init(shape, rng, x_init, scale: float, name: str, needs_noise: bool,
          mean: float = 0.0):
    """(x_init, noise_rng): x_init defaults to mean + scale * N(0, I)."""
    shape = samplers._check_shape(shape)
    if x_init is not None:
        x_init = jnp.asarray(x_init)
        if tuple(x_init.shape) != shape:
            raise ValueError(f'{name}: x_init has shape {tuple(x_init.shape)} but shape is '
                             f'{shape}.')
    if rng is None:
        if x_init is None or needs_noise:
            raise ValueError(f'{name}: rng is None but is needed (x_init not given or '
                             'noise is added).')
        return x_init.astype(jnp.float32), None
    init_rng, noise_rng = jax.random.split(rng)
    if x_init is None:
        x_init = mean + scale * jax.random.normal(init_rng, shape, jnp.float32)
    return x_init.astype(jnp.float32), noise_rng


def _batch(v, x):
    return jnp.broadcast_to(jnp.asarray(v, jnp.float32), (x.shape[0],))


def _norms(x):
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=-1))


# ---------------------------------------------------------------------------
# Annealed Langevin dynamics (NCSN).
# ---------------------------------------------------------------------------


def langevin_step_sizes(sigmas, step_size: float) -> np.ndarray:
    """alpha_i = eps sigma_i^2 / sigma_L^2 of annealed Langevin dynamics (Song & Ermon 2019,
    Alg. 1), float64 [L]: the last level's step is eps, each earlier one larger by the
    ratio of the variances.

    Raises:
        ValueError: sigmas not a non-empty 1-D positive array, or step_size <= 0.
    """
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or sigmas.shape[0] < 1 or not np.all(sigmas > 0):
        raise ValueError(f'sigmas must be a non-empty 1-D array of positive noise levels, '
                         f'got {sigmas!r}.')
    if not float(step_size) > 0.0:
        raise ValueError(f'step_size must be > 0, got {step_size!r}.')
    return float(step_size) * np.square(sigmas / sigmas[-1])


def langevin_variance_ratio(step_size: float, gamma: float, sigma_last: float,
                            steps_per_level: int) -> float:
    """NCSNv2's Eq. 4 (Song & Ermon 2020, Technique 4): the variance of the samples after
    `steps_per_level` steps at level sigma_i, over sigma_i^2, when the data are one point
    and the previous level (sigma_{i-1} = gamma sigma_i) was reached exactly.

    With u = eps / sigma_L^2 every level contracts by 1 - u per step and adds 2 alpha_i of
    noise, so the ratio is (1 - u)^(2T) (gamma^2 - V) + V with the fixed point
    V = 2u / (1 - (1 - u)^2) = 1 / (1 - u / 2). It is >= 1; Technique 4 picks eps that
    brings it closest to 1 (`ncsnv2_step_size`).
    """
    u = float(step_size) / float(sigma_last) ** 2
    fixed = 1.0 / (1.0 - 0.5 * u)
    return (1.0 - u) ** (2 * int(steps_per_level)) * (float(gamma) ** 2 - fixed) + fixed


def ncsnv2_step_size(gamma: float, sigma_last: float, steps_per_level: int) -> float:
    """The step size eps whose `langevin_variance_ratio` is closest to 1 (NCSNv2's
    Technique 4, for the geometric ratio gamma = sigma_{i-1} / sigma_i), found on a
    fine log grid of u = eps / sigma_L^2 in (0, 1) and refined by golden-section search
    (the ratio is unimodal in u there).

    Raises:
        ValueError: gamma <= 1, sigma_last <= 0 or steps_per_level < 1.
    """
    if not float(gamma) > 1.0 or not float(sigma_last) > 0.0:
        raise ValueError(f'need gamma > 1 and sigma_last > 0, got gamma={gamma}, '
                         f'sigma_last={sigma_last}.')
    steps = _check_int('steps_per_level', steps_per_level, 1)
    ratio = np.vectorize(
        lambda u: langevin_variance_ratio(u * sigma_last ** 2, gamma, sigma_last, steps))
    grid = np.geomspace(1e-9, 0.999, 4001)
    k = int(np.argmin(ratio(grid)))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(100):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if ratio(a) < ratio(b):
            hi = b
        else:
            lo = a
    return float(0.5 * (lo + hi) * sigma_last ** 2)


# Where annealed Langevin dynamics starts (`sample.langevin_init`).
LANGEVIN_INITS = ('prior', 'uniform')


def annealed_langevin_sample(score_fn: ScoreFn, sigmas, shape: Sequence[int],
                             rng: Array, *, step_size: float = 2e-5,
                             steps_per_level: int = 100, x_init: Optional[Array] = None,
                             denoise: bool = False, init: str = 'prior') -> SampleOutput:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1; NCSNv2's Alg. 1).

    For each noise level sigma_i of sigma_1 > ... > sigma_L, with
    alpha_i = step_size sigma_i^2 / sigma_L^2 (`langevin_step_sizes`), `steps_per_level`
    times: x <- x + alpha_i s(x, sigma_i) + sqrt(2 alpha_i) z.

    This is the update of NCSN's and NCSNv2's released code and of NCSNv2's Alg. 1, with
    which the published step sizes were run (NCSN: eps = 2e-5, T = 100, L = 10; NCSNv2
    e.g. CIFAR-10: eps = 6.2e-6, T = 5, L = 232), so those numbers apply as they are in
    the same data units. They ran on [0, 1] data: on our [-1, 1] images with their sigmas
    doubled, the same chain (mapped by y = 2x - 1) takes 4 eps, alpha scaling as sigma^2.
    NCSN's paper prints the same algorithm as x + alpha'/2 s + sqrt(alpha') z: its alpha'
    is 2 alpha. With `denoise`, a last Tweedie step x + sigma_L^2 s(x, sigma_L) removes
    the remaining noise (NCSNv2's final denoising, Song & Ermon 2020, App. C.2; one more
    evaluation).

    Args:
        score_fn: s(x [B, ...], sigma [B]) -> [B, ...], a noise-conditional score.
        sigmas: [L] decreasing noise levels (e.g. `sde.ncsn_sigmas`).
        shape: [B, ...] static.
        rng: `jax.random.key`.
        step_size: eps > 0 (NCSN: 2e-5; `ncsnv2_step_size` gives NCSNv2's choice).
        steps_per_level: T >= 1 (NCSN: 100).
        x_init: start; default drawn as `init` says.
        denoise: Add the final Tweedie step.
        init: The default start: 'prior', sigma_1 N(0, I) (the VE prior, as score_sde's
            'ald' corrector starts), or 'uniform', U(-1, 1): NCSN's and NCSNv2's code
            (`torch.rand`, U[0, 1) in their data range, which NCSNv2's
            `data_transform` rescales to [-1, 1) for rescaled data as ours).

    Returns:
        `SampleOutput`, nfe = L T (+ 1).

    Raises:
        ValueError: Bad sigmas / step_size / steps_per_level / shapes.
    """
    _check_positive('step_size', step_size)
    steps_per_level = _check_int('steps_per_level', steps_per_level, 1)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError(f'sigmas must be a non-empty 1-D array, got shape {sigmas.shape}.')
    num_levels = sigmas.shape[0]
    if init not in LANGEVIN_INITS:
        raise ValueError(f'init must be one of {LANGEVIN_INITS}, got {init!r}.')
    x, noise_rng = _init(shape, rng, x_init, 1.0, 'annealed_langevin_sample', True)
    if x_init is None and init == 'uniform':
        # From the key `_init` draws its normal start from.
        x = jax.random.uniform(jax.random.split(rng)[0], x.shape, jnp.float32, -1.0, 1.0)
    elif x_init is None:
        x = x * sigmas[0]
    sigma_last = sigmas[-1]

    def body(x, k):
        sigma = sigmas[k // steps_per_level]
        alpha = step_size * jnp.square(sigma / sigma_last)
        z = jax.random.normal(jax.random.fold_in(noise_rng, k), x.shape, x.dtype)
        x = x + alpha * score_fn(x, _batch(sigma, x)) + jnp.sqrt(2.0 * alpha) * z
        return x, None

    x, _ = jax.lax.scan(body, x, jnp.arange(num_levels * steps_per_level, dtype=jnp.int32))
    nfe = num_levels * steps_per_level
    if denoise:
        x = x + jnp.square(sigma_last) * score_fn(x, _batch(sigma_last, x))
        nfe += 1
    return SampleOutput(x, jnp.asarray(nfe, jnp.int32))


def sde_langevin_sample(sde, score_fn: ScoreFn, shape: Sequence[int], rng: Array, *,
                        sigma_max: float, sigma_min: float, num_levels: int,
                        step_size: float = 2e-5, steps_per_level: int = 100,
                        denoise: bool = False,
                        x_init: Optional[Array] = None, init: str = 'prior') -> SampleOutput:
    """Annealed Langevin dynamics on any SDE's model, in the VE variables y = x / alpha.

    The levels are NCSN's geometric sequence from sigma_max down to sigma_min
    (`sde.ncsn_sigmas`), sigma = std / alpha of the SDE (for VE the SDE's own sigma), and
    the score of y is `sde.sigma_score_from_score` (for VE exactly the model's score). The
    result is y at sigma_min (or its Tweedie denoising), i.e. x_0 plus noise of std
    sigma_min. With the levels of a discrete NCSN model (sigma_max, sigma_min its range,
    num_levels its number) every evaluation is at a trained level.

    Args:
        sde: A `sde_lib` SDE (closed over, static).
        score_fn: s(x [B, ...], t [B]) -> [B, ...].
        shape: [B, ...] static.
        rng: `jax.random.key`.
        sigma_max, sigma_min: The first and last level, within the SDE's range.
        num_levels: L >= 2.
        step_size, steps_per_level, denoise: As `annealed_langevin_sample`.
        x_init: Start y; default by `init`: 'prior' sigma_max N(0, I), 'uniform'
            U(-1, 1) (NCSN's; see `annealed_langevin_sample`).

    Returns:
        `SampleOutput`, nfe = L T (+ 1).

    Raises:
        ValueError: Bad levels (see `sde.ncsn_sigmas`) or as `annealed_langevin_sample`.
    """
    sde_lib.validate_sde(sde)
    sigmas = sde_lib.ncsn_sigmas(float(sigma_max), float(sigma_min), num_levels)
    return annealed_langevin_sample(sde_lib.sigma_score_from_score(sde, score_fn), sigmas,
                                    shape, rng, step_size=step_size,
                                    steps_per_level=steps_per_level, x_init=x_init,
                                    denoise=denoise, init=init)


# ---------------------------------------------------------------------------
# Predictor-corrector samplers of the reverse-time SDE.
# ---------------------------------------------------------------------------


def pc_sample(sde, score_fn: ScoreFn, shape: Sequence[int], rng: Array, *,
              num_steps: int, eps: float = 1e-3, predictor: str = 'euler_maruyama',
              corrector: str = 'none', snr: float = 0.16, corrector_steps: int = 1,
              denoise: bool = True, x_init: Optional[Array] = None) -> SampleOutput:
    """Reverse-time SDE sampling with a predictor and an optional corrector
    (Song et al. 2021b, Sec. 4.2 and App. G, Alg. 1-5, as score_sde's `pc_sampler`).

    Times t_0 = 1 > ... > t_{N-1} = eps = linspace(1, eps, N). At each t_k, first the
    corrector, then the predictor:

    * 'euler_maruyama': x_mean = x - [f - g^2 s] dt_abs, x = x_mean + g sqrt(dt_abs) z
      with dt_abs = 1 / N (score_sde's reverse-SDE Euler-Maruyama step);
    * 'reverse_diffusion': x_mean = x - rev_f, x = x_mean + G z with the reversed
      discretisation (`sde.reverse_discretize`, Eq. 46-47; it assumes N equals the
      SDE's num_scales, as in score_sde);
    * 'ancestral_sampling': the DDPM (VP) or SMLD (VE) chain's ancestral step
      (`sde.ancestral_step`, score_sde's AncestralSamplingPredictor; not sub-VP);
    * 'none': corrector only (for VE: annealed Langevin on the SDE's ladder).

    'langevin' corrector, `corrector_steps` times: step = 2 alpha_i (r ||z|| / ||s||)^2,
    x_mean = x + step s, x = x_mean + sqrt(2 step) z (Alg. 4/5; alpha_i = 1 - beta_i for
    VP, 1 for VE), with ||z|| and ||s|| averaged over the whole batch as score_sde does
    (under a sharded `jit` the mean is global, like its `pmean`). Per-example norms make
    the step depend on the state (large where the score is small) and bias the
    stationary law: on a 32-dim Gaussian they inflated the variance by 40 %. The cost is
    that a sample depends on its batch companions (not on the sharding). 'ald' (NCSN's
    annealed Langevin dynamics as a corrector, score_sde's AnnealedLangevinDynamics):
    the same update with step = 2 alpha_i (r std(t))^2, std(t) the perturbation
    kernel's (`sde.marginal_coefs`), so no sample depends on another.

    Args:
        sde: A `sde_lib` SDE (closed over, static).
        score_fn: s(x [B, ...], t [B]) -> [B, ...].
        shape: [B, ...] static.
        rng: `jax.random.key`.
        num_steps: N >= 1.
        eps: Last time, in (0, 1) (score_sde: 1e-3 for VP, 1e-5 for VE).
        predictor: One of `PREDICTORS`.
        corrector: One of `CORRECTORS`.
        snr: r > 0 of the Langevin corrector (score_sde: 0.16 for VE, 0.01-0.27 VP).
        corrector_steps: Corrector iterations per step, >= 1.
        denoise: Return the last predictor step's noise-free mean (score_sde's
            `noise_removal`); corrector-only runs return x either way, as score_sde.
        x_init: Start; default a draw of the prior.

    Returns:
        `SampleOutput`, nfe = N ([predictor != 'none'] + corrector_steps [corrector != 'none']).

    Raises:
        ValueError: Unknown predictor / corrector, both 'none', bad numbers, or
            'ancestral_sampling' on a sub-VP SDE (while tracing).
    """
    sde_lib.validate_sde(sde)
    if predictor not in PREDICTORS:
        raise ValueError(f'Unknown predictor {predictor!r}; valid: {PREDICTORS}.')
    if corrector not in CORRECTORS:
        raise ValueError(f'Unknown corrector {corrector!r}; valid: {CORRECTORS}.')
    if predictor == 'none' and corrector == 'none':
        raise ValueError("predictor and corrector cannot both be 'none'.")
    num_steps = _check_int('num_steps', num_steps, 1)
    corrector_steps = _check_int('corrector_steps', corrector_steps, 1)
    e = samplers._concrete_float(eps)
    if e is not None and not 0.0 < e < 1.0:
        raise ValueError(f'eps must be in (0, 1), got {eps!r}.')
    _check_positive('snr', snr)
    x, noise_rng = _init(shape, rng, x_init, sde_lib.prior_std(sde), 'pc_sample', True,
                         sde_lib.prior_mean(sde))
    timesteps = jnp.linspace(1.0, eps, num_steps, dtype=jnp.float32)
    dt = 1.0 / num_steps

    def correct(x, t, key):
        alpha = _bcast(sde_lib.discrete_alphas(sde, t), x)
        std = _bcast(sde_lib.marginal_coefs(sde, t)[1], x)  # 'ald' steps by it.
        x_mean = x
        for j in range(corrector_steps):
            grad = score_fn(x, t)
            z = jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype)
            if corrector == 'ald':
                ratio = snr * std
            else:  # Batch means of the norms, as score_sde (its pmean: the global mean).
                ratio = snr * jnp.mean(_norms(z)) / jnp.mean(_norms(grad))
            step = 2.0 * alpha * jnp.square(ratio)
            x_mean = x + step * grad
            x = x_mean + jnp.sqrt(2.0 * step) * z
        return x, x_mean

    def predict(x, t, key):
        z = jax.random.normal(key, x.shape, x.dtype)
        if predictor == 'euler_maruyama':
            drift, g = sde_lib.reverse_drift_diffusion(sde, score_fn, x, t)
            x_mean = x - drift * dt
            return x_mean + _bcast(g * math.sqrt(dt), x) * z, x_mean
        if predictor == 'ancestral_sampling':
            x_mean, std = sde_lib.ancestral_step(sde, score_fn, x, t)
            return x_mean + _bcast(std, x) * z, x_mean
        rev_f, rev_g = sde_lib.reverse_discretize(sde, score_fn, x, t)
        x_mean = x - rev_f
        return x_mean + _bcast(rev_g, x) * z, x_mean

    def body(carry, k):
        x, _ = carry
        t = _batch(timesteps[k], x)
        key = jax.random.fold_in(noise_rng, k)
        x_mean = x
        if corrector != 'none':
            x, x_mean = correct(x, t, jax.random.fold_in(key, 1))
        if predictor != 'none':
            x, x_mean = predict(x, t, jax.random.fold_in(key, 0))
        else:  # score_sde's NonePredictor returns (x, x): no noise-free mean to keep.
            x_mean = x
        return (x, x_mean), None

    (x, x_mean), _ = jax.lax.scan(body, (x, x), jnp.arange(num_steps, dtype=jnp.int32))
    per_step = (predictor != 'none') + (corrector_steps if corrector != 'none' else 0)
    return SampleOutput(x_mean if denoise else x,
                        jnp.asarray(num_steps * per_step, jnp.int32))


# ---------------------------------------------------------------------------
# Probability-flow ODE with diffrax.
# ---------------------------------------------------------------------------


def _solver(name: str):
    if name not in ODE_SOLVERS:
        raise ValueError(f'Unknown solver {name!r}; valid: {ODE_SOLVERS}.')
    return diffrax.Tsit5() if name == 'tsit5' else diffrax.Dopri5()


def solve_ode(vector_field: Callable[[Array, Any], Any], y0: Any, t0: float, t1: float, *,
              solver: str = 'tsit5', rtol: float = 1e-5, atol: float = 1e-5,
              max_steps: int = 4096) -> tuple[Any, Array]:
    """Integrates dy/dt = vector_field(t, y) from t0 to t1 (either direction) with an
    adaptive diffrax solver and a PID step-size controller.

    Returns:
        (y(t1), nfe) with nfe the vector-field evaluations (int32).

    Raises:
        ValueError: Unknown solver, non-positive tolerances or max_steps < 1.
    """
    method = _solver(solver)
    _check_positive('rtol', rtol)
    _check_positive('atol', atol)
    max_steps = _check_int('max_steps', max_steps, 1)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: vector_field(t, y)), method, t0=t0, t1=t1,
        dt0=None, y0=y0, saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps)
    y1 = jax.tree.map(lambda a: a[0], sol.ys)
    nfe = _EVALS_PER_STEP[solver] * sol.stats['num_steps'] + 1
    return y1, jnp.asarray(nfe, jnp.int32)


def ode_sample(sde, score_fn: ScoreFn, shape: Sequence[int], rng: Optional[Array], *,
               eps: float = 1e-3, solver: str = 'tsit5', rtol: float = 1e-5,
               atol: float = 1e-5, max_steps: int = 4096, x_init: Optional[Array] = None,
               denoise: bool = False) -> SampleOutput:
    """Samples by solving the probability-flow ODE dx/dt = f - g^2 s / 2 from t = 1 to eps
    (Song et al. 2021b, Eq. 13 and Sec. 4.3) with diffrax (adaptive step, PID controller;
    score_sde used scipy's RK45 with rtol = atol = 1e-5). With `denoise`, one
    reverse-diffusion mean step at eps follows (score_sde's `denoise`, which its
    configs turn on with `sampling.noise_removal = True`; one evaluation): it removes
    the noise of std ~sigma(eps) that x(eps) still holds.

    Args:
        sde, score_fn: As in `pc_sample`.
        shape: [B, ...] static.
        rng: Draws the prior sample; may be None with `x_init`.
        eps: End time in (0, 1).
        solver: 'tsit5' (default) or 'dopri5' (RK45).
        rtol, atol: Tolerances of the PID controller.
        max_steps: Solver step cap (an error is raised at run time past it).
        x_init: Start x(1); default a draw of the prior.
        denoise: Add the final denoising step.

    Returns:
        `SampleOutput` with the solver's NFE.

    Raises:
        ValueError: Bad solver / tolerances / eps / shapes.
    """
    sde_lib.validate_sde(sde)
    e = samplers._concrete_float(eps)
    if e is not None and not 0.0 < e < 1.0:
        raise ValueError(f'eps must be in (0, 1), got {eps!r}.')
    x, _ = _init(shape, rng, x_init, sde_lib.prior_std(sde), 'ode_sample', False,
                 sde_lib.prior_mean(sde))
    x, nfe = solve_ode(lambda t, y: sde_lib.ode_drift(sde, score_fn, y, t), x, 1.0, eps,
                       solver=solver, rtol=rtol, atol=atol, max_steps=max_steps)
    if denoise:
        rev_f, _ = sde_lib.reverse_discretize(sde, score_fn, x, _batch(eps, x))
        x, nfe = x - rev_f, nfe + 1
    return SampleOutput(x, nfe)


# ---------------------------------------------------------------------------
# Karras et al. 2022: sigma schedule, Heun sampler, VP adapter.
# ---------------------------------------------------------------------------


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> Array:
    """sigma_i = (sigma_max^(1/rho) + i / (N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i < N, and sigma_N = 0 (Karras et al. 2022, Eq. 5). float32 [N + 1] from float64.

    Raises:
        ValueError: num_steps < 1, not 0 < sigma_min < sigma_max, rho <= 0.
    """
    num_steps = _check_int('num_steps', num_steps, 1)
    if not 0.0 < float(sigma_min) < float(sigma_max):
        raise ValueError(f'need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, '
                         f'sigma_max={sigma_max}.')
    if not float(rho) > 0.0:
        raise ValueError(f'rho must be > 0, got {rho}.')
    frac = np.arange(num_steps, dtype=np.float64) / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (hi + frac * (lo - hi)) ** rho
    return jnp.asarray(np.append(sig, 0.0), jnp.float32)


def capped_sigma_max(model_sigma_max: float, cap: float) -> float:
    """The first sigma of a Karras schedule: the model's largest, or `cap` when
    0 < cap < it (Karras et al. 2022 start at 80 whatever the model; a cap above the
    model's range is no cap).

    Raises:
        ValueError: cap < 0.
    """
    if not float(cap) >= 0.0:
        raise ValueError(f'sigma_max (the cap) must be >= 0 (0 = none), got {cap!r}.')
    return float(cap) if 0.0 < float(cap) < float(model_sigma_max) else float(model_sigma_max)


def karras_sample(denoiser_fn: DenoiserFn, sigmas, shape: Sequence[int],
                  rng: Optional[Array], *, second_order: bool = True,
                  s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float('inf'),
                  s_noise: float = 1.0, x_init: Optional[Array] = None,
                  return_intermediates: bool = False,
                  round_sigma: Optional[Callable[[Array], Array]] = None):
    """Karras et al. 2022's sampler (Alg. 2; Alg. 1 when s_churn = 0).

    For i = 0..N-1: gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax
    else 0; sigma_hat = sigma_i (1 + gamma_i); x_hat = x + sqrt(sigma_hat^2 - sigma_i^2)
    S_noise z; d = (x_hat - D(x_hat, sigma_hat)) / sigma_hat; Euler
    x' = x_hat + (sigma_{i+1} - sigma_hat) d; and, if sigma_{i+1} > 0 and `second_order`,
    Heun's correction x' = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2 with
    d' = (x' - D(x', sigma_{i+1})) / sigma_{i+1}. The correction sits in a `lax.cond`, so
    the NFE executed is N + #{i: sigma_{i+1} > 0} (2N - 1 for `karras_sigmas`).

    With `second_order=False` and s_churn = 0 this is Euler in (y = x / alpha, sigma),
    which on a VP model's own sigmas is exactly DDIM with eta = 0.

    `round_sigma` (off by default) is EDM's rounding of the churned level for a
    discrete model (NVlabs/edm generate.py's `edm_sampler`:
    `t_hat = net.round_sigma(t_cur + gamma * t_cur)`): with churn on (s_churn > 0 or
    traced), sigma_hat = round_sigma(sigma_i (1 + gamma_i)), and the noise added is
    sqrt(max((sigma_hat - sigma_i)(sigma_hat + sigma_i), 0)) S_noise z with that rounded
    sigma_hat (EDM's `(t_hat ** 2 - t_cur ** 2).sqrt()`; nearest-level rounding can
    give sigma_hat = sigma_i, hence exactly no noise, and the max(., 0) keeps a
    rounding below sigma_i from giving NaN). The schedule itself is not rounded here:
    EDM rounds it before the loop (`make_round_sigma`, `vp_heun_sample(round_sigma=
    True)`), after which its t_hat = round_sigma(t_cur) with churn off is t_cur.

    Args:
        denoiser_fn: D(x [B, ...], sigma [B]) -> [B, ...].
        sigmas: [N + 1] decreasing, last usually 0 (`karras_sigmas`).
        shape: [B, ...] static.
        rng: Draws x_init = sigmas[0] z and the churn noise; may be None with x_init and
            s_churn = 0.
        second_order, s_churn, s_tmin, s_tmax, s_noise: As above.
        x_init: Start; default sigmas[0] N(0, I).
        return_intermediates: Also return {'x': [N, B, ...] the state entering each step,
            'denoised': [N, B, ...] D at that step}.
        round_sigma: None (default: no rounding), or a jittable map of a float32 scalar
            sigma to a float32 scalar level, e.g. `make_round_sigma(sched)`; applied to
            the churned sigma_hat as above.

    Returns:
        `SampleOutput` (and the intermediates dict with `return_intermediates`).

    Raises:
        ValueError: Negative churn / noise, sigmas not 1-D of >= 2 entries.
    """
    samplers._check_nonnegative('s_churn', s_churn)
    samplers._check_nonnegative('s_noise', s_noise)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f'sigmas must be 1-D with >= 2 entries, got shape {sigmas.shape}.')
    num_steps = sigmas.shape[0] - 1
    churn = samplers._concrete_float(s_churn)
    needs_noise = churn is None or churn > 0.0
    x, noise_rng = _init(shape, rng, x_init, 1.0, 'karras_sample', needs_noise)
    if x_init is None:
        x = x * sigmas[0]
    gamma_max = jnp.minimum(s_churn / num_steps, math.sqrt(2.0) - 1.0)

    def body(x, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if needs_noise:
            gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0)
            sigma_hat = sigma * (1.0 + gamma)
            z = jax.random.normal(jax.random.fold_in(noise_rng, i), x.shape, x.dtype)
            if round_sigma is None:
                # sqrt(sigma_hat^2 - sigma^2) written so rounding cannot make it negative.
                x_hat = x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * z
            else:  # EDM: the rounded t_hat, sqrt(t_hat^2 - t_cur^2) (>= 0, docstring).
                sigma_hat = jnp.reshape(jnp.asarray(round_sigma(sigma_hat), jnp.float32), ())
                # Factored: exactly 0 when sigma_hat = sigma (XLA may fuse a^2 - b^2
                # into an FMA, which leaves b^2's rounding error, ~1e-4 at sigma = 80).
                var = jnp.maximum((sigma_hat - sigma) * (sigma_hat + sigma), 0.0)
                x_hat = x + jnp.sqrt(var) * s_noise * z
        else:
            sigma_hat, x_hat = sigma, x
        denoised = denoiser_fn(x_hat, _batch(sigma_hat, x))
        d = (x_hat - denoised) / sigma_hat
        x_next = x_hat + (sigma_next - sigma_hat) * d
        if second_order:
            def heun(x_next):
                d2 = (x_next - denoiser_fn(x_next, _batch(sigma_next, x))) / sigma_next
                return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d2)
            x_next = jax.lax.cond(sigma_next > 0.0, heun, lambda a: a, x_next)
        return x_next, ((x, denoised) if return_intermediates else None)

    x, ys = jax.lax.scan(body, x, jnp.arange(num_steps, dtype=jnp.int32))
    nfe = num_steps + (jnp.sum(sigmas[1:] > 0.0) if second_order else 0)
    out = SampleOutput(x, jnp.asarray(nfe, jnp.int32))
    if return_intermediates:
        return out, {'x': ys[0], 'denoised': ys[1]}
    return out


def _vp_sigmas_np(sched: Schedule) -> np.ndarray:
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    one_minus = np.square(np.asarray(sched.sqrt_one_minus_alphas_cumprod, np.float64))
    return np.sqrt(one_minus / abar)


def vp_sigmas(sched: Schedule) -> Array:
    """The noise levels sigma_i = sqrt((1 - abar_i) / abar_i) of a schedule's steps,
    increasing, float32 [N] (Karras et al. 2022, Table 1, VP/DDIM rows). Needs a
    concrete schedule (close over it)."""
    return jnp.asarray(_vp_sigmas_np(sched), jnp.float32)


def make_vp_denoiser(model_fn: Callable[..., Array], sched: Schedule, *,
                     mean_type: str = 'eps', var_type: str = 'fixed_small',
                     clip_denoised: bool = False,
                     model_kwargs: Optional[Mapping[str, Any]] = None) -> DenoiserFn:
    """Adapts a discrete VP model to Karras et al.'s denoiser D(x, sigma).

    x_vp = x / sqrt(1 + sigma^2) (their c_in; x = x_vp / sqrt(abar)); the model is called
    at the step whose sigma_i is nearest in log sigma (Karras et al. 2022, App. C.3.4:
    discrete models are evaluated at the nearest trained level), and D is its x_0
    prediction (`diffusion.p_mean_variance`, any mean type, optional clipping). On the
    ladder (sigma = sigma_i) this is exact; snap a Karras schedule to the ladder with
    `snap_sigmas` to stay there.

    Returns:
        D(x [B, ...], sigma [B]) -> [B, ...].

    Raises:
        ValueError: Unknown mean/var type.
    """
    diffusion.validate_types(mean_type, var_type)
    log_ladder = jnp.log(vp_sigmas(sched))
    kwargs = dict(model_kwargs or {})

    def denoise(x, sigma):
        sigma = _batch(sigma, x)
        i = jnp.argmin(jnp.abs(jnp.log(sigma)[:, None] - log_ladder[None, :]), axis=-1)
        x_vp = x / _bcast(jnp.sqrt(1.0 + jnp.square(sigma)), x)
        out = model_fn(x_vp, sched.timesteps[i].astype(jnp.int32), **kwargs)
        terms = diffusion.p_mean_variance(sched, out, x_vp, i, mean_type=mean_type,
                                          var_type=var_type, clip_denoised=clip_denoised)
        return terms['pred_x0']

    return denoise


def make_round_sigma(sched: Schedule) -> Callable[[Array], Array]:
    """EDM's `round_sigma` of a discrete model (NVlabs/edm training/networks.py,
    `iDDPMPrecond.round_sigma`): each positive sigma goes to the nearest of the levels
    `vp_sigmas(sched)` in absolute distance |sigma - sigma_i| (not in log, unlike
    `snap_sigmas`), in float32, a tie going to the larger level (EDM's argmin over its
    decreasing levels u_0 > ... > u_{M-1}). sigma <= 0 is returned as it is (EDM's
    levels end with u_M = 0, so sigmas below u_{M-1} / 2 round to 0 there; its sampler
    never asks for them). EDM measures the distance with `torch.cdist`, which for more
    than 25 levels uses the float32 expansion a^2 + b^2 - 2ab; here it is |a - b|, so
    the two can differ only for a sigma within a small multiple of float32 precision of
    a midpoint between two levels.

    Returns:
        round_sigma(sigma: float32 array of any shape) -> the levels, same shape.
    """
    levels = vp_sigmas(sched)[::-1]  # Decreasing, as EDM's u.

    def round_sigma(sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        i = jnp.argmin(jnp.abs(sigma[..., None] - levels), axis=-1)
        return jnp.where(sigma > 0.0, levels[i], sigma)

    return round_sigma


def snap_sigmas(sigmas, sched: Schedule) -> Array:
    """Replaces each positive sigma by the nearest (in log) of `vp_sigmas(sched)`,
    keeping a final 0 (Karras et al. 2022, App. C.3.4 round their schedule to the
    model's levels). Duplicates are kept: remove them with fewer steps if needed."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    ladder = vp_sigmas(sched)
    safe = jnp.where(sigmas > 0, sigmas, 1.0)
    i = jnp.argmin(jnp.abs(jnp.log(safe)[:, None] - jnp.log(ladder)[None, :]), axis=-1)
    return jnp.where(sigmas > 0, ladder[i], 0.0)


# ---------------------------------------------------------------------------
# DPM-Solver++ 3M and 2S on a discrete schedule.
# ---------------------------------------------------------------------------


def _guided_x0(model_fn, sched, x, i, *, mean_type, var_type, clip_denoised, denoised_fn,
               model_kwargs, cond_fn, classifier_scale):
    terms, t = samplers._model_terms(
        model_fn, sched, x, i, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
    pred_x0 = terms['pred_x0']
    if cond_fn is not None:  # The guided data prediction, as in samplers.dpm_solver_sample.
        pred_x0 = pred_x0 + samplers._score_shift(
            cond_fn, classifier_scale, x, t, sched.alphas_cumprod[i], model_kwargs)[1]
    return pred_x0


def _finish(x0, ys, nfe, return_intermediates, return_nfe):
    out = (x0, {'x_t': ys[0], 'pred_x0': ys[1]}) if return_intermediates else x0
    return (out, jnp.asarray(nfe, jnp.int32)) if return_nfe else out


def _solver_setup(name, sched, shape, rng, x_T, *, mean_type, var_type, classifier_scale,
                  model_kwargs, **opts):
    """The checks shared by the DPM-Solver++ samplers; returns (num_steps, x_T, the
    keyword arguments of `_guided_x0`)."""
    diffusion.validate_types(mean_type, var_type)
    samplers._check_nonnegative('classifier_scale', classifier_scale)
    num_steps = samplers._check_schedule(sched)
    x_T, _ = samplers._initial_state(shape, rng, x_T, needs_noise=False, name=name)
    return num_steps, x_T, dict(opts, mean_type=mean_type, var_type=var_type,
                                classifier_scale=classifier_scale,
                                model_kwargs=samplers._check_model_kwargs(model_kwargs))


def dpm_solver_3m_sample(model_fn, sched: Schedule, shape: Sequence[int],
                         rng: Optional[Array], *, mean_type: str = 'eps',
                         var_type: str = 'fixed_small', clip_denoised: bool = True,
                         denoised_fn=None, model_kwargs=None, cond_fn=None,
                         classifier_scale: float = 1.0, x_T: Optional[Array] = None,
                         return_intermediates: bool = False,
                         lower_order_final: bool = True, exact_taylor: bool = False,
                         return_nfe: bool = False):
    """DPM-Solver++(3M): multistep 3rd-order data-prediction ODE solver (Lu et al. 2022b,
    Sec. 4 / App. B and their multistep third-order update).

    On the steps of `sched`, as `samplers.dpm_solver_sample` (alpha_i = sqrt(abar_i),
    sigma_i = sqrt(1 - abar_i), lambda_i = log(alpha_i / sigma_i)), a step from i to the
    previous kept step p with h = lambda_p - lambda_i, the current x0_hat D0 and the two
    before, D1 and D2 (log-SNR gaps h0 = lambda_i - lambda_last, h1 the one before):

        r0 = h0 / h, r1 = h1 / h, E0 = (D0 - D1) / r0, E1 = (D1 - D2) / r1,
        Dd1 = E0 + r0 / (r0 + r1) (E0 - E1),  Dd2 = (E0 - E1) / (r0 + r1),
        phi1 = e^{-h} - 1, phi2 = phi1 / h + 1, phi3 = phi2 / h - 1/2,
        x_p = (sigma_p / sigma_i) x - alpha_p phi1 D0 + alpha_p phi2 Dd1 - c alpha_p phi3 Dd2,

    with c = 1: the authors' update (dpm_solver_pytorch.py's
    multistep_dpm_solver_third_update; diffusers' solver_order=3), so that samples
    match theirs. Note that Dd1 ~ h x0'(lambda) and Dd2 ~ h^2 x0''/2, while the
    exponential integrator's quadratic term is sigma_p int e^lambda (lambda -
    lambda_i)^2 / 2 x0'' = -alpha_p phi3 h^2 x0'' (Lu et al. 2022b, Eq. 9 to 2nd order):
    the Taylor-exact coefficient is c = 2 (`exact_taylor=True`). With c = 1 the local
    error is O(h^3); measured on a Gaussian, halving h divides the global error by
    ~5 with c = 1 and by 13-16 with c = 2 (tests/test_sde_samplers).

    The first step is 1st order (DDIM), the second 2nd order (2M: -alpha_p phi1 (D0 + E0/2)),
    the rest 3rd order; the final step into abar = 1 returns x0_hat (as 2M). With
    `lower_order_final` (default, as 2M) the last two solver steps use orders 1 and 2,
    which keeps few-step runs stable on uniform-time spacings. The authors' code lowers
    them only in runs of fewer than 10 steps, so their samples are reproduced there, or
    with `lower_order_final=False` for 10 or more. N model calls for N steps.

    Args, Returns, Raises: as `samplers.dpm_solver_sample`; `return_nfe` also returns
        the NFE (N) as `(result, nfe)`.
    """
    num_steps, x_T, opts = _solver_setup(
        'dpm_solver_3m_sample', sched, shape, rng, x_T, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        cond_fn=cond_fn, classifier_scale=classifier_scale)
    lam = samplers._log_snr_half

    def body(carry, i):
        x, d1, d2, h0, h1 = carry
        d0 = _guided_x0(model_fn, sched, x, i, **opts)
        abar = sched.alphas_cumprod[i]
        abar_prev = sched.alphas_cumprod_prev[i]
        final = abar_prev >= 1.0
        abar_p = jnp.where(final, abar, abar_prev)  # Finite stand-in on the final step.
        h = lam(abar_p) - lam(abar)
        k = num_steps - 1 - i  # Steps already taken = history available.
        order = jnp.minimum(k + 1, 3)
        if lower_order_final:
            order = jnp.where(i == 1, 1, jnp.where(i == 2, jnp.minimum(order, 2), order))
        safe = lambda v: jnp.where(v > 0.0, v, 1.0)  # noqa: E731
        r0, r1 = safe(h0) / h, safe(h1) / h
        e0 = (d0 - d1) / r0
        e1 = (d1 - d2) / r1
        dd1 = e0 + r0 / (r0 + r1) * (e0 - e1)
        dd2 = (e0 - e1) / (r0 + r1)
        phi1 = jnp.expm1(-h)
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        alpha_p = jnp.sqrt(abar_p)
        ratio = jnp.sqrt((1.0 - abar_p) / (1.0 - abar))
        x1 = ratio * x - alpha_p * phi1 * d0
        x2 = x1 - alpha_p * phi1 * 0.5 * e0
        # The authors' coefficient 1 on dd2 ~ h^2 x0''/2, or the Taylor-exact 2 (docstring).
        x3 = x1 + alpha_p * phi2 * dd1 - (2.0 if exact_taylor else 1.0) * alpha_p * phi3 * dd2
        x_p = jnp.where(order == 1, x1, jnp.where(order == 2, x2, x3))
        x_p = jnp.where(final, d0, x_p)
        ys = (x, d0) if return_intermediates else None
        return (x_p.astype(x.dtype), d0.astype(x.dtype), d1, h, h0), ys

    zeros = jnp.zeros_like(x_T)
    init = (x_T, zeros, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (x0, *_), ys = jax.lax.scan(body, init,
                                jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32))
    return _finish(x0, ys, num_steps, return_intermediates, return_nfe)


# Macro-step kinds of the 2S sampler.
_FINAL, _FIRST, _TWO_STAGE = 0, 1, 2


def _two_stage_plan(num_steps: int) -> np.ndarray:
    """[M, 4] int rows (a, b, c, kind), in order, of the 2S sampler on steps
    N - 1, ..., 0 of a schedule of N = `num_steps` steps: a -> c = a - 2 through the
    midpoint b = a - 1 (_TWO_STAGE, 2 model calls), a -> b = c = a - 1 (_FIRST, DDIM,
    1 call) or the final denoise at a = b = c = 0 (_FINAL, 1 call). The N - 1 gaps
    between step N - 1 and step 0 take, when N - 1 is odd, one first-order step first,
    N - 1 -> N - 2, then floor((N - 1) / 2) two-stage steps; then the final row. N model
    calls in all, e.g. N = 6: (5, 4, 4, 1st), (4, 3, 2, 2S), (2, 1, 0, 2S),
    (0, 0, 0, final)."""
    rows = []
    a = num_steps - 1
    if (num_steps - 1) % 2 == 1:  # An odd number of gaps: one DDIM step first.
        rows.append((a, a - 1, a - 1, _FIRST))
        a -= 1
    while a >= 2:
        rows.append((a, a - 1, a - 2, _TWO_STAGE))
        a -= 2
    rows.append((0, 0, 0, _FINAL))
    return np.asarray(rows, np.int32)


def dpm_solver_2s_sample(model_fn, sched: Schedule, shape: Sequence[int],
                         rng: Optional[Array], *, mean_type: str = 'eps',
                         var_type: str = 'fixed_small', clip_denoised: bool = True,
                         denoised_fn=None, model_kwargs=None, cond_fn=None,
                         classifier_scale: float = 1.0, x_T: Optional[Array] = None,
                         return_intermediates: bool = False, return_nfe: bool = False):
    """DPM-Solver++(2S): singlestep 2nd-order data-prediction solver (Lu et al. 2022b,
    Alg. 1) whose intermediate points are the schedule's own steps.

    A discrete model can only be evaluated at trained timesteps, so each solver step
    spans two schedule steps, a -> c = a - 2, with the stage at b = a - 1:
    h = lambda_c - lambda_a, r = (lambda_b - lambda_a) / h,

        u = (sigma_b / sigma_a) x - alpha_b (e^{-r h} - 1) x0(x, a),
        D = (1 - 1 / (2r)) x0(x, a) + 1 / (2r) x0(u, b),
        x_c = (sigma_c / sigma_a) x - alpha_c (e^{-h} - 1) D.

    The N - 1 gaps from step N - 1 down to step 0 are covered two at a time; with an
    odd number of gaps (N even) the first solver step, N - 1 -> N - 2, is DDIM (first
    order). The authors' order-2 singlestep plan puts it last instead
    (dpm_solver_pytorch.py's `get_orders_and_timesteps_for_singlestep_solver`:
    `orders = [2] * (K - 1) + [1]`), on steps uniform in log-SNR; on uniform-time
    grids ('ddimN') the last gap is the longest in log-SNR, and a first-order step
    there costs accuracy (Gaussian data, 'ddim20' on the linear schedule, max error of
    the flow map 0.069 with it first, 0.121 last; 2M 0.106, DDIM 0.168), so samples
    differ from theirs at even N. The last call returns x0_hat at step 0 (as 2M). N
    model calls for N steps, so a 2S run at N steps costs what 2M costs at N, with about
    N/2 solver steps.

    Args, Returns, Raises: as `dpm_solver_3m_sample` (no `lower_order_final`).
    """
    num_steps, x_T, opts = _solver_setup(
        'dpm_solver_2s_sample', sched, shape, rng, x_T, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
        cond_fn=cond_fn, classifier_scale=classifier_scale)
    lam = samplers._log_snr_half
    abars = sched.alphas_cumprod

    def body(x, row):
        a, b, c, kind = row[0], row[1], row[2], row[3]
        d_a = _guided_x0(model_fn, sched, x, a, **opts)
        abar_a, abar_b, abar_c = abars[a], abars[b], abars[c]
        # Finite stand-ins where the kind does not use b / c (final: a = b = c).
        abar_b = jnp.where(kind == _TWO_STAGE, abar_b, abar_c)
        abar_c = jnp.where(kind == _FINAL, 0.5 * abar_a, abar_c)
        abar_b = jnp.where(kind == _FINAL, 0.5 * abar_a, abar_b)
        h = lam(abar_c) - lam(abar_a)
        r = (lam(abar_b) - lam(abar_a)) / h

        def second_stage(_):
            u = (jnp.sqrt((1.0 - abar_b) / (1.0 - abar_a)) * x
                 - jnp.sqrt(abar_b) * jnp.expm1(-r * h) * d_a)
            d_b = _guided_x0(model_fn, sched, u.astype(x.dtype), b, **opts)
            return (1.0 - 0.5 / r) * d_a + (0.5 / r) * d_b

        d = jax.lax.cond(kind == _TWO_STAGE, second_stage, lambda _: d_a, None)
        x_c = (jnp.sqrt((1.0 - abar_c) / (1.0 - abar_a)) * x
               - jnp.sqrt(abar_c) * jnp.expm1(-h) * d)
        x_c = jnp.where(kind == _FINAL, d_a, x_c)
        return x_c.astype(x.dtype), ((x, d_a) if return_intermediates else None)

    x0, ys = jax.lax.scan(body, x_T, jnp.asarray(_two_stage_plan(num_steps)))
    return _finish(x0, ys, num_steps, return_intermediates, return_nfe)


# ---------------------------------------------------------------------------
# Discrete VP models through the VP view, with the registry's signature.
# ---------------------------------------------------------------------------


def _vp_view_of(model_fn, sched, *, mean_type, var_type, clip_denoised, denoised_fn,
                model_kwargs, cond_fn, classifier_scale, return_intermediates, name,
                step='nearest'):
    if return_intermediates:
        raise ValueError(f'{name}: return_intermediates is not supported.')
    samplers._check_nonnegative('classifier_scale', classifier_scale)
    samplers._check_schedule(sched)
    return sde_lib.make_vp_score_fn(
        model_fn, sched, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, denoised_fn=denoised_fn,
        model_kwargs=samplers._check_model_kwargs(model_kwargs), cond_fn=cond_fn,
        classifier_scale=classifier_scale, step=step)


def vp_ode_sample(model_fn, sched: Schedule, shape: Sequence[int], rng: Optional[Array], *,
                  mean_type: str = 'eps', var_type: str = 'fixed_small',
                  clip_denoised: bool = False, denoised_fn=None, model_kwargs=None,
                  cond_fn=None, classifier_scale: float = 1.0,
                  x_T: Optional[Array] = None, return_intermediates: bool = False,
                  solver: str = 'tsit5', rtol: float = 1e-5, atol: float = 1e-5,
                  eps: float = 1e-3, max_steps: int = 4096, denoise: bool = False,
                  return_nfe: bool = False):
    """`ode_sample` for a discrete-time model, through its VP view (`sde.make_vp_score_fn`),
    with the signature of `samplers.SAMPLERS`' functions (`denoise`: `ode_sample`'s
    final denoising step; the config's `sample.ode_denoise` turns it on).

    `sched` should be the model's full training schedule: its steps are the view's knots
    (a respaced schedule gives a coarser VP SDE through the kept levels). x_T ~ N(0, I)
    is x(1); the result is x(eps). `clip_denoised` is off by default (clipping makes the
    drift non-smooth, which costs an adaptive solver many steps).

    Returns:
        The samples, or (samples, nfe) with `return_nfe`.

    Raises:
        ValueError: As `ode_sample` and `sde.make_vp_score_fn`; return_intermediates.
    """
    view, score = _vp_view_of(
        model_fn, sched, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        denoised_fn=denoised_fn, model_kwargs=model_kwargs, cond_fn=cond_fn,
        classifier_scale=classifier_scale, return_intermediates=return_intermediates,
        name='vp_ode_sample')
    x_T, _ = samplers._initial_state(shape, rng, x_T, needs_noise=False,
                                     name='vp_ode_sample')
    out = ode_sample(view, score, shape, None, eps=eps, solver=solver, rtol=rtol,
                     atol=atol, max_steps=max_steps, x_init=x_T, denoise=denoise)
    return (out.samples, out.nfe) if return_nfe else out.samples


def vp_pc_sample(model_fn, sched: Schedule, shape: Sequence[int], rng: Array, *,
                 mean_type: str = 'eps', var_type: str = 'fixed_small',
                 clip_denoised: bool = True, denoised_fn=None, model_kwargs=None,
                 cond_fn=None, classifier_scale: float = 1.0, x_T: Optional[Array] = None,
                 return_intermediates: bool = False, predictor: str = 'reverse_diffusion',
                 corrector: str = 'langevin', snr: float = 0.01, corrector_steps: int = 1,
                 num_steps: Optional[int] = None, eps: float = 1e-3,
                 return_nfe: bool = False):
    """`pc_sample` for a discrete-time model through its VP view, registry signature.

    Defaults: reverse-diffusion predictor (on the schedule's own chain when num_steps is
    the schedule's N, the default) with one Langevin corrector step of snr 0.01 (score_sde's
    VP PC setting, Song et al. 2021b, App. G). NFE = N (1 + corrector_steps). The model
    runs at the step int(t (N - 1)) whose beta_i and alpha_i the predictor and corrector
    take (`sde.make_vp_score_fn`'s 'chain' rule): with N steps and eps < 1 / N, steps
    N - 1, ..., 0, DDPM's ancestral sampling with variance beta_i when no corrector runs.

    Returns:
        The samples, or (samples, nfe) with `return_nfe`.
    """
    view, score = _vp_view_of(
        model_fn, sched, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        denoised_fn=denoised_fn, model_kwargs=model_kwargs, cond_fn=cond_fn,
        classifier_scale=classifier_scale, return_intermediates=return_intermediates,
        name='vp_pc_sample', step='chain')
    x_T, noise_rng = samplers._initial_state(shape, rng, x_T, needs_noise=True,
                                             name='vp_pc_sample')
    out = pc_sample(view, score, shape, noise_rng,
                    num_steps=view.num_scales if num_steps is None else num_steps, eps=eps,
                    predictor=predictor, corrector=corrector, snr=snr,
                    corrector_steps=corrector_steps, x_init=x_T)
    return (out.samples, out.nfe) if return_nfe else out.samples


def vp_heun_sample(model_fn, sched: Schedule, shape: Sequence[int], rng: Optional[Array], *,
                   mean_type: str = 'eps', var_type: str = 'fixed_small',
                   clip_denoised: bool = True, denoised_fn=None, model_kwargs=None,
                   cond_fn=None, classifier_scale: float = 1.0, x_T: Optional[Array] = None,
                   return_intermediates: bool = False, num_steps: int = 18,
                   rho: float = 7.0, s_churn: float = 0.0, s_tmin: float = 0.0,
                   s_tmax: float = float('inf'), s_noise: float = 1.0,
                   sigma_max: float = 0.0, round_sigma: bool = False,
                   return_nfe: bool = False):
    """Karras et al. 2022's Heun sampler for a discrete-time model, registry signature.

    The sigma schedule (`karras_sigmas`, rho = 7) runs between the schedule's smallest
    and largest sigma_i = sqrt((1 - abar_i) / abar_i), the latter capped at `sigma_max`
    when it is > 0 (`capped_sigma_max`; Karras et al. use 80: a cosine schedule's largest
    sigma is ~20,000, where few steps are wasted); the denoiser is the VP view's
    (`sde.denoiser_from_score`: the model at the step nearest in t, x_vp = alpha y), so
    guidance and every mean type work as in the other samplers. By default
    (`round_sigma=False`) a sigma between levels uses the nearest step's output at its
    own sigma. With `round_sigma=True` the sampler is EDM's for a discrete model
    (NVlabs/edm generate.py's `edm_sampler` with `iDDPMPrecond`): every sigma of the
    schedule but the final 0 is rounded to the nearest level in absolute distance
    (`make_round_sigma`), and so is the churned one, whose added noise is
    sqrt(sigma_hat^2 - sigma_i^2) with the rounded sigma_hat (`karras_sample`'s
    `round_sigma`), so the model only ever sees its trained levels; rounding can
    repeat a level, a step of zero length that still costs its evaluations.

    The range: EDM uses [max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)]
    with sigma_min = 0.002 and sigma_max = 80 by default; here it is [the smallest
    level, `capped_sigma_max`(the largest level, `sigma_max`)], so `sigma_max=80`
    reproduces EDM's top for a model whose largest level exceeds 80 (the default 0 is
    no cap), and the bottom is EDM's whenever the smallest level is >= 0.002 (e.g.
    0.01 for the linear schedule of 1000 steps). x_T ~ N(0, I) is x_vp at sigma_max,
    i.e. y = sqrt(1 + sigma_max^2) x_T (EDM starts at y = sigma_max x_T, the same up
    to the factor sqrt(1 + 1 / sigma_max^2)). NFE = 2 num_steps - 1 (35 for 18).

    Returns:
        The samples, or (samples, nfe) with `return_nfe`.
    """
    view, score = _vp_view_of(
        model_fn, sched, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        denoised_fn=denoised_fn, model_kwargs=model_kwargs, cond_fn=cond_fn,
        classifier_scale=classifier_scale, return_intermediates=return_intermediates,
        name='vp_heun_sample')
    churn = samplers._concrete_float(s_churn)
    needs_noise = churn is None or churn > 0.0
    x_T, noise_rng = samplers._initial_state(shape, rng, x_T, needs_noise=needs_noise,
                                             name='vp_heun_sample')
    ladder = _vp_sigmas_np(sched)
    sigmas = karras_sigmas(num_steps, float(ladder[0]),
                           capped_sigma_max(float(ladder[-1]), sigma_max), rho)
    rounder = None
    if round_sigma:  # EDM: t_steps = cat([net.round_sigma(t_steps), 0]).
        rounder = make_round_sigma(sched)
        sigmas = jnp.append(rounder(sigmas[:-1]), 0.0)
    y_T = x_T * jnp.sqrt(1.0 + jnp.square(sigmas[0]))
    out = karras_sample(sde_lib.denoiser_from_score(view, score), sigmas, shape, noise_rng,
                        s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
                        x_init=y_T, round_sigma=rounder)
    return (out.samples, out.nfe) if return_nfe else out.samples


def vp_langevin_sample(model_fn, sched: Schedule, shape: Sequence[int], rng: Array, *,
                       mean_type: str = 'eps', var_type: str = 'fixed_small',
                       clip_denoised: bool = True, denoised_fn=None, model_kwargs=None,
                       cond_fn=None, classifier_scale: float = 1.0,
                       x_T: Optional[Array] = None, return_intermediates: bool = False,
                       step_size: float = 2e-5, steps_per_level: int = 100,
                       num_levels: int = 10, langevin_sigma_max: float = 0.0,
                       langevin_sigma_min: float = 0.0, final_denoise: bool = False,
                       langevin_init: str = 'prior', return_nfe: bool = False):
    """Annealed Langevin dynamics (NCSN) for a discrete-time model, registry signature.

    Through the VP view the model is a VE one in y = x / sqrt(abar), sigma =
    sqrt((1 - abar) / abar) (`sde_langevin_sample`): L = `num_levels` geometric levels
    from `langevin_sigma_max` down to `langevin_sigma_min` (0: the schedule's largest /
    smallest sigma), each evaluated at the nearest trained step. x_T ~ N(0, I) is the
    standard draw the start y = sigma_1 x_T is made of (`langevin_init='prior'`); with
    'uniform' the start is U(-1, 1), as NCSN's code (then x_T must be None). NFE = L T (+ 1 with
    `final_denoise`). Pick the levels: a cosine schedule's largest sigma is ~20,000, and
    NCSNv2 (Technique 1) starts at about the largest distance between training images.

    Returns:
        The samples, or (samples, nfe) with `return_nfe`.

    Raises:
        ValueError: Levels outside the schedule's range, bad numbers, as `vp_pc_sample`.
    """
    view, score = _vp_view_of(
        model_fn, sched, mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        denoised_fn=denoised_fn, model_kwargs=model_kwargs, cond_fn=cond_fn,
        classifier_scale=classifier_scale, return_intermediates=return_intermediates,
        name='vp_langevin_sample')
    if langevin_init == 'uniform' and x_T is not None:
        raise ValueError("vp_langevin_sample: x_T is the normal draw of the 'prior' start; "
                         "langevin_init='uniform' draws its own.")
    x_T, noise_rng = samplers._initial_state(shape, rng, x_T, needs_noise=True,
                                             name='vp_langevin_sample')
    ladder = _vp_sigmas_np(sched)
    hi, lo = langevin_sigma_range(float(ladder[-1]), float(ladder[0]), langevin_sigma_max,
                                  langevin_sigma_min)
    out = sde_langevin_sample(view, score, shape, noise_rng, sigma_max=hi, sigma_min=lo,
                              num_levels=num_levels, step_size=step_size,
                              steps_per_level=steps_per_level, denoise=final_denoise,
                              x_init=None if langevin_init == 'uniform' else hi * x_T,
                              init=langevin_init)
    return (out.samples, out.nfe) if return_nfe else out.samples


def langevin_sigma_range(model_sigma_max: float, model_sigma_min: float,
                         sigma_max: float = 0.0, sigma_min: float = 0.0,
                         ) -> tuple[float, float]:
    """(first, last) Langevin level: the given ones, or the model's where 0.

    Raises:
        ValueError: A level outside [model_sigma_min, model_sigma_max] (with 0.1 %
            slack for float32 rounding), or not first > last.
    """
    hi = float(sigma_max) if float(sigma_max) > 0 else float(model_sigma_max)
    lo = float(sigma_min) if float(sigma_min) > 0 else float(model_sigma_min)
    slack = 1e-3
    for name, v in (('sigma_max', hi), ('sigma_min', lo)):
        if not (model_sigma_min * (1 - slack) <= v <= model_sigma_max * (1 + slack)):
            raise ValueError(f'Langevin {name}={v:g} is outside the model\'s noise levels '
                             f'[{model_sigma_min:g}, {model_sigma_max:g}].')
    if not hi > lo:
        raise ValueError(f'Langevin levels need sigma_max > sigma_min, got {hi:g} <= {lo:g}.')
    return hi, lo


# The samplers of this module that fit `samplers.SAMPLERS` (same `SamplerSpec`, same
# call). They live here because this module imports `samplers` (its validation helpers
# and guidance): a caller merges the two tables, e.g. {**samplers.SAMPLERS,
# **sde_samplers.SDE_SAMPLERS}. Options name the sampler keyword arguments that the
# config would set (proposed fields: sample.num_steps, sample.s_churn, sample.ode_solver,
# sample.ode_rtol / ode_atol, sample.pc_snr); the vp_* samplers want the model's full
# (unrespaced) training schedule.
SDE_SAMPLERS = {
    'dpm_solver_3m': samplers.SamplerSpec(
        dpm_solver_3m_sample, (), 'DPM-Solver++(3M), multistep 3rd order (Lu et al. 2022b)'),
    'dpm_solver_2s': samplers.SamplerSpec(
        dpm_solver_2s_sample, (), 'DPM-Solver++(2S), singlestep 2nd order (Lu et al. 2022b)'),
    'heun': samplers.SamplerSpec(
        vp_heun_sample, ('num_steps', 's_churn', 'sigma_max', 'round_sigma'),
        "Karras et al. 2022's Heun sampler on the VP view (2 num_steps - 1 NFE)"),
    'ode': samplers.SamplerSpec(
        vp_ode_sample, ('solver', 'rtol', 'atol', 'denoise'),
        'probability-flow ODE, adaptive diffrax solver (Song et al. 2021b)'),
    'pc': samplers.SamplerSpec(
        vp_pc_sample, ('snr',),
        'reverse diffusion + Langevin corrector (Song et al. 2021b, PC)'),
    'langevin': samplers.SamplerSpec(
        vp_langevin_sample,
        ('step_size', 'steps_per_level', 'num_levels', 'langevin_sigma_max',
         'langevin_sigma_min', 'final_denoise', 'langevin_init'),
        "annealed Langevin dynamics, NCSN (Song & Ermon 2019), L T NFE"),
}
