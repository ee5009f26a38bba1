"""Command line: train, sample from or evaluate a diffusion model (bits/dim or FID).

    python main.py --config=configs/digits.py --workdir=/tmp/digits
    python main.py --config=configs/digits.py --workdir=/tmp/digits --mode=sample
    python main.py --config=configs/cifar10.py --workdir=/tmp/c10 \
        --config.optim.learning_rate=1e-4

Multi-process runs call `jax.distributed.initialize()`: automatically on TPU pods and
under SLURM (SLURM_NTASKS > 1), or with explicit --coordinator_address,
--num_processes and --process_id (all three).
"""

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (the same one resumes).')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'fid'], 'What to run.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0; with --num_processes and --process_id.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None, "Directory of compiled programs that later runs reuse (a "
    "resume skips its compiles); default WORKDIR/compilation_cache, '' = none. Used once "
    'the config is valid (a refused run leaves no directory); sample, eval and fid use '
    'it only when WORKDIR exists (they never create one).')


def main(argv):
    del argv  # parse_flags refused positional arguments.
    if not flags.FLAGS['verbosity'].present:
        # Our own progress lines at INFO; orbax's per-save chatter only as warnings.
        logging.set_verbosity(logging.WARNING)
        pylogging.getLogger('ddpm_jax').setLevel(pylogging.INFO)
    import jax  # No backend starts before the flag, environment and config checks.
    from etils import epath
    from ddpm_jax import (config_lib, evaluate, parallel, sample_mode, sample_quality, train,
                          upsampling)
    from ddpm_jax.models import layers
    try:
        layers.check_environment()  # DDPM_JAX_* variables, before anything starts.
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
    except ValueError as e:
        sys.exit(f'ERROR: {e}')
    reused = parallel.reuse_cpu_step_memory()  # Before the backends start.
    pylogging.getLogger('ddpm_jax').info(
        'Process %d of %d; %d local / %d global devices: %s%s', jax.process_index(),
        jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices(),
        ' (step memory reused between steps)' if reused else '')
    config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
    run = {'train': train.run_training, 'sample': sample_mode.sample_and_save,
           'eval': evaluate.evaluate, 'fid': sample_quality.evaluate_samples}[mode]
    if config.task == 'super_resolution':  # An upsampler: .npz inputs or a cascade.
        run = {'sample': upsampling.upsample_and_save,
               'fid': upsampling.evaluate_upsampler}.get(mode, run)
    try:
        # JAX creates the cache directory at the first compile after this: only once
        # the run's inputs are checked, so a refused run leaves no directory behind.
        config_lib.validate(config, mode=mode)
        if mode == 'train':
            train.check_inputs(config)  # The dataset, its classes, the FID reference.
        cache = _COMPILATION_CACHE.value
        if cache is None:
            cache = os.path.join(workdir, 'compilation_cache')
        if mode != 'train' and not epath.Path(workdir).is_dir():
            cache = ''  # `run` refuses the missing workdir; no compile may create it.
        if cache:
            parallel.enable_compilation_cache(cache)
        run(config, workdir)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        if flags.FLAGS['verbosity'].present:
            raise  # Asked for detail: the whole traceback.
        sys.exit(f'ERROR: {e}\n(--verbosity=0 shows the traceback.)')


def parse_flags(argv):
    """absl parsing; any bad flag, override or --config file becomes one `ERROR:` line."""
    return cli.parse_flags(argv, required=('config', 'workdir'))


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
