"""Samplers: ancestral DDPM, DDIM (with eta) and its inversion, DPM-Solver++, guidance.

This module owns the reverse-process loops. Each sampler is one `jax.lax.scan`
over the step indices of a (possibly respaced) `Schedule`, so a caller that
jits it (with `model_fn`, `shape` and the other callables static) compiles one
program per shape and runs all steps on the device without host round trips.
The per-step Gaussian terms come from `ddpm_jax.diffusion`; the model is always
called with the original training timestep `sched.timesteps[i]`.

It also owns the two guidance methods that act at sampling time:

* classifier guidance through a `cond_fn(x, t, **model_kwargs)` returning
  grad_x log p(y | x_t, t) (Dhariwal & Nichol 2021, Alg. 1 and 2), and
* classifier-free guidance as a wrapper around a model function
  (Ho & Salimans 2022, Eq. 6),

and `dynamic_threshold` (Saharia et al. 2022, Sec. 2.3), an example
`denoised_fn`.

Everything here is pure JAX: no Flax, no I/O, no global state.
"""

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion

Array = jax.Array
ModelFn = Callable[..., Array]
CondFn = Callable[..., Array]
DenoisedFn = Callable[[Array], Array]

__all__ = [
    'SAMPLERS',
    'SamplerSpec',
    'ddpm_sample',
    'ddim_sample',
    'ddim_invert',
    'dpm_solver_sample',
    'ddgan_sample',
    'make_cfg_model_fn',
    'make_classifier_grad_fn',
    'dynamic_threshold',
]


# ---------------------------------------------------------------------------
# Validation helpers (all run at trace time).
# ---------------------------------------------------------------------------


def _concrete_float(value: Any) -> Optional[float]:
    """Returns `value` as a Python float, or None when it is a tracer."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f'expected a real number, got {value!r}') from e


def _check_nonnegative(name: str, value: Any) -> None:
    v = _concrete_float(value)
    # `not v >= 0` also rejects NaN.
    if v is not None and not v >= 0.0:
        raise ValueError(f'{name} must be >= 0, got {value!r}')


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError as e:
        raise ValueError(f'shape must be a sequence of ints, got {shape!r}') from e
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise ValueError(f'shape must be [B, ...] with positive sizes, got {shape}')
    return shape


def _initial_state(shape, rng, x_T, *, needs_noise: bool, name: str):
    """Returns (x_T, noise_rng) after checking `shape`, `rng` and `x_T`."""
    shape = _check_shape(shape)
    if x_T is not None:
        x_T = jnp.asarray(x_T)
        if tuple(x_T.shape) != shape:
            raise ValueError(
                f'{name}: x_T has shape {tuple(x_T.shape)} but shape is {shape}')
        if not jnp.issubdtype(x_T.dtype, jnp.floating):
            raise ValueError(f'{name}: x_T must be floating point, got {x_T.dtype}')
    if rng is None:
        if x_T is None or needs_noise:
            raise ValueError(
                f'{name}: rng is None but is needed (x_T not given or noise is added)')
        return x_T, None  # Deterministic: no noise is drawn.
    init_rng, noise_rng = jax.random.split(rng)
    if x_T is None:
        x_T = jax.random.normal(init_rng, shape, jnp.float32)
    return x_T, noise_rng


def _check_model_kwargs(model_kwargs: Optional[Mapping[str, Any]]) -> dict:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping):
        raise ValueError(f'model_kwargs must be a dict, got {type(model_kwargs)}')
    return dict(model_kwargs)


def _check_schedule(sched) -> int:
    n = sched.timesteps.shape[0]
    if n < 1:
        raise ValueError('schedule has no steps')
    return n


# ---------------------------------------------------------------------------
# Shared per-step pieces.
# ---------------------------------------------------------------------------


def _model_terms(model_fn, sched, x, i, *, mean_type, var_type, clip_denoised,
                 denoised_fn, model_kwargs):
    """Calls the model at step index `i` and returns p_mean_variance's dict.

    Returns:
      (terms, t): the `diffusion.p_mean_variance` dict and the original
      timesteps int32 [B] the model saw.
    """
    batch = x.shape[0]
    i_b = jnp.full((batch,), i, jnp.int32)
    t = jnp.broadcast_to(sched.timesteps[i].astype(jnp.int32), (batch,))
    output = model_fn(x, t, **model_kwargs)
    terms = diffusion.p_mean_variance(
        sched, output, x, i_b, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, denoised_fn=denoised_fn)
    return terms, t


def _cond_gradient(cond_fn, x, t, model_kwargs):
    grad = cond_fn(x, t, **model_kwargs)
    if tuple(grad.shape) != tuple(x.shape):
        raise ValueError(
            f'cond_fn returned shape {tuple(grad.shape)}, expected {tuple(x.shape)}')
    return grad.astype(x.dtype)


def _score_shift(cond_fn, classifier_scale, x, t, abar, model_kwargs):
    """Classifier guidance as a score shift (Dhariwal & Nichol 2021, Alg. 2).

    eps' = eps - sqrt(1 - abar) s grad; recomputing x0 from eps' gives
    x0_hat + (1 - abar) / sqrt(abar) s grad exactly. Returns the two increments, so
    that a zero gradient leaves eps and x0_hat bit-identical to no guidance.
    """
    shift = classifier_scale * _cond_gradient(cond_fn, x, t, model_kwargs)
    # abar is floored as in the schedule's 1/sqrt(abar) (abar = 0 for 'jsd').
    x0_shift = ((1.0 - abar) / jnp.sqrt(jnp.maximum(abar, 1e-20))) * shift
    return -jnp.sqrt(1.0 - abar) * shift, x0_shift


def _bcast(v, x):
    """Reshapes a per-example [B] or scalar quantity to broadcast against x."""
    v = jnp.asarray(v, x.dtype)
    if v.ndim == 0:
        return v
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _run_scan(step_fn, x_T, num_steps, return_intermediates):
    """Runs `step_fn` for i = N-1, ..., 0 in one scan."""
    indices = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)

    def body(x, i):
        x_prev, pred_x0 = step_fn(x, i)
        ys = (x, pred_x0) if return_intermediates else None
        return x_prev, ys

    x0, ys = jax.lax.scan(body, x_T, indices)
    if return_intermediates:
        return x0, {'x_t': ys[0], 'pred_x0': ys[1]}
    return x0


# ---------------------------------------------------------------------------
# Samplers.
# ---------------------------------------------------------------------------


def ddpm_sample(model_fn: ModelFn,
                sched,
                shape: Sequence[int],
                rng: Optional[Array],
                *,
                mean_type: str = 'eps',
                var_type: str = 'fixed_small',
                clip_denoised: bool = True,
                denoised_fn: Optional[DenoisedFn] = None,
                model_kwargs: Optional[Mapping[str, Any]] = None,
                cond_fn: Optional[CondFn] = None,
                classifier_scale: float = 1.0,
                x_T: Optional[Array] = None,
                return_intermediates: bool = False):
    """Ancestral sampling from the reverse process (Ho et al. 2020, Alg. 2).

    For i = N-1, ..., 0: x_{i-1} = mean + [i > 0] * exp(log_variance / 2) * z,
    with mean and variance from `diffusion.p_mean_variance` (any mean and
    variance type, so this also covers learned variances, Nichol & Dhariwal
    2021). With `cond_fn` the mean is shifted by
    `classifier_scale * variance * grad_x log p(y | x_t, t)`
    (Dhariwal & Nichol 2021, Alg. 1).

    Args:
      model_fn: `model_fn(x, t, **model_kwargs)`, x [B, ...], t int32 [B] the
        original training timesteps; returns [B, ..., C] or [B, ..., 2C].
      sched: a (possibly respaced) `schedules.Schedule` with N steps.
      shape: static output shape [B, H, W, C].
      rng: a `jax.random.key`; draws x_T (unless given) and the step noise.
      mean_type: what the model predicts, one of `diffusion.MEAN_TYPES`.
      var_type: one of `diffusion.VAR_TYPES`.
      clip_denoised: clip the predicted x_0 to [-1, 1].
      denoised_fn: optional map applied to the predicted x_0 before clipping
        (see `diffusion.p_mean_variance`), e.g. `dynamic_threshold`.
      model_kwargs: keyword arguments for `model_fn` and `cond_fn`
        (e.g. {'y': labels}).
      cond_fn: optional `cond_fn(x, t, **model_kwargs)` returning
        grad_x log p(y | x_t, t) with the shape of x.
      classifier_scale: guidance gradient scale s >= 0 (used with `cond_fn`).
      x_T: optional starting noise of shape `shape`.
      return_intermediates: also return the per-step states.

    Returns:
      The samples [B, ...]; with `return_intermediates`, a tuple
      (samples, {'x_t': [N, B, ...], 'pred_x0': [N, B, ...]}) where entry k
      is the state entering the k-th step in sampling order (entry 0 is x_T)
      and the model's (unguided) predicted x_0 at that step.

    Raises:
      ValueError: unknown mean/var type, `x_T` not of shape `shape`, negative
        `classifier_scale`, or a model / cond_fn output of the wrong shape.
    """
    diffusion.validate_types(mean_type, var_type)
    _check_nonnegative('classifier_scale', classifier_scale)
    num_steps = _check_schedule(sched)
    model_kwargs = _check_model_kwargs(model_kwargs)
    x_T, noise_rng = _initial_state(shape, rng, x_T, needs_noise=True,
                                    name='ddpm_sample')

    def step(x, i):
        terms, t = _model_terms(
            model_fn, sched, x, i, mean_type=mean_type, var_type=var_type,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs)
        mean = terms['mean']
        if cond_fn is not None:
            # Dhariwal & Nichol 2021, Alg. 1: mu + s * Sigma * grad log p(y|x_t).
            grad = _cond_gradient(cond_fn, x, t, model_kwargs)
            mean = mean + classifier_scale * terms['variance'] * grad
        noise = jax.random.normal(jax.random.fold_in(noise_rng, i), x.shape, x.dtype)
        nonzero = (i > 0).astype(x.dtype)  # No noise when producing x_0.
        x_prev = mean + nonzero * jnp.exp(0.5 * terms['log_variance']) * noise
        return x_prev.astype(x.dtype), terms['pred_x0']

    return _run_scan(step, x_T, num_steps, return_intermediates)


def ddim_sample(model_fn: ModelFn,
                sched,
                shape: Sequence[int],
                rng: Optional[Array],
                *,
                eta: float = 0.0,
                mean_type: str = 'eps',
                var_type: str = 'fixed_small',
                clip_denoised: bool = True,
                denoised_fn: Optional[DenoisedFn] = None,
                model_kwargs: Optional[Mapping[str, Any]] = None,
                cond_fn: Optional[CondFn] = None,
                classifier_scale: float = 1.0,
                x_T: Optional[Array] = None,
                return_intermediates: bool = False):
    """DDIM sampling (Song et al. 2021, Eq. 12), eta = 0 deterministic.

    With abar = alphas_cumprod[i] and abar_prev = alphas_cumprod_prev[i] of
    the (respaced) schedule, the predicted x_0 (clipped if `clip_denoised`)
    and eps re-derived from it:

        sigma  = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev)
        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z

    (Song et al. 2021, Eq. 12 and 16; eta = 1 is ancestral DDPM sampling
    with the posterior variance). With `cond_fn`, the score is shifted,
    eps' = eps - sqrt(1 - abar) * s * grad, and x0_hat is recomputed from eps'
    (Dhariwal & Nichol 2021, Alg. 2). The model's variance output, if any,
    is ignored.

    Args:
      model_fn: as in `ddpm_sample`.
      sched: a (possibly respaced) `schedules.Schedule` with N steps.
      shape: static output shape [B, H, W, C].
      rng: a `jax.random.key`. May be None when `x_T` is given and eta is 0.
      eta: noise scale >= 0.
      mean_type, var_type, clip_denoised, denoised_fn, model_kwargs, cond_fn,
        classifier_scale, x_T, return_intermediates: as in `ddpm_sample`.

    Returns:
      Like `ddpm_sample`; the intermediate 'pred_x0' is the (guided) x0_hat
      used by the update.

    Raises:
      ValueError: unknown mean/var type, `x_T` not of shape `shape`,
        eta < 0, negative `classifier_scale`, or wrong output shapes.
    """
    diffusion.validate_types(mean_type, var_type)
    _check_nonnegative('eta', eta)
    _check_nonnegative('classifier_scale', classifier_scale)
    num_steps = _check_schedule(sched)
    model_kwargs = _check_model_kwargs(model_kwargs)
    eta_value = _concrete_float(eta)
    needs_noise = eta_value is None or eta_value > 0.0
    x_T, noise_rng = _initial_state(shape, rng, x_T, needs_noise=needs_noise,
                                    name='ddim_sample')

    def step(x, i):
        terms, t = _model_terms(
            model_fn, sched, x, i, mean_type=mean_type, var_type=var_type,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs)
        pred_x0 = terms['pred_x0']
        eps = terms['eps']  # Consistent with the (clipped / denoised) pred_x0.
        abar = sched.alphas_cumprod[i]
        abar_prev = sched.alphas_cumprod_prev[i]
        if cond_fn is not None:
            eps_shift, x0_shift = _score_shift(cond_fn, classifier_scale, x, t, abar,
                                               model_kwargs)
            eps, pred_x0 = eps + eps_shift, pred_x0 + x0_shift
        sigma = (eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar))
                 * jnp.sqrt(1.0 - abar / abar_prev))
        # Rounding can make the radicand slightly negative when eta = 1.
        dir_coef = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0))
        x_prev = jnp.sqrt(abar_prev) * pred_x0 + dir_coef * eps
        if needs_noise:  # Skipped for a concrete eta = 0: no RNG in the program.
            noise = jax.random.normal(jax.random.fold_in(noise_rng, i), x.shape, x.dtype)
            x_prev = x_prev + (i > 0).astype(x.dtype) * sigma * noise
        return x_prev.astype(x.dtype), pred_x0

    return _run_scan(step, x_T, num_steps, return_intermediates)


def ddim_invert(model_fn: ModelFn,
                sched,
                x0: Array,
                *,
                mean_type: str = 'eps',
                var_type: str = 'fixed_small',
                clip_denoised: bool = False,
                model_kwargs: Optional[Mapping[str, Any]] = None) -> Array:
    """Maps data x_0 to x_T along the deterministic DDIM path (eta = 0).

    This runs the DDIM ODE step (Song et al. 2021, Eq. 12 with sigma = 0,
    read as an Euler step of Eq. 13) forwards in time, so that
    `ddim_sample(..., x_T=ddim_invert(..., x0), eta=0, clip_denoised=False)`
    reconstructs x0 up to the discretisation error. The k-th state x_k sits
    at abar = alphas_cumprod[k]. Step k >= 1 evaluates the model at x_{k-1}
    and timestep `sched.timesteps[k-1]` and moves to
    abar = alphas_cumprod_next[k-1]:

        x_k = sqrt(abar_next) x0_hat + sqrt(1 - abar_next) eps.

    The first step leaves the clean data (abar = 1): it keeps x0_hat = x_0 and
    takes eps from the model at `sched.timesteps[0]`, which mirrors the
    sampler's last step x_0 = x0_hat(x_0-state).

    Args:
      model_fn: as in `ddpm_sample`.
      sched: a (possibly respaced) `schedules.Schedule` with N steps; the
        inversion makes N model calls, like sampling.
      x0: data [B, ...].
      mean_type, var_type: as in `ddpm_sample` (the variance is unused).
      clip_denoised: clip the predicted x_0 to [-1, 1] (off by default; exact
        round trips need it off).
      model_kwargs: keyword arguments for `model_fn`.

    Returns:
      x_T, same shape as x0.

    Raises:
      ValueError: unknown mean/var type or wrong output shapes.
    """
    diffusion.validate_types(mean_type, var_type)
    num_steps = _check_schedule(sched)
    model_kwargs = _check_model_kwargs(model_kwargs)
    x0 = jnp.asarray(x0)
    _check_shape(x0.shape)

    def body(x, k):
        prev = jnp.maximum(k - 1, 0)
        terms, _ = _model_terms(
            model_fn, sched, x, prev, mean_type=mean_type, var_type=var_type,
            clip_denoised=clip_denoised, denoised_fn=None,
            model_kwargs=model_kwargs)
        eps = terms['eps']
        first = k == 0
        x0_hat = jnp.where(first, x, terms['pred_x0'])
        abar_next = jnp.where(first, sched.alphas_cumprod[0],
                              sched.alphas_cumprod_next[prev])
        x_next = jnp.sqrt(abar_next) * x0_hat + jnp.sqrt(1.0 - abar_next) * eps
        return x_next.astype(x.dtype), None

    x_T, _ = jax.lax.scan(body, x0, jnp.arange(num_steps, dtype=jnp.int32))
    return x_T


def _log_snr_half(abar):
    """lambda = log(alpha / sigma) = (log abar - log(1 - abar)) / 2 (Lu et al. 2022)."""
    return 0.5 * (jnp.log(abar) - jnp.log1p(-abar))


def dpm_solver_sample(model_fn: ModelFn,
                      sched,
                      shape: Sequence[int],
                      rng: Optional[Array],
                      *,
                      mean_type: str = 'eps',
                      var_type: str = 'fixed_small',
                      clip_denoised: bool = True,
                      denoised_fn: Optional[DenoisedFn] = None,
                      model_kwargs: Optional[Mapping[str, Any]] = None,
                      cond_fn: Optional[CondFn] = None,
                      classifier_scale: float = 1.0,
                      x_T: Optional[Array] = None,
                      return_intermediates: bool = False,
                      lower_order_final: bool = True):
    """DPM-Solver++(2M): multistep 2nd-order ODE sampler (Lu et al. 2022b, Alg. 2).

    Solves the probability-flow ODE in its data-prediction form (Lu et al.
    2022b, "DPM-Solver++", Sec. 4) on the steps of a (typically respaced)
    schedule. With alpha_i = sqrt(abar_i), sigma_i = sqrt(1 - abar_i) and
    lambda_i = log(alpha_i / sigma_i), a step from step index i (at abar_i) to
    the previous kept step (abar_prev = alphas_cumprod_prev[i]) has
    h = lambda_prev - lambda_i and, with x0_hat the model's (clipped /
    denoised) x_0 prediction from `diffusion.p_mean_variance`,

        x_prev = (sigma_prev / sigma_i) x_i - alpha_prev (e^{-h} - 1) D,

    (Lu et al. 2022b, Alg. 2, lines 4 and 7). The first step is first order,
    D = x0_hat (DPM-Solver++(1), which equals DDIM with eta = 0);
    later steps use the multistep second-order estimate

        r = h_last / h,  D = (1 + 1 / (2 r)) x0_hat - 1 / (2 r) x0_hat_last

    from the previous step's h and x0_hat (Alg. 2, lines 6-7). The final step
    (abar_prev = 1, lambda = +inf) returns x0_hat itself, the limit of the
    first-order update, as DPM-Solver++ does when it denoises to zero.

    The multistep estimate extrapolates x0_hat linearly in lambda, so it is
    most accurate when the steps are roughly uniform in lambda. Uniform-time
    spacing ('ddim20') on the linear schedule makes the last solver step much
    longer in lambda than the one before it (h ~ 2.9 vs 0.7 at T = 1000), where
    extrapolating overshoots; `lower_order_final` (default) takes that step with
    first order. The authors' code (LuChengTHU/dpm-solver, `DPM_Solver.sample`)
    lowers the final order only in runs of fewer than 10 steps; here it is lowered at
    any length (Gaussian data, 'ddim20' on the linear schedule, relative error of the
    probability-flow map 0.040 with it, 0.227 without, DDIM 0.133;
    tests/test_samplers.py). `lower_order_final=False` gives the authors' update for
    runs of 10 or more steps.

    The grid is the respaced schedule's kept timesteps: 'ddimN' is N model calls, N - 1
    solver steps from the top kept step (950 of 1000 for 'ddim20') and the final
    x0_hat. The authors' default grid is continuous instead (N steps uniform in time
    from t = 1 to 1/N, no final denoising; or uniform in lambda, which
    `schedules`' respacing does not offer; and their discrete schedule first drops the
    last steps whose lambda is below -5.1, 4 of a 1000-step cosine schedule, so that
    their t = 1 is step 995 there). `clip_denoised` clips x0_hat before the
    guidance shift, as `ddim_sample` does; the authors' solver leaves x0_hat as it is
    unless asked to threshold it, so pass clip_denoised=False to match it.

    With `cond_fn`, the noise prediction is shifted as in DDIM,
    eps' = eps - sqrt(1 - abar) s grad (Dhariwal & Nichol 2021, Alg. 2), i.e.
    x0_hat' = x0_hat + (1 - abar) / sqrt(abar) s grad, and the solver uses
    x0_hat' (the guided data prediction of Lu et al. 2022b, Sec. 4). The
    model's variance output, if any, is ignored: this is an ODE sampler.

    Args:
      model_fn: as in `ddpm_sample`.
      sched: a (possibly respaced) `schedules.Schedule` with N steps; the
        sampler makes N model calls. Typically respaced to 10-25 steps
        (e.g. 'ddim20').
      shape: static output shape [B, H, W, C].
      rng: a `jax.random.key`, only used to draw x_T; may be None when `x_T`
        is given (the sampler is deterministic).
      mean_type, var_type, clip_denoised, denoised_fn, model_kwargs, cond_fn,
        classifier_scale, x_T, return_intermediates: as in `ddpm_sample`.
      lower_order_final: first-order update on the last solver step (into the
        smallest kept timestep).

    Returns:
      Like `ddpm_sample`; the intermediate 'pred_x0' is the (guided) x0_hat
      the update used at that step, and the final sample equals the last one.

    Raises:
      ValueError: unknown mean/var type, `x_T` not of shape `shape`, `rng`
        and `x_T` both None, negative `classifier_scale`, or wrong output
        shapes.
    """
    diffusion.validate_types(mean_type, var_type)
    _check_nonnegative('classifier_scale', classifier_scale)
    num_steps = _check_schedule(sched)
    model_kwargs = _check_model_kwargs(model_kwargs)
    x_T, _ = _initial_state(shape, rng, x_T, needs_noise=False,
                            name='dpm_solver_sample')

    def body(carry, i):
        x, x0_last, h_last = carry
        terms, t = _model_terms(
            model_fn, sched, x, i, mean_type=mean_type, var_type=var_type,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs)
        pred_x0 = terms['pred_x0']
        abar = sched.alphas_cumprod[i]
        abar_prev = sched.alphas_cumprod_prev[i]
        if cond_fn is not None:  # The guided data prediction, as in ddim_sample.
            pred_x0 = pred_x0 + _score_shift(cond_fn, classifier_scale, x, t, abar,
                                             model_kwargs)[1]
        final = abar_prev >= 1.0  # lambda_prev = +inf: x_0 = x0_hat.
        # A finite stand-in keeps the unselected final-step branch free of inf / NaN.
        abar_prev_safe = jnp.where(final, abar, abar_prev)
        h = _log_snr_half(abar_prev_safe) - _log_snr_half(abar)
        # First order at the first step (no history) and, with `lower_order_final`, at
        # the last solver step, the long step into the smallest timestep.
        first = (i == num_steps - 1) | (lower_order_final & (i == 1))
        # Alg. 2, line 6: r = h_last / h; 1 / (2 r) = h / (2 h_last).
        half_inv_r = jnp.where(first, 0.0, h / (2.0 * jnp.where(first, 1.0, h_last)))
        d = (1.0 + half_inv_r) * pred_x0 - half_inv_r * x0_last
        sigma_ratio = jnp.sqrt((1.0 - abar_prev_safe) / (1.0 - abar))
        # -alpha_prev (e^{-h} - 1), with expm1 for accuracy at small h.
        d_coef = -jnp.sqrt(abar_prev_safe) * jnp.expm1(-h)
        x_prev = jnp.where(final, pred_x0, sigma_ratio * x + d_coef * d)
        ys = (x, pred_x0) if return_intermediates else None
        return (x_prev.astype(x.dtype), pred_x0.astype(x.dtype), h), ys

    indices = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
    init = (x_T, jnp.zeros_like(x_T), jnp.zeros((), jnp.float32))
    (x0, _, _), ys = jax.lax.scan(body, init, indices)
    if return_intermediates:
        return x0, {'x_t': ys[0], 'pred_x0': ys[1]}
    return x0


# ---------------------------------------------------------------------------
# Classifier-free guidance and thresholding.
# ---------------------------------------------------------------------------


def make_cfg_model_fn(model_fn: ModelFn,
                      guidance_scale: float,
                      null_label: int,
                      label_key: str = 'y') -> ModelFn:
    """Wraps a model for classifier-free guidance (Ho & Salimans 2022, Eq. 6).

    The returned model function makes ONE call of batch 2B on
    [x; x] with labels [y; null], and combines the mean channels
    eps = eps_u + s (eps_c - eps_u), computed as (1 - s) eps_u + s eps_c so
    that s = 1 returns the conditional output and s = 0 the unconditional one
    exactly. The paper's Eq. 6, (1 + w) eps_c - w eps_u, is this with s = 1 + w
    (GLIDE's and latent diffusion's scale is s). If the model outputs 2C channels (learned variance), the last C
    come from the conditional half. Other model kwargs whose leading axis is
    the batch are duplicated; anything else is passed through unchanged.

    Args:
      model_fn: a class-conditional `model_fn(x, t, **model_kwargs)` trained
        with label dropout to `null_label`.
      guidance_scale: s >= 0 (1 = plain conditional sampling).
      null_label: the label that means "no class" (num_classes in ddpm_jax).
      label_key: name of the label keyword argument.

    Returns:
      A model function with the signature of `model_fn`.

    Raises:
      ValueError: negative `guidance_scale` (at construction); a missing
        label or a wrong output channel count (at trace time).
    """
    _check_nonnegative('guidance_scale', guidance_scale)

    def cfg_model_fn(x, t, **model_kwargs):
        if label_key not in model_kwargs:
            raise ValueError(
                f'classifier-free guidance needs model_kwargs[{label_key!r}]')
        batch = x.shape[0]
        labels = jnp.asarray(model_kwargs[label_key])
        if labels.shape[:1] != (batch,):
            raise ValueError(
                f'{label_key} has shape {labels.shape}, expected a leading axis {batch}')
        kwargs = {}
        for key, value in model_kwargs.items():
            if key == label_key:
                continue
            shape = getattr(value, 'shape', ())
            if len(shape) >= 1 and shape[0] == batch:
                value = jnp.concatenate([value, value], axis=0)
            kwargs[key] = value
        kwargs[label_key] = jnp.concatenate(
            [labels, jnp.full_like(labels, null_label)], axis=0)
        out = model_fn(jnp.concatenate([x, x], axis=0),
                       jnp.concatenate([t, t], axis=0), **kwargs)
        channels = x.shape[-1]
        if out.shape[0] != 2 * batch or out.shape[-1] not in (channels, 2 * channels):
            raise ValueError(
                f'model output has shape {out.shape}; expected [{2 * batch}, ..., '
                f'{channels} or {2 * channels}]')
        cond, uncond = out[:batch], out[batch:]
        s = jnp.asarray(guidance_scale, out.dtype)
        mean = (1.0 - s) * uncond[..., :channels] + s * cond[..., :channels]
        if out.shape[-1] == 2 * channels:
            mean = jnp.concatenate([mean, cond[..., channels:]], axis=-1)
        return mean

    return cfg_model_fn


def dynamic_threshold(x0: Array, percentile: float = 0.995) -> Array:
    """Dynamic thresholding of a predicted x_0 (Saharia et al. 2022, Sec. 2.3).

    Per example, s = max(1, quantile(|x0|, percentile)); x0 is clipped to
    [-s, s] and divided by s, so it ends in [-1, 1] and is unchanged when
    already inside it. Use as `denoised_fn=dynamic_threshold` (with
    `clip_denoised=False`), or through `functools.partial` for another
    percentile.

    Args:
      x0: predicted data [B, ...].
      percentile: quantile of |x0| in (0, 1].

    Returns:
      The thresholded x0, same shape and dtype.

    Raises:
      ValueError: `percentile` outside (0, 1].
    """
    p = _concrete_float(percentile)
    if p is not None and not 0.0 < p <= 1.0:
        raise ValueError(f'percentile must be in (0, 1], got {percentile!r}')
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.quantile(flat, percentile, axis=1)
    s = _bcast(jnp.maximum(s, 1.0), x0)
    return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)


def make_classifier_grad_fn(logits_fn: Callable[[Array, Array], Array]) -> CondFn:
    """The classifier-guidance gradient grad_x log p(y | x_t, t) (Dhariwal & Nichol 2021).

    The gradient of sum_b log_softmax(logits_fn(x, t))[b, y_b] with respect to x;
    each example's term depends only on its own x_b, so this is the per-example
    gradient. The samplers apply the scale (`classifier_scale`): DDPM shifts the
    mean by s * Sigma * grad (Alg. 1), DDIM and DPM-Solver shift eps by
    -sqrt(1 - abar) * s * grad (Alg. 2).

    Args:
        logits_fn: `logits_fn(x [B, H, W, C], t int32 [B]) -> logits [B, K]`, e.g. a
            noise-aware classifier with its parameters bound.

    Returns:
        `cond_fn(x, t, y=None, **unused) -> [B, H, W, C]`, the samplers' `cond_fn`.
    """
    def cond_fn(x, t, y=None, **unused):
        del unused
        if y is None:
            raise ValueError('classifier guidance needs labels y')

        def total_log_prob(x_in):
            log_probs = jax.nn.log_softmax(logits_fn(x_in, t).astype(jnp.float32), axis=-1)
            return jnp.sum(jnp.take_along_axis(log_probs, y[:, None].astype(jnp.int32),
                                               axis=-1))

        return jax.grad(total_log_prob)(x)
    return cond_fn


def ddgan_sample(model_fn: ModelFn,
                 sched,
                 shape: Sequence[int],
                 rng: Optional[Array],
                 *,
                 latent_dim: int,
                 mean_type: str = 'x0',
                 var_type: str = 'fixed_small',
                 clip_denoised: bool = True,
                 model_kwargs: Optional[Mapping[str, Any]] = None,
                 cond_fn: Optional[CondFn] = None,
                 classifier_scale: float = 1.0,
                 x_T: Optional[Array] = None,
                 return_intermediates: bool = False):
    """Denoising diffusion GAN sampling (Xiao et al. 2022, Sec. 4, Alg. 2).

    For i = N-1, ..., 0: x0 = G(x_i, z, t_i) with a fresh z ~ N(0, I) per step, then
    x_{i-1} ~ q(x_{i-1} | x_i, x0), the Gaussian posterior (fixed_small) — which is
    `ddpm_sample` with an x_0-predicting model, so the posterior is the library's.
    The latent of step i is drawn from a key folded with its original timestep, so
    a run is reproducible and independent of the batch's sharding.

    Args:
      model_fn: the generator, `model_fn(x, t, z=z, **model_kwargs)` -> x_0 [B, ...].
      sched, shape, rng, clip_denoised, model_kwargs, x_T, return_intermediates: as in
        `ddpm_sample`.
      latent_dim: size of z.
      mean_type, var_type: must be 'x0' and 'fixed_small' (what the generator is
        trained for); taken for the registry's common signature.
      cond_fn, classifier_scale: classifier guidance is not defined for a GAN; a
        `cond_fn` is refused.

    Raises:
      ValueError: other mean/var types, a cond_fn, latent_dim < 1 or no rng.
    """
    if mean_type != 'x0' or var_type != 'fixed_small':
        raise ValueError(f'ddgan_sample: the generator predicts x_0 with the posterior '
                         f'variance (x0, fixed_small), got ({mean_type}, {var_type}).')
    if cond_fn is not None:
        raise ValueError('ddgan_sample: classifier guidance (cond_fn) is not defined for a '
                         'GAN generator.')
    del classifier_scale
    if latent_dim < 1:
        raise ValueError(f'ddgan_sample: latent_dim must be >= 1, got {latent_dim}.')
    if rng is None:
        raise ValueError('ddgan_sample: rng is None but the latents need one.')
    rng, z_rng = jax.random.split(rng)

    def generator_fn(x, t, **kwargs):
        z = jax.random.normal(jax.random.fold_in(z_rng, t[0]), (x.shape[0], latent_dim),
                              jnp.float32)
        return model_fn(x, t, z=z, **kwargs)

    return ddpm_sample(generator_fn, sched, shape, rng, mean_type='x0',
                       var_type='fixed_small', clip_denoised=clip_denoised,
                       model_kwargs=model_kwargs, x_T=x_T,
                       return_intermediates=return_intermediates)


class SamplerSpec(NamedTuple):
    """An image sampler of the registry.

    Attributes:
        fn: `fn(model_fn, sched, shape, rng, **options)`; one `lax.scan`.
        options: The config-driven options it takes besides the common ones: 'eta'
            (`sample.eta`), 'latent_dim' (`model.latent_dim`).
        description: One line for the docs (config comment, README).
    """
    fn: Callable[..., Any]
    options: tuple[str, ...]
    description: str


# The image samplers selectable by name (`sample.sampler`). Adding one is a function
# above plus an entry here; the config comment and the README are checked against
# this table by the tests.
SAMPLERS: Mapping[str, SamplerSpec] = {
    'ddpm': SamplerSpec(ddpm_sample, (), 'ancestral sampling (Ho et al. 2020, Alg. 2)'),
    'ddim': SamplerSpec(ddim_sample, ('eta',), 'DDIM with eta (Song et al. 2021, Eq. 12)'),
    'dpm_solver': SamplerSpec(dpm_solver_sample, (),
                              'DPM-Solver++(2M), a fast ODE sampler (Lu et al. 2022)'),
    'ddgan': SamplerSpec(ddgan_sample, ('latent_dim',),
                         'a denoising diffusion GAN generator (Xiao et al. 2022)'),
}
