"""Training: the train state, the optimiser, the pure train step and the train loop.

The loop follows the shape shared by the Flax examples and big_vision:

1. Validate the config and the workdir before anything is compiled.
2. A 1-D `('data',)` mesh; batches sharded `P('data')`, the state replicated `P()`.
3. The state is one pytree (`TrainState`), created under `jax.jit` with replicated
   out_shardings or restored by orbax against `jax.eval_shape` of it.
4. `train_step(state, batch, rng)` is pure, draws its randomness from
   `jax.random.fold_in(rng, state.step)` (no RNG state to save, so resuming is bit
   for bit) and is compiled once with the state donated.
5. Metrics, checkpoints and EMA sample grids are written at fixed step intervals;
   SIGTERM triggers a final checkpoint and a clean exit.

The denoiser is trained with `losses.training_losses` (Ho et al. 2020, Eq. 14;
hybrid/KL objectives of Nichol & Dhariwal 2021, Sec. 3.1) at timesteps from
`losses.sample_timesteps` (uniform or loss-aware importance sampling, Nichol &
Dhariwal 2021, Sec. 3.3), optionally dropping labels for classifier-free guidance
(Ho & Salimans 2022). With `model.name == 'classifier'` the same loop trains a
noise-aware classifier on x_t = q_sample(x_0, t) (Dhariwal & Nichol 2021, Sec. 4).
"""

import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import checkpointing
from ddpm_jax import data as data_lib
from ddpm_jax import diffusion
from ddpm_jax import losses
from ddpm_jax import parallel
from ddpm_jax import sampling
from ddpm_jax import schedules
from ddpm_jax import writers
from ddpm_jax.models import create_model, example_inputs

logger = logging.getLogger('ddpm_jax')

MODEL_NAMES = ('unet', 'classifier')
MODEL_DTYPES = ('float32', 'bfloat16')
OPTIMIZERS = ('adam', 'adamw')
LR_SCHEDULES = ('constant', 'cosine', 'linear')
NUM_QUARTILES = 4


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient; no state after it was saved."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    Attributes:
        step: int32 scalar, optimiser steps taken.
        params: Model parameters.
        ema_params: Tuple of parameter EMAs, one per `config.optim.ema_decays`.
        opt_state: optax state.
        sampler_state: `losses.LossAwareState` for the loss-aware timestep sampler,
            else an int32 scalar placeholder.
    """
    step: jax.Array
    params: Any
    ema_params: tuple[Any, ...]
    opt_state: Any
    sampler_state: Any


# --- config validation -----------------------------------------------------------------


def _check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f'{field}={value!r} is not valid; choose one of {tuple(choices)}.')


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    num_processes: int | None = None) -> None:
    """Checks names and values before anything is built or compiled.

    Args:
        config: The run's config.
        num_devices: Devices in the mesh (default: all devices).
        num_processes: Processes feeding it (default: `jax.process_count()`).

    Raises:
        ValueError: Naming the offending field (and the valid choices for names).
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
    m, d, o, t = config.model, config.diffusion, config.optim, config.train
    _check_choice('model.name', m.name, MODEL_NAMES)
    _check_choice('model.dtype', m.dtype, MODEL_DTYPES)
    _check(m.num_classes >= 0, f'model.num_classes={m.num_classes} must be >= 0.')
    _check(0.0 <= m.class_dropout_prob < 1.0,
           f'model.class_dropout_prob={m.class_dropout_prob} must be in [0, 1).')
    _check(m.class_dropout_prob == 0 or m.num_classes > 0,
           'model.class_dropout_prob > 0 needs model.num_classes > 0.')
    if m.name == 'classifier':
        _check(m.num_classes > 0, 'model.name=classifier needs model.num_classes > 0.')
    _check_choice('diffusion.schedule', d.schedule, schedules.BETA_SCHEDULES)
    _check_choice('diffusion.mean_type', d.mean_type, diffusion.MEAN_TYPES)
    _check_choice('diffusion.var_type', d.var_type, diffusion.VAR_TYPES)
    _check_choice('diffusion.loss_type', d.loss_type, losses.LOSS_TYPES)
    _check_choice('diffusion.timestep_sampler', d.timestep_sampler, losses.TIMESTEP_SAMPLERS)
    _check(d.num_timesteps >= 1, f'diffusion.num_timesteps={d.num_timesteps} must be >= 1.')
    learned = d.var_type in ('learned', 'learned_range')
    if m.name == 'unet':
        _check(learned == bool(m.learn_sigma),
               f'diffusion.var_type={d.var_type!r} needs model.learn_sigma={learned} '
               f'(got {m.learn_sigma}).')
    _check_choice('optim.optimizer', o.optimizer, OPTIMIZERS)
    _check_choice('optim.lr_schedule', o.lr_schedule, LR_SCHEDULES)
    _check(o.learning_rate > 0, f'optim.learning_rate={o.learning_rate} must be > 0.')
    _check(o.warmup_steps >= 0, f'optim.warmup_steps={o.warmup_steps} must be >= 0.')
    _check(o.grad_clip_norm >= 0, f'optim.grad_clip_norm={o.grad_clip_norm} must be >= 0.')
    _check(len(o.ema_decays) >= 1, 'optim.ema_decays must list at least one decay rate.')
    for decay in o.ema_decays:
        _check(0.0 <= decay < 1.0, f'optim.ema_decays={tuple(o.ema_decays)}: each must be '
                                   'in [0, 1).')
    _check(t.num_train_steps >= 0, f'train.num_train_steps={t.num_train_steps} must be >= 0.')
    _check(t.grad_accum_steps >= 1, f'train.grad_accum_steps={t.grad_accum_steps} must be '
                                    '>= 1.')
    for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
        _check(t[field] >= 1, f'train.{field}={t[field]} must be >= 1.')
    for field in ('keep_checkpoint_every_steps', 'sample_every_steps', 'num_grid_samples'):
        _check(t[field] >= 0, f'train.{field}={t[field]} must be >= 0.')
    batch = t.global_batch_size
    _check(batch >= 1, f'train.global_batch_size={batch} must be >= 1.')
    _check(batch % t.grad_accum_steps == 0,
           f'train.global_batch_size={batch} is not divisible by '
           f'train.grad_accum_steps={t.grad_accum_steps}.')
    micro_batch = batch // t.grad_accum_steps
    _check(micro_batch % num_devices == 0,
           f'train.global_batch_size={batch} must be divisible by the device count '
           f'({num_devices}) times train.grad_accum_steps={t.grad_accum_steps}: each '
           f'micro-batch of {micro_batch} is split evenly over the devices.')
    _check(batch % num_processes == 0,
           f'train.global_batch_size={batch} is not divisible by the process count '
           f'({num_processes}).')
    _check_choice('sample.sampler', config.sample.sampler, sampling.SAMPLERS)


def prepare_workdir(workdir: str) -> epath.Path:
    """Creates `workdir` and checks that it is writable (fails before any compile).

    Raises:
        ValueError: If the directory cannot be created or written.
    """
    if not workdir:
        raise ValueError('--workdir must be set.')
    path = epath.Path(workdir)
    probe = path / f'.write_probe_{jax.process_index()}_{os.getpid()}'
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text('ok')
        probe.unlink()
    except OSError as e:
        raise ValueError(f'--workdir={workdir} is not writable: {e}') from e
    return path


def write_config(config: ml_collections.ConfigDict, workdir: str,
                 filename: str = 'config.json') -> None:
    """Writes the resolved config as JSON to `<workdir>/<filename>` (process 0 only)."""
    if jax.process_index() != 0:
        return
    (epath.Path(workdir) / filename).write_text(
        json.dumps(checkpointing.config_to_json_dict(config), indent=2, sort_keys=True))


# --- optimiser and state ---------------------------------------------------------------


def create_learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to `optim.learning_rate`, then constant or cosine/linear decay to 0.

    The decay ends at `train.num_train_steps`.
    """
    o = config.optim
    peak, warmup = o.learning_rate, o.warmup_steps
    decay_steps = max(1, config.train.num_train_steps - warmup)
    if o.lr_schedule == 'constant':
        after = optax.constant_schedule(peak)
    elif o.lr_schedule == 'cosine':
        after = optax.cosine_decay_schedule(peak, decay_steps)
    elif o.lr_schedule == 'linear':
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        raise ValueError(f'optim.lr_schedule={o.lr_schedule!r} is not valid; choose one of '
                         f'{LR_SCHEDULES}.')
    if warmup == 0:
        return after
    # Step s of warmup uses peak * (s + 1) / warmup so the first update is not zero.
    warm = optax.linear_schedule(peak / warmup, peak, warmup - 1) if warmup > 1 else (
        optax.constant_schedule(peak))
    return optax.join_schedules([warm, after], boundaries=[warmup])


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then Adam or AdamW.

    The clipping stage is always present (with an infinite norm when
    `optim.grad_clip_norm == 0`), so turning clipping on when resuming a run keeps the
    optimiser state's structure and the checkpoint restores.
    """
    o = config.optim
    lr = create_learning_rate_fn(config)
    if o.optimizer == 'adam':
        opt = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    elif o.optimizer == 'adamw':
        opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        raise ValueError(f'optim.optimizer={o.optimizer!r} is not valid; choose one of '
                         f'{OPTIMIZERS}.')
    max_norm = o.grad_clip_norm if o.grad_clip_norm > 0 else float('inf')
    return optax.chain(optax.clip_by_global_norm(max_norm), opt)


def init_sampler_state(config: ml_collections.ConfigDict) -> Any:
    """The timestep sampler's state: `LossAwareState` or a scalar placeholder."""
    if config.diffusion.timestep_sampler == 'loss_aware':
        return losses.init_loss_aware_state(config.diffusion.num_timesteps)
    return jnp.zeros((), jnp.int32)


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       rng: jax.Array) -> TrainState:
    """Initialises the parameters, EMAs (= params), optimiser and sampler state.

    Pure; call under `jax.jit` (see `create_sharded_train_state`).
    """
    x, t, kwargs = example_inputs(model, config.data.image_size, config.data.channels)
    params_rng, dropout_rng = jax.random.split(rng)
    params = model.init({'params': params_rng, 'dropout': dropout_rng}, x, t, **kwargs,
                        train=False)['params']
    tx = create_optimizer(config)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=tuple(params for _ in config.optim.ema_decays),
        opt_state=tx.init(params),
        sampler_state=init_sampler_state(config),
    )


def create_sharded_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                               rng: jax.Array, mesh: jax.sharding.Mesh) -> TrainState:
    """`create_train_state` compiled with every leaf replicated over `mesh`."""
    init = jax.jit(functools.partial(create_train_state, config, model),
                   out_shardings=parallel.replicated_sharding(mesh))
    return init(rng)


def create_abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                                mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state; nothing is allocated."""
    abstract = jax.eval_shape(functools.partial(create_train_state, config, model),
                              jax.random.key(0))
    return checkpointing.with_shardings(abstract, parallel.replicated_sharding(mesh))


# --- the train step ----------------------------------------------------------------------


def _quartile_sums(values: dict[str, jax.Array], i: jax.Array,
                   num_timesteps: int) -> dict[str, jax.Array]:
    """Per-quartile sums of per-example terms plus example counts (Nichol & Dhariwal
    2021 log each loss term per quarter of the timestep range)."""
    quartile = (i * NUM_QUARTILES) // num_timesteps  # [B] in 0..3
    out = {}
    for q in range(NUM_QUARTILES):
        mask = (quartile == q).astype(jnp.float32)
        out[f'count_q{q}'] = jnp.sum(mask)
        for name, value in values.items():
            out[f'{name}_q{q}_sum'] = jnp.sum(value * mask)
    return out


def make_train_step_fn(config: ml_collections.ConfigDict, model: nn.Module,
                       mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Builds the pure `train_step(state, batch, rng) -> (state, metrics)`.

    Per step: fold the step into `rng`; draw timesteps (and importance weights),
    noise and classifier-free-guidance label drops for the whole global batch;
    average gradients over `train.grad_accum_steps` micro-batches in a `lax.scan`
    (the same draws, so equal to one big batch up to float rounding); clip, apply
    the optimiser, update the EMAs and the loss-aware sampler. If the loss or the
    gradient norm is not finite the old state is returned unchanged and
    `metrics['finite']` is 0.

    Args:
        config: The run's config.
        model: From `create_model(config)`.
        mesh: If given, micro-batches are constrained to stay sharded over it.

    Returns:
        The step function; `metrics` holds scalars: `loss`, `grad_norm`,
        `learning_rate`, `finite`, the means of the other loss terms (`mse`, `vb`;
        `accuracy` for the classifier) and per-quartile sums `<term>_q<k>_sum` with
        counts `count_q<k>` (reduce them with `summarize_metrics`).
    """
    d, m = config.diffusion, config.model
    sched = schedules.make_schedule(d.schedule, d.num_timesteps)
    num_timesteps = sched.num_timesteps
    tx = create_optimizer(config)
    lr_fn = create_learning_rate_fn(config)
    decays = tuple(float(x) for x in config.optim.ema_decays)
    accum = config.train.grad_accum_steps
    is_classifier = m.name == 'classifier'
    loss_aware = d.timestep_sampler == 'loss_aware' and not is_classifier
    conditional = m.num_classes > 0 and not is_classifier
    label_dropout = m.class_dropout_prob if conditional else 0.0

    def example_terms(params, examples, dropout_rng):
        """Per-example loss terms [B] of one (micro-)batch."""
        rngs = {'dropout': dropout_rng}
        x0, i, noise = examples['image'], examples['i'], examples['noise']
        if is_classifier:
            x_t = diffusion.q_sample(sched, x0, i, noise)
            logits = model.apply({'params': params}, x_t, sched.timesteps[i], train=True,
                                 rngs=rngs)
            labels = examples['label']
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
            return {'loss': loss, 'accuracy': accuracy}

        def model_fn(x, t, **kwargs):
            return model.apply({'params': params}, x, t, train=True, rngs=rngs, **kwargs)

        model_kwargs = {'y': examples['label']} if conditional else None
        terms = losses.training_losses(model_fn, sched, x0, i, noise, mean_type=d.mean_type,
                                       var_type=d.var_type, loss_type=d.loss_type,
                                       model_kwargs=model_kwargs)
        return {k: v for k, v in terms.items() if k in ('loss', 'mse', 'vb')}

    def objective(params, examples, dropout_rng):
        terms = example_terms(params, examples, dropout_rng)
        return jnp.mean(terms['loss'] * examples['weights']), terms

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def constrain(x, spec):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

    def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        t_rng, noise_rng, label_rng, dropout_rng = jax.random.split(rng, 4)
        x0 = batch['image'].astype(jnp.float32)  # [B, H, W, C]
        labels = batch['label'].astype(jnp.int32)  # [B]
        batch_size = x0.shape[0]
        if is_classifier:
            i, weights = losses.sample_timesteps(t_rng, batch_size, num_timesteps,
                                                 sampler='uniform')
        else:
            i, weights = losses.sample_timesteps(
                t_rng, batch_size, num_timesteps, sampler=d.timestep_sampler,
                state=state.sampler_state if loss_aware else None)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        if label_dropout > 0:
            drop = jax.random.bernoulli(label_rng, label_dropout, (batch_size,))
            labels = jnp.where(drop, m.num_classes, labels)
        examples = {'image': x0, 'label': labels, 'i': i, 'noise': noise,
                    'weights': weights}

        if accum == 1:
            (loss, terms), grads = grad_fn(state.params, examples, dropout_rng)
        else:
            micro_size = batch_size // accum

            def split(x):
                # Micro-batch k = examples k, k + A, k + 2A, ...: every micro-batch is
                # spread evenly over the devices holding contiguous batch shards.
                x = x.reshape((micro_size, accum) + x.shape[1:]).swapaxes(0, 1)
                return constrain(x, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))

            def body(grad_sum, inputs):
                k, micro = inputs
                (micro_loss, micro_terms), g = grad_fn(
                    state.params, micro, jax.random.fold_in(dropout_rng, k))
                return jax.tree.map(jnp.add, grad_sum, g), (micro_loss, micro_terms)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, (micro_losses, terms) = jax.lax.scan(
                body, zeros, (jnp.arange(accum), jax.tree.map(split, examples)))
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss = jnp.mean(micro_losses)
            # [A, B/A] -> [B] in the original example order.
            terms = jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(batch_size), terms)

        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = tuple(
            jax.tree.map(lambda e, p, dd=decay: dd * e + (1.0 - dd) * p, ema, params)
            for decay, ema in zip(decays, state.ema_params))
        sampler_state = state.sampler_state
        if loss_aware:
            sampler_state = losses.update_loss_aware_state(sampler_state, i, terms['loss'])
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                                  opt_state=opt_state, sampler_state=sampler_state)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Never let a non-finite update into the state: the host raises on `finite`.
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)

        metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': lr_fn(state.step),
                   'finite': finite.astype(jnp.float32)}
        weighted = {k: v * weights for k, v in terms.items()}
        for name, value in weighted.items():
            if name != 'loss':
                metrics[name] = jnp.mean(value)
        metrics.update(_quartile_sums(weighted, i, num_timesteps))
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """`jax.jit` of the step: state replicated and donated, batch sharded `P('data')`."""
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(train_step,
                   in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                   out_shardings=(replicated, replicated),
                   donate_argnums=0)


def _step_config_json(config: ml_collections.ConfigDict) -> str:
    """The part of the config that init and the train step depend on, as JSON."""
    keep = {k: config[k].to_dict() for k in ('model', 'diffusion', 'optim')}
    keep['data'] = {k: config.data[k] for k in ('image_size', 'channels')}
    keep['train'] = {'grad_accum_steps': config.train.grad_accum_steps,
                     'num_train_steps': config.train.num_train_steps}
    if config.optim.lr_schedule == 'constant':
        keep['train']['num_train_steps'] = 0  # The schedule does not depend on it.
    return json.dumps(keep, sort_keys=True, default=list)


_JIT_CACHE: dict[tuple[str, jax.sharding.Mesh], tuple[Callable, Callable]] = {}
_JIT_CACHE_SIZE = 8


def _jitted_fns(config: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
    """(init, train_step) jitted for `config` on `mesh`, cached by the config fields
    they depend on, so repeated runs in one process (resume, notebooks, tests) reuse
    the compiled executables."""
    key = (_step_config_json(config), mesh)
    if key not in _JIT_CACHE:
        config = config.copy_and_resolve_references()
        model = create_model(config)
        init = jax.jit(functools.partial(create_train_state, config, model),
                       out_shardings=parallel.replicated_sharding(mesh))
        if len(_JIT_CACHE) >= _JIT_CACHE_SIZE:
            _JIT_CACHE.pop(next(iter(_JIT_CACHE)))
        _JIT_CACHE[key] = (init, jit_train_step(make_train_step_fn(config, model, mesh), mesh))
    return _JIT_CACHE[key]


def summarize_metrics(step_metrics: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Averages per-step metrics over a log window; per-quartile terms are averaged
    over the examples whose timestep fell in that quartile."""
    if not step_metrics:
        return {}
    keys = step_metrics[0].keys()
    stacked = {k: np.stack([np.asarray(m[k], np.float64) for m in step_metrics]) for k in keys}
    summary = {}
    for key, values in stacked.items():
        if key.startswith('count_q') or key == 'finite':
            continue
        if key.endswith('_sum'):
            name, quartile = key[:-len('_sum')].rsplit('_q', 1)
            count = stacked[f'count_q{quartile}'].sum()
            if count > 0:
                summary[f'{name}_q{quartile}'] = float(values.sum() / count)
        else:
            summary[key] = float(values.mean())
    return summary


# --- preemption --------------------------------------------------------------------------


class PreemptionHandler:
    """Context manager; `reached(step)`, polled every step, says to save and stop.

    One process: a Python SIGTERM handler sets `triggered`. It is installed only
    from the main thread (Python's `signal` rule); the previous handler is restored
    on exit.

    Several processes: JAX's preemption sync service, which
    `jax.distributed.initialize` starts (config `jax_enable_preemption_service`, on
    by default), catches SIGTERM itself and spreads the notice through the
    coordination service; `multihost_utils.reached_preemption_sync_point(step)`
    then returns True on every process at the same step (one past the furthest
    step any process had reached), without a device sync. Every process must call
    it at every step. No Python handler is installed: it would replace the
    service's (which orbax's `CheckpointManager.should_save` also polls). If the
    service is disabled, falls back to the Python handler plus an all-gather
    every `fallback_sync_every` steps.
    """

    def __init__(self, fallback_sync_every: int = 1):
        self.triggered = False
        self._previous = None
        self._service = False
        self._fallback_sync_every = fallback_sync_every

    def handle(self, signum=None, frame=None):
        del signum, frame
        self.triggered = True

    def reached(self, step: int) -> bool:
        """True at the step where every process saves and stops; call every step."""
        if self._service:
            if multihost_utils.reached_preemption_sync_point(step):
                self.triggered = True
            return self.triggered
        if jax.process_count() == 1:
            return self.triggered
        return step % self._fallback_sync_every == 0 and parallel.any_process(
            self.triggered)

    def __enter__(self):
        if jax.process_count() > 1:
            from jax._src import distributed  # pylint: disable=import-outside-toplevel
            self._service = getattr(distributed.global_state, 'preemption_sync_manager',
                                    None) is not None
            if not self._service:
                logger.warning('JAX preemption service disabled: processes agree on a '
                               'SIGTERM only every %d steps.', self._fallback_sync_every)
        if not self._service and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False


# --- the loop ----------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh: jax.sharding.Mesh | None = None) -> TrainState:
    """Trains (or resumes) to `train.num_train_steps`, writing everything to `workdir`.

    Writes `<workdir>/checkpoints/` (see `ddpm_jax.checkpointing`),
    `<workdir>/tensorboard/` event files and `<workdir>/samples/*.png`. Restarting
    with the same config and workdir continues exactly where the last checkpoint
    left off (same next batch, same per-step randomness).

    Args:
        config: The run's config.
        workdir: Run directory.
        mesh: Defaults to a `('data',)` mesh over all devices.

    Returns:
        The final train state.

    Raises:
        ValueError: Invalid config or unwritable workdir (before any compile).
        checkpointing.CheckpointMismatchError: The workdir holds a checkpoint of a
            different model.
        NonFiniteLossError: A non-finite loss/gradient; the last checkpoint written
            before it is left intact and nothing after it is saved.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    validate_config(config, num_devices=parallel.num_mesh_devices(mesh))
    prepare_workdir(workdir)
    model = create_model(config)
    t = config.train
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)

    init_fn, train_step = _jitted_fns(config, mesh)
    train_iter = data_lib.create_train_iterator(config)
    manager = checkpointing.create_checkpoint_manager(workdir, config)
    if manager.latest_step() is not None:
        abstract_state = create_abstract_train_state(config, model, mesh)
        _, state, data_state = checkpointing.restore_checkpoint(manager, abstract_state,
                                                                config)
        # All processes resume their data position, or all restart it together.
        if parallel.any_process(data_state is None):
            logger.warning('No data position saved for %d processes; the data order '
                           'restarts.', jax.process_count())
        else:
            train_iter.set_state(data_state)
    else:
        state = init_fn(init_rng)
    step = int(parallel.to_host(state.step))
    writer = writers.MetricWriter(os.path.join(workdir, 'tensorboard'),
                                  total_steps=t.num_train_steps, initial_step=step)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    writer.write_text(f'{config.model.name}: {num_params:,} parameters; starting at step '
                      f'{step} of {t.num_train_steps} on {parallel.num_mesh_devices(mesh)} '
                      f'devices, {jax.process_count()} processes.')

    write_grid = t.num_grid_samples > 0 and config.model.name == 'unet'
    pending = []  # Device metrics not yet fetched.
    window = []  # Host metrics since the last log line.
    timed_steps, window_start = 0, None  # Throughput excludes compilation.

    def fetch_and_check():
        """Fetches pending metrics; raises if any step was not finite."""
        nonlocal pending
        host = parallel.to_host(pending)
        first_step = step - len(pending) + 1
        pending = []
        for k, metrics in enumerate(host):
            if metrics['finite'] < 1:
                manager.wait_until_finished()
                raise NonFiniteLossError(
                    f'Non-finite loss or gradient at step {first_step + k} '
                    f'(loss={float(metrics["loss"])}, grad_norm='
                    f'{float(metrics["grad_norm"])}). Training stopped; the last good '
                    f'checkpoint is step {manager.latest_step()} in '
                    f'{checkpointing.checkpoint_dir(workdir)}. Try a lower '
                    'optim.learning_rate or optim.grad_clip_norm > 0.')
        window.extend(host)

    try:
        with PreemptionHandler(t.log_every_steps) as preemption:
            while step < t.num_train_steps:
                batch = data_lib.to_global_batch(next(train_iter),
                                                 parallel.batch_sharding(mesh))
                if window_start is None:  # First step: compiles once per config and mesh.
                    start = time.perf_counter()
                    state, metrics = train_step(state, batch, step_rng)
                    jax.block_until_ready(metrics)
                    writer.write_text(f'First step (with compilation): '
                                      f'{time.perf_counter() - start:.1f} s.')
                    window_start = time.perf_counter()
                else:
                    state, metrics = train_step(state, batch, step_rng)
                    timed_steps += 1
                step += 1
                pending.append(metrics)
                writer.advance()
                is_last = step == t.num_train_steps
                should_log = step % t.log_every_steps == 0 or is_last
                preempted = preemption.reached(step)  # The same step on every process.
                should_save = is_last or preempted or manager.should_save(step)
                if should_log or should_save:
                    fetch_and_check()  # A non-finite state is never saved or logged.
                if should_log:
                    scalars = summarize_metrics(window)
                    elapsed = time.perf_counter() - window_start
                    if timed_steps:
                        scalars['steps_per_sec'] = timed_steps / elapsed
                        scalars['images_per_sec'] = (timed_steps * t.global_batch_size
                                                     / elapsed)
                    writer.write_scalars(step, scalars)
                    window = []
                if should_save and manager.latest_step() != step:
                    checkpointing.save_checkpoint(manager, step, state, config,
                                                  train_iter.get_state(),
                                                  force=is_last or preempted)
                if write_grid and (is_last or (
                        t.sample_every_steps > 0 and step % t.sample_every_steps == 0)):
                    ema_params = checkpointing.select_ema_params(config, state.ema_params)
                    path = sampling.write_sample_grid(config, model, ema_params, step,
                                                      workdir, mesh)
                    if path:
                        writer.write_text(f'Wrote {path}')
                if preempted:
                    writer.write_text(f'Preempted: saved step {step}; stopping.')
                    break
                if should_log:  # The next window excludes logging, saving and sampling.
                    timed_steps, window_start = 0, time.perf_counter()
        manager.wait_until_finished()
    finally:
        manager.close()
        writer.close()
        train_iter.close()  # Stops grain's prefetch threads and worker processes.
    return state
