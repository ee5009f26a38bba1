"""Tests for ddpm_jax.parallel on four CPU devices: the mesh and every conversion; in
subprocesses (one or two devices), the CPU step-memory reuse."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddpm_jax import parallel
from ddpm_jax.models import layers


def test_mesh_and_shardings():
    mesh = parallel.create_mesh()
    assert parallel.num_mesh_devices(mesh) == jax.device_count() == 4
    assert mesh.axis_names == (parallel.DATA_AXIS,)
    assert parallel.replicated_sharding(mesh).is_fully_replicated
    assert not parallel.batch_sharding(mesh).is_fully_replicated
    assert parallel.num_mesh_devices(parallel.create_mesh(jax.devices()[:2])) == 2


def test_to_global_splits_the_batch_over_devices():
    mesh = parallel.create_mesh()
    local = {'image': np.arange(8 * 2 * 2 * 1, dtype=np.float32).reshape(8, 2, 2, 1),
             'label': np.arange(8, dtype=np.int32)}
    batch = parallel.to_global(local, mesh)
    for key, value in local.items():
        assert batch[key].shape == value.shape and batch[key].dtype == value.dtype
        assert batch[key].sharding == parallel.batch_sharding(mesh)
        shards = sorted(batch[key].addressable_shards, key=lambda s: s.index[0].start)
        assert [s.data.shape[0] for s in shards] == [2, 2, 2, 2]
        np.testing.assert_array_equal(np.asarray(shards[1].data), value[2:4])
        np.testing.assert_array_equal(parallel.gather(batch[key]), value)


def test_shard_host_array_and_to_host():
    mesh = parallel.create_mesh()
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int32)
    sharded = parallel.shard_host_array(labels, mesh)
    assert sharded.sharding == parallel.batch_sharding(mesh)
    shards = sorted(sharded.addressable_shards, key=lambda s: s.index[0].start)
    np.testing.assert_array_equal(np.asarray(shards[3].data), [2, 6])
    replicated = jax.device_put({'a': np.float32(2.5), 'b': np.arange(3)},
                                parallel.replicated_sharding(mesh))
    host = parallel.to_host(replicated)
    assert isinstance(host['b'], np.ndarray) and host['a'] == np.float32(2.5)
    np.testing.assert_array_equal(host['b'], [0, 1, 2])


def test_any_process_single_process():
    assert parallel.any_process(True) is True
    assert parallel.any_process(False) is False


def test_shard_rows_reads_only_each_device_rows():
    mesh = parallel.create_mesh()
    data = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    calls = []

    def read_rows(start, stop):
        calls.append((start, stop))
        return data[start:stop]

    sharded = parallel.shard_rows(read_rows, 8, mesh)
    np.testing.assert_array_equal(parallel.gather(sharded), data)
    assert sorted(c for c in calls if c[1] > c[0]) == [(0, 2), (2, 4), (4, 6), (6, 8)]


_FAULTS_SCRIPT = '''
import resource, sys
import jax, jax.numpy as jnp
from ddpm_jax import parallel
reused = parallel.reuse_cpu_step_memory() if sys.argv[1] == 'reuse' else False
jax.devices()
again = parallel.reuse_cpu_step_memory()  # The backends have started: does nothing.
f = jax.jit(lambda x, w: (x * 2.0) @ w)  # x * 2.0 is a 64 MiB temporary.
x, w = jnp.ones((4096, 4096)), jnp.ones((4096, 8))
temp = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(32):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x, w))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
pages = temp // resource.getpagesize()
refaulted = [n > pages // 2 for n in faults]
print(reused, again, jax.device_count(), pages, sum(refaulted[16:]))
'''


def _run_faults(mode, devices):
    env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    out = subprocess.run([sys.executable, '-c', _FAULTS_SCRIPT, mode], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == 'True', out[1] == 'True', int(out[2]), int(out[3]), int(out[4])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc heap')
def test_reuse_cpu_step_memory_stops_refaulting_the_temporaries():
    # 32 calls, the last 16 counted. Plain: each call faults its 64 MiB temporary
    # (16,384 pages) in anew.
    reused, again, devices, pages, refaulted = _run_faults('plain', 1)
    assert (reused, again, devices, pages) == (False, False, 1, 16384)
    assert refaulted >= 15, refaulted
    # Reused: once the heap has grown to hold the block (the first few calls; more
    # when another process loads the machine: up to 7 of the first 16 seen, and 2 of
    # calls 13-24 once on a loaded CI machine), calls fault in next to nothing.
    reused, again, devices, pages, refaulted = _run_faults('reuse', 1)
    assert (reused, again, devices) == (True, False, 1)
    assert refaulted <= 4, refaulted
    # Several devices: the heap is left alone.
    assert _run_faults('reuse', 2)[:3] == (False, False, 2)


def _entry_computation(hlo_text: str) -> str:
    entry = hlo_text[hlo_text.index('\nENTRY'):]
    return entry[:entry.index('\n}')]


def test_compiler_options_use_xla_convolutions_with_the_same_numbers():
    # The options: XLA's own convolutions, not YNNPACK fusions; the same gradients up
    # to float32 rounding.
    options = {parallel.CPU_FUSION_OPTION: parallel.CPU_FUSION_TYPES}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 16, 32)).astype(np.float32)
    w = 0.1 * rng.standard_normal((3, 3, 32, 32)).astype(np.float32)

    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return jax.numpy.sum(jax.numpy.tanh(y) ** 2)

    grad = jax.grad(loss, argnums=(0, 1))
    ours = jax.jit(grad, compiler_options=options).lower(w, x).compile()
    default = jax.jit(grad).lower(w, x).compile()
    ours_entry, default_entry = (_entry_computation(c.as_text()) for c in (ours, default))
    assert ours_entry.count(' convolution(') == 3  # Forward, input and filter gradients.
    assert '__ynn_fusion' not in ours.as_text()
    assert ' convolution(' not in default_entry and '__ynn_fusion' in default_entry
    for got, want in zip(ours(w, x), default(w, x)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


_PRINT_OPTIONS = ('from ddpm_jax import parallel; from ddpm_jax.models import layers; '
                  'print(parallel.compiler_options(), layers.pointwise_as_convolution(), '
                  'layers.convolution_algorithm())')


@pytest.mark.parametrize('xla_flags, want', [
    ('--xla_force_host_platform_device_count=1',
     repr({parallel.CPU_FUSION_OPTION: parallel.CPU_FUSION_TYPES})),
    ('--xla_force_host_platform_device_count=2', 'None'),  # Several devices: defaults.
    (f'--xla_force_host_platform_device_count=1 --{parallel.CPU_FUSION_OPTION}='
     + parallel.CPU_FUSION_TYPES, 'None'),  # XLA_FLAGS naming the option wins.
])
def test_compiler_options_only_for_one_cpu_device(xla_flags, want):
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
    out = subprocess.run([sys.executable, '-c', _PRINT_OPTIONS], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    # 1x1 convolutions and (on AMD and Intel CPUs) Winograd's 3x3 ones follow: exactly
    # where XLA's own convolutions run.
    winograd = want != 'None' and layers.cpu_vendor() in layers.WINOGRAD_VENDORS
    assert out == f'{want} {want != "None"} {"winograd" if winograd else "direct"}'


CACHE_SCRIPT = """
import sys
import jax
import jax.numpy as jnp
from ddpm_jax import parallel
parallel.enable_compilation_cache(sys.argv[1])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # Keep even a tiny one.
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith('cache_hits') else None)
out = jax.jit(lambda x: jnp.tanh(x @ x.T) * 3.0)(jnp.arange(64.0).reshape(8, 8) / 64)
total = float(out.sum())
print(len(hits), total)
"""


def test_compilation_cache_is_written_then_read_by_the_next_process(tmp_path):
    cache = tmp_path / 'cache'

    def run():
        out = subprocess.run([sys.executable, '-c', CACHE_SCRIPT, str(cache)],
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, XLA_FLAGS=''))
        assert out.returncode == 0, out.stderr
        hits, total = out.stdout.split()
        return int(hits), total

    first, second = run(), run()
    assert first[0] == 0 and any(cache.iterdir())  # Compiled, and kept.
    # Every program (the eager ops' too) loaded, with the same result.
    assert second == (len(list(cache.glob('*-cache'))), first[1]) and second[0] >= 1
