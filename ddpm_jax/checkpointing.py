"""Checkpoints: an orbax `CheckpointManager` over `<workdir>/checkpoints`.

Each step directory `<workdir>/checkpoints/<step>/` holds three items:

- `state/`: the whole `TrainState` pytree (step, params, EMA params, optimiser state,
  timestep-sampler state), written with `StandardSave` and restored against
  `jax.eval_shape` of the state carrying the *current* mesh's shardings, so a run
  can resume on a different number of devices.
- `data/`: the training data iterator's position, one JSON file per process
  (`process_<i>-of-<n>.json`), so a resumed run sees the same next batch.
- `config/`: the resolved config as JSON; a checkpoint is only restored by a config
  whose structural fields (the model section, the diffusion process, the image
  shape, the optimiser's state layout) match it.

Orbax writes each step into a temporary directory and renames it when every
process has finished, so a step left half-written by a crash is never listed or
loaded. Saves are asynchronous; call `wait_until_finished()` before exiting.
"""

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger('ddpm_jax')

CHECKPOINT_SUBDIR = 'checkpoints'

# Config fields whose value decides the layout or meaning of the saved state. A
# dotted name that is a section ('model') covers every field below it.
STRUCTURAL_FIELDS = (
    'model',
    'diffusion.num_timesteps',
    'diffusion.schedule',
    'diffusion.mean_type',
    'diffusion.var_type',
    'diffusion.timestep_sampler',
    'data.image_size',
    'data.channels',
    'optim.optimizer',
    'optim.ema_decays',
)
# Model fields that only change how the same parameters are computed with.
COMPUTE_ONLY_FIELDS = ('model.dtype', 'model.remat', 'model.dropout')


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
        },
    )


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON types (tuples become lists)."""
    return json.loads(config.to_json())


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
        'config': ocp.args.JsonSave(config_to_json_dict(config)),
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


def _structural(flat: Mapping[str, Any]) -> dict[str, Any]:
    def relevant(name):
        if name in COMPUTE_ONLY_FIELDS:
            return False
        return any(name == f or name.startswith(f + '.') for f in STRUCTURAL_FIELDS)
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
    saved = _structural(_flatten(saved_config))
    current = _structural(_flatten(config_to_json_dict(config)))
    missing = object()
    diffs = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name, missing), current.get(name, missing)
        if old != new:
            fmt = lambda v: '<absent>' if v is missing else repr(v)  # noqa: E731
            diffs.append(f'{name}: checkpoint={fmt(old)}, config={fmt(new)}')
    if diffs:
        raise CheckpointMismatchError(
            'The config does not match the checkpoint; differing fields:\n  '
            + '\n  '.join(diffs)
            + '\nUse the checkpoint\'s config or a new --workdir.')


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
    check_config_compatible(config_to_json_dict(saved), config)


def with_shardings(abstract_tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Attaches `sharding` to every `ShapeDtypeStruct` of an abstract pytree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_tree)


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state: Any,
                       config: ml_collections.ConfigDict, *, step: int | None = None,
                       restore_data: bool = True) -> tuple[int, Any, Any]:
    """Restores the state (and data position) of a step after checking the config.

    Args:
        manager: From `create_checkpoint_manager`.
        abstract_state: `jax.eval_shape` of the state with the target shardings
            attached (see `with_shardings`); the restored arrays get those shardings.
        config: Current config, checked against the stored one first.
        step: Step to restore; default the latest finalised one.
        restore_data: Also return the data iterator state.

    Returns:
        `(step, state, data_state)`; `data_state` is None if not requested or not
        saved for this process count.

    Raises:
        FileNotFoundError: No finalised checkpoint exists.
        CheckpointMismatchError: The config differs in a structural field.
    """
    if step is None:
        step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
    saved_config = manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    check_config_compatible(saved_config, config)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    has_data = restore_data and (manager.directory / str(step) / 'data').exists()
    if has_data:
        items['data'] = DataIteratorRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    data_state = restored['data'] if has_data else None
    return step, restored['state'], data_state


def load_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config stored with a checkpoint (e.g. a classifier's, for guidance).

    Args:
        workdir: Run directory of the checkpoint.
        step: Step to read; default the latest.
    """
    directory = checkpoint_dir(workdir)
    with ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
            item_handlers={'config': ocp.JsonCheckpointHandler()}) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'No checkpoint in {directory}.')
        saved = manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    return config_from_json_dict(saved)


def config_from_json_dict(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Inverse of `config_to_json_dict` (JSON lists become tuples again)."""
    return ml_collections.ConfigDict(_lists_to_tuples(saved))


def _lists_to_tuples(tree):
    if isinstance(tree, Mapping):
        return {k: _lists_to_tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_lists_to_tuples(v) for v in tree)
    return tree


def select_ema_params(config: ml_collections.ConfigDict, ema_params: Sequence[Any]) -> Any:
    """The EMA copy named by `config.sample.ema_decay` (-1: the first decay).

    Raises:
        ValueError: If the decay is not one of `config.optim.ema_decays`.
    """
    decays = tuple(config.optim.ema_decays)
    if config.sample.ema_decay == -1:
        return ema_params[0]
    for decay, params in zip(decays, ema_params):
        if np.isclose(decay, config.sample.ema_decay, rtol=0, atol=1e-12):
            return params
    raise ValueError(f'sample.ema_decay={config.sample.ema_decay} is not one of '
                     f'optim.ema_decays={decays} (or -1 for the first).')


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          mesh: jax.sharding.Mesh, *,
                          step: int | None = None) -> tuple[int, Any, Any]:
    """Restores a checkpoint's parameters, replicated over `mesh`, for sampling/eval.

    Args:
        config: The config of the checkpoint's run (checked against the stored one).
        workdir: Run directory holding `checkpoints/`.
        mesh: Target mesh; the restored arrays are replicated over it.
        step: Step to restore; default the latest.

    Returns:
        `(step, params, ema_params)` where `ema_params` is the copy chosen by
        `config.sample.ema_decay` (-1: the first of `config.optim.ema_decays`).

    Raises:
        FileNotFoundError: No checkpoint in `workdir`.
        CheckpointMismatchError: `config` does not describe the stored model.
    """
    from ddpm_jax import train  # Local: train imports this module.
    from ddpm_jax.models import create_model

    model = create_model(config)
    abstract_state = train.create_abstract_train_state(config, model, mesh)
    with create_checkpoint_manager(workdir, config, read_only=True) as manager:
        step, state, _ = restore_checkpoint(manager, abstract_state, config, step=step,
                                            restore_data=False)
    return step, state.params, select_ema_params(config, state.ema_params)
