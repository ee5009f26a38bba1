"""The rules of the config: validation, JSON records, and the random-stream salts.

This module owns everything that is true of a config independently of what runs it:

* `validate(config, mode=...)` checks every field that the given mode will read
  (training also checks what its sample grids and periodic evaluations will use),
  before anything is built or compiled. Every rule is written once, here; each
  error is a `ValueError` whose message names the field.
* `to_json_dict` / `from_json_dict` convert a config to and from the JSON stored
  in checkpoints and workdir records; `upgrade_json_dict` reads configs written by
  earlier versions of the schema (all three live in `config_json`, re-exported here).
* `RNG_SALTS` is the one table of the numbers folded into the root key
  `jax.random.key(config.seed)` to give each consumer an independent stream;
  `rng_for(config, name)` applies it. `DATA_SEED_SALTS` does the same for the
  NumPy seeds of the input pipeline.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from ddpm_jax import diffusion
from ddpm_jax import images
from ddpm_jax.config_json import from_json_dict, to_json_dict, upgrade_json_dict  # noqa: F401
from ddpm_jax import losses
from ddpm_jax import ode_likelihood
from ddpm_jax import sampler_registry
from ddpm_jax import schedules
from ddpm_jax import sde_samplers
from ddpm_jax import state
from ddpm_jax import tasks
from ddpm_jax import timestep_sampling
from ddpm_jax import models
from ddpm_jax.models import inception
from ddpm_jax.models import layers
from ddpm_jax.models import unet

MODES = ('train', 'sample', 'eval', 'fid')
# The tasks --mode=eval scores (bits/dim: the bound, or the ODE likelihood): their
# 'model' part is a likelihood model of the data's images (a denoiser, a score model,
# an upsampler given the low-resolution image). A DDGAN's generator has no tractable
# likelihood, a latent diffusion model's is of autoencoder latents.
EVAL_TASKS = ('diffusion', 'score', 'super_resolution')
METRICS_NETWORKS = ('inception', 'digits')
PRECISION_RECALL_DISTANCES = ('auto', 'float16', 'float32')
# Each network's feature dimension D: FID's D x D covariances need more than D samples
# (`metrics.check_enough_samples`); Inception's sFID features are 17 * 17 * 7 = 2023-d.
# digits_net.FEATURE_DIM is written out: digits_net imports data, which imports this module.
METRICS_FEATURE_DIMS = {'inception': inception.POOL3_DIM, 'digits': 64}
MODEL_DTYPES = ('float32', 'bfloat16')
OPTIMIZERS = ('adam', 'adamw')
LR_SCHEDULES = ('constant', 'cosine', 'linear')
EVAL_LIKELIHOODS = ('vb', 'ode')  # --mode=eval: variational bound or probability-flow ODE.
DATA_RESIZE_METHODS = ('bicubic', 'adm')  # data.resize (see `data`'s preprocessing).

# Folded into jax.random.key(config.seed): one independent stream per consumer.
RNG_SALTS: Mapping[str, int] = {
    'init': 0,  # Parameter initialisation.
    'train': 1,  # Train steps (each folds in its step number too).
    'grid': 2,  # The trainer's sample grids (the same noise at every grid).
    'sample': 3,  # --mode=sample (each batch folds in its index).
    'eval': 4,  # --mode=eval noise (each image folds in its index).
    'fid': 5,  # Samples scored by --mode=fid and the trainer's periodic FID.
    'upsample': 6,  # --mode=sample of an upsampler (task='super_resolution'), per batch;
    #                 a cascade's base model draws from its own 'sample' stream.
}
# Mixed into the NumPy seeds of the input pipeline (`data`).
DATA_SEED_SALTS: Mapping[str, int] = {'shuffle': 0, 'flip': 1, 'sample_labels': 3}


def rng_for(config: ml_collections.ConfigDict, name: str) -> jax.Array:
    """The root key of stream `name` (a key of `RNG_SALTS`) for `config.seed`."""
    return jax.random.fold_in(jax.random.key(config.seed), RNG_SALTS[name])


# --- JSON records: `config_json` (re-exported) ------------------------------------------


# --- validation --------------------------------------------------------------------------


def check(condition: bool, message: str) -> None:
    """Raises `ValueError(message)` unless `condition`."""
    if not condition:
        raise ValueError(message)


def check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
    """Raises a `ValueError` naming `field` and the valid choices."""
    check(value in choices, f'{field}={value!r} is not valid; choose one of {tuple(choices)}.')


def check_global_batch(field: str, batch: int, *, num_devices: int = 1,
                       num_processes: int = 1, accum_steps: int = 1) -> None:
    """The one rule for a global batch: positive, split evenly over accumulation
    steps, devices and processes.

    Raises:
        ValueError: Naming `field` and the count it does not divide by.
    """
    check(batch >= 1, f'{field}={batch} must be >= 1.')
    check(batch % accum_steps == 0,
          f'{field}={batch} is not divisible by train.grad_accum_steps={accum_steps}.')
    micro = batch // accum_steps
    check(micro % num_devices == 0,
          f'{field}={batch} must be divisible by the device count ({num_devices})'
          + (f' times train.grad_accum_steps={accum_steps}: each micro-batch of {micro} is '
             'split evenly over the devices.' if accum_steps > 1 else '.'))
    check(batch % num_processes == 0,
          f'{field}={batch} is not divisible by the process count ({num_processes}).')


def _validate_data(config: ml_collections.ConfigDict) -> None:
    d = config.data
    check(bool(d.dataset), 'data.dataset is empty.')
    check(d.image_size >= 1, f'data.image_size={d.image_size} must be >= 1.')
    check(d.channels in (1, 3), f'data.channels={d.channels} must be 1 or 3.')
    check(d.num_workers >= 0, f'data.num_workers={d.num_workers} must be >= 0.')
    check_choice('data.resize', d.resize, DATA_RESIZE_METHODS)
    if d.resize == 'adm':
        check(d.center_crop, "data.resize='adm' is guided-diffusion's center_crop_arr, "
                             'which crops the centre square: set data.center_crop=True.')
        check(d.dataset != 'digits', "data.resize='adm' resamples 8-bit images; the "
                                     "bundled digits are 0..16: use data.resize='bicubic'.")
    check(not d.random_crop or d.resize == 'adm',
          f"data.random_crop=True is guided-diffusion's random_crop_arr: it needs "
          f"data.resize='adm', got {d.resize!r}.")


def _validate_model(config: ml_collections.ConfigDict) -> None:
    m = config.model
    check_choice('model.name', m.name, tuple(models.MODELS))
    check_choice('model.dtype', m.dtype, MODEL_DTYPES)
    check_choice('model.remat_policy', m.remat_policy, unet.REMAT_POLICIES)
    check_choice('model.bias_init', m.bias_init, layers.BIAS_INITS)
    check(m.num_classes >= 0, f'model.num_classes={m.num_classes} must be >= 0.')
    check(m.timestep_scale > 0, f'model.timestep_scale={m.timestep_scale} must be > 0.')
    check(0.0 <= m.class_dropout_prob < 1.0,
          f'model.class_dropout_prob={m.class_dropout_prob} must be in [0, 1).')
    check(m.class_dropout_prob == 0 or m.num_classes > 0,
          'model.class_dropout_prob > 0 needs model.num_classes > 0.')
    check_choice('model.mapping_activation', m.mapping_activation,
                 tuple(unet.MAPPING_ACTIVATIONS))
    check(not m.output_tanh or m.latent_dim > 0,
          'model.output_tanh is for a DDGAN generator (model.latent_dim > 0).')
    models.create_model(config)  # Architecture rules (sizes, heads, groups).


def _validate_diffusion(config: ml_collections.ConfigDict) -> None:
    d = config.diffusion
    check_choice('diffusion.schedule', d.schedule, schedules.BETA_SCHEDULES)
    check_choice('diffusion.mean_type', d.mean_type, diffusion.MEAN_TYPES)
    check_choice('diffusion.var_type', d.var_type, diffusion.VAR_TYPES)
    check_choice('diffusion.loss_type', d.loss_type, losses.LOSS_TYPES)
    check_choice('diffusion.timestep_sampling', d.timestep_sampling,
                 timestep_sampling.TIMESTEP_SAMPLING)
    check(d.num_timesteps >= 1, f'diffusion.num_timesteps={d.num_timesteps} must be >= 1.')
    try:
        schedules.check_beta_endpoints(d.schedule, d.beta_start, d.beta_end)
    except ValueError as e:
        raise ValueError(f'diffusion.{e}') from None


def _validate_optim(config: ml_collections.ConfigDict) -> None:
    o = config.optim
    check_choice('optim.optimizer', o.optimizer, OPTIMIZERS)
    check_choice('optim.lr_schedule', o.lr_schedule, LR_SCHEDULES)
    check(o.learning_rate > 0, f'optim.learning_rate={o.learning_rate} must be > 0.')
    check(o.warmup_steps >= 0, f'optim.warmup_steps={o.warmup_steps} must be >= 0.')
    check(0 <= o.min_learning_rate < o.learning_rate,
          f'optim.min_learning_rate={o.min_learning_rate} must be in [0, '
          f'optim.learning_rate={o.learning_rate}).')
    check(o.min_learning_rate == 0 or o.lr_schedule != 'constant',
          "optim.min_learning_rate is where 'cosine' or 'linear' decay ends; with "
          "lr_schedule='constant' it must be 0.")
    for field in ('b1', 'b2'):
        check(0 <= o[field] < 1, f'optim.{field}={o[field]} must be in [0, 1).')
    check(o.eps > 0, f'optim.eps={o.eps} must be > 0 (Adam divides by sqrt(v) + eps).')
    check(o.weight_decay >= 0, f'optim.weight_decay={o.weight_decay} must be >= 0.')
    check(o.grad_clip_norm >= 0, f'optim.grad_clip_norm={o.grad_clip_norm} must be >= 0.')
    check(isinstance(o.grad_clip_groups, int) and o.grad_clip_groups >= 1,
          f'optim.grad_clip_groups={o.grad_clip_groups!r} must be an int >= 1.')
    check(o.grad_clip_groups == 1 or o.grad_clip_norm > 0,
          f'optim.grad_clip_groups={o.grad_clip_groups} clips each group\'s gradient: it '
          'needs optim.grad_clip_norm > 0.')
    check(len(o.ema_decays) >= 1, 'optim.ema_decays must list at least one decay rate.')
    for decay in o.ema_decays:
        check(0.0 <= decay < 1.0,
              f'optim.ema_decays={tuple(o.ema_decays)}: each must be in [0, 1).')


def _validate_train(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int) -> None:
    train_opts = config.train
    check(train_opts.num_train_steps >= 0,
          f'train.num_train_steps={train_opts.num_train_steps} must be >= 0.')
    check(train_opts.grad_accum_steps >= 1,
          f'train.grad_accum_steps={train_opts.grad_accum_steps} must be >= 1.')
    for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
        check(train_opts[field] >= 1, f'train.{field}={train_opts[field]} must be >= 1.')
    for field in ('keep_checkpoint_every_steps', 'sample_every_steps', 'num_grid_samples'):
        check(train_opts[field] >= 0, f'train.{field}={train_opts[field]} must be >= 0.')
    check_global_batch('train.global_batch_size', train_opts.global_batch_size,
                       num_devices=num_devices, num_processes=num_processes,
                       accum_steps=train_opts.grad_accum_steps)
    groups, accum = config.optim.grad_clip_groups, train_opts.grad_accum_steps
    check(groups == 1 or (groups % accum == 0 and train_opts.global_batch_size % groups == 0),
          f'optim.grad_clip_groups={groups} must be a multiple of train.grad_accum_steps='
          f'{accum} and divide train.global_batch_size={train_opts.global_batch_size} '
          '(each micro-batch holds whole groups).')


def _validate_sample(config: ml_collections.ConfigDict, *, for_grid: bool,
                     num_devices: int, num_processes: int) -> None:
    """The `sample` group; `for_grid`: only what the trainer's grids read."""
    s, m = config.sample, config.model
    check_choice('sample.sampler', s.sampler, tuple(sampler_registry.SAMPLERS))
    _validate_sampler_options(config)
    try:
        tasks.config_schedule(config, s.respacing)
    except ValueError as e:
        raise ValueError(f'sample.respacing={s.respacing!r}: {e}') from None
    check(s.eta >= 0, f'sample.eta={s.eta} must be >= 0.')
    check(s.guidance_scale >= 0, f'sample.guidance_scale={s.guidance_scale} must be >= 0.')
    check(s.guidance_scale == 1.0 or (m.num_classes > 0 and m.class_dropout_prob > 0),
          f'sample.guidance_scale={s.guidance_scale} (classifier-free guidance) needs a '
          'model trained with label dropout, i.e. model.num_classes > 0 and '
          f'model.class_dropout_prob > 0 (got num_classes={m.num_classes}, '
          f'class_dropout_prob={m.class_dropout_prob}); set sample.guidance_scale=1.')
    state.ema_index(config)  # sample.ema_decay must name one of optim.ema_decays.
    check_choice('sample.quantize', s.quantize, images.QUANTIZE_MODES)
    if for_grid:
        return
    _validate_classifier_guidance(config)
    check(s.num_images >= 1, f'sample.num_images={s.num_images} must be >= 1.')
    check_global_batch('sample.global_batch_size', s.global_batch_size,
                       num_devices=num_devices, num_processes=1)
    num_classes = m.num_classes
    if num_classes > 0:
        check(s.label == -1 or 0 <= s.label < num_classes,
              f'sample.label={s.label} must be -1 or in [0, {num_classes}).')
    elif s.classifier_scale == 0:
        check(s.label == -1, f'sample.label={s.label} needs a class-conditional model or '
                             'classifier guidance; use -1.')


def _validate_classifier_guidance(config: ml_collections.ConfigDict) -> None:
    """`sample.classifier_scale` and the classifier it needs (sample and fid modes)."""
    s = config.sample
    check(s.classifier_scale >= 0, f'sample.classifier_scale={s.classifier_scale} must be '
                                   '>= 0.')
    check(s.classifier_scale == 0 or bool(s.classifier_workdir),
          f'sample.classifier_scale={s.classifier_scale} > 0 needs sample.classifier_workdir '
          "(the workdir of a trained classifier, task='classifier'); it is empty.")


def _validate_sampler_options(config: ml_collections.ConfigDict) -> None:
    """The `sample` fields of the score-based and fast samplers (sampler_registry)."""
    s = config.sample
    check(isinstance(s.num_steps, int) and s.num_steps >= 1,
          f'sample.num_steps={s.num_steps!r} must be an int >= 1.')
    check(s.s_churn >= 0, f'sample.s_churn={s.s_churn} must be >= 0.')
    check_choice('sample.ode_solver', s.ode_solver, sde_samplers.ODE_SOLVERS)
    check(s.ode_rtol > 0, f'sample.ode_rtol={s.ode_rtol} must be > 0.')
    check(s.ode_atol > 0, f'sample.ode_atol={s.ode_atol} must be > 0.')
    check_choice('sample.predictor', s.predictor, sampler_registry.PREDICTORS)
    check_choice('sample.corrector', s.corrector, sampler_registry.CORRECTORS)
    check(s.pc_snr > 0, f'sample.pc_snr={s.pc_snr} must be > 0.')
    check(s.heun_sigma_max >= 0, f'sample.heun_sigma_max={s.heun_sigma_max} must be >= 0 '
                                 '(0 = no cap).')
    _validate_langevin(config)
    if config.task != 'score':
        check(s.sampler not in sampler_registry.FULL_SCHEDULE_SAMPLERS or not s.respacing,
              f'sample.respacing={s.respacing!r} must be empty for sample.sampler='
              f"{s.sampler!r}: it chooses its own times on the full training schedule "
              '(the VP view; set sample.num_steps for heun).')


def _validate_langevin(config: ml_collections.ConfigDict) -> None:
    """The 'langevin' fields; the levels against a discrete model's schedule (a score
    model's SDE range is checked by its task)."""
    s = config.sample
    check(s.langevin_step_size > 0,
          f'sample.langevin_step_size={s.langevin_step_size} must be > 0.')
    check_choice('sample.langevin_init', s.langevin_init, sde_samplers.LANGEVIN_INITS)
    check(isinstance(s.langevin_steps_per_level, int) and s.langevin_steps_per_level >= 1,
          f'sample.langevin_steps_per_level={s.langevin_steps_per_level!r} must be an int '
          '>= 1.')
    n = s.langevin_num_levels
    check(isinstance(n, int) and (n >= 2 or (n == 0 and config.task == 'score')),
          f'sample.langevin_num_levels={n!r} must be an int >= 2'
          + (" (or 0: sde.num_scales)." if config.task == 'score' else
             " (0, the SDE's sde.num_scales, is for task='score')."))
    for field in ('langevin_sigma_max', 'langevin_sigma_min'):
        check(s[field] >= 0, f'sample.{field}={s[field]} must be >= 0 (0 = the model\'s).')
    check(s.langevin_sigma_max == 0 or s.langevin_sigma_max > s.langevin_sigma_min,
          f'sample.langevin_sigma_max={s.langevin_sigma_max} must be > '
          f'sample.langevin_sigma_min={s.langevin_sigma_min}.')
    if s.sampler != 'langevin' or config.task == 'score':
        return
    sched = tasks.config_schedule(config, s.respacing)
    ladder = [float(v) for v in sde_samplers.vp_sigmas(sched)]
    for field in ('langevin_sigma_max', 'langevin_sigma_min'):
        value = s[field]
        check(value == 0 or ladder[0] * 0.999 <= value <= ladder[-1] * 1.001,
              f'sample.{field}={value} is outside the noise levels of the sampling schedule '
              f'(sigma in [{ladder[0]:.4g}, {ladder[-1]:.4g}]); 0 = that end.')


def _validate_eval(config: ml_collections.ConfigDict, num_devices: int,
                   num_processes: int) -> None:
    e = config.eval
    check(config.task in EVAL_TASKS,
          f'--mode=eval computes bits/dim of images, which task={config.task!r} does not '
          f'define (tasks {", ".join(EVAL_TASKS)} do); score its samples with --mode=fid.')
    check(e.num_images >= 1, f'eval.num_images={e.num_images} must be >= 1.')
    check_choice('eval.likelihood', e.likelihood, EVAL_LIKELIHOODS)
    check(e.likelihood == 'ode' or config.task != 'score',
          f"eval.likelihood={e.likelihood!r}: task='score' has no variational bound; "
          "use 'ode'.")
    check_choice('eval.ode_trace', e.ode_trace, ode_likelihood.TRACE_ESTIMATORS)
    check_choice('eval.ode_solver', e.ode_solver, sde_samplers.ODE_SOLVERS)
    check(e.ode_rtol > 0, f'eval.ode_rtol={e.ode_rtol} must be > 0.')
    check(e.ode_atol > 0, f'eval.ode_atol={e.ode_atol} must be > 0.')
    check(0 < e.ode_eps < 1, f'eval.ode_eps={e.ode_eps} must be in (0, 1).')
    check_global_batch('eval.global_batch_size', e.global_batch_size,
                       num_devices=num_devices, num_processes=num_processes)


def _validate_fid(config: ml_collections.ConfigDict, num_devices: int, *,
                  num_samples: int, field: str) -> None:
    """What scoring samples reads: the network (and its file), batch and counts."""
    e, d = config.eval, config.data
    check_choice('eval.metrics_network', e.metrics_network, METRICS_NETWORKS)
    check(num_samples >= 2, f'{field}={num_samples} must be >= 2.')
    check_global_batch('eval.fid_batch_size', e.fid_batch_size, num_devices=num_devices)
    check(e.fid_reference_num_images >= 2,
          f'eval.fid_reference_num_images={e.fid_reference_num_images} must be >= 2.')
    check(e.is_split_size >= 0, f'eval.is_split_size={e.is_split_size} must be >= 0 '
                                '(0 = 10 equal splits).')
    check_choice('eval.precision_recall_distances', e.precision_recall_distances,
                 PRECISION_RECALL_DISTANCES)
    check(e.precision_recall_reference_images == 0 or e.precision_recall_reference_images > 3,
          f'eval.precision_recall_reference_images={e.precision_recall_reference_images} '
          'must be 0 (all) or > 3 (k = 3 neighbours).')
    check_choice('eval.inception_input', e.inception_input, inception.INPUT_PIPELINES)
    if e.metrics_network == 'inception':
        inception.resolve_inception_path(e.inception_path)  # A missing file stops here.
    dim = METRICS_FEATURE_DIMS[e.metrics_network]
    singular = (f'{e.metrics_network} features are {dim}-d, and the FID of fewer samples '
                'has a singular covariance (published numbers use 50,000)')
    check(num_samples > dim, f'{field}={num_samples} must be > {dim}: {singular}.')
    if not e.fid_reference:
        check(e.fid_reference_num_images > dim,
              f'eval.fid_reference_num_images={e.fid_reference_num_images} must be > {dim}: '
              f'{singular}.')
    if e.metrics_network != 'inception':
        check(d.image_size % 8 == 0 and d.channels == 1,
              "eval.metrics_network='digits' scores 8x8 grey images (larger ones are "
              'averaged down by an integer factor: data.image_size a multiple of 8, '
              f'data.channels=1), got {d.image_size}x{d.image_size}x{d.channels}.')


def validate(config: ml_collections.ConfigDict, *, mode: str = 'train',
             num_devices: int | None = None, num_processes: int | None = None) -> None:
    """Checks every field `mode` will read, before anything is built or compiled.

    Args:
        config: The run's config.
        mode: 'train' (also checks the fields its sample grids and periodic FID
            read), 'sample', 'eval' or 'fid'.
        num_devices: Devices in the mesh (default: all devices).
        num_processes: Processes feeding it (default: `jax.process_count()`).

    Raises:
        ValueError: Naming the offending field (and the valid choices for names).
    """
    check_choice('--mode', mode, MODES)
    num_devices = jax.device_count() if num_devices is None else num_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
    check_choice('task', config.task, tuple(tasks.TASKS))
    tasks.TASKS[config.task].validate_config(config)
    _validate_data(config)
    _validate_model(config)
    _validate_diffusion(config)
    generates = tasks.TASKS[config.task].sample_part is not None
    if mode == 'train':
        _validate_optim(config)
        _validate_train(config, num_devices, num_processes)
        train_opts = config.train
        check(train_opts.fid_every_steps >= 0,
              f'train.fid_every_steps={train_opts.fid_every_steps} must be >= 0.')
        check(generates or train_opts.fid_every_steps == 0,
              f'train.fid_every_steps={train_opts.fid_every_steps} needs a task that '
              f'generates images, not task={config.task!r}.')
        if generates and (train_opts.num_grid_samples > 0 or train_opts.fid_every_steps > 0):
            _validate_sample(config, for_grid=True, num_devices=num_devices,
                             num_processes=num_processes)
        if train_opts.fid_every_steps > 0:
            _validate_fid(config, num_devices, num_samples=train_opts.fid_num_samples,
                          field='train.fid_num_samples')
        return
    check(generates, f'--mode={mode} needs a model that generates images (task=diffusion '
                     f'or ddgan), got task={config.task!r}.')
    _validate_optim(config)  # The optimiser layout is part of the restored state.
    if mode == 'sample':
        _validate_sample(config, for_grid=False, num_devices=num_devices,
                         num_processes=num_processes)
    elif mode == 'eval':
        _validate_eval(config, num_devices, num_processes)
    else:
        if not config.eval.fid_samples:
            _validate_sample(config, for_grid=True, num_devices=num_devices,
                             num_processes=num_processes)
            if config.task != 'super_resolution':  # Upsamplers sample unguided.
                _validate_classifier_guidance(config)
        _validate_fid(config, num_devices, num_samples=config.eval.fid_num_samples,
                      field='eval.fid_num_samples')
