"""Tests for ddpm_jax.workdir: the one-trainer lock, records and collision-free names."""

import json
import os
import socket
import subprocess
import sys

import pytest

from ddpm_jax import workdir


def test_second_trainer_is_refused_naming_the_holder(tmp_path):
    with workdir.TrainLock(str(tmp_path)):
        holder = json.loads((tmp_path / workdir.LOCK_NAME).read_text())
        assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
        with pytest.raises(workdir.WorkdirLockedError,
                           match=rf'in use by another trainer \(host {socket.gethostname()}, '
                                 rf'pid {os.getpid()}'):
            workdir.TrainLock(str(tmp_path)).acquire()
    assert not (tmp_path / workdir.LOCK_NAME).exists()  # Released on exit.


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True, check=True)
    (tmp_path / workdir.LOCK_NAME).write_text(json.dumps(
        {'host': socket.gethostname(), 'pid': int(dead.stdout), 'since': 'earlier'}))
    with workdir.TrainLock(str(tmp_path)):
        assert json.loads((tmp_path / workdir.LOCK_NAME).read_text())['pid'] == os.getpid()


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    path = tmp_path / workdir.LOCK_NAME
    path.write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'since': 'earlier'}))
    with pytest.raises(workdir.WorkdirLockedError, match='host elsewhere, pid 1'):
        workdir.TrainLock(str(tmp_path)).acquire()
    old = os.path.getmtime(path) - workdir.STALE_AFTER_S - 1
    os.utime(path, (old, old))  # Its heartbeat stopped long ago.
    with workdir.TrainLock(str(tmp_path)):
        assert json.loads(path.read_text())['host'] == socket.gethostname()


def test_unique_stem_never_reuses_a_name(tmp_path):
    first = workdir.unique_stem(tmp_path, 'samples_4', ('.npz', '.png'))
    assert first == tmp_path / 'samples_4'
    (tmp_path / 'samples_4.png').write_text('')  # Only one of the pair exists.
    second = workdir.unique_stem(tmp_path, 'samples_4', ('.npz', '.png'))
    assert second == tmp_path / 'samples_4_1'
    (tmp_path / 'samples_4_1.npz').write_text('')
    assert workdir.unique_stem(tmp_path, 'samples_4', ('.npz', '.png')) == (
        tmp_path / 'samples_4_2')


def test_run_records_append(tiny_config, tmp_path):
    workdir.append_run_record(str(tmp_path), 'sample', tiny_config, {'npz': 'a.npz'})
    tiny_config.sample.sampler = 'ddim'
    workdir.append_run_record(str(tmp_path), 'sample', tiny_config, {'npz': 'a_1.npz'})
    lines = [json.loads(line) for line in (tmp_path / workdir.RUN_LOG).read_text().splitlines()]
    assert [r['outputs']['npz'] for r in lines] == ['a.npz', 'a_1.npz']
    assert [r['config']['sample']['sampler'] for r in lines] == ['ddpm', 'ddim']


def test_sample_and_eval_never_create_a_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match='never create'):
        workdir.require_existing(str(tmp_path / 'missing'))
    assert not (tmp_path / 'missing').exists()
    with pytest.raises(ValueError, match='not writable'):
        blocker = tmp_path / 'file'
        blocker.write_text('')
        workdir.prepare(str(blocker / 'run'))
