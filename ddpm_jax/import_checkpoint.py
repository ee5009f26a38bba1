"""Command: a released PyTorch checkpoint as a new ddpm_jax workdir.

    python -m ddpm_jax.import_checkpoint --checkpoint=64x64_diffusion.pt \
        --config=configs/released/adm_64x64_diffusion.py --workdir=/tmp/adm64

reads the `.pt` state dict without torch (`torch_checkpoint`), maps it onto the
config's model (`released`), and writes step 0 of an orbax checkpoint through
`checkpointing` whose parameters and every EMA copy are the imported weights, with
a fresh optimiser state and task state, plus `config.json` and a `runs.jsonl` line.
Every mode then works on the workdir unchanged: `--mode=sample` / `eval` / `fid`
read the EMA weights, a classifier's workdir serves `sample.classifier_workdir`,
and `--mode=train` fine-tunes from it. A workdir that already holds a checkpoint
is refused, never overwritten.

When the file does not fit `--config`, the error names every missing, extra or
mis-shaped tensor and the configs next to `--config` (e.g. all of
configs/released/) that the file does fit. Bad input stops with one `ERROR:` line
before anything is written: a bad flag or override (`cli.parse_flags`), a config
that `config_lib.validate` refuses, and a `--checkpoint` that does not exist, whose
line names the file a released config was made for and where it is published
(`missing_checkpoint_message`).
"""

import ast
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from ddpm_jax import checkpointing
from ddpm_jax import cli
from ddpm_jax import config_lib
from ddpm_jax import parallel
from ddpm_jax import released
from ddpm_jax import state as state_lib
from ddpm_jax import tasks
from ddpm_jax import workdir as workdir_lib

logger = logging.getLogger('ddpm_jax')

__all__ = ['create_imported_state', 'import_checkpoint', 'load_sibling_configs',
           'missing_checkpoint_message']

# Where the released files are published, by the prefix of their config's name in
# configs/released/ (whose docstring command names the file: --checkpoint=<file>).
RELEASES = {
    'adm_': ("guided-diffusion's", 'https://openaipublic.blob.core.windows.net/diffusion/'
                                   'jul-2021/'),
    'iddpm_': ("improved-diffusion's", 'https://openaipublic.blob.core.windows.net/'
                                       'diffusion/march-2021/'),
}


def load_sibling_configs(config_path: str) -> dict[str, ml_collections.ConfigDict]:
    """{file stem: config} of every config file in the directory of `config_path`.

    These are the candidates an error names when a file does not fit its config.
    Files that fail to load are skipped.
    """
    directory = os.path.dirname(os.path.abspath(config_path))
    configs = {}
    for filename in sorted(os.listdir(directory)):
        if not filename.endswith('.py') or filename.startswith('_'):
            continue
        path = os.path.join(directory, filename)
        spec = importlib.util.spec_from_file_location(f'_candidate_{filename[:-3]}', path)
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            configs[filename[:-3]] = module.get_config()
        except Exception:  # pylint: disable=broad-except  # Not a config file.
            continue
    return configs


def _published_file(config_path: str) -> str | None:
    """The file named by `--checkpoint=<file>` in the config file's docstring command."""
    try:
        with open(config_path, encoding='utf-8') as f:
            docstring = ast.get_docstring(ast.parse(f.read())) or ''
    except (OSError, SyntaxError, ValueError):
        return None
    words = [w for w in docstring.split() if w.startswith('--checkpoint=')]
    return os.path.basename(words[0].split('=', 1)[1]) if words else None


def missing_checkpoint_message(checkpoint: str, config_path: str) -> str:
    """One line for a `--checkpoint` that does not exist: the file `config_path` was
    made for and where it is published (configs/released/), or where to look."""
    message = f'--checkpoint={checkpoint} does not exist: '
    name = _published_file(config_path)
    stem = os.path.basename(config_path)
    release = next((r for prefix, r in RELEASES.items() if stem.startswith(prefix)), None)
    if name and release:
        project, url = release
        return (message + f'--config={config_path} is the model of {project} released '
                f'weights file {name}, published at {url}{name}; download it and pass its '
                'path.')
    if name:
        return (message + f'--config={config_path} is the model of the released weights '
                f'file {name}; README.md, "Published checkpoints", says where it is published.')
    return (message + 'it must be the PyTorch file of the released weights that '
            f'--config={config_path} describes; README.md, "Published checkpoints", lists '
            'the releases.')


def create_imported_state(config: ml_collections.ConfigDict, params: Mapping[str, Any],
                          mesh: jax.sharding.Mesh) -> state_lib.TrainState:
    """Step 0 of training from `params`: EMAs equal to them, a fresh optimiser state.

    The imported network is the task's only part ('diffusion', 'score', 'classifier')
    or the one it samples with (a DDGAN's 'generator'); any other part (a DDGAN's
    discriminator, which no release includes) starts from its initialisation.

    Args:
        config: The run's config.
        params: The network's parameter tree (host arrays).
        mesh: Every leaf is replicated over it.

    Raises:
        ValueError: A task with several parts none of which samples (an autoencoder).
    """
    task = tasks.create_task(config)
    part = task.parts[0] if len(task.parts) == 1 else task.sample_part
    if part is None:
        raise ValueError(f'task={config.task!r} has the parts {task.parts} and samples with '
                         'none of them; a released checkpoint holds one network.')
    replicated = parallel.replicated_sharding(mesh)
    tree = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params),
                          replicated)
    optimizer = task.create_optimizers()[part]

    def build(rng, tree):
        fresh = state_lib.create_train_state(task, rng)
        return fresh.replace(
            params={**fresh.params, part: tree},
            ema_params=tuple({**ema, part: tree} if part in ema else ema
                             for ema in fresh.ema_params),
            opt_state={**fresh.opt_state, part: optimizer.tx.init(tree)})

    state = jax.jit(build, out_shardings=replicated)(jax.random.key(0), tree)
    # The trainer and the inference modes restore against this abstract state.
    abstract = state_lib.create_abstract_train_state(task, mesh)
    got = jax.tree.map(lambda a: (a.shape, a.dtype), state)
    want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
    if got != want:
        raise AssertionError('The imported state does not have the train state layout.')
    return state


def import_checkpoint(checkpoint: str, config: ml_collections.ConfigDict, workdir: str, *,
                      candidates: Mapping[str, ml_collections.ConfigDict] | None = None,
                      mesh: jax.sharding.Mesh | None = None) -> str:
    """Writes `checkpoint` (a released `.pt`) as step 0 of a new workdir.

    Args:
        checkpoint: Path of the PyTorch state dict.
        config: The config whose model the file holds (e.g. configs/released/*.py).
        workdir: The run directory to create; it must hold no checkpoint yet.
        candidates: Configs to name when the file does not fit `config`.
        mesh: Default: all devices.

    Returns:
        The step directory written.

    Raises:
        FileNotFoundError: No such checkpoint file.
        ValueError: A config `config_lib.validate` refuses (as for training); the
            workdir already holds a checkpoint; the file is not a state dict or does
            not fit `config` (naming the tensors and the fitting candidates); a config
            the reference networks cannot express.
    """
    if not workdir:
        raise ValueError('--workdir must be set.')
    mesh = parallel.create_mesh() if mesh is None else mesh
    # As for training, except the batch against this machine's devices: the run that
    # resumes from the import checks its own.
    config_lib.validate(config, num_devices=1, num_processes=1)
    directory = checkpointing.checkpoint_dir(workdir)
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f'--workdir={workdir} already holds checkpoints ({directory}); '
                         'importing never overwrites one: choose a new --workdir.')
    params = released.load_checkpoint(checkpoint, config, candidates=candidates)
    state = create_imported_state(config, params, mesh)

    workdir_lib.prepare(workdir)
    with workdir_lib.TrainLock(workdir):
        manager = checkpointing.create_checkpoint_manager(workdir, config)
        try:
            if checkpointing.has_checkpoints(manager):  # Written since the check above.
                raise ValueError(f'--workdir={workdir} already holds checkpoints; importing '
                                 'never overwrites one.')
            checkpointing.save_checkpoint(manager, 0, state, config, force=True)
            manager.wait_until_finished()
        finally:
            manager.close()
        workdir_lib.write_config_record(config, workdir)
        step_dir = str(directory / '0')
        workdir_lib.append_run_record(workdir, 'import', config,
                                      {'checkpoint': os.path.abspath(checkpoint),
                                       'step_dir': step_dir})
    logger.info('Imported %s into %s (step 0: params and %d EMA copies).', checkpoint,
                step_dir, len(config.optim.ema_decays))
    return step_dir


def define_flags() -> None:
    """The command's flags; defined only when it runs, so that importing this module
    beside `main.py` (which has its own --config and --workdir) is possible."""
    config_flags.DEFINE_config_file('config', None, 'Config of the released model.',
                                    lock_config=True)
    flags.DEFINE_string('checkpoint', None, 'The released .pt state dict.')
    flags.DEFINE_string('workdir', None, 'The new run directory.')


def parse_flags(argv):
    """absl parsing; any bad flag, override or --config file becomes one `ERROR:` line."""
    return cli.parse_flags(argv, required=('config', 'checkpoint', 'workdir'))


def main(argv):
    del argv  # parse_flags refused positional arguments.
    if not flags.FLAGS['verbosity'].present:  # Our lines at INFO, JAX's only as warnings.
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger('ddpm_jax').setLevel(logging.INFO)
    config_path = flags.FLAGS['config'].config_filename
    checkpoint = flags.FLAGS.checkpoint
    try:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(missing_checkpoint_message(checkpoint, config_path))
        import_checkpoint(checkpoint, flags.FLAGS.config, flags.FLAGS.workdir,
                          candidates=load_sibling_configs(config_path))
    except (ValueError, FileNotFoundError) as e:
        if flags.FLAGS['verbosity'].present:
            raise
        sys.exit(f'ERROR: {e}\n(--verbosity=0 shows the traceback.)')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=parse_flags)
