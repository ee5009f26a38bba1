"""Sample quality: FID, sFID, Inception Score, precision and recall, in JAX.

This module owns measuring a model's samples the way the papers do:

* A feature network (`eval.metrics_network`): 'inception' is the FID Inception-v3
  (`models.inception`, weights from the user's pytorch-fid file); 'digits' is the
  small network trained on the bundled digits (`models.digits_net`), which needs
  no download. `FeatureExtractor` runs it jitted over the `('data',)` mesh: the
  images stay sharded on the devices, only the features are gathered.
* `FeatureAccumulator` streams features into float64 statistics (`metrics`), and
  keeps the pooled features (for precision/recall) and logits (for IS); no image
  is ever held on one host.
* Reference statistics: computed once from a data split (or read from an `.npz`:
  one written here, or an ADM evaluator reference batch with `arr_0` images and
  optional `mu`/`sigma`/`mu_s`/`sigma_s`), cached in the workdir.
* `evaluate_samples` (`--mode=fid`) scores a workdir's latest EMA parameters, or a
  samples `.npz` (`eval.fid_samples`), writes `metrics_<step>.json` and logs to
  TensorBoard; `make_training_fid_fn` gives the trainer its periodic FID. Every input
  (the samples file, the reference file or split, the checkpoint) is checked before the
  feature network is built or a reference cached (`open_samples_npz`,
  `check_reference`), each refusal one line naming its config field and file. An
  upsampler (task='super_resolution') is scored on the eval split's images, upsampled
  from their area-downsampled versions, with their PSNR to the originals.
"""

import functools
import json
import logging
import os
import sys
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ddpm_jax import checkpointing
from ddpm_jax import config_lib
from ddpm_jax import data as data_lib
from ddpm_jax import images as images_lib
from ddpm_jax import metrics
from ddpm_jax import parallel
from ddpm_jax import sample_mode
from ddpm_jax import tasks
from ddpm_jax import workdir as workdir_lib
from ddpm_jax import writers
from ddpm_jax.models import create_model
from ddpm_jax.models import digits_net
from ddpm_jax.models import inception
from ddpm_jax.models import layers
from ddpm_jax.tasks import diffusion as diffusion_task
from ddpm_jax.tasks import super_resolution

logger = logging.getLogger('ddpm_jax')

def quantize_to_uint8(x: jax.Array, mode: str) -> jax.Array:
    """`images.to_uint8` in jit: float [-1, 1] -> uint8 by 'round' or 'truncate'."""
    x = (jnp.asarray(x, jnp.float32) + 1.0) * 127.5
    if mode == 'round':
        x = jnp.round(x)
    elif mode != 'truncate':
        raise ValueError(f'quantize mode must be one of {images_lib.QUANTIZE_MODES}, '
                         f'got {mode!r}')
    return jnp.floor(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint8)


class FeatureExtractor:
    """The feature network of `eval.metrics_network`, jitted over the mesh.

    Calling it with a batch-sharded global image array (uint8 [B, H, W, C], or
    float in [-1, 1] with `quantize` = 'round' or 'truncate', quantised on the devices
    as `images.to_uint8(x, quantize)` does: data 'round', samples `sample.quantize`)
    returns numpy features on every process: 'features'
    [B, D] (Inception pool3), 'spatial' [B, S] (sFID; Inception only), 'logits'
    [B, K] (for IS) and, where the network's classes are the data's
    (`predicts_labels`: the digits network always, Inception for a TFDS ImageNet
    dataset, whose labels it predicts in TFDS's order), 'predicted_label' [B] (for
    label accuracy).

    Raises:
        FileNotFoundError: The Inception weights are missing (one line saying which
            file and where it is published).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.name = config.eval.metrics_network
        self.mesh = mesh
        # The features an ADM evaluator reference batch's stored statistics are of.
        self.input_pipeline = config.eval.inception_input
        self.computes_adm_features = (self.name == 'inception'
                                      and self.input_pipeline == 'tf')
        self.predicts_labels = (self.name != 'inception'
                                or config.data.dataset.startswith('imagenet'))
        if self.name == 'inception':
            variables = inception.load_inception_variables(config.eval.inception_path)
            model = inception.InceptionV3(input_pipeline=config.eval.inception_input)

            def network(v, images):
                out = model.apply(v, images)
                spatial = out['spatial'].reshape(out['spatial'].shape[0], -1)
                # IS uses the TF graph's softmax(pool3 @ W), without the bias; the
                # predicted class is the graph's own (with the bias), renumbered.
                return {'features': out['pool3'], 'spatial': spatial,
                        'logits': out['logits_unbiased'],
                        'label_logits': inception.imagenet_class_logits(out['logits'])}
        else:
            variables = digits_net.load_or_train()
            model = digits_net.DigitsNet()

            def network(v, images):
                # Larger digits (e.g. the 16x16 of latent diffusion) are block-averaged
                # to the network's 8x8.
                b, size = images.shape[0], images.shape[1]
                k = size // 8
                if k > 1:
                    images = jnp.asarray(images, jnp.float32).reshape(
                        b, 8, k, 8, k, images.shape[-1]).mean(axis=(2, 4))
                out = model.apply(v, images)
                return dict(out, label_logits=out['logits'])

        def apply(v, images, quantize):
            if quantize is not None:
                images = quantize_to_uint8(images, quantize)
            out = network(v, images)
            label_logits = out.pop('label_logits')  # The dataset's classes, in its order.
            if self.predicts_labels:
                out['predicted_label'] = jnp.argmax(label_logits, -1)
            return out

        replicated = parallel.replicated_sharding(mesh)
        self._variables = jax.device_put(variables, replicated)
        self._apply = jax.jit(apply, static_argnums=2,
                              in_shardings=(replicated, parallel.batch_sharding(mesh)),
                              out_shardings=parallel.batch_sharding(mesh),
                              compiler_options=parallel.compiler_options())

    def __call__(self, images: jax.Array, *, quantize: str | None = None
                 ) -> dict[str, np.ndarray]:
        out = self._apply(self._variables, images, quantize)
        return {k: parallel.gather(v) for k, v in out.items()}


class FeatureAccumulator:
    """Streams feature batches into statistics; keeps pooled features and logits."""

    def __init__(self, keep_features: bool = True):
        self.stats: dict[str, metrics.FeatureStats] = {}
        self.kept: dict[str, list[np.ndarray]] = {
            'features': [], 'logits': [], 'predicted_label': []}
        self.keep_features = keep_features
        self.count = 0

    def update(self, features: Mapping[str, np.ndarray], mask: np.ndarray | None = None
               ) -> None:
        """Adds a batch; rows with `mask` False (padding) are dropped."""
        rows = slice(None) if mask is None else np.asarray(mask, bool)
        for key in ('features', 'spatial'):
            if key in features:
                value = np.asarray(features[key], np.float64)[rows]
                if key not in self.stats:
                    self.stats[key] = metrics.init_stats(value.shape[-1])
                self.stats[key] = metrics.update_stats(self.stats[key], value)
        self.kept['logits'].append(np.asarray(features['logits'], np.float32)[rows])
        if 'predicted_label' in features:
            self.kept['predicted_label'].append(
                np.asarray(features['predicted_label'], np.int32)[rows])
        if self.keep_features:
            self.kept['features'].append(np.asarray(features['features'], np.float32)[rows])
        self.count += len(np.asarray(features['logits'])[rows])

    def result(self) -> dict[str, np.ndarray]:
        """{'mu', 'sigma', ['mu_s', 'sigma_s'], 'logits', ['features'],
        ['predicted_label']} as numpy."""
        out = {}
        for key, prefix in (('features', ''), ('spatial', '_s')):
            if key in self.stats:
                metrics.check_enough_samples(self.count, self.stats[key].mean.shape[0], key)
                out[f'mu{prefix}'], out[f'sigma{prefix}'] = metrics.finalize_stats(
                    self.stats[key])
        out['logits'] = np.concatenate(self.kept['logits'])
        if self.kept['predicted_label']:
            out['predicted_label'] = np.concatenate(self.kept['predicted_label'])
        if self.kept['features']:
            out['features'] = np.concatenate(self.kept['features'])
        return out


def scoring_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`score`'s keyword arguments from `config.eval` (`is_split_size`, and the
    distances of precision and recall: `precision_recall_distances`, whose 'auto' is
    the reference code's float16 for Inception features and float32 for the digits
    network's, with which the README's digits tables were measured)."""
    e = config.eval
    distances = e.precision_recall_distances
    if distances == 'auto':
        distances = 'float16' if e.metrics_network == 'inception' else 'float32'
    return {'is_split_size': e.is_split_size, 'precision_recall_dtype': np.dtype(distances),
            'precision_recall_reference_images': e.precision_recall_reference_images}


def score(samples: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *,
          labels: np.ndarray | None = None, is_split_size: int = 0,
          precision_recall_dtype: Any = np.float16,
          precision_recall_reference_images: int = 0) -> dict[str, float]:
    """The metrics of sample statistics against reference statistics.

    `is_split_size` > 0 cuts the samples into chunks of that many for the Inception
    Score, as the ADM evaluator (5,000); 0 into 10 equal splits (Salimans et al.).
    `precision_recall_dtype` is `metrics.precision_recall`'s `dtype` (float16: the
    reference code's distances); `precision_recall_reference_images` > 0 takes the
    reference's first that many features for it (the ADM evaluator's reference batches
    hold 10,000 images, while their FID statistics come from more: more reference
    features make smaller k-NN balls), 0 all.

    Returns:
        'fid' always; 'sfid' with spatial statistics on both sides;
        'inception_score' and 'inception_score_std' (over the splits); 'precision' and
        'recall' (k=3) when both sides kept their features; 'label_accuracy' (the
        fraction of samples whose 'predicted_label' is the requested class) when
        `labels` (>= 0: the requested class) are given and `samples` has
        'predicted_label' (the feature network's classes are the model's).
    """
    result = {'fid': metrics.frechet_distance(samples['mu'], samples['sigma'],
                                              reference['mu'], reference['sigma'])}
    if 'mu_s' in samples and 'mu_s' in reference:
        result['sfid'] = metrics.frechet_distance(samples['mu_s'], samples['sigma_s'],
                                                  reference['mu_s'], reference['sigma_s'])
    logits = samples['logits']
    result['inception_score'], result['inception_score_std'] = metrics.inception_score(
        logits, num_splits=min(10, len(logits)), split_size=is_split_size or None)
    if 'features' in samples and 'features' in reference:
        real = reference['features'][:precision_recall_reference_images or None]
        result['precision'], result['recall'] = metrics.precision_recall(
            real, samples['features'], dtype=precision_recall_dtype)
    if labels is not None and np.any(labels >= 0) and 'predicted_label' in samples:
        chosen = labels >= 0
        result['label_accuracy'] = float(np.mean(
            samples['predicted_label'][chosen] == labels[chosen]))
    result['num_samples'] = int(len(logits))
    return {k: float(v) if k != 'num_samples' else v for k, v in result.items()}


# --- reference statistics ------------------------------------------------------------------


def _features_of_images(extractor: FeatureExtractor, images: np.ndarray, batch_size: int,
                        accumulator: FeatureAccumulator) -> None:
    """Streams uint8 images (an array or a memory map) through `extractor`; each
    process reads only the rows of its own devices, batch by batch."""
    num_devices = parallel.num_mesh_devices(extractor.mesh)
    for start in range(0, len(images), batch_size):
        count = min(batch_size, len(images) - start)
        padded = -(-count // num_devices) * num_devices

        def read_rows(lo, hi, start=start, count=count):
            out = np.zeros((hi - lo,) + images.shape[1:], np.uint8)  # Padding rows: 0.
            real = max(0, min(hi, count) - lo)
            out[:real] = images[start + lo:start + lo + real]
            return out

        features = extractor(parallel.shard_rows(read_rows, padded, extractor.mesh))
        accumulator.update(features, np.arange(padded) < count)


def open_npz_array(path: str, key: str) -> np.ndarray:
    """One array of an `.npz`, memory-mapped when stored uncompressed (`np.savez`),
    so reading a batch of rows reads only those bytes; loaded otherwise."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f'{key}.npy')
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as f:
                return np.lib.format.read_array(f)
    with open(path, 'rb') as f:
        f.seek(info.header_offset)
        local = f.read(30)  # The zip local file header: its name and extra lengths.
        name_length = int.from_bytes(local[26:28], 'little')
        extra_length = int.from_bytes(local[28:30], 'little')
        f.seek(info.header_offset + 30 + name_length + extra_length)
        major, _ = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran:
        raise ValueError(f'{path}: {key} is stored in Fortran order; save it C-ordered.')
    if dtype.hasobject:  # Pickled Python objects: never mapped or unpickled.
        raise ValueError(f'{path}: {key} is an object array (pickled data); save numbers.')
    return np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape)


# What reading a damaged, foreign or pickled `.npz` raises (np.load never unpickles here).
_NPZ_ERRORS = (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile)


def _read_npz(field: str, path: str, read: Callable[[Any], Any]) -> Any:
    """`read(archive)` of the `.npz` that config `field` names, np.load's and zipfile's
    errors (a text file, a truncated file, pickled objects) turned into one line naming
    the field and the file. `read` must only read (its own ValueErrors would be
    reported as an unreadable file).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a readable `.npz` of arrays.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f'{field}={path!r} does not exist.')
    try:
        with open(path, 'rb') as f:
            magic = f.read(6)
        if magic == b'\x93NUMPY':
            raise ValueError('it is a single .npy array; save an .npz with np.savez')
        if not magic.startswith(b'PK'):  # np.load would take it for a pickle.
            raise ValueError('it is not an .npz archive (the zip file np.savez writes)')
        with np.load(path) as archive:  # allow_pickle=False: object arrays are refused.
            return read(archive)
    except _NPZ_ERRORS as e:
        raise _unreadable(field, path, e) from None


def _open_images(field: str, path: str, key: str) -> np.ndarray:
    """`open_npz_array(path, key)`, its errors named as `_read_npz`'s."""
    try:
        return open_npz_array(path, key)
    except _NPZ_ERRORS as e:
        raise _unreadable(field, path, e) from None


def _unreadable(field: str, path: str, error: Exception) -> ValueError:
    reason = ' '.join(str(error).split()).removeprefix(f'{path}: ').rstrip('.')  # One line.
    return ValueError(f'{field}={path!r} is not a readable .npz of arrays: '
                      f'{reason or type(error).__name__}.')


def _shape_text(shape: tuple[int, ...]) -> str:
    """'HxWxC' of images [N, H, W, C], else the whole shape."""
    return 'x'.join(map(str, shape[1:])) if len(shape) == 4 else str(tuple(shape))


def _network_refuses(network: str, shape: tuple[int, ...]) -> str | None:
    """What `eval.metrics_network` scores, if it cannot score images [N, H, W, C] of
    `shape`; None if it can."""
    _, height, width, channels = shape
    if network == 'inception':
        return None if channels in (1, 3) else 'images of 1 or 3 channels'
    if height == width and height % 8 == 0 and height > 0 and channels == 1:
        return None  # Block-averaged to 8x8 (see `FeatureExtractor`).
    return 'square grey images of a multiple of 8 pixels (8x8x1, 16x16x1, ...)'


def _open_reference_npz(path: str, network: str
                        ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The stored arrays of the `eval.fid_reference` file but its images, and its
    images ('arr_0', memory-mapped; None if it has none), checked without computing.

    Raises:
        FileNotFoundError: No such file.
        ValueError: As `load_reference_npz`.
    """
    field = 'eval.fid_reference'
    stored, has_images = _read_npz(field, path, lambda f: (
        {k: f[k] for k in f.files if k != 'arr_0'}, 'arr_0' in f.files))  # Statistics: small.
    if not has_images:
        if 'mu' not in stored or 'sigma' not in stored:
            raise ValueError(f'{field}={path!r} has neither reference images '
                             f"('arr_0') nor statistics ('mu', 'sigma'): {sorted(stored)}.")
        return stored, None
    images = _open_images(field, path, 'arr_0')  # Read batch by batch, never whole.
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{field}={path!r}: 'arr_0' must be uint8 [N, H, W, C], "
                         f'got {images.dtype} {images.shape}.')
    takes = _network_refuses(network, images.shape)
    if takes:
        raise ValueError(f"{field}={path!r}: 'arr_0' holds {_shape_text(images.shape)} "
                         f'images, but eval.metrics_network={network!r} scores {takes}.')
    return stored, images


def check_reference(config: ml_collections.ConfigDict) -> None:
    """Checks what `reference_statistics` will read, before anything is built: the
    `eval.fid_reference` file (readable, with statistics or images the feature network
    scores), or else that `eval.fid_reference_split` is a split of the dataset.

    Raises:
        FileNotFoundError: A missing reference file or dataset.
        ValueError: An unreadable or unusable reference file, or an unknown split (one
            line naming the field).
    """
    e = config.eval
    if e.fid_reference:
        _open_reference_npz(e.fid_reference, e.metrics_network)
    else:
        data_lib.check_split(config, e.fid_reference_split, 'eval.fid_reference_split')


def load_reference_npz(path: str, extractor: FeatureExtractor,
                       batch_size: int) -> dict[str, np.ndarray]:
    """Reference statistics from an `.npz`: ours (mu, sigma, ...) or an ADM batch.

    An ADM evaluator reference batch holds `arr_0` (uint8 NHWC images) and possibly
    precomputed `mu`, `sigma`, `mu_s`, `sigma_s`, of the TensorFlow graph's features:
    they are used as published when the extractor computes those features (Inception
    with `eval.inception_input='tf'`); otherwise they would be compared with other
    features, so the statistics recomputed from its images are used (and a line says
    so). Its images give the features for precision/recall.

    Raises:
        FileNotFoundError: No such file.
        ValueError: An unreadable file, or one without statistics or images the feature
            network scores (naming `eval.fid_reference` and the file).
    """
    stored, images = _open_reference_npz(path, extractor.name)
    if images is None:
        return stored
    accumulator = FeatureAccumulator()
    _features_of_images(extractor, images, batch_size, accumulator)
    computed = accumulator.result()
    if not extractor.computes_adm_features:
        published = sorted(stored.keys() & {'mu', 'sigma', 'mu_s', 'sigma_s'})
        if published:
            logger.warning(
                'eval.fid_reference=%s: its stored %s are the TensorFlow graph\'s '
                "features (eval.inception_input='tf'); with eval.metrics_network=%r and "
                'eval.inception_input=%r the statistics are recomputed from its images.',
                path, '/'.join(published), extractor.name, extractor.input_pipeline)
        return computed
    return {**computed, **stored}  # Published statistics win over recomputed ones.


def reference_statistics(config: ml_collections.ConfigDict, extractor: FeatureExtractor,
                         cache_dir: str) -> dict[str, np.ndarray]:
    """The reference: `eval.fid_reference`, or the first `eval.fid_reference_num_images`
    of `eval.fid_reference_split`, computed once and cached in `cache_dir`."""
    e = config.eval
    if e.fid_reference:
        return load_reference_npz(e.fid_reference, extractor, e.fid_batch_size)
    name = config.data.dataset.replace('/', '_').replace(':', '_')
    resize = '' if config.data.resize == 'bicubic' else f'{config.data.resize}_'
    network = e.metrics_network + ('_tf' if (e.metrics_network == 'inception'
                                             and e.inception_input == 'tf') else '')
    cache = epath.Path(cache_dir) / (
        f'fid_reference_{name}_{e.fid_reference_split}_{config.data.image_size}px_{resize}'
        f'{network}_{e.fid_reference_num_images}.npz')
    if cache.exists():
        with np.load(os.fspath(cache)) as f:
            return {k: f[k] for k in f.files}
    ref_config = ml_collections.ConfigDict(config.to_dict())
    ref_config.data.eval_split = e.fid_reference_split
    ref_config.eval.num_images = e.fid_reference_num_images
    ref_config.eval.global_batch_size = e.fid_batch_size
    accumulator = FeatureAccumulator()
    logger.info('Computing reference statistics of %s split %r (up to %d images).',
                config.data.dataset, e.fid_reference_split, e.fid_reference_num_images)
    for local in data_lib.create_eval_iterator(ref_config,
                                               split_field='eval.fid_reference_split'):
        batch = parallel.to_global({'image': local['image'], 'mask': local['mask']},
                                   extractor.mesh)
        features = extractor(batch['image'], quantize='round')
        accumulator.update(features, parallel.gather(batch['mask']))
    result = accumulator.result()
    if jax.process_index() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = f'{os.fspath(cache)}.tmp{os.getpid()}.npz'
        np.savez(tmp, **result)
        os.replace(tmp, os.fspath(cache))
        logger.info('Cached the reference statistics in %s.', cache)
    return result


# --- scoring a model ---------------------------------------------------------------------


def _sample_features(config: ml_collections.ConfigDict, sample_fn: Callable, params: Any,
                     extractor: FeatureExtractor, num: int, rng: jax.Array,
                     progress: bool, task_state: Any = None, num_classes: int | None = None,
                     classifier_params: Any = None
                     ) -> tuple[FeatureAccumulator, np.ndarray]:
    """Samples `num` images in batches of `eval.fid_batch_size`, streaming features;
    labels from `num_classes` (default the model's; a guiding classifier's for an
    unconditional model), guided by `classifier_params` when given."""
    batch_size = config.eval.fid_batch_size
    if num_classes is None:
        num_classes = config.model.num_classes
    labels = sample_mode.make_labels(config, num_classes, num)
    accumulator = FeatureAccumulator()
    num_batches = -(-num // batch_size)
    batches = range(num_batches)
    if progress and jax.process_index() == 0 and sys.stdout.isatty():
        import tqdm  # pylint: disable=import-outside-toplevel  (optional progress bar)
        batches = tqdm.tqdm(batches, desc='fid samples', unit='batch')
    for b in batches:
        chunk = labels[b * batch_size:(b + 1) * batch_size]
        batch_labels = np.zeros(batch_size, np.int32)
        batch_labels[:len(chunk)] = np.maximum(chunk, 0)
        images = sample_fn(params, jax.random.fold_in(rng, b), batch_labels,
                           classifier_params, task_state=task_state)
        features = extractor(images, quantize=config.sample.quantize)
        accumulator.update(features, np.arange(batch_size) < len(chunk))
        if progress and not sys.stdout.isatty() and (b + 1) % 10 == 0:
            logger.info('FID samples: batch %d/%d.', b + 1, num_batches)
    return accumulator, labels


def _psnr(images: jax.Array, reference: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of images in [-1, 1] against a reference, both quantised to
    uint8 first: 10 log10(255^2 / MSE) with the MSE over an image's pixel values. An
    exact copy scores as if one value were one grey level off (MSE = 1 / its size), so
    the mean over images stays finite."""
    def pixels(x):
        return quantize_to_uint8(x, 'round').astype(jnp.float32)

    mse = jnp.mean(jnp.square(pixels(images) - pixels(reference)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(255.0 ** 2 / jnp.maximum(mse, 1.0 / images[0].size))


def _upsampled_eval_features(config: ml_collections.ConfigDict, sample_fn: Callable,
                             params: Any, extractor: FeatureExtractor, rng: jax.Array
                             ) -> tuple[FeatureAccumulator, np.ndarray | None,
                                        dict[str, float]]:
    """An upsampler's samples for `--mode=fid`: the first `eval.fid_num_samples` images
    of `data.eval_split`, area-downsampled as in training and quantised to uint8 (the
    real low-resolution images, as an .npz would hold them), upsampled and streamed
    through the feature network, in global batches of `eval.fid_batch_size` (batch b
    draws its noise from fold_in(rng, b)); each process loads only its rows.

    Returns:
        (features, the images' labels (None for an unconditional upsampler),
        {'psnr', 'psnr_bilinear'}: mean per-image PSNR (dB, uint8) of the samples and of
        the bilinear enlargement of the same inputs against the originals).
    """
    e, size = config.eval, config.data.image_size
    split_config = ml_collections.ConfigDict(config.to_dict())
    split_config.eval.num_images = e.fid_num_samples
    split_config.eval.global_batch_size = e.fid_batch_size
    batch_sharded = parallel.batch_sharding(extractor.mesh)

    @functools.partial(jax.jit, out_shardings=batch_sharded)
    def low_res_of(images):  # [B, s, s, C]: the training conditioning, on the uint8 grid.
        return super_resolution.quantize(super_resolution.conditioning(config, images)[
            'low_res'])

    @functools.partial(jax.jit, out_shardings=(batch_sharded, batch_sharded))
    def psnr_of(samples, low_res, originals):
        return _psnr(samples, originals), _psnr(layers.upsample_bilinear(low_res, size),
                                                originals)

    accumulator = FeatureAccumulator()
    labels, psnr, psnr_bilinear = [], [], []
    is_main = jax.process_index() == 0
    for b, local in enumerate(data_lib.create_eval_iterator(split_config)):
        batch = parallel.to_global(local, extractor.mesh)
        low_res = low_res_of(batch['image'])
        samples = sample_fn(params, jax.random.fold_in(rng, b), batch['label'],
                            low_res=low_res)
        mask = parallel.gather(batch['mask'])
        accumulator.update(extractor(samples, quantize=config.sample.quantize), mask)
        labels.append(parallel.gather(batch['label'])[mask])
        ours, bilinear = psnr_of(samples, low_res, batch['image'])
        psnr.append(parallel.gather(ours)[mask])
        psnr_bilinear.append(parallel.gather(bilinear)[mask])
        if is_main:
            logger.info('Upsampled eval batch %d: %d images, PSNR %.2f dB.', b + 1,
                        accumulator.count, float(np.mean(np.concatenate(psnr))))
    if accumulator.count == 0:
        raise ValueError(f'eval.fid_num_samples={e.fid_num_samples}: no images in '
                         f'data.eval_split={config.data.eval_split!r} to upsample.')
    labels = np.concatenate(labels) if config.model.num_classes > 0 else None
    return accumulator, labels, {
        'psnr': float(np.mean(np.concatenate(psnr), dtype=np.float64)),
        'psnr_bilinear': float(np.mean(np.concatenate(psnr_bilinear), dtype=np.float64))}


def make_training_fid_fn(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                         workdir: str
                         ) -> Callable[[Mapping[str, Any]], dict[str, float]]:
    """The trainer's periodic scorer: `fn(ema_params) -> metrics` of
    `train.fid_num_samples` EMA samples (the same noise every time), built once
    (feature network and reference loaded now, so a missing file fails before
    training)."""
    extractor = FeatureExtractor(config, mesh)
    reference = reference_statistics(config, extractor, workdir)
    fid_config = ml_collections.ConfigDict(config.to_dict())
    fid_config.sample.classifier_scale = 0.0
    sample_fn = tasks.make_sample_fn(fid_config, create_model(config), mesh=mesh)
    rng = config_lib.rng_for(config, 'fid')

    def fid_fn(ema_params):
        params = ema_params[tasks.TASKS[config.task].sample_part]
        accumulator, labels = _sample_features(config, sample_fn, params, extractor,
                                               config.train.fid_num_samples, rng,
                                               progress=False)
        return score(accumulator.result(), reference, labels=labels,
                     **scoring_options(config))

    return fid_fn


def open_samples_npz(config: ml_collections.ConfigDict
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Checks the samples `.npz` of `eval.fid_samples` and opens its images without
    reading them.

    Returns:
        (images uint8 [N, S, S, C] ('images' or 'arr_0', memory-mapped when stored
        uncompressed) with S = data.image_size and C = data.channels, the model's
        samples; labels [N] ('labels') or None).

    Raises:
        FileNotFoundError: No such file.
        ValueError: An unreadable file, no image array, images of another shape or
            type, or labels not one per image (one line naming the field and the
            file, and the expected and found shapes).
    """
    path, d = config.eval.fid_samples, config.data
    field = f'eval.fid_samples={path!r}'
    key, labels = _read_npz('eval.fid_samples', path, lambda f: (
        next((k for k in ('images', 'arr_0') if k in f.files), None),
        np.asarray(f['labels']) if 'labels' in f.files else None))
    if key is None:
        raise ValueError(f"{field} has no 'images' or 'arr_0' array.")
    images = _open_images('eval.fid_samples', path, key)
    want = (d.image_size, d.image_size, d.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f'{field} holds {_shape_text(images.shape)} images ({key!r}), '
                         f'expected {"x".join(map(str, want))} (data.image_size='
                         f'{d.image_size}, data.channels={d.channels}): the samples of '
                         "this config's model.")
    if images.dtype != np.uint8:
        raise ValueError(f'{field}: {key!r} must be uint8 pixels, got {images.dtype}.')
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"{field}: 'labels' has shape {labels.shape}, expected "
                         f'[{images.shape[0]}] (one label per image).')
    return images, labels


def evaluate_samples(config: ml_collections.ConfigDict, workdir: str, *,
                     mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """`--mode=fid`: FID, sFID, IS, precision and recall of a workdir's samples.

    Scores `eval.fid_num_samples` images drawn from the latest EMA parameters with
    the configured sampler (`sample.*`, classifier guidance included: the published
    ADM-G numbers are of guided samples), or the images of `eval.fid_samples`,
    against the reference statistics (see `reference_statistics`). An upsampler
    (task='super_resolution') instead upsamples the real low-resolution versions of
    the first `eval.fid_num_samples` images of `data.eval_split` (area-downsampled as
    in training, on the uint8 grid) and also reports 'psnr' and 'psnr_bilinear'
    against the originals (`_upsampled_eval_features`). Writes
    `<workdir>/metrics_<step>.json` (`_1`, `_2`, ... when taken), logs the numbers
    to TensorBoard and `runs.jsonl`.

    Raises:
        ValueError: A bad config, an unreadable or wrongly shaped samples or reference
            file, an unknown split, or too few samples for the feature dimension; all
            but the last before anything is built or written.
        FileNotFoundError: No checkpoint, reference, samples or weights file (as early).
    """
    mesh = parallel.create_mesh() if mesh is None else mesh
    config_lib.validate(config, mode='fid', num_devices=parallel.num_mesh_devices(mesh))
    upsampler = config.task == super_resolution.SuperResolutionTask.name
    if upsampler and not config.eval.fid_samples:
        s = config.sample
        if s.base_workdir:
            raise ValueError(f'sample.base_workdir={s.base_workdir!r}: a cascade is scored by '
                             "upsampling.evaluate_upsampler (main.py's --mode=fid does).")
        if s.low_res_npz:
            raise ValueError(f'sample.low_res_npz={s.low_res_npz!r}: --mode=fid of an '
                             'upsampler upsamples the eval split (or a cascade); score the '
                             'upsampled .npz of --mode=sample with eval.fid_samples.')
    workdir_lib.require_existing(workdir)
    # Every input is checked (the samples file opened, the reference file or split
    # found, the checkpoint restored) before the feature network is built and the
    # reference statistics are computed and cached in the workdir.
    samples_file = config.eval.fid_samples
    if samples_file:
        images, labels = open_samples_npz(config)
    elif upsampler:
        data_lib.check_split(config, config.data.eval_split, 'data.eval_split')
    check_reference(config)
    if not samples_file:
        checkpoints = checkpointing.checkpoint_dir(workdir)
        if not checkpoints.exists():  # Before the restore builds the model's state.
            raise FileNotFoundError(f'No checkpoint in {checkpoints}.')
        step, _, ema_params, task_state = checkpointing.restore_for_inference(
            config, workdir, mesh, with_task_state=True)
        fid_config = ml_collections.ConfigDict(config.to_dict())
        classifier, classifier_params = None, None
        if upsampler:  # An upsampler samples unguided (as ADM-U's super_res_sample.py).
            fid_config.sample.classifier_scale = 0.0
        elif config.sample.classifier_scale > 0:
            classifier, classifier_params = sample_mode.restore_classifier(config, mesh)
        sample_fn = tasks.make_sample_fn(fid_config, create_model(config),
                                         classifier=classifier, mesh=mesh)
        params = ema_params[tasks.TASKS[config.task].sample_part]
        rng = config_lib.rng_for(config, 'fid')
    extractor = FeatureExtractor(config, mesh)
    reference = reference_statistics(config, extractor, workdir)
    extra = {}
    if samples_file:
        accumulator = FeatureAccumulator()
        _features_of_images(extractor, images, config.eval.fid_batch_size, accumulator)
        step, source = -1, samples_file
    elif upsampler:
        logger.info('Scoring step %d on up to %d images of %r, area-downsampled to %dx%d '
                    'and upsampled (%s).', step, config.eval.fid_num_samples,
                    config.data.eval_split, config.model.low_res_size,
                    config.model.low_res_size, config.sample.sampler)
        accumulator, labels, extra = _upsampled_eval_features(config, sample_fn, params,
                                                              extractor, rng)
        source = f'step {step}, upsampled {config.data.eval_split!r}'
    else:
        logger.info('Scoring %d samples of step %d (%s%s).', config.eval.fid_num_samples,
                    step, config.sample.sampler,
                    f', classifier scale {config.sample.classifier_scale}'
                    if classifier is not None else '')
        accumulator, labels = _sample_features(
            config, sample_fn, params, extractor, config.eval.fid_num_samples, rng,
            progress=True, task_state=task_state,
            num_classes=diffusion_task.label_classes(config, classifier),
            classifier_params=classifier_params)
        source = f'step {step}'
    result = score(accumulator.result(), reference, labels=labels,
                   **scoring_options(config))
    result.update(extra)
    result.update(step=int(step), network=config.eval.metrics_network, samples=source)
    return write_metrics(config, workdir, result)


def write_metrics(config: ml_collections.ConfigDict, workdir: str, result: dict[str, Any]
                  ) -> dict[str, Any]:
    """Logs `--mode=fid`'s result and, on process 0, writes `metrics_<step>.json`
    (`metrics_npz.json` for step -1; never replacing a file), TensorBoard scalars and a
    `runs.jsonl` record.

    Args:
        config: The run's config.
        workdir: Where the files go.
        result: `score`'s metrics plus 'step' (-1: an .npz), 'network', 'samples'.

    Returns:
        `result`, with 'json' (the file written) on process 0.
    """
    step, source = result['step'], result['samples']
    logger.info('%s: %s', source, ', '.join(f'{k}={v:.4g}' for k, v in result.items()
                                            if isinstance(v, float)))
    if jax.process_index() == 0:
        stem = workdir_lib.unique_stem(epath.Path(workdir),
                                       f'metrics_{step}' if step >= 0 else 'metrics_npz',
                                       ('.json',))
        path = f'{stem}.json'
        epath.Path(path).write_text(json.dumps(result, indent=2))
        writer = writers.MetricWriter(os.path.join(workdir, 'tensorboard'), enabled=True,
                                      progress_bar=False)
        writer.write_scalars(max(step, 0), {f'eval/{k}': v for k, v in result.items()
                                            if isinstance(v, float)})
        writer.close()
        workdir_lib.append_run_record(workdir, 'fid', config, {'json': path})
        result['json'] = path
    return result
