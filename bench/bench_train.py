"""Training throughput benchmark: compile time, step time, images/s, FLOP/s.

    python bench/bench_train.py --config=configs/cifar10.py --batch=32 --steps=10
    python bench/bench_train.py --config=configs/imagenet64.py --batch=16 \\
        --override model.base_channels=64 --steps=5

Uses the synthetic 'fake' data source (no dataset needed) and the real jitted train
step over a ('data',) mesh of all devices. Reports the compile time of the step,
the mean step time after warm-up, images/s, and the step's FLOPs from XLA's cost
analysis; on a GPU/TPU also the achieved FLOP/s as a fraction of the device's peak
(dense bf16 for bfloat16 models, TF32 for float32 ones, or --peak_tflops).
One JSON line is printed at the end.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ddpm_jax import data as data_lib  # noqa: E402
from ddpm_jax import config_lib, parallel, state as state_lib, tasks, train  # noqa: E402
from common import compiled_flops, load_config, peak_flops  # noqa: E402

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
    args = parser.parse_args()

    config = load_config(args.config, args.override)
    config.data.dataset = 'fake'
    config.data.prefetch_batches = 2
    if args.batch is not None:
        config.train.global_batch_size = args.batch
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
    compiled = step_fn.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    flops = compiled_flops(compiled)

    for _ in range(args.warmup):
        state, metrics = compiled(state, parallel.to_global(next(iterator), mesh), rng)
    jax.block_until_ready(state)
    batches = [parallel.to_global(next(iterator), mesh) for _ in range(args.steps)]
    start = time.perf_counter()
    for batch in batches:
        state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / args.steps
    assert np.isfinite(float(parallel.to_host(metrics['loss'])))

    device = jax.devices()[0]
    result = {
        'config': args.config, 'overrides': args.override,
        'image_size': config.data.image_size, 'global_batch_size':
        config.train.global_batch_size, 'grad_accum_steps': config.train.grad_accum_steps,
        'dtype': config.model.dtype, 'params_M': round(num_params / 1e6, 2),
        'device': f'{num_devices} x {device.device_kind}', 'platform': device.platform,
        'compile_s': round(compile_s, 2), 'step_s': round(step_s, 4),
        'images_per_s': round(config.train.global_batch_size / step_s, 1),
    }
    if flops is not None:
        # cost_analysis counts the whole SPMD program once per device.
        result['step_tflop_per_device'] = round(flops / 1e12, 4)
        achieved = flops / step_s
        result['tflops_per_device'] = round(achieved / 1e12, 2)
        peak = peak_flops(device, config.model.dtype, args.peak_tflops)
        if peak:
            result['peak_fraction'] = round(achieved / peak, 3)
    print(json.dumps(result))


if __name__ == '__main__':
    main()
