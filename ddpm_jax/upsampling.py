"""`--mode=sample` for upsamplers (task='super_resolution'): from an `.npz`, or a cascade;
and `--mode=fid` of a cascade (`evaluate_upsampler`).

Two sources of low-resolution images, one of which the config names:

* `sample.low_res_npz`: uint8 [N, s, s, C] images ('images' or 'arr_0', as our
  `--mode=sample` and guided-diffusion's image_sample.py write them; labels from
  'labels' or 'arr_1'), as guided-diffusion's super_res_sample.py reads them. The
  file is memory-mapped (`sample_quality.open_npz_array`) and every process reads
  only the rows of its own devices, batch by batch. The first `sample.num_images`
  images are upsampled (all of them when the file has fewer).
* `sample.base_workdir` (a cascade, Dhariwal & Nichol 2021, Sec. 5 / App. I): the
  base model of that workdir is restored with the config stored with its
  checkpoint, plus this run's seed, image count, batch and label and the
  `sample.base_*` overrides (sampler, respacing, classifier-free or classifier
  guidance: `tasks.super_resolution.base_sample_config`). Each batch is sampled by
  the base model, quantised to uint8 (exactly as if it had been written to an .npz)
  and upsampled at once, so only one batch of each resolution is held; the labels of
  the base samples condition a class-conditional upsampler.

Every setting and file is checked before anything compiles; images of the wrong
size stop with one error naming the field and both sizes. Process 0 writes
`<workdir>/samples/samples_<step>.{npz,png}` (.npz input) or
`cascade_<step>_<s>.{npz,png}` and `cascade_<step>_<S>.{npz,png}` (cascade: both
resolutions, 'images' and 'labels' each), never replacing earlier files, and the
run is recorded in `<workdir>/runs.jsonl`.

`evaluate_upsampler` (main.py's `--mode=fid` for this task) scores the cascade's
upsampled images with `sample_quality` (`eval.fid_num_samples` of them, in batches
of `eval.fid_batch_size`); without `sample.base_workdir` it hands over to
`sample_quality.evaluate_samples`, which upsamples the eval split's own
low-resolution images and reports their PSNR.

Noise: upsampler batch b uses fold_in(rng_for(config, 'upsample'), b); a cascade's
base batch b uses the base's own `--mode=sample` key with this run's seed, so a
cascade gives exactly the images of `--mode=sample` on the base workdir followed by
`--mode=sample` of the upsampler on that .npz.
"""

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import checkpointing
from ddpm_jax import config_lib
from ddpm_jax import images as images_lib
from ddpm_jax import parallel
from ddpm_jax import sample_mode
from ddpm_jax import sample_quality
from ddpm_jax import tasks
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.models import create_model
from ddpm_jax.tasks import diffusion as diffusion_task
from ddpm_jax.tasks import super_resolution

logger = logging.getLogger('ddpm_jax')

__all__ = ['upsample_and_save', 'evaluate_upsampler', 'load_base_config']


def load_base_config(config: ml_collections.ConfigDict, num_devices: int
                     ) -> ml_collections.ConfigDict:
    """The validated config a cascade samples `sample.base_workdir`'s model with.

    Raises:
        FileNotFoundError: No checkpoint in `sample.base_workdir`.
        ValueError: A base that does not fit the upsampler, or bad base settings
            (naming the field, prefixed with the base workdir).
    """
    workdir = config.sample.base_workdir
    if not checkpointing.checkpoint_dir(workdir).exists():
        raise FileNotFoundError(f'sample.base_workdir={workdir!r} has no checkpoints; train '
                                'the base model there first.')
    try:
        stored = checkpointing.load_config(workdir, schema=config)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'sample.base_workdir={workdir!r}: {e}') from e
    base_config = super_resolution.base_sample_config(config, stored)
    try:
        config_lib.validate(base_config, mode='sample', num_devices=num_devices)
    except ValueError as e:
        raise ValueError(f'The base model of sample.base_workdir={workdir!r} (its config with '
                         f'the sample.base_* overrides): {e}') from None
    return base_config


class _Generator:
    """A restored model and its compiled sampler: one batch at a time."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 mesh: jax.sharding.Mesh):
        classifier, self.classifier_params = None, None
        if config.sample.classifier_scale > 0:
            classifier, self.classifier_params = sample_mode.restore_classifier(config, mesh)
        self.num_classes = diffusion_task.label_classes(config, classifier)
        self.sample_fn = diffusion_task.make_sample_fn(config, create_model(config),
                                                       classifier=classifier, mesh=mesh)
        self.step, _, ema_params = checkpointing.restore_for_inference(config, workdir, mesh)
        self.params = ema_params[tasks.TASKS[config.task].sample_part]
        self.quantize = config.sample.quantize

    def __call__(self, rng: jax.Array, labels: np.ndarray, low_res: Any = None) -> np.ndarray:
        """uint8 [B, H, W, C] on every process (labels -1 feed nothing)."""
        kwargs = {} if low_res is None else {'low_res': low_res}
        out = self.sample_fn(self.params, rng, np.maximum(labels, 0), self.classifier_params,
                             **kwargs)
        return images_lib.to_uint8(parallel.gather(out), self.quantize)


def _npz_rows(images: Any, start: int, count: int, batch_size: int,
              mesh: jax.sharding.Mesh) -> jax.Array:
    """Rows [start, start + count) of a (memory-mapped) uint8 array in [-1, 1], zero-padded
    to the batch, as a `P('data')` array: each process reads only its devices' rows."""
    def read_rows(lo, hi):
        out = np.zeros((hi - lo,) + images.shape[1:], np.float32)
        real = max(0, min(hi, count) - lo)
        out[:real] = super_resolution.to_model_range(images[start + lo:start + lo + real])
        return out

    return parallel.shard_rows(read_rows, batch_size, mesh)


def _save(directory: epath.Path, stem: str, images: np.ndarray, labels: np.ndarray,
          image_size: int) -> tuple[str, str]:
    npz_path, png_path = f'{stem}.npz', f'{stem}.png'
    images_lib.save_npz(directory / npz_path, images=images, labels=labels)
    shown = images[:sample_mode.MAX_GRID_IMAGES]
    grid = images_lib.make_grid(shown, images_lib.grid_columns(len(shown)),
                                scale=images_lib.upscale_factor(image_size))
    images_lib.save_png(directory / png_path, grid)
    return str(directory / npz_path), str(directory / png_path)


def _progress(num_batches: int, is_main: bool) -> tuple[Any, Callable[[int], None]]:
    batches = range(num_batches)
    interactive = is_main and sys.stdout.isatty()
    if interactive:
        import tqdm
        batches = tqdm.tqdm(batches, desc='upsampling', unit='batch')

    def log(b):
        if is_main and not interactive:
            logger.info('Upsampled batch %d/%d.', b + 1, num_batches)

    return batches, log


class _Plan:
    """What an upsampling run reads and samples with, checked and restored: the
    upsampler, the base model of a cascade (or the memory-mapped images of
    `sample.low_res_npz`), the labels and the image count. Built before the loop, so
    every file and setting is checked before anything compiles."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 mesh: jax.sharding.Mesh):
        num_devices = parallel.num_mesh_devices(mesh)
        s = config.sample
        if not s.low_res_npz and not s.base_workdir:
            raise ValueError("task='super_resolution' samples from low-resolution images: "
                             'set sample.low_res_npz (an .npz of uint8 images) or '
                             'sample.base_workdir (a base model to sample first, a cascade).')
        self.config, self.mesh = config, mesh
        self.base_config = self.low_images = self.base = None
        if s.base_workdir:
            self.base_config = load_base_config(config, num_devices)
            self.num_images = s.num_images
            self.base = _Generator(self.base_config, s.base_workdir, mesh)
            # Labels as the base's own --mode=sample draws them.
            self.labels = sample_mode.make_labels(self.base_config, self.base.num_classes,
                                                  self.num_images)
        else:
            self.low_images, labels = super_resolution.open_low_res_npz(
                config, sample_quality.open_npz_array)
            self.num_images = min(s.num_images, len(self.low_images))
            self.labels = (np.full((self.num_images,), -1, np.int32) if labels is None
                           else np.asarray(labels[:self.num_images], np.int32))
        self.upsampler = _Generator(config, workdir, mesh)
        self.num_batches = -(-self.num_images // s.global_batch_size)

    def source(self) -> str:
        """Where the low-resolution images come from, for the log."""
        s = self.config.sample
        if self.base is None:
            return s.low_res_npz
        bs = self.base_config.sample
        return (f'the base model of {s.base_workdir} (step {self.base.step}, {bs.sampler}'
                f'{", respacing " + bs.respacing if bs.respacing else ""})')

    def batches(self, indices: Iterable[int]
                ) -> Iterator[tuple[int, np.ndarray | None, np.ndarray]]:
        """Yields, for each batch index b of `indices` (`range(self.num_batches)`, maybe
        with a progress bar), (count, low uint8 [count, s, s, C] of a cascade's base or
        None, upsampled uint8 [B, S, S, C] on every process, the last `B - count` rows
        padding); B = `sample.global_batch_size`.

        Upsampler batch b uses fold_in(rng_for(config, 'upsample'), b); a cascade's base
        batch b uses the base's own `--mode=sample` key (this run's seed)."""
        batch_size = self.config.sample.global_batch_size
        up_rng = config_lib.rng_for(self.config, 'upsample')
        base_rng = (None if self.base is None
                    else config_lib.rng_for(self.base_config, 'sample'))
        for b in indices:
            start = b * batch_size
            count = min(batch_size, self.num_images - start)
            batch_labels = np.zeros((batch_size,), np.int32)
            batch_labels[:count] = self.labels[start:start + count]
            low_u8 = None
            if self.base is not None:
                low_u8 = self.base(jax.random.fold_in(base_rng, b), batch_labels)
                low_res = super_resolution.to_model_range(low_u8)
                low_u8 = low_u8[:count]
            else:
                low_res = _npz_rows(self.low_images, start, count, batch_size, self.mesh)
            yield count, low_u8, self.upsampler(jax.random.fold_in(up_rng, b), batch_labels,
                                                low_res)


def upsample_and_save(config: ml_collections.ConfigDict, workdir: str, *,
                      mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """`--mode=sample` of an upsampler: the images of `sample.low_res_npz`, or a cascade
    from `sample.base_workdir` (see the module docstring).

    Args:
        config: The upsampler's config (task='super_resolution').
        workdir: The upsampler's run directory.
        mesh: Default: all devices.

    Returns:
        {'step', 'num_images', 'npz', 'png'} (the upsampled images), and for a
        cascade also 'base_npz', 'base_png', 'base_step', 'base_workdir'; paths are
        None on processes other than 0.

    Raises:
        ValueError: Bad settings or images of the wrong size (before compiling).
        FileNotFoundError: A missing file or checkpoint.
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    config_lib.validate(config, mode='sample', num_devices=parallel.num_mesh_devices(mesh))
    _check_task(config, 'upsample_and_save', 'sample_mode.sample_and_save')
    workdir_lib.require_existing(workdir)
    plan = _Plan(config, workdir, mesh)
    s, base, upsampler = config.sample, plan.base, plan.upsampler
    is_main = jax.process_index() == 0
    size, low_size = config.data.image_size, config.model.low_res_size
    logger.info('Upsampling %d images %dx%d -> %dx%d from %s with step %d in %d batches of %d '
                '(%s%s).', plan.num_images, low_size, low_size, size, size, plan.source(),
                upsampler.step, plan.num_batches, s.global_batch_size, s.sampler,
                f', respacing {s.respacing}' if s.respacing else '')
    batches, log = _progress(plan.num_batches, is_main)
    collected, collected_low = [], []
    for b, (count, low_u8, high_u8) in enumerate(plan.batches(batches)):
        if low_u8 is not None:
            collected_low.append(low_u8)
        if is_main:
            collected.append(high_u8[:count])
        log(b)

    labels = plan.labels
    result = {'step': int(upsampler.step), 'num_images': int(plan.num_images), 'npz': None,
              'png': None}
    if base is not None:
        result.update(base_workdir=s.base_workdir, base_step=int(base.step), base_npz=None,
                      base_png=None)
    if is_main:
        directory = epath.Path(workdir) / 'samples'
        high = np.concatenate(collected)
        if base is None:
            stem = workdir_lib.unique_stem(directory, f'samples_{upsampler.step}',
                                           ('.npz', '.png')).name
            result['npz'], result['png'] = _save(directory, stem, high, labels, size)
        else:
            suffixes = tuple(f'_{n}{ext}' for n in (low_size, size) for ext in ('.npz', '.png'))
            stem = workdir_lib.unique_stem(directory, f'cascade_{upsampler.step}', suffixes).name
            result['base_npz'], result['base_png'] = _save(
                directory, f'{stem}_{low_size}', np.concatenate(collected_low), labels,
                low_size)
            result['npz'], result['png'] = _save(directory, f'{stem}_{size}', high, labels,
                                                 size)
            logger.info('Wrote %s and %s.', result['base_npz'], result['base_png'])
        logger.info('Wrote %s and %s.', result['npz'], result['png'])
    workdir_lib.append_run_record(workdir, 'sample', config, result)
    return result


def _check_task(config: ml_collections.ConfigDict, name: str, other: str) -> None:
    if config.task != super_resolution.SuperResolutionTask.name:
        raise ValueError(f"{name} runs task='super_resolution', got task={config.task!r}; "
                         f'use {other}.')


def evaluate_upsampler(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """`--mode=fid` of an upsampler (main.py's entry for task='super_resolution').

    With `sample.base_workdir` set it scores a cascade: `eval.fid_num_samples` images
    sampled by that base model and upsampled, in batches of `eval.fid_batch_size`
    (exactly the images of `--mode=sample` with those as `sample.num_images` and
    `sample.global_batch_size`), against the reference statistics, with
    'label_accuracy' against the base's labels when they have any. Otherwise it is
    `sample_quality.evaluate_samples`: the eval split upsampled (with PSNR), or
    `eval.fid_samples`.

    Args:
        config: The upsampler's config.
        workdir: The upsampler's run directory; `metrics_<step>.json` goes there.
        mesh: Default: all devices.

    Returns:
        The metrics dict of `sample_quality.evaluate_samples`.

    Raises:
        ValueError: Bad settings (before compiling).
        FileNotFoundError: A missing file or checkpoint.
    """
    if not config.sample.base_workdir or config.eval.fid_samples:
        return sample_quality.evaluate_samples(config, workdir, mesh=mesh)
    mesh = parallel.create_mesh() if mesh is None else mesh
    num_devices = parallel.num_mesh_devices(mesh)
    config_lib.validate(config, mode='fid', num_devices=num_devices)
    _check_task(config, 'evaluate_upsampler', 'sample_quality.evaluate_samples')
    workdir_lib.require_existing(workdir)
    e = config.eval
    cascade_config = ml_collections.ConfigDict(config.to_dict())
    cascade_config.sample.num_images = e.fid_num_samples
    cascade_config.sample.global_batch_size = e.fid_batch_size
    cascade_config.sample.classifier_scale = 0.0  # As sample_quality's own fid sampling.
    plan = _Plan(cascade_config, workdir, mesh)
    extractor = sample_quality.FeatureExtractor(config, mesh)
    reference = sample_quality.reference_statistics(config, extractor, workdir)
    logger.info('Scoring %d images of a cascade: %s, upsampled by step %d (%s).',
                plan.num_images, plan.source(), plan.upsampler.step, config.sample.sampler)
    batches, log = _progress(plan.num_batches, jax.process_index() == 0)
    accumulator = sample_quality.FeatureAccumulator()
    for b, (count, _, high_u8) in enumerate(plan.batches(batches)):
        features = extractor(parallel.shard_host_array(high_u8, mesh))
        accumulator.update(features, np.arange(len(high_u8)) < count)
        log(b)
    result = sample_quality.score(accumulator.result(), reference, labels=plan.labels,
                                  **sample_quality.scoring_options(config))
    step = int(plan.upsampler.step)
    result.update(step=step, network=e.metrics_network,
                  samples=f'step {step}, cascade from {config.sample.base_workdir} '
                          f'(step {plan.base.step})')
    return sample_quality.write_metrics(config, workdir, result)
