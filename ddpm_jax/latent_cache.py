"""Latent caching for latent diffusion (`latent.cache='autoencoder_workdir'`).

This module owns the cache of a frozen autoencoder's posterior over a training split
and the training stream that reads it instead of images:

* `ensure_cache(config)` returns the directory of a valid cache, encoding the split
  once if there is none: the images of `data.split` in dataset order, in global
  batches of `train.global_batch_size` sharded over the mesh (each process reads its
  rows, as the eval pipeline does), through the jitted encoder. It stores what a
  fresh latent needs per step: the KL posterior's mean and log-variance (a VQ
  latent: the encoder output before quantisation, the same input the uncached step
  uses), float32, plus the labels; with `data.random_flip` the mirrored image's
  too (the stream then picks one per example with the image pipeline's flip draw).
* The cache lives in `<latent.autoencoder_workdir>/latent_cache/<name>/`, `name`
  naming the autoencoder's checkpoint step and the data (dataset, split, size,
  channels, crop, flips), so every denoiser trained on that first stage (and every
  resume) shares it. `header.json` records all of that plus a SHA-256 fingerprint
  of the autoencoder's parameters; a cache whose header differs from this run's is
  refused with one line, never overwritten or used.
* Writes are atomic: process 0 writes `mean.npy`, `logvar.npy`, `label.npy` and
  last `header.json` into a fresh `<name>.tmp-<random>/` directory, flushes them
  and renames it to `<name>`. A crash leaves only a temporary directory, which is
  never read; a concurrent writer that renames first wins and ours is discarded.
* `create_train_iterator(config)` is `data.create_train_iterator`'s stream over the
  cache (`data.create_records_train_iterator`): the same shard per process, the same
  shuffle and flip draws, the same checkpointable iterator state. Its local batches
  are {'mean', 'logvar' (KL only): float32 [L, h, w, z], 'label': int32 [L]};
  `LatentDiffusionTask.prepare_batch` draws z = mean + exp(logvar / 2) eps from
  them with the same eps as the uncached step.
"""

import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ddpm_jax import data as data_lib
from ddpm_jax import parallel
from ddpm_jax.models import autoencoder as ae_lib
from ddpm_jax.tasks import latent_diffusion

logger = logging.getLogger('ddpm_jax')

CACHE_SUBDIR = 'latent_cache'
FORMAT_VERSION = 1
HEADER_FILE = 'header.json'
# Fraction of the split between two progress lines while encoding.
_LOG_FRACTION = 0.1


def cache_root(config: ml_collections.ConfigDict) -> str:
    """The directory holding the caches of `latent.autoencoder_workdir`."""
    return os.path.join(os.path.abspath(config.latent.autoencoder_workdir), CACHE_SUBDIR)


def params_fingerprint(params: Any) -> str:
    """SHA-256 (hex) of a parameter tree: every leaf's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                             key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f'{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};'.encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def _slug(text: str) -> str:
    return ''.join(c if c.isalnum() or c in '_.' else '-' for c in str(text))


def expected_header(config: ml_collections.ConfigDict, step: int, ae_config, ae_params,
                    num_examples: int) -> dict[str, Any]:
    """What a cache for this run must record (compared field by field on reuse)."""
    d = config.data
    factor = ae_lib.downsampling_factor(ae_config.autoencoder.channel_mult)
    side = d.image_size // factor
    return {
        'format': FORMAT_VERSION,
        'autoencoder_step': int(step),
        'autoencoder_fingerprint': params_fingerprint(ae_params),
        'autoencoder_kind': ae_config.autoencoder.kind,
        'dataset': d.dataset, 'split': d.split, 'image_size': d.image_size,
        'channels': d.channels, 'center_crop': bool(d.center_crop),
        'random_flip': bool(d.random_flip),
        'num_examples': int(num_examples),
        'latent_shape': [side, side, ae_config.autoencoder.z_channels],
    }


def cache_name(header: Mapping[str, Any]) -> str:
    """The cache's directory name: the checkpoint step and the data it encodes."""
    h = header
    flip = '_flip' if h['random_flip'] else ''
    crop = '_crop' if h['center_crop'] else ''
    return (f"step{h['autoencoder_step']}_{_slug(h['dataset'])}_{_slug(h['split'])}_"
            f"{h['image_size']}x{h['image_size']}x{h['channels']}{crop}{flip}")


def _arrays(kind: str) -> tuple[str, ...]:
    return ('mean', 'logvar', 'label') if kind == 'kl' else ('mean', 'label')


def check_cache(path: str, expected: Mapping[str, Any]) -> None:
    """Refuses a cache written for another autoencoder, checkpoint or dataset.

    Raises:
        ValueError: One line naming `latent.cache`, the path and the differing fields.
    """
    with open(os.path.join(path, HEADER_FILE)) as f:
        header = json.load(f)
    diffs = [f'{k}: cache={header.get(k)!r}, run={v!r}' for k, v in expected.items()
             if header.get(k) != v]
    if diffs:
        raise ValueError(f'latent.cache: {path} holds the latents of another autoencoder or '
                         f'dataset ({"; ".join(diffs)}); delete it to re-encode.')


class LatentRecords:
    """Random access to a cache: record i is {'mean', 'logvar' (KL), 'label'}, each
    [2, h, w, z] (unflipped, flipped) when the cache holds both orientations.

    The arrays are memory-mapped on first access, in each process that reads them
    (grain's worker processes receive only the path)."""

    def __init__(self, path: str, names: tuple[str, ...], num_examples: int):
        self.path = path
        self._names = names
        self._num_examples = num_examples
        self._arrays = None

    def __getstate__(self):
        return {**self.__dict__, '_arrays': None}

    def arrays(self) -> dict[str, np.ndarray]:
        """The cache's arrays (memory-mapped), by name."""
        if self._arrays is None:
            self._arrays = {name: np.load(os.path.join(self.path, f'{name}.npy'), mmap_mode='r')
                            for name in self._names}
        return self._arrays

    def __len__(self) -> int:
        return self._num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {name: np.asarray(a[int(index)]) for name, a in self.arrays().items()}


def _pick_orientation(example: dict[str, np.ndarray], rng: np.random.Generator
                      ) -> dict[str, np.ndarray]:
    """The cached twin of `data._random_flip`: the same draw picks the mirrored latents."""
    flipped = int(rng.random() < 0.5)
    return {name: (value if name == 'label' else value[flipped])
            for name, value in example.items()}


def _encode_split(config, ae_config, ae_params, header, tmp_path: str,
                  mesh: jax.sharding.Mesh) -> None:
    """Encodes `data.split` into `tmp_path` (process 0 writes; all processes encode)."""
    num_examples = header['num_examples']
    batch_size = config.train.global_batch_size
    source_config = ml_collections.ConfigDict(config.to_dict())
    source_config.data.eval_split = config.data.split
    source_config.eval.num_images = num_examples
    source_config.eval.global_batch_size = batch_size
    task = latent_diffusion.LatentDiffusionTask(config, autoencoder=(ae_config, ae_params))
    flips = header['random_flip']

    @functools.partial(jax.jit, compiler_options=parallel.compiler_options())
    def encode(images):  # [B, H, W, C] -> {name: [B, (2,) h, w, z]}
        moments = task.posterior(images)
        if not flips:
            return moments
        mirrored = task.posterior(images[:, :, ::-1])
        return {k: jnp.stack([v, mirrored[k]], axis=1) for k, v in moments.items()}

    names = _arrays(header['autoencoder_kind'])
    writer = jax.process_index() == 0
    outputs = {}
    if writer:
        os.makedirs(tmp_path)
        moment_shape = (num_examples,) + ((2,) if flips else ()) + tuple(header['latent_shape'])
        for name in names:
            shape, dtype = ((num_examples,), np.int32) if name == 'label' else (moment_shape,
                                                                               np.float32)
            outputs[name] = np.lib.format.open_memmap(os.path.join(tmp_path, f'{name}.npy'),
                                                      mode='w+', dtype=dtype, shape=shape)
    start, done, next_log = time.perf_counter(), 0, _LOG_FRACTION * num_examples
    logger.info('Latent cache: encoding %d images of %s/%s into %s.', num_examples,
                config.data.dataset, config.data.split, os.path.dirname(tmp_path))
    for batch in data_lib.create_eval_iterator(source_config):
        global_batch = parallel.to_global(batch, mesh)
        moments = encode(global_batch['image'])
        host = {name: parallel.gather(value) for name, value in moments.items()}
        labels, mask = parallel.gather(global_batch['label']), parallel.gather(
            global_batch['mask'])
        rows = int(mask.sum())  # Padding rows come last, in the last batch only.
        if writer:
            for name in names:
                value = labels if name == 'label' else host[name]
                outputs[name][done:done + rows] = value[:rows]
        done += rows
        if done >= next_log or done == num_examples:
            elapsed = time.perf_counter() - start
            logger.info('Latent cache: encoded %d/%d images (%.0f%%, %.0f images/s).', done,
                        num_examples, 100 * done / num_examples, done / max(elapsed, 1e-9))
            next_log += _LOG_FRACTION * num_examples
    if done != num_examples:
        raise RuntimeError(f'latent cache: encoded {done} images, expected {num_examples}.')
    if writer:
        for array in outputs.values():
            array.flush()
        outputs.clear()  # Closes the memory maps.
        for name in names:
            with open(os.path.join(tmp_path, f'{name}.npy'), 'rb+') as f:
                os.fsync(f.fileno())
        with open(os.path.join(tmp_path, HEADER_FILE), 'w') as f:
            json.dump(header, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def ensure_cache(config: ml_collections.ConfigDict, *,
                 mesh: jax.sharding.Mesh | None = None) -> tuple[str, dict[str, Any]]:
    """The directory of the cache of this run's autoencoder and data, built if absent.

    All processes call it (encoding is a collective); process 0 writes.

    Args:
        config: The run's config (`task='latent_diffusion'`).
        mesh: The mesh to encode on; default all devices.

    Returns:
        (its directory, its header).

    Raises:
        ValueError: A cache of the same name written for another autoencoder (e.g. one
            retrained in the same workdir) or other data; or no autoencoder
            checkpoint (naming `latent.autoencoder_workdir`).
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    workdir = config.latent.autoencoder_workdir
    step = latent_diffusion.newest_autoencoder_step(workdir)
    ae_config, ae_params = latent_diffusion.load_autoencoder(workdir, step)
    num_examples = data_lib.dataset_info(config)['num_examples']
    header = expected_header(config, step, ae_config, ae_params, num_examples)
    root = cache_root(config)
    path = os.path.join(root, cache_name(header))
    if parallel.any_process(not os.path.exists(os.path.join(path, HEADER_FILE))):
        tmp_path = f'{path}.tmp-{uuid.uuid4().hex[:12]}'
        if jax.process_index() == 0:
            os.makedirs(root, exist_ok=True)
        try:
            _encode_split(config, ae_config, ae_params, header, tmp_path, mesh)
            if jax.process_index() == 0:
                try:
                    os.rename(tmp_path, path)
                    logger.info('Latent cache: wrote %s.', path)
                except OSError:  # Another run renamed its cache there first: use that.
                    if not os.path.exists(os.path.join(path, HEADER_FILE)):
                        raise
        finally:
            if jax.process_index() == 0 and os.path.exists(tmp_path):
                shutil.rmtree(tmp_path, ignore_errors=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices('latent_cache_written')
    else:
        logger.info('Latent cache: reusing %s.', path)
    check_cache(path, header)
    return path, header


def create_train_iterator(config: ml_collections.ConfigDict, *,
                          process_index: int | None = None,
                          process_count: int | None = None):
    """The training iterator over the cached latents (built first if absent).

    Same order, shard and flip draws as `data.create_train_iterator` over the images;
    local batches {'mean', 'logvar' (KL only): float32 [L, h, w, z], 'label': int32 [L]}.

    Raises:
        ValueError: As `ensure_cache`.
    """
    path, header = ensure_cache(config)
    records = LatentRecords(path, _arrays(header['autoencoder_kind']), header['num_examples'])
    return data_lib.create_records_train_iterator(
        config, records, None, flip=_pick_orientation if header['random_flip'] else None,
        process_index=process_index, process_count=process_count)
