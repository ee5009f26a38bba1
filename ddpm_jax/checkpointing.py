"""Checkpoints: an orbax `CheckpointManager` over `<workdir>/checkpoints`.

Each step directory `<workdir>/checkpoints/<step>/` holds four items:

- `state/`: the whole `state.TrainState` pytree (step, parameter trees, EMA copies,
  optimiser states, task state), written with `StandardSave` and restored against
  `jax.eval_shape` of the state carrying the *current* mesh's shardings, so a run
  can resume on a different number of devices.
- `meta/`: the state's layout version (`state.STATE_LAYOUT_VERSION`) and the task's
  parts. Checkpoints in the earlier layout have no `meta/`; their single-model state
  (parameters at the top level, `sampler_state`) is read and converted to the current
  layout.
- `data/`: the training data iterator's position, one JSON file per process
  (`process_<i>-of-<n>.json`), so a resumed run sees the same next batch.
- `config/`: the resolved config as JSON; a checkpoint is only restored by a config
  whose structural fields (the model section, the diffusion process, the image
  shape, the optimiser's state layout) match it.

Orbax writes each step into a temporary directory and renames it when every
process has finished, so a step left half-written by a crash is never listed or
loaded. Saves are asynchronous; call `wait_until_finished()` before exiting.
"""

import contextlib
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import config_json
from ddpm_jax import config_lib
from ddpm_jax import state as state_lib
from ddpm_jax import tasks

logger = logging.getLogger('ddpm_jax')

CHECKPOINT_SUBDIR = 'checkpoints'

# Config fields whose value decides the layout or meaning of the saved state. A
# dotted name that is a section ('model') covers every field below it.
STRUCTURAL_FIELDS = (
    'task',
    'model',
    'diffusion.num_timesteps',
    'diffusion.schedule',
    'diffusion.beta_start',
    'diffusion.beta_end',
    'diffusion.mean_type',
    'diffusion.var_type',
    'diffusion.timestep_sampling',
    'data.image_size',
    'data.channels',
    'data.wordnet_label_order',
    'optim.optimizer',
    'optim.ema_decays',
)
# Model fields that only change how the same parameters are computed with (or start).
COMPUTE_ONLY_FIELDS = ('model.dtype', 'model.remat', 'model.remat_policy', 'model.dropout',
                       'model.bias_init')


class CheckpointMismatchError(ValueError):
    """The config does not describe the model/state stored in the checkpoint."""


# --- data iterator item ---------------------------------------------------------------


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves a data iterator's `get_state()` as one JSON file per process.

    The state is snapshotted on the host when the save is requested (see
    `DataIteratorSave`), so later `next()` calls cannot leak into the checkpoint.
    Byte-string states (grain `DataLoaderIterator`) and JSON-able states (grain
    `DatasetIterator`, plain dicts) are both supported.
    """

    @staticmethod
    def _filename(directory: epath.Path) -> epath.Path:
        return directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'

    def save(self, directory: epath.Path, args: 'DataIteratorSave'):
        state = args.state
        if isinstance(state, bytes):
            record = {'format': 'bytes', 'value': state.decode()}
        else:
            record = {'format': 'json', 'value': state}
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._filename(directory).write_text(json.dumps(record, default=_json_default))

    def restore(self, directory: epath.Path, args: 'DataIteratorRestore' = None):
        del args
        filename = self._filename(epath.Path(directory))
        if not filename.exists():
            return None  # Saved by a different number of processes.
        record = json.loads(filename.read_text())
        if record['format'] == 'bytes':
            return record['value'].encode()
        return record['value']


def _json_default(obj):
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode()
    raise TypeError(f'Cannot serialise {type(obj).__name__} in a data iterator state.')


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    """Save args: `state` is the iterator's `get_state()` at the save step."""
    state: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    """Restore args for `DataIteratorHandler` (nothing to specify)."""


# --- manager --------------------------------------------------------------------------


def checkpoint_dir(workdir: str) -> epath.Path:
    """`<workdir>/checkpoints`, made absolute for local paths (orbax requires it)."""
    workdir = str(workdir)
    if '://' not in workdir:  # Leave gs://, s3:// ... untouched.
        workdir = os.path.abspath(workdir)
    return epath.Path(workdir) / CHECKPOINT_SUBDIR


class _DropReadOnlyWarnings(logging.Filter):
    """Hides orbax's warnings that a read-only manager is read-only (every restore)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ('read_only=True' in message or 'is read only' in message)


@contextlib.contextmanager
def _quiet_orbax():
    absl_logger = logging.getLogger('absl')
    drop = _DropReadOnlyWarnings()
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)


def create_checkpoint_manager(workdir: str, config: ml_collections.ConfigDict, *,
                              read_only: bool = False) -> ocp.CheckpointManager:
    """Creates the manager with the save and preservation policies from `config.train`.

    Saves every `train.checkpoint_every_steps`; keeps the `train.keep_checkpoints`
    latest plus, if `train.keep_checkpoint_every_steps > 0`, every step that is a
    multiple of it.

    Args:
        workdir: Run directory; checkpoints go to `<workdir>/checkpoints`.
        config: The run's config.
        read_only: Open an existing directory for restoring only (sampling, eval).
    """
    with _quiet_orbax():
        policies = ocp.checkpoint_managers
        preservation = [policies.LatestN(n=config.train.keep_checkpoints)]
        if config.train.keep_checkpoint_every_steps > 0:
            preservation.append(policies.EveryNSteps(
                interval_steps=config.train.keep_checkpoint_every_steps))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(
                interval=config.train.checkpoint_every_steps),
            preservation_policy=policies.AnyPreservationPolicy(preservation),
            create=not read_only,
            read_only=read_only,
            # Removes temporary step directories left behind by a crashed save.
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=True,
            # The data item is written synchronously by every process; the step directory
            # must exist before it, not be created (and possibly wiped) in the background.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        return ocp.CheckpointManager(
            checkpoint_dir(workdir),
            options=options,
            item_handlers={
                'state': ocp.StandardCheckpointHandler(),
                'data': DataIteratorHandler(),
                'config': ocp.JsonCheckpointHandler(),
                'meta': ocp.JsonCheckpointHandler(),
            },
        )


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any,
                    config: ml_collections.ConfigDict, data_state: Any = None, *,
                    force: bool = False) -> bool:
    """Starts an asynchronous save of `state` (and the data position) at `step`.

    Args:
        manager: From `create_checkpoint_manager`.
        step: Optimiser step the state is at.
        state: The train state pytree (global jax arrays).
        config: Stored next to the state for the compatibility check on restore.
        data_state: The data iterator's `get_state()` (None: not saved).
        force: Save even if the save decision policy says no (end of run,
            preemption).

    Returns:
        Whether a save was started.
    """
    items = {
        'state': ocp.args.StandardSave(state),
        'config': ocp.args.JsonSave(config_lib.to_json_dict(config)),
        'meta': ocp.args.JsonSave({'state_layout': state_lib.STATE_LAYOUT_VERSION,
                                   'parts': list(state.params)}),
    }
    if data_state is not None:
        items['data'] = DataIteratorSave(data_state)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
    if isinstance(tree, Mapping):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f'{prefix}{key}.'))
        return flat
    return {prefix[:-1]: tree}


# Fields that define what a model's output means only for some tasks.
TASK_STRUCTURAL_FIELDS = {
    'score': ('sde.kind', 'sde.beta_min', 'sde.beta_max', 'sde.sigma_min', 'sde.sigma_max',
              'sde.continuous'),
    # The discriminator's layout.
    'ddgan': ('gan.disc_base_channels', 'gan.disc_channel_mult', 'gan.disc_downsample_first',
              'gan.disc_temb_dim', 'gan.disc_blocks'),
}


def _structural(flat: Mapping[str, Any]) -> dict[str, Any]:
    fields = STRUCTURAL_FIELDS + TASK_STRUCTURAL_FIELDS.get(flat.get('task'), ())

    def relevant(name):
        if name in COMPUTE_ONLY_FIELDS:
            return False
        return any(name == f or name.startswith(f + '.') for f in fields)
    return {k: v for k, v in flat.items() if relevant(k)}


def check_config_compatible(saved_config: Mapping[str, Any],
                            config: ml_collections.ConfigDict) -> None:
    """Refuses a config whose structural fields differ from the checkpoint's.

    Args:
        saved_config: The JSON config stored in the checkpoint.
        config: The config of the current run.

    Raises:
        CheckpointMismatchError: Naming every differing field with both values.
    """
    saved = _structural(_flatten(config_lib.upgrade_json_dict(saved_config)))
    current = _structural(_flatten(config_lib.to_json_dict(config)))
    missing = object()
    diffs = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name, missing), current.get(name, missing)
        if old != new:
            fmt = lambda v: '<absent>' if v is missing else repr(v)  # noqa: E731
            diffs.append(f'{name}: checkpoint={fmt(old)}, config={fmt(new)}')
    if diffs:
        raise CheckpointMismatchError(
            'The config does not match the checkpoint; differing fields: '
            + '; '.join(diffs) + ". Use the checkpoint's config or a new --workdir.")


def check_workdir_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses `config` early if `workdir` holds checkpoints of a different model.

    Called before anything is written to the workdir, so a mistaken resume leaves the
    run's `config.json` describing its checkpoints.

    Raises:
        CheckpointMismatchError: As `check_config_compatible`.
    """
    if not checkpoint_dir(workdir).exists():
        return
    try:
        saved = load_config(workdir)
    except FileNotFoundError:  # A directory without a finished step.
        return
    check_config_compatible(config_lib.to_json_dict(saved), config)


def _legacy_layout(tree: Any) -> dict[str, Any]:
    """A current single-part `TrainState` (abstract or not) in the earlier layout (the
    one without a `meta/` item)."""
    return {'step': tree.step, 'params': tree.params['model'],
            'ema_params': tuple(ema['model'] for ema in tree.ema_params),
            'opt_state': tree.opt_state['model'], 'sampler_state': tree.task_state}


def _from_legacy_layout(legacy: Mapping[str, Any]) -> state_lib.TrainState:
    return state_lib.TrainState(
        step=legacy['step'], params={'model': legacy['params']},
        ema_params=tuple({'model': ema} for ema in legacy['ema_params']),
        opt_state={'model': legacy['opt_state']}, task_state=legacy['sampler_state'])


# --- damaged steps --------------------------------------------------------------------

# Files of a step directory that are JSON (orbax's metadata and our items).
_JSON_FILES = ('_CHECKPOINT_METADATA', 'config/metadata', 'meta/metadata', 'state/_METADATA',
               'state/_sharding')
DAMAGED_SUBDIR = 'damaged_checkpoints'


class CheckpointDamagedError(ValueError):
    """A checkpoint step cannot be read; `file` names what is damaged."""

    def __init__(self, step: int, file: str, reason: str):
        super().__init__(f'checkpoint step {step} is unreadable: {file}: {reason}')
        self.step, self.file, self.reason = step, file, reason


def _walk_files(directory: epath.Path) -> list[epath.Path]:
    """Every file below `directory` (epath has no recursive glob for cloud paths)."""
    files = []
    for path in sorted(epath.Path(directory).iterdir()):
        if path.is_dir():
            files.extend(_walk_files(path))
        else:
            files.append(path)
    return files


def find_damage(step_dir: epath.Path) -> tuple[str, str] | None:
    """(file, reason) for the first empty or unparsable file of a step, or None.

    Cheap checks only: every file non-empty (orbax's array data files included),
    and the JSON files parse. A truncated array file passes; restoring finds it.
    """
    step_dir = epath.Path(step_dir)
    json_files = {step_dir / name for name in _JSON_FILES}
    json_files |= set((step_dir / 'data').glob('*.json'))
    for path in _walk_files(step_dir):
        relative = str(path)[len(str(step_dir)) + 1:]
        if path.stat().length == 0 and path.name != 'commit_success.txt':
            return relative, 'empty file'
        if path in json_files:
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                return relative, f'not valid JSON ({e})'
    for name in ('state/_METADATA', 'config/metadata'):
        if not (step_dir / name).exists():
            return name, 'missing'
    return None


def _damaged_file(step_dir: epath.Path, error: BaseException) -> str:
    """The file of `step_dir` an exception names, else the state item."""
    message = str(error)
    for path in sorted(_walk_files(step_dir), key=lambda p: -len(str(p))):
        if (str(path) in message or (
                path.name in message and len(path.name) > 12)):
            return str(path)[len(str(step_dir)) + 1:]
    return 'state/ (an array file)'


def set_aside(manager: ocp.CheckpointManager, damage: CheckpointDamagedError) -> epath.Path:
    """Moves a damaged step to `<workdir>/damaged_checkpoints/<step>` (never deletes it).

    Process 0 moves it; every process then waits for the move and re-reads the step
    list, so all agree on the steps that remain.
    """
    source = epath.Path(manager.directory) / str(damage.step)
    target_dir = epath.Path(manager.directory).parent / DAMAGED_SUBDIR
    target = target_dir / str(damage.step)
    k = 0
    while target.exists():
        k += 1
        target = target_dir / f'{damage.step}_{k}'
    if jax.process_index() == 0:
        target_dir.mkdir(parents=True, exist_ok=True)
        source.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'set_aside_{damage.step}')
    manager.reload()
    logger.warning('%s; moved it to %s and trying the previous step.', damage, target)
    return target


class _DropAsyncioLeftovers(logging.Filter):
    """Hides asyncio's 'exception was never retrieved' for the reads a failed restore
    abandoned (the failure itself is reported in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return 'exception was never retrieved' not in record.getMessage()


@contextlib.contextmanager
def _quiet_failed_restore():
    """While restoring: drop the noise of a restore that fails on a damaged file.

    TensorStore keeps delivering the other reads' results to orbax's event loop
    after it closed (hundreds of 'Event loop is closed' tracebacks) and asyncio
    logs the abandoned futures; neither says anything the one-line report does not.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and 'Event loop is closed' in str(unraisable.exc_value)):
            previous(unraisable)

    drop = _DropAsyncioLeftovers()
    asyncio_logger = logging.getLogger('asyncio')
    sys.unraisablehook = hook
    asyncio_logger.addFilter(drop)
    try:
        yield
    finally:
        gc.collect()  # Runs the abandoned futures' finalisers while the filters are on.
        time.sleep(0.05)
        sys.unraisablehook = previous
        asyncio_logger.removeFilter(drop)


def has_checkpoints(manager: ocp.CheckpointManager) -> bool:
    """Whether the manager's directory holds any finalised step."""
    return bool(manager.all_steps())


# Words of TensorStore / file-system errors: the bytes on disk are bad or missing.
_READ_ERROR_WORDS = ('OUT_OF_RANGE', 'DATA_LOSS', 'FAILED_PRECONDITION', 'NOT_FOUND',
                     'Error reading', 'Error opening', 'corrupt', 'No such file')


def _is_layout_mismatch(error: BaseException) -> bool:
    """Whether a restore error says the checkpoint's tree differs from the target's
    (a code or config change), as opposed to unreadable files."""
    message = str(error)
    if any(word in message for word in _READ_ERROR_WORDS):
        return False
    return isinstance(error, (ValueError, KeyError, TypeError)) and any(
        word in message.lower() for word in ('shape', 'structure', 'tree', 'missing key',
                                             'dtype'))


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                  config: ml_collections.ConfigDict, restore_data: bool) -> tuple[Any, Any]:
    saved_config = manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    check_config_compatible(saved_config, config)
    step_dir = manager.directory / str(step)
    legacy = not (step_dir / 'meta').exists()
    if legacy:  # The earlier layout (no `meta/`): one model, no task state of its own.
        logger.info('Checkpoint step %d has the earlier state layout (no meta item); '
                    'converting it.', step)
    target = _legacy_layout(abstract_state) if legacy else abstract_state
    items = {'state': ocp.args.StandardRestore(target)}
    has_data = restore_data and (step_dir / 'data').exists()
    if has_data:
        items['data'] = DataIteratorRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    data_state = restored['data'] if has_data else None
    state = _from_legacy_layout(restored['state']) if legacy else restored['state']
    return state, data_state


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state: Any,
                       config: ml_collections.ConfigDict, *, step: int | None = None,
                       restore_data: bool = True) -> tuple[int, Any, Any]:
    """Restores the newest readable step (or `step`) after checking the config.

    A step that cannot be read (a file empty, truncated, missing or not valid JSON)
    is reported in one line naming the step and the file, moved aside to
    `<workdir>/damaged_checkpoints/` (see `set_aside`), and the previous step is
    tried, down to the oldest.

    Args:
        manager: From `create_checkpoint_manager`.
        abstract_state: `jax.eval_shape` of the state with the target shardings
            attached (see `state.with_shardings`); the restored arrays get those.
        config: Current config, checked against the stored one first.
        step: Step to restore; default the newest readable one.
        restore_data: Also return the data iterator state.

    Returns:
        `(step, state, data_state)`; `data_state` is None if not requested or not
        saved for this process count.

    Raises:
        FileNotFoundError: No finalised checkpoint exists, or none is readable.
        CheckpointMismatchError: The config differs in a structural field, or the
            stored state's layout differs from this code's.
    """
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
    set_aside_steps = []
    for candidate in steps:
        step_dir = epath.Path(manager.directory) / str(candidate)
        damage = find_damage(step_dir)
        if damage is None:
            try:
                with _quiet_failed_restore():
                    state, data_state = _restore_step(manager, candidate, abstract_state,
                                                      config, restore_data)
                return candidate, state, data_state
            except CheckpointMismatchError:
                raise
            except Exception as e:  # pylint: disable=broad-except
                if _is_layout_mismatch(e):
                    raise CheckpointMismatchError(
                        f'Checkpoint step {candidate} in {manager.directory} does not have '
                        f'the layout of this model and code: {str(e).splitlines()[0]}'
                    ) from e
                damage = (_damaged_file(step_dir, e), f'{type(e).__name__}: '
                          f'{str(e).splitlines()[0][:200] if str(e) else ""}')
        set_aside(manager, CheckpointDamagedError(candidate, *damage))
        set_aside_steps.append(candidate)
    raise FileNotFoundError(
        f'No readable checkpoint in {manager.directory}: steps {set_aside_steps} were '
        f'damaged and moved to {epath.Path(manager.directory).parent / DAMAGED_SUBDIR}.')


def load_config(workdir: str, step: int | None = None, *,
                schema: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The config stored with a checkpoint (e.g. a classifier's, for guidance).

    Args:
        workdir: Run directory of the checkpoint.
        step: Step to read; default the newest step whose config is readable.
        schema: The config of the run that will use the stored one: fields the record
            predates take its values (`config_json.fill_missing`).

    Raises:
        FileNotFoundError: No checkpoint (with a readable config) in `workdir`.
    """
    directory = checkpoint_dir(workdir)
    with _quiet_orbax(), ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
            item_handlers={'config': ocp.JsonCheckpointHandler()}) as manager:
        steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
        for candidate in steps:
            path = directory / str(candidate) / 'config' / 'metadata'
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError):
                logger.warning('Checkpoint step %d: %s is unreadable; skipping it.', candidate,
                               path)
                continue
            saved = config_lib.upgrade_json_dict(saved)
            if schema is not None:
                saved = config_json.fill_missing(saved, config_lib.to_json_dict(schema))
            return config_lib.from_json_dict(saved)
    raise FileNotFoundError(f'No checkpoint in {directory}.')


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          mesh: jax.sharding.Mesh, *, step: int | None = None,
                          with_task_state: bool = False) -> tuple[Any, ...]:
    """Restores a checkpoint's parameters, replicated over `mesh`, for sampling/eval.

    Args:
        config: The config of the checkpoint's run (checked against the stored one).
        workdir: Run directory holding `checkpoints/`.
        mesh: Target mesh; the restored arrays are replicated over it.
        step: Step to restore; default the latest.
        with_task_state: Also return the task state (what sampling may need besides
            the parameters, e.g. a latent diffusion model's measured scale factor).

    Returns:
        `(step, params, ema_params)`, plus `task_state` last if `with_task_state`:
        params {part: tree} dicts; `ema_params` is the copy chosen by
        `config.sample.ema_decay` (-1: the first of `optim.ema_decays`).

    Raises:
        FileNotFoundError: No checkpoint in `workdir`.
        CheckpointMismatchError: `config` does not describe the stored model.
    """
    abstract_state = state_lib.create_abstract_train_state(tasks.create_task(config), mesh)
    if not checkpoint_dir(workdir).exists():
        raise FileNotFoundError(f'No checkpoint in {checkpoint_dir(workdir)}.')
    with create_checkpoint_manager(workdir, config, read_only=True) as manager:
        step, state, _ = restore_checkpoint(manager, abstract_state, config, step=step,
                                            restore_data=False)
    restored = (step, state.params, state_lib.select_ema_params(config, state.ema_params))
    return restored + (state.task_state,) if with_task_state else restored
