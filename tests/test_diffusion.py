"""Tests for ddpm_jax.diffusion against float64 NumPy closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import schedules

T = 50
SHAPE = (4, 4, 4, 2)
IDX = np.array([0, 1, 25, 49])


def _np_sched():
    betas = schedules.get_beta_schedule('cosine', T)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    pvar = betas * (1 - abar_prev) / (1 - abar)
    return betas, alphas, abar, abar_prev, pvar


def _col(a):
    return a[IDX][:, None, None, None]


@pytest.fixture(scope='module')
def setup():
    sched = schedules.make_schedule('cosine', T)
    rng = np.random.RandomState(0)
    x0 = rng.uniform(-1, 1, SHAPE)
    noise = rng.normal(size=SHAPE)
    return sched, x0, noise


def _f32(a):
    return jnp.asarray(a, jnp.float32)


def test_q_sample_and_q_mean_variance(setup):
    sched, x0, noise = setup
    _, _, abar, _, _ = _np_sched()
    expected = np.sqrt(_col(abar)) * x0 + np.sqrt(1 - _col(abar)) * noise
    x_t = diffusion.q_sample(sched, _f32(x0), IDX, _f32(noise))
    np.testing.assert_allclose(x_t, expected, rtol=1e-5, atol=1e-5)
    mean, var, logvar = diffusion.q_mean_variance(sched, _f32(x0), IDX)
    np.testing.assert_allclose(mean, np.sqrt(_col(abar)) * x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, 1 - _col(abar), rtol=1e-5)
    np.testing.assert_allclose(logvar, np.log(1 - _col(abar)), rtol=1e-5, atol=1e-5)


def test_posterior_matches_bayes_rule(setup):
    # Independent derivation: q(x_{t-1}|x0) = N(sqrt(abar_prev) x0, 1 - abar_prev) times
    # the likelihood q(x_t|x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta); product of Gaussians.
    sched, x0, noise = setup
    betas, alphas, abar, abar_prev, _ = _np_sched()
    x_t = np.sqrt(_col(abar)) * x0 + np.sqrt(1 - _col(abar)) * noise
    b, a, ap = _col(betas), _col(alphas), _col(abar_prev)
    with np.errstate(divide='ignore', invalid='ignore'):
        precision = 1 / (1 - ap) + a / b
        var = 1 / precision
        mean = var * (np.sqrt(ap) * x0 / (1 - ap) + np.sqrt(a) * x_t / b)
    # At t = 0 the posterior is a point mass at x0 (abar_prev = 1).
    mean[0] = x0[0]
    var[0] = 0.0
    got_mean, got_var, got_logvar = diffusion.q_posterior_mean_variance(
        sched, _f32(x0), _f32(x_t), IDX)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_var.reshape(-1), var.reshape(4, -1)[:, 0], rtol=1e-4,
                               atol=1e-9)
    pvar = _np_sched()[4]
    np.testing.assert_allclose(got_logvar.reshape(-1),
                               np.log(np.where(IDX == 0, pvar[1], pvar[IDX])), rtol=1e-4)


def test_parameterisation_round_trips(setup):
    sched, x0, noise = setup
    _, _, abar, _, _ = _np_sched()
    x0j, nj = _f32(x0), _f32(noise)
    x_t = diffusion.q_sample(sched, x0j, IDX, nj)
    # Skip t=0 for eps: there 1/sqrt(1/abar - 1) amplifies float32 rounding most.
    np.testing.assert_allclose(diffusion.predict_eps_from_x0(sched, x_t, IDX, x0j)[1:],
                               noise[1:], atol=2e-3)
    np.testing.assert_allclose(diffusion.predict_x0_from_eps(sched, x_t, IDX, nj), x0,
                               atol=2e-4)
    v = diffusion.get_v(sched, x0j, IDX, nj)
    np.testing.assert_allclose(
        v, np.sqrt(_col(abar)) * noise - np.sqrt(1 - _col(abar)) * x0, atol=1e-5)
    np.testing.assert_allclose(diffusion.predict_x0_from_v(sched, x_t, IDX, v), x0,
                               atol=1e-5)
    xprev, _, _ = diffusion.q_posterior_mean_variance(sched, x0j, x_t, IDX)
    np.testing.assert_allclose(diffusion.predict_x0_from_xprev(sched, x_t, IDX, xprev), x0,
                               atol=2e-4)


def _true_output(mean_type, sched, x0, x_t, noise):
    if mean_type == 'eps':
        return noise
    if mean_type == 'x0':
        return x0
    if mean_type == 'v':
        return diffusion.get_v(sched, x0, IDX, noise)
    return diffusion.q_posterior_mean_variance(sched, x0, x_t, IDX)[0]


@pytest.mark.parametrize('mean_type', diffusion.MEAN_TYPES)
@pytest.mark.parametrize('var_type', diffusion.VAR_TYPES)
def test_p_mean_variance_with_true_target_recovers_posterior(setup, mean_type, var_type):
    sched, x0, noise = setup
    betas, _, _, _, pvar = _np_sched()
    x0j, nj = _f32(x0), _f32(noise)
    x_t = diffusion.q_sample(sched, x0j, IDX, nj)
    out = _true_output(mean_type, sched, x0j, x_t, nj)
    learned_value = 0.3
    if var_type in ('learned', 'learned_range'):
        out = jnp.concatenate([out, jnp.full(SHAPE, learned_value)], axis=-1)
    res = jax.jit(lambda o, x: diffusion.p_mean_variance(
        sched, o, x, IDX, mean_type=mean_type, var_type=var_type,
        clip_denoised=False))(out, x_t)
    assert set(res) == {'mean', 'variance', 'log_variance', 'pred_x0', 'eps'}
    post_mean, _, _ = diffusion.q_posterior_mean_variance(sched, x0j, x_t, IDX)
    np.testing.assert_allclose(res['mean'], post_mean, atol=2e-5)
    np.testing.assert_allclose(res['pred_x0'], x0, atol=5e-4)
    np.testing.assert_allclose(res['eps'][1:], noise[1:], atol=2e-3)
    for key in ('variance', 'log_variance'):
        assert res[key].shape == SHAPE
    clipped_log = np.log(np.concatenate([[pvar[1]], pvar[1:]]))
    if var_type == 'fixed_small':
        expected = clipped_log[IDX]
    elif var_type == 'fixed_large':
        expected = np.log(np.concatenate([[pvar[1]], betas[1:]]))[IDX]
    elif var_type == 'learned':
        expected = np.full(4, learned_value)
    else:
        frac = (learned_value + 1) / 2
        expected = frac * np.log(betas[IDX]) + (1 - frac) * clipped_log[IDX]
    np.testing.assert_allclose(res['log_variance'][:, 0, 0, 0], expected, rtol=1e-5,
                               atol=1e-6)
    if var_type == 'fixed_small':  # The variance itself is unclipped: 0 at t=0.
        np.testing.assert_allclose(res['variance'][:, 0, 0, 0], pvar[IDX], rtol=1e-5)
    else:
        np.testing.assert_allclose(res['variance'], np.exp(res['log_variance']), rtol=1e-5)


def test_learned_range_endpoints_equal_fixed_log_variances(setup):
    sched, x0, _ = setup
    x_t = _f32(x0)
    eps = jnp.zeros(SHAPE)

    def log_var(var_type, v=None):
        out = eps if v is None else jnp.concatenate([eps, jnp.full(SHAPE, v)], -1)
        return diffusion.p_mean_variance(sched, out, x_t, IDX, var_type=var_type)[
            'log_variance']

    np.testing.assert_allclose(log_var('learned_range', -1.0), log_var('fixed_small'),
                               rtol=1e-6)
    # v = +1 gives log beta_t, which is fixed_large everywhere except t=0.
    np.testing.assert_allclose(log_var('learned_range', 1.0)[1:], log_var('fixed_large')[1:],
                               rtol=1e-6)


def test_clipping_and_denoised_fn(setup):
    sched, _, _ = setup
    x_t = jnp.full(SHAPE, 0.5)
    x0_big = jnp.full(SHAPE, 3.0)
    scale = lambda x: 0.2 * x  # noqa: E731
    for clip, fn, expected in ((True, None, 1.0), (False, None, 3.0), (True, scale, 0.6),
                               (False, scale, 0.6)):
        res = diffusion.p_mean_variance(sched, x0_big, x_t, IDX, mean_type='x0',
                                        clip_denoised=clip, denoised_fn=fn)
        np.testing.assert_allclose(res['pred_x0'], expected, rtol=1e-6)
        post, _, _ = diffusion.q_posterior_mean_variance(sched, jnp.full(SHAPE, expected),
                                                         x_t, IDX)
        np.testing.assert_allclose(res['mean'], post, rtol=1e-5)
    # denoised_fn runs before clipping: 10 * 3 clipped to 1.
    res = diffusion.p_mean_variance(sched, x0_big, x_t, IDX, mean_type='x0',
                                    denoised_fn=lambda x: 10 * x)
    np.testing.assert_allclose(res['pred_x0'], 1.0)


def test_xprev_mean_is_model_output(setup):
    sched, x0, _ = setup
    out = _f32(x0) * 5.0
    res = diffusion.p_mean_variance(sched, out, jnp.zeros(SHAPE), IDX, mean_type='xprev')
    np.testing.assert_array_equal(res['mean'], out)
    assert float(jnp.max(jnp.abs(res['pred_x0']))) <= 1.0


def test_extract_shapes():
    arr = jnp.arange(5.0)
    assert diffusion.extract(arr, jnp.array([1, 3]), 4).shape == (2, 1, 1, 1)
    np.testing.assert_array_equal(diffusion.extract(arr, jnp.array([1, 3]), 2), [[1.], [3.]])
    assert diffusion.extract(arr, 2, 3).shape == (1, 1, 1)


def test_jit_vmap_grad(setup):
    sched, x0, noise = setup
    x0j, nj = _f32(x0), _f32(noise)

    def per_example(x, i, n):  # Unbatched [H, W, C] with a scalar step index.
        return diffusion.q_sample(sched, x, i, n)

    batched = jax.jit(jax.vmap(per_example))(x0j, jnp.asarray(IDX), nj)
    np.testing.assert_allclose(batched, diffusion.q_sample(sched, x0j, IDX, nj), rtol=1e-6)

    def loss(out):
        res = diffusion.p_mean_variance(sched, out, x0j, IDX, var_type='learned_range')
        return jnp.sum(res['mean'] ** 2) + jnp.sum(res['log_variance'])

    out = jnp.concatenate([nj, jnp.zeros(SHAPE)], -1)
    grad = jax.jit(jax.grad(loss))(out)
    assert grad.shape == out.shape
    assert bool(jnp.all(jnp.isfinite(grad)))
    # d/dv of log_var = (log beta - clipped log posterior var) / 2 for each element.
    betas, _, _, _, pvar = _np_sched()
    clipped = np.log(np.concatenate([[pvar[1]], pvar[1:]]))
    np.testing.assert_allclose(grad[..., 2:], np.broadcast_to(
        _col((np.log(betas) - clipped) / 2), SHAPE), rtol=1e-5, atol=1e-6)


def test_bad_input_raises(setup):
    sched, x0, noise = setup
    x = _f32(x0)
    with pytest.raises(ValueError, match='mean_type'):
        diffusion.p_mean_variance(sched, x, x, IDX, mean_type='epsilon')
    with pytest.raises(ValueError, match='var_type'):
        diffusion.p_mean_variance(sched, x, x, IDX, var_type='fixed')
    with pytest.raises(ValueError, match='2C'):
        diffusion.p_mean_variance(sched, x, x, IDX, var_type='learned_range')
    with pytest.raises(ValueError, match='learned'):
        diffusion.p_mean_variance(sched, jnp.concatenate([x, x], -1), x, IDX)
    with pytest.raises(ValueError, match='noise'):
        diffusion.q_sample(sched, x, IDX, x[..., :1])
    with pytest.raises(ValueError, match='shape'):
        diffusion.q_posterior_mean_variance(sched, x, x[:2], IDX)
    with pytest.raises(ValueError, match='valid'):
        diffusion.validate_types('eps', 'learnt')
