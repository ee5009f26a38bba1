"""Tests for main.py: bad input fails fast, before anything is compiled."""

import os
import subprocess
import sys
from unittest import mock

import pytest
from absl import flags

import main
from ddpm_jax import parallel, sample_mode, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'default.py')


@pytest.fixture
def no_compile(monkeypatch):
    """Makes any attempt to run a compiled train step or init fail loudly."""
    def fail(*args, **kwargs):
        raise AssertionError('reached compilation')
    monkeypatch.setattr(train, 'jit_train_step', lambda step_fn, mesh: fail)
    monkeypatch.setattr(train.Trainer, 'init_state', fail)


def _run_main(argv, compilation_cache=''):
    """Parses flags and runs main.main in this process (by default with no compilation
    cache, which would stay set for the rest of the process)."""
    argv = ['main.py', f'--config={CONFIG}'] + argv
    if compilation_cache is not None:
        argv.append(f'--compilation_cache={compilation_cache}')
    try:
        # config_flags reads the overrides from sys.argv at parse time.
        with mock.patch.object(sys, 'argv', argv):
            remaining = main.parse_flags(argv)
        main.main(remaining)
    finally:
        flags.FLAGS.unparse_flags()
        for name in list(flags.FLAGS):  # Override flags are registered per parse.
            if name.startswith('config.'):
                delattr(flags.FLAGS, name)


def test_typo_in_override_fails_at_parse_time(no_compile, tmp_path):
    with pytest.raises(SystemExit) as info:
        _run_main([f'--workdir={tmp_path}', '--config.optim.learnig_rate=1e-4'])
    message = str(info.value.code)
    assert '--config.optim.learnig_rate=1e-4' in message
    assert 'Did you mean "learning_rate"' in message
    assert not os.listdir(tmp_path)  # Nothing was written.


def test_typo_in_override_cli(tmp_path):
    """The real command line: one error line, non-zero exit, no traceback."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, 'main.py'), f'--config={CONFIG}',
         f'--workdir={tmp_path}', '--config.optm.learning_rate=1e-4'],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert result.returncode != 0
    assert 'unknown config field in --config.optm.learning_rate=1e-4' in result.stderr
    assert 'Did you mean "optim"' in result.stderr
    assert 'Traceback' not in result.stderr


def test_unwritable_workdir(no_compile, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    workdir = blocker / 'run'  # Cannot be created, even by root.
    with pytest.raises(SystemExit) as info:
        _run_main([f'--workdir={workdir}'])
    assert f'--workdir={workdir} is not writable' in str(info.value.code)


def test_indivisible_batch(no_compile, tmp_path):
    # conftest gives 4 CPU devices.
    with pytest.raises(SystemExit) as info:
        _run_main([f'--workdir={tmp_path}', '--config.train.global_batch_size=10'])
    assert 'train.global_batch_size=10 must be divisible by the device count (4)' in str(
        info.value.code)


def test_unknown_name(no_compile, tmp_path):
    with pytest.raises(SystemExit) as info:
        _run_main([f'--workdir={tmp_path}', '--config.diffusion.schedule=cosin'])
    message = str(info.value.code)
    assert "diffusion.schedule='cosin'" in message and "'cosine'" in message


def test_dispatch(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(train, 'run_training',
                        lambda config, workdir: calls.append(('train', config, workdir)))
    monkeypatch.setattr(sample_mode, 'sample_and_save',
                        lambda config, workdir: calls.append(('sample', config, workdir)))
    _run_main([f'--workdir={tmp_path}', '--config.optim.learning_rate=1e-4',
               '--config.train.global_batch_size=8'])
    _run_main([f'--workdir={tmp_path}', '--mode=sample', '--config.sample.num_images=4'])
    assert [c[0] for c in calls] == ['train', 'sample']
    assert calls[0][1].optim.learning_rate == 1e-4 and calls[0][2] == str(tmp_path)
    assert calls[1][1].sample.num_images == 4


def test_compilation_cache_defaults_to_the_workdir(monkeypatch, tmp_path):
    dirs = []
    monkeypatch.setattr(parallel, 'enable_compilation_cache', dirs.append)
    monkeypatch.setattr(train, 'run_training', lambda config, workdir: None)
    monkeypatch.setattr(sample_mode, 'sample_and_save', lambda config, workdir: None)
    new = tmp_path / 'new'
    _run_main([f'--workdir={new}'], compilation_cache=None)
    assert not new.exists()  # Training creates it, after its checks; the cache after that.
    _run_main([f'--workdir={tmp_path}'], compilation_cache=f'{tmp_path}/elsewhere')
    _run_main([f'--workdir={tmp_path}'], compilation_cache='')  # None.
    _run_main([f'--workdir={tmp_path}', '--mode=sample'], compilation_cache=None)
    # Sampling never creates a workdir, so neither may its cache.
    _run_main([f'--workdir={tmp_path}/absent', '--mode=sample'], compilation_cache=None)
    assert dirs == [str(new / 'compilation_cache'), f'{tmp_path}/elsewhere',
                    str(tmp_path / 'compilation_cache')]
    assert not (tmp_path / 'absent').exists()


def test_compilation_cache_waits_for_a_valid_config(no_compile, monkeypatch, tmp_path):
    """A refused run enables no cache, whose first compile would create its directory."""
    dirs = []
    monkeypatch.setattr(parallel, 'enable_compilation_cache', dirs.append)
    with pytest.raises(SystemExit) as info:
        _run_main([f'--workdir={tmp_path}/new', '--config.sample.eta=-1'],
                  compilation_cache=None)
    assert str(info.value.code).startswith('ERROR: sample.eta=-1.0 must be >= 0.')
    assert dirs == [] and not os.listdir(tmp_path)


def test_sample_from_a_missing_workdir_creates_nothing(tmp_path):
    """The real command, with the default cache: one error line naming the workdir, and
    neither the workdir nor a cache directory (there or in the current one) is made."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, 'main.py'),
         f'--config={os.path.join(REPO, "configs", "digits.py")}', '--mode=sample',
         f'--workdir={tmp_path}/missing'],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith('ERROR:')]
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert errors == [f'ERROR: --workdir={tmp_path}/missing does not exist; sample and eval '
                      'modes read a trained run and never create one.'], result.stderr
    assert not os.listdir(tmp_path)


def test_refused_training_leaves_no_workdir(tmp_path):
    """The real command with the default cache: a split the dataset lacks (checked by the
    trainer, not by config validation) is one error line, and no workdir is left."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, 'main.py'),
         f'--config={os.path.join(REPO, "configs", "digits.py")}',
         '--config.data.split=nonexistent_split', f'--workdir={tmp_path}/new'],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith('ERROR:')]
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert len(errors) == 1 and "data.split='nonexistent_split'" in errors[0], result.stderr
    assert not os.listdir(tmp_path)


def test_empty_workdir_is_refused_at_parse_time(no_compile, monkeypatch, tmp_path):
    dirs = []
    monkeypatch.setattr(parallel, 'enable_compilation_cache', dirs.append)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        _run_main(['--workdir='], compilation_cache=None)
    assert info.value.code == 'ERROR: --workdir must be set.'
    assert dirs == [] and not os.listdir(tmp_path)


def test_positional_argument_is_one_error_line(no_compile, tmp_path):
    with pytest.raises(SystemExit) as info:
        _run_main([f'--workdir={tmp_path}', 'extra_positional'])
    message = str(info.value.code)
    assert message.startswith("ERROR: unexpected argument 'extra_positional'")
    assert '\n' not in message and not os.listdir(tmp_path)


@pytest.mark.parametrize('argv, expected', [
    (['--num_processes=2', '--process_id=5'], 'ERROR: --coordinator_address must be given'),
    (['--coordinator_address=localhost:1', '--process_id=0'], 'ERROR: --num_processes must'),
    (['--coordinator_address=localhost:1', '--num_processes=0', '--process_id=0'],
     'ERROR: --num_processes=0 must be >= 1.'),
    (['--coordinator_address=localhost:1', '--num_processes=2', '--process_id=2'],
     'ERROR: --process_id=2 must be in [0, --num_processes=2).'),
])
def test_bad_process_flags_are_one_error_line(argv, expected, no_compile, monkeypatch,
                                              tmp_path):
    def initialize(**kwargs):
        raise AssertionError(f'jax.distributed.initialize({kwargs}) was called')
    monkeypatch.setattr(parallel.jax.distributed, 'initialize', initialize)
    with pytest.raises(SystemExit) as info:
        _run_main([f'--workdir={tmp_path}'] + argv)
    message = str(info.value.code)
    assert message.startswith(expected) and '\n' not in message
    assert not os.listdir(tmp_path)


def test_value_of_the_wrong_type_is_one_error_line(no_compile, tmp_path):
    with pytest.raises(SystemExit) as info:
        _run_main([f'--workdir={tmp_path}', '--config.train.global_batch_size=abc'])
    message = str(info.value.code)
    assert message.startswith('ERROR: flag --config.train.global_batch_size=abc')
    assert '\n' not in message


def test_misspelt_override_names_only_itself(no_compile, tmp_path):
    with pytest.raises(SystemExit) as info:
        _run_main([f'--workdir={tmp_path}', '--config.train.global_batch=3',
                   '--config.train.global_batch_size=8'])
    message = str(info.value.code)
    assert 'in --config.train.global_batch=3:' in message
    assert 'global_batch_size=8' not in message


def test_missing_config_file_is_one_error_line(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, 'main.py'), '--config=configs/no_such.py',
         f'--workdir={tmp_path}'], capture_output=True, text=True, cwd=REPO, timeout=300,
        check=False)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "ERROR: --config=configs/no_such.py: [Errno 2] No such file or directory: "
        "'configs/no_such.py'")


@pytest.mark.parametrize('name', ['DDPM_JAX_ATTENTION', 'DDPM_JAX_GROUP_NORM',
                                  'DDPM_JAX_CONVOLUTION'])
def test_bad_environment_variable_is_one_error_line(name, no_compile, monkeypatch, tmp_path):
    monkeypatch.setenv(name, 'flash')
    with pytest.raises(SystemExit) as info:
        _run_main([f'--workdir={tmp_path}'])
    message = str(info.value.code)
    assert message.startswith(f'ERROR: {name} must be one of (') and "got 'flash'" in message
    assert not os.listdir(tmp_path)  # Nothing was written.
