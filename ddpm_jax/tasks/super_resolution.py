"""Super-resolution diffusion (ADM-U, Dhariwal & Nichol 2021, App. I): the task, its
low-resolution inputs and the checks of what `--mode=sample` upsamples.

* Training (`SuperResolutionTask`): the denoiser of `DiffusionTask` on the
  high-resolution images of the data (`data.image_size`), conditioned on their
  low-resolution versions (`model.low_res_size`), which the UNet upsamples
  bilinearly and concatenates to its input (`models.UNet`, `low_res`).
  The low-resolution image is made in the jitted step by `downsample_area`: the mean
  of each k x k block (k = image_size / low_res_size), which is exactly what
  guided-diffusion's super_res_train.py does (`F.interpolate(large_batch,
  small_size, mode="area")` on the float [-1, 1] batch: PyTorch's area mode is
  adaptive average pooling, whose bins are the k x k blocks for an integer factor).
  Like guided-diffusion, the low-resolution input is not quantised to uint8 in
  training (at sampling time it comes from uint8 images) and gets no noise
  augmentation. `conditioning` makes it; `--mode=eval` reuses it, so an upsampler's
  bits/dim are those of each eval image given its own low-resolution version. (The high-resolution images themselves come from `ddpm_jax.data`:
  an antialiased PIL bicubic resize, where guided-diffusion halves with BOX filters
  first and then resizes bicubically; for images already of `data.image_size`,
  e.g. a prepared 256x256 dataset, both are the identity.)
* Grids: the first global batch's first 16 images are kept in the task state
  (checkpointed, so a resumed run shows the same images; a constant number, so the
  state's shape does not depend on the grid settings);
  `make_grid_fn` draws rows of their low-resolution versions (shown
  nearest-neighbour enlarged), the EMA model's samples conditioned on them, and the
  originals.
* Sampling: `make_sample_fn` of `tasks.diffusion` takes the low-resolution images
  (`low_res=`, through the samplers' `model_kwargs`); `open_low_res_npz` checks and
  memory-maps the images of `sample.low_res_npz`; `base_sample_config` turns a base
  model's stored config into the one a cascade samples it with
  (`sample.base_workdir`). `ddpm_jax.upsampling` runs both (`--mode=sample`).
"""

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import parallel
from ddpm_jax.tasks import diffusion as diffusion_task

__all__ = ['SuperResolutionTask', 'downsample_area', 'conditioning', 'quantize',
           'upsample_nearest', 'to_model_range', 'open_low_res_npz', 'base_sample_config']

# Data images kept in the task state for the grids: a constant, so that the state (and
# the checkpoint) does not depend on train.num_grid_samples or the batch size.
NUM_KEPT_GRID_IMAGES = 16

# Keys of the images and labels in a low-resolution .npz: ours (--mode=sample writes
# 'images', 'labels'), then guided-diffusion's (image_sample.py: arr_0, arr_1).
IMAGE_KEYS = ('images', 'arr_0')
LABEL_KEYS = ('labels', 'arr_1')


def downsample_area(images: jax.Array, size: int) -> jax.Array:
    """Area (box) downsampling by an integer factor: the mean of each k x k block.

    Equals PyTorch's `F.interpolate(x, size, mode='area')` (adaptive average
    pooling) when the side is a multiple of `size`, and PIL's BOX reduce.

    Args:
        images: [B, H, W, C] with H = W a multiple of `size`.
        size: The output side s.

    Returns:
        [B, s, s, C] in the input's dtype.

    Raises:
        ValueError: A side that is not a multiple of `size`.
    """
    batch, height, width, channels = images.shape
    if size <= 0 or height % size or width % size:
        raise ValueError(f'Cannot area-downsample {height}x{width} images to {size}x{size}: '
                         'the sides must be multiples of it.')
    k_h, k_w = height // size, width // size
    blocks = images.reshape(batch, size, k_h, size, k_w, channels)
    return jnp.mean(blocks, axis=(2, 4), dtype=jnp.float32).astype(images.dtype)


def conditioning(config: ml_collections.ConfigDict, images: jax.Array) -> dict[str, jax.Array]:
    """The upsampler's inputs besides (x_t, t, y) for high-resolution images, as training
    makes them (`SuperResolutionTask.prepare_batch`; `--mode=eval` reuses it, so its
    bits/dim are those of the image given its own low-resolution version).

    Args:
        config: The upsampler's config (reads `model.low_res_size`).
        images: Float [B, H, W, C] in [-1, 1].

    Returns:
        {'low_res': [B, s, s, C]}: `downsample_area` to s = model.low_res_size, not
        quantised (guided-diffusion's super_res_train.py does not quantise either).
    """
    return {'low_res': downsample_area(images, config.model.low_res_size)}


def quantize(images: jax.Array) -> jax.Array:
    """Float images in [-1, 1] rounded to the uint8 grid and mapped back to [-1, 1]:
    what writing them to an .npz (`images.to_uint8`) and reading them does, in jit."""
    pixels = jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0.0, 255.0)
    return pixels / 127.5 - 1.0


def upsample_nearest(images: np.ndarray, factor: int) -> np.ndarray:
    """[N, s, s, C] -> [N, s*f, s*f, C] by repeating pixels (to show low-res inputs)."""
    return np.repeat(np.repeat(np.asarray(images), factor, axis=1), factor, axis=2)


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (p / 127.5 - 1, the data pipeline's map)."""
    return np.asarray(pixels, np.float32) / np.float32(127.5) - np.float32(1.0)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def open_low_res_npz(config: ml_collections.ConfigDict, open_array: Callable[[str, str], Any]
                     ) -> tuple[Any, np.ndarray | None]:
    """Checks `sample.low_res_npz` and opens its images without reading them.

    Args:
        config: The upsampler's config.
        open_array: `(path, key) -> array-like` that reads rows lazily (e.g.
            `sample_quality.open_npz_array`, a memory map), so that each process
            later reads only its own rows.

    Returns:
        (images uint8 [N, s, s, C] (lazy), labels int32 [N] or None when the file has
        none).

    Raises:
        FileNotFoundError: No such file.
        ValueError: No image array, images that are not uint8 [N, s, s, C] with
            s = model.low_res_size and C = data.channels (the message names the field
            and both sizes), or a class-conditional upsampler and no labels in range.
    """
    path, m = config.sample.low_res_npz, config.model
    field = f'sample.low_res_npz={path!r}'
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{field} does not exist.')
    with np.load(path) as f:
        image_key = next((k for k in IMAGE_KEYS if k in f.files), None)
        label_key = next((k for k in LABEL_KEYS if k in f.files), None)
        if image_key is None:
            raise ValueError(f"{field} has no 'images' or 'arr_0' array (it has {f.files}).")
        labels = np.asarray(f[label_key]).astype(np.int32) if label_key else None
    images = open_array(path, image_key)
    want = (m.low_res_size, m.low_res_size, config.data.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        got = 'x'.join(str(n) for n in images.shape[1:]) if images.ndim == 4 else str(
            images.shape)
        raise ValueError(f'{field} holds {got} images but the upsampler takes '
                         f'{"x".join(map(str, want))} (model.low_res_size={m.low_res_size}, '
                         f'data.channels={config.data.channels}); its output is '
                         f'{config.data.image_size}x{config.data.image_size}.')
    if images.dtype != np.uint8:
        raise ValueError(f'{field}: images must be uint8 pixels, got {images.dtype}.')
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f'{field}: {label_key} has shape {labels.shape}, expected '
                         f'[{images.shape[0]}] (one label per image).')
    if m.num_classes > 0:
        if labels is None:
            raise ValueError(f'{field} has no labels (labels or arr_1) but the upsampler is '
                             f'class-conditional (model.num_classes={m.num_classes}).')
        if labels.size and (labels.min() < 0 or labels.max() >= m.num_classes):
            raise ValueError(f'{field}: labels in [{labels.min()}, {labels.max()}] but the '
                             f'upsampler takes classes [0, {m.num_classes}).')
    return images, labels


def base_sample_config(config: ml_collections.ConfigDict,
                       base_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config a cascade samples its base model with.

    The base's stored config, with this run's seed, image count, batch, label and
    quantisation, and the `sample.base_*` overrides of the upsampler's config.

    Args:
        config: The upsampler's config (`sample.base_workdir` set).
        base_config: The config stored with the base model's checkpoint.

    Returns:
        A new config for the base model (not yet validated).

    Raises:
        ValueError: A base that does not generate images of the upsampler's input
            size and channels, or gives no labels to a class-conditional upsampler.
    """
    s, m, workdir = config.sample, config.model, config.sample.base_workdir
    field = f'sample.base_workdir={workdir!r}'
    out = ml_collections.ConfigDict(base_config.to_dict())
    if out.task not in ('diffusion', 'ddgan'):
        raise ValueError(f'{field} holds a task={out.task!r} run; a cascade starts from a '
                         "model that generates images (task='diffusion').")
    got = (out.data.image_size, out.data.channels)
    if got != (m.low_res_size, config.data.channels):
        raise ValueError(f'{field} generates {got[0]}x{got[0]}x{got[1]} images but the '
                         f'upsampler takes {m.low_res_size}x{m.low_res_size}x'
                         f'{config.data.channels} (model.low_res_size={m.low_res_size}, '
                         f'data.channels={config.data.channels}).')
    out.seed = config.seed
    b = out.sample
    b.num_images, b.global_batch_size, b.label = s.num_images, s.global_batch_size, s.label
    b.quantize = s.quantize  # The base's samples reach the upsampler as uint8, so quantised.
    if s.base_sampler:
        b.sampler = s.base_sampler
    if s.base_respacing:
        b.respacing = s.base_respacing
    if s.base_guidance_scale >= 0:
        b.guidance_scale = s.base_guidance_scale
    if s.base_classifier_scale >= 0:
        b.classifier_scale = s.base_classifier_scale
    if s.base_classifier_workdir:
        b.classifier_workdir = s.base_classifier_workdir
    if m.num_classes > 0:
        if out.model.num_classes <= 0 and b.classifier_scale <= 0:
            raise ValueError(f'The upsampler is class-conditional (model.num_classes='
                             f'{m.num_classes}) but the base model in {field} is '
                             'unconditional and not classifier-guided, so its samples have '
                             'no labels; set sample.base_classifier_scale and '
                             'sample.base_classifier_workdir, or use an unconditional '
                             'upsampler.')
        if 0 < out.model.num_classes != m.num_classes:
            raise ValueError(f'The base model in {field} has model.num_classes='
                             f'{out.model.num_classes} but the upsampler {m.num_classes}.')
    return out


class SuperResolutionTask(diffusion_task.DiffusionTask):
    """A denoiser of `data.image_size` images conditioned on their area-downsampled
    `model.low_res_size` versions (see the module docstring).

    The task state is {'timesteps': `DiffusionTask`'s (loss-aware sampling),
    'grid_images', 'grid_labels': the first batch's grid examples, 'grid_filled'}.
    """
    name = 'super_resolution'
    sample_part = 'model'

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.low_res_size = config.model.low_res_size
        # Grids show up to NUM_KEPT_GRID_IMAGES of the first global batch.
        self.num_grid = max(1, min(config.train.num_grid_samples, NUM_KEPT_GRID_IMAGES,
                                   config.train.global_batch_size))

    @staticmethod
    def validate_config(config: ml_collections.ConfigDict) -> None:
        m, d, s = config.model, config.data, config.sample
        if m.low_res_size <= 0:
            raise ValueError(f"task='super_resolution' needs model.low_res_size > 0 (the side "
                             f'of the low-resolution input), got {m.low_res_size}.')
        factor = d.image_size // m.low_res_size
        if d.image_size % m.low_res_size or factor < 2 or not _is_power_of_two(factor):
            raise ValueError(f'model.low_res_size={m.low_res_size} must divide '
                             f'data.image_size={d.image_size} by a power of 2 (2, 4, 8, ...).')
        diffusion_task.DiffusionTask.validate_config(config)
        if config.train.fid_every_steps > 0:
            raise ValueError(f'train.fid_every_steps={config.train.fid_every_steps}: the '
                             "periodic FID samples without low-resolution inputs; set it to "
                             "0 for task='super_resolution'.")
        if s.low_res_npz and s.base_workdir:
            raise ValueError(f'sample.low_res_npz={s.low_res_npz!r} and sample.base_workdir='
                             f'{s.base_workdir!r}: give one source of low-resolution images.')
        for field in ('base_guidance_scale', 'base_classifier_scale'):
            if s[field] < 0 and s[field] != -1:
                raise ValueError(f'sample.{field}={s[field]} must be >= 0, or -1 for the base '
                                 "model's own.")

    def init_task_state(self) -> Any:
        size, channels = self.config.data.image_size, self.config.data.channels
        return {'timesteps': super().init_task_state(),
                'grid_images': jnp.zeros((NUM_KEPT_GRID_IMAGES, size, size, channels),
                                         jnp.float32),
                'grid_labels': jnp.zeros((NUM_KEPT_GRID_IMAGES,), jnp.int32),
                'grid_filled': jnp.zeros((), jnp.bool_)}

    def prepare_batch(self, batch, rng, task_state):
        examples = super().prepare_batch(batch, rng, task_state['timesteps'])
        examples.update(conditioning(self.config, examples['image']))
        examples['data_label'] = batch['label'].astype(jnp.int32)  # Before label dropout.
        return examples

    def model_kwargs(self, examples):
        kwargs = super().model_kwargs(examples) or {}
        kwargs['low_res'] = examples['low_res']
        return kwargs

    def update_task_state(self, task_state, examples, terms):
        first = ~task_state['grid_filled']

        def keep(kept, batch):  # The first step's first images, once.
            n = min(NUM_KEPT_GRID_IMAGES, batch.shape[0])
            return jnp.where(first, kept.at[:n].set(batch[:n].astype(kept.dtype)), kept)

        return {'timesteps': super().update_task_state(task_state['timesteps'], examples,
                                                       terms),
                'grid_images': keep(task_state['grid_images'], examples['image']),
                'grid_labels': keep(task_state['grid_labels'], examples['data_label']),
                'grid_filled': jnp.ones((), jnp.bool_)}

    def make_grid_fn(self, mesh, rng):
        """`grid_fn(ema_params, task_state) -> (images, columns)`, or None without grids.

        For the kept images (up to `train.num_grid_samples` of the first batch), in
        blocks of up to 8 columns: a row of their low-resolution versions
        (nearest-neighbour enlarged), a row of EMA samples conditioned on them (with
        their labels; the same noise `rng` at every grid) and a row of the originals.
        Float32 [3N, H, W, C] in [-1, 1] on the host, the same on every process.
        """
        if self.config.train.num_grid_samples <= 0:
            return None
        grid_config = ml_collections.ConfigDict(self.config.to_dict())
        grid_config.sample.classifier_scale = 0.0
        sample_fn = diffusion_task.make_sample_fn(grid_config, self.model, mesh=mesh)
        n, size = self.num_grid, self.low_res_size
        factor = self.config.data.image_size // size
        num_devices = parallel.num_mesh_devices(mesh)
        padded = -(-n // num_devices) * num_devices
        columns = min(n, 8)
        num_classes = self.config.model.num_classes

        def grid_fn(ema_params: Mapping[str, Any], task_state: Any):
            originals = np.asarray(parallel.to_host(task_state['grid_images']))[:n]
            labels = np.asarray(parallel.to_host(task_state['grid_labels']))[:n]
            low = np.asarray(downsample_area(jnp.asarray(originals), size))
            pad = padded - n
            low_in = np.concatenate([low, np.zeros((pad,) + low.shape[1:], np.float32)])
            labels_in = np.concatenate([labels, np.zeros((pad,), np.int32)])
            if num_classes <= 0:
                labels_in = np.zeros_like(labels_in)
            samples = parallel.gather(sample_fn(ema_params[self.sample_part], rng, labels_in,
                                                low_res=low_in))[:n]
            shown = upsample_nearest(low, factor)
            rows = []
            for start in range(0, n, columns):
                for images in (shown, samples, originals):
                    row = images[start:start + columns]
                    blank = np.full((columns - len(row),) + row.shape[1:], -1.0, np.float32)
                    rows += [row, blank]  # A short last block is padded with black.
            return np.concatenate(rows), columns

        return grid_fn
