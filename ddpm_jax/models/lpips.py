"""LPIPS, the learned perceptual distance of Zhang et al. 2018, with its VGG16 backbone.

Owns `LPIPS` (a Flax Linen port of the `lpips` package's `LPIPS(net='vgg',
version='0.1')`, richzhang/PerceptualSimilarity `lpips/lpips.py` and
`lpips/pretrained_networks.py`, which is also the stripped copy that taming
transformers and latent diffusion use as the perceptual term of their autoencoder
losses, taming/modules/losses/lpips.py), the mapping from the two published weight
files to its parameters, and the loading of those files (PyTorch not needed).

The distance of images x0, x1 in [-1, 1] (NHWC), per example:

    d(x0, x1) = sum_l mean_{h,w} sum_c w_lc (f_l(x0) - f_l(x1))^2_{hwc}

* each input is scaled as the reference's `ScalingLayer`: (x - shift) / scale,
  shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450) per RGB channel
  (ImageNet's normalisation, rewritten for inputs in [-1, 1]);
* l runs over five taps of torchvision's VGG16 `features` (3x3 convolutions with
  padding 1 and ReLU, 2x2 max pools of stride 2): relu1_2, relu2_2, relu3_3, relu4_3,
  relu5_3 with 64, 128, 256, 512, 512 channels; four pools lie before the last tap
  (the fifth pool, after relu5_3, is unused);
* f_l is the tap unit-normalised over channels, x / (sqrt(sum_c x^2) + 1e-10)
  (the reference's `normalize_tensor`);
* w_l are the learned non-negative weights of the 1x1 convolutions without bias
  (`NetLinLayer`; their dropout is off at evaluation).

Grey images (one channel) are repeated to RGB first. Inputs must be at least
`MIN_IMAGE_SIZE` = 16 pixels a side: the four pools take 16 to 1 at relu5_3 (the
reference's floor-mode pools fail below that); no resizing is done, so the value
is the reference's at every size it accepts.

Weights come from two files the user supplies, read by `ddpm_jax.torch_checkpoint`:

* torchvision's ImageNet VGG16, `vgg16-397923af.pth` (`VGG16_URL`): tensors
  `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}` (the classifier's
  tensors are ignored);
* the LPIPS v0.1 linear layers, `lpips/weights/v0.1/vgg.pth` of the `lpips` package
  (`LPIPS_URL`; taming's `vgg_lpips` download is the same file): tensors
  `lin{0..4}.model.1.weight` of shape [1, C, 1, 1].

The one departure from the reference is in the gradient, not the value: the norm's
square root is taken with a zero gradient where a feature vector is exactly zero
(where the reference's derivative of sqrt is 0/0; ReLU's own gradient masks it).
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import torch_checkpoint

__all__ = [
    'SHIFT', 'SCALE', 'NORM_EPS', 'TAP_CHANNELS', 'VGG16_BLOCKS', 'MIN_IMAGE_SIZE',
    'VGG16_FILENAME', 'VGG16_URL', 'LPIPS_FILENAME', 'LPIPS_URL', 'VGG16Features',
    'LPIPS', 'normalize_channels', 'torch_vgg16_names', 'torch_lin_names',
    'check_weight_file', 'params_from_torch_state_dicts', 'load_lpips_params',
]

# The reference's ScalingLayer (lpips/lpips.py, taming's lpips.py): (x - SHIFT) / SCALE.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # normalize_tensor(in_feat, eps=1e-10).
TAP_CHANNELS = (64, 128, 256, 512, 512)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
# torchvision's vgg16 `features` (config 'D') as blocks of (name, index in `features`,
# output channels); a 2x2 max pool precedes every block but the first, and each
# block's last ReLU is an LPIPS tap.
VGG16_BLOCKS = (
    (('conv1_1', 0, 64), ('conv1_2', 2, 64)),
    (('conv2_1', 5, 128), ('conv2_2', 7, 128)),
    (('conv3_1', 10, 256), ('conv3_2', 12, 256), ('conv3_3', 14, 256)),
    (('conv4_1', 17, 512), ('conv4_2', 19, 512), ('conv4_3', 21, 512)),
    (('conv5_1', 24, 512), ('conv5_2', 26, 512), ('conv5_3', 28, 512)),
)
MIN_IMAGE_SIZE = 2 ** (len(VGG16_BLOCKS) - 1)  # 16: relu5_3 is 1x1.

VGG16_FILENAME = 'vgg16-397923af.pth'
VGG16_URL = 'https://download.pytorch.org/models/' + VGG16_FILENAME
LPIPS_FILENAME = 'vgg.pth'
LPIPS_URL = ('https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/'
             'v0.1/vgg.pth')
_VGG16_WHAT = (f"torchvision's ImageNet VGG16 weights {VGG16_FILENAME} "
               f'(published at {VGG16_URL})')
_LPIPS_WHAT = (f"the LPIPS v0.1 linear layers, the lpips package's "
               f'lpips/weights/v0.1/{LPIPS_FILENAME} (published at {LPIPS_URL})')

Array = jax.Array


def normalize_channels(x: Array, eps: float = NORM_EPS) -> Array:
    """x / (||x||_channels + eps), the reference's `normalize_tensor` (last axis).

    The norm's gradient is zero where a feature vector is exactly zero (sqrt has no
    derivative at 0); the value is the reference's everywhere.
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return x / (norm + eps)


class VGG16Features(nn.Module):
    """torchvision's VGG16 `features` up to relu5_3: the five LPIPS taps, NHWC."""
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, ...]:
        taps = []
        for block, convs in enumerate(VGG16_BLOCKS):
            if block:  # Floor mode, as torch's MaxPool2d(2, 2).
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
            for name, _, channels in convs:
                x = nn.relu(nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)),
                                    precision=self.precision, name=name)(x))
            taps.append(x)
        return tuple(taps)


class LPIPS(nn.Module):
    """d(x0, x1) per example [B] (module docstring); float32 throughout.

    Parameters: {'vgg': VGG16Features' convolutions, 'lin0'..'lin4': [C] weights}.

    Attributes:
        precision: Of the convolutions (None: the backend's default).
    """
    precision: Any = None

    def setup(self):
        self.vgg = VGG16Features(self.precision)
        # Random stand-ins until loaded: non-negative, as the trained ones.
        self.lins = [self.param(f'lin{k}', nn.initializers.uniform(2.0 / c), (c,))
                     for k, c in enumerate(TAP_CHANNELS)]

    def features(self, x: Array) -> tuple[Array, ...]:
        """The five unit-normalised taps of images [B, H, W, 1 or 3] in [-1, 1].

        Raises:
            ValueError: Not [B, H, W, C] with C = 1 or 3 and H, W >= 16.
        """
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError('LPIPS compares [B, H, W, C] images with C = 1 or 3, got '
                             f'shape {x.shape}.')
        if min(x.shape[1:3]) < MIN_IMAGE_SIZE:
            raise ValueError(f'LPIPS needs images of at least {MIN_IMAGE_SIZE}x'
                             f'{MIN_IMAGE_SIZE} pixels (its VGG16 halves them four times), '
                             f'got {x.shape[1]}x{x.shape[2]}.')
        x = x.astype(jnp.float32)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        x = (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)
        return tuple(normalize_channels(tap) for tap in self.vgg(x))

    def distance(self, features0: Sequence[Array], features1: Sequence[Array],
                 dropout_rng: Array | None = None, dropout_rate: float = 0.5) -> Array:
        """d per example [B] from two images' `features`.

        With `dropout_rng`, each squared difference is dropped with probability
        `dropout_rate` and the rest scaled by 1 / (1 - rate) before its lin layer: the
        reference's `NetLinLayer` (Dropout then the 1x1 convolution) in training mode,
        in which taming's and LDM's autoencoders train with it (Lightning's
        `model.train()` turns their `.eval()` LPIPS back on); an unbiased estimate of d.
        """
        total = 0.0
        keys = (jax.random.split(dropout_rng, len(self.lins)) if dropout_rng is not None
                else [None] * len(self.lins))
        for lin, f0, f1, key in zip(self.lins, features0, features1, keys):
            diff = jnp.square(f0 - f1)
            if key is not None and dropout_rate > 0:
                keep = 1.0 - dropout_rate
                diff = jnp.where(jax.random.bernoulli(key, keep, diff.shape), diff / keep, 0.0)
            weighted = jnp.einsum('bhwc,c->bhw', diff, lin, precision=self.precision)
            total = total + jnp.mean(weighted, axis=(1, 2))
        return total

    def __call__(self, x0: Array, x1: Array) -> Array:
        if x0.shape != x1.shape:
            raise ValueError(f'LPIPS compares images of one shape, got {x0.shape} and '
                             f'{x1.shape}.')
        return self.distance(self.features(x0), self.features(x1))


# ----------------------------------------------------------------------------- weights


def torch_vgg16_names() -> dict[str, tuple[tuple[str, str], tuple[int, ...]]]:
    """{torch name: ((layer, 'kernel' or 'bias'), torch shape)} of the VGG16 tensors."""
    names, in_channels = {}, 3
    for convs in VGG16_BLOCKS:
        for layer, index, out_channels in convs:
            names[f'features.{index}.weight'] = ((layer, 'kernel'),
                                                 (out_channels, in_channels, 3, 3))
            names[f'features.{index}.bias'] = ((layer, 'bias'), (out_channels,))
            in_channels = out_channels
    return names


def torch_lin_names() -> dict[str, tuple[str, tuple[int, ...]]]:
    """{torch name: (parameter name, torch shape)} of the LPIPS linear layers."""
    return {f'lin{k}.model.1.weight': (f'lin{k}', (1, c, 1, 1))
            for k, c in enumerate(TAP_CHANNELS)}


def check_weight_file(path: str, field: str, *, vgg16: bool, hint: str = '') -> str:
    """The path of an existing weights file, or one line saying what is needed.

    Args:
        path: The configured path ('' counts as not given); ~ is expanded.
        field: The config field it came from, named in the message.
        vgg16: True for the VGG16 file, False for the LPIPS linear layers.
        hint: Appended to the message (before its full stop).

    Returns:
        The expanded path.

    Raises:
        ValueError: `path` is empty or not a file; the message names `field`, the
            file needed and where it is published.
    """
    what = _VGG16_WHAT if vgg16 else _LPIPS_WHAT
    if not path:
        raise ValueError(f'{field} is empty: the LPIPS perceptual term needs {what}; '
                         f'download it and set {field} to its path{hint}.')
    expanded = os.path.expanduser(path)
    if not os.path.isfile(expanded):
        raise ValueError(f'{field}={path!r} is not a file: the LPIPS perceptual term needs '
                         f'{what}; download it and set {field} to its path{hint}.')
    return expanded


def _checked(state_dict: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...],
             where: str, what: str) -> np.ndarray:
    if name not in state_dict:
        found = ', '.join(list(state_dict)[:4]) or 'no tensors'
        raise ValueError(f'{where} has no tensor {name} (it holds {found}, ...); it must be '
                         f'{what}.')
    value = np.asarray(state_dict[name])
    if value.shape != shape:
        raise ValueError(f'{where}: tensor {name} has shape {value.shape}, expected {shape}; '
                         f'it must be {what}.')
    if value.dtype.kind in 'biuc':
        raise ValueError(f'{where}: tensor {name} has dtype {value.dtype}, expected floats; '
                         f'it must be {what}.')
    value = value.astype(np.float32)
    if not np.all(np.isfinite(value)):
        raise ValueError(f'{where}: tensor {name} is not finite; it must be {what}.')
    return value


def params_from_torch_state_dicts(vgg16: Mapping[str, np.ndarray],
                                  lins: Mapping[str, np.ndarray], *,
                                  vgg16_where: str = 'the VGG16 state dict',
                                  lins_where: str = 'the LPIPS state dict'
                                  ) -> dict[str, Any]:
    """`LPIPS` parameters (float32 NumPy) from the two state dicts.

    Args:
        vgg16: torchvision's VGG16 state dict (extra tensors are ignored).
        lins: The LPIPS linear layers' state dict (extra tensors are ignored).
        vgg16_where, lins_where: How errors name each source (a field and a path).

    Raises:
        ValueError: A tensor missing, of another shape, not floating point, not
            finite, or (a linear layer) negative; the message names the tensor.
    """
    vgg = {}
    for name, ((layer, kind), shape) in torch_vgg16_names().items():
        value = _checked(vgg16, name, shape, vgg16_where, _VGG16_WHAT)
        # torch OIHW -> Flax HWIO.
        vgg.setdefault(layer, {})[kind] = value.transpose(2, 3, 1, 0) if kind == 'kernel' \
            else value
    params = {'vgg': vgg}
    for name, (param, shape) in torch_lin_names().items():
        value = _checked(lins, name, shape, lins_where, _LPIPS_WHAT)
        if np.any(value < 0):
            raise ValueError(f'{lins_where}: tensor {name} has negative weights (the trained '
                             f'LPIPS layers are non-negative); it must be {_LPIPS_WHAT}.')
        params[param] = value.reshape(-1)
    return params


def _read(path: str, field: str) -> dict[str, np.ndarray]:
    try:
        return torch_checkpoint.load_state_dict(path)
    except ValueError as e:  # TorchCheckpointError: one line naming the file.
        raise ValueError(f'{field}: {e}') from e


def load_lpips_params(lpips_path: str, vgg16_path: str, *,
                      lpips_field: str = 'autoencoder.lpips_weights_path',
                      vgg16_field: str = 'autoencoder.vgg16_weights_path'
                      ) -> dict[str, Any]:
    """Reads the two weight files into `LPIPS` parameters (PyTorch not needed).

    A file whose name carries a torch.hub hash prefix (`vgg16-397923af.pth`) is
    checked against it (`torch_checkpoint.check_hash`).

    Args:
        lpips_path: The LPIPS v0.1 linear layers (`vgg.pth`).
        vgg16_path: torchvision's VGG16 weights (`vgg16-397923af.pth`).
        lpips_field, vgg16_field: The config fields the paths came from (for errors).

    Returns:
        {'vgg': ..., 'lin0'..'lin4': ...} float32 NumPy arrays.

    Raises:
        ValueError: One line naming the field: a path missing, a file unreadable or
            not matching its hash, a tensor missing or mis-shaped.
    """
    lpips_path = check_weight_file(lpips_path, lpips_field, vgg16=False)
    vgg16_path = check_weight_file(vgg16_path, vgg16_field, vgg16=True)
    for path, field in ((lpips_path, lpips_field), (vgg16_path, vgg16_field)):
        prefix = torch_checkpoint.hash_prefix_from_name(path)
        if prefix:
            try:
                torch_checkpoint.check_hash(path, prefix)
            except ValueError as e:
                raise ValueError(f'{field}: {e} (a damaged or different file).') from e
    return params_from_torch_state_dicts(
        _read(vgg16_path, vgg16_field), _read(lpips_path, lpips_field),
        vgg16_where=f'{vgg16_field}={vgg16_path!r}', lins_where=f'{lpips_field}={lpips_path!r}')
