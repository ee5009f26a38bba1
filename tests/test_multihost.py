"""Two-process training over jax.distributed on one machine (CPU, gloo collectives).

Each process has 2 CPU devices (4 global). Both train 2 steps, checkpoint, then
resume from the checkpoint to step 4; the test checks that the processes agree on
the final state and that each saved its own data-iterator position.

The preemption test sends SIGTERM to one process of a running pair: JAX's
preemption sync service must stop both at the same step with that step saved, and
a fresh pair must resume to the same final state as an uninterrupted run.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(process_id: int, port: int, config_path: str, workdir: str) -> None:
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
    import numpy as np

    from ddpm_jax import config_lib, parallel, train

    with open(config_path) as f:
        config = config_lib.from_json_dict(json.load(f))
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    first = config.copy_and_resolve_references()
    first.train.num_train_steps = 2
    state = train.run_training(first, workdir)
    assert int(parallel.to_host(state.step)) == 2
    state = train.run_training(config, workdir)  # Restores step 2.
    host = parallel.to_host(state)
    leaves = jax.tree.leaves((host.params, host.ema_params, host.opt_state))
    result = {'process': jax.process_index(), 'step': int(host.step),
              'checksum': float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves)),
              'finite': bool(all(np.isfinite(x).all() for x in leaves))}
    print('RESULT ' + json.dumps(result), flush=True)
    jax.distributed.shutdown()


def _checksum(state) -> float:
    import jax
    import numpy as np
    leaves = jax.tree.leaves((state.params, state.ema_params, state.opt_state))
    return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))


def _preemption_worker(process_id: int, port: int, config_path: str, workdir: str,
                       mode: str, reference_dir: str) -> None:
    """'preempt': trains slowly until SIGTERM; 'resume': resumes, then a reference run."""
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
    import numpy as np

    from ddpm_jax import config_lib, data as data_lib, parallel, train

    with open(config_path) as f:
        config = config_lib.from_json_dict(json.load(f))
    if mode == 'preempt':  # Slow steps, so the signal lands mid-run.
        real = data_lib.create_train_iterator

        class Slow:
            def __init__(self, it):
                self._it = it

            def __next__(self):
                # No Python SIGTERM handler: it would replace JAX's preemption notifier.
                handlers.add(signal.getsignal(signal.SIGTERM))
                time.sleep(0.3)
                return next(self._it)

            def __getattr__(self, name):
                return getattr(self._it, name)

        handlers = set()
        data_lib.create_train_iterator = lambda c: Slow(real(c))
        host = parallel.to_host(train.run_training(config, workdir))
        result = {'step': int(host.step), 'checksum': _checksum(host),
                  'default_sigterm': handlers == {signal.SIG_DFL}}
    else:
        host = parallel.to_host(train.run_training(config, workdir))
        reference = parallel.to_host(train.run_training(config, reference_dir))
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host),
                                                         jax.tree.leaves(reference)))
        result = {'step': int(host.step), 'checksum': _checksum(host),
                  'equal_to_reference': bool(same)}
    result['process'] = jax.process_index()
    print('RESULT ' + json.dumps(result), flush=True)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_agree(tiny_config, tmp_path):
    from ddpm_jax import config_lib
    config = tiny_config
    config.train.num_grid_samples = 0
    config_path = tmp_path / 'config.json'
    config_path.write_text(json.dumps(config_lib.to_json_dict(config)))
    workdir = tmp_path / 'run'
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=2',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    procs = [subprocess.Popen(
        [sys.executable, __file__, str(i), str(port), str(config_path), str(workdir)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=900)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-5000:]
    results = [json.loads(line[len('RESULT '):]) for out in outputs
               for line in out.splitlines() if line.startswith('RESULT ')]
    assert sorted(r['process'] for r in results) == [0, 1]
    assert all(r['step'] == 4 and r['finite'] for r in results)
    assert results[0]['checksum'] == results[1]['checksum']
    steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir())
    assert steps == [2, 4]
    data_files = sorted(p.name for p in (workdir / 'checkpoints' / '4' / 'data').iterdir()
                        if p.suffix == '.json')
    assert data_files == ['process_0-of-2.json', 'process_1-of-2.json']
    assert 'step 4:' in outputs[0] and 'step 4:' not in outputs[1]  # Logs: process 0.


class _Pair:
    """Two worker processes whose output is read line by line in the background."""

    def __init__(self, args, env):
        port = str(_free_port())
        self.procs = [subprocess.Popen(
            [sys.executable, __file__, str(i), port, *args], env=env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
        self.lines = [[], []]
        self.threads = [threading.Thread(target=self._read, args=(i,), daemon=True)
                        for i in range(2)]
        for thread in self.threads:
            thread.start()

    def _read(self, i):
        for line in self.procs[i].stdout:
            self.lines[i].append(line)

    def output(self, i) -> str:
        return ''.join(self.lines[i])

    def wait_for(self, i, text, timeout):
        deadline = time.monotonic() + timeout
        while text not in self.output(i):
            assert time.monotonic() < deadline, f'no {text!r}: ' + self.output(i)[-5000:]
            assert self.procs[i].poll() is None, self.output(i)[-5000:]
            time.sleep(0.2)

    def finish(self, timeout):
        try:
            for proc in self.procs:
                proc.wait(timeout=timeout)
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
            for thread in self.threads:
                thread.join(timeout=30)
        for i, proc in enumerate(self.procs):
            assert proc.returncode == 0, self.output(i)[-5000:]
        results = [json.loads(line[len('RESULT '):]) for i in range(2)
                   for line in self.output(i).splitlines() if line.startswith('RESULT ')]
        assert sorted(r['process'] for r in results) == [0, 1]
        return sorted(results, key=lambda r: r['process'])


@pytest.mark.slow
def test_two_processes_preempted_by_sigterm_to_one_stop_together_and_resume(
        tiny_config, tmp_path):
    from ddpm_jax import config_lib
    config = tiny_config
    config.train.num_grid_samples = 0
    config.train.num_train_steps = 60
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 1000  # Only the preemption and final saves.
    config_path = tmp_path / 'config.json'
    config_path.write_text(json.dumps(config_lib.to_json_dict(config)))
    workdir, reference_dir = tmp_path / 'run', tmp_path / 'reference'
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=2',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    args = [str(config_path), str(workdir), 'preempt', str(reference_dir)]

    pair = _Pair(args, env)
    pair.wait_for(0, 'step 3:', timeout=600)  # Process 0 logs; step 1 compiled.
    os.kill(pair.procs[1].pid, signal.SIGTERM)  # Only process 1 is told.
    logged = max(int(n) for n in re.findall(r'step (\d+):', pair.output(0)))
    stopped = pair.finish(timeout=600)
    step = stopped[0]['step']
    assert stopped[1]['step'] == step and 3 <= step < 60, stopped
    assert step <= logged + 20, (step, logged)  # Promptly, not at the end (0.3 s/step).
    assert all(r['default_sigterm'] for r in stopped), stopped
    assert stopped[0]['checksum'] == stopped[1]['checksum']
    assert f'Preempted: saved step {step}; stopping.' in pair.output(0)
    assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [step]

    args[2] = 'resume'
    resumed = _Pair(args, env).finish(timeout=900)
    assert all(r['step'] == 60 and r['equal_to_reference'] for r in resumed), resumed
    assert resumed[0]['checksum'] == resumed[1]['checksum']


if __name__ == '__main__':
    if len(sys.argv) > 5:
        _preemption_worker(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:7])
    else:
        _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
