"""Tests for ddpm_jax.losses: the training objectives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import likelihood
from ddpm_jax import losses
from ddpm_jax import schedules

T = 20
SHAPE = (4, 4, 4, 1)
IDX = jnp.array([0, 3, 10, 19])


@pytest.fixture(scope='module')
def data():
    rng = np.random.RandomState(0)
    x0 = np.round(rng.uniform(-1, 1, SHAPE) * 127.5) / 127.5
    noise = rng.normal(size=SHAPE)
    return schedules.make_schedule('linear', T), x0, noise


def _np_targets(x0, noise):
    betas = schedules.get_beta_schedule('linear', T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    a = abar[IDX][:, None, None, None]
    ap = abar_prev[IDX][:, None, None, None]
    b = betas[IDX][:, None, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    xprev = (b * np.sqrt(ap) * x0 + (1 - ap) * np.sqrt(1 - b) * x_t) / (1 - a)
    return {'eps': noise, 'x0': x0, 'v': np.sqrt(a) * noise - np.sqrt(1 - a) * x0,
            'xprev': xprev}


@pytest.mark.parametrize('mean_type', diffusion.MEAN_TYPES)
def test_mse_of_perfect_predictor_is_zero(data, mean_type):
    sched, x0, noise = data
    target = jnp.asarray(_np_targets(x0, noise)[mean_type], jnp.float32)
    out = losses.training_losses(lambda x, t: target, sched, jnp.asarray(x0, jnp.float32),
                                 IDX, jnp.asarray(noise, jnp.float32), mean_type=mean_type)
    assert set(out) == {'loss', 'mse'}
    np.testing.assert_allclose(out['loss'], 0.0, atol=1e-10)
    # A zero predictor pays the mean squared target.
    zero = losses.training_losses(lambda x, t: jnp.zeros_like(x), sched,
                                  jnp.asarray(x0, jnp.float32), IDX,
                                  jnp.asarray(noise, jnp.float32), mean_type=mean_type)
    expected = (np.asarray(target, np.float64) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(zero['mse'], expected, rtol=1e-5)


def test_model_gets_original_timesteps(data):
    _, x0, noise = data
    sched = schedules.make_schedule('linear', 100, 'ddim20')  # Steps 0, 5, ..., 95.
    seen = {}

    def model_fn(x, t, label):
        seen['t'], seen['label'] = t, label
        return jnp.zeros_like(x)

    losses.training_losses(model_fn, sched, jnp.asarray(x0, jnp.float32), IDX,
                           jnp.asarray(noise, jnp.float32), model_kwargs={'label': 7})
    np.testing.assert_array_equal(seen['t'], np.asarray(IDX) * 5)
    assert seen['label'] == 7


def _learned_inputs(data):
    sched, x0, noise = data
    rng = np.random.RandomState(1)
    mean_out = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    var_out = jnp.asarray(rng.uniform(-1, 1, SHAPE), jnp.float32)
    return sched, jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32), mean_out, var_out


def test_hybrid_loss_stops_mean_gradient_through_vb(data):
    sched, x0, noise, mean_out, var_out = _learned_inputs(data)

    def total(mean_out, var_out, loss_type):
        model = lambda x, t: jnp.concatenate([mean_out, var_out], -1)  # noqa: E731
        out = losses.training_losses(model, sched, x0, IDX, noise,
                                     var_type='learned_range', loss_type=loss_type)
        return jnp.sum(out['loss']), out

    (_, out), (g_mean, g_var) = jax.jit(
        jax.value_and_grad(total, argnums=(0, 1), has_aux=True), static_argnums=2)(
            mean_out, var_out, 'mse')
    # d/dm of sum_b mean_flat((m - eps)^2) = 2 (m - eps) / (H W C).
    n_el = np.prod(SHAPE[1:])
    np.testing.assert_allclose(g_mean, 2 * (np.asarray(mean_out) - np.asarray(noise)) / n_el,
                               rtol=1e-5, atol=1e-8)
    assert float(jnp.max(jnp.abs(g_var))) > 0
    np.testing.assert_allclose(out['loss'], out['mse'] + out['vb'], rtol=1e-6)
    # Without the stop-gradient the VB term does depend on the mean: the test can fail.
    x_t = diffusion.q_sample(sched, x0, IDX, noise)
    vb_grad = jax.jit(jax.grad(lambda m: jnp.sum(likelihood.vb_terms_bpd(
        sched, jnp.concatenate([m, var_out], -1), x0, x_t, IDX, mean_type='eps',
        var_type='learned_range', clip_denoised=False)['output'])))(mean_out)
    assert float(jnp.max(jnp.abs(vb_grad))) > 1e-4
    # rescaled_mse scales vb by N / 1000.
    _, rescaled = jax.jit(total, static_argnums=2)(mean_out, var_out, 'rescaled_mse')
    np.testing.assert_allclose(rescaled['vb'], out['vb'] * T / 1000, rtol=1e-6)
    np.testing.assert_allclose(rescaled['mse'], out['mse'], rtol=1e-6)


def test_kl_losses_are_vb_terms(data):
    sched, x0, noise, mean_out, var_out = _learned_inputs(data)
    output = jnp.concatenate([mean_out, var_out], -1)
    x_t = diffusion.q_sample(sched, x0, IDX, noise)
    vb = likelihood.vb_terms_bpd(sched, output, x0, x_t, IDX, mean_type='eps',
                                 var_type='learned', clip_denoised=False)['output']
    for loss_type, factor in (('kl', 1.0), ('rescaled_kl', T)):
        out = losses.training_losses(lambda x, t: output, sched, x0, IDX, noise,
                                     var_type='learned', loss_type=loss_type)
        assert set(out) == {'loss', 'vb'}
        np.testing.assert_allclose(out['loss'], vb * factor, rtol=1e-6)
        assert bool(jnp.all(out['loss'] >= 0))


def test_jit_grad_vmap(data):
    sched, x0, noise, _, _ = _learned_inputs(data)

    def model(params, x, t):
        return params['w'] * x + params['b'] * t[:, None, None, None] / T

    def loss_fn(params, x0, i, noise):
        out = losses.training_losses(lambda x, t: model(params, x, t), sched, x0, i, noise,
                                     mean_type='v')
        return jnp.mean(out['loss'])

    params = {'w': jnp.float32(0.5), 'b': jnp.float32(0.1)}
    grads = jax.jit(jax.grad(loss_fn))(params, x0, IDX, noise)
    # Finite differences in float64 NumPy-free form: compare with a central difference.
    h = 1e-2
    fd = (loss_fn({**params, 'w': params['w'] + h}, x0, IDX, noise)
          - loss_fn({**params, 'w': params['w'] - h}, x0, IDX, noise)) / (2 * h)
    np.testing.assert_allclose(grads['w'], fd, rtol=1e-3)
    per_group = jax.vmap(loss_fn, in_axes=(None, 0, 0, 0))(
        params, x0.reshape(2, 2, *SHAPE[1:]), IDX.reshape(2, 2),
        noise.reshape(2, 2, *SHAPE[1:]))
    np.testing.assert_allclose(per_group.mean(), loss_fn(params, x0, IDX, noise), rtol=1e-5)


def test_bad_input_raises(data):
    sched, x0, noise, _, _ = _learned_inputs(data)
    ident = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match='loss_type'):
        losses.training_losses(ident, sched, x0, IDX, noise, loss_type='l2')
    with pytest.raises(ValueError, match='mean_type'):
        losses.training_losses(ident, sched, x0, IDX, noise, mean_type='score')
    with pytest.raises(ValueError, match='2C'):
        losses.training_losses(ident, sched, x0, IDX, noise, var_type='learned')
    with pytest.raises(ValueError, match='learned'):
        losses.training_losses(lambda x, t: jnp.concatenate([x, x], -1), sched, x0, IDX,
                               noise)
    with pytest.raises(ValueError, match='noise'):
        losses.training_losses(ident, sched, x0, IDX, noise[:2])
