"""Tests for ddpm_jax.samplers against closed forms for Gaussian data.

For data x0 ~ N(0, s^2 I) the Bayes-optimal noise predictor is linear,
eps*(x_t, t) = sqrt(1 - abar_t) x_t / (abar_t s^2 + 1 - abar_t), so every
sampler below is a linear-Gaussian recursion whose output variance, its
deterministic gain and its guidance shift can be computed exactly in float64
NumPy. The models index abar by the ORIGINAL timestep from the unrespaced
schedule, so a sampler that mixes up step indices and timesteps fails.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers
from ddpm_jax import schedules

S = 0.5  # Data standard deviation.
SHAPE = (2000, 4, 4, 1)  # 32000 independent scalars per sampler run.
N_SCALARS = int(np.prod(SHAPE))


def _key(seed):
    # The samplers take any typed key. 'rbg' compiles ~5x faster than the default
    # threefry on CPU, which dominates these tiny programs; the determinism and
    # vmap tests use the default implementation.
    return jax.random.key(seed, impl='rbg')


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _abar_orig(num_timesteps):
    """abar of the unrespaced linear schedule, float64, from the raw betas."""
    return np.cumprod(1.0 - schedules.get_beta_schedule('linear', num_timesteps))


def make_gaussian_eps_fn(num_timesteps, s=S, num_channels_out=None):
    """Optimal eps predictor for N(0, s^2 I) data, indexed by original timestep."""
    abar = jnp.asarray(_abar_orig(num_timesteps), jnp.float32)

    def model_fn(x, t, **unused_kwargs):
        assert t.shape == (x.shape[0],) and t.dtype == jnp.int32, (t.shape, t.dtype)
        a = abar[t].reshape((-1,) + (1,) * (x.ndim - 1))
        eps = jnp.sqrt(1.0 - a) * x / (a * s**2 + 1.0 - a)
        if num_channels_out == 2 * x.shape[-1]:  # A learned-variance head, unused.
            eps = jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)
        return eps

    return model_fn


def reference(num_timesteps, respacing, kind, *, eta=0.0, var_type='fixed_small', s=S):
    """Closed-form linear-Gaussian recursion of a sampler with the optimal model.

    Returns:
      dict with per-step gains `A` (sampling order), the final gain K = prod A,
      the output variance V for x_T ~ N(0, I), and the shift G per unit
      classifier_scale * gradient for a constant gradient.
    """
    abar_all = _abar_orig(num_timesteps)
    steps = schedules.space_timesteps(num_timesteps, respacing)
    ab = abar_all[steps]
    abp = np.append(1.0, ab[:-1])
    gains, k_total, var, shift = [], 1.0, 1.0, 0.0
    for i in range(len(steps) - 1, -1, -1):
        a, ap = ab[i], abp[i]
        v = a * s**2 + 1.0 - a
        k = np.sqrt(1.0 - a) / v  # eps = k x.
        c = np.sqrt(a) * s**2 / v  # pred_x0 = c x.
        if kind == 'ddpm':  # Ho et al. 2020, Eqs. 6-7.
            beta = 1.0 - a / ap
            coef1 = beta * np.sqrt(ap) / (1.0 - a)
            coef2 = (1.0 - ap) * np.sqrt(a / ap) / (1.0 - a)
            gain = coef1 * c + coef2
            if var_type == 'fixed_small':
                step_var = beta * (1.0 - ap) / (1.0 - a)
            elif i > 0:
                step_var = beta
            else:
                beta1 = 1.0 - ab[1] / ab[0]
                step_var = beta1 * (1.0 - ab[0]) / (1.0 - ab[1])
            b = step_var
            noise_var = step_var if i > 0 else 0.0
        else:  # Song et al. 2021, Eq. 12; Dhariwal & Nichol 2021, Alg. 2.
            sigma = eta * np.sqrt((1.0 - ap) / (1.0 - a)) * np.sqrt(1.0 - a / ap)
            d = np.sqrt(max(1.0 - ap - sigma**2, 0.0))
            gain = np.sqrt(ap) * c + d * k
            b = np.sqrt(ap) * (1.0 - a) / np.sqrt(a) - d * np.sqrt(1.0 - a)
            noise_var = sigma**2 if i > 0 else 0.0
        gains.append(gain)
        k_total *= gain
        var = gain**2 * var + noise_var
        shift = gain * shift + b
    return {'A': np.array(gains), 'K': k_total, 'V': var, 'G': shift}


def _var_tolerance(v, n=N_SCALARS, num_se=4.5):
    # Standard error of a Gaussian sample variance: v * sqrt(2 / (n - 1)).
    return num_se * v * np.sqrt(2.0 / (n - 1))


def _check_moments(x, v_expected):
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x))
    v = x.var()
    assert abs(v - v_expected) < _var_tolerance(v_expected), (v, v_expected)
    assert abs(x.mean()) < 4.5 * np.sqrt(v_expected / x.size), x.mean()


# ---------------------------------------------------------------------------
# Distributional correctness.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('var_type', ['fixed_small', 'fixed_large'])
def test_ddpm_matches_closed_form_variance(var_type):
    sched = schedules.make_schedule('linear', 100)
    x = jax.jit(functools.partial(
        samplers.ddpm_sample, make_gaussian_eps_fn(100), sched, SHAPE,
        var_type=var_type, clip_denoised=False))(_key(0))
    ref = reference(100, '', 'ddpm', var_type=var_type)
    _check_moments(x, ref['V'])
    # fixed_small under- and fixed_large over-disperses at T = 100, so the two
    # are distinguishable: a swapped variance would fail the line above.
    v_small = reference(100, '', 'ddpm', var_type='fixed_small')['V']
    v_large = reference(100, '', 'ddpm', var_type='fixed_large')['V']
    assert v_small < 0.9 * S**2 < 1.02 * S**2 < v_large


def test_ddpm_long_chain_has_data_variance():
    # With T = 1000 the discretisation bias of fixed_large is 0.3%, well below
    # the 3.6% tolerance, so the samples have the data variance s^2.
    sched = schedules.make_schedule('linear', 1000)
    x = jax.jit(functools.partial(
        samplers.ddpm_sample, make_gaussian_eps_fn(1000), sched, SHAPE,
        var_type='fixed_large', clip_denoised=False))(_key(1))
    _check_moments(x, S**2)


@pytest.mark.parametrize('respacing,eta', [('ddim20', 0.0), ('ddim20', 1.0), ('25', 1.0)])
def test_ddim_respaced_matches_closed_form_variance(respacing, eta):
    sched = schedules.make_schedule('linear', 100, respacing)
    x = jax.jit(functools.partial(
        samplers.ddim_sample, make_gaussian_eps_fn(100), sched, SHAPE,
        eta=eta, clip_denoised=False))(_key(2))
    _check_moments(x, reference(100, respacing, 'ddim', eta=eta)['V'])


def test_ddim_eta1_equals_ddpm_fixed_small_pathwise():
    # Song et al. 2021, Eq. 16: eta = 1 is ancestral sampling with beta~; with the same
    # x_T and key the two samplers take the same path on a respaced schedule.
    sched = schedules.make_schedule('linear', 100, '25')
    x_T = jax.random.normal(_key(5), SHAPE)
    kwargs = dict(clip_denoised=False, x_T=x_T)
    ddim = samplers.ddim_sample(make_gaussian_eps_fn(100), sched, SHAPE, _key(3), eta=1.0,
                                **kwargs)
    ddpm = samplers.ddpm_sample(make_gaussian_eps_fn(100), sched, SHAPE, _key(3),
                                var_type='fixed_small', **kwargs)
    np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), atol=1e-5)
    assert np.std(np.asarray(ddim)) > 0.1  # A real sample, not a degenerate one.


def test_ddim_deterministic_map_is_exact_scaling():
    # eta = 0 maps N(0, 1) to K * x_T with K^2 -> s^2 (0.6% off with 1000 steps).
    sched = schedules.make_schedule('linear', 1000)
    x_T = _normal(3, SHAPE)
    x = jax.jit(functools.partial(
        samplers.ddim_sample, make_gaussian_eps_fn(1000), sched, SHAPE, None,
        eta=0.0, clip_denoised=False))(x_T=x_T)
    ref = reference(1000, '', 'ddim')
    assert abs(ref['K']**2 / S**2 - 1.0) < 0.01
    np.testing.assert_allclose(np.asarray(x), ref['K'] * np.asarray(x_T),
                               rtol=2e-4, atol=1e-6)
    _check_moments(x, S**2)


# ---------------------------------------------------------------------------
# DDIM inversion.
# ---------------------------------------------------------------------------


def reference_inversion_gain(num_timesteps, respacing, s=S):
    """Closed-form gain x_T = K_inv x_0 of `ddim_invert` with the optimal model.

    Step 0 leaves abar = 1 keeping x0_hat = x_0 with eps from timestep t_0;
    step k >= 1 is the DDIM step from abar_{k-1} to abar_k with the model at
    x_{k-1}, t_{k-1} (Song et al. 2021, Eq. 12 run forwards).
    """
    ab = _abar_orig(num_timesteps)[schedules.space_timesteps(num_timesteps, respacing)]
    gain = 1.0
    for j in range(len(ab)):
        a = ab[max(j - 1, 0)]
        v = a * s**2 + 1.0 - a
        k, c = np.sqrt(1.0 - a) / v, np.sqrt(a) * s**2 / v
        x0_coef = 1.0 if j == 0 else c
        gain *= np.sqrt(ab[j]) * x0_coef + np.sqrt(1.0 - ab[j]) * k
    return gain


@pytest.mark.parametrize('num_timesteps,respacing,tol', [
    (1000, '', 0.01), (100, '', 0.06), (1000, 'ddim100', 0.06)])
def test_ddim_inversion_round_trip(num_timesteps, respacing, tol):
    sched = schedules.make_schedule('linear', num_timesteps, respacing)
    model_fn = make_gaussian_eps_fn(num_timesteps)
    x0 = S * _normal(4, (4, 4, 4, 1))
    x_T = jax.jit(functools.partial(samplers.ddim_invert, model_fn, sched))(x0)
    k_inv = reference_inversion_gain(num_timesteps, respacing)
    np.testing.assert_allclose(np.asarray(x_T), k_inv * np.asarray(x0),
                               rtol=2e-4, atol=1e-6)
    assert abs(k_inv * S - 1.0) < 0.03  # x_T has unit scale: it is noise.
    x_rec = jax.jit(functools.partial(
        samplers.ddim_sample, model_fn, sched, x0.shape, None, eta=0.0,
        clip_denoised=False))(x_T=x_T)
    # The round trip is exact up to the O(1/N) Euler error of the DDIM ODE,
    # known in closed form here.
    round_trip = k_inv * reference(num_timesteps, respacing, 'ddim')['K']
    assert abs(round_trip - 1.0) < tol, round_trip
    np.testing.assert_allclose(np.asarray(x_rec), round_trip * np.asarray(x0),
                               rtol=5e-4, atol=1e-6)
    err = float(jnp.max(jnp.abs(x_rec - x0)) / jnp.max(jnp.abs(x0)))
    assert err < tol, err


# ---------------------------------------------------------------------------
# Classifier guidance (Dhariwal & Nichol 2021, Alg. 1 and 2).
# ---------------------------------------------------------------------------


def _run(sampler, model_fn, sched, shape, rng, **kwargs):
    return jax.jit(functools.partial(sampler, model_fn, sched, shape, **kwargs))(rng)


@pytest.mark.parametrize('sampler,kwargs', [
    (samplers.ddpm_sample, {}), (samplers.ddim_sample, {'eta': 0.5})])
def test_guidance_zero_gradient_or_scale_is_identity(sampler, kwargs):
    sched = schedules.make_schedule('linear', 50, '10')
    model_fn = make_gaussian_eps_fn(50)
    shape, rng = (8, 4, 4, 1), _key(6)
    plain = _run(sampler, model_fn, sched, shape, rng, **kwargs)
    zero = _run(sampler, model_fn, sched, shape, rng, **kwargs,
                cond_fn=lambda x, t: jnp.zeros_like(x), classifier_scale=3.0)
    off = _run(sampler, model_fn, sched, shape, rng, **kwargs,
               cond_fn=lambda x, t: jnp.ones_like(x), classifier_scale=0.0)
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))
    np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))


@pytest.mark.parametrize('sampler,kind,kwargs', [
    (samplers.ddpm_sample, 'ddpm', {}),
    (samplers.ddim_sample, 'ddim', {'eta': 0.0}),
    (samplers.ddim_sample, 'ddim', {'eta': 1.0})])
def test_guidance_constant_gradient_shift(sampler, kind, kwargs):
    # Everything is linear, so with the same key guided - unguided = G * s * g,
    # G from the closed-form recursion of the mean / score shift.
    sched = schedules.make_schedule('linear', 100, '20')
    model_fn = make_gaussian_eps_fn(100)
    shape, rng, scale = (4, 4, 4, 1), _key(7), 2.0
    g = jnp.linspace(-0.3, 0.3, 16).reshape(1, 4, 4, 1)
    seen_t = []

    def cond_fn(x, t, y):
        seen_t.append(t.shape)
        return jnp.broadcast_to(g, x.shape) + 0.0 * y[:, None, None, None]

    common = dict(kwargs, clip_denoised=False, model_kwargs={'y': jnp.arange(4)})
    plain = _run(sampler, model_fn, sched, shape, rng, **common)
    guided = _run(sampler, model_fn, sched, shape, rng, **common,
                  cond_fn=cond_fn, classifier_scale=scale)
    ref = reference(100, '20', kind, eta=kwargs.get('eta', 0.0))
    assert ref['G'] > 0.1
    expected = np.broadcast_to(ref['G'] * scale * np.asarray(g), shape)
    np.testing.assert_allclose(np.asarray(guided - plain), expected, rtol=2e-3, atol=1e-5)
    assert seen_t == [(4,)]


# ---------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022).
# ---------------------------------------------------------------------------


def _make_conditional_model(calls, learned_var=False):
    base = make_gaussian_eps_fn(100)

    def model_fn(x, t, y, extra=None):
        calls.append((x.shape[0], t.shape[0], y.shape[0],
                      None if extra is None else extra.shape[0]))
        shift = 0.1 * (y.astype(jnp.float32) + 1.0).reshape(-1, 1, 1, 1)
        eps = base(x, t) + shift
        if learned_var:
            eps = jnp.concatenate([eps, jnp.broadcast_to(-shift, x.shape)], axis=-1)
        return eps

    return model_fn


@pytest.mark.parametrize('learned_var', [False, True])
def test_cfg_one_batched_call_and_combination(learned_var):
    calls = []
    model_fn = _make_conditional_model(calls, learned_var)
    null = 10
    x = _normal(8, (3, 4, 4, 2))
    t = jnp.array([5, 50, 99], jnp.int32)
    y = jnp.array([0, 3, 7], jnp.int32)
    extra = jnp.ones((3, 2))
    cond = np.asarray(model_fn(x, t, y=y), np.float64)
    uncond = np.asarray(model_fn(x, t, y=jnp.full_like(y, null)), np.float64)
    calls.clear()
    for scale, expected_mean in [(1.0, cond[..., :2]), (0.0, uncond[..., :2]),
                                 (3.0, uncond[..., :2] + 3.0 * (cond - uncond)[..., :2])]:
        out = samplers.make_cfg_model_fn(model_fn, scale, null)(x, t, y=y, extra=extra)
        assert calls == [(6, 6, 6, 6)]
        calls.clear()
        assert out.shape == cond.shape
        if scale in (0.0, 1.0):
            np.testing.assert_array_equal(np.asarray(out[..., :2]),
                                          expected_mean.astype(np.float32))
        np.testing.assert_allclose(np.asarray(out[..., :2]), expected_mean,
                                   rtol=1e-5, atol=1e-6)
        if learned_var:  # Variance channels from the conditional half.
            np.testing.assert_array_equal(np.asarray(out[..., 2:]),
                                          cond[..., 2:].astype(np.float32))


def test_cfg_inside_sampler():
    calls = []
    model_fn = _make_conditional_model(calls)
    sched = schedules.make_schedule('linear', 100, 'ddim10')
    shape, rng, y = (4, 4, 4, 1), _key(9), jnp.array([1, 2, 3, 4])
    cfg_fn = samplers.make_cfg_model_fn(model_fn, 1.0, null_label=10)
    guided = _run(samplers.ddim_sample, cfg_fn, sched, shape, rng,
                  clip_denoised=False, model_kwargs={'y': y})
    assert calls and all(c[:3] == (8, 8, 8) for c in calls), calls
    conditional = _run(samplers.ddim_sample, model_fn, sched, shape, rng,
                       clip_denoised=False, model_kwargs={'y': y})
    np.testing.assert_allclose(np.asarray(guided), np.asarray(conditional),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Compilation, vmap, determinism, intermediates.
# ---------------------------------------------------------------------------


def test_compiles_once_and_is_deterministic():
    sched = schedules.make_schedule('linear', 100, 'ddim10')
    base = make_gaussian_eps_fn(100)
    model_fn = chex.assert_max_traces(n=1)(lambda x, t: base(x, t))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sample(sched, rng):
        return samplers.ddpm_sample(model_fn, sched, (2, 4, 4, 1), rng)

    a = sample(sched, jax.random.key(10))
    b = sample(sched, jax.random.key(10))
    c = sample(sched, jax.random.key(11))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_vmap_over_keys_matches_single_calls():
    sched = schedules.make_schedule('linear', 100, 'ddim10')
    model_fn = make_gaussian_eps_fn(100)
    keys = jax.random.split(jax.random.key(12), 3)
    one = jax.jit(functools.partial(samplers.ddim_sample, model_fn, sched,
                                    (2, 4, 4, 1), eta=1.0))
    batched = jax.jit(jax.vmap(one))(keys)
    assert batched.shape == (3, 2, 4, 4, 1)
    for j in range(3):
        np.testing.assert_allclose(np.asarray(batched[j]), np.asarray(one(keys[j])),
                                   rtol=1e-5, atol=1e-6)


def test_intermediates_shapes_and_entries():
    sched = schedules.make_schedule('linear', 100, 'ddim10')
    model_fn = make_gaussian_eps_fn(100)
    shape = (3, 4, 4, 1)
    x_T = _normal(13, shape)
    x0, inter = samplers.ddim_sample(model_fn, sched, shape, None, x_T=x_T,
                                     clip_denoised=False, return_intermediates=True)
    assert inter['x_t'].shape == inter['pred_x0'].shape == (10,) + shape
    np.testing.assert_array_equal(np.asarray(inter['x_t'][0]), np.asarray(x_T))
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(inter['pred_x0'][-1]))
    gains = reference(100, 'ddim10', 'ddim')['A']
    # x_t entering step k is the product of the first k closed-form gains.
    for k in range(10):
        np.testing.assert_allclose(np.asarray(inter['x_t'][k]),
                                   np.prod(gains[:k]) * np.asarray(x_T),
                                   rtol=1e-4, atol=1e-6)
    x0_ddpm, inter = samplers.ddpm_sample(model_fn, sched, shape, _key(14),
                                          return_intermediates=True)
    assert inter['x_t'].shape == (10,) + shape
    np.testing.assert_allclose(np.asarray(x0_ddpm), np.asarray(inter['pred_x0'][-1]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('respacing', ['', 'ddim5', '3,2'])
def test_model_sees_original_timesteps(respacing):
    # A model predicting x0 = t / 1000 reveals the timestep of every call.
    sched = schedules.make_schedule('linear', 20, respacing)
    model_fn = lambda x, t: jnp.broadcast_to(  # noqa: E731
        t.astype(jnp.float32).reshape(-1, 1, 1, 1) / 1000.0, x.shape)
    _, inter = samplers.ddpm_sample(model_fn, sched, (2, 2, 2, 1), _key(15),
                                    mean_type='x0', return_intermediates=True)
    expected = np.array(schedules.space_timesteps(20, respacing))[::-1] / 1000.0
    np.testing.assert_allclose(np.asarray(inter['pred_x0'][:, 1, 0, 0, 0]), expected,
                               rtol=1e-6)


# ---------------------------------------------------------------------------
# dynamic_threshold and input validation.
# ---------------------------------------------------------------------------


def test_dynamic_threshold():
    small = jnp.linspace(-1.0, 1.0, 32).reshape(2, 4, 4, 1)
    np.testing.assert_array_equal(np.asarray(samplers.dynamic_threshold(small)),
                                  np.asarray(small))
    big = 3.0 * _normal(16, (2, 4, 4, 1))
    out = np.asarray(samplers.dynamic_threshold(big, percentile=0.9))
    flat = np.abs(np.asarray(big, np.float64).reshape(2, -1))
    s = np.maximum(np.quantile(flat, 0.9, axis=1), 1.0).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(out, np.clip(np.asarray(big), -s, s) / s, rtol=1e-5)
    assert np.abs(out).max() <= 1.0 + 1e-6
    # Works as a denoised_fn inside a sampler.
    sched = schedules.make_schedule('linear', 20, 'ddim5')
    _, inter = samplers.ddim_sample(lambda x, t: -5.0 * x, sched, (2, 4, 4, 1),
                                    _key(17), clip_denoised=False,
                                    denoised_fn=samplers.dynamic_threshold,
                                    return_intermediates=True)
    assert np.abs(np.asarray(inter['pred_x0'])).max() <= 1.0 + 1e-6


def test_bad_inputs_raise():
    sched = schedules.make_schedule('linear', 20, 'ddim5')
    model_fn = make_gaussian_eps_fn(20)
    shape, rng = (2, 4, 4, 1), _key(18)
    with pytest.raises(ValueError, match='mean_type'):
        samplers.ddpm_sample(model_fn, sched, shape, rng, mean_type='score')
    with pytest.raises(ValueError, match='var_type'):
        samplers.ddim_sample(model_fn, sched, shape, rng, var_type='big')
    with pytest.raises(ValueError, match='var_type'):
        samplers.ddim_invert(model_fn, sched, jnp.zeros(shape), var_type='big')
    with pytest.raises(ValueError, match='x_T'):
        samplers.ddpm_sample(model_fn, sched, shape, rng, x_T=jnp.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match='eta'):
        samplers.ddim_sample(model_fn, sched, shape, rng, eta=-0.1)
    with pytest.raises(ValueError, match='classifier_scale'):
        samplers.ddpm_sample(model_fn, sched, shape, rng, classifier_scale=-1.0,
                             cond_fn=lambda x, t: x)
    with pytest.raises(ValueError, match='guidance_scale'):
        samplers.make_cfg_model_fn(model_fn, -2.0, null_label=10)
    with pytest.raises(ValueError, match='cond_fn'):
        samplers.ddim_sample(model_fn, sched, shape, rng,
                             cond_fn=lambda x, t: x[..., :1, :])
    with pytest.raises(ValueError, match='channels'):  # Learned variance needs 2C.
        samplers.ddpm_sample(model_fn, sched, shape, rng, var_type='learned')
    with pytest.raises(ValueError, match='rng'):
        samplers.ddpm_sample(model_fn, sched, shape, None)
    with pytest.raises(ValueError, match='percentile'):
        samplers.dynamic_threshold(jnp.zeros(shape), percentile=1.5)
    with pytest.raises(ValueError, match="'y'"):
        samplers.make_cfg_model_fn(model_fn, 2.0, null_label=10)(
            jnp.zeros(shape), jnp.zeros((2,), jnp.int32))


def test_learned_variances_reduce_to_the_fixed_ones():
    """learned_range with v = -1 is the clipped posterior variance (fixed_small), and
    with v = +1 it is beta (Nichol & Dhariwal 2021, Eq. 15); 'learned' outputs the log
    variance itself. Same noise, so the samples must agree to float rounding."""
    sched = schedules.make_schedule('linear', 20, 'ddim5')  # Original steps 0, 4, ..., 16.
    eps_fn = make_gaussian_eps_fn(20)
    shape = (2, 4, 4, 1)

    def with_var(values):  # values[i] for the respaced step i = t // 4.
        table = jnp.asarray(values, jnp.float32)

        def model_fn(x, t, **unused):
            v = table[t // 4].reshape(-1, 1, 1, 1) * jnp.ones_like(x)
            return jnp.concatenate([eps_fn(x, t), v], axis=-1)
        return model_fn

    def run(model_fn, var_type):
        return np.asarray(samplers.ddpm_sample(model_fn, sched, shape, _key(19),
                                               var_type=var_type))

    fixed_small = run(eps_fn, 'fixed_small')
    np.testing.assert_allclose(run(with_var([-1.0] * 5), 'learned_range'), fixed_small,
                               atol=1e-5)
    np.testing.assert_allclose(
        run(with_var(np.asarray(sched.posterior_log_variance_clipped)), 'learned'),
        fixed_small, atol=1e-5)
    largest = run(with_var([1.0] * 5), 'learned_range')
    np.testing.assert_allclose(run(with_var(np.log(np.asarray(sched.betas))), 'learned'),
                               largest, atol=1e-5)
    assert np.abs(largest - fixed_small).max() > 1e-2  # The two variances differ.


# ---------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2).
# ---------------------------------------------------------------------------


def _logsnr_uniform_schedule(num_timesteps, num_steps):
    """Linear schedule respaced to the timesteps nearest a uniform lambda grid."""
    betas = schedules.get_beta_schedule('linear', num_timesteps)
    abar = np.cumprod(1.0 - betas)
    lam = 0.5 * np.log(abar / (1.0 - abar))
    grid = np.linspace(lam[-1], lam[0], num_steps)
    steps = sorted({int(np.argmin(np.abs(lam - g))) for g in grid})
    new_betas, timesteps = schedules.respace_betas(betas, steps)
    return schedules.create_schedule(new_betas, timesteps), np.array(steps)


def reference_dpm_solver_gain(abar_steps, s=S, lower_order_final=True):
    """Gain K (x_0 = K x_T) of DPM-Solver++(2M) with the optimal model, float64."""
    abar_prev = np.append(1.0, abar_steps[:-1])
    lam = lambda a: 0.5 * np.log(a / (1.0 - a))  # noqa: E731
    gain, x0_last, h_last = 1.0, None, None
    for k, i in enumerate(range(len(abar_steps) - 1, -1, -1)):
        a, ap = abar_steps[i], abar_prev[i]
        x0 = np.sqrt(a) * s**2 / (a * s**2 + 1.0 - a) * gain
        if ap == 1.0:
            return x0
        h = lam(ap) - lam(a)
        first_order = k == 0 or (lower_order_final and i == 1)
        d = x0 if first_order else (1 + h / (2 * h_last)) * x0 - h / (2 * h_last) * x0_last
        gain = np.sqrt((1.0 - ap) / (1.0 - a)) * gain - np.sqrt(ap) * np.expm1(-h) * d
        x0_last, h_last = x0, h
    raise AssertionError('unreachable')


@pytest.mark.parametrize('spacing,lower_order_final', [
    ('lambda', False), ('lambda', True), ('ddim20', True)])
def test_dpm_solver_matches_probability_flow_map(spacing, lower_order_final):
    # For N(0, s^2) data the probability-flow ODE maps x_T to
    # x_T * s / sqrt(abar_T s^2 + 1 - abar_T) exactly.
    if spacing == 'lambda':
        sched, steps = _logsnr_uniform_schedule(1000, 20)
    else:
        sched = schedules.make_schedule('linear', 1000, spacing)
        steps = np.asarray(sched.timesteps)
    assert len(steps) == 20
    model_fn = make_gaussian_eps_fn(1000)
    shape = (8, 4, 4, 1)
    x_T = _normal(20, shape)
    abar = _abar_orig(1000)[steps]
    exact = np.asarray(x_T, np.float64) * S / np.sqrt(abar[-1] * S**2 + 1.0 - abar[-1])
    run = lambda f, **kw: np.asarray(jax.jit(functools.partial(  # noqa: E731
        f, model_fn, sched, shape, None, clip_denoised=False, **kw))(x_T=x_T))
    dpm = run(samplers.dpm_solver_sample, lower_order_final=lower_order_final)
    ddim = run(samplers.ddim_sample)
    # The float64 recursion of the solver itself (Alg. 2) is matched closely.
    np.testing.assert_allclose(
        dpm, reference_dpm_solver_gain(abar, lower_order_final=lower_order_final)
        * np.asarray(x_T), rtol=1e-4, atol=1e-6)
    scale = np.abs(exact).max()
    err_dpm = np.abs(dpm - exact).max() / scale
    err_ddim = np.abs(ddim - exact).max() / scale
    # Measured with 20 steps (DPM-Solver++(2M) vs DDIM): lambda-uniform 0.0146 vs
    # 0.120 (0.0144 with a first-order last step); 'ddim20' 0.040 vs 0.133 (0.227
    # without it: the long last step overshoots).
    assert err_dpm * 3.0 < err_ddim, (err_dpm, err_ddim)
    assert err_dpm < (0.02 if spacing == 'lambda' else 0.05), err_dpm


def test_dpm_solver_two_steps_equal_ddim():
    # With two steps the solver is: one first-order (= DDIM, eta = 0) step,
    # then x_0 = pred_x0, exactly what DDIM does.
    sched = schedules.make_schedule('linear', 100, 'ddim2')
    model_fn = make_gaussian_eps_fn(100)
    shape = (4, 4, 4, 1)
    x_T = _normal(21, shape)
    dpm = samplers.dpm_solver_sample(model_fn, sched, shape, None, x_T=x_T)
    ddim = samplers.ddim_sample(model_fn, sched, shape, None, x_T=x_T)
    np.testing.assert_allclose(np.asarray(dpm), np.asarray(ddim), rtol=1e-5, atol=1e-6)


def test_dpm_solver_jit_determinism_and_intermediates():
    sched = schedules.make_schedule('linear', 100, 'ddim10')
    base = make_gaussian_eps_fn(100, num_channels_out=2)  # Learned-variance head.
    model_fn = chex.assert_max_traces(n=1)(lambda x, t: base(x, t))
    shape = (2, 4, 4, 1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sample(sched, rng):
        return samplers.dpm_solver_sample(model_fn, sched, shape, rng,
                                          var_type='learned_range',
                                          return_intermediates=True)

    x0, inter = sample(sched, jax.random.key(22))
    x0_b, _ = sample(sched, jax.random.key(22))
    x0_c, _ = sample(sched, jax.random.key(23))
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(x0_b))
    assert not np.allclose(np.asarray(x0), np.asarray(x0_c))
    assert inter['x_t'].shape == inter['pred_x0'].shape == (10,) + shape
    np.testing.assert_array_equal(np.asarray(x0), np.asarray(inter['pred_x0'][-1]))
    assert np.all(np.isfinite(np.asarray(inter['x_t'])))
    assert np.abs(np.asarray(x0)).max() <= 1.0  # clip_denoised by default.


def test_dpm_solver_guidance_and_bad_inputs():
    sched = schedules.make_schedule('linear', 50, '10')
    model_fn = make_gaussian_eps_fn(50)
    shape, rng = (4, 4, 4, 1), _key(24)
    plain = _run(samplers.dpm_solver_sample, model_fn, sched, shape, rng)
    zero = _run(samplers.dpm_solver_sample, model_fn, sched, shape, rng,
                cond_fn=lambda x, t: jnp.zeros_like(x), classifier_scale=3.0)
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(plain))
    pushed = _run(samplers.dpm_solver_sample, model_fn, sched, shape, rng,
                  clip_denoised=False, cond_fn=lambda x, t: jnp.ones_like(x))
    assert float(jnp.mean(pushed - plain)) > 0.1  # Moves towards the gradient.
    with pytest.raises(ValueError, match='mean_type'):
        samplers.dpm_solver_sample(model_fn, sched, shape, rng, mean_type='score')
    with pytest.raises(ValueError, match='x_T'):
        samplers.dpm_solver_sample(model_fn, sched, shape, rng, x_T=jnp.zeros((4, 4, 4, 3)))
    with pytest.raises(ValueError, match='rng'):
        samplers.dpm_solver_sample(model_fn, sched, shape, None)
    with pytest.raises(ValueError, match='classifier_scale'):
        samplers.dpm_solver_sample(model_fn, sched, shape, rng, classifier_scale=-1.0,
                                   cond_fn=lambda x, t: x)
    with pytest.raises(ValueError, match='channels'):
        samplers.dpm_solver_sample(model_fn, sched, shape, rng, var_type='learned')


class _LinearClassifier(nn.Module):
    """logits = flatten(x) @ W: its log-softmax gradient has a closed form."""
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, t, train=False):
        del t, train
        return nn.Dense(self.num_classes, use_bias=False,
                        kernel_init=nn.initializers.normal(0.5))(x.reshape(x.shape[0], -1))


def test_classifier_cond_fn_matches_closed_form():
    classifier = _LinearClassifier()
    x = jax.random.normal(jax.random.key(0), (5, 2, 2, 1))
    params = classifier.init(jax.random.key(1), x, jnp.zeros(5, jnp.int32))['params']
    y = np.array([0, 1, 2, 1, 0], np.int32)
    logits_fn = lambda x_in, t: classifier.apply({'params': params}, x_in, t)  # noqa: E731
    grad = samplers.make_classifier_grad_fn(logits_fn)(
        x, jnp.zeros(5, jnp.int32), y=jnp.asarray(y))
    # d/dx log softmax(x W)[y] = W[:, y] - sum_k softmax_k W[:, k].
    w = np.asarray(params['Dense_0']['kernel'], np.float64)  # [4, 3]
    xf = np.asarray(x, np.float64).reshape(5, -1)
    logits = xf @ w
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected = w[:, y].T - probs @ w.T
    np.testing.assert_allclose(np.asarray(grad).reshape(5, -1), expected, rtol=1e-5,
                               atol=1e-6)
