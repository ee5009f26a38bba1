"""Tests for ddpm_jax.timestep_sampling: uniform and loss-aware importance sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import timestep_sampling

T = 20


def test_bad_input_raises():
    with pytest.raises(ValueError, match='timestep sampling'):
        timestep_sampling.sample_timesteps(jax.random.key(0), 4, T, method='importance')
    with pytest.raises(ValueError, match='state'):
        timestep_sampling.sample_timesteps(jax.random.key(0), 4, T, method='loss_aware')
    with pytest.raises(ValueError, match='num_timesteps'):
        timestep_sampling.sample_timesteps(jax.random.key(0), 4, T, method='loss_aware',
                                           state=timestep_sampling.init_loss_aware_state(T + 1))


def test_uniform_sampler():
    i, w = jax.jit(timestep_sampling.sample_timesteps, static_argnums=(1, 2))(jax.random.key(0), 4096, T)
    assert i.dtype == jnp.int32 and w.dtype == jnp.float32
    np.testing.assert_array_equal(w, 1.0)
    counts = np.bincount(np.asarray(i), minlength=T)
    assert counts.min() > 150 and counts.max() < 260  # Expected 204.8 each.


def _np_sequential_update(history, counts, i, losses_):
    history, counts = history.copy(), counts.copy()
    k = history.shape[1]
    for t, loss in zip(i, losses_):
        if counts[t] == k:
            history[t, :-1] = history[t, 1:]
            history[t, -1] = loss
        else:
            history[t, counts[t]] = loss
            counts[t] += 1
    return history, counts


def test_loss_aware_update_matches_sequential_updates():
    n, k = 5, 3
    state = timestep_sampling.init_loss_aware_state(n, k)
    rng = np.random.RandomState(0)
    history, counts = np.zeros((n, k), np.float32), np.zeros(n, np.int64)
    update = jax.jit(timestep_sampling.update_loss_aware_state)
    for _ in range(4):
        i = rng.randint(0, n, size=6)
        i[:3] = i[0]  # Duplicates within one batch.
        loss = rng.uniform(0, 2, 6).astype(np.float32)
        state = update(state, jnp.asarray(i), jnp.asarray(loss))
        history, counts = _np_sequential_update(history, counts, i, loss)
        np.testing.assert_array_equal(state.history, history)
        np.testing.assert_array_equal(state.counts, counts)


def test_loss_aware_sampler_falls_back_to_uniform_until_warm():
    n, k = 4, 2
    state = timestep_sampling.init_loss_aware_state(n, k)
    # Every term but the last gets K losses: still not warm.
    state = timestep_sampling.update_loss_aware_state(
        state, jnp.array([0, 0, 1, 1, 2, 2, 3]), jnp.array([1., 1., 2., 2., 3., 3., 9.]))
    np.testing.assert_allclose(timestep_sampling.loss_aware_probs(state), 0.25)
    _, w = timestep_sampling.sample_timesteps(jax.random.key(0), 64, n, method='loss_aware',
                                   state=state)
    np.testing.assert_allclose(w, 1.0, rtol=1e-6)


def test_loss_aware_sampler_probs_and_unbiased_weights():
    n, k, u = 4, 2, 0.01
    state = timestep_sampling.init_loss_aware_state(n, k)
    hist = np.array([[1., 1.], [3., 4.], [0.5, 0.5], [2., 0.]])
    state = timestep_sampling.update_loss_aware_state(state, jnp.repeat(jnp.arange(n), k),
                                           jnp.asarray(hist.reshape(-1), jnp.float32))
    rms = np.sqrt((hist ** 2).mean(1))
    expected = (1 - u) * rms / rms.sum() + u / n
    probs = timestep_sampling.loss_aware_probs(state, uniform_prob=u)
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    # E[w] = sum_t p_t / (N p_t) = 1 and E[w L] = mean_t L_t, for the returned weights.
    i, w = jax.jit(lambda r: timestep_sampling.sample_timesteps(r, 20000, n, method='loss_aware',
                                                    state=state, uniform_prob=u))(
        jax.random.key(1))
    np.testing.assert_allclose(w, 1.0 / (n * expected[np.asarray(i)]), rtol=1e-5)
    freq = np.bincount(np.asarray(i), minlength=n) / 20000
    np.testing.assert_allclose(freq, expected, atol=0.015)
    term_loss = np.array([1.0, 2.0, 3.0, 4.0])
    estimate = np.mean(np.asarray(w) * term_loss[np.asarray(i)])
    np.testing.assert_allclose(estimate, term_loss.mean(), rtol=0.05)
