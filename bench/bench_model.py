"""Benchmarks a config's model: forward and training-step throughput, compile time, FLOP/s.

    python bench/bench_model.py --config=configs/cifar10.py --batch=8 \
        [--override model.base_channels=32 --override model.dtype=bfloat16] [--steps=10] \
        [--sample_steps=100]

Runs on whatever backend JAX finds (on one CPU device with the step memory reused
between calls, as main.py runs: `parallel.reuse_cpu_step_memory()`). The training step
is the gradient of a plain MSE against a random target plus an Adam update (a stand-in
for the diffusion loss with the same model cost). FLOPs come from XLA's cost analysis
of the lowered program (before optimisation: the compiled one counts what a GPU hands
to cuDNN as zero); on an accelerator (or with --peak_tflops) also as a fraction of the
device's peak.

With --sample_steps=N it also times the compiled ancestral sampler (`samplers.ddpm_sample`,
one `lax.scan` over N respaced steps) on the same batch and reports its time per step
against one forward pass: a ratio near 1 means the sampler adds no per-step overhead.
With --classifier_config it guides that sampler with a (randomly initialised)
noise-aware classifier of that config, as ADM-64's guided 250-step sampling does:

    python bench/bench_model.py --config=configs/imagenet64.py --batch=64 \
        --sample_steps=250 --classifier_config=configs/imagenet64_classifier.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_jax import models, parallel, samplers, tasks  # noqa: E402
import common  # noqa: E402
from common import load_config, peak_flops, program_flops  # noqa: E402

def compile_fn(fn, *args, donate_argnums=()):
    """Lowers and compiles `fn`; returns (compiled, seconds, flops per call)."""
    start = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate_argnums,
                      compiler_options=parallel.compiler_options()).lower(*args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    print(f'compiled {getattr(fn, "__name__", "fn")} in {seconds:.1f} s', flush=True)
    flops = program_flops(lowered)
    return compiled, seconds, float('nan') if flops is None else flops


def time_fn(step, steps: int) -> float:
    """Mean seconds per call of `step()` (which returns something to block on)."""
    jax.block_until_ready(step())  # Warm-up (allocations, autotuning).
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', required=True, help='Config file, e.g. configs/cifar10.py.')
    parser.add_argument('--batch', type=int, default=8, help='Images per step.')
    parser.add_argument('--steps', type=int, default=10, help='Timed steps per measurement.')
    parser.add_argument('--override', action='append', default=[],
                        help='Config override key=value, e.g. model.base_channels=32.')
    parser.add_argument('--peak_tflops', type=float, default=None,
                        help='Per-device peak to report utilisation against (default: '
                             'the table in bench/common.py for a known accelerator).')
    parser.add_argument('--sample_steps', type=int, default=0,
                        help='Also time the ancestral sampler over this many steps (0: skip).')
    parser.add_argument('--classifier_config', default=None,
                        help='Guide the timed sampler with a classifier of this config.')
    parser.add_argument('--classifier_override', action='append', default=[],
                        help='Override for the classifier config (repeatable).')
    parser.add_argument('--classifier_scale', type=float, default=1.0,
                        help='Classifier-guidance scale (with --classifier_config).')
    parser.add_argument('--no_train', action='store_true',
                        help='Skip the training step (saves its compile when timing the sampler).')
    common.add_fusion_flag(parser)
    args = parser.parse_args(argv)
    if args.xla_default_fusions:
        common.use_xla_default_fusions()

    parallel.reuse_cpu_step_memory()
    config = load_config(args.config, args.override)
    model = models.create_model(config)
    size, channels, batch = config.data.image_size, config.data.channels, args.batch
    device = jax.devices()[0]
    is_unet = config.model.name == 'unet'

    rng = jax.random.key(config.seed)
    init_rng, x_rng, t_rng, y_rng, target_rng, dropout_rng = jax.random.split(rng, 6)
    x = jax.random.normal(x_rng, (batch, size, size, channels), jnp.float32)
    t = jax.random.randint(t_rng, (batch,), 0, config.diffusion.num_timesteps)
    kwargs = {}
    if is_unet and config.model.num_classes > 0:
        kwargs['y'] = jax.random.randint(y_rng, (batch,), 0, config.model.num_classes)
    params = jax.jit(lambda r: model.init(r, x, t, **kwargs)['params'])(init_rng)
    num_params = sum(p.size for p in jax.tree.leaves(params))
    out_shape = jax.eval_shape(lambda p: model.apply({'params': p}, x, t, **kwargs), params)
    target = jax.random.normal(target_rng, out_shape.shape, jnp.float32)

    def forward(p, x, t, kwargs):
        return model.apply({'params': p}, x, t, **kwargs)

    tx = optax.adam(config.optim.learning_rate)
    opt_state = tx.init(params)

    def train_step(p, opt_state, x, t, kwargs, dropout_rng):
        def loss_fn(p):
            out = model.apply({'params': p}, x, t, train=True, rngs={'dropout': dropout_rng},
                              **kwargs)
            return jnp.mean((out - target) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    # Everything compiles first, then everything is timed (bench/common.device_turn).
    fwd, fwd_compile_s, fwd_flops = compile_fn(forward, params, x, t, kwargs)
    if not args.no_train:
        train, train_compile_s, train_flops = compile_fn(
            train_step, params, opt_state, x, t, kwargs, dropout_rng, donate_argnums=(0, 1))
    sampler = None
    if args.sample_steps and is_unet:
        sched = tasks.config_schedule(config, str(args.sample_steps))

        classifier, classifier_params, labels = None, None, None
        if args.classifier_config:
            classifier = models.create_model(
                load_config(args.classifier_config, args.classifier_override))
            classifier_params = jax.jit(
                lambda r: classifier.init(r, x, t)['params'])(jax.random.fold_in(rng, 1))
            # Guided toward the model's own labels, or drawn ones for an unconditional model.
            labels = kwargs['y'] if 'y' in kwargs else jax.random.randint(
                y_rng, (batch,), 0, classifier.num_classes)

        def sample(p, classifier_params, labels, rng, kwargs):
            cond_fn = None
            if classifier is not None:
                grad_fn = samplers.make_classifier_grad_fn(
                    lambda x, t: classifier.apply({'params': classifier_params}, x, t))
                cond_fn = lambda x, t, **unused: grad_fn(x, t, y=labels)  # noqa: E731
            return samplers.ddpm_sample(
                models.make_model_fn(model, p), sched, (batch, size, size, channels), rng,
                mean_type=config.diffusion.mean_type, var_type=config.diffusion.var_type,
                model_kwargs=kwargs, cond_fn=cond_fn, classifier_scale=args.classifier_scale)

        sampler, sample_compile_s, _ = compile_fn(
            sample, params, classifier_params, labels, rng, kwargs)

    with common.device_turn():  # Alone on the device while timing.
        fwd_s = time_fn(lambda: fwd(params, x, t, kwargs), args.steps)
        state = {'params': params, 'opt_state': opt_state}
        rows = [('forward', fwd_compile_s, fwd_s, fwd_flops)]
        if not args.no_train:
            def one_train_step():
                state['params'], state['opt_state'], loss = train(
                    state['params'], state['opt_state'], x, t, kwargs, dropout_rng)
                return loss

            rows.append(('train', train_compile_s, time_fn(one_train_step, args.steps),
                         train_flops))
        if sampler is not None:  # The train step donated the first copy of the params.
            sample_args = (state['params'], classifier_params, labels, rng, kwargs)
            sample_s = time_fn(lambda: sampler(*sample_args), 1)

    peak = peak_flops(device, config.model.dtype, args.peak_tflops)
    print(f'config      {args.config}  overrides={args.override or "none"}')
    print(f'device      {device.platform} / {device.device_kind} x{jax.device_count()} '
          f'(measured on device 0)')
    print(f'model       {config.model.name}/{config.model.variant} dtype={config.model.dtype} '
          f'remat={config.model.remat} params={num_params:,} image={size}x{size}x{channels} '
          f'batch={batch}')
    for label, compile_s, step_s, flops in rows:
        line = (f'{label:<11} compile {compile_s:7.2f} s | {step_s * 1e3:9.2f} ms/step | '
                f'{batch / step_s:10.1f} img/s | {flops / batch / 1e9:8.2f} GFLOP/img | '
                f'{flops / step_s / 1e12:8.3f} TFLOP/s')
        if peak is not None and np.isfinite(flops):
            line += f' | {100 * flops / step_s / peak:5.1f}% of {peak / 1e12:.4g} TFLOP/s peak'
        print(line)
    if sampler is not None:
        per_step = sample_s / args.sample_steps
        guided = f', guided by {args.classifier_config}' if classifier is not None else ''
        print(f'sampler     compile {sample_compile_s:7.2f} s | {per_step * 1e3:9.2f} ms/step | '
              f'{batch / sample_s:10.3f} img/s over {args.sample_steps} steps{guided} | '
              f'step / forward = {per_step / fwd_s:.3f}')

if __name__ == '__main__':
    main()
