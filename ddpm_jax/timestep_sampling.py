"""Which training timesteps the loss sees: uniform, or loss-aware importance sampling.

This module owns the choice of step indices for the training loss: uniform, or
Improved DDPM's loss-aware importance sampling (Nichol & Dhariwal 2021, Sec. 3.3),
whose state (`LossAwareState`) is a pytree that lives in the train state. ("Sampler"
in ddpm_jax means an image sampler of `ddpm_jax.samplers`; this is the timestep
*sampling* of the loss.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

TIMESTEP_SAMPLING = ('uniform', 'loss_aware')


class LossAwareState(NamedTuple):
    """Recent training losses per step for importance sampling (a pytree).

    Attributes:
        history: float32 [N, K], the last K losses seen at each step, oldest first
            (rows with counts < K are filled from the left).
        counts: int32 [N], how many entries of each row are valid (at most K).
    """

    history: jnp.ndarray
    counts: jnp.ndarray


def init_loss_aware_state(num_timesteps: int, history_per_term: int = 10) -> LossAwareState:
    """Empty loss history (Nichol & Dhariwal 2021, Sec. 3.3 keep K = 10 per term).

    Args:
        num_timesteps: N, the steps of the schedule.
        history_per_term: K, losses remembered per step.

    Returns:
        A `LossAwareState` of zeros.

    Raises:
        ValueError: If N < 1 or K < 1.
    """
    if num_timesteps < 1:
        raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}.')
    if history_per_term < 1:
        raise ValueError(f'history_per_term must be >= 1, got {history_per_term}.')
    return LossAwareState(
        history=jnp.zeros([num_timesteps, history_per_term], jnp.float32),
        counts=jnp.zeros([num_timesteps], jnp.int32))


def loss_aware_probs(state: LossAwareState, uniform_prob: float = 0.001) -> jnp.ndarray:
    """Sampling probabilities p_t of the loss-aware sampler (Nichol & Dhariwal 2021, Sec. 3.3).

    p_t ∝ sqrt(E[L_t^2]) over the stored history, mixed as
    (1 - uniform_prob) p + uniform_prob / N; uniform until every step has K entries
    (or while all stored losses are zero).

    Args:
        state: The `LossAwareState`.
        uniform_prob: Weight of the uniform mixture component.

    Returns:
        float32 [N] probabilities summing to one.
    """
    n = state.history.shape[0]
    k = state.history.shape[1]
    rms = jnp.sqrt(jnp.mean(jnp.square(state.history), axis=-1))
    total = jnp.sum(rms)
    warm = jnp.all(state.counts >= k) & (total > 0)
    probs = rms / jnp.where(total > 0, total, 1.0)
    probs = probs * (1.0 - uniform_prob) + uniform_prob / n
    return jnp.where(warm, probs, jnp.full([n], 1.0 / n, jnp.float32))


def sample_timesteps(rng, batch_size: int, num_timesteps: int, *, method: str = 'uniform',
                     state: LossAwareState | None = None,
                     uniform_prob: float = 0.001):
    """Draws step indices and importance weights.

    The weights are w_i = 1 / (N p_i), so E[w_i L_i] = (1/N) sum_t L_t: the weighted
    loss is an unbiased estimate of the uniform-timestep loss.

    Args:
        rng: A JAX PRNG key.
        batch_size: B.
        num_timesteps: N.
        method: One of `TIMESTEP_SAMPLING`.
        state: Required for 'loss_aware'; its history must have N rows.
        uniform_prob: Uniform mixture weight of 'loss_aware'.

    Returns:
        (i int32 [B], weights float32 [B]).

    Raises:
        ValueError: Unknown method, missing / mismatched state, or bad uniform_prob.
    """
    if method not in TIMESTEP_SAMPLING:
        raise ValueError(f'Unknown timestep sampling {method!r}; valid: {TIMESTEP_SAMPLING}.')
    if num_timesteps < 1:
        raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}.')
    if method == 'uniform':
        i = jax.random.randint(rng, [batch_size], 0, num_timesteps, dtype=jnp.int32)
        return i, jnp.ones([batch_size], jnp.float32)
    if state is None:
        raise ValueError("method 'loss_aware' needs a LossAwareState (state=None given).")
    if state.history.shape[0] != num_timesteps:
        raise ValueError(f'LossAwareState has {state.history.shape[0]} steps, '
                         f'expected num_timesteps={num_timesteps}.')
    if not 0.0 <= uniform_prob <= 1.0:
        raise ValueError(f'uniform_prob must be in [0, 1], got {uniform_prob}.')
    probs = loss_aware_probs(state, uniform_prob)
    i = jax.random.choice(rng, num_timesteps, shape=[batch_size], p=probs).astype(jnp.int32)
    weights = 1.0 / (num_timesteps * probs[i])
    return i, weights.astype(jnp.float32)


def update_loss_aware_state(state: LossAwareState, i, losses) -> LossAwareState:
    """Records a batch of per-example losses at their step indices.

    Examples are applied one after another (a `lax.scan` over the batch), so a step that
    appears several times in the batch receives all of its losses in batch order, exactly
    like sequential updates; once a row holds K losses the oldest is dropped. Gradients
    do not flow into the state.

    Args:
        state: The `LossAwareState`.
        i: int [B] step indices of the examples.
        losses: float [B] their losses.

    Returns:
        The updated `LossAwareState`.

    Raises:
        ValueError: If i and losses shapes differ or are not 1-D.
    """
    i = jnp.asarray(i)
    losses = jnp.asarray(losses)
    if i.ndim != 1 or i.shape != losses.shape:
        raise ValueError(f'i and losses must be 1-D of the same shape, got {i.shape} and '
                         f'{losses.shape}.')
    k = state.history.shape[1]
    losses = jax.lax.stop_gradient(losses).astype(jnp.float32)

    def record(st, item):
        t, loss = item
        row, count = st.history[t], st.counts[t]
        shifted = jnp.concatenate([row[1:], loss[None]])
        filled = row.at[jnp.minimum(count, k - 1)].set(loss)
        new_row = jnp.where(count >= k, shifted, filled)
        return LossAwareState(history=st.history.at[t].set(new_row),
                              counts=st.counts.at[t].set(jnp.minimum(count + 1, k))), None

    state, _ = jax.lax.scan(record, state, (i.astype(jnp.int32), losses))
    return state
