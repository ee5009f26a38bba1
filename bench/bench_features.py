"""Feature extraction throughput of the sample-quality networks (FID Inception, digits).

    python bench/bench_features.py --network=inception --batch=8 --image_size=32
    python bench/bench_features.py --network=digits --batch=1000

Random weights (the throughput does not depend on them): images/s of the jitted,
mesh-sharded extractor that `--mode=fid` uses, and the time to score 50,000 images
extrapolated from it. Prints one JSON line.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from ddpm_jax import parallel  # noqa: E402
from ddpm_jax.models import digits_net, inception  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--network', choices=('inception', 'digits'), default='inception')
    parser.add_argument('--batch', type=int, default=8, help='Global batch size.')
    parser.add_argument('--image_size', type=int, default=32, help='Input side (inception).')
    parser.add_argument('--steps', type=int, default=3, help='Timed batches.')
    common.add_fusion_flag(parser)
    args = parser.parse_args()
    if args.xla_default_fusions:
        common.use_xla_default_fusions()

    parallel.reuse_cpu_step_memory()  # As main.py.

    mesh = parallel.create_mesh()
    if args.network == 'inception':
        model = inception.InceptionV3()
        shapes = inception.variable_shapes()
        rng = np.random.default_rng(0)
        variables = jax.tree.map(
            lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
        variables['batch_stats'] = jax.tree.map(np.abs, variables['batch_stats'])
        shape = (args.batch, args.image_size, args.image_size, 3)
    else:
        model = digits_net.DigitsNet()
        variables = digits_net.load_or_train()
        shape = (args.batch, 8, 8, 1)
    replicated = parallel.replicated_sharding(mesh)
    apply = jax.jit(model.apply, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                    out_shardings=parallel.batch_sharding(mesh),
                    compiler_options=parallel.compiler_options())
    variables = jax.device_put(variables, replicated)
    images = parallel.shard_host_array(
        np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8), mesh)
    start = time.perf_counter()
    jax.block_until_ready(apply(variables, images))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        out = apply(variables, images)
    jax.block_until_ready(out)
    images_per_s = args.batch * args.steps / (time.perf_counter() - start)
    device = jax.devices()[0]
    print(json.dumps({
        'network': args.network, 'batch': args.batch, 'input': list(shape[1:]),
        'device': f'{parallel.num_mesh_devices(mesh)} x {device.device_kind}',
        'jax': jax.__version__, 'compile_s': round(compile_s, 1),
        'images_per_s': round(images_per_s, 1),
        'minutes_for_50k': round(50_000 / images_per_s / 60, 1)}))


if __name__ == '__main__':
    main()
