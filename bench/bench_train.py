"""Training throughput benchmark: compile time, step time, images/s, FLOP/s.

    python bench/bench_train.py --config=configs/cifar10.py --batch=32 --steps=10
    python bench/bench_train.py --config=configs/imagenet64.py --batch=16 \\
        --override model.base_channels=64 --steps=5

Uses the synthetic 'fake' data source (no dataset needed) and the real jitted train
step over a ('data',) mesh of all devices. Reports the compile time of the step,
the mean step time after warm-up, images/s, and one device's share of the step's
FLOPs from XLA's cost analysis of the lowered program (`common.program_flops`); on a
GPU/TPU also the achieved FLOP/s as a fraction of the device's peak (dense bf16 for
bfloat16 models, TF32 for float32 ones, or --peak_tflops), the
process CPU seconds and minor page faults per step (on a CPU: robust to other load,
unlike wall time) and the peak memory (the device allocator's high-water mark, or
XLA's compiled estimate on a CPU). Like main.py it first calls
`parallel.reuse_cpu_step_memory()` (one CPU device: the step's memory is reused, not
faulted in anew each step); `--plain_cpu_memory` skips that, for comparison.
`--profile=N` traces N more steps and prints the top ops by time, grouped by the model
code they come from (forward / backward). `--per_step` waits for each step and adds
the median step time. One JSON line is printed at the end.

The step clips the whole batch's gradient: `optim.grad_clip_groups` (DDPM's
per-replica clipping, which `cifar10.py` and `celebahq256.py` reproduce) is set to 1
unless given with --override, so the figures compare with other implementations' steps
and any --batch fits.

    python bench/bench_train.py --config=configs/cifar10.py --batch=8 --profile=2
"""

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_jax import data as data_lib  # noqa: E402
from ddpm_jax import config_lib, parallel, state as state_lib, tasks, train  # noqa: E402
import common  # noqa: E402
from common import (load_config, program_flops, peak_flops, print_profile,  # noqa: E402
                    profile_summary)

def _peak_memory_gb(compiled, device) -> float | None:
    """Peak device memory: the allocator's high-water mark where the device keeps one
    (GPU/TPU), else XLA's compiled estimate (arguments + outputs + temporaries)."""
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
        return round(stats['peak_bytes_in_use'] / 2**30, 3)
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return round(total / 2**30, 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', required=True, help='Config file.')
    parser.add_argument('--batch', type=int, default=None, help='Global batch size.')
    parser.add_argument('--override', action='append', default=[],
                        help='field=value, e.g. model.base_channels=64 (repeatable).')
    parser.add_argument('--steps', type=int, default=10, help='Timed steps.')
    parser.add_argument('--warmup', type=int, default=2, help='Untimed steps after compile.')
    parser.add_argument('--peak_tflops', type=float, default=None,
                        help='Per-device peak to report utilisation against.')
    parser.add_argument('--per_step', action='store_true',
                        help='Wait for each step; also report the median step time '
                             '(how the README compares with PyTorch).')
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='Also trace N steps and print the top ops by time.')
    parser.add_argument('--profile_top', type=int, default=20, help='Rows of --profile.')
    parser.add_argument('--plain_cpu_memory', action='store_true',
                        help="Skip main.py's parallel.reuse_cpu_step_memory() (for comparison).")
    common.add_fusion_flag(parser)
    args = parser.parse_args()
    if args.xla_default_fusions:
        common.use_xla_default_fusions()

    reuse_memory = not args.plain_cpu_memory and parallel.reuse_cpu_step_memory()
    config = load_config(args.config, args.override)
    config.data.dataset = 'fake'
    config.data.prefetch_batches = 2
    if args.batch is not None:
        config.train.global_batch_size = args.batch
    if not any(o.startswith('optim.grad_clip_groups=') for o in args.override):
        config.optim.grad_clip_groups = 1  # The plain step (module docstring).
    mesh = parallel.create_mesh()
    num_devices = parallel.num_mesh_devices(mesh)
    config_lib.validate(config, num_devices=num_devices)
    task = tasks.create_task(config)
    state = state_lib.create_sharded_train_state(task, jax.random.key(0), mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    step_fn = train.jit_train_step(train.make_train_step_fn(task, mesh), mesh)
    iterator = data_lib.create_train_iterator(config)
    rng = jax.random.key(1)
    batch = parallel.to_global(next(iterator), mesh)

    start = time.perf_counter()
    lowered = step_fn.lower(state, batch, rng)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    print(f'compiled the train step in {compile_s:.1f} s', flush=True)
    flops = program_flops(lowered)
    if flops is not None:
        flops /= num_devices  # The lowered program is the global computation.

    with common.device_turn():  # Alone on the device while timing.
        for _ in range(args.warmup):
            state, metrics = compiled(state, parallel.to_global(next(iterator), mesh), rng)
        jax.block_until_ready(state)
        batches = [parallel.to_global(next(iterator), mesh) for _ in range(args.steps)]
        faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start, cpu_start = time.perf_counter(), time.process_time()
        step_times = []
        for batch in batches:
            state, metrics = compiled(state, batch, rng)
            if args.per_step:
                jax.block_until_ready((state, metrics))
                step_times.append(time.perf_counter() - start - sum(step_times))
        # Host time to issue the steps, before waiting for them. Well under the step
        # time, the device sets the pace; near it, either the host does or the runtime
        # held the host back (as it did for a GPU-bound step on an H200).
        dispatch_s = (time.perf_counter() - start) / args.steps
        jax.block_until_ready((state, metrics))
        step_s = (time.perf_counter() - start) / args.steps
        cpu_s = (time.process_time() - cpu_start) / args.steps
        faults = ((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start)
                  / args.steps)
        # One loss per phase: loss_<part>.
        losses = {k: v for k, v in metrics.items() if k.startswith('loss')}
        assert losses and all(np.isfinite(float(parallel.to_host(v)))
                              for v in losses.values()), losses

        if args.profile:
            profile_batches = [parallel.to_global(next(iterator), mesh)
                               for _ in range(args.profile)]

            def run():
                nonlocal state
                for batch in profile_batches:
                    state, out = compiled(state, batch, rng)
                jax.block_until_ready((state, out))

            print_profile(profile_summary(run, compiled, steps=args.profile, top=None),
                          top=args.profile_top)

    device = jax.devices()[0]
    result = {
        'config': args.config, 'overrides': args.override,
        'image_size': config.data.image_size, 'global_batch_size':
        config.train.global_batch_size, 'grad_accum_steps': config.train.grad_accum_steps,
        'grad_clip_groups': config.optim.grad_clip_groups,
        'dtype': config.model.dtype, 'params_M': round(num_params / 1e6, 2),
        'device': f'{num_devices} x {device.device_kind}', 'platform': device.platform,
        'compile_s': round(compile_s, 2), 'step_s': round(step_s, 4),
        **({'step_s_median': round(float(np.median(step_times)), 4)} if step_times else {}),
        'dispatch_s_per_step': round(dispatch_s, 4), 'cpu_s_per_step': round(cpu_s, 4),
        'cpu_step_memory_reused': reuse_memory,
        'compiler_options': parallel.compiler_options(),
        'page_faults_per_step': round(faults),
        'peak_memory_gb': _peak_memory_gb(compiled, device),
        'images_per_s': round(config.train.global_batch_size / step_s, 1),
    }
    if flops is not None:
        result['step_tflop_per_device'] = round(flops / 1e12, 4)
        achieved = flops / step_s
        result['tflops_per_device'] = round(achieved / 1e12, 2)
        peak = peak_flops(device, config.model.dtype, args.peak_tflops)
        if peak:
            result['peak_fraction'] = round(achieved / peak, 3)
    print(json.dumps(result))


if __name__ == '__main__':
    main()
