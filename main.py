"""Command line: train, sample from or evaluate a diffusion model (bits/dim or FID).

    python main.py --config=configs/digits.py --workdir=/tmp/digits
    python main.py --config=configs/digits.py --workdir=/tmp/digits --mode=sample
    python main.py --config=configs/cifar10.py --workdir=/tmp/c10 \
        --config.optim.learning_rate=1e-4

Multi-process runs call `jax.distributed.initialize()`: automatically on TPU pods and
under SLURM (SLURM_NTASKS > 1), or with explicit --coordinator_address,
--num_processes and --process_id.
"""

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (the same one resumes).')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'fid'], 'What to run.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None, "Directory of compiled programs that later runs reuse (a "
    "resume skips its compiles); default WORKDIR/compilation_cache, '' = none.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:
        # Our own progress lines at INFO; orbax's per-save chatter only as warnings.
        logging.set_verbosity(logging.WARNING)
        pylogging.getLogger('ddpm_jax').setLevel(pylogging.INFO)
    import jax  # After flag parsing, so a bad flag fails before JAX starts.
    from ddpm_jax import evaluate, parallel, sample_mode, sample_quality, train, upsampling
    from ddpm_jax.models import layers
    try:
        layers.check_environment()  # DDPM_JAX_* variables, before anything starts.
    except ValueError as e:
        sys.exit(f'ERROR: {e}')
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value)
    reused = parallel.reuse_cpu_step_memory()  # Before the backends start.
    cache = _COMPILATION_CACHE.value
    if cache is None:
        cache = os.path.join(_WORKDIR.value, 'compilation_cache')
    if cache:
        parallel.enable_compilation_cache(cache)
    pylogging.getLogger('ddpm_jax').info(
        'Process %d of %d; %d local / %d global devices: %s%s', jax.process_index(),
        jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices(),
        ' (step memory reused between steps)' if reused else '')
    run = {'train': train.run_training, 'sample': sample_mode.sample_and_save,
           'eval': evaluate.evaluate, 'fid': sample_quality.evaluate_samples}[_MODE.value]
    if _CONFIG.value.task == 'super_resolution':  # An upsampler: .npz inputs or a cascade.
        run = {'sample': upsampling.upsample_and_save,
               'fid': upsampling.evaluate_upsampler}.get(_MODE.value, run)
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if flags.FLAGS['verbosity'].present:
            raise  # Asked for detail: the whole traceback.
        sys.exit(f'ERROR: {e}\n(--verbosity=0 shows the traceback.)')


def parse_flags(argv):
    """absl parsing; a bad --config file or override becomes one `ERROR:` line."""
    try:
        remaining = flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # A misspelt --config.<field>.
        message = str(e).strip('"\'').replace('\\n', ' ').replace("\\'", "'")
        name = message.split("'")[1] if message.count("'") >= 2 else None
        bad = [a for a in argv if a.startswith('--config.') and
               name in a.split('=')[0].split('.')[1:]]
        sys.exit(f'ERROR: unknown config field in {" ".join(bad) or "an override"}: '
                 f'{message}')
    except flags.Error as e:  # A value of the wrong type, a missing flag, ...
        sys.exit(f'ERROR: {e}')
    try:
        _CONFIG.value.seed  # pylint: disable=pointless-statement
    except Exception as e:  # pylint: disable=broad-except  # A missing or broken file.
        cause = e.__cause__ or e
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        sys.exit(f'ERROR: --config={flags.FLAGS["config"].config_filename}: '
                 f'{lines[-1] if lines else type(cause).__name__}')
    return remaining


if __name__ == '__main__':
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main, flags_parser=parse_flags)
