"""Memory of the train step, from XLA's compiled memory analysis (nothing is allocated).

    python bench/bench_memory.py --config=configs/imagenet256.py --batches=1,2 --device_gb=80

Two estimates per `model.remat` setting (off; on with `model.remat_policy`):

* residuals: the bytes the model's forward pass keeps for its backward pass, per
  example, read exactly from the traced program (`saved_residuals`, independent of
  the backend), and the upper bound on the per-device batch they leave room for:
  (device - train state - float32 gradients) / residuals per example;
* compiled: the real jitted train step compiled for abstract inputs (`jax.eval_shape`
  of the train state, `jax.ShapeDtypeStruct` batches) at each per-device batch of
  `--batches`; its argument + output + temporary - aliased bytes grow linearly with
  the batch, so the two smallest batches give a line whose crossing of `--device_gb`
  is the largest per-device batch that fits.

On a CPU the compiled program is XLA:CPU's, whose fusion and schedule differ from a
GPU's or TPU's (XLA:CPU's schedule keeps little of what remat saves): take the
compiled figure as an estimate for the device the program was compiled for, and
confirm on the accelerator (bench_train.py reports the allocator's peak there). The
published global batch is reachable with `train.grad_accum_steps` =
ceil(global / (devices x per-device batch)). One JSON line per setting.

--gpu_target=h100 (or h200) compiles the step for that card on a machine without one
(`common.deviceless_gpu_mesh`; JAX's CUDA plugin installed, no GPU): XLA's GPU
program and its memory analysis, as a lent card's compile would give them without
autotuning.

    python bench/bench_memory.py --config=configs/imagenet256.py --override \
        model.dtype=bfloat16 --batches=8,16 --gpu_target=h100
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ddpm_jax import data as data_lib  # noqa: E402
from ddpm_jax import config_lib, models, parallel, state as state_lib, tasks, train  # noqa: E402
import common  # noqa: E402
from common import load_config  # noqa: E402

GIB = 2 ** 30


def compile_abstract_train_step(config, per_device_batch: int, mesh):
    """(the real jitted train step compiled for abstract inputs at `per_device_batch`,
    its abstract train state, compile seconds); nothing is allocated. Sets
    `config.train.global_batch_size` and validates the config."""
    num_devices = parallel.num_mesh_devices(mesh)
    config.train.global_batch_size = per_device_batch * num_devices
    config_lib.validate(config, num_devices=num_devices)
    task = tasks.create_task(config)
    abstract_state = state_lib.create_abstract_train_state(task, mesh)
    example = next(data_lib.create_train_iterator(_one_example_config(config, num_devices)))
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((config.train.global_batch_size,) + x.shape[1:],
                                       x.dtype, sharding=parallel.batch_sharding(mesh)),
        example)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    step = train.jit_train_step(train.make_train_step_fn(task, mesh), mesh)
    start = time.perf_counter()
    compiled = step.lower(abstract_state, batch, rng).compile()
    return compiled, abstract_state, time.perf_counter() - start


def compiled_bytes(compiled) -> int:
    """Arguments + outputs + temporaries - aliased bytes of a compiled program."""
    analysis = compiled.memory_analysis()
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def step_memory(config, per_device_batch: int, mesh) -> dict:
    """Compiled memory of one train step at `per_device_batch` (bytes per device)."""
    compiled, abstract_state, compile_s = compile_abstract_train_step(
        config, per_device_batch, mesh)
    state_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize
                      for x in jax.tree.leaves(abstract_state))
    total = compiled_bytes(compiled)
    return {'per_device_batch': per_device_batch, 'compile_s': round(compile_s, 1),
            'state_gb': round(state_bytes / GIB, 3),
            'temp_gb': round(compiled.memory_analysis().temp_size_in_bytes / GIB, 3),
            'total_gb': round(total / GIB, 3), 'total_bytes': total}


def residual_bytes_per_example(config) -> int | None:
    """Bytes the model's forward pass saves for the backward pass, one example
    (training mode, the config's dtype and remat), or None where JAX lacks the tool."""
    try:
        from jax._src.ad_checkpoint import saved_residuals
    except ImportError:
        return None
    model = models.create_model(config)
    params = models.param_shapes(model, config.data.image_size, config.data.channels)
    x, t, kwargs = models.example_inputs(model, config.data.image_size,
                                         config.data.channels, 1)

    def forward(p):
        out = model.apply({'params': p}, x, t, train=True,
                          rngs={'dropout': jax.random.key(0)}, **kwargs)
        return jnp.sum(out.astype(jnp.float32))

    return sum(aval.size * aval.dtype.itemsize for aval, why in saved_residuals(forward, params)
               if 'from the argument' not in str(why))


def _one_example_config(config, num_devices: int):
    """A copy of `config` reading one synthetic batch of `num_devices` examples."""
    small = config.copy_and_resolve_references()
    small.data.dataset = 'fake'
    small.train.global_batch_size = num_devices
    return small


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', required=True, help='Config file.')
    parser.add_argument('--override', action='append', default=[],
                        help='field=value, e.g. model.dtype=bfloat16 (repeatable).')
    parser.add_argument('--batches', default='1,2',
                        help="Per-device batches to compile ('' = residuals only, fast).")
    parser.add_argument('--remat', default='both', choices=('both', 'on', 'off'),
                        help='model.remat settings to measure.')
    parser.add_argument('--device_gb', type=float, default=80.0,
                        help='Device memory to fit the batch into (GiB).')
    parser.add_argument('--gpu_target', default=None, choices=sorted(common.GPU_TARGETS),
                        help='Compile for this GPU without one (common.deviceless_gpu_mesh).')
    args = parser.parse_args()

    mesh = (common.deviceless_gpu_mesh(args.gpu_target) if args.gpu_target
            else parallel.create_mesh())
    batches = sorted(int(b) for b in args.batches.split(',') if b.strip())
    settings = {'both': (False, True), 'on': (True,), 'off': (False,)}[args.remat]
    for remat in settings:
        config = load_config(args.config, args.override)
        config.data.dataset = 'fake'
        config.model.remat = remat
        result = {'config': args.config, 'overrides': args.override, 'remat': remat,
                  'remat_policy': config.model.remat_policy if remat else None,
                  'dtype': config.model.dtype, 'device': mesh.devices.flat[0].device_kind}
        residuals = residual_bytes_per_example(config)
        if residuals:
            task = tasks.create_task(config)
            state_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(
                state_lib.create_abstract_train_state(task, mesh)))
            grad_bytes = 4 * sum(x.size for x in jax.tree.leaves(
                jax.eval_shape(task.init_params, jax.random.key(0))))
            room = args.device_gb * GIB - state_bytes - grad_bytes
            result['residual_gb_per_example'] = round(residuals / GIB, 3)
            result['max_per_device_batch_from_residuals'] = int(room // residuals)
        rows = [step_memory(config, b, mesh) for b in batches]
        result['compiled'] = [{k: v for k, v in r.items() if k != 'total_bytes'}
                              for r in rows]
        if len(rows) >= 2:
            (b0, m0), (b1, m1) = ((r['per_device_batch'], r['total_bytes']) for r in rows[:2])
            per_example = (m1 - m0) / (b1 - b0)
            fixed = m0 - per_example * b0
            result['gb_per_example'] = round(per_example / GIB, 3)
            result['fixed_gb'] = round(fixed / GIB, 3)
            result['compiled_max_per_device_batch'] = (
                int((args.device_gb * GIB - fixed) // per_example) if per_example > 0 else None)
        global_batch = load_config(args.config, args.override).train.global_batch_size
        result['published_global_batch'] = global_batch
        for key, name in (('compiled_max_per_device_batch', 'compiled'),
                          ('max_per_device_batch_from_residuals', 'residuals')):
            if result.get(key):  # One device reaching the published batch.
                result[f'grad_accum_steps_{name}'] = math.ceil(global_batch / result[key])
        print(json.dumps(result), flush=True)


if __name__ == '__main__':
    main()
