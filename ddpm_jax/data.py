"""Input pipelines: TFDS (array_record), the bundled digits and a synthetic source.

This module owns everything between a dataset on disk and the numpy batch the
trainer shards onto its mesh:

* Sources (chosen by `config.data.dataset`):
  - a TFDS name (e.g. 'cifar10', 'imagenet2012', 'lsun/church_outdoor'), read
    with `tfds.data_source(name, split=..., data_dir=..., download=False)` from
    array_record files. Nothing is ever downloaded or built here: a dataset
    that is not prepared raises `DatasetNotFoundError` at once.
  - 'digits': scikit-learn's bundled 8x8 handwritten digits (1,797 images,
    10 classes, pixel values 0..16). Split 'train' is the first 1,500 images,
    split 'test' the last 297.
  - 'fake': deterministic uniform-noise images with random labels (10,000 train,
    1,000 test), for smoke tests and input-free benchmarks.
* Preprocessing (grain, no TensorFlow): with `data.resize='bicubic'` an optional
  centre crop to a square and a resize to `data.image_size` (PIL bicubic on float
  pixels, antialiased); with 'adm' guided-diffusion's `center_crop_arr` on the uint8
  image (BOX halvings, a bicubic resize of the short side, the centre square of the
  uint8 result), and in training with `data.random_crop` its `random_crop_arr`; then
  channel conversion to `data.channels` (grey is repeated, RGB goes to ITU-R 601
  luma, alpha is dropped), scaling to float32 in [-1, 1], optional random
  horizontal flip (training only). Labels are int32 'label'; a dataset without
  a 'label' feature gets label 0 (and `dataset_info` reports 0 classes). Labels
  named by WordNet IDs are numbered in sorted-ID order (`wordnet_label_order`), as
  TFDS's imagenet2012 and guided-diffusion number ImageNet's classes:
  `imagenet_resized` (Chrabaszcz et al.'s own order; TFDS warns that its labels do
  not match its other ImageNet datasets') is renumbered, tench being 0 everywhere
  (`data.wordnet_label_order`, a structural field: runs begun before it keep theirs).
* Training iterator: process `p` of `n` reads only every n-th example
  (`ds[p::n]`), shuffled with a seed derived from `config.seed`, reshuffled each
  epoch, repeated forever. Flips depend only on (seed, process, position in the
  stream). Batches are LOCAL: {'image': float32 [B/n, H, W, C],
  'label': int32 [B/n]} numpy arrays with B = `train.global_batch_size`.
  `parallel.to_global` turns them into global `jax.Array`s.
  `create_records_train_iterator` applies these rules to any records (the cached
  latents of `ddpm_jax.latent_cache`, which the trainer reads when `latent.cache` is
  set: `train.create_train_iterator`).
* Eval iterator: no shuffle or flip, one pass over the first
  `min(eval.num_images, split size)` examples in dataset order. Global batch `j`
  holds examples [j*B, (j+1)*B) and process p owns rows [p*B/n, (p+1)*B/n) of
  it, so the global batches are the same for any process count. The last batch
  is PADDED, never dropped: every batch carries 'mask' (bool [B/n], False on
  padding rows, whose image and label are zeros), and every process yields the
  same number of batches.

Checkpointing the training iterator. `create_train_iterator` returns a grain
`DatasetIterator` whose `get_state()` is a small JSON-serialisable dict
(`{'next_index': k}` without worker processes); `set_state(state)` makes the
iterator continue with exactly the batch that followed when the state was
taken. For orbax, use grain's own handler args inside the CheckpointManager
composite (each process writes `process_<i>-of-<n>.json`)::

    import grain
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(train_iter)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(train_iter)))
    # `train_iter` (a fresh iterator from create_train_iterator) is now
    # positioned at the saved batch.

(`ocp.args.JsonSave(train_iter.get_state())` / `JsonRestore()` + `set_state`
also works, but orbax writes JSON items from the primary process only.)
With `data.num_workers > 0` the iterator runs grain worker processes: absl flags
must be parsed (true under `absl.app.run`) and the caller should `close()` it.
"""

import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from ddpm_jax import config_lib

# Examples in each split of the synthetic 'fake' source.
FAKE_SPLIT_SIZES = {'train': 10_000, 'test': 1_000}
# The splits of the built-in sources.
BUILTIN_SPLITS = {'digits': ('train', 'test'), 'fake': tuple(FAKE_SPLIT_SIZES)}
# The bundled digits: the first 1,500 images train, the last 297 test.
DIGITS_NUM_TRAIN = 1_500
# ITU-R BT.601 luma weights, for RGB -> grey.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)

Batch = dict[str, np.ndarray]


class DatasetNotFoundError(FileNotFoundError):
    """A TFDS dataset is not prepared (in array_record format) under data_dir."""


@dataclasses.dataclass(frozen=True)
class _Source:
    """A random-access split plus what preprocessing needs to know about it.

    Attributes:
        records: `len()` and `[i]` give dicts with 'image' ([H, W, C] or [H, W]
            numbers in [0, max_value]) and optionally 'label'.
        max_value: The pixel value that maps to +1.
        num_classes: Number of label classes, 0 if the records have no label.
        label_order: None, or the int64 [num_classes] new number of each label.
    """

    records: Any
    max_value: float
    num_classes: int
    label_order: Any = None


# ---------------------------------------------------------------------------------
# Sources.


class _FakeRecords:
    """Deterministic random uint8 images and labels, generated from the index."""

    def __init__(self, num_examples: int, image_size: int, channels: int,
                 num_classes: int, salt: int):
        self._num_examples = num_examples
        self._shape = (image_size, image_size, channels)
        self._num_classes = num_classes
        self._salt = salt

    def __len__(self) -> int:
        return self._num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self._num_examples:
            raise IndexError(f'fake index {index} out of range [0, {self._num_examples})')
        rng = np.random.default_rng([self._salt, index])
        return {
            'image': rng.integers(0, 256, self._shape, dtype=np.uint8),
            'label': rng.integers(0, self._num_classes),
        }


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Returns the 1,797 sklearn digits: images float32 [N, 8, 8] in 0..16, labels."""
    from sklearn import datasets  # Imported lazily: slow, and only this source needs it.

    digits = datasets.load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int32)


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of the bundled digits as arrays, without the input pipeline.

    Args:
        split: 'train' (the first 1,500 images) or 'test' (the last 297).

    Returns:
        images float32 [N, 8, 8, 1] scaled to [-1, 1] (0..16 -> -1..1), labels int32 [N].
    """
    images, labels = _digits_split(split)
    return images / 8.0 - 1.0, labels


def _check_builtin_split(name: str, split: str, field: str) -> None:
    """Raises a one-line ValueError naming `field` unless `split` is one of the
    built-in source `name`'s."""
    if split not in BUILTIN_SPLITS[name]:
        raise ValueError(f'{field}={split!r} is not a split of data.dataset={name!r}; '
                         f'choose one of {list(BUILTIN_SPLITS[name])}.')


def _digits_split(split: str, field: str = 'split') -> tuple[np.ndarray, np.ndarray]:
    """Digits of `split` (the value of config `field`, for the message): images float32
    [N, 8, 8, 1] in 0..16, labels int32 [N]."""
    _check_builtin_split('digits', split, field)
    images, labels = _load_digits()
    part = slice(0, DIGITS_NUM_TRAIN) if split == 'train' else slice(DIGITS_NUM_TRAIN, None)
    return images[part, :, :, None], labels[part]


class _ArrayRecords:
    """Random access to in-memory arrays as {'image', 'label'} dicts."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self._images = images
        self._labels = labels

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {'image': self._images[index], 'label': self._labels[index]}


def _resolve_data_dir(data_dir: str) -> str:
    return data_dir or tfds_constants.get_default_data_dir()


def _is_prepared(name: str, data_dir: str) -> bool:
    """Whether some version of `name` (optionally 'name/config:version') has metadata."""
    path = name.split(':')[0]
    root = os.path.join(data_dir, *path.split('/'))
    if not os.path.isdir(root):
        return False
    return any('dataset_info.json' in files for _, _, files in os.walk(root))


def _open_tfds(name: str, split: str, data_dir: str, renumber: bool = True,
               field: str = 'split') -> _Source:
    """Opens one split of a prepared TFDS dataset as a random-access source; with
    `renumber`, WordNet-ID labels in sorted-ID order (`wordnet_label_order`).

    Raises:
        DatasetNotFoundError: The dataset is not prepared in array_record format.
        ValueError: `split` (the value of config `field`) is not a split of it.
    """
    where = _resolve_data_dir(data_dir)
    build = (f'prepare it with `tfds build {name.split(":")[0]} --data_dir={where} '
             f'--file_format=array_record` and pass --config.data.data_dir={where}')
    try:
        # download=False: never build, download or touch the network here.
        records = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                   download=False)
    except (tfds.core.registered.DatasetNotFoundError, KeyError, AssertionError,
            NotImplementedError, FileNotFoundError) as e:
        builder = name.split(':')[0].split('/')[0]
        if builder not in tfds.list_builders(with_community_datasets=False):
            raise DatasetNotFoundError(
                f'data.dataset={name!r} is neither a TFDS dataset name nor one of the '
                "built-in 'digits' and 'fake' (the TFDS names are listed at "
                'https://www.tensorflow.org/datasets/catalog/overview).') from None
        if not _is_prepared(name, where):
            raise DatasetNotFoundError(
                f'TFDS dataset {name!r} is not prepared in data_dir {where!r} (looked for '
                f'{os.path.join(where, name.split(":")[0])}/<version>/dataset_info.json); '
                f'{build}.') from None
        if isinstance(e, NotImplementedError):
            raise DatasetNotFoundError(
                f'TFDS dataset {name!r} in {where!r} is not in array_record format '
                f'(needed for random access); {build}. Original error: {e}') from None
        raise
    except ValueError as e:
        reason = ' '.join(str(e).split())
        if 'split' not in reason.lower() and 'slice' not in reason.lower():
            raise
        # An unknown split, or a slice of it beyond its size.
        raise ValueError(f'{field}={split!r} is not a split of TFDS dataset '
                         f'data.dataset={name!r} in {where!r}: {reason}') from None
    features = records.dataset_info.features
    if 'image' not in features:
        raise ValueError(f'TFDS dataset {name!r} has no "image" feature; features: '
                         f'{list(features.keys())}')
    label = features['label'] if 'label' in features else None
    num_classes = int(getattr(label, 'num_classes', 0) or 0)
    names = list(getattr(label, 'names', None) or [])
    return _Source(records=records, max_value=255.0, num_classes=num_classes,
                   label_order=wordnet_label_order(names) if renumber else None)


def wordnet_label_order(names: Sequence[str]) -> np.ndarray | None:
    """The new number of each label when the labels are WordNet IDs ('n01440764')
    not in sorted order: its rank among the sorted IDs (guided-diffusion's and TFDS
    imagenet2012's numbering of ImageNet). None when there is nothing to renumber."""
    if not names or not all(re.fullmatch(r'n\d{8}', n) for n in names):
        return None
    if list(names) == sorted(names):
        return None
    return np.argsort(np.argsort(np.asarray(names)))


def _open_source(config: ml_collections.ConfigDict, split: str, field: str) -> _Source:
    """Opens `split` of `config.data.dataset` as a random-access source; `field` is the
    config field `split` came from, which an unknown split's message names."""
    name = config.data.dataset
    if name == 'fake':
        _check_builtin_split(name, split, field)
        num_classes = config.model.num_classes if config.model.num_classes > 0 else 10
        records = _FakeRecords(FAKE_SPLIT_SIZES[split], config.data.image_size,
                               config.data.channels, num_classes,
                               salt=list(FAKE_SPLIT_SIZES).index(split))
        return _Source(records=records, max_value=255.0, num_classes=num_classes)
    if name == 'digits':
        return _Source(records=_ArrayRecords(*_digits_split(split, field)), max_value=16.0,
                       num_classes=10)
    if not name:
        raise ValueError('config.data.dataset is empty')
    return _open_tfds(name, split, config.data.data_dir, config.data.wordnet_label_order,
                      field)


# ---------------------------------------------------------------------------------
# Preprocessing.


def _center_crop(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top:top + side, left:left + side]


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic, antialiased resize of float32 [H, W, C] to [size, size, C]."""
    channels = [
        np.asarray(PIL.Image.fromarray(np.ascontiguousarray(image[:, :, c]))
                   .resize((size, size), PIL.Image.Resampling.BICUBIC))
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def _convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    have = image.shape[-1]
    if have == 4:  # RGBA: drop alpha.
        image, have = image[..., :3], 3
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if have == 3 and channels == 1:
        return (image @ _LUMA_WEIGHTS)[..., None]
    raise ValueError(f'cannot convert {have}-channel images to data.channels={channels}')


def _pil_image(image: np.ndarray) -> PIL.Image.Image:
    """uint8 [H, W, C] (C = 1, 3 or 4) or [H, W] as a PIL 'L' or 'RGB' image (alpha
    dropped, as guided-diffusion's `convert("RGB")`; grey stays grey, which resamples
    as its RGB copy would, channel by channel)."""
    if image.dtype != np.uint8:
        raise ValueError(f"data.resize='adm' resamples 8-bit images, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[-1] == 4:
        image = image[:, :, :3]
    return PIL.Image.fromarray(np.ascontiguousarray(image))


def _adm_resize_short_side(pil: PIL.Image.Image, short_side: int) -> np.ndarray:
    """guided-diffusion's resize: BOX halvings while the short side is at least twice
    `short_side`, then one bicubic resize making it `short_side` (the long side
    Python-rounded), as uint8 [H, W(, C)]."""
    while min(*pil.size) >= 2 * short_side:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=PIL.Image.Resampling.BOX)
    scale = short_side / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size),
                     resample=PIL.Image.Resampling.BICUBIC)
    return np.asarray(pil)


def center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
    """guided-diffusion's and improved-diffusion's preprocessing (`center_crop_arr` in
    image_datasets.py), on uint8 pixels: halve the image with PIL's BOX filter while its
    short side is at least 2 `image_size`, resize it bicubically so that the short side
    is `image_size` (the long side `round(side * scale)`), and cut the centre square
    (offsets `(side - image_size) // 2`) out of the uint8 result.

    Args:
        image: uint8 [H, W, C] (C = 1, 3 or 4; alpha is dropped) or [H, W].

    Returns:
        uint8 [image_size, image_size, C'] (C' = 1 for grey, else 3).
    """
    arr = _adm_resize_short_side(_pil_image(image), image_size)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return _with_channels(arr[top:top + image_size, left:left + image_size])


def random_crop_arr(image: np.ndarray, image_size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
    """guided-diffusion's training crop for its classifiers (`random_crop_arr`): the
    short side is resized (as `center_crop_arr`) to an integer drawn uniformly from
    [ceil(image_size / max_crop_frac), ceil(image_size / min_crop_frac)], and a square
    of `image_size` is cut at a uniformly drawn position.

    Args:
        image: As `center_crop_arr`.
        image_size: Side of the output.
        rng: The draws (short side, then row and column offsets).
        min_crop_frac, max_crop_frac: The crop's side over the resized short side.

    Returns:
        uint8 [image_size, image_size, C'].
    """
    lo = math.ceil(image_size / max_crop_frac)
    hi = math.ceil(image_size / min_crop_frac)
    short_side = int(rng.integers(lo, hi + 1))
    arr = _adm_resize_short_side(_pil_image(image), short_side)
    top = int(rng.integers(0, arr.shape[0] - image_size + 1))
    left = int(rng.integers(0, arr.shape[1] - image_size + 1))
    return _with_channels(arr[top:top + image_size, left:left + image_size])


def _with_channels(arr: np.ndarray) -> np.ndarray:
    return arr[:, :, None] if arr.ndim == 2 else arr


def _make_preprocess_fn(source: _Source, config: ml_collections.ConfigDict
                        ) -> Callable[..., Batch]:
    """Returns (record, rng=None) -> {'image': float32 [S, S, C] in [-1, 1], 'label':
    int32 []}; given an rng, data.resize='adm' crops as `random_crop_arr` (training with
    `data.random_crop`)."""
    d = config.data
    image_size, channels = d.image_size, d.channels
    # pixel / (max / 2) - 1: for 8-bit data guided-diffusion's `arr / 127.5 - 1`.
    half_max = np.float32(source.max_value / 2.0)

    def preprocess(record: Mapping[str, Any], rng: np.random.Generator | None = None
                   ) -> Batch:
        if d.resize == 'adm':
            raw = np.asarray(record['image'])
            image = (random_crop_arr(raw, image_size, rng) if rng is not None
                     else center_crop_arr(raw, image_size)).astype(np.float32)
        else:
            image = np.asarray(record['image'], np.float32)
            if image.ndim == 2:
                image = image[:, :, None]
            if d.center_crop:
                image = _center_crop(image)
            if image.shape[:2] != (image_size, image_size):
                image = np.clip(_resize(image, image_size), 0.0, source.max_value)
        image = _convert_channels(image, channels)
        image = image / half_max - np.float32(1.0)
        label = record['label'] if 'label' in record else 0
        if source.label_order is not None:
            label = source.label_order[label]
        return {'image': image.astype(np.float32), 'label': np.int32(label)}

    return preprocess


def _random_flip(example: Batch, rng: np.random.Generator) -> Batch:
    if rng.random() < 0.5:
        example = dict(example, image=np.ascontiguousarray(example['image'][:, ::-1]))
    return example


def _seed(*words: int) -> int:
    """A 32-bit seed from several integers (grain takes seeds in [0, 2**32))."""
    return int(np.random.SeedSequence([int(w) % 2**32 for w in words]).generate_state(1)[0])


# ---------------------------------------------------------------------------------
# Public API.


def _process_index_and_count(process_index: int | None,
                             process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f'process_index={index} must be in [0, process_count={count})')
    return index, count


def _local_batch_size(global_batch_size: int, process_count: int, field: str) -> int:
    config_lib.check_global_batch(field, global_batch_size, num_processes=process_count)
    return global_batch_size // process_count


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
    # Elements are whole batches: the buffer holds `prefetch_batches` of them, each
    # produced by its own thread (0 = synchronous, in the calling thread).
    prefetch = max(0, config.data.prefetch_batches)
    return grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)


def _to_iterator(dataset: grain.MapDataset,
                 config: ml_collections.ConfigDict) -> grain.DatasetIterator:
    iter_dataset = dataset.to_iter_dataset(_read_options(config))
    if config.data.num_workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    return iter(iter_dataset)


def create_train_iterator(config: ml_collections.ConfigDict, *,
                          process_index: int | None = None,
                          process_count: int | None = None) -> grain.DatasetIterator:
    """Creates this process's infinite, shuffled, checkpointable training iterator.

    Args:
        config: The full config; reads `seed`, `data.*` and `train.global_batch_size`
            (and `model.num_classes` for the fake source).
        process_index: This process's index; defaults to `jax.process_index()`.
        process_count: Number of processes; defaults to `jax.process_count()`.

    Returns:
        A grain `DatasetIterator` yielding local batches {'image': float32
        [L, S, S, C] in [-1, 1], 'label': int32 [L]} with
        L = global_batch_size // process_count; it has `get_state()`/`set_state()`
        and works with `grain.checkpoint.CheckpointSave/CheckpointRestore`.

    Raises:
        ValueError: Bad config values or a global batch not divisible by the process
            count.
        DatasetNotFoundError: A TFDS dataset is not prepared.
    """
    source = _open_source(config, config.data.split, 'data.split')
    flip = _random_flip if config.data.random_flip else None
    if not config.data.random_crop:
        return create_records_train_iterator(
            config, source.records, _make_preprocess_fn(source, config), flip=flip,
            process_index=process_index, process_count=process_count)
    cropped = _make_preprocess_fn(source, config)

    def crop_and_flip(record: Mapping[str, Any], rng: np.random.Generator) -> Batch:
        example = cropped(record, rng)
        return example if flip is None else flip(example, rng)

    return create_records_train_iterator(config, source.records, None, flip=crop_and_flip,
                                         process_index=process_index,
                                         process_count=process_count)


def create_records_train_iterator(
        config: ml_collections.ConfigDict, records: Any,
        preprocess: Callable[[Mapping[str, Any]], Batch] | None,
        flip: Callable[[Batch, np.random.Generator], Batch] | None = None, *,
        process_index: int | None = None,
        process_count: int | None = None) -> grain.DatasetIterator:
    """The training stream of `create_train_iterator` over any random-access records.

    The same rules for any source (images, or the cached latents of
    `ddpm_jax.latent_cache`): process p of n reads `records[p::n]`, shuffled with the
    seed of `config.seed`, reshuffled each epoch; `flip(example, rng)` is called on
    every example (after `preprocess`) with a generator seeded by (seed, process,
    position in the stream), so two sources of the same length see the same order and
    the same flip decisions, and their iterator states are interchangeable.

    Args:
        config: Reads `seed`, `data.split`, `data.prefetch_batches`,
            `data.num_workers` and `train.global_batch_size`.
        records: `len()` and `[i]` giving one example (a dict of arrays).
        preprocess: Record -> example, or None to use the records as they are.
        flip: The random augmentation (e.g. a horizontal flip), or None.
        process_index: This process's index; defaults to `jax.process_index()`.
        process_count: Number of processes; defaults to `jax.process_count()`.

    Returns:
        A checkpointable grain `DatasetIterator` of local batches (the examples'
        arrays stacked, [global_batch_size // process_count, ...]).

    Raises:
        ValueError: A global batch not divisible by the process count, or fewer
            records than processes.
    """
    index, count = _process_index_and_count(process_index, process_count)
    local_batch_size = _local_batch_size(config.train.global_batch_size, count,
                                         'train.global_batch_size')
    if len(records) < count:
        raise ValueError(f'split {config.data.split!r} has {len(records)} examples, '
                         f'fewer than process_count={count}')
    dataset = grain.MapDataset.source(records)[index::count]
    # Shuffling before repeating gives a fresh permutation of the shard each epoch.
    shuffle_seed = _seed(config.seed, config_lib.DATA_SEED_SALTS['shuffle'])
    dataset = dataset.shuffle(seed=shuffle_seed).repeat()
    if preprocess is not None:
        dataset = dataset.map(preprocess)
    if flip is not None:
        # Seeded by (seed, process) and the element's position in the stream.
        dataset = dataset.random_map(flip, seed=_seed(config.seed,
                                                      config_lib.DATA_SEED_SALTS['flip'], index))
    dataset = dataset.batch(local_batch_size, drop_remainder=True)
    return _to_iterator(dataset, config)


def create_eval_iterator(config: ml_collections.ConfigDict, *,
                         process_index: int | None = None,
                         process_count: int | None = None,
                         split_field: str = 'data.eval_split') -> grain.DatasetIterator:
    """Creates this process's single-pass evaluation iterator (no shuffle, no flip).

    Covers the first `min(config.eval.num_images, split size)` examples of
    `config.data.eval_split` in order. Global batch j holds examples [j*B, (j+1)*B)
    (B = `eval.global_batch_size`); this process gets rows
    [p*B/n, (p+1)*B/n) of it. The last batch is padded with zero images, label 0
    and mask False; every process yields the same number of batches.

    Args:
        config: The full config; reads `data.*`, `eval.num_images` and
            `eval.global_batch_size`.
        process_index: This process's index; defaults to `jax.process_index()`.
        process_count: Number of processes; defaults to `jax.process_count()`.
        split_field: The config field the user set `data.eval_split` with, which an
            unknown split's message names (e.g. 'eval.fid_reference_split' for a copy
            of the config reading that split).

    Returns:
        A finite iterator of local batches {'image': float32 [L, S, S, C],
        'label': int32 [L], 'mask': bool [L]} with L = eval.global_batch_size //
        process_count.

    Raises:
        ValueError: Bad config values, an unknown split (naming `split_field`) or a
            global batch not divisible by the process count.
        DatasetNotFoundError: A TFDS dataset is not prepared.
    """
    index, count = _process_index_and_count(process_index, process_count)
    global_batch_size = config.eval.global_batch_size
    local_batch_size = _local_batch_size(global_batch_size, count, 'eval.global_batch_size')
    source = _open_source(config, config.data.eval_split, split_field)
    num_examples = min(config.eval.num_images, len(source.records))
    if num_examples <= 0:
        raise ValueError(f'eval.num_images={config.eval.num_images} must be positive')
    num_batches = -(-num_examples // global_batch_size)
    preprocess = _make_preprocess_fn(source, config)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)

    def load(position: int) -> Batch:
        # Position within this process's rows -> global example index.
        batch, row = divmod(int(position), local_batch_size)
        example_index = batch * global_batch_size + index * local_batch_size + row
        if example_index >= num_examples:
            return {'image': np.zeros(image_shape, np.float32), 'label': np.int32(0),
                    'mask': np.bool_(False)}
        return dict(preprocess(source.records[example_index]), mask=np.bool_(True))

    dataset = grain.MapDataset.range(num_batches * local_batch_size).map(load)
    dataset = dataset.batch(local_batch_size, drop_remainder=True)
    return _to_iterator(dataset, config)


def dataset_info(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Returns {'num_examples': size of data.split, 'num_classes': 0 if unlabelled}.

    Raises:
        DatasetNotFoundError: A TFDS dataset is not prepared.
        ValueError: `data.split` is not a split of it (the message names the field).
    """
    source = _open_source(config, config.data.split, 'data.split')
    return {'num_examples': len(source.records), 'num_classes': source.num_classes}


def check_split(config: ml_collections.ConfigDict, split: str, field: str) -> None:
    """Checks that `data.dataset` exists and has `split` without building a pipeline
    or reading an example (a TFDS dataset's metadata is opened, nothing downloaded),
    so that a run can refuse it before it creates or writes anything.

    Args:
        config: Reads `data.dataset` and `data.data_dir`.
        split: The split to check.
        field: The config field `split` came from, for the message (e.g.
            'eval.fid_reference_split').

    Raises:
        DatasetNotFoundError: No such dataset, or a TFDS dataset that is not prepared.
        ValueError: `split` is not a split of it (one line naming `field`).
    """
    _open_source(config, split, field)
