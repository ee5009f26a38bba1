"""Tests for ddpm_jax.parallel on four CPU devices: the mesh and every conversion."""

import jax
import numpy as np

from ddpm_jax import parallel


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
