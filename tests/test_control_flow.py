"""control_flow: the same values and gradients as lax.cond / lax.scan, and on the CPU
no conditional or loop left around them (where XLA:CPU's convolution gradients are slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import control_flow

DN = ('NHWC', 'HWIO', 'NHWC')


def _net(w, x):
    return jnp.sum(jnp.tanh(jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                         dimension_numbers=DN)) ** 2)


def _inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32),
            jnp.asarray(rng.standard_normal((2, 5, 5, 2)), jnp.float32))


def _optimized_hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize('taken', [True, False])
def test_cond_equals_lax_cond_with_gradients(taken):
    w, x = _inputs()

    def loss(cond_fn, w, pred):
        return cond_fn(pred, lambda w: _net(w, x), lambda w: 0.5 * jnp.sum(w), w)

    pred = jnp.asarray(taken)
    for fn in (loss, jax.grad(loss, argnums=1)):
        ours = jax.jit(fn, static_argnums=0)(control_flow.cond, w, pred)
        ref = jax.jit(fn, static_argnums=0)(jax.lax.cond, w, pred)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)
    if not taken:  # The conv branch adds exactly nothing through the select's gradient.
        np.testing.assert_array_equal(np.asarray(ours), np.full(w.shape, 0.5, np.float32))


def test_cond_on_cpu_leaves_no_conditional():
    w, x = _inputs()

    def grad_of(cond_fn):
        return jax.grad(lambda w, pred: cond_fn(pred, lambda w: _net(w, x),
                                                lambda w: jnp.sum(w), w))

    pred = jnp.asarray(True)  # An argument: a constant predicate would be folded away.
    assert jax.default_backend() == 'cpu'
    assert 'conditional(' in _optimized_hlo(grad_of(jax.lax.cond), w, pred)  # What we avoid.
    assert 'conditional(' not in _optimized_hlo(grad_of(control_flow.cond), w, pred)


def test_scan_equals_lax_scan_with_gradients():
    w, x = _inputs()
    xs = jnp.stack([x, 2.0 * x, -x])

    def run(scan_fn, w):
        def body(carry, xi):
            value = _net(w, xi)
            return carry + value, value * jnp.ones((2,))
        total, per_step = scan_fn(body, jnp.zeros(()), xs)
        return total + jnp.sum(per_step ** 2)

    for fn in (run, jax.grad(run, argnums=1)):
        ours = jax.jit(fn, static_argnums=0)(control_flow.scan, w)
        ref = jax.jit(fn, static_argnums=0)(jax.lax.scan, w)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
    grad_hlo = _optimized_hlo(jax.grad(lambda w: run(control_flow.scan, w)), w)
    assert 'while(' not in grad_hlo
    assert 'while(' in _optimized_hlo(jax.grad(lambda w: run(jax.lax.scan, w)), w)
