"""Shared pieces of the benchmarks: config loading with overrides, FLOPs, device peaks,
a profile summary (top ops by time) from a JAX trace, and `device_turn` (several
benchmarks compiling at once and timing one at a time)."""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import fcntl
import glob
import importlib.util
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.extend
import ml_collections
from jax._src import lib as jax_lib  # hlo_module_cost_analysis (see program_flops)

from ddpm_jax import parallel

# Dense peak TFLOP/s per device, (bf16, fp32-class) from vendor data sheets without
# sparsity; the second is TF32 on NVIDIA tensor cores. Matched by substring of jax's
# `device_kind`, first match wins (so 'H100 PCIe' precedes 'H100').
PEAK_TFLOPS = (
    ('H100 PCIe', (756.0, 378.0)),
    ('GH200', (989.0, 494.0)),
    ('H200', (989.0, 494.0)),
    ('H100', (989.0, 494.0)),  # SXM
    ('A100', (312.0, 156.0)),
    ('L40S', (362.0, 183.0)),
    ('L4', (121.0, 60.0)),
    ('A10', (125.0, 62.5)),
    ('V100', (125.0, 15.7)),  # fp16 tensor cores (no bf16 on V100)
    ('TPU v5 lite', (197.0, 197.0)),
    ('TPU v5e', (197.0, 197.0)),
    ('TPU v5p', (459.0, 459.0)),
    ('TPU v4', (275.0, 275.0)),
)


def add_fusion_flag(parser: argparse.ArgumentParser) -> None:
    """Adds --xla_default_fusions (see `use_xla_default_fusions`)."""
    parser.add_argument(
        '--xla_default_fusions', action='store_true',
        help="Compile with XLA:CPU's default library fusions (YNNPACK convolutions too) "
             'instead of parallel.compiler_options(), for comparison.')


def use_xla_default_fusions() -> None:
    """Names XLA:CPU's default fusion list in XLA_FLAGS (before the backends start), so
    `parallel.compiler_options()` defers to it."""
    default = parallel.CPU_FUSION_TYPES + ',LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + f' --{parallel.CPU_FUSION_OPTION}={default}').strip()


_HELD_LOCKS = []  # device_turn's lock files, open (and so locked) until the process exits.


@contextlib.contextmanager
def device_turn(wait_s: float = 900.0):
    """The device to oneself for timing, when benchmarks run side by side.

    Without BENCH_SYNC_DIR in the environment this does nothing. bench/gpu_figures.sh
    sets it when it starts BENCH_SYNC_COUNT benchmarks at once, so that their compiles
    (minutes each on a GPU) overlap, each with its place BENCH_SYNC_RANK (0 first), and
    writes BENCH_SYNC_DIR/<rank>.ended when a benchmark's process exits, however it
    exits. This marks the caller compiled and waits:

    1. until every benchmark has compiled or ended, so that no compile's autotuning
       shares the device with a timing, or until the time BENCH_SYNC_COMPILE_DEADLINE
       (seconds since the epoch, if set; a line says which are still compiling);
    2. until every benchmark ranked before it that has compiled has ended;
    3. for an exclusive lock on BENCH_SYNC_DIR/device.lock, held until the process
       exits (and so has freed its device memory).

    One benchmark times at a time, in rank order. `wait_s` bounds waits 1 and 2.
    """
    sync_dir = os.environ.get('BENCH_SYNC_DIR')
    if not sync_dir:
        yield
        return
    count = int(os.environ['BENCH_SYNC_COUNT'])
    rank = int(os.environ['BENCH_SYNC_RANK'])
    has = lambda r, what: os.path.exists(os.path.join(sync_dir, f'{r}.{what}'))  # noqa: E731
    open(os.path.join(sync_dir, f'{rank}.compiled'), 'w').close()
    deadline = min(time.time() + wait_s,
                   float(os.environ.get('BENCH_SYNC_COMPILE_DEADLINE', 'inf')))
    compiling = lambda: [r for r in range(count)  # noqa: E731
                         if not has(r, 'compiled') and not has(r, 'ended')]
    while compiling() and time.time() < deadline:
        time.sleep(0.5)
    if compiling():
        print(f'device_turn: timing while benchmarks {compiling()} still compile', flush=True)
    deadline = time.time() + wait_s
    while time.time() < deadline and any(has(r, 'compiled') and not has(r, 'ended')
                                         for r in range(rank)):
        time.sleep(0.5)
    lock = open(os.path.join(sync_dir, 'device.lock'), 'a')
    fcntl.flock(lock, fcntl.LOCK_EX)
    _HELD_LOCKS.append(lock)
    yield


def load_config(path: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file and applies 'group.field=value' overrides.

    Values are Python literals (bare strings allowed).

    Raises:
        ValueError: A malformed override or an unknown field.
    """
    spec = importlib.util.spec_from_file_location('bench_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in overrides:
        if '=' not in item:
            raise ValueError(f'--override expects field=value, got {item!r}.')
        name, text = item.split('=', 1)
        *groups, leaf = name.split('.')
        node = config
        for group in groups:
            node = node[group]
        if leaf not in node:
            raise ValueError(f'--override {item}: {name} is not a config field.')
        try:
            node[leaf] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            node[leaf] = text
    return config


def program_flops(lowered) -> float | None:
    """FLOPs of one call of a lowered (not yet compiled) program, from XLA's cost
    analysis of its HLO before optimisation (None if absent).

    The optimised program's analysis (`compiled.cost_analysis()`) is no use on a GPU:
    it counts the convolutions and matrix products that XLA hands to cuDNN, cuBLAS or
    Triton as custom calls as zero (the DDPM CIFAR-10 train step: 0.29 of 4.49 TFLOP at
    batch 128 on an H200). Before optimisation every convolution and dot is still an
    HLO op, so the count is the same on every backend (and equals the compiled one on
    a CPU: 0.281 TFLOP at batch 8). For a program sharded over N devices it counts the
    whole (global) computation: divide by N for one device's share.

    JAX analyses a lowered program only on backends built into jaxlib (the CPU); for a
    GPU's (a PJRT plugin) it returns None, and the CPU backend's analysis of the same
    HLO is used instead. That counts the custom calls already in the lowered program as
    zero: on a GPU, cuDNN flash attention (`layers.attention`), so the count there
    leaves attention out (under 10% of ADM-64's; the README's figures were counted
    from the CPU's lowering, where attention is XLA's).
    """
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
        analysis = analysis[0] if analysis else None
    if not analysis:
        try:
            analysis = jax_lib._jax.hlo_module_cost_analysis(
                jax.extend.backend.get_backend('cpu'),
                lowered.compiler_ir('hlo').as_hlo_module())
        except Exception:  # noqa: BLE001  (a private API: absent means no count)
            analysis = None
    if not analysis or 'flops' not in analysis:
        return None
    return float(analysis['flops'])


def peak_flops(device: jax.Device, dtype: str, override_tflops: float | None = None
               ) -> float | None:
    """Per-device peak FLOP/s to report utilisation against, or None if unknown.

    `override_tflops` (the --peak_tflops flag) wins on any platform; otherwise the
    table above, bf16 for 'bfloat16' models and the fp32-class figure for others, on
    accelerators only (a CPU has no entry).
    """
    if override_tflops:
        return override_tflops * 1e12
    if device.platform == 'cpu':
        return None
    for name, (bf16, fp32) in PEAK_TFLOPS:
        if name.lower() in device.device_kind.lower():
            return (bf16 if dtype == 'bfloat16' else fp32) * 1e12
    return None


# XLA's GpuTargetConfig (stream_executor's device description) of the cards
# `deviceless_gpu_mesh` compiles for, from the vendors' data sheets: name, memory
# (bytes, as the driver reports it), bandwidth (bytes/s); 132 SMs, 50 MB of L2, a 1.98
# GHz boost clock and compute capability 9.0 for both.
GPU_TARGETS = {
    'h100': ('NVIDIA H100 80GB HBM3', 84_929_347_584, 3_352_320_000_000),
    'h200': ('NVIDIA H200', 150_754_820_096, 4_800_000_000_000),
}
_GPU_TARGET_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32  shared_memory_per_block: 49152
  shared_memory_per_core: 233472  threads_per_core_limit: 2048  core_count: 132
  fpus_per_core: 128  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535
  block_dim_limit_z: 65535  memory_bandwidth: {bandwidth}  l2_cache_size: 52428800
  clock_rate_ghz: 1.98  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: {cudnn_minor} }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""


def deviceless_gpu_mesh(target: str, cudnn_minor: int = 19) -> jax.sharding.Mesh:
    """A one-device ('data',) mesh of an NVIDIA GPU that is described, not present.

    Programs jitted over it compile for that card on this machine (XLA's deviceless
    compilation: its GPU fusion, layouts, cuDNN / cuBLAS / Triton kernels) and cannot
    run. Call before anything starts JAX's backends: only the CPU's starts (JAX's CUDA
    plugin loads without a driver), XLA's autotuning (which needs the card) is off, and
    ddpm_jax's choices that read `jax.default_backend()` see 'gpu' (XLA's 3x3
    convolutions, matrix products for 1x1 channel products, cuDNN flash attention
    where cuDNN takes the shape). Needs JAX's CUDA plugin for this jaxlib
    (`pip install "jax-cuda12-plugin[with-cuda]==<jaxlib version>"`, ~5 GB, no GPU);
    without it the process stops with one ERROR line saying so.
    """
    os.environ['JAX_SKIP_CUDA_CONSTRAINTS_CHECK'] = '1'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + ' --xla_gpu_autotune_level=0').strip()
    jax.config.update('jax_platforms', 'cpu')
    jax.default_backend = lambda: 'gpu'
    from jax.experimental import topologies
    name, memory, bandwidth = GPU_TARGETS[target]
    config = _GPU_TARGET_CONFIG.format(name=name, memory=memory, bandwidth=bandwidth,
                                       cudnn_minor=cudnn_minor)
    try:
        topology = topologies.get_topology_desc(platform='cuda', target_config=config,
                                                topology='1x1x1')
    except Exception as e:  # noqa: BLE001  (NotImplementedError, RuntimeError: no plugin)
        raise SystemExit(
            f'ERROR: no CUDA compiler here ({type(e).__name__}: {e}); install JAX\'s CUDA '
            f'plugin for this jaxlib: pip install "jax-cuda12-plugin[with-cuda]=='
            f'{jax.__version__}" (PyPI; no GPU or driver needed).') from None
    return jax.make_mesh((1,), (parallel.DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=topology.devices)


_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%([\w.\-]+) = ')


def _instruction(line: str) -> tuple[str, str] | None:
    """(name, op) of an HLO instruction line, or None.

    The shape before the op may be a tuple with spaces in it (a GPU's cuDNN
    convolutions return `(bf16[...]{...}, u8[...]{0})`), and ops may hold hyphens
    (`custom-call`).
    """
    head = _INSTRUCTION.match(line)
    if not head:
        return None
    rest = line[head.end():]
    if rest.startswith('('):  # A tuple shape: skip to its closing parenthesis.
        depth = 0
        for end, char in enumerate(rest):
            depth += (char == '(') - (char == ')')
            if depth == 0:
                break
        rest = rest[end + 1:]
    else:
        rest = rest.partition(' ')[2]
    op = re.match(r'\s*([\w\-]+)\(', rest)
    return (head.group(1), op.group(1)) if op else None


def _hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (kind, source op path) from a compiled module's text.

    The kind is a fusion's kind, a custom call's target (`__cudnn$convForward`), or
    the op; the path is the `op_name` metadata of the convolution or dot inside a
    fusion, else the instruction's own, else (a fusion without one: XLA drops it on
    the convolutions it builds for filter gradients) that of the fused op with the
    largest result, else the root's op. (XLA named a YNNPACK fusion of a 1x1
    convolution's gradient with a reduction after the reduction; named after its
    first op, a whole normalisation read as the divide of its [B, G] statistics.)
    """
    instr, calls, bodies, current = {}, {}, {}, None
    for line in hlo_text.split('\n'):
        head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{$', line)
        if head:
            current = head.group(1)
            bodies[current] = []
            continue
        if line.startswith('}'):
            current = None
        if current is not None:
            bodies[current].append(line)
        parsed = _instruction(line)
        if not parsed:
            continue
        name, op = parsed
        kind = (re.search(r'"kind":"(\w+)"', line) or re.search(r'kind=(\w+)', line)
                or re.search(r'custom_call_target="([^"]+)"', line))
        op_name = re.search(r'op_name="([^"]+)"', line)
        called = re.search(r'calls=%([\w.\-]+)', line)
        instr[name] = (kind.group(1) if kind else op, op_name.group(1) if op_name else '')
        if called:
            calls[name] = called.group(1)
    for name, (kind, path) in instr.items():
        if name not in calls:
            continue
        body = bodies.get(calls[name], [])
        named = [(_instruction(l), _elements(l), re.search(r'op_name="([^"]+)"', l).group(1))
                 for l in body if 'op_name=' in l]
        heavy = [path for parsed, _, path in named
                 if parsed and parsed[1] in ('convolution', 'dot')]
        largest = [path for _, _, path in sorted(named, key=lambda n: -n[1])]
        root = next((_instruction(l) for l in body if l.lstrip().startswith('ROOT')), None)
        root_op = root[1] if root else '?'
        note = ' (filter gradients)' if root_op == 'convolution' else ''
        instr[name] = (kind, (heavy + [path] if path else heavy + largest
                              + [f'({root_op} without metadata{note})'])[0])
    return instr


def _elements(line: str) -> int:
    """Elements of an HLO instruction's (first) result, from its text; 0 if unknown."""
    shape = re.search(r'= \(?[a-z]\w*\[([\d,]*)\]', line)
    return math.prod(int(d) for d in shape.group(1).split(',') if d) if shape else 0


def _op_group(path: str) -> str:
    """A readable group for an op path: forward/backward, block numbers folded."""
    direction = 'bwd' if 'transpose(' in path else 'fwd'
    path = re.sub(r'_\d+(?=[/_]|$)', '_*', path)
    parts = [p for p in path.split('/') if p and not p.startswith('jit(')
             and not p.startswith('jvp(') and not p.startswith('transpose(')]
    return f'{direction} {"/".join(parts[-3:])}' if parts else path


def profile_summary(run: Callable[[], Any], compiled, *, steps: int, top: int | None = 20
                    ) -> list[dict[str, Any]]:
    """Top ops by time of `steps` calls of `run()` (which blocks), from a JAX trace
    (every op with `top=None`).

    Times are summed over the trace events that carry an `hlo_op` of `compiled`'s
    module (device kernels on an accelerator, XLA's thunks on the CPU, summed over
    its threads), grouped by source op (`_op_group`) and op kind; an op of the module
    that its text does not name is a row of its own, kind '(not indexed)'. On a CPU,
    XLA's own (Eigen) convolutions run on Eigen's threads and their trace events cover
    only the launch, so the process CPU time the events do not account for is one more
    row, kind '(untraced)' (mostly those convolutions), counted in the shares.

    Returns:
        Rows {'ms_per_step', 'share', 'calls_per_step', 'kind', 'op'}, largest first.
    """
    text = compiled.as_text()
    index = _hlo_index(text)
    module = re.match(r'HloModule ([\w.\-]+)', text)
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            cpu_start = time.process_time()
            run()
            cpu_ns = (time.process_time() - cpu_start) * 1e9
        files = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)
        data = jax.profiler.ProfileData.from_file(files[0])
    device_planes = [p for p in data.planes if p.name.startswith('/device:')
                     and 'CPU' not in p.name]
    planes = device_planes or [p for p in data.planes if p.name.startswith('/host:CPU')]
    totals, counts = collections.Counter(), collections.Counter()
    for plane in planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get('hlo_op')
                if op is None:
                    continue
                if op in index:
                    kind, path = index[op]
                elif module and str(stats.get('hlo_module', '')).startswith(module.group(1)):
                    kind, path = '(not indexed)', '(' + re.sub(r'[.]\d+$', '', op) + ')'
                else:  # Another program's (a transfer, the data pipeline's).
                    continue
                key = (kind, _op_group(path) if path and not path.startswith('(')
                       else path or op)
                totals[key] += event.duration_ns
                counts[key] += 1
    if not device_planes and cpu_ns > sum(totals.values()):
        key = ('(untraced)', 'process CPU time without op events (Eigen convolutions)')
        totals[key], counts[key] = cpu_ns - sum(totals.values()), steps
    total = sum(totals.values()) or 1
    return [{'ms_per_step': round(ns / steps / 1e6, 4), 'share': round(ns / total, 4),
             'calls_per_step': round(counts[key] / steps, 1), 'kind': key[0], 'op': key[1]}
            for key, ns in totals.most_common(top)]


def print_profile(rows: list[dict[str, Any]], top: int | None = None) -> None:
    """Prints `profile_summary` rows as a table (the first `top`), then the time of all
    of them by kind (cuDNN's convolutions, XLA's loop or reduction fusions, ...)."""
    print(f'{"ms/step":>9} {"share":>6} {"calls":>6}  {"kind":<16} op')
    for r in rows[:top]:
        print(f'{r["ms_per_step"]:9.2f} {100 * r["share"]:5.1f}% {r["calls_per_step"]:6.1f}  '
              f'{r["kind"][:16]:<16} {r["op"]}')
    by_kind = collections.Counter()
    for r in rows:
        by_kind[r['kind']] += r['ms_per_step']
    total = sum(by_kind.values())
    print(f'{total:9.2f} ms/step in all; by kind: ' + ', '.join(
        f'{kind} {ms:.2f} ({100 * ms / total:.0f}%)' for kind, ms in by_kind.most_common()))
    if any(r['op'].startswith('(command_buffer') for r in rows):
        print('(command_buffer_N rows are XLA command buffers, CUDA graphs of many kernels: '
              'XLA_FLAGS=--xla_gpu_enable_command_buffer= names every kernel, at some cost)')


_NOT_KERNELS = frozenset({
    'parameter', 'get-tuple-element', 'bitcast', 'tuple', 'constant', 'after-all',
    'partition-id', 'replica-id', 'opt-barrier', 'while', 'call', 'conditional'})
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
                'c128': 16}
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')


def _shape_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape's text (a tuple's elements summed)."""
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
               for dtype, dims in _ARRAY.findall(shape_text))


def kernel_census(hlo_text: str) -> dict[str, Any]:
    """The kernels of a compiled program, from its text: what a GPU launches per call.

    Every instruction of the entry computation (and of the bodies of its loops and
    calls, each counted once) that does work: a fusion, a custom call (cuDNN, cuBLAS),
    a copy or an unfused op. `parameter`, `get-tuple-element`, `bitcast`, `tuple`,
    `constant` and barriers launch nothing. Bytes are the result's plus every operand's
    whole size, read once: an upper bound on the traffic to memory (a fusion that
    reads a slice or a broadcast scalar of an operand reads less; data a kernel finds
    in the cache costs less).

    Returns:
        {'kernels', 'bytes', 'gb', 'model_kernels', 'model_gb', 'by_kind': {kind:
        [kernels, gb]}, 'rows': [{'kernels', 'bytes', 'gb', 'kind', 'op'}, ...] (most
        bytes first)}, the ops grouped as `profile_summary` groups them; 'model' is
        what comes from the forward and backward passes (a `jvp(` or `transpose(` in
        the op path), the rest (rows 'step ...') the optimiser, the EMA, the gradient
        norms and the guards.
    """
    index = _hlo_index(hlo_text)
    bodies, current, entry = {}, None, None
    for line in hlo_text.split('\n'):
        head = re.match(r'^(ENTRY )?%?([\w.\-]+) \(.*\{$', line)
        if head:
            current = head.group(2)
            bodies[current] = []
            entry = current if head.group(1) else entry
        elif line.startswith('}'):
            current = None
        elif current is not None:
            bodies[current].append(line)
    rows, totals = collections.defaultdict(lambda: [0, 0]), collections.defaultdict(
        lambda: [0, 0])
    pending, seen = [entry], set()
    while pending:
        computation = pending.pop()
        if computation in seen or computation not in bodies:
            continue
        seen.add(computation)
        shapes = {}
        for line in bodies[computation]:
            parsed = _instruction(line)
            if not parsed:
                continue
            name, op = parsed
            result = line.split(' = ', 1)[1]
            result = result[:result.index(op + '(')]
            shapes[name] = _shape_bytes(result)
            if op in ('while', 'call', 'conditional'):
                pending += re.findall(r'(?:body|condition|to_apply|branch_computations'
                                      r'|true_computation|false_computation)='
                                      r'\{?%([\w.\-]+)', line)
                pending += re.findall(r', %([\w.\-]+)', line.partition(
                    'branch_computations={')[2].partition('}')[0])
            if op in _NOT_KERNELS:
                continue
            operands = line.split(op + '(', 1)[1]
            depth, end = 1, 0
            for end, char in enumerate(operands):
                depth += (char == '(') - (char == ')')
                if depth == 0:
                    break
            read = sum(shapes.get(o, 0) for o in re.findall(r'%([\w.\-]+)', operands[:end]))
            kind, path = index.get(name, (op, ''))
            group = _op_group(path) if path and not path.startswith('(') else path or op
            model = 'jvp(' in path or 'transpose(' in path
            if not model and group.startswith('fwd '):  # The optimiser's, the guards'.
                group = 'step ' + group[4:]
            for key in ((kind, group), ('model' if model else 'rest', kind)):
                table = rows if key[0] == kind else totals
                table[key][0] += 1
                table[key][1] += shapes[name] + read
    by_kind = collections.defaultdict(lambda: [0, 0])
    for (kind, _), (n, b) in rows.items():
        by_kind[kind][0] += n
        by_kind[kind][1] += b
    model = [v for (part, _), v in totals.items() if part == 'model']
    gb = lambda b: round(b / 1e9, 3)  # noqa: E731
    return {
        'kernels': sum(n for n, _ in by_kind.values()),
        'bytes': sum(b for _, b in by_kind.values()),
        'gb': gb(sum(b for _, b in by_kind.values())),
        'model_kernels': sum(n for n, _ in model), 'model_gb': gb(sum(b for _, b in model)),
        'by_kind': {k: [n, gb(b)] for k, (n, b) in
                    sorted(by_kind.items(), key=lambda kv: -kv[1][1])},
        'rows': [{'kernels': n, 'bytes': b, 'gb': gb(b), 'kind': k, 'op': g}
                 for (k, g), (n, b) in sorted(rows.items(), key=lambda kv: -kv[1][1])]}
