"""The train step compiled for an NVIDIA GPU on a machine without one: its kernels and memory.

    pip install 'jax-cuda12-plugin[with-cuda]==<your jaxlib version>'  # ~5 GB, no GPU needed
    python bench/gpu_compile.py --config=configs/cifar10.py --batch=128 --target=h200
    python bench/gpu_compile.py --config=configs/imagenet256.py --batch=32 --target=h100 \\
        --override model.remat=True --rows=0

XLA compiles for a GPU it describes rather than queries ("deviceless" compilation:
`common.deviceless_gpu_mesh`, a target config with the card's SM count, memory,
bandwidth and cuDNN version), so the program that would run on an H100 or H200 is
built here, on the CPU: XLA's GPU fusion, its layouts and its choice of cuDNN, cuBLAS
and Triton kernels. Nothing runs and nothing is timed; XLA's autotuning, which needs
the card, is off (it picks among a kernel's variants, not what is fused). The model is
traced as on a GPU (XLA's 3x3 convolutions, not the CPU's Winograd ones; matrix
products for the 1x1 channel products; cuDNN flash attention where this JAX's cuDNN
checks take the shape, else XLA's: jax 0.10.2 takes head dims up to 128, so DDPM
CIFAR-10's 256 runs XLA's attention here).

Prints one JSON line: the compiled memory (arguments + outputs + temporaries -
aliased, as `bench_memory.py` reads it), and `common.kernel_census`: the kernels one
step launches, by kind (cuDNN convolutions, cuBLAS / Triton matrix products, XLA's
loop and reduction fusions, copies), how many come from the forward and backward
passes and how many from the optimiser, EMA, norms and guards, and each group's
bytes (an upper bound on its memory traffic). With --rows=N (default 25) the N
groups with the most bytes are printed first, as a table. --hlo=FILE writes the
compiled program's text.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import bench_memory  # noqa: E402
import common  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', required=True, help='Config file.')
    parser.add_argument('--batch', type=int, default=None, help='Batch (one device).')
    parser.add_argument('--override', action='append', default=[],
                        help='field=value, e.g. model.remat=True (repeatable).')
    parser.add_argument('--target', default='h200', choices=sorted(common.GPU_TARGETS))
    parser.add_argument('--cudnn_minor', type=int, default=19,
                        help='cuDNN 9.x to compile for (the H200 lease had 9.19).')
    parser.add_argument('--dtype', default='bfloat16', help='model.dtype.')
    parser.add_argument('--rows', type=int, default=25, help='Table rows (0: none).')
    parser.add_argument('--hlo', default=None, help="Write the compiled program's text here.")
    args = parser.parse_args()

    mesh = common.deviceless_gpu_mesh(args.target, args.cudnn_minor)
    config = common.load_config(args.config, [f'model.dtype={args.dtype}'] + args.override)
    config.data.dataset = 'fake'
    if not any(o.startswith('optim.grad_clip_groups=') for o in args.override):
        config.optim.grad_clip_groups = 1  # The plain step, as bench_train.py times it.
    batch = config.train.global_batch_size if args.batch is None else args.batch
    compiled, _, compile_s = bench_memory.compile_abstract_train_step(config, batch, mesh)
    text = compiled.as_text()
    if args.hlo:
        with open(args.hlo, 'w') as f:
            f.write(text)
    census = common.kernel_census(text)
    if args.rows:
        print(f'{"kernels":>7} {"GB":>7}  {"kind":<28} op')
        for row in census['rows'][:args.rows]:
            print(f'{row["kernels"]:7d} {row["gb"]:7.3f}  {row["kind"][:28]:<28} {row["op"]}')
    memory = compiled.memory_analysis()
    total = bench_memory.compiled_bytes(compiled)
    print(json.dumps({
        'config': args.config, 'overrides': args.override, 'dtype': args.dtype,
        'batch': config.train.global_batch_size, 'target': common.GPU_TARGETS[args.target][0],
        'cudnn': f'9.{args.cudnn_minor}', 'jax': jax.__version__,
        'compile_s': round(compile_s, 1), 'memory_gb': round(total / 2**30, 3),
        'temp_gb': round(memory.temp_size_in_bytes / 2**30, 3),
        **{k: v for k, v in census.items() if k != 'rows'}}))


if __name__ == '__main__':
    main()
