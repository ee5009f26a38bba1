"""Training losses and timestep samplers.

This module owns the per-example diffusion training objectives (simple MSE on the
eps / x0 / v / x_{t-1} target, the hybrid MSE + VB loss for learned variances, and the
pure VB / KL losses) and the choice of training timesteps (uniform, or Improved DDPM's
loss-aware importance sampling whose state is a pytree that lives in the train state).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax import likelihood
from ddpm_jax.schedules import Schedule

LOSS_TYPES = ('mse', 'rescaled_mse', 'kl', 'rescaled_kl')
TIMESTEP_SAMPLERS = ('uniform', 'loss_aware')


def _mean_flat(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def training_losses(model_fn: Callable, sched: Schedule, x0, i, noise, *,
                    mean_type: str = 'eps', var_type: str = 'fixed_small',
                    loss_type: str = 'mse', model_kwargs: dict | None = None) -> dict:
    """Per-example training loss at step indices i.

    x_i = q_sample(x0, i, noise) and the model is called with schedule.timesteps[i].

    - 'mse' / 'rescaled_mse': mean over non-batch dims of (target - mean output)^2 with
      target eps (Ho et al. 2020, Eq. 14), x_0, v (Salimans & Ho 2022) or the posterior
      mean (for 'xprev'). With a learned variance the hybrid loss
      L_simple + lambda L_vlb is used (Nichol & Dhariwal 2021, Eq. 16), the VB term
      seeing the mean output through stop_gradient so it trains only the variance
      (Sec. 3.1); 'rescaled_mse' sets lambda = N / 1000, 'mse' lambda = 1.
    - 'kl': the VB term L_{t-1} (bits/dim) alone; 'rescaled_kl' multiplies it by N so
      that its expectation over uniform i equals the whole bound.

    Args:
        model_fn: model_fn(x, t int32 [B], **model_kwargs) -> [B, ..., C or 2C].
        sched: The schedule.
        x0: [B, ...] data in [-1, 1].
        i: [B] int32 step indices.
        noise: eps ~ N(0, I), shaped like x0.
        mean_type: One of `diffusion.MEAN_TYPES`.
        var_type: One of `diffusion.VAR_TYPES`.
        loss_type: One of `LOSS_TYPES`.
        model_kwargs: Extra keyword arguments to the model.

    Returns:
        dict with 'loss' [B] always, 'mse' [B] for mse types and 'vb' [B] for learned
        variances or kl types.

    Raises:
        ValueError: Unknown type names, x0 / noise shape mismatch, or model output
            channels that do not fit var_type.
    """
    diffusion.validate_types(mean_type, var_type)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f'Unknown loss_type {loss_type!r}; valid: {LOSS_TYPES}.')
    model_kwargs = {} if model_kwargs is None else model_kwargs
    x_t = diffusion.q_sample(sched, x0, i, noise)
    output = model_fn(x_t, sched.timesteps[i], **model_kwargs)
    n = sched.num_timesteps

    if loss_type in ('kl', 'rescaled_kl'):
        vb = likelihood.vb_terms_bpd(sched, output, x0, x_t, i, mean_type=mean_type,
                                     var_type=var_type, clip_denoised=False)['output']
        if loss_type == 'rescaled_kl':
            vb = vb * n
        return {'loss': vb, 'vb': vb}

    mean_out, var_out = diffusion.split_model_output(output, x_t, var_type)
    terms = {}
    if var_out is not None:
        frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
        vb = likelihood.vb_terms_bpd(sched, frozen, x0, x_t, i, mean_type=mean_type,
                                     var_type=var_type, clip_denoised=False)['output']
        if loss_type == 'rescaled_mse':
            vb = vb * (n / 1000.0)
        terms['vb'] = vb
    if mean_type == 'eps':
        target = noise
    elif mean_type == 'x0':
        target = x0
    elif mean_type == 'v':
        target = diffusion.get_v(sched, x0, i, noise)
    else:  # 'xprev'
        target, _, _ = diffusion.q_posterior_mean_variance(sched, x0, x_t, i)
    terms['mse'] = _mean_flat(jnp.square(target - mean_out))
    terms['loss'] = terms['mse'] + terms['vb'] if 'vb' in terms else terms['mse']
    return terms


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


def sample_timesteps(rng, batch_size: int, num_timesteps: int, *, sampler: str = 'uniform',
                     state: LossAwareState | None = None,
                     uniform_prob: float = 0.001):
    """Draws step indices and importance weights.

    The weights are w_i = 1 / (N p_i), so E[w_i L_i] = (1/N) sum_t L_t: the weighted
    loss is an unbiased estimate of the uniform-timestep loss.

    Args:
        rng: A JAX PRNG key.
        batch_size: B.
        num_timesteps: N.
        sampler: One of `TIMESTEP_SAMPLERS`.
        state: Required for 'loss_aware'; its history must have N rows.
        uniform_prob: Uniform mixture weight of 'loss_aware'.

    Returns:
        (i int32 [B], weights float32 [B]).

    Raises:
        ValueError: Unknown sampler, missing / mismatched state, or bad uniform_prob.
    """
    if sampler not in TIMESTEP_SAMPLERS:
        raise ValueError(f'Unknown timestep sampler {sampler!r}; valid: {TIMESTEP_SAMPLERS}.')
    if num_timesteps < 1:
        raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}.')
    if sampler == 'uniform':
        i = jax.random.randint(rng, [batch_size], 0, num_timesteps, dtype=jnp.int32)
        return i, jnp.ones([batch_size], jnp.float32)
    if state is None:
        raise ValueError("sampler 'loss_aware' needs a LossAwareState (state=None given).")
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
