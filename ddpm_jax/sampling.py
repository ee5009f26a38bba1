"""Sampling from trained models: the compiled sharded sampler, grids and `--mode=sample`.

This module owns the glue between a Flax denoiser and the pure samplers of
`ddpm_jax.samplers`:

* `make_sample_fn` builds the (possibly respaced) schedule from the config,
  wraps `model.apply` as a model function, adds classifier-free guidance
  (Ho & Salimans 2022) and/or classifier guidance (Dhariwal & Nichol 2021,
  Alg. 1 and 2), and jits the whole reverse process ONCE with the batch sharded
  `P('data')` over the mesh and the parameters replicated, so sampling is spread
  over every device of every process.
* `write_sample_grid` is what the trainer calls for its periodic EMA grids; the
  compiled sampler is cached per (config, model, mesh), so repeated calls only
  run it.
* `sample_and_save` is `--mode=sample`: restore the EMA parameters, generate
  `sample.num_images` images in batches, write `samples/samples_<step>.npz`
  (uint8 images, int32 labels) and a PNG grid from process 0.

Randomness: images depend only on (config.seed, batch index, batch size) and not
on the number of devices or processes (JAX's partitionable threefry draws the
same numbers for any sharding).
"""

import collections
import json
import logging
import sys
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from ddpm_jax import checkpointing
from ddpm_jax import images as images_lib
from ddpm_jax import parallel
from ddpm_jax import samplers
from ddpm_jax import schedules
from ddpm_jax.models import create_model

logger = logging.getLogger('ddpm_jax')

__all__ = [
    'SAMPLERS',
    'create_sampling_schedule',
    'validate_sample_config',
    'make_model_fn',
    'make_classifier_cond_fn',
    'make_sample_fn',
    'cached_sample_fn',
    'gather_to_host',
    'write_sample_grid',
    'restore_classifier',
    'make_labels',
    'sample_and_save',
]

SAMPLERS = ('ddpm', 'ddim', 'dpm_solver')
# Salts folded into the root key so grids, --mode=sample and labels use independent
# streams (the trainer folds in 0 for init and 1 for the train steps).
GRID_SALT = 2
SAMPLE_SALT = 3
# The PNG written by --mode=sample shows at most this many of the samples.
MAX_GRID_IMAGES = 256
# Compiled samplers kept by `cached_sample_fn`.
_CACHE_SIZE = 8
_SAMPLE_FN_CACHE: 'collections.OrderedDict[Any, Callable]' = collections.OrderedDict()


# --- building blocks ---------------------------------------------------------------------


def create_sampling_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """The training schedule of `config.diffusion`, respaced by `config.sample.respacing`.

    Raises:
        ValueError: Unknown schedule name or bad respacing string.
    """
    d = config.diffusion
    return schedules.make_schedule(d.schedule, d.num_timesteps, config.sample.respacing or None)


def validate_sample_config(config: ml_collections.ConfigDict,
                           classifier: Optional[nn.Module] = None) -> None:
    """Checks the `sample` group against the model before anything is traced.

    Args:
        config: The run's config.
        classifier: The guidance classifier, if any.

    Raises:
        ValueError: Naming the offending field: an unknown sampler, eta < 0, a
            negative scale, `sample.guidance_scale != 1` for a model trained
            without label dropout (no null label), or `sample.classifier_scale > 0`
            without a classifier (or with a classifier whose classes do not match).
    """
    s, m = config.sample, config.model
    if m.name != 'unet':
        raise ValueError(f"Sampling needs a denoiser (model.name='unet'), got "
                         f'model.name={m.name!r}.')
    if s.sampler not in SAMPLERS:
        raise ValueError(f'sample.sampler={s.sampler!r} is not valid; choose one of {SAMPLERS}.')
    if not s.eta >= 0:
        raise ValueError(f'sample.eta={s.eta} must be >= 0.')
    if not s.guidance_scale >= 0:
        raise ValueError(f'sample.guidance_scale={s.guidance_scale} must be >= 0.')
    if s.guidance_scale != 1.0 and not (m.num_classes > 0 and m.class_dropout_prob > 0):
        raise ValueError(
            f'sample.guidance_scale={s.guidance_scale} (classifier-free guidance) needs a '
            'model trained with label dropout, i.e. model.num_classes > 0 and '
            f'model.class_dropout_prob > 0 (got num_classes={m.num_classes}, '
            f'class_dropout_prob={m.class_dropout_prob}); set sample.guidance_scale=1.')
    if not s.classifier_scale >= 0:
        raise ValueError(f'sample.classifier_scale={s.classifier_scale} must be >= 0.')
    if s.classifier_scale > 0:
        if classifier is None:
            raise ValueError(f'sample.classifier_scale={s.classifier_scale} > 0 needs a '
                             'classifier (set sample.classifier_workdir).')
        if m.num_classes > 0 and classifier.num_classes != m.num_classes:
            raise ValueError(
                f'The classifier has {classifier.num_classes} classes but the model '
                f'model.num_classes={m.num_classes}; sample.classifier_workdir must hold '
                'a classifier of the same classes.')


def make_model_fn(model: nn.Module, params: Any, conditional: bool) -> Callable:
    """Wraps `model.apply` as `model_fn(x, t, y=None) -> output` (eval mode).

    Args:
        model: The UNet.
        params: Its parameters (the 'params' collection).
        conditional: Pass `y` to the model (config.model.num_classes > 0). An
            unconditional model ignores `y`, which then only feeds classifier guidance.

    Returns:
        The model function of the samplers' contract.
    """
    def model_fn(x, t, y=None):
        kwargs = {'y': y} if conditional else {}
        return model.apply({'params': params}, x, t, train=False, **kwargs)
    return model_fn


def make_classifier_cond_fn(classifier: nn.Module, classifier_params: Any) -> Callable:
    """The classifier-guidance gradient grad_x log p(y | x_t, t) (Dhariwal & Nichol 2021).

    The gradient of sum_b log_softmax(classifier(x, t))[b, y_b] with respect to x;
    each example's term depends only on its own x_b, so this is the per-example
    gradient. The guidance scale is applied by the sampler (`classifier_scale`):
    DDPM shifts the mean by s * Sigma * grad (Alg. 1), DDIM shifts eps by
    -sqrt(1 - abar) * s * grad (Alg. 2).

    Args:
        classifier: A noise-aware `Classifier` (called as `classifier(x, t)`).
        classifier_params: Its parameters.

    Returns:
        `cond_fn(x, t, y=None, **unused) -> [B, H, W, C]`.
    """
    def cond_fn(x, t, y=None, **unused):
        del unused
        if y is None:
            raise ValueError('classifier guidance needs labels y')

        def total_log_prob(x_in):
            logits = classifier.apply({'params': classifier_params}, x_in, t, train=False)
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return jnp.sum(jnp.take_along_axis(log_probs, y[:, None].astype(jnp.int32),
                                               axis=-1))

        return jax.grad(total_log_prob)(x)
    return cond_fn


def _label_classes(config: ml_collections.ConfigDict, classifier: Optional[nn.Module]) -> int:
    """Classes labels are drawn from: the model's, else the guiding classifier's, else 0."""
    if config.model.num_classes > 0:
        return config.model.num_classes
    if classifier is not None and config.sample.classifier_scale > 0:
        return classifier.num_classes
    return 0


def _to_global_labels(labels: Any, sharding: jax.sharding.Sharding, num_classes: int
                      ) -> jax.Array:
    """Host labels (the same on every process) -> a global int32 array sharded `P('data')`."""
    if isinstance(labels, jax.Array):
        return labels
    labels = np.asarray(labels, np.int32)
    if labels.ndim != 1:
        raise ValueError(f'labels must be int32 [B], got shape {labels.shape}')
    if num_classes > 0 and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'labels must be in [0, {num_classes}), got values in '
                         f'[{labels.min()}, {labels.max()}]')
    # Works for one process and for many (each builds only its addressable shards).
    return jax.make_array_from_callback(labels.shape, sharding, lambda index: labels[index])


# --- the compiled sampler -----------------------------------------------------------------


def make_sample_fn(config: ml_collections.ConfigDict, model: nn.Module, *,
                   classifier: Optional[nn.Module] = None,
                   mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
    """Builds the sharded, jitted sampler for `config.sample` and `config.diffusion`.

    The returned function compiles once per batch size (the first call) and then
    runs the whole reverse process on the devices. Labels always give the batch
    size: for an unconditional model without classifier guidance they are ignored
    (pass zeros).

    Args:
        config: The run's config (reads `diffusion`, `data`, `model`, `sample`).
        model: The UNet (from `models.create_model(config)`).
        classifier: A noise-aware `Classifier`; used when
            `config.sample.classifier_scale > 0`.
        mesh: The `('data',)` mesh; default: all devices.

    Returns:
        `sample_fn(params, rng, labels, classifier_params=None) -> images`, with
        params replicated, `rng` a key, labels int32 [B] (a host array that is the
        same on every process, or a global array sharded `P('data')`; B a multiple
        of the mesh size). Images are float32 [B, H, W, C] in [-1, 1], a global array
        sharded `P('data')` (see `gather_to_host`).

    Raises:
        ValueError: Bad `sample` fields (see `validate_sample_config`); at call time,
            a batch not divisible by the mesh size, labels out of range, or missing
            classifier parameters.
    """
    validate_sample_config(config, classifier)
    mesh = parallel.create_mesh() if mesh is None else mesh
    num_devices = parallel.num_mesh_devices(mesh)
    replicated = parallel.replicated_sharding(mesh)
    batch_sharded = parallel.batch_sharding(mesh)
    d, s, m = config.diffusion, config.sample, config.model
    sched = create_sampling_schedule(config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    num_classes = m.num_classes
    conditional = num_classes > 0
    guided = s.classifier_scale > 0
    use_labels = conditional or guided
    num_label_classes = _label_classes(config, classifier)
    # Read now (the config may change later); Python scalars become program constants.
    sampler, eta = s.sampler, float(s.eta)
    guidance_scale, classifier_scale = float(s.guidance_scale), float(s.classifier_scale)
    sampler_kwargs = dict(mean_type=d.mean_type, var_type=d.var_type,
                          clip_denoised=bool(s.clip_denoised))

    def constrain(x):
        return jax.lax.with_sharding_constraint(x, batch_sharded)

    def sample(params, rng, labels, classifier_params):
        batch = labels.shape[0]
        base_fn = make_model_fn(model, params, conditional)
        if guidance_scale != 1.0:
            # The null label is num_classes (Ho & Salimans 2022, Eq. 6).
            base_fn = samplers.make_cfg_model_fn(base_fn, guidance_scale, num_classes)

        def model_fn(x, t, **kwargs):
            # Keeps the scan carry (and so every step) data-parallel.
            return constrain(base_fn(constrain(x), t, **kwargs))

        cond_fn = make_classifier_cond_fn(classifier, classifier_params) if guided else None
        kwargs = dict(sampler_kwargs, model_kwargs={'y': labels} if use_labels else None,
                      cond_fn=cond_fn, classifier_scale=classifier_scale)
        shape = (batch,) + image_shape
        if sampler == 'ddim':
            x = samplers.ddim_sample(model_fn, sched, shape, rng, eta=eta, **kwargs)
        elif sampler == 'dpm_solver':  # Deterministic ODE sampler; eta is unused.
            x = samplers.dpm_solver_sample(model_fn, sched, shape, rng, **kwargs)
        else:
            x = samplers.ddpm_sample(model_fn, sched, shape, rng, **kwargs)
        return jnp.clip(x, -1.0, 1.0)

    if guided:
        jitted = jax.jit(sample, in_shardings=(replicated, replicated, batch_sharded,
                                               replicated), out_shardings=batch_sharded)
    else:
        jitted = jax.jit(lambda params, rng, labels: sample(params, rng, labels, None),
                         in_shardings=(replicated, replicated, batch_sharded),
                         out_shardings=batch_sharded)

    def sample_fn(params, rng, labels, classifier_params=None):
        batch = np.shape(labels)[0] if np.ndim(labels) else 0
        if batch < 1 or batch % num_devices:
            raise ValueError(f'The sampling batch (labels of shape {np.shape(labels)}) must '
                             f'be a positive multiple of the {num_devices} mesh devices.')
        labels = _to_global_labels(labels, batch_sharded, num_label_classes)
        if guided:
            if classifier_params is None:
                raise ValueError('sample.classifier_scale > 0: pass classifier_params.')
            return jitted(params, rng, labels, classifier_params)
        return jitted(params, rng, labels)

    sample_fn.jitted = jitted  # For inspection (e.g. counting compilations) in tests.
    return sample_fn


def _sampler_config_key(config: ml_collections.ConfigDict) -> str:
    """The config fields `make_sample_fn` compiles in, as a canonical JSON string."""
    s = config.sample
    fields = {
        'diffusion': config.diffusion.to_dict(),
        'model': config.model.to_dict(),
        'image_shape': [config.data.image_size, config.data.channels],
        'sample': {k: s[k] for k in ('sampler', 'respacing', 'eta', 'clip_denoised',
                                     'guidance_scale', 'classifier_scale')},
    }
    return json.dumps(fields, sort_keys=True, default=list)


def cached_sample_fn(config: ml_collections.ConfigDict, model: nn.Module,
                     mesh: jax.sharding.Mesh, classifier: Optional[nn.Module] = None
                     ) -> Callable:
    """`make_sample_fn`, memoised on (the config fields it reads, model, mesh, classifier).

    Flax modules and meshes hash by value, so every call with an equal model, mesh
    and compiled-in config fields (`diffusion`, `model`, the image shape and
    `sample.{sampler, respacing, eta, clip_denoised, guidance_scale,
    classifier_scale}`) gets the same function and hence the same compiled
    program: the trainer's periodic grids compile once per run, and
    `sample_and_save` reuses that program when its batch has the grid's size.
    The last 8 are kept.
    """
    key = (_sampler_config_key(config), model, mesh, classifier)
    fn = _SAMPLE_FN_CACHE.get(key)
    if fn is None:
        fn = make_sample_fn(config, model, classifier=classifier, mesh=mesh)
        _SAMPLE_FN_CACHE[key] = fn
        while len(_SAMPLE_FN_CACHE) > _CACHE_SIZE:
            _SAMPLE_FN_CACHE.popitem(last=False)
    else:
        _SAMPLE_FN_CACHE.move_to_end(key)
    return fn


def gather_to_host(x: jax.Array) -> np.ndarray:
    """A global (batch-sharded) array as one NumPy array on every process.

    Multi-process this is a collective: every process must call it.
    """
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- training grids -----------------------------------------------------------------------


def write_sample_grid(config: ml_collections.ConfigDict, model: nn.Module, ema_params: Any,
                      step: int, workdir: str, mesh: jax.sharding.Mesh) -> Optional[str]:
    """Samples `train.num_grid_samples` images into `<workdir>/samples/step_<step>.png`.

    Called by the trainer; cheap to call repeatedly: the compiled sampler is cached
    per (config, model, mesh) by `cached_sample_fn`. Every grid of a run uses the
    same noise (the key folds in `GRID_SALT`, not the step), so successive grids
    show training progress on the same starting points. Class-conditional models
    get labels 0, 1, ..., num_classes - 1 cycling, one class per column when the
    grid is at least num_classes wide. Classifier guidance is not applied (the
    trainer has no classifier); classifier-free guidance follows
    `sample.guidance_scale`. The batch is padded to a multiple of the mesh size.
    All processes must call this; only process 0 writes.

    Args:
        config: The run's config.
        model: The UNet.
        ema_params: Parameters to sample with (replicated over `mesh`).
        step: Training step, for the file name.
        workdir: Run directory.
        mesh: The trainer's mesh.

    Returns:
        The PNG path on process 0, else None (also when num_grid_samples is 0).
    """
    num = config.train.num_grid_samples
    if num <= 0:
        return None
    grid_config = ml_collections.ConfigDict(config.to_dict())
    grid_config.sample.classifier_scale = 0.0
    sample_fn = cached_sample_fn(grid_config, model, mesh)
    num_classes = config.model.num_classes
    padded = _padded(num, parallel.num_mesh_devices(mesh))
    labels = (np.arange(padded) % num_classes if num_classes > 0
              else np.zeros(padded)).astype(np.int32)
    rng = jax.random.fold_in(jax.random.key(config.seed), GRID_SALT)
    samples = gather_to_host(sample_fn(ema_params, rng, labels))[:num]
    if jax.process_index() != 0:
        return None
    grid = images_lib.make_grid(images_lib.to_uint8(samples),
                                images_lib.grid_columns(num, num_classes),
                                scale=images_lib.upscale_factor(config.data.image_size))
    return images_lib.save_png(epath.Path(workdir) / 'samples' / f'step_{step}.png', grid)


# --- --mode=sample ------------------------------------------------------------------------


def restore_classifier(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                       ) -> tuple[nn.Module, Any]:
    """Restores the guidance classifier from `config.sample.classifier_workdir`.

    The classifier is built from the config stored with its checkpoint. Its raw
    (non-EMA) parameters are used, as ADM's guided sampling does.

    Args:
        config: The denoiser's config.
        mesh: Mesh to replicate the parameters over.

    Returns:
        (classifier module, classifier params).

    Raises:
        ValueError: Empty `sample.classifier_workdir`, or a checkpoint that is not a
            classifier or does not match the denoiser's timesteps / image shape.
        FileNotFoundError: No checkpoint in `sample.classifier_workdir`.
    """
    workdir = config.sample.classifier_workdir
    if not workdir:
        raise ValueError(f'sample.classifier_scale={config.sample.classifier_scale} > 0 '
                         'needs sample.classifier_workdir (the workdir of a trained '
                         "classifier, model.name='classifier'); it is empty.")
    directory = checkpointing.checkpoint_dir(workdir)
    if not directory.exists():
        raise FileNotFoundError(f'sample.classifier_workdir={workdir!r} has no checkpoints '
                                f'({directory} does not exist); train a classifier there '
                                'first.')
    try:
        classifier_config = checkpointing.load_config(workdir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'sample.classifier_workdir={workdir!r}: {e}') from e
    c = classifier_config
    if c.model.name != 'classifier':
        raise ValueError(f'sample.classifier_workdir={workdir!r} holds a '
                         f'model.name={c.model.name!r} checkpoint, not a classifier.')
    for field in ('diffusion.num_timesteps', 'diffusion.schedule', 'data.image_size',
                  'data.channels'):
        group, name = field.split('.')
        if c[group][name] != config[group][name]:
            raise ValueError(f'The classifier in sample.classifier_workdir={workdir!r} has '
                             f'{field}={c[group][name]!r} but the model has '
                             f'{config[group][name]!r}.')
    classifier = create_model(classifier_config)
    _, params, _ = checkpointing.restore_for_inference(classifier_config, workdir, mesh)
    return classifier, params


def make_labels(config: ml_collections.ConfigDict, num_classes: int, num: int) -> np.ndarray:
    """Labels for `--mode=sample`: `sample.label`, or uniform over classes when -1.

    The same on every process (seeded by `config.seed`).

    Args:
        config: The run's config.
        num_classes: Classes to draw from (0: unconditional, labels are all -1).
        num: How many.

    Returns:
        int32 [num]; -1 marks "no label" (unconditional sampling).

    Raises:
        ValueError: `sample.label` not -1 and not a valid class.
    """
    label = config.sample.label
    if num_classes <= 0:
        if label != -1:
            raise ValueError(f'sample.label={label} needs a class-conditional model or '
                             'classifier guidance; use -1.')
        return np.full((num,), -1, np.int32)
    if label == -1:
        rng = np.random.default_rng([config.seed, SAMPLE_SALT])
        return rng.integers(0, num_classes, size=num).astype(np.int32)
    if not 0 <= label < num_classes:
        raise ValueError(f'sample.label={label} must be -1 or in [0, {num_classes}).')
    return np.full((num,), label, np.int32)


def sample_and_save(config: ml_collections.ConfigDict, workdir: str, *,
                    mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, Any]:
    """`--mode=sample`: writes `sample.num_images` EMA samples of the latest checkpoint.

    Images are generated in batches of `sample.global_batch_size` over all devices
    and processes; every process takes part in each batch and in gathering it, and
    process 0 writes `<workdir>/samples/samples_<step>.npz` ('images' uint8
    [N, H, W, C], 'labels' int32 [N], -1 for unconditional samples) and
    `<workdir>/samples/samples_<step>.png` (a grid of the first 256 at most).
    Batch b uses the key fold_in(fold_in(key(seed), SAMPLE_SALT), b).

    Args:
        config: The run's config (as trained, plus the `sample` group).
        workdir: Run directory holding `checkpoints/`.
        mesh: Default: all devices.

    Returns:
        {'step': int, 'npz': path, 'png': path, 'num_images': int}.

    Raises:
        ValueError: Bad `sample` fields, or a batch not divisible by the device count.
        FileNotFoundError: No checkpoint in `workdir` (or the classifier's workdir).
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    s = config.sample
    num_devices = parallel.num_mesh_devices(mesh)
    if s.num_images < 1:
        raise ValueError(f'sample.num_images={s.num_images} must be >= 1.')
    if s.global_batch_size < 1 or s.global_batch_size % num_devices:
        raise ValueError(f'sample.global_batch_size={s.global_batch_size} must be a '
                         f'positive multiple of the device count ({num_devices}).')
    classifier, classifier_params = None, None
    if s.classifier_scale > 0:
        classifier, classifier_params = restore_classifier(config, mesh)
    # Bad sample fields fail here, before the (possibly large) denoiser is restored.
    validate_sample_config(config, classifier)
    model = create_model(config)
    sample_fn = cached_sample_fn(config, model, mesh, classifier)
    step, _, ema_params = checkpointing.restore_for_inference(config, workdir, mesh)

    num_classes = _label_classes(config, classifier)
    labels = make_labels(config, num_classes, s.num_images)
    batch_size = s.global_batch_size
    num_batches = -(-s.num_images // batch_size)
    base_rng = jax.random.fold_in(jax.random.key(config.seed), SAMPLE_SALT)
    is_main = jax.process_index() == 0
    logger.info('Sampling %d images from step %d in %d batches of %d (%s%s).', s.num_images,
                step, num_batches, batch_size, s.sampler,
                f', respacing {s.respacing}' if s.respacing else '')
    batches = range(num_batches)
    if is_main and sys.stdout.isatty():
        import tqdm
        batches = tqdm.tqdm(batches, desc='sampling', unit='batch')
    collected = []
    for b in batches:
        batch_labels = np.zeros((batch_size,), np.int32)
        chunk = labels[b * batch_size:(b + 1) * batch_size]
        batch_labels[:len(chunk)] = np.maximum(chunk, 0)  # -1 (no label) feeds nothing.
        out = sample_fn(ema_params, jax.random.fold_in(base_rng, b), batch_labels,
                        classifier_params)
        host = gather_to_host(out)[:len(chunk)]
        if is_main:
            collected.append(images_lib.to_uint8(host))
            if not sys.stdout.isatty():
                logger.info('Sampled batch %d/%d.', b + 1, num_batches)

    samples_dir = epath.Path(workdir) / 'samples'
    npz_path = samples_dir / f'samples_{step}.npz'
    png_path = samples_dir / f'samples_{step}.png'
    if is_main:
        all_images = np.concatenate(collected, axis=0)
        images_lib.save_npz(npz_path, images=all_images, labels=labels)
        shown = all_images[:MAX_GRID_IMAGES]
        ncols = images_lib.grid_columns(len(shown))
        grid = images_lib.make_grid(shown, ncols,
                                    scale=images_lib.upscale_factor(config.data.image_size))
        images_lib.save_png(png_path, grid)
        logger.info('Wrote %s and %s.', npz_path, png_path)
    return {'step': int(step), 'npz': str(npz_path), 'png': str(png_path),
            'num_images': int(s.num_images)}
