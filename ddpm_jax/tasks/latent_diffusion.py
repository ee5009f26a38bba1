"""Latent diffusion (Rombach et al. 2022): the denoiser of `DiffusionTask` on the latents
of a frozen first-stage autoencoder.

* The autoencoder (a `task='autoencoder'` run) is restored once, on the host, from
  the newest checkpoint in `latent.autoencoder_workdir` (its architecture from the
  config stored with it, its trained, non-EMA parameters, as LDM's first stages).
  It is frozen: its parameters are constants of the jitted step, not part of the
  train state.
* `prepare_batch` encodes the batch inside the jitted step: z ~ q(z|x) for a KL
  latent (LDM's posterior sample), the encoder output before quantisation for a VQ
  latent (LDM's VQModelInterface), times the scale factor. With
  `latent.cache='autoencoder_workdir'` the batches hold that posterior, cached once
  by `ddpm_jax.latent_cache`, instead of images: the step draws z from it with the
  same noise and skips the encoder. The scale factor is `latent.scale_factor`, or,
  when that is 0, 1/std of the latents of the first global batch, measured in the
  first step (LDM's scale_by_std; the same batch and noise with or without the
  cache) and kept in the task state, so it is checkpointed and a resumed run uses
  the same value.
* The loss, timesteps, label dropout and loss-aware sampling are `DiffusionTask`'s,
  on the latent grid [B, H/f, W/f, z]. The UNet sees the labels through
  cross-attention when `model.context_encoder` is set.
* Sampling runs any sampler of `sampler_registry.SAMPLERS` (with classifier-free guidance)
  on latents, divides by the scale factor and decodes (a VQ latent is quantised
  first); see `make_sample_fn`.

`model.attention_resolutions` are given in image pixels (latent side x f), so the
generic architecture check at `data.image_size` holds; the UNet attends at the
latent resolutions r / f.
"""

import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from ddpm_jax import config_json
from ddpm_jax import parallel
from ddpm_jax import state as state_lib
from ddpm_jax.models import autoencoder as ae_lib
from ddpm_jax.models import conditioning, create_model
from ddpm_jax.tasks import base
from ddpm_jax.tasks import diffusion as diffusion_task
from ddpm_jax.tasks.autoencoder import AutoencoderTask, create_autoencoder

# `latent.cache`: encode in the step, or once into <autoencoder_workdir>/latent_cache/.
CACHE_CHOICES = ('none', 'autoencoder_workdir')


def _checkpoint_dir(workdir: str) -> epath.Path:
    directory = epath.Path(os.path.abspath(workdir) if '://' not in workdir else workdir)
    return directory / 'checkpoints'


def newest_autoencoder_step(workdir: str) -> int:
    """The newest finished checkpoint step of an autoencoder run.

    Raises:
        ValueError: No finished checkpoint there (naming `latent.autoencoder_workdir`).
    """
    directory = _checkpoint_dir(workdir)
    steps = sorted(int(p.name) for p in directory.iterdir()
                   if p.name.isdigit() and (p / 'state').exists()) if directory.exists() else []
    if not steps:
        raise ValueError(f'latent.autoencoder_workdir={workdir!r} holds no finished checkpoint '
                         f'(looked in {directory}); train the first stage there with '
                         "task='autoencoder' (e.g. configs/digits_autoencoder.py) first.")
    return steps[-1]


def load_autoencoder(workdir: str, step: int | None = None
                     ) -> tuple[ml_collections.ConfigDict, Any]:
    """The config and trained parameters of a checkpoint of an autoencoder run.

    Reads the checkpoint layout of `ddpm_jax.checkpointing` with orbax directly
    (`checkpointing` imports the task registry, which imports this module).

    Args:
        workdir: A `task='autoencoder'` run directory.
        step: The checkpoint step; default the newest (`newest_autoencoder_step`).

    Returns:
        (its config, params['autoencoder'] as host NumPy arrays).

    Raises:
        ValueError: No finished checkpoint there, or one of another task; both name
            `latent.autoencoder_workdir`.
    """
    step = newest_autoencoder_step(workdir) if step is None else step
    step_dir = _checkpoint_dir(workdir) / str(step)
    saved = json.loads((step_dir / 'config' / 'metadata').read_text())
    ae_config = config_json.from_json_dict(config_json.upgrade_json_dict(saved))
    if ae_config.task != 'autoencoder':
        raise ValueError(f'latent.autoencoder_workdir={workdir!r} holds a '
                         f"task={ae_config.task!r} run, not task='autoencoder'.")
    task = AutoencoderTask(ae_config, perceptual=False)
    mesh = parallel.create_mesh()
    abstract = state_lib.with_shardings(
        jax.eval_shape(functools.partial(state_lib.create_train_state, task),
                       jax.random.key(0)), parallel.replicated_sharding(mesh))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(step_dir / 'state', abstract)
    return ae_config, parallel.to_host(restored.params['autoencoder'])


def latent_config(config: ml_collections.ConfigDict, ae_config: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
    """`config` with `data` describing the latent grid and the attention resolutions
    divided by f: what the UNet and the diffusion machinery see.

    Raises:
        ValueError: An image side or attention resolution not divisible by f, or an
            autoencoder trained on other images.
    """
    a, d = ae_config.autoencoder, config.data
    factor = ae_lib.downsampling_factor(a.channel_mult)
    if (ae_config.data.image_size, ae_config.data.channels) != (d.image_size, d.channels):
        raise ValueError(
            f'The autoencoder in latent.autoencoder_workdir was trained on '
            f'{ae_config.data.image_size}x{ae_config.data.image_size}x'
            f'{ae_config.data.channels} images, but data.image_size={d.image_size}, '
            f'data.channels={d.channels}.')
    bad = [r for r in config.model.attention_resolutions if r % factor]
    if bad:
        raise ValueError(f'model.attention_resolutions {bad} (image pixels) are not multiples '
                         f"of the autoencoder's downsampling factor f={factor}.")
    out = ml_collections.ConfigDict(config.to_dict())
    out.data.image_size = d.image_size // factor
    out.data.channels = a.z_channels
    out.model.attention_resolutions = tuple(r // factor for r in
                                            config.model.attention_resolutions)
    return out


class LatentDiffusionTask(diffusion_task.DiffusionTask):
    """A denoiser on the latents of a frozen autoencoder (see the module docstring).

    Args:
        config: The run's config.
        autoencoder: (autoencoder config, its parameters) to use instead of loading
            `latent.autoencoder_workdir` (e.g. in a notebook or a test).
    """
    name = 'latent_diffusion'
    sample_part = 'model'

    def __init__(self, config: ml_collections.ConfigDict,
                 autoencoder: tuple[ml_collections.ConfigDict, Any] | None = None):
        base.Task.__init__(self, config)
        if autoencoder is None:
            autoencoder = load_autoencoder(config.latent.autoencoder_workdir)
        self.ae_config, self.ae_params = autoencoder
        self.autoencoder = create_autoencoder(self.ae_config)
        self.latent_config = latent_config(config, self.ae_config)
        lc, m = self.latent_config, config.model
        self.latent_shape = (lc.data.image_size, lc.data.image_size, lc.data.channels)
        self.model = create_model(lc).clone(
            context_encoder=m.context_encoder, context_dim=m.context_dim,
            context_layers=m.context_layers, context_vocab_size=m.context_vocab_size,
            context_block=m.context_block, context_depth=m.context_depth)
        self.sched = base.config_schedule(config)
        self.loss_aware = config.diffusion.timestep_sampling == 'loss_aware'
        self.conditional = m.num_classes > 0

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        diffusion_task.DiffusionTask.validate_config(config)
        conditioning.check_context(config.model)
        lat, s = config.latent, config.sample
        checks = [
            (bool(lat.autoencoder_workdir),
             "task='latent_diffusion' needs latent.autoencoder_workdir: the workdir of a "
             "trained task='autoencoder' run."),
            (lat.scale_factor >= 0, f'latent.scale_factor={lat.scale_factor} must be >= 0 '
                                    '(0 = measure it on the first batch).'),
            (lat.cache in CACHE_CHOICES, f'latent.cache={lat.cache!r} is not valid; choose '
                                         f'one of {CACHE_CHOICES}.'),
            (not s.clip_denoised, 'Latents are not confined to [-1, 1]: set '
                                  'sample.clip_denoised=False for task=latent_diffusion.'),
            (config.train.fid_every_steps == 0,
             f'train.fid_every_steps={config.train.fid_every_steps}: the periodic FID samples '
             'without the latent scale of the task state; for task=latent_diffusion set '
             'it to 0 and score a checkpoint with --mode=fid.'),
            (s.classifier_scale == 0, 'task=latent_diffusion has no noise-aware latent '
                                      'classifier: set sample.classifier_scale=0 (use '
                                      'sample.guidance_scale).'),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        return {'model': self.init_model(rng, self.latent_shape[0], self.latent_shape[2])}

    def init_task_state(self) -> dict[str, Any]:
        """{'scale_factor': the config's, or 0 until the first step measures it,
        'sampler': the timestep sampler's state}."""
        return {'scale_factor': jnp.asarray(self.config.latent.scale_factor, jnp.float32),
                'sampler': super().init_task_state()}

    def posterior(self, images: jax.Array) -> dict[str, jax.Array]:
        """What q(z|x) of images in [-1, 1] needs to draw a latent (frozen parameters):
        {'mean', 'logvar'} [B, h, w, z] for a KL latent, {'mean'} (the encoder output
        before quantisation, a point mass) for a VQ latent. The cached batches of
        `ddpm_jax.latent_cache` hold these arrays instead of 'image'."""
        out = self.autoencoder.apply({'params': self.ae_params}, images,
                                     method=ae_lib.Autoencoder.encode)
        if self.autoencoder.kind == 'vq':
            return {'mean': jax.lax.stop_gradient(out)}
        mean, logvar = out
        return {'mean': jax.lax.stop_gradient(mean), 'logvar': jax.lax.stop_gradient(logvar)}

    @staticmethod
    def sample_posterior(moments: Mapping[str, jax.Array], noise: jax.Array) -> jax.Array:
        """z = mean + exp(logvar / 2) * noise (Kingma & Welling 2014's reparameterisation),
        or the mean of a VQ latent."""
        if 'logvar' not in moments:
            return moments['mean']
        return moments['mean'] + jnp.exp(0.5 * moments['logvar']) * noise

    def encode(self, images: jax.Array, noise: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, z] of images in [-1, 1] (frozen parameters)."""
        return self.sample_posterior(self.posterior(images), noise)

    def decode(self, ae_params: Any, latents: jax.Array, scale_factor: jax.Array) -> jax.Array:
        """Images [B, H, W, C] in [-1, 1] of scaled latents."""
        images = self.autoencoder.apply({'params': ae_params}, latents / scale_factor,
                                        method=ae_lib.Autoencoder.decode_latents)
        return jnp.clip(images, -1.0, 1.0)

    def prepare_batch(self, batch, rng, task_state):
        """Encodes batch['image'], or reads the cached posterior of `latent_cache`
        (batch['mean'] and, for a KL latent, batch['logvar']) without the encoder: the
        same noise either way, so both give the same z (up to the encoder's float
        rounding) and the same scale factor."""
        encode_rng, rng = jax.random.split(rng)
        batch_size = batch['label'].shape[0]
        noise = jax.random.normal(encode_rng, (batch_size,) + self.latent_shape)
        if 'image' in batch:
            moments = self.posterior(batch['image'].astype(jnp.float32))
        else:
            moments = {k: batch[k].astype(jnp.float32) for k in ('mean', 'logvar') if k in batch}
        z = self.sample_posterior(moments, noise)
        # LDM's scale_by_std: 1 / z.flatten().std(), torch's sample std (N - 1); over the
        # whole global batch (LDM's is rank 0's batch, DDP broadcasting its buffer).
        measured = 1.0 / jnp.std(z, ddof=1)
        stored = task_state['scale_factor']
        scale = jnp.where(stored > 0, stored, measured).astype(jnp.float32)
        examples = super().prepare_batch({'image': z * scale, 'label': batch['label']}, rng,
                                         task_state['sampler'])
        examples['scale_factor'] = jnp.full((batch_size,), scale)
        return examples

    def update_task_state(self, task_state, examples, terms):
        return {'scale_factor': examples['scale_factor'][0],
                'sampler': super().update_task_state(task_state['sampler'], examples, terms)}

    def step_metrics(self, examples, terms):
        """`DiffusionTask`'s, plus the scale factor and the std of the scaled latents."""
        metrics = super().step_metrics(examples, terms)
        metrics['scale_factor'] = examples['scale_factor'][0]
        metrics['latent_std'] = jnp.std(examples['image'])
        return metrics

    def make_sample_fn(self, mesh: jax.sharding.Mesh | None = None) -> Callable:
        """The sharded, jitted latent sampler and decoder: `tasks.diffusion`'s sampler
        on the latent grid (every sampler of the registry, classifier-free guidance
        with the null context) with the frozen decoder in the same program.

        Returns:
            `sample_fn(params, rng, labels, classifier_params=None, *, task_state,
            return_nfe=False) -> images` (or `(images, nfe)`): params the UNet's
            tree, labels int32 [B] (host; B a multiple of the mesh size),
            task_state the checkpoint's (its 'scale_factor'); images float32
            [B, H, W, C] in [-1, 1] (decoded), a global array sharded `P('data')`.
        """
        mesh = parallel.create_mesh() if mesh is None else mesh
        latent_fn = diffusion_task.make_sample_fn(
            self.latent_config, self.model, mesh=mesh,
            decode=lambda args, z: self.decode(args['autoencoder'], z, args['scale_factor']))
        ae_params = jax.device_put(self.ae_params, parallel.replicated_sharding(mesh))

        def sample_fn(params, rng, labels, classifier_params=None, *, task_state,
                      return_nfe=False):
            del classifier_params  # Validation refuses classifier guidance.
            args = {'autoencoder': ae_params,
                    'scale_factor': jnp.asarray(task_state['scale_factor'], jnp.float32)}
            return latent_fn(params, rng, labels, decode_args=args, return_nfe=return_nfe)

        sample_fn.jitted = latent_fn.jitted
        return sample_fn

    def make_grid_fn(self, mesh: jax.sharding.Mesh, rng: jax.Array) -> Callable | None:
        """`grid_fn(ema_params, task_state) -> (images, columns)`: decoded EMA samples
        (labels cycling over the classes, the same noise every time; the latent scale
        from the task state), float32 [N, H, W, C] in [-1, 1] on the host."""
        if self.config.train.num_grid_samples <= 0:
            return None
        return diffusion_task.sampled_grid_fn(self.config, self.make_sample_fn(mesh),
                                              self.sample_part, mesh, rng)

