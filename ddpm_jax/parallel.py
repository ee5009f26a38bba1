"""Device mesh, shardings and every host <-> global array conversion.

One data-parallel layout serves 1 CPU, 8 GPUs and a TPU pod: a 1-D mesh with axis
`'data'`, batches sharded `P('data')` along their leading axis, the train state
replicated `P()`. Each process feeds only its local share of the global batch.

The conversions, all here and nowhere else:

* `to_global(tree, mesh)`: each process's local rows -> one batch-sharded array.
* `shard_host_array(x, mesh)`: an array every process holds in full -> batch-sharded.
* `shard_rows(read_rows, n, mesh)`: rows each process reads for itself -> batch-sharded.
* `to_host(tree)`: replicated arrays -> numpy on this host (no communication).
* `gather(x)`: a batch-sharded array -> the whole array as numpy on every process.
* `any_process(flag)`: a boolean OR over processes.

`reuse_cpu_step_memory()` (called by main.py before the backends start) keeps a
one-CPU-device run's per-step buffers in the process between steps, and
`compiler_options()` is what every jitted step, sampler and feature network here
compiles with: on a CPU, XLA's own convolutions rather than YNNPACK's.
"""


import ctypes
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
# XLA:CPU's library fusions without YNNPACK convolutions (its default list is these
# two plus LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION); see `compiler_options`.
CPU_FUSION_OPTION = 'xla_cpu_experimental_ynn_fusion_type'
CPU_FUSION_TYPES = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'
# mallopt(3) parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def _auto_multiprocess() -> bool:
    """True where `jax.distributed.initialize()` can detect the cluster by itself.

    A multi-task SLURM job, a TPU slice whose environment names its hosts (GKE,
    Megascale), or any Cloud TPU VM: there JAX finds the slice's hosts from the GCE
    metadata server, and on a single-host TPU VM it initializes a one-process
    "cluster", which is harmless. Cloud TPU VM means what `import jax` found (libtpu
    plus TPU chips on the PCI bus; no network), the same test JAX's own TPU cluster
    detection starts with; unless it holds, no metadata is queried, so a CPU or GPU
    machine (without a metadata server) stays single-process. Call after `import jax`.
    """
    if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
        return True
    hosts = os.environ.get('TPU_PROCESS_ADDRESSES') or os.environ.get(
        'TPU_WORKER_HOSTNAMES', '')
    if ',' in hosts or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
        return True
    try:
        from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    # With TPU_SKIP_MDS_QUERY set JAX skips the metadata server and would find no
    # cluster (nor a coordinator address) on a single-host VM.
    return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False)) and (
        os.environ.get('TPU_SKIP_MDS_QUERY') is None)


def _check_process_flags(coordinator_address: str | None, num_processes: int | None,
                         process_id: int | None) -> None:
    """--coordinator_address, --num_processes and --process_id: all three or none."""
    given = {'--coordinator_address': bool(coordinator_address),
             '--num_processes': num_processes is not None,
             '--process_id': process_id is not None}
    if any(given.values()) and not all(given.values()):
        missing = ', '.join(name for name, present in given.items() if not present)
        raise ValueError(f'{missing} must be given too: a multi-process run takes '
                         '--coordinator_address, --num_processes and --process_id together '
                         '(or none of them, where the cluster is detected).')
    if num_processes is None:
        return
    if num_processes < 1:
        raise ValueError(f'--num_processes={num_processes} must be >= 1.')
    if not 0 <= process_id < num_processes:
        raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                         f'{num_processes}).')


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Calls `jax.distributed.initialize()` when the run spans several processes.

    Explicit arguments (from main.py's flags) win; otherwise SLURM jobs, TPU slices and
    Cloud TPU VMs are detected (see `_auto_multiprocess`). A plain single-process run
    does nothing. CPU collectives use gloo, so multi-process CPU runs (and tests) work.

    Raises:
        ValueError: Only some of the three arguments given, `num_processes` < 1 or
            `process_id` outside [0, num_processes); checked before anything starts.
    """
    _check_process_flags(coordinator_address, num_processes, process_id)
    if not coordinator_address and not _auto_multiprocess():
        return
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def enable_compilation_cache(directory: str) -> None:
    """Keeps this process's compiled programs in `directory` (JAX's persistent
    compilation cache), where later runs on the same devices and versions load them
    instead of compiling: a resumed run skips its compiles (the ADM-64 train step took
    over 3 minutes to compile on an H200).

    Programs that compile in under a second are not kept. Entries are keyed by the
    program, the compiler options, the devices and the jax / jaxlib versions, so a
    stale one is never used; one that cannot be read (a write cut short) is compiled
    again, with a warning. On a GPU, XLA's per-fusion autotuning results are kept in
    `directory` too (JAX's `jax_persistent_cache_enable_xla_caches` default), keyed by
    fusion: from them alone the ADM-64 step compiled in 50 s instead of 230 s on an
    H200. Only process 0 writes in a multi-process run. JAX creates `directory` at the
    first compile after this call (and keeps only later compiles), so main.py calls it,
    with WORKDIR/compilation_cache, once the config and the run's inputs are checked.
    """
    jax.config.update('jax_compilation_cache_dir', directory)


def reuse_cpu_step_memory() -> bool:
    """Keeps a single-CPU run's per-step memory in the process instead of refaulting it.

    XLA:CPU allocates each execution's temporaries as one block (744 MB for the
    CIFAR-10 train step at batch 8) and frees it on return. Run on XLA's worker
    threads, glibc serves such a block with a fresh `mmap` and unmaps it after, so every
    step page-faults all of it in again: there 0.3 CPU-s of kernel time and 14% of
    the step. Here JAX is told to dispatch CPU computations synchronously, so they run
    (and allocate) on this thread, whose heap is then told to use no `mmap` and never
    to shrink: the block is reused from step to step, and the process keeps its peak
    memory until it exits. The heap is changed only for a run on one CPU device
    under glibc (other allocators manage memory their own way); returns whether it
    was. Call once, after `initialize_distributed` and before anything starts JAX's
    backends (the dispatch mode is fixed when they start); later it does nothing.
    """
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    if xla_bridge.backends_are_initialized():
        return False
    # Only the CPU client reads this; with several CPU devices their computations
    # still run side by side.
    jax.config.update('jax_cpu_enable_async_dispatch', False)
    if jax.default_backend() != 'cpu' or jax.device_count() != 1:
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # glibc only.
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1))


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """XLA options for this process's `jax.jit`s: on a CPU, XLA's own convolutions.

    XLA:CPU hands dots, reductions and convolutions to YNNPACK by default. Its
    convolutions are no faster than XLA's own (Eigen) forward and input-gradient
    convolutions at the UNets' shapes, and its filter gradients take 1.4x the CPU
    time (the DDPM CIFAR-10 network's 3x3 ones: 467 against 327 CPU-ms per step,
    batch 8); at the quick start's small shapes it also leaves a core idle. Without
    them (dots and reductions stay with YNNPACK) the CIFAR-10 train step is about 10%
    faster, the quick start's 1.3x, its sampler's forward pass 1.55x (1.2 -> 1.9 cores
    busy), FID Inception features 2x; the numbers agree to float32 rounding (README,
    "Convolutions on a CPU"; a 2-core AMD EPYC, jax 0.10.2).

    Only for a process with one CPU device: with several (XLA_FLAGS=
    --xla_force_host_platform_device_count=N), XLA's own convolutions in the ancestral
    sampler's loop return wrong values for the first rows of the devices' shares of the
    batch (garbage for 12 of the quick start's 125 images per device on two devices; not
    always the same rows; XLA's defaults are right there), so such a process keeps
    XLA's defaults.

    Returns None (XLA's defaults) off the CPU, with several devices, where XLA_FLAGS
    already sets the option (yours wins), or with a jaxlib that lacks it. Pass the
    result as `jax.jit(..., compiler_options=parallel.compiler_options())` in your own
    code, above all where you jit the models: where it is not None they trace their
    1x1 channel products as convolutions (`models.layers.pointwise_as_convolution`),
    and on AMD and Intel CPUs their wide 3x3 ones by Winograd's algorithm
    (`models.layers.convolution_algorithm`).
    Call after the backends may start (it asks which one is the default).
    """
    if (jax.default_backend() != 'cpu' or jax.device_count() != 1
            or CPU_FUSION_OPTION in os.environ.get('XLA_FLAGS', '')):
        return None
    options = {CPU_FUSION_OPTION: CPU_FUSION_TYPES}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(
            np.zeros(2, np.float32)).compile()
    except jax.errors.JaxRuntimeError:  # This jaxlib has no such option.
        return None
    return options


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a 1-D `('data',)` mesh over `devices` (default: all devices).

    The axis is of type `Auto` so the model's reshapes and reductions are
    partitioned by the compiler (GSPMD) rather than requiring explicit-sharding
    annotations everywhere.

    Args:
        devices: Devices to span, e.g. `jax.devices()[:2]` in tests.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device of `mesh`."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits an array's leading (batch) axis over the mesh."""
    return NamedSharding(mesh, P(DATA_AXIS))


def num_mesh_devices(mesh: Mesh) -> int:
    """Total number of devices in `mesh`."""
    return int(np.prod(list(mesh.shape.values())))


def to_global(tree: Any, mesh: Mesh) -> Any:
    """Builds global batch-sharded arrays from this process's local numpy arrays.

    Args:
        tree: Pytree of host-local arrays, leading axis = local batch.
        mesh: The mesh; the global leading axis is the sum over processes.

    Returns:
        The same pytree of global `jax.Array`s sharded `P('data')`.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_host_array(x: Any, mesh: Mesh) -> jax.Array:
    """An array that every process holds in full, as a global array sharded `P('data')`.

    Each process builds only its addressable shards (e.g. sampling labels, which are
    the same on every process).
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh), lambda index: x[index])


def shard_rows(read_rows: Callable[[int, int], np.ndarray], num_rows: int,
               mesh: Mesh) -> jax.Array:
    """A global array sharded `P('data')` whose rows each process reads itself.

    `read_rows(start, stop)` returns rows [start, stop) (e.g. from a memory-mapped
    file); every process calls it only for the rows of its own devices, so no
    process reads (or holds) the whole array.
    """
    first = np.asarray(read_rows(0, 0))  # Shape and dtype of a row, reading nothing.
    shape = (num_rows,) + first.shape[1:]

    def callback(index):
        rows = index[0]
        start, stop = rows.start or 0, num_rows if rows.stop is None else rows.stop
        return np.asarray(read_rows(start, stop))[(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, batch_sharding(mesh), callback)


def to_host(tree: Any) -> Any:
    """Fetches a pytree of fully replicated (or local) arrays to numpy on this host.

    Works on multi-process runs too, where a replicated global array is not fully
    addressable: every process reads its first local shard, which holds the whole
    value.
    """
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(fetch, tree)


def any_process(flag: bool) -> bool:
    """True if `flag` is true on any process (one tiny all-gather when multi-process)."""
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))


def gather(x: jax.Array) -> np.ndarray:
    """A global (batch-sharded) array as one NumPy array on every process.

    Multi-process this is a collective: every process must call it.
    """
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
