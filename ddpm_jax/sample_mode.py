"""`--mode=sample`: images from a workdir's latest checkpoint, written to files.

Restores the EMA parameters (and, for classifier guidance, the classifier of
`sample.classifier_workdir`), generates `sample.num_images` images in batches of
`sample.global_batch_size` over every device and process with the compiled
sampler of `tasks.diffusion.make_sample_fn`, and writes them from process 0.
"""

import logging
import sys
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import checkpointing
from ddpm_jax import config_lib
from ddpm_jax import images as images_lib
from ddpm_jax import parallel
from ddpm_jax import tasks
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.models import create_model
from ddpm_jax.tasks import diffusion as diffusion_task

logger = logging.getLogger('ddpm_jax')

__all__ = ['restore_classifier', 'make_labels', 'sample_and_save']

# The PNG written by --mode=sample shows at most this many of the samples.
MAX_GRID_IMAGES = 256


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
        ValueError: A checkpoint that is not a classifier or does not match the
            denoiser's timesteps / image shape.
        FileNotFoundError: No checkpoint in `sample.classifier_workdir`.
    """
    workdir = config.sample.classifier_workdir
    directory = checkpointing.checkpoint_dir(workdir)
    if not directory.exists():
        raise FileNotFoundError(f'sample.classifier_workdir={workdir!r} has no checkpoints '
                                f'({directory} does not exist); train a classifier there '
                                'first.')
    try:
        classifier_config = checkpointing.load_config(workdir, schema=config)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'sample.classifier_workdir={workdir!r}: {e}') from e
    c = classifier_config
    if c.task != 'classifier':
        raise ValueError(f'sample.classifier_workdir={workdir!r} holds a task={c.task!r} '
                         'checkpoint, not a classifier.')
    for field in ('diffusion.num_timesteps', 'diffusion.schedule', 'diffusion.beta_start',
                  'diffusion.beta_end', 'data.image_size', 'data.channels'):
        group, name = field.split('.')
        if c[group][name] != config[group][name]:
            raise ValueError(f'The classifier in sample.classifier_workdir={workdir!r} has '
                             f'{field}={c[group][name]!r} but the model has '
                             f'{config[group][name]!r}.')
    classifier = create_model(classifier_config)
    _, params, _ = checkpointing.restore_for_inference(classifier_config, workdir, mesh)
    return classifier, params['model']


def make_labels(config: ml_collections.ConfigDict, num_classes: int, num: int) -> np.ndarray:
    """Labels for `--mode=sample`: `sample.label`, or uniform over classes when -1.

    The same on every process (seeded by `config.seed`).

    Args:
        config: The run's config (validated).
        num_classes: Classes to draw from (0: unconditional, labels are all -1).
        num: How many.

    Returns:
        int32 [num]; -1 marks "no label" (unconditional sampling).

    Raises:
        ValueError: `sample.label` is not a class of the guiding classifier.
    """
    label = config.sample.label
    if num_classes <= 0:
        return np.full((num,), -1, np.int32)
    if label == -1:
        rng = np.random.default_rng([config.seed, config_lib.DATA_SEED_SALTS['sample_labels']])
        return rng.integers(0, num_classes, size=num).astype(np.int32)
    if not 0 <= label < num_classes:
        raise ValueError(f'sample.label={label} must be -1 or in [0, {num_classes}).')
    return np.full((num,), label, np.int32)


def sample_and_save(config: ml_collections.ConfigDict, workdir: str, *,
                    mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """`--mode=sample`: writes `sample.num_images` EMA samples of the latest checkpoint.

    Images are generated in batches of `sample.global_batch_size` over all devices
    and processes; every process takes part in each batch and in gathering it, and
    process 0 writes `<workdir>/samples/samples_<step>.npz` ('images' uint8
    [N, H, W, C], 'labels' int32 [N], -1 for unconditional samples) and
    `<workdir>/samples/samples_<step>.png` (a grid of the first 256 at most); if
    either exists, `samples_<step>_1.*`, `_2`, ... (nothing is overwritten). The run
    is recorded in `<workdir>/runs.jsonl`.
    Batch b uses the key fold_in(rng_for(config, 'sample'), b).

    Args:
        config: The run's config (as trained, plus the `sample` group).
        workdir: Run directory holding `checkpoints/`.
        mesh: Default: all devices.

    Returns:
        {'step': int, 'npz': path, 'png': path, 'num_images': int, 'nfe': float (the
        sampler's model evaluations, the mean over batches)}; the paths are
        None on processes other than 0.

    Raises:
        ValueError: Bad `sample` fields, or a batch not divisible by the device count.
        FileNotFoundError: No checkpoint in `workdir` (or the classifier's workdir).
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    config_lib.validate(config, mode='sample', num_devices=parallel.num_mesh_devices(mesh))
    if config.model.low_res_size > 0:
        raise ValueError(f'model.low_res_size={config.model.low_res_size}: an upsampler samples '
                         'from low-resolution images; use upsampling.upsample_and_save '
                         '(main.py does for task=\'super_resolution\').')
    workdir_lib.require_existing(workdir)
    s = config.sample
    classifier, classifier_params = None, None
    if s.classifier_scale > 0:
        classifier, classifier_params = restore_classifier(config, mesh)
    model = create_model(config)
    # Fails on a classifier of other classes before the (large) denoiser is restored.
    sample_fn = tasks.make_sample_fn(config, model, classifier=classifier, mesh=mesh)
    step, _, ema_params, task_state = checkpointing.restore_for_inference(
        config, workdir, mesh, with_task_state=True)
    sample_params = ema_params[tasks.TASKS[config.task].sample_part]

    num_classes = diffusion_task.label_classes(config, classifier)
    labels = make_labels(config, num_classes, s.num_images)
    batch_size = s.global_batch_size
    num_batches = -(-s.num_images // batch_size)
    base_rng = config_lib.rng_for(config, 'sample')
    is_main = jax.process_index() == 0
    logger.info('Sampling %d images from step %d in %d batches of %d (%s%s).', s.num_images,
                step, num_batches, batch_size, s.sampler,
                f', respacing {s.respacing}' if s.respacing else '')
    batches = range(num_batches)
    if is_main and sys.stdout.isatty():
        import tqdm
        batches = tqdm.tqdm(batches, desc='sampling', unit='batch')
    collected, nfes = [], []
    for b in batches:
        batch_labels = np.zeros((batch_size,), np.int32)
        chunk = labels[b * batch_size:(b + 1) * batch_size]
        batch_labels[:len(chunk)] = np.maximum(chunk, 0)  # -1 (no label) feeds nothing.
        out, nfe = sample_fn(sample_params, jax.random.fold_in(base_rng, b), batch_labels,
                             classifier_params, task_state=task_state, return_nfe=True)
        nfes.append(int(nfe))  # Model evaluations (adaptive solvers: per batch).
        host = parallel.gather(out)[:len(chunk)]
        if is_main:
            collected.append(images_lib.to_uint8(host, s.quantize))
            if not sys.stdout.isatty():
                logger.info('Sampled batch %d/%d.', b + 1, num_batches)

    npz_path = png_path = None
    if is_main:
        stem = workdir_lib.unique_stem(epath.Path(workdir) / 'samples', f'samples_{step}',
                                       ('.npz', '.png'))
        npz_path, png_path = f'{stem}.npz', f'{stem}.png'
        all_images = np.concatenate(collected, axis=0)
        images_lib.save_npz(npz_path, images=all_images, labels=labels)
        shown = all_images[:MAX_GRID_IMAGES]
        ncols = images_lib.grid_columns(len(shown))
        grid = images_lib.make_grid(shown, ncols,
                                    scale=images_lib.upscale_factor(config.data.image_size))
        images_lib.save_png(png_path, grid)
        logger.info('Wrote %s and %s.', npz_path, png_path)
    result = {'step': int(step), 'npz': npz_path, 'png': png_path,
              'num_images': int(s.num_images), 'nfe': float(np.mean(nfes))}
    logger.info('%s used %.1f model evaluations (NFE) per image on average.', s.sampler,
                result['nfe'])
    workdir_lib.append_run_record(workdir, 'sample', config, result)
    return result
