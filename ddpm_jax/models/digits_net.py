"""A small feature network for the bundled 8x8 digits: the digits' stand-in for Inception.

FID (Heusel et al. 2017) needs a fixed feature extractor. For 8x8 digits Inception
is the wrong tool (it sees a 299x299 upsampled blur) and would need a download, so
this module owns a tiny CNN trained on the fly, deterministically, on the digits'
'train' split, and the metrics computed with it on the held-out 'test' split:

* `DigitsNet`: conv 3x3x32 -> conv 3x3x64 stride 2 -> dense 64 (the features, after
  a GELU) -> dense 10 (the logits; dropout on the features in training). It takes
  uint8 pixels, what the samplers emit after `images.to_uint8`, so training and
  use see the same quantisation.
* `train_digits_net(seed)`: a fixed number of Adam steps over mini-batches whose
  order and one-pixel shift augmentation come from a NumPy RNG seeded by `seed`
  (initialisation and dropout from `jax.random.key(seed)`); the same seed gives
  bit-identical parameters on the same machine and JAX build.
* `load_or_train`: the trained variables cached as an .npz whose name carries
  `VERSION`, written atomically, retrained when missing or unreadable.
* `make_feature_fn`: features and logits of uint8 pixels. The metrics computed with
  them (Frechet distance to the held-out 'test' split, label accuracy) are
  `ddpm_jax.sample_quality`'s, as for Inception (`eval.metrics_network='digits'`).

The feature dimension is kept at 64 so that the 297 held-out digits give a
full-rank covariance (a Frechet distance needs more samples than dimensions).
Numbers from this network are comparable only between runs with the same
`VERSION`; they are not comparable with Inception FIDs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import zipfile
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ddpm_jax import data, images

__all__ = ['FEATURE_DIM', 'NUM_CLASSES', 'VERSION', 'CACHE_ENV_VAR', 'DigitsNet',
           'train_digits_net', 'cache_path', 'load_or_train', 'make_feature_fn']

# Width of the feature layer: small enough for a full-rank covariance from the
# 297 test digits.
FEATURE_DIM = 64
NUM_CLASSES = 10
# Bump whenever the architecture or the training recipe changes: it names the cache
# file, so a stale network is never loaded, and tags the numbers it produces.
VERSION = 'v1'
# Directory for the cached variables; defaults to ~/.cache/ddpm_jax.
CACHE_ENV_VAR = 'DDPM_JAX_CACHE'

# Training recipe (part of VERSION).
_NUM_TRAIN_STEPS = 600
_BATCH_SIZE = 128
_LEARNING_RATE = 1e-3
# Largest shift, in pixels, of the translation augmentation, and the fraction of
# training images shifted. Shifting every image buys little accuracy but makes the
# features markedly less sensitive to blur (FD of 3x3-box-blurred digits fell from
# about 14x to 10x that of real digits), so half the images stay in place.
_MAX_SHIFT = 1
_SHIFT_PROB = 0.5
# Dropout on the features before the classifier: +1-2 points of held-out accuracy.
_DROPOUT_RATE = 0.3


class DigitsNet(nn.Module):
    """conv 3x3x32 -> conv 3x3x64 / 2 -> dense 64 -> dense 10, in float32."""

    @nn.compact
    def __call__(self, pixels: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Features and logits of 8x8 grey images.

        Args:
            pixels: [B, 8, 8, 1] uint8 pixels, or floats in [0, 255] (what
                `images.to_uint8` gives for samples in [-1, 1]).
            train: Apply dropout to the features before the classifier (needs a
                'dropout' rng). The returned features never have dropout.

        Returns:
            {'features': float32 [B, FEATURE_DIM], 'logits': float32 [B, NUM_CLASSES]}.
        """
        # The inverse of to_uint8: the network sees the data pipeline's [-1, 1] range.
        x = jnp.asarray(pixels, jnp.float32) / 127.5 - 1.0
        # GELU rather than ReLU: with ReLU about a third of the 64 feature units died
        # in training, wasting dimensions of the Frechet distance.
        x = nn.gelu(nn.Conv(32, (3, 3))(x))  # [B, 8, 8, 32]
        x = nn.gelu(nn.Conv(64, (3, 3), strides=(2, 2))(x))  # [B, 4, 4, 64]
        x = x.reshape((x.shape[0], -1))  # [B, 1024]
        features = nn.gelu(nn.Dense(FEATURE_DIM)(x))
        dropped = nn.Dropout(_DROPOUT_RATE, deterministic=not train)(features)
        logits = nn.Dense(NUM_CLASSES)(dropped)
        return {'features': features, 'logits': logits}


def _digits_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
    """A digits split quantised as the samplers' output is: uint8 [N, 8, 8, 1], labels."""
    x, labels = data.load_digits(split)
    return images.to_uint8(x), labels


def _shift_batch(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Translates a _SHIFT_PROB share of images by up to _MAX_SHIFT pixels, filling with 0.

    Digits in the set are roughly centred but not exactly; small shifts make the
    features less sensitive to where a generated stroke lands, and pixel 0 is the
    background, so the uncovered border looks like the real thing.
    """
    n, h, w, _ = batch.shape
    padded = np.pad(batch, ((0, 0), (_MAX_SHIFT,) * 2, (_MAX_SHIFT,) * 2, (0, 0)))
    dy, dx = rng.integers(0, 2 * _MAX_SHIFT + 1, size=(2, n))
    keep = rng.random(n) >= _SHIFT_PROB
    dy[keep], dx[keep] = _MAX_SHIFT, _MAX_SHIFT  # The unshifted window.
    return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_digits_net(seed: int = 0) -> dict[str, Any]:
    """Trains `DigitsNet` on the digits' 'train' split, deterministically.

    Adam for a fixed number of steps on mini-batches of the uint8 training digits,
    each an epoch-wise permutation slice, half of it shifted by up to one pixel.
    All randomness (initialisation, dropout, batch order, shifts) derives from
    `seed`, and every step runs the same compiled program, so two calls give
    bit-identical variables (on the same machine and JAX build). About 3 s on a
    2-core CPU. The 'test' split is never touched.

    Args:
        seed: Seed of the initialisation and dropout keys and of the NumPy RNG for
            batch order and shifts.

    Returns:
        The variables {'params': ...} of a `DigitsNet`.
    """
    train_images, train_labels = _digits_uint8('train')
    model = DigitsNet()
    init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
    variables = model.init(init_rng, jnp.zeros((1, 8, 8, 1), jnp.uint8))
    optimizer = optax.adam(optax.cosine_decay_schedule(_LEARNING_RATE, _NUM_TRAIN_STEPS))
    params = variables['params']
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, step, pixels, labels):
        def loss_fn(params):
            logits = model.apply({'params': params}, pixels, train=True,
                                 rngs={'dropout': jax.random.fold_in(dropout_rng, step)}
                                 )['logits']
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    order = np.empty((0,), np.int64)
    for step in range(_NUM_TRAIN_STEPS):
        if len(order) < _BATCH_SIZE:  # A new epoch; the short remainder is dropped.
            order = rng.permutation(len(train_images))
        index, order = order[:_BATCH_SIZE], order[_BATCH_SIZE:]
        pixels = _shift_batch(train_images[index], rng)
        params, opt_state = train_step(params, opt_state, np.int32(step), pixels,
                                       train_labels[index])
    return {'params': jax.device_get(params)}


def _flatten(variables: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in
            traverse_util.flatten_dict(variables, sep='/').items()}


def _variable_shapes() -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flattened key -> (shape, dtype) of DigitsNet's variables; nothing allocated."""
    abstract = jax.eval_shape(DigitsNet().init, jax.random.key(0),
                              jnp.zeros((1, 8, 8, 1), jnp.uint8))
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in
            traverse_util.flatten_dict(abstract, sep='/').items()}


def cache_path(cache_dir: str | None = None) -> str:
    """Where `load_or_train` keeps the variables.

    Args:
        cache_dir: Directory; defaults to $DDPM_JAX_CACHE, else ~/.cache/ddpm_jax.

    Returns:
        `<cache_dir>/digits_net_<VERSION>_<source hash>_seed0.npz`: the hash of this
        file's source means an edited recipe never reads an older recipe's cache,
        even if VERSION was not bumped.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or os.path.join('~', '.cache', 'ddpm_jax')
    return os.path.join(os.path.expanduser(cache_dir),
                        f'digits_net_{VERSION}_{_source_hash()}_seed0.npz')


@functools.cache
def _source_hash() -> str:
    """8 hex digits of this module's source: any edit of the recipe retrains rather
    than reuse a cache, even if VERSION was not bumped (read once, on first use)."""
    with open(__file__, 'rb') as source:
        return hashlib.sha256(source.read()).hexdigest()[:8]


def _read_cache(path: str) -> dict[str, Any] | None:
    """The cached variables, or None when the file is missing, damaged or mismatched."""
    expected = _variable_shapes()
    try:
        with np.load(path, allow_pickle=False) as npz:
            flat = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None
    if set(flat) != set(expected) or any(
            (v.shape, v.dtype) != expected[k] for k, v in flat.items()):
        return None
    return traverse_util.unflatten_dict(flat, sep='/')


def _write_cache(path: str, variables: dict[str, Any]) -> None:
    """Writes the .npz atomically: a reader sees the old file, no file, or the whole new one."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # The temporary file sits in the same directory, so os.replace is a rename within
    # one file system, which POSIX makes atomic.
    fd, tmp_path = tempfile.mkstemp(prefix='.digits_net_', suffix='.npz.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, **_flatten(variables))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_or_train(cache_dir: str | None = None) -> dict[str, Any]:
    """The seed-0 `DigitsNet` variables, from the cache or freshly trained.

    A missing, truncated or otherwise unreadable cache file (or one whose arrays do
    not fit the current architecture) is replaced by a newly trained network.
    Concurrent processes may both train; each writes atomically and the results are
    identical, so whichever rename lands last is as good as the first.

    Args:
        cache_dir: Directory of the cache; see `cache_path` for the default.

    Returns:
        The variables {'params': ...} as NumPy arrays.
    """
    path = cache_path(cache_dir)
    variables = _read_cache(path)
    if variables is None:
        variables = train_digits_net(seed=0)
        _write_cache(path, variables)
        variables = traverse_util.unflatten_dict(_flatten(variables), sep='/')
    return variables


@jax.jit
def _apply(variables: dict[str, Any], pixels: jax.Array) -> dict[str, jax.Array]:
    # Variables are an argument, not a closure constant, so every set of variables
    # shares one compiled program per input shape.
    return DigitsNet().apply(variables, pixels)


def make_feature_fn(variables: dict[str, Any]) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """Binds variables to the network: `fn(pixels) -> {'features', 'logits'}`.

    Args:
        variables: `DigitsNet` variables, e.g. from `load_or_train`.

    Returns:
        A function of uint8 (or [0, 255] float) pixels [B, 8, 8, 1] returning
        {'features': [B, FEATURE_DIM], 'logits': [B, NUM_CLASSES]}; it can be called
        inside `jax.jit`.
    """
    def feature_fn(pixels: jax.Array) -> dict[str, jax.Array]:
        return _apply(variables, pixels)
    return feature_fn
