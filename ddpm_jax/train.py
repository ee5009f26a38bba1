"""Training: the one generic train loop, its jitted step and its workdir records.

The loop follows the shape shared by the Flax examples and big_vision:

1. Validate the config (`config_lib.validate`) and the workdir before anything is
   compiled.
2. A 1-D `('data',)` mesh; batches sharded `P('data')`, the state replicated `P()`.
3. The state is one pytree (`state.TrainState`), created under `jax.jit` with
   replicated out_shardings or restored by orbax against `jax.eval_shape` of it.
4. `train_step(state, batch, rng)` is pure, draws its randomness from
   `jax.random.fold_in(rng, state.step)` (no RNG state to save, so resuming is bit
   for bit) and is compiled once with the state donated.
5. Metrics, checkpoints, EMA sample grids and (optionally) the FID of EMA samples
   are written at fixed step intervals; SIGTERM triggers a final checkpoint and a
   clean exit.

What is trained is a task (`ddpm_jax.tasks`): its parameter trees, optimisers,
update phases, loss and grids. `Trainer` holds the compiled init and step for one
(config, task, mesh), so calling `Trainer.train` again (a resume in a notebook or a
test) reuses them.
"""

import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import checkpointing
from ddpm_jax import config_lib
from ddpm_jax import control_flow
from ddpm_jax import data as data_lib
from ddpm_jax import images as images_lib
from ddpm_jax import latent_cache
from ddpm_jax import parallel
from ddpm_jax import sample_quality
from ddpm_jax import state as state_lib
from ddpm_jax import tasks
from ddpm_jax import workdir as workdir_lib
from ddpm_jax import writers

logger = logging.getLogger('ddpm_jax')

__all__ = ['NonFiniteLossError', 'PreemptionHandler', 'Trainer', 'jit_train_step',
           'make_train_step_fn', 'run_training', 'summarize_metrics']


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient; no state after it was saved."""


# --- the train step -------------------------------------------------------------------------


def _phase_name(task: tasks.Task, k: int) -> str:
    """Metric suffix of phase k: '' for a single phase, else '_<parts>'."""
    return '' if len(task.phases) == 1 else '_' + '_'.join(task.phases[k])


def make_train_step_fn(task: tasks.Task, mesh: jax.sharding.Mesh | None = None
                       ) -> Callable:
    """Builds the pure `train_step(state, batch, rng) -> (state, metrics)`.

    Per step: fold the step into `rng`; let the task draw its per-example inputs
    for the whole global batch (`task.prepare_batch`); then for each of the task's
    phases, average the gradients of its loss with respect to the phase's parts
    over `train.grad_accum_steps` micro-batches in a `lax.scan` (unrolled on the CPU,
    see `control_flow`; the same draws, so equal to one big batch up to float
    rounding; with `optim.grad_clip_groups` G > 1, the gradient of each of G groups of
    the batch is clipped to `optim.grad_clip_norm` and the clipped ones averaged, as
    DDPM's TPU replicas did) and apply each part's optimiser; then update the EMAs and
    the task state. If any loss or gradient norm is not finite the old state is returned
    unchanged and `metrics['finite']` is 0.

    Args:
        task: The task (`tasks.create_task(config)`).
        mesh: If given, micro-batches are constrained to stay sharded over it.

    Returns:
        The step function; `metrics` holds scalars: `loss`, `grad_norm` (with a
        `_<parts>` suffix per phase when there are several), `learning_rate` (with a
        `_<part>` suffix when there are several parts), `finite`, and the task's
        `step_metrics`.
    """
    config = task.config
    optimizers = task.create_optimizers()
    decays = tuple(float(x) for x in config.optim.ema_decays)
    accum = config.train.grad_accum_steps
    # Gradients clipped per group of the batch (each micro-batch holds whole groups).
    groups = config.optim.grad_clip_groups
    groups_per_micro = groups // accum  # Read only when groups > 1.
    clip_norm = float(config.optim.grad_clip_norm)

    def constrain(x, spec):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

    def split(x, count):
        # [B] -> [count, B / count], part m = examples m, m + count, m + 2 count, ...:
        # every part is spread evenly over the devices holding contiguous batch shards.
        x = x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)
        return constrain(x, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))

    def join(x):  # [count, B / count] -> [B] in the original example order.
        return x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])

    def phase_gradients(k, params, examples, rng):
        """(loss, per-example terms, grads of the phase's parts), averaged over micro-batches."""
        phase = task.phases[k]

        def objective(trainable, micro, micro_rng):
            return task.loss(k, {**params, **trainable}, micro, micro_rng)

        value_and_grad = jax.value_and_grad(objective, has_aux=True)

        def grad_fn(trainable, micro, micro_rng):
            if groups == 1:
                return value_and_grad(trainable, micro, micro_rng)
            # optim.grad_clip_groups: each group's gradient clipped to the norm, then
            # averaged (DDPM's per-replica clipping on its TPU's 8 replicas).
            keys = jax.random.split(micro_rng, groups_per_micro)
            (losses, terms), g = jax.vmap(value_and_grad, in_axes=(None, 0, 0))(
                trainable, jax.tree.map(lambda x: split(x, groups_per_micro), micro), keys)
            scale = jnp.minimum(1.0, clip_norm / jax.vmap(optax.global_norm)(g))
            g = jax.tree.map(lambda x: jnp.tensordot(scale, x, axes=1) / groups_per_micro, g)
            return (jnp.mean(losses), jax.tree.map(join, terms)), g

        trainable = {part: params[part] for part in phase}
        if accum == 1:
            (loss, terms), grads = grad_fn(trainable, examples, rng)
            return loss, terms, grads
        def body(grad_sum, inputs):
            m, micro = inputs
            (micro_loss, micro_terms), g = grad_fn(trainable, micro, jax.random.fold_in(rng, m))
            return jax.tree.map(jnp.add, grad_sum, g), (micro_loss, micro_terms)

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        # On the CPU unrolled: gradients inside a loop body run far slower there.
        grads, (micro_losses, terms) = control_flow.scan(
            body, zeros, (jnp.arange(accum), jax.tree.map(lambda x: split(x, accum), examples)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        return jnp.mean(micro_losses), jax.tree.map(join, terms), grads

    def train_step(state: state_lib.TrainState, batch: Mapping[str, jax.Array],
                   rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        prepare_rng, loss_rng = jax.random.split(rng)
        examples = task.prepare_batch(batch, prepare_rng, state.task_state)
        params, opt_state = dict(state.params), dict(state.opt_state)
        metrics, all_terms, finite = {}, [], jnp.array(True)
        for k, phase in enumerate(task.phases):
            loss, terms, grads = phase_gradients(k, params, examples,
                                                 jax.random.fold_in(loss_rng, k))
            part_norms = {part: optax.global_norm(grads[part]) for part in phase}
            grad_norm = (part_norms[phase[0]] if len(phase) == 1 else
                         jnp.sqrt(sum(jnp.square(n) for n in part_norms.values())))
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            for part in phase:
                params[part], opt_state[part] = state_lib.apply_optimizer(
                    optimizers[part], grads[part], opt_state[part], params[part], ok,
                    grad_norm=part_norms[part])
            finite &= ok
            suffix = _phase_name(task, k)
            metrics[f'loss{suffix}'] = loss
            metrics[f'grad_norm{suffix}'] = grad_norm
            all_terms.append(terms)
        all_terms = tuple(all_terms)
        if task.ema_from_first_update:  # e_1 = 0 e_0 + 1 p_1 = p_1 exactly.
            decays_now = [jnp.where(state.step == 0, 0.0, d) for d in decays]
        else:
            decays_now = decays
        ema_params = tuple(state_lib.update_ema(ema, params, decay, finite)
                           for decay, ema in zip(decays_now, state.ema_params))
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
            task_state=task.update_task_state(state.task_state, examples, all_terms))
        # Never let a non-finite update into the state (the host raises on `finite`).
        # Each phase's optimiser step is kept only where its own loss and gradients
        # are finite and the EMAs only where all are; with one phase that is all of
        # it, so only the step counter and task state are left to guard here.
        # (Guarding the whole state again would cost XLA copies and passes over it.)
        if len(task.phases) == 1:
            new_state = new_state.replace(
                step=state_lib.keep_where(finite, new_state.step, state.step),
                task_state=state_lib.keep_where(finite, new_state.task_state,
                                                state.task_state))
        else:  # A later phase's failure also reverts the earlier phases' steps.
            new_state = state_lib.keep_where(finite, new_state, state)
        single = len(optimizers) == 1
        for part, optimizer in optimizers.items():
            metrics['learning_rate' if single else f'learning_rate_{part}'] = (
                optimizer.learning_rate_fn(state.step))
        metrics['finite'] = finite.astype(jnp.float32)
        metrics.update(task.step_metrics(examples, all_terms))
        return new_state, metrics

    return train_step


def create_train_iterator(config: ml_collections.ConfigDict):
    """The trainer's data stream: a latent-diffusion run with `latent.cache` set reads
    the cached latents (`latent_cache`), every other run the images (`data`); both in
    the same order, with the same checkpointable state."""
    if config.task == 'latent_diffusion' and config.latent.cache != 'none':
        return latent_cache.create_train_iterator(config)
    return data_lib.create_train_iterator(config)


def check_inputs(config: ml_collections.ConfigDict) -> None:
    """What training reads besides the workdir, from metadata only (nothing is built or
    compiled): the dataset and `data.split`, its classes against `model.num_classes`,
    and with periodic FID the reference file or split. `Trainer.train` calls it before
    it creates the workdir; main.py before it points JAX's compilation cache there.

    Raises:
        ValueError: A field naming a bad split, too few classes or an unreadable
            reference.
        FileNotFoundError: A missing dataset or reference file.
    """
    have = data_lib.dataset_info(config)['num_classes']
    num_classes = config.model.num_classes
    if 0 < num_classes < have:
        raise ValueError(f'model.num_classes={num_classes} is smaller than the '
                         f'{have} classes of data.dataset={config.data.dataset!r}; '
                         f'set model.num_classes={have}.')
    if config.train.fid_every_steps > 0:
        sample_quality.check_reference(config)


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """`jax.jit` of the step: state replicated and donated, batch sharded `P('data')`."""
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(train_step,
                   in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                   out_shardings=(replicated, replicated),
                   donate_argnums=0, compiler_options=parallel.compiler_options())


def summarize_metrics(step_metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Averages per-step metrics over a log window.

    A `<name>_<group>_sum` metric is divided by the window's `count_<group>` total,
    giving `<name>_<group>`: the average over the examples (or steps) that the group
    counted, e.g. `loss_q1` over the examples whose timestep fell in quarter 1.
    `finite` and the counts are dropped; the rest are averaged over steps.
    """
    if not step_metrics:
        return {}
    keys = step_metrics[0].keys()
    stacked = {k: np.stack([np.asarray(m[k], np.float64) for m in step_metrics]) for k in keys}
    summary = {}
    for key, values in stacked.items():
        if key.startswith('count_') or key == 'finite':
            continue
        if key.endswith('_sum'):
            name = key[:-len('_sum')]
            count = stacked[f'count_{name.rsplit("_", 1)[1]}'].sum()
            if count > 0:
                summary[name] = float(values.sum() / count)
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


class Trainer:
    """The compiled pieces of one training setup: (config, task, mesh).

    Built once (validation, task, jitted init and step, the grid function), then
    `train(workdir)` trains or resumes; calling it again (e.g. after a stop, or on
    another workdir) reuses the compiled programs.

    Args:
        config: The run's config; validated here, before anything compiles.
        mesh: Defaults to a `('data',)` mesh over all devices.
        task: The task to train; default `tasks.create_task(config)`. Passing one
            trains a model family that is not in the registry.

    Raises:
        ValueError: An invalid config.
    """

    def __init__(self, config: ml_collections.ConfigDict, *,
                 mesh: jax.sharding.Mesh | None = None, task: tasks.Task | None = None):
        self.mesh = parallel.create_mesh() if mesh is None else mesh
        if task is None:
            config_lib.validate(config, mode='train',
                                num_devices=parallel.num_mesh_devices(self.mesh))
        self.config = config = config.copy_and_resolve_references()
        self.task = tasks.create_task(config) if task is None else task
        self._init = jax.jit(functools.partial(state_lib.create_train_state, self.task),
                             out_shardings=parallel.replicated_sharding(self.mesh))
        self.train_step = jit_train_step(make_train_step_fn(self.task, self.mesh), self.mesh)
        self._grid_fn = None
        if config.train.num_grid_samples > 0:
            self._grid_fn = self.task.make_grid_fn(self.mesh, config_lib.rng_for(config, 'grid'))

    def init_state(self) -> state_lib.TrainState:
        """A fresh, replicated train state."""
        return self._init(config_lib.rng_for(self.config, 'init'))

    def abstract_state(self) -> state_lib.TrainState:
        """The state's shapes and shardings, for restoring."""
        return state_lib.create_abstract_train_state(self.task, self.mesh)

    def _write_grid(self, state: state_lib.TrainState, step: int, workdir: str) -> str | None:
        """Samples the grid with the chosen EMA copy; process 0 writes the PNG."""
        images, columns = self._grid_fn(
            state_lib.select_ema_params(self.config, state.ema_params), state.task_state)
        if jax.process_index() != 0:
            return None
        pixels = images_lib.to_uint8(images, self.config.sample.quantize)
        grid = images_lib.make_grid(pixels, columns,
                                    scale=images_lib.upscale_factor(self.config.data.image_size))
        return images_lib.save_png(epath.Path(workdir) / 'samples' / f'step_{step}.png', grid)

    def train(self, workdir: str, *, stop_at_step: int | None = None) -> state_lib.TrainState:
        """Trains (or resumes) to `train.num_train_steps`, writing everything to `workdir`.

        Writes `<workdir>/checkpoints/` (see `ddpm_jax.checkpointing`),
        `<workdir>/tensorboard/` event files and `<workdir>/samples/*.png`. Restarting
        with the same config and workdir continues exactly where the last checkpoint
        left off (same next batch, same per-step randomness).

        Args:
            workdir: Run directory.
            stop_at_step: Stop (with a checkpoint) at this step instead of
                `train.num_train_steps`; the schedules still run to the latter.

        Returns:
            The final train state.

        Raises:
            ValueError: An unwritable workdir, or inputs refused by `check_inputs`
                (before the workdir is created or anything compiles).
            FileNotFoundError: A missing dataset or FID reference file (as early).
            checkpointing.CheckpointMismatchError: The workdir holds a checkpoint of a
                different model.
            NonFiniteLossError: A non-finite loss/gradient; the last checkpoint written
                before it is left intact and nothing after it is saved.
        """
        config = self.config
        train_opts = config.train
        last_step = train_opts.num_train_steps
        if stop_at_step is not None:
            last_step = min(stop_at_step, last_step)
        checkpointing.check_workdir_compatible(config, workdir)
        check_inputs(config)  # A refused run leaves no workdir behind.
        workdir_lib.prepare(workdir)
        lock = workdir_lib.TrainLock(workdir)
        failure = None
        try:
            lock.acquire()
        except workdir_lib.WorkdirLockedError as e:
            failure = e
        if parallel.any_process(failure is not None):  # Every process stops together.
            raise failure or workdir_lib.WorkdirLockedError(
                f'{workdir} is in use by another trainer (see process 0).')
        try:
            return self._train_locked(workdir, last_step)
        finally:
            lock.release()

    def _train_locked(self, workdir: str, last_step: int) -> state_lib.TrainState:
        config, mesh = self.config, self.mesh
        train_opts = config.train
        fid_fn = None
        if train_opts.fid_every_steps > 0:  # Weights and reference load now: fail early.
            fid_fn = sample_quality.make_training_fid_fn(config, mesh, workdir)
        step_rng = config_lib.rng_for(config, 'train')
        train_iter = create_train_iterator(config)
        manager = checkpointing.create_checkpoint_manager(workdir, config)
        try:
            if checkpointing.has_checkpoints(manager):
                _, state, data_state = checkpointing.restore_checkpoint(
                    manager, self.abstract_state(), config)
                # All processes resume their data position, or all restart it together.
                if parallel.any_process(data_state is None):
                    logger.warning('No data position saved for %d processes; the data '
                                   'order restarts.', jax.process_count())
                else:
                    train_iter.set_state(data_state)
            else:
                state = self.init_state()
        except BaseException:
            manager.close()
            train_iter.close()
            raise
        # The run's checks passed: log it. config.json describes the checkpoints, so it
        # is (re)written only once this run has saved one.
        workdir_lib.append_run_record(workdir, 'train', config)
        config_recorded = False
        step = int(parallel.to_host(state.step))
        writer = writers.MetricWriter(os.path.join(workdir, 'tensorboard'),
                                      total_steps=last_step, initial_step=step)
        num_params = sum(x.size for x in jax.tree.leaves(state.params))
        writer.write_text(f'{config.task} ({", ".join(self.task.parts)}): {num_params:,} '
                          f'parameters; starting at step {step} of {last_step} on '
                          f'{parallel.num_mesh_devices(mesh)} devices, '
                          f'{jax.process_count()} processes.')
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
                    shown = ', '.join(f'{name}={float(metrics[name])}' for name in metrics
                                      if name.startswith(('loss', 'grad_norm')))
                    latest = manager.latest_step()
                    kept = (f'the last good checkpoint is step {latest} in '
                            f'{checkpointing.checkpoint_dir(workdir)}' if latest is not None
                            else 'no checkpoint was written before it')
                    hint = ('a lower optim.learning_rate' if config.optim.grad_clip_norm > 0
                            else 'a lower optim.learning_rate or optim.grad_clip_norm > 0')
                    raise NonFiniteLossError(
                        f'Non-finite loss or gradient at step {first_step + k} ({shown}). '
                        f'Training stopped; {kept}. Try {hint}.')
            window.extend(host)

        try:
            with PreemptionHandler(train_opts.log_every_steps) as preemption:
                while step < last_step:
                    batch = parallel.to_global(next(train_iter), mesh)
                    if window_start is None:  # First step: compiles once per Trainer.
                        start = time.perf_counter()
                        state, metrics = self.train_step(state, batch, step_rng)
                        jax.block_until_ready(metrics)
                        writer.write_text(f'First step (with compilation): '
                                          f'{time.perf_counter() - start:.1f} s.')
                        window_start = time.perf_counter()
                    else:
                        state, metrics = self.train_step(state, batch, step_rng)
                        timed_steps += 1
                    step += 1
                    pending.append(metrics)
                    writer.advance()
                    is_last = step == last_step
                    should_log = step % train_opts.log_every_steps == 0 or is_last
                    preempted = preemption.reached(step)  # The same step on every process.
                    should_save = is_last or preempted or manager.should_save(step)
                    if should_log or should_save:
                        fetch_and_check()  # A non-finite state is never saved or logged.
                    if should_log:
                        scalars = summarize_metrics(window)
                        elapsed = time.perf_counter() - window_start
                        if timed_steps:
                            scalars['steps_per_sec'] = timed_steps / elapsed
                            scalars['images_per_sec'] = (timed_steps * train_opts.global_batch_size
                                                         / elapsed)
                        writer.write_scalars(step, scalars)
                        window = []
                    if should_save and manager.latest_step() != step:
                        checkpointing.save_checkpoint(manager, step, state, config,
                                                      train_iter.get_state(),
                                                      force=is_last or preempted)
                        if not config_recorded:
                            workdir_lib.write_config_record(config, workdir)
                            config_recorded = True
                    every = train_opts.sample_every_steps
                    if self._grid_fn is not None and (is_last or (
                            every > 0 and step % every == 0)):
                        path = self._write_grid(state, step, workdir)
                        if path:
                            writer.write_text(f'Wrote {path}')
                    if fid_fn is not None and (step % train_opts.fid_every_steps == 0 or is_last):
                        scores = fid_fn(state_lib.select_ema_params(config, state.ema_params))
                        writer.write_scalars(step, {f'fid/{k}': v for k, v in scores.items()})
                    if preempted:
                        writer.write_text(f'Preempted: saved step {step}; stopping.')
                        break
                    if should_log:  # The next window excludes logging, saving and grids.
                        timed_steps, window_start = 0, time.perf_counter()
            manager.wait_until_finished()
        finally:
            manager.close()
            writer.close()
            train_iter.close()  # Stops grain's prefetch threads and worker processes.
        return state


def run_training(config: ml_collections.ConfigDict, workdir: str, *,
                 mesh: jax.sharding.Mesh | None = None) -> state_lib.TrainState:
    """`--mode=train`: `Trainer(config, mesh=mesh).train(workdir)`."""
    return Trainer(config, mesh=mesh).train(workdir)
