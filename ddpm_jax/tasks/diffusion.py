"""The denoiser task: a diffusion model trained with any parameterisation, and its sampler.

Training: x_0 from the data, timesteps from `timestep_sampling` (uniform or
loss-aware importance sampling, Nichol & Dhariwal 2021, Sec. 3.3), the loss of
`losses.training_losses` (Ho et al. 2020, Eq. 14; hybrid and KL objectives of
Nichol & Dhariwal 2021, Sec. 3.1), and labels dropped to the null label for
classifier-free guidance (Ho & Salimans 2022).

Sampling: `make_sample_fn` builds the (possibly respaced) schedule from the config,
wraps the UNet as a model function, adds classifier-free guidance and/or
classifier guidance (Dhariwal & Nichol 2021, Alg. 1 and 2), and jits the whole
reverse process once with the batch sharded `P('data')` over the mesh and the
parameters replicated, so sampling is spread over every device of every process.
Images depend only on (rng, batch size), not on the number of devices or processes
(JAX's partitionable threefry draws the same numbers for any sharding).
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax import images as images_lib
from ddpm_jax import losses
from ddpm_jax import parallel
from ddpm_jax import sampler_registry
from ddpm_jax import samplers
from ddpm_jax import schedules
from ddpm_jax import timestep_sampling
from ddpm_jax.models import make_model_fn
from ddpm_jax.tasks import base


def create_sampling_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """The training schedule of `config.diffusion`, respaced by `config.sample.respacing`."""
    return base.config_schedule(config, config.sample.respacing)


def sampled_grid_fn(config: ml_collections.ConfigDict, sample_fn: Callable, part: str,
                    mesh: jax.sharding.Mesh, rng: jax.Array) -> Callable:
    """The trainer's `grid_fn(ema_params, task_state)` of a sampler with the interface
    of `make_sample_fn`: `train.num_grid_samples` images from the same noise (`rng`)
    every time, labels 0, 1, ..., num_classes - 1 cycling (one class per column when
    the grid is at least num_classes wide), the batch padded to the mesh size."""
    num = config.train.num_grid_samples
    num_classes = config.model.num_classes
    num_devices = parallel.num_mesh_devices(mesh)
    padded = -(-num // num_devices) * num_devices
    labels = (np.arange(padded) % max(num_classes, 1)).astype(np.int32)
    columns = images_lib.grid_columns(num, num_classes)

    def grid_fn(ema_params: Mapping[str, Any], task_state: Any):
        images = sample_fn(ema_params[part], rng, labels, task_state=task_state)
        return parallel.gather(images)[:num], columns

    return grid_fn


def make_sample_fn(config: ml_collections.ConfigDict, model: nn.Module, *,
                   classifier: nn.Module | None = None,
                   mesh: jax.sharding.Mesh | None = None,
                   decode: Callable[[Any, jax.Array], jax.Array] | None = None) -> Callable:
    """Builds the sharded, jitted sampler for `config.sample` and `config.diffusion`.

    The returned function compiles once per batch size (the first call) and then
    runs the whole reverse process on the devices; keep it to reuse the program.
    Labels always give the batch size: for an unconditional model without
    classifier guidance they are ignored (pass zeros).

    Args:
        config: The run's config, validated (reads `diffusion`, `data`, `model`,
            `sample`).
        model: The UNet (from `models.create_model(config)`).
        classifier: A noise-aware `Classifier`; used when
            `config.sample.classifier_scale > 0`.
        mesh: The `('data',)` mesh; default: all devices.
        decode: For a model of latents (latent diffusion): `decode(decode_args, z)`
            maps the sampler's output to images, inside the same program;
            `decode_args` (e.g. the decoder's parameters) is given at call time and
            replicated. `config.data` then describes the latents.

    Returns:
        `sample_fn(params, rng, labels, classifier_params=None, *, low_res=None,
        decode_args=None, task_state=None, return_nfe=False) -> images` (`task_state`,
        the checkpoint's, is not needed here: see `tasks.make_sample_fn`)
        (or `(images, nfe)`, nfe an int32 scalar: the model
        evaluations the sampler used, `sampler_registry.run_sampler`), with
        params the UNet's tree (replicated), `rng` a key, labels int32 [B] (a host
        array that is the same on every process, or a global array sharded
        `P('data')`; B a multiple of the mesh size), and for a super-resolution
        model (`model.low_res_size` > 0, and only then) `low_res`, float32
        [B, s, s, C] in [-1, 1] (host or `P('data')`-sharded, like the labels), given
        to the model through the sampler's `model_kwargs`. Images are float32
        [B, H, W, C] in [-1, 1], a global array sharded `P('data')` (see
        `parallel.gather`).

    Raises:
        ValueError: A classifier that is missing or has other classes than the
            model; at call time, a batch not divisible by the mesh size, labels out
            of range, missing classifier parameters, or `low_res` missing for a
            super-resolution model, given to another, or of the wrong shape.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    num_devices = parallel.num_mesh_devices(mesh)
    replicated = parallel.replicated_sharding(mesh)
    batch_sharded = parallel.batch_sharding(mesh)
    d, s, m = config.diffusion, config.sample, config.model
    sched = create_sampling_schedule(config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    conditional = m.num_classes > 0
    guided = s.classifier_scale > 0
    if guided and classifier is None:
        raise ValueError(f'sample.classifier_scale={s.classifier_scale} > 0 needs a '
                         'classifier (set sample.classifier_workdir).')
    if guided and conditional and classifier.num_classes != m.num_classes:
        raise ValueError(f'The classifier has {classifier.num_classes} classes but the model '
                         f'model.num_classes={m.num_classes}; sample.classifier_workdir must '
                         'hold a classifier of the same classes.')
    num_label_classes = label_classes(config, classifier)
    # Read now (the config may change later); Python scalars become program constants.
    options = dict(mean_type=d.mean_type, var_type=d.var_type,
                   clip_denoised=bool(s.clip_denoised), classifier_scale=float(s.classifier_scale))
    options.update(sampler_registry.sampler_options(config, s.sampler))  # eta, latent_dim, ...
    sampler_name = s.sampler
    guidance_scale = float(s.guidance_scale)

    def constrain(x):
        return jax.lax.with_sharding_constraint(x, batch_sharded)

    def sample(params, rng, labels, classifier_params, low_res, decode_args):
        base_fn = make_model_fn(model, params, pass_labels=conditional)
        if guidance_scale != 1.0:
            # The null label is num_classes (Ho & Salimans 2022, Eq. 6).
            base_fn = samplers.make_cfg_model_fn(base_fn, guidance_scale, m.num_classes)

        def model_fn(x, t, **kwargs):
            # Keeps the scan carry (and so every step) data-parallel.
            return constrain(base_fn(constrain(x), t, **kwargs))

        cond_fn = None
        if guided:
            cond_fn = samplers.make_classifier_grad_fn(
                make_model_fn(classifier, classifier_params, pass_labels=False))
        use_labels = conditional or guided
        shape = (labels.shape[0],) + image_shape
        model_kwargs = {'y': labels} if use_labels else {}
        if low_res is not None:
            model_kwargs['low_res'] = low_res
        x, nfe = sampler_registry.run_sampler(
            sampler_name, model_fn, sched, shape, rng, cond_fn=cond_fn,
            model_kwargs=model_kwargs or None, **options)
        if decode is not None:
            x = constrain(decode(decode_args, x))
        return jnp.clip(x, -1.0, 1.0), nfe

    if guided:
        jitted = jax.jit(sample, in_shardings=(replicated, replicated, batch_sharded,
                                               replicated, batch_sharded, replicated),
                         out_shardings=(batch_sharded, replicated),
                         compiler_options=parallel.compiler_options())
    else:
        jitted = jax.jit(lambda params, rng, labels, low_res, decode_args: sample(
            params, rng, labels, None, low_res, decode_args),
                         in_shardings=(replicated, replicated, batch_sharded, batch_sharded,
                                       replicated),
                         out_shardings=(batch_sharded, replicated),
                         compiler_options=parallel.compiler_options())

    def sample_fn(params, rng, labels, classifier_params=None, *, low_res=None,
                  decode_args=None, task_state=None, return_nfe=False):
        del task_state  # A pixel-space model needs only its parameters.
        if not isinstance(labels, jax.Array):
            labels = _check_labels(labels, num_devices, num_label_classes)
            labels = parallel.shard_host_array(labels, mesh)
        low_res = _check_low_res(low_res, m.low_res_size, labels.shape[0], image_shape[-1],
                                 mesh)
        if guided:
            if classifier_params is None:
                raise ValueError('sample.classifier_scale > 0: pass classifier_params.')
            images, nfe = jitted(params, rng, labels, classifier_params, low_res, decode_args)
        else:
            images, nfe = jitted(params, rng, labels, low_res, decode_args)
        return (images, nfe) if return_nfe else images

    sample_fn.jitted = jitted  # The compiled program, e.g. to count compilations.
    return sample_fn


def _check_low_res(low_res: Any, low_res_size: int, batch_size: int, channels: int,
                   mesh: jax.sharding.Mesh) -> jax.Array | None:
    """The low-resolution inputs of a super-resolution model as a `P('data')` array."""
    if (low_res is None) != (low_res_size <= 0):
        raise ValueError(f'model.low_res_size={low_res_size}: low-resolution images (low_res) '
                         + ('are required (in --mode=sample: sample.low_res_npz or '
                            'sample.base_workdir).' if low_res is None else 'are not taken.'))
    if low_res is None:
        return None
    want = (batch_size, low_res_size, low_res_size, channels)
    if tuple(low_res.shape) != want:
        raise ValueError(f'low_res must have shape {want} (model.low_res_size={low_res_size}), '
                         f'got {tuple(low_res.shape)}.')
    if isinstance(low_res, jax.Array):
        return low_res
    return parallel.shard_host_array(np.asarray(low_res, np.float32), mesh)


def _check_labels(labels: Any, num_devices: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] < 1 or labels.shape[0] % num_devices:
        raise ValueError(f'The sampling batch (labels of shape {labels.shape}) must be a '
                         f'positive multiple of the {num_devices} mesh devices.')
    labels = labels.astype(np.int32)
    if num_classes > 0 and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'labels must be in [0, {num_classes}), got values in '
                         f'[{labels.min()}, {labels.max()}]')
    return labels


def label_classes(config: ml_collections.ConfigDict, classifier: nn.Module | None) -> int:
    """Classes labels are drawn from: the model's, else the guiding classifier's, else 0."""
    if config.model.num_classes > 0:
        return config.model.num_classes
    if classifier is not None and config.sample.classifier_scale > 0:
        return classifier.num_classes
    return 0


class DiffusionTask(base.SingleModelTask):
    """A denoising diffusion model (`model.name` 'unet' or 'ncsnpp') as one part, 'model'."""
    name = 'diffusion'
    sample_part = 'model'

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.loss_aware = config.diffusion.timestep_sampling == 'loss_aware'
        self.conditional = config.model.num_classes > 0

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        m, d = config.model, config.diffusion
        base.check_denoiser_model(config)
        learned = d.var_type in diffusion.LEARNED_VAR_TYPES
        if learned != bool(m.learn_sigma):
            raise ValueError(f'diffusion.var_type={d.var_type!r} needs model.learn_sigma='
                             f'{learned} (got {m.learn_sigma}).')
        if m.latent_dim != 0:
            raise ValueError(f"model.latent_dim={m.latent_dim} makes a GAN generator; "
                             "train it with task='ddgan' (or set model.latent_dim=0).")
        if config.sample.sampler == 'ddgan':
            raise ValueError("sample.sampler='ddgan' samples a DDGAN generator "
                             "(task='ddgan'); choose 'ddpm', 'ddim' or 'dpm_solver'.")
        if m.low_res_size > 0 and config.task != 'super_resolution':
            raise ValueError(f'model.low_res_size={m.low_res_size} makes a super-resolution '
                             "model; train and sample it with task='super_resolution'.")

    def init_task_state(self) -> Any:
        if self.loss_aware:
            return timestep_sampling.init_loss_aware_state(self.sched.num_timesteps)
        return jnp.zeros((), jnp.int32)

    def prepare_batch(self, batch, rng, task_state):
        t_rng, noise_rng, label_rng = jax.random.split(rng, 3)
        x0 = batch['image'].astype(jnp.float32)  # [B, H, W, C]
        labels = batch['label'].astype(jnp.int32)  # [B]
        batch_size = x0.shape[0]
        i, weights = timestep_sampling.sample_timesteps(
            t_rng, batch_size, self.sched.num_timesteps,
            method=self.config.diffusion.timestep_sampling,
            state=task_state if self.loss_aware else None)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        dropout = self.config.model.class_dropout_prob
        if self.conditional and dropout > 0:
            drop = jax.random.bernoulli(label_rng, dropout, (batch_size,))
            labels = jnp.where(drop, self.config.model.num_classes, labels)
        return {'image': x0, 'label': labels, 'i': i, 'noise': noise, 'weights': weights}

    def loss(self, phase, params, examples, rng):
        del phase
        d = self.config.diffusion
        model_fn = make_model_fn(self.model, params['model'], train=True,
                                 rngs={'dropout': rng}, pass_labels=self.conditional)
        model_kwargs = self.model_kwargs(examples)
        terms = losses.training_losses(model_fn, self.sched, examples['image'], examples['i'],
                                       examples['noise'], mean_type=d.mean_type,
                                       var_type=d.var_type, loss_type=d.loss_type,
                                       model_kwargs=model_kwargs)
        terms = {k: v for k, v in terms.items() if k in ('loss', 'mse', 'vb')}
        return jnp.mean(terms['loss'] * examples['weights']), terms

    def model_kwargs(self, examples: base.Examples) -> dict[str, jax.Array] | None:
        """The model's inputs besides (x_t, t) in the loss: the (dropped) labels."""
        return {'y': examples['label']} if self.conditional else None

    def update_task_state(self, task_state, examples, terms):
        if not self.loss_aware:
            return task_state
        return timestep_sampling.update_loss_aware_state(task_state, examples['i'],
                                                         terms[0]['loss'])

    def step_metrics(self, examples, terms):
        """Means of the weighted terms, and their sums per quarter of the timestep
        range with example counts (Nichol & Dhariwal 2021 log each term per quarter)."""
        weighted = {k: v * examples['weights'] for k, v in terms[0].items()}
        quarter = diffusion.timestep_quarter(examples['i'], self.sched.num_timesteps)
        metrics = {name: jnp.mean(value) for name, value in weighted.items() if name != 'loss'}
        for q in range(diffusion.NUM_QUARTERS):
            mask = (quarter == q).astype(jnp.float32)
            metrics[f'count_q{q}'] = jnp.sum(mask)
            for name, value in weighted.items():
                metrics[f'{name}_q{q}_sum'] = jnp.sum(value * mask)
        return metrics

    def make_grid_fn(self, mesh, rng):
        """Samples `train.num_grid_samples` images with the EMA parameters.

        Every grid of a run uses the same noise (`rng`, the trainer's 'grid' stream,
        not the step), so successive grids show training progress on the same
        starting points.
        Class-conditional models get labels 0, 1, ..., num_classes - 1 cycling, one
        class per column when the grid is at least num_classes wide. Classifier
        guidance is not applied (the trainer has no classifier); classifier-free
        guidance follows `sample.guidance_scale`. The batch is padded to a multiple
        of the mesh size.
        """
        if self.config.train.num_grid_samples <= 0:
            return None
        grid_config = ml_collections.ConfigDict(self.config.to_dict())
        grid_config.sample.classifier_scale = 0.0
        return sampled_grid_fn(self.config, make_sample_fn(grid_config, self.model, mesh=mesh),
                               self.sample_part, mesh, rng)
