"""The train state: its pytree, optimisers, creation, abstract shape and EMA choice.

Training, sampling, evaluation and checkpointing all import this module (and it
imports none of them). A `TrainState` holds one or more named parameter trees
("parts"): a denoiser has one, `'model'`; a GAN has a generator and a
discriminator, each with its own optimiser state. Which parts exist, and how they
are initialised and optimised, is the task's (`ddpm_jax.tasks`).
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ddpm_jax import parallel

# Bumped when the layout of `TrainState` changes; stored with every checkpoint.
STATE_LAYOUT_VERSION = 2


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    Attributes:
        step: int32 scalar, train steps taken.
        params: {part: parameter tree}, e.g. {'model': ...}.
        ema_params: One {part: tree} per `config.optim.ema_decays`, holding an
            exponential moving average of the task's `ema_parts`.
        opt_state: {part: optax state}.
        task_state: Whatever else the task carries between steps (e.g. the
            loss-aware timestep sampling's `LossAwareState`); an int32 scalar
            placeholder when it has none.
    """
    step: jax.Array
    params: dict[str, Any]
    ema_params: tuple[dict[str, Any], ...]
    opt_state: dict[str, Any]
    task_state: Any


class AdamHyperparams(NamedTuple):
    """The constants of `create_optimizer`'s clipped Adam(W), for `apply_optimizer`."""
    b1: float
    b2: float
    eps: float
    weight_decay: float  # 0 for Adam.
    max_norm: float  # Global-norm clipping threshold (inf: none).
    eps_before_bias_correction: bool = False  # TensorFlow's placement (`scale_by_tf_adam`).


def scale_by_tf_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with TensorFlow's epsilon (tf.train.AdamOptimizer, DDPM's).

    TF updates by lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps): its epsilon is
    added before the bias correction, so after it it is eps / sqrt(1 - b2^t) (3.2e-7 at
    t = 1 for eps = 1e-8, b2 = 0.999; eps again by t ~ 5000). The update here is
    m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t)), the same state (`ScaleByAdamState`).
    """
    base = optax.scale_by_adam(b1, b2, eps)

    def update(updates, state, params=None):
        _, state = base.update(updates, state, params)  # optax's moments; its update unused.
        c1, c2 = 1 - b1**state.count, 1 - b2**state.count
        scaled = jax.tree.map(
            lambda m, v: (m / c1.astype(m.dtype)) / (
                jnp.sqrt(v / c2.astype(v.dtype)) + (eps / jnp.sqrt(c2)).astype(v.dtype)),
            state.mu, state.nu)
        return scaled, state

    return optax.GradientTransformation(base.init, update)


class Optimizer(NamedTuple):
    """An optax transformation and its learning-rate schedule (for logging).

    `adam` is set when `tx` is `create_optimizer`'s clip-then-Adam(W) chain; then
    `apply_optimizer` computes its update directly (same state, same numbers).
    """
    tx: optax.GradientTransformation
    learning_rate_fn: optax.Schedule
    adam: AdamHyperparams | None = None


def create_learning_rate_fn(optim: ml_collections.ConfigDict,
                            num_train_steps: int) -> optax.Schedule:
    """Linear warmup to `optim.learning_rate`, then constant or cosine/linear decay to
    `optim.min_learning_rate`.

    The warmup is lr(s) = peak s / warmup_steps for the update after s updates (s = 0
    first: rate 0), DDPM's and score_sde's.

    The cosine decay after warmup is lr(s) = m + (p - m)(1 + cos(pi s / S)) / 2 for
    peak p, minimum m and S = num_train_steps - warmup_steps (PyTorch's
    CosineAnnealingLR with eta_min = m, T_max = S, here stepped every step).

    Args:
        optim: An optimiser config group (fields as `config.optim`).
        num_train_steps: Where the decay ends.
    """
    peak, warmup = optim.learning_rate, optim.warmup_steps
    final = optim.min_learning_rate
    decay_steps = max(1, num_train_steps - warmup)
    if optim.lr_schedule == 'constant':
        after = optax.constant_schedule(peak)
    elif optim.lr_schedule == 'cosine':
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=final / peak)
    elif optim.lr_schedule == 'linear':
        after = optax.linear_schedule(peak, final, decay_steps)
    else:
        raise ValueError(f'optim.lr_schedule={optim.lr_schedule!r} is not valid.')
    if warmup == 0:
        return after
    # The update after s updates uses peak * min(s / warmup, 1), as DDPM's
    # `get_warmed_up_lr(max_lr, warmup, global_step)` and score_sde's `optimize_fn`
    # (`state.step`): the first update has rate 0 (Adam's moments still take its gradient).
    warm = optax.linear_schedule(0.0, peak, warmup)
    return optax.join_schedules([warm, after], boundaries=[warmup])


def create_optimizer(optim: ml_collections.ConfigDict, num_train_steps: int) -> Optimizer:
    """Gradient clipping by global norm, then Adam or AdamW.

    The clipping stage is always present (with an infinite norm when
    `optim.grad_clip_norm == 0`), so turning clipping on when resuming a run keeps the
    optimiser state's structure and the checkpoint restores.

    Args:
        optim: An optimiser config group (fields as `config.optim`).
        num_train_steps: Length of the learning-rate schedule.
    """
    lr = create_learning_rate_fn(optim, num_train_steps)
    tf_eps = bool(optim.eps_before_bias_correction)
    if optim.optimizer == 'adam':
        weight_decay = 0.0
    elif optim.optimizer == 'adamw':
        weight_decay = float(optim.weight_decay)
    else:
        raise ValueError(f'optim.optimizer={optim.optimizer!r} is not valid.')
    # optax.adam / adamw's chain, with TF's epsilon placement where asked.
    opt = optax.chain(
        (scale_by_tf_adam if tf_eps else optax.scale_by_adam)(optim.b1, optim.b2, optim.eps),
        *([optax.add_decayed_weights(weight_decay)] if optim.optimizer == 'adamw' else []),
        optax.scale_by_learning_rate(lr))
    max_norm = optim.grad_clip_norm if optim.grad_clip_norm > 0 else float('inf')
    hyper = AdamHyperparams(float(optim.b1), float(optim.b2), float(optim.eps),
                            weight_decay, float(max_norm), tf_eps)
    return Optimizer(optax.chain(optax.clip_by_global_norm(max_norm), opt), lr, hyper)


def keep_where(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `ok` (a boolean scalar), else `old`, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def apply_optimizer(optimizer: Optimizer, grads: Any, opt_state: Any, params: Any,
                    ok: jax.Array, grad_norm: jax.Array | None = None) -> tuple[Any, Any]:
    """One optimiser step, kept only where `ok`: `(params, opt_state)`.

    Returns the updated parameters and optimiser state if `ok` (a boolean scalar),
    else the old ones, so a non-finite gradient never reaches the state. For
    `create_optimizer`'s chain (`optimizer.adam` set) the clipped Adam(W) update is
    written out here, in the order that lets XLA update donated buffers in place:
    first each moment (kept where `ok`), then the parameters from the kept moments.
    The generic `tx.update` then `where` reads the old moments after the new ones
    are written, so XLA copies every donated moment and parameter first and makes
    several more passes over them (CIFAR-10's 35.7M parameters: optimiser, EMA and
    guard took ~50-70 ms on the 2-core CPU, ~35 ms this way). The numbers are
    optax's (`clip_by_global_norm`, `scale_by_adam`, `add_decayed_weights`,
    `scale_by_learning_rate`) except that clipping multiplies by the scalar
    `max_norm / norm` where optax divides by the norm then multiplies (last-bit
    differences).

    Args:
        optimizer: From `create_optimizer` (or any `Optimizer`: then `tx.update`).
        grads, opt_state, params: Trees of one part.
        ok: Keep the step (e.g. loss and gradient norm finite).
        grad_norm: The global norm of `grads`, if already computed.
    """
    hyper = optimizer.adam
    if hyper is None:
        updates, new_opt_state = optimizer.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        return keep_where(ok, new_params, params), keep_where(ok, new_opt_state, opt_state)
    clip_state, inner = opt_state
    adam, schedule = inner[0], inner[-1]
    if not (isinstance(adam, optax.ScaleByAdamState)
            and isinstance(schedule, optax.ScaleByScheduleState)):
        raise TypeError(f'apply_optimizer: opt_state is not create_optimizer\'s chain: '
                        f'{jax.tree.structure(opt_state)}')
    if grad_norm is None:
        grad_norm = optax.global_norm(grads)
    b1, b2, eps, weight_decay, max_norm, tf_eps = hyper
    scale = jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm).astype(jnp.float32)
    count = optax.safe_increment(adam.count)
    # optax.tree.bias_correction: t / (1 - decay**count).
    c1, c2 = 1 - b1**count, 1 - b2**count
    lr = optimizer.learning_rate_fn(schedule.count)

    def moment1(g, m):
        g = g * scale.astype(g.dtype)
        return (1 - b1) * g + b1 * m

    def moment2(g, v):
        g = g * scale.astype(g.dtype)
        return (1 - b2) * (g * g) + b2 * v

    eps_hat = eps / jnp.sqrt(c2) if tf_eps else eps  # `scale_by_tf_adam`.

    def param(p, m, v):
        u = (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype))
                                        + jnp.asarray(eps_hat, v.dtype))
        if weight_decay:
            u = u + weight_decay * p
        return (p - lr * u).astype(p.dtype)

    mu = keep_where(ok, jax.tree.map(moment1, grads, adam.mu), adam.mu)
    nu = keep_where(ok, jax.tree.map(moment2, grads, adam.nu), adam.nu)
    # Reads the kept moments (equal to the new ones where `ok`; where not, the
    # parameters are kept anyway), so nothing reads a moment buffer once rewritten.
    new_params = keep_where(ok, jax.tree.map(param, params, mu, nu), params)
    adam = adam._replace(count=jnp.where(ok, count, adam.count), mu=mu, nu=nu)
    schedule = schedule._replace(
        count=jnp.where(ok, optax.safe_increment(schedule.count), schedule.count))
    return new_params, (clip_state, (adam,) + tuple(inner[1:-1]) + (schedule,))


def create_train_state(task: Any, rng: jax.Array) -> TrainState:
    """Initialises the parameters, EMAs (= params), optimisers and task state.

    Pure; call under `jax.jit` (see `create_sharded_train_state`).

    Args:
        task: A `ddpm_jax.tasks.Task`.
        rng: Initialisation key.
    """
    params = dict(task.init_params(rng))
    optimizers = task.create_optimizers()
    ema = {part: params[part] for part in task.ema_parts}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=tuple(ema for _ in task.config.optim.ema_decays),
        opt_state={part: optimizers[part].tx.init(params[part]) for part in task.parts},
        task_state=task.init_task_state(),
    )


def create_sharded_train_state(task: Any, rng: jax.Array,
                               mesh: jax.sharding.Mesh) -> TrainState:
    """`create_train_state` compiled with every leaf replicated over `mesh`."""
    init = jax.jit(functools.partial(create_train_state, task),
                   out_shardings=parallel.replicated_sharding(mesh))
    return init(rng)


def with_shardings(abstract_tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Attaches `sharding` to every `ShapeDtypeStruct` of an abstract pytree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_tree)


def create_abstract_train_state(task: Any, mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state; nothing is allocated."""
    abstract = jax.eval_shape(functools.partial(create_train_state, task),
                              jax.random.key(0))
    return with_shardings(abstract, parallel.replicated_sharding(mesh))


def ema_index(config: ml_collections.ConfigDict) -> int:
    """Which EMA copy `config.sample.ema_decay` names (-1: the first decay).

    Raises:
        ValueError: If the decay is not one of `config.optim.ema_decays`.
    """
    decays = tuple(config.optim.ema_decays)
    if config.sample.ema_decay == -1:
        return 0
    for k, decay in enumerate(decays):
        if np.isclose(decay, config.sample.ema_decay, rtol=0, atol=1e-12):
            return k
    raise ValueError(f'sample.ema_decay={config.sample.ema_decay} is not one of '
                     f'optim.ema_decays={decays} (or -1 for the first).')


def select_ema_params(config: ml_collections.ConfigDict,
                      ema_params: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The EMA copy ({part: tree}) named by `config.sample.ema_decay`."""
    return ema_params[ema_index(config)]


def update_ema(ema: Mapping[str, Any], params: Mapping[str, Any], decay: float,
               ok: jax.Array | None = None) -> dict[str, Any]:
    """One EMA step, e <- decay e + (1 - decay) p, for each part of `ema`.

    With `ok` (a boolean scalar) the step is kept only where it is true. Pass the
    new parameters as `apply_optimizer` returned them (already kept where `ok`): then
    the EMA reads the parameters' output buffers and XLA needs no copy of the old ones.
    """
    new = {part: jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, tree,
                              params[part]) for part, tree in ema.items()}
    return new if ok is None else keep_where(ok, new, dict(ema))
