"""Evaluation (`--mode=eval`): the variational bound in bits/dim on the test split.

This module owns the likelihood evaluation of a trained denoiser: restore the
EMA parameters, run `likelihood.calc_bpd_loop` (the full bound
L_T + sum_t L_{t-1} + L_0 over all T training steps, Ho et al. 2020, Eq. 5) on
the first `eval.num_images` images of `data.eval_split`, average, log and write
`<workdir>/eval_<step>.json`. With `eval.likelihood='ode'` it computes instead the
exact bits/dim of the probability-flow ODE (Song et al. 2021b, Sec. 4.3;
`ode_likelihood.ode_bpd`), of a score model (task='score') or of a discrete-time model
through its VP view.

An upsampler (task='super_resolution') is scored on the conditional likelihood of
each high-resolution image given its own low-resolution version, made exactly as in
training (`super_resolution.conditioning`: the area mean, not quantised): both the
bound and the ODE take that conditioning as a model input.

The per-batch computation is jitted once with the batch sharded `P('data')` and
the parameters replicated, and reduces to masked sums inside the program, so
padding rows of the last batch (`mask` False, see `data.create_eval_iterator`)
never count and only scalars leave the devices. Each image draws its noise from
`fold_in(rng_for(config, 'eval'), image_index)`, so its bound does not depend on
the batch size, device count or process count.
"""

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import checkpointing
from ddpm_jax import config_lib
from ddpm_jax import data as data_lib
from ddpm_jax import diffusion
from ddpm_jax import likelihood
from ddpm_jax import ode_likelihood
from ddpm_jax import parallel
from ddpm_jax import sde as sde_lib
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.models import create_model, make_model_fn
from ddpm_jax.tasks import base as task_base
from ddpm_jax.tasks import score as score_task
from ddpm_jax.tasks import super_resolution

logger = logging.getLogger('ddpm_jax')

__all__ = ['make_eval_step_fn', 'model_kwargs', 'summarize', 'evaluate']

def make_eval_step_fn(config: ml_collections.ConfigDict, model: nn.Module,
                      mesh: jax.sharding.Mesh) -> Callable:
    """Builds the jitted, sharded `eval_step(params, batch, batch_index) -> sums`.

    Args:
        config: The run's config (reads `diffusion`, `model`, `seed`,
            `eval.global_batch_size`).
        model: The UNet.
        mesh: The `('data',)` mesh.

    Returns:
        `eval_step(params, batch, batch_index)` where batch is the global
        {'image', 'label', 'mask'} dict sharded `P('data')` and batch_index an
        int32 scalar (global batch j holds images j*B .. j*B + B - 1). It returns
        replicated masked sums over the batch: 'count', 'total_bpd', 'prior_bpd'
        (scalars) and 'vb', 'mse' ([N], per step i); with eval.likelihood='ode',
        'count', 'total_bpd' and 'nfe' (the ODE solver's evaluations).
    """
    d = config.diffusion
    sched = task_base.config_schedule(config)
    conditional = config.model.num_classes > 0
    batch_size = config.eval.global_batch_size
    eval_rng = config_lib.rng_for(config, 'eval')
    replicated = parallel.replicated_sharding(mesh)
    batch_sharded = parallel.batch_sharding(mesh)

    def vb_per_example(params, image, label, rng):
        # One image as a batch of one: its noise then depends on its own key only.
        model_fn = make_model_fn(model, params, pass_labels=conditional)
        out = likelihood.calc_bpd_loop(
            model_fn, sched, image[None], rng, mean_type=d.mean_type, var_type=d.var_type,
            clip_denoised=True, model_kwargs=model_kwargs(config, image, label))
        return {k: out[k][0] for k in ('total_bpd', 'prior_bpd', 'vb', 'mse')}

    per_example = (_make_ode_per_example_fn(config, model) if config.eval.likelihood == 'ode'
                   else vb_per_example)

    def eval_step(params, batch, batch_index):
        index = batch_index * batch_size + jnp.arange(batch['image'].shape[0])
        rngs = jax.vmap(lambda i: jax.random.fold_in(eval_rng, i))(index)
        out = jax.vmap(per_example, in_axes=(None, 0, 0, 0))(
            params, batch['image'], batch['label'], rngs)
        mask = batch['mask'].astype(jnp.float32)
        # Padding rows may hold anything; `where` keeps a NaN there from leaking in.
        sums = {k: jnp.sum(jnp.where(mask.reshape((-1,) + (1,) * (v.ndim - 1)) > 0, v, 0.0),
                           axis=0) for k, v in out.items()}
        sums['count'] = jnp.sum(mask)
        return sums

    return jax.jit(eval_step, in_shardings=(replicated, batch_sharded, replicated),
                   out_shardings=replicated, compiler_options=parallel.compiler_options())


def _make_ode_per_example_fn(config: ml_collections.ConfigDict, model: nn.Module
                             ) -> Callable:
    """`per_example(params, image, label, rng) -> {'total_bpd', 'nfe'}` of the
    probability-flow ODE likelihood (`ode_likelihood.ode_bpd`: uniform dequantisation,
    `eval.ode_*`), on the trained SDE of a score model (task='score') or on the VP view
    of a discrete-time model's full training schedule (`sde.make_vp_score_fn`, no
    clipping: the drift must be smooth for the adaptive solver).

    Each image is solved alone (under `vmap`), so its step sizes, and so its bits/dim,
    do not depend on the other images of its batch.
    """
    e, d = config.eval, config.diffusion
    conditional = config.model.num_classes > 0
    if config.task == score_task.ScoreTask.name:
        sde = score_task.create_sde(config)
    else:
        sched = task_base.config_schedule(config)
        sde = sde_lib.vp_view(sched)

    def per_example(params, image, label, rng):
        model_fn = make_model_fn(model, params, pass_labels=conditional)
        kwargs = model_kwargs(config, image, label)
        if config.task == score_task.ScoreTask.name:
            score_fn = score_task.make_score_fn(config, sde, model_fn, kwargs)
        else:
            _, score_fn = sde_lib.make_vp_score_fn(model_fn, sched, mean_type=d.mean_type,
                                                   var_type=d.var_type, clip_denoised=False,
                                                   model_kwargs=kwargs)
        bpd, nfe = ode_likelihood.ode_bpd(sde, score_fn, image[None], rng, eps=e.ode_eps,
                                          trace=e.ode_trace, solver=e.ode_solver,
                                          rtol=e.ode_rtol, atol=e.ode_atol)
        return {'total_bpd': bpd[0], 'nfe': nfe.astype(jnp.float32)}

    return per_example


def model_kwargs(config: ml_collections.ConfigDict, image: jax.Array, label: jax.Array
                 ) -> dict[str, jax.Array] | None:
    """The model's inputs besides (x_t, t) when scoring one image as a batch of one.

    Args:
        config: The run's config.
        image: [H, W, C] in [-1, 1].
        label: int32 [] (its class).

    Returns:
        {'y': [1]} for a class-conditional model, plus an upsampler's conditioning on
        the image's own low-resolution version ('low_res' [1, s, s, C], made as in
        training); None when there are none.
    """
    kwargs = {'y': label[None]} if config.model.num_classes > 0 else {}
    if config.task == super_resolution.SuperResolutionTask.name:
        kwargs.update(super_resolution.conditioning(config, image[None]))
    return kwargs or None


def summarize(sums: dict[str, np.ndarray], step: int) -> dict[str, Any]:
    """Turns accumulated sums into the reported averages.

    Args:
        sums: 'count', 'total_bpd', 'prior_bpd' and per-step 'vb', 'mse' sums (float64).
        step: The checkpoint's step.

    Returns:
        With eval.likelihood='ode' (no 'vb' in sums): {'step', 'num_images',
        'likelihood': 'ode', 'total_bpd', 'nfe' (mean solver NFE per image)}; else
        {'step', 'num_images', 'total_bpd', 'prior_bpd', 'vb_q0'..'vb_q3',
        'mse_q0'..'mse_q3', 'vb_per_step'}: bits/dim averaged over images;
        'vb_q<q>' is the sum over the steps i with floor(4 i / N) == q of the mean
        term L_{i-1} (L_0 for i = 0), so total_bpd = prior_bpd + sum_q vb_q;
        'mse_q<q>' is the mean eps MSE over those steps (Nichol & Dhariwal 2021
        report terms per quarter of the diffusion).
    """
    count = float(sums['count'])
    if count <= 0:
        raise ValueError('No evaluation images (eval.num_images and the eval split).')
    if 'vb' not in sums:  # eval.likelihood='ode': the ODE bits/dim and the solver's NFE.
        return {'step': int(step), 'num_images': int(round(count)), 'likelihood': 'ode',
                'total_bpd': float(sums['total_bpd']) / count,
                'nfe': float(sums['nfe']) / count}
    vb = np.asarray(sums['vb'], np.float64) / count
    mse = np.asarray(sums['mse'], np.float64) / count
    num_steps = vb.shape[0]
    quarter = np.asarray(diffusion.timestep_quarter(np.arange(num_steps), num_steps))
    result = {
        'step': int(step),
        'num_images': int(round(count)),
        'total_bpd': float(sums['total_bpd']) / count,
        'prior_bpd': float(sums['prior_bpd']) / count,
    }
    for q in range(diffusion.NUM_QUARTERS):
        in_q = quarter == q
        result[f'vb_q{q}'] = float(vb[in_q].sum())
        result[f'mse_q{q}'] = float(mse[in_q].mean()) if in_q.any() else 0.0
    result['vb_per_step'] = [float(v) for v in vb]
    return result


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """`--mode=eval`: the bits/dim bound of the latest checkpoint's EMA parameters.

    Args:
        config: The run's config.
        workdir: Run directory holding `checkpoints/`; the result goes to
            `<workdir>/eval_<step>.json` (or `eval_<step>_1.json`, ... when taken;
            process 0), and the run is recorded in `<workdir>/runs.jsonl`.
        mesh: Default: all devices.

    Returns:
        The dict of `summarize`.

    Raises:
        ValueError: A bad config (`config_lib.validate(mode='eval')`: also a task
            without bits/dim) or an unknown `data.eval_split`, before anything is
            restored.
        FileNotFoundError: No checkpoint in `workdir`.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    config_lib.validate(config, mode='eval', num_devices=parallel.num_mesh_devices(mesh))
    workdir_lib.require_existing(workdir)
    data_lib.check_split(config, config.data.eval_split, 'data.eval_split')
    checkpoints = checkpointing.checkpoint_dir(workdir)
    if not checkpoints.exists():  # Before the restore builds the model's state.
        raise FileNotFoundError(f'No checkpoint in {checkpoints}.')
    batch_size = config.eval.global_batch_size
    model = create_model(config)
    step, _, ema_params = checkpointing.restore_for_inference(config, workdir, mesh)
    ema_params = ema_params['model']
    eval_step = make_eval_step_fn(config, model, mesh)
    eval_iter = data_lib.create_eval_iterator(config)
    num_batches = -(-config.eval.num_images // batch_size)  # An upper bound (split size).
    is_main = jax.process_index() == 0
    show_bar = is_main and sys.stdout.isatty()
    bar = None
    if show_bar:
        import tqdm
        bar = tqdm.tqdm(total=num_batches, desc='eval', unit='batch')
    logger.info('Evaluating step %d on up to %d images of %r, batches of %d.', step,
                config.eval.num_images, config.data.eval_split, batch_size)
    totals: dict[str, np.ndarray] = {}
    for j, local_batch in enumerate(eval_iter):
        batch = parallel.to_global(local_batch, mesh)
        sums = parallel.to_host(eval_step(ema_params, batch, jnp.int32(j)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
        if bar is not None:
            bar.update(1)
        elif is_main:
            logger.info('Eval batch %d: %d images, running bits/dim %.4f.', j + 1,
                        int(totals['count']), float(totals['total_bpd'] / totals['count']))
    if bar is not None:
        bar.close()
    result = summarize(totals, step)
    if 'nfe' in result:
        logger.info('Step %d: %.4f bits/dim (probability-flow ODE, %.1f NFE per image) on '
                    '%d images.', step, result['total_bpd'], result['nfe'],
                    result['num_images'])
    else:
        logger.info('Step %d: %.4f bits/dim (prior %.4f; quarters %s) on %d images.', step,
                    result['total_bpd'], result['prior_bpd'],
                    ', '.join(f'{result[f"vb_q{q}"]:.4f}'
                              for q in range(diffusion.NUM_QUARTERS)),
                    result['num_images'])
    if is_main:
        stem = workdir_lib.unique_stem(epath.Path(workdir), f'eval_{step}', ('.json',))
        path = f'{stem}.json'
        epath.Path(path).write_text(json.dumps(result, indent=2))
        logger.info('Wrote %s.', path)
        workdir_lib.append_run_record(workdir, 'eval', config, {'json': path})
    return result
