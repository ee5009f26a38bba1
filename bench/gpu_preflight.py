"""Preflight for bench/gpu_figures.sh: versions, cuDNN flash attention, a bf16 UNet.

    python bench/gpu_preflight.py [--small]    # --small: tiny attention shapes (a CPU)

Prints the library versions and devices; checks `jax.nn.dot_product_attention`'s
cuDNN kernel against XLA's on the attention shapes of ADM-64 (head dim 64, 1,024
tokens) and DDPM CIFAR-10 (one 256-channel head, 256 tokens) in bfloat16, forward and
gradient (relative error against a float32 XLA reference), and times both (a line
'cudnn attention: ok' or 'cudnn attention: FAILED ...'); then runs a bf16 forward pass
of the digits UNet through `ddpm_jax` (exit status 1 if that fails).
"""

import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _versions() -> None:
    names = ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'chex', 'numpy',
             'ml_collections', 'grain', 'tensorflow_datasets')
    found = []
    for name in names:
        try:
            found.append(f'{name} {importlib.import_module(name).__version__}')
        except Exception as e:  # noqa: BLE001 - report, do not stop.
            found.append(f'{name} ({type(e).__name__})')
    print(', '.join(found))
    try:
        from jax._src.lib import cuda_versions
        print('cudnn', cuda_versions.cudnn_get_version() if cuda_versions else None)
    except Exception as e:  # noqa: BLE001
        print('cudnn version unknown:', type(e).__name__)
    print('devices', jax.devices())


def _median_ms(fn, *args, reps: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _check_attention(batch: int, tokens: int, heads: int, dim: int) -> str:
    """Forward and q-gradient of cuDNN's kernel and XLA's, both against float32 XLA."""
    keys = jax.random.split(jax.random.key(tokens + dim), 4)
    q, k, v, g = (jax.random.normal(r, (batch, tokens, heads, dim), jnp.float32)
                  for r in keys)

    def run(implementation, dtype):
        def loss(q, k, v, g):
            out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype),
                                               v.astype(dtype), implementation=implementation)
            return jnp.sum(out.astype(jnp.float32) * g), out
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (_, ref_out), ref_grad = run('xla', jnp.float32)(q, k, v, g)
    rel = lambda a, b: float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
    line = f'[{batch},{tokens},{heads},{dim}]'
    for implementation in ('xla', 'cudnn'):
        fn = run(implementation, jnp.bfloat16)
        (_, out), grad = fn(q, k, v, g)
        line += (f' | {implementation}: out {rel(out, ref_out):.1e} grad '
                 f'{rel(grad, ref_grad):.1e} {_median_ms(fn, q, k, v, g):.3f} ms fwd+bwd')
    return line


def main() -> int:
    _versions()
    try:
        shapes = ((64, 1024, 4, 64), (128, 256, 1, 256))
        if '--small' in sys.argv[1:]:
            shapes = ((2, 64, 4, 64), (2, 16, 1, 256))
        for shape in shapes:
            print('attention', _check_attention(*shape))
        print('cudnn attention: ok')
    except Exception as e:  # noqa: BLE001 - the figures then use XLA's attention.
        print(f'cudnn attention: FAILED {type(e).__name__}: {str(e)[:300]}')
    from configs import digits
    from ddpm_jax import models
    config = digits.get_config()
    config.model.dtype = 'bfloat16'
    model = models.create_model(config)
    x, t, kwargs = models.example_inputs(model, config.data.image_size,
                                         config.data.channels, 4)
    params = jax.jit(lambda r: model.init(r, x, t, **kwargs))(jax.random.key(0))
    out = jax.jit(lambda p: model.apply(p, x, t, **kwargs))(params)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))), 'non-finite UNet output'
    print('bf16 digits UNet forward: ok', out.shape, out.dtype)
    return 0


if __name__ == '__main__':
    sys.exit(main())
