"""Tests for state.apply_optimizer and the guarded EMA: clipped Adam(W) in float64
closed form, equality with optax's chain, steps refused where not `ok`, and the
update running in place on donated buffers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddpm_jax import data as data_lib, state as state_lib, tasks, train
from configs import default


def _optim(**overrides):
    optim = default.get_config().optim
    optim.update(overrides)
    return optim


def _params(rng):
    return {'w': rng.standard_normal((4, 3)).astype(np.float32),
            'sub': {'b': rng.standard_normal(5).astype(np.float32)}}


def _grads(rng, scale):
    return jax.tree.map(lambda p: (scale * rng.standard_normal(p.shape)).astype(np.float32),
                        _params(rng))


def _numpy_adam(optim, lr_fn, params, grad_steps):
    """Clip by global norm, then Adam(W), in float64 NumPy (the papers' formulas)."""
    p = jax.tree.map(np.float64, params)
    m = jax.tree.map(np.zeros_like, p)
    v = jax.tree.map(np.zeros_like, p)
    max_norm = optim.grad_clip_norm or np.inf
    wd = optim.weight_decay if optim.optimizer == 'adamw' else 0.0
    for t, grads in enumerate(grad_steps, start=1):
        g = jax.tree.map(np.float64, grads)
        norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))
        g = jax.tree.map(lambda x: x * min(1.0, max_norm / norm), g)
        m = jax.tree.map(lambda m_, g_: optim.b1 * m_ + (1 - optim.b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: optim.b2 * v_ + (1 - optim.b2) * g_**2, v, g)
        lr = float(lr_fn(t - 1))
        if optim.eps_before_bias_correction:  # tf.train.AdamOptimizer's update, as written.
            lr_t = lr * np.sqrt(1 - optim.b2**t) / (1 - optim.b1**t)
            p = jax.tree.map(lambda p_, m_, v_: p_ - lr_t * m_ / (np.sqrt(v_) + optim.eps),
                             p, m, v)
            continue
        p = jax.tree.map(
            lambda p_, m_, v_: p_ - lr * ((m_ / (1 - optim.b1**t))
                                          / (np.sqrt(v_ / (1 - optim.b2**t)) + optim.eps)
                                          + wd * p_), p, m, v)
    return p, m, v


@pytest.mark.parametrize('overrides', [
    dict(),  # Adam, clipping at 1 (the grads below are clipped on some steps only).
    dict(optimizer='adamw', weight_decay=0.1, warmup_steps=3, lr_schedule='cosine'),
    dict(grad_clip_norm=0.0, lr_schedule='linear', eps=1e-3),  # No clipping.
    dict(eps_before_bias_correction=True, eps=1e-3, warmup_steps=2),  # DDPM's TF Adam.
])
def test_apply_optimizer_is_clipped_adam(overrides):
    optim = _optim(learning_rate=1e-2, **overrides)
    optimizer = state_lib.create_optimizer(optim, num_train_steps=10)
    rng = np.random.default_rng(0)
    params = _params(rng)
    grad_steps = [_grads(rng, scale) for scale in (0.05, 3.0, 0.2, 10.0, 0.01, 1.0)]
    fused = jax.jit(lambda g, s, p: state_lib.apply_optimizer(optimizer, g, s, p, jnp.array(True)))

    def plain(g, s, p):
        updates, s = optimizer.tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    plain = jax.jit(plain)
    p_fused = p_plain = params
    s_fused = s_plain = optimizer.tx.init(params)
    for grads in grad_steps:
        p_fused, s_fused = fused(grads, s_fused, p_fused)
        p_plain, s_plain = plain(grads, s_plain, p_plain)
    # Same state structure as optax's (checkpoints restore either way), same numbers.
    chex.assert_trees_all_equal_structs(s_fused, s_plain)
    chex.assert_trees_all_close(p_fused, p_plain, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(s_fused, s_plain, rtol=1e-6, atol=1e-9)
    adam = s_fused[1][0]
    assert int(adam.count) == len(grad_steps) == int(s_fused[1][-1].count)
    # And the float64 closed form.
    p64, m64, v64 = _numpy_adam(optim, optimizer.learning_rate_fn, params, grad_steps)
    chex.assert_trees_all_close(jax.tree.map(np.float64, p_fused), p64, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(jax.tree.map(np.float64, adam.mu), m64, rtol=1e-5, atol=1e-9)
    chex.assert_trees_all_close(jax.tree.map(np.float64, adam.nu), v64, rtol=1e-5, atol=1e-12)
    assert np.abs(p_fused['w'] - params['w']).max() > 1e-3  # The steps did move the parameters.


def test_apply_optimizer_refuses_a_step_where_not_ok():
    optimizer = state_lib.create_optimizer(_optim(), num_train_steps=10)
    rng = np.random.default_rng(1)
    params = _params(rng)
    state = optimizer.tx.init(params)
    params, state = state_lib.apply_optimizer(optimizer, _grads(rng, 1.0), state, params,
                                              jnp.array(True))
    grads = _grads(rng, 1.0)
    grads['w'][1, 2] = np.nan
    for ok in (jnp.array(False), jnp.isfinite(optax.global_norm(grads))):
        new_params, new_state = jax.jit(state_lib.apply_optimizer, static_argnums=0)(
            optimizer, grads, state, params, ok)
        chex.assert_trees_all_equal((new_params, new_state), (params, state))
    # The generic path (any optax transformation) refuses it the same way.
    sgd = state_lib.Optimizer(optax.sgd(0.1), optax.constant_schedule(0.1))
    sgd_state = sgd.tx.init(params)
    out = state_lib.apply_optimizer(sgd, grads, sgd_state, params, jnp.array(False))
    chex.assert_trees_all_equal(out, (params, sgd_state))
    moved, _ = state_lib.apply_optimizer(sgd, _grads(rng, 1.0), sgd_state, params,
                                         jnp.array(True))
    assert np.abs(moved['w'] - params['w']).max() > 1e-3


def test_update_ema_keeps_old_values_where_not_ok():
    ema = {'model': {'w': np.ones(3, np.float32)}}
    params = {'model': {'w': np.full(3, 3.0, np.float32)}}
    chex.assert_trees_all_close(state_lib.update_ema(ema, params, 0.75, jnp.array(True)),
                                {'model': {'w': np.full(3, 1.5, np.float32)}})
    chex.assert_trees_all_equal(state_lib.update_ema(ema, params, 0.75, jnp.array(False)),
                                ema)


def _one_step(config, donate):
    """One jitted train step from a fresh state (state donated or not)."""
    task = tasks.create_task(config)
    state = jax.jit(lambda rng: state_lib.create_train_state(task, rng))(jax.random.key(0))
    step = jax.jit(train.make_train_step_fn(task), donate_argnums=0 if donate else ())
    return state, step


def test_train_step_with_a_non_finite_batch_changes_nothing(small_config):
    """Params, both EMAs, Adam moments and counts, step and loss-aware task state all stay."""
    config = small_config
    config.optim.ema_decays = (0.9, 0.5)
    config.diffusion.timestep_sampling = 'loss_aware'
    batch = next(data_lib.create_train_iterator(config))
    state, step = _one_step(config, donate=False)
    good, metrics = step(state, batch, jax.random.key(1))
    assert float(metrics['finite']) == 1.0 and int(good.step) == 1
    bad_batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    after, metrics = step(good, bad_batch, jax.random.key(2))
    assert float(metrics['finite']) == 0.0
    chex.assert_trees_all_equal(jax.device_get(after), jax.device_get(good))
    # The good step's EMAs read the new parameters: d * p_0 + (1 - d) * p_1.
    for decay, ema in zip(config.optim.ema_decays, good.ema_params):
        expected = jax.tree.map(lambda a, b: decay * a + (1 - decay) * b, state.params,
                                good.params)
        chex.assert_trees_all_close(ema, expected, rtol=1e-6, atol=1e-7)


def test_train_step_updates_the_donated_state_in_place(small_config):
    """XLA copies no donated buffer before rewriting it (the generic optax update then
    `where` guard needed a copy of every parameter and moment; see `apply_optimizer`)."""
    config = small_config
    config.optim.ema_decays = (0.9, 0.5)
    batch = next(data_lib.create_train_iterator(config))
    state, step = _one_step(config, donate=True)
    hlo = step.lower(state, batch, jax.random.key(1)).compile().as_text()
    entry = hlo[hlo.index('\nENTRY'):]
    # Entry parameters are named after the argument: state_params_..., state_opt_state_...
    # (A scalar counter's copy costs nothing.)
    copies = [line for line in entry.splitlines()
              if ' copy(%state_' in line and '[] copy(' not in line]
    assert not copies, copies[:3]


def test_tf_epsilon_placement_changes_the_early_updates():
    """TF's epsilon (before the bias correction) is eps / sqrt(1 - b2^t) after it: with
    eps = 1e-3 the first update differs from optax's by far more than rounding."""
    rng = np.random.default_rng(2)
    params, grads = _params(rng), _grads(rng, 1e-3)
    moved = {}
    for tf_eps in (False, True):
        optimizer = state_lib.create_optimizer(
            _optim(learning_rate=1e-2, eps=1e-3, eps_before_bias_correction=tf_eps), 10)
        moved[tf_eps] = state_lib.apply_optimizer(
            optimizer, grads, optimizer.tx.init(params), params, jnp.array(True))[0]
    step = {k: np.abs(v['w'] - params['w']) for k, v in moved.items()}
    # |g| ~ 1e-3 = eps: optax divides by |g| + 1e-3, TF by |g| + 1e-3 / sqrt(1e-3).
    assert np.all(step[True] < 0.5 * step[False])
