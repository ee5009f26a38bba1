"""Benchmark: one compiled `lax.scan` sampler vs a Python loop over a jitted step.

The usual design elsewhere jits a single reverse step and drives it from a
Python `for` loop, paying one dispatch (and a host-side index) per step. The
samplers of `ddpm_jax.samplers` are one `lax.scan`, compiled once per shape.
This script times both on the same tiny conv net (plain JAX, inline), the same
schedule and the same key, checks that they produce the same samples, and
prints steps/s, their ratio and the compile times.

    python bench/bench_sampler.py --steps=100,1000 --batch=16 --size=16

Runs in about a minute on a 2-core CPU with the defaults.
"""

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax import samplers
from ddpm_jax import schedules


def init_params(rng, channels, width, emb_dim=32):
    """Parameters of a 3-layer conv net with a timestep embedding."""
    keys = jax.random.split(rng, 4)

    def conv(key, cin, cout):
        scale = 1.0 / math.sqrt(9 * cin)
        return {'w': scale * jax.random.normal(key, (3, 3, cin, cout)),
                'b': jnp.zeros((cout,))}

    return {
        'conv1': conv(keys[0], channels, width),
        'conv2': conv(keys[1], width, width),
        'conv3': conv(keys[2], width, channels),
        'emb': {'w': jax.random.normal(keys[3], (emb_dim, width)) / math.sqrt(emb_dim),
                'b': jnp.zeros((width,))},
    }


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def apply_model(params, x, t):
    """eps prediction [B, H, W, C] of the tiny conv net."""

    def conv(p, h):
        out = jax.lax.conv_general_dilated(
            h, p['w'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        return out + p['b']

    emb = timestep_embedding(t, params['emb']['w'].shape[0])
    emb = emb @ params['emb']['w'] + params['emb']['b']  # [B, width]
    h = jax.nn.silu(conv(params['conv1'], x) + emb[:, None, None, :])
    h = jax.nn.silu(conv(params['conv2'], h))
    return conv(params['conv3'], h)


def make_scan_sampler(sched, shape, var_type):
    """The library sampler: everything inside one jitted lax.scan."""

    def sample(params, rng):
        return samplers.ddpm_sample(functools.partial(apply_model, params), sched, shape,
                                    rng, var_type=var_type)

    return jax.jit(sample)


def make_loop_step(var_type):
    """One jitted reverse step, the same maths and noise as `ddpm_sample`."""

    def step(params, sched, x, i, noise_rng):
        batch = x.shape[0]
        i_b = jnp.full((batch,), i, jnp.int32)
        t = jnp.broadcast_to(sched.timesteps[i], (batch,))
        terms = diffusion.p_mean_variance(sched, apply_model(params, x, t), x, i_b,
                                          var_type=var_type)
        noise = jax.random.normal(jax.random.fold_in(noise_rng, i), x.shape, x.dtype)
        return terms['mean'] + (i > 0) * jnp.exp(0.5 * terms['log_variance']) * noise

    return jax.jit(step)


@functools.partial(jax.jit, static_argnums=1)
def init_state(rng, shape):
    """x_T and the noise key, drawn exactly as `ddpm_sample` draws them."""
    init_rng, noise_rng = jax.random.split(rng)
    return jax.random.normal(init_rng, shape, jnp.float32), noise_rng


def loop_sample(step, params, sched, shape, rng):
    """The Python-loop design: one dispatch per step."""
    x, noise_rng = init_state(rng, shape)
    for i in reversed(range(sched.num_timesteps)):
        x = step(params, sched, x, np.int32(i), noise_rng)
    return x


def bench_one(num_steps, args, params, rng):
    respacing = '' if num_steps == args.train_steps else str(num_steps)
    sched = schedules.make_schedule('linear', args.train_steps, respacing)
    shape = (args.batch, args.size, args.size, args.channels)

    # Scan: compile once, then time the best of `repeats` runs.
    scan = make_scan_sampler(sched, shape, args.var_type)
    t0 = time.perf_counter()
    compiled = scan.lower(params, rng).compile()
    scan_compile = time.perf_counter() - t0
    scan_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        x_scan = jax.block_until_ready(compiled(params, rng))
        scan_times.append(time.perf_counter() - t0)

    # Python loop: compile the step (first call minus a warm call), then time runs.
    step = make_loop_step(args.var_type)
    x_dummy, noise_rng = jax.block_until_ready(init_state(rng, shape))  # Warm.
    t0 = time.perf_counter()
    step.lower(params, sched, x_dummy, np.int32(0), noise_rng).compile()
    loop_compile = time.perf_counter() - t0
    # `lower().compile()` does not fill jit's dispatch cache: one untimed call does.
    jax.block_until_ready(step(params, sched, x_dummy, np.int32(0), noise_rng))
    loop_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        x_loop = jax.block_until_ready(loop_sample(step, params, sched, shape, rng))
        loop_times.append(time.perf_counter() - t0)

    max_diff = float(jnp.max(jnp.abs(x_scan - x_loop)))
    return {
        'steps': num_steps,
        'scan_compile': scan_compile, 'loop_compile': loop_compile,
        'scan_sps': num_steps / min(scan_times), 'loop_sps': num_steps / min(loop_times),
        'max_diff': max_diff,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', default='100,1000',
                        help='Comma-separated sampling steps (respacings of T).')
    parser.add_argument('--train_steps', type=int, default=1000, help='Training T.')
    parser.add_argument('--batch', type=int, default=16, help='Images per batch.')
    parser.add_argument('--size', type=int, default=16, help='Image side, pixels.')
    parser.add_argument('--channels', type=int, default=3, help='Image channels.')
    parser.add_argument('--width', type=int, default=16, help='Conv net width.')
    parser.add_argument('--var_type', default='fixed_large', help='Variance type.')
    parser.add_argument('--repeats', type=int, default=3, help='Timed runs (best kept).')
    parser.add_argument('--seed', type=int, default=0, help='Root seed.')
    args = parser.parse_args()

    rng = jax.random.key(args.seed)
    params_rng, sample_rng = jax.random.split(rng)
    params = init_params(params_rng, args.channels, args.width)
    print(f'backend={jax.default_backend()} devices={jax.device_count()} '
          f'batch={args.batch} image={args.size}x{args.size}x{args.channels} '
          f'width={args.width} T={args.train_steps}')
    header = (f'{"steps":>6} | {"scan steps/s":>12} | {"loop steps/s":>12} | '
              f'{"ratio":>6} | {"scan compile s":>14} | {"loop compile s":>14} | '
              f'{"max |diff|":>10}')
    print(header)
    print('-' * len(header))
    for num_steps in [int(s) for s in args.steps.split(',')]:
        r = bench_one(num_steps, args, params, sample_rng)
        print(f'{r["steps"]:>6} | {r["scan_sps"]:>12.1f} | {r["loop_sps"]:>12.1f} | '
              f'{r["scan_sps"] / r["loop_sps"]:>6.2f} | {r["scan_compile"]:>14.2f} | '
              f'{r["loop_compile"]:>14.2f} | {r["max_diff"]:>10.2e}', flush=True)


if __name__ == '__main__':
    main()
