"""Two-process training over jax.distributed on one machine (CPU, gloo collectives).

Each process has 2 CPU devices (4 global). Both train 2 steps, checkpoint, then
resume from the checkpoint to step 4; the test checks that the processes agree on
the final state and that each saved its own data-iterator position.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(process_id: int, port: int, config_path: str, workdir: str) -> None:
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
    import numpy as np

    from ddpm_jax import checkpointing, parallel, train

    with open(config_path) as f:
        config = checkpointing.config_from_json_dict(json.load(f))
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    first = config.copy_and_resolve_references()
    first.train.num_train_steps = 2
    state = train.train_and_evaluate(first, workdir)
    assert int(parallel.to_host(state.step)) == 2
    state = train.train_and_evaluate(config, workdir)  # Restores step 2.
    host = parallel.to_host(state)
    leaves = jax.tree.leaves((host.params, host.ema_params, host.opt_state))
    result = {'process': jax.process_index(), 'step': int(host.step),
              'checksum': float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves)),
              'finite': bool(all(np.isfinite(x).all() for x in leaves))}
    print('RESULT ' + json.dumps(result), flush=True)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_agree(tiny_config, tmp_path):
    from ddpm_jax import checkpointing
    config = tiny_config
    config.train.num_grid_samples = 0
    config_path = tmp_path / 'config.json'
    config_path.write_text(json.dumps(checkpointing.config_to_json_dict(config)))
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


if __name__ == '__main__':
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
