"""The Inception-v3 network on which FID, sFID and the Inception Score are defined.

Owns `InceptionV3`, a Flax Linen port (NHWC, float32) of the TensorFlow graph
`inception-2015-12-05` (`classify_image_graph_def.pb`) as pytorch-fid re-implements
it (mseitzer/pytorch-fid, `src/pytorch_fid/inception.py`, `fid_inception_v3`), the
mapping between pytorch-fid's released state dict
(`pt_inception-2015-12-05-6726825d.pth`) and the Flax variables, and the loading of
that file. FID itself (Heusel et al. 2017) lives with the evaluation code, not here.

The network is torchvision's Inception-v3 (Szegedy et al. 2016) without the
auxiliary head, with a 1008-way classifier, BatchNorm eps 1e-3, convolutions
without bias, and the four patches pytorch-fid makes to match the TF graph:
`FIDInceptionA` (Mixed_5b-d), `FIDInceptionC` (Mixed_6b-e) and `FIDInceptionE_1`
(Mixed_7b) average-pool with count_include_pad=False (TF's 'SAME' average pool
divides by the number of real pixels), and `FIDInceptionE_2` (Mixed_7c) max-pools
in its pool branch (an oddity of the TF graph that FID has inherited).

Input pipeline (pytorch-fid): images in [0, 255] are scaled to [0, 1] (its
`ToTensor`), resized to 299x299 with `F.interpolate(mode='bilinear',
align_corners=False)` (no antialiasing, even when shrinking), and only then mapped
to [-1, 1] by 2x - 1 (`normalize_input`). The TF graph itself differs in two small
ways that this module does not reproduce: it resizes with TF1's ResizeBilinear
(no half-pixel offset) and normalises by (x - 128) / 128 (see torch-fidelity's
`feature_extractor_inceptionv3.py`). The ADM evaluator runs the TF graph, so its
numbers differ slightly from pytorch-fid's, and so from these.

Outputs and their TF graph names (the graph calls Mixed_5b..7c `mixed`, `mixed_1`,
..., `mixed_10`; within a block `conv` is the 1x1 branch and `tower`, `tower_1`,
`tower_2` the others, see torch-fidelity's `utils/util_convert_inception_weights.py`):

  'pool3'            [B, 2048]  `pool_3:0`, global average pool after Mixed_7c (FID).
  'logits'           [B, 1008]  `softmax/logits:0`, fc on pool3 with its bias.
  'logits_unbiased'  [B, 1008]  pool3 @ fc.weight.T without the bias: the Inception
                     Score of Salimans et al. 2016 (openai/improved-gan,
                     `inception_score/model.py`) and of the ADM evaluator
                     (openai/guided-diffusion, `evaluations/evaluator.py`,
                     `_create_softmax_graph`) multiplies pool_3 by the weight input
                     of `softmax/logits/MatMul` and takes the softmax over all 1008
                     classes, so it ignores the bias (torch-fidelity's
                     'logits_unbiased' does the same).
  'spatial'          [B, 17, 17, 7]  `mixed_6/conv:0`[..., :7], the sFID features
                     (Nash et al. 2021; ADM evaluator `FID_SPATIAL_NAME`). mixed_6 is
                     Mixed_6d and its `conv` is the 1x1 branch `Mixed_6d.branch1x1`
                     (torch-fidelity maps `mixed_6/conv/conv2d_params` and
                     `mixed_6/conv/batchnorm` onto it). The tensor `mixed_6/conv:0` is
                     the output of the op named `mixed_6/conv` itself, the layer's
                     ReLU (its convolution and batch norm are `mixed_6/conv/Conv2D`
                     and `mixed_6/conv/batchnorm`), so these are post-ReLU values: the
                     first 7 channels of the output of Mixed_6d, whose first 192
                     channels are branch1x1 (as reported in openai/guided-diffusion
                     issue #109).

Variables: 'params' holds the 23,850,960 trainable numbers (convolution kernels,
BatchNorm scale and bias, fc) and 'batch_stats' the BatchNorm running statistics
('mean', 'var'), used in inference mode only. Module names follow torchvision
(`Conv2d_1a_3x3`, `Mixed_5b/branch1x1/conv`, `fc`), so a torch name maps to a Flax
path by splitting on dots.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ddpm_jax import torch_checkpoint

__all__ = [
    'INCEPTION_ENV_VAR', 'INCEPTION_FILENAME', 'INCEPTION_URL', 'INCEPTION_HASH_PREFIX',
    'INPUT_SIZE', 'NUM_CLASSES', 'SPATIAL_CHANNELS', 'InceptionV3', 'BasicConv2d',
    'FIDInceptionA', 'InceptionB', 'FIDInceptionC', 'InceptionD', 'FIDInceptionE_1',
    'FIDInceptionE_2', 'bilinear_source_indices', 'resize_bilinear', 'preprocess_images',
    'avg_pool_exclude_pad', 'variable_shapes', 'params_from_torch_state_dict',
    'torch_state_dict_from_params', 'resolve_inception_path', 'load_inception_variables',
    'make_feature_fn',
]

INCEPTION_ENV_VAR = 'DDPM_JAX_INCEPTION'
INCEPTION_FILENAME = 'pt_inception-2015-12-05-6726825d.pth'
INCEPTION_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                 + INCEPTION_FILENAME)
# torch.hub convention: the file name carries the first 8 hex digits of its SHA-256.
INCEPTION_HASH_PREFIX = '6726825d'

INPUT_SIZE = 299
NUM_CLASSES = 1008  # The TF graph's 1000 ImageNet classes plus 8 unused ones.
SPATIAL_CHANNELS = 7  # ADM evaluator: spatial = mixed_6/conv:0[..., :7].
BN_EPSILON = 1e-3  # TF graph's BatchNormWithGlobalNormalization; torchvision's eps=0.001.

# FID compares against published numbers, so float32 convolutions run at full
# precision even where the backend would otherwise use TF32 or bf16 passes.
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST

Array = jax.Array


# ----------------------------------------------------------------------------- input


def bilinear_source_indices(in_size: int, out_size: int
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Taps and weights of PyTorch's bilinear resize with align_corners=False.

    Output pixel i samples the input at the half-pixel-centre coordinate
    s = (i + 0.5) * in_size / out_size - 0.5, clamped below at 0; it reads pixels
    floor(s) and floor(s) + 1 (the latter clamped to the last pixel) with weights
    1 - frac and frac. This is PyTorch's `area_pixel_compute_source_index` and
    `upsample_bilinear2d`, which apply no antialiasing filter when shrinking.

    Args:
        in_size: input length along one axis.
        out_size: output length along that axis.

    Returns:
        (i0, i1, w0, w1): int32 indices and float64 weights, each [out_size].
    """
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    return i0.astype(np.int32), i1.astype(np.int32), 1.0 - w1, w1


def _resize_axis(x: Array, axis: int, out_size: int) -> Array:
    i0, i1, w0, w1 = bilinear_source_indices(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w0 = jnp.asarray(w0.reshape(shape), x.dtype)
    w1 = jnp.asarray(w1.reshape(shape), x.dtype)
    return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear(images: Array, height: int = INPUT_SIZE, width: int = INPUT_SIZE
                    ) -> Array:
    """`F.interpolate(images, (height, width), mode='bilinear', align_corners=False)`.

    Bilinear interpolation is separable, so the width and height passes are two
    two-tap gathers (exact, and O(output) rather than a dense resampling matmul).

    Args:
        images: [B, H, W, C] float.
        height: output height.
        width: output width.

    Returns:
        [B, height, width, C], same dtype.
    """
    x = _resize_axis(images, 2, width)
    return _resize_axis(x, 1, height)


def preprocess_images(images: Array, resize_input: bool = True) -> Array:
    """pytorch-fid's input pipeline: [0, 255] -> [0, 1] -> resize to 299 -> [-1, 1].

    Args:
        images: [B, H, W, C] uint8, or float in [0, 255]; C is 3, or 1 for grey
            images, which are repeated to RGB as PIL's convert('RGB') does.
        resize_input: resize to 299x299 (pytorch-fid's `resize_input`). FID is
            defined with it on; off only makes sense for inputs already 299x299.

    Returns:
        [B, 299, 299, 3] float32 in [-1, 1] (input size if resize_input is False).

    Raises:
        ValueError: if images is not 4-D with 1 or 3 channels.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError('Inception expects [B, H, W, C] images with C = 1 or 3, got shape '
                         f'{tuple(images.shape)}.')
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if resize_input:
        x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
    # pytorch-fid normalises after resizing; both are affine, but the float32
    # rounding follows the same order.
    return 2.0 * x - 1.0


# ----------------------------------------------------------------------------- blocks


def avg_pool_exclude_pad(x: Array) -> Array:
    """3x3, stride 1, pad 1 average pool that ignores the padding (TF 'SAME').

    `F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)`: a border output divides by
    the number of real pixels in its window (4 at a corner, 6 along an edge).
    """
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_stride2(x: Array) -> Array:
    """`F.max_pool2d(x, kernel_size=3, stride=2)` (no padding)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3, running statistics), ReLU.

    torchvision's `BasicConv2d`; submodules 'conv' and 'bn' as in its state dict.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                    name='conv')(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='bn')(x)
        return nn.relu(x)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and pool branches."""

    pool_features: int
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch1x1 = conv(64, (1, 1), name='branch1x1')(x)
        branch5x5 = conv(48, (1, 1), name='branch5x5_1')(x)
        branch5x5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(branch5x5)
        branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(branch3x3dbl)
        branch_pool = conv(self.pool_features, (1, 1), name='branch_pool')(
            avg_pool_exclude_pad(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a); unchanged by pytorch-fid."""

    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch3x3 = conv(384, (3, 3), strides=(2, 2), name='branch3x3')(x)
        branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), strides=(2, 2), name='branch3x3dbl_3')(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_stride2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b-e)."""

    channels_7x7: int
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        branch1x1 = conv(192, (1, 1), name='branch1x1')(x)
        branch7x7 = conv(c7, (1, 1), name='branch7x7_1')(x)
        branch7x7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(branch7x7)
        branch7x7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(branch7x7)
        dbl = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
        dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(dbl)
        dbl = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(dbl)
        dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(dbl)
        dbl = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(dbl)
        branch_pool = conv(192, (1, 1), name='branch_pool')(avg_pool_exclude_pad(x))
        return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a); unchanged by pytorch-fid."""

    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch3x3 = conv(192, (1, 1), name='branch3x3_1')(x)
        branch3x3 = conv(320, (3, 3), strides=(2, 2), name='branch3x3_2')(branch3x3)
        branch7x7x3 = conv(192, (1, 1), name='branch7x7x3_1')(x)
        branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
        branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
        branch7x7x3 = conv(192, (3, 3), strides=(2, 2), name='branch7x7x3_4')(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_stride2(x)], axis=-1)


class FIDInceptionE_1(nn.Module):  # noqa: N801 (pytorch-fid's class name)
    """8x8 block with expanded filter banks (Mixed_7b); average pool branch."""

    precision: Any = DEFAULT_PRECISION
    # Mixed_7c of the TF graph max-pools here; see FIDInceptionE_2.
    max_pool_branch: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch1x1 = conv(320, (1, 1), name='branch1x1')(x)
        branch3x3 = conv(384, (1, 1), name='branch3x3_1')(x)
        branch3x3 = jnp.concatenate([
            conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(branch3x3),
            conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(branch3x3),
        ], axis=-1)
        dbl = conv(448, (1, 1), name='branch3x3dbl_1')(x)
        dbl = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(dbl)
        dbl = jnp.concatenate([
            conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(dbl),
            conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(dbl),
        ], axis=-1)
        if self.max_pool_branch:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = avg_pool_exclude_pad(x)
        branch_pool = conv(192, (1, 1), name='branch_pool')(pooled)
        return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class FIDInceptionE_2(FIDInceptionE_1):  # noqa: N801 (pytorch-fid's class name)
    """Mixed_7c: as FIDInceptionE_1 but the pool branch max-pools (3x3, stride 1, pad 1)."""

    max_pool_branch: ClassVar[bool] = True


class _Logits(nn.Module):
    """The fc layer ('kernel' [2048, 1008], 'bias'), also returning pool3 @ kernel."""

    num_classes: int
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        kernel = self.param('kernel', nn.initializers.lecun_normal(),
                            (x.shape[-1], self.num_classes), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (self.num_classes,), jnp.float32)
        unbiased = jnp.dot(x, kernel, precision=self.precision)
        return unbiased + bias, unbiased


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 from raw images to FID / sFID / IS features.

    Attributes:
        resize_input: resize inputs to 299x299 first (pytorch-fid's default; FID is
            defined with it). Off only for inputs that are already 299x299, or in
            tests that run the fully convolutional body on small images.
        precision: matmul/convolution precision (default HIGHEST, i.e. true float32).
    """

    resize_input: bool = True
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, images: Array) -> dict[str, Array]:
        """Features of a batch of images.

        Args:
            images: [B, H, W, C] uint8 or float in [0, 255], C = 3 (or 1: grey).

        Returns:
            {'pool3': [B, 2048], 'logits': [B, 1008], 'logits_unbiased': [B, 1008],
             'spatial': [B, 17, 17, 7]}, float32 (see the module docstring).
        """
        x = preprocess_images(images, self.resize_input)  # [B, 299, 299, 3]
        conv = functools.partial(BasicConv2d, precision=self.precision)
        p = dict(precision=self.precision)
        x = conv(32, (3, 3), strides=(2, 2), name='Conv2d_1a_3x3')(x)  # [B, 149, 149, 32]
        x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)  # [B, 147, 147, 32]
        x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)  # [B, 147, 147, 64]
        x = _max_pool_stride2(x)  # [B, 73, 73, 64]
        x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)  # [B, 73, 73, 80]
        x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)  # [B, 71, 71, 192]
        x = _max_pool_stride2(x)  # [B, 35, 35, 192]
        x = FIDInceptionA(32, **p, name='Mixed_5b')(x)  # [B, 35, 35, 256]
        x = FIDInceptionA(64, **p, name='Mixed_5c')(x)  # [B, 35, 35, 288]
        x = FIDInceptionA(64, **p, name='Mixed_5d')(x)  # [B, 35, 35, 288]
        x = InceptionB(**p, name='Mixed_6a')(x)  # [B, 17, 17, 768]
        x = FIDInceptionC(128, **p, name='Mixed_6b')(x)
        x = FIDInceptionC(160, **p, name='Mixed_6c')(x)
        x = FIDInceptionC(160, **p, name='Mixed_6d')(x)
        # Channels 0..191 of Mixed_6d are its branch1x1 (post-ReLU), TF's mixed_6/conv.
        spatial = x[..., :SPATIAL_CHANNELS]  # [B, 17, 17, 7]
        x = FIDInceptionC(192, **p, name='Mixed_6e')(x)  # [B, 17, 17, 768]
        x = InceptionD(**p, name='Mixed_7a')(x)  # [B, 8, 8, 1280]
        x = FIDInceptionE_1(**p, name='Mixed_7b')(x)  # [B, 8, 8, 2048]
        x = FIDInceptionE_2(**p, name='Mixed_7c')(x)  # [B, 8, 8, 2048]
        pool3 = jnp.mean(x, axis=(1, 2))  # [B, 2048]
        logits, logits_unbiased = _Logits(NUM_CLASSES, **p, name='fc')(pool3)
        return {'pool3': pool3, 'logits': logits, 'logits_unbiased': logits_unbiased,
                'spatial': spatial}


# ----------------------------------------------------------------------------- weights


def variable_shapes() -> dict[str, Any]:
    """{'params': ..., 'batch_stats': ...} of `InceptionV3` as ShapeDtypeStructs.

    Traced with `jax.eval_shape`, so nothing is computed or allocated.
    """
    model = InceptionV3(resize_input=False)
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)
    return jax.eval_shape(model.init, jax.random.key(0), images)


_BN_TORCH_SUFFIX = {
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def _torch_name(collection: str, path: tuple[str, ...]) -> tuple[str, bool]:
    """Torch state-dict name of a Flax variable, and whether its layout is transposed."""
    *modules, leaf = path
    prefix = '.'.join(modules)
    if modules == ['fc']:
        return f'fc.{"weight" if leaf == "kernel" else "bias"}', leaf == 'kernel'
    if modules[-1] == 'conv' and leaf == 'kernel':
        return f'{prefix}.weight', True
    if modules[-1] == 'bn' and (collection, leaf) in _BN_TORCH_SUFFIX:
        return f'{prefix}.{_BN_TORCH_SUFFIX[collection, leaf]}', False
    raise ValueError(f'No torch name for Inception variable {collection}/{"/".join(path)}.')


def _to_torch_layout(x: np.ndarray) -> np.ndarray:
    # Conv HWIO -> OIHW; fc [in, out] -> [out, in].
    return np.transpose(x, (3, 2, 0, 1)) if x.ndim == 4 else np.transpose(x)


def _from_torch_layout(x: np.ndarray) -> np.ndarray:
    # Conv OIHW -> HWIO; fc [out, in] -> [in, out].
    return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else np.transpose(x)


def _torch_spec() -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
    """torch name -> (collection, Flax path, torch shape, transposed)."""
    spec = {}
    for (collection, *path), leaf in traverse_util.flatten_dict(variable_shapes()).items():
        name, transposed = _torch_name(collection, tuple(path))
        shape = tuple(leaf.shape)
        if transposed:
            shape = _to_torch_layout(np.empty(shape, np.bool_)).shape
        spec[name] = (collection, tuple(path), shape, transposed)
    return spec


def _short_list(names: list[str], limit: int = 8) -> str:
    more = f', ... ({len(names) - limit} more)' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more


def params_from_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Maps pytorch-fid's Inception state dict onto the Flax variables of `InceptionV3`.

    Conv weights go from PyTorch's OIHW to Flax's HWIO, fc.weight from [out, in] to
    [in, out]; BatchNorm weight/bias become 'params' scale/bias and
    running_mean/running_var 'batch_stats' mean/var. `*.num_batches_tracked`
    buffers of existing BatchNorm layers are ignored.

    Args:
        state_dict: torch name -> array (NumPy or anything `np.asarray` accepts),
            e.g. from `ddpm_jax.torch_checkpoint.load_state_dict`.

    Returns:
        {'params': ..., 'batch_stats': ...}, nested dicts of float32 NumPy arrays.

    Raises:
        ValueError: naming the tensors that are missing, unexpected, not floating
            point or of the wrong shape.
    """
    spec = _torch_spec()
    ignored = {name[:-len('weight')] + 'num_batches_tracked'
               for name in spec if name.endswith('.bn.weight')}
    missing = sorted(set(spec) - set(state_dict))
    if missing:
        raise ValueError(f'Inception state dict is missing {len(missing)} tensor(s): '
                         f'{_short_list(missing)}.')
    extra = sorted(set(state_dict) - set(spec) - ignored)
    if extra:
        raise ValueError(f'Inception state dict has {len(extra)} unexpected tensor(s): '
                         f'{_short_list(extra)}.')
    flat = {}
    for name, (collection, path, shape, transposed) in spec.items():
        value = np.asarray(state_dict[name])
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f'Inception tensor {name} has dtype {value.dtype}, expected '
                             'floating point.')
        if value.shape != shape:
            raise ValueError(f'Inception tensor {name} has shape {value.shape}, expected '
                             f'{shape}.')
        if transposed:
            value = _from_torch_layout(value)
        flat[(collection, *path)] = np.ascontiguousarray(value, dtype=np.float32)
    return traverse_util.unflatten_dict(flat)


def torch_state_dict_from_params(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `params_from_torch_state_dict`: Flax variables -> torch names.

    Args:
        variables: {'params': ..., 'batch_stats': ...} of `InceptionV3`.

    Returns:
        torch name -> float32 NumPy array in PyTorch layout (no num_batches_tracked).

    Raises:
        ValueError: if a variable is missing, unexpected or of the wrong shape.
    """
    spec = _torch_spec()
    flat = traverse_util.flatten_dict({c: variables[c] for c in ('params', 'batch_stats')
                                       if c in variables})
    by_path = {(collection, *path): name
               for name, (collection, path, _, _) in spec.items()}
    missing = sorted('/'.join(k) for k in set(by_path) - set(flat))
    extra = sorted('/'.join(k) for k in set(flat) - set(by_path))
    if missing or extra:
        raise ValueError(f'Inception variables do not match the architecture: missing '
                         f'[{_short_list(missing)}], unexpected [{_short_list(extra)}].')
    state_dict = {}
    for name, (collection, path, shape, transposed) in spec.items():
        value = np.asarray(flat[(collection, *path)], dtype=np.float32)
        if transposed:
            value = _to_torch_layout(value)
        if value.shape != shape:
            raise ValueError(f'Inception variable {collection}/{"/".join(path)} gives '
                             f'{name} of shape {value.shape}, expected {shape}.')
        state_dict[name] = np.ascontiguousarray(value)
    return state_dict


def _missing_weights_message(detail: str) -> str:
    return (f'{detail}: FID/sFID/IS need {INCEPTION_FILENAME}, published in the '
            f'pytorch-fid GitHub releases ({INCEPTION_URL}); download it and pass its path '
            f'as config field eval.inception_path or environment variable {INCEPTION_ENV_VAR}.')


def resolve_inception_path(path: str = '') -> str:
    """The Inception weights file: `path`, or $DDPM_JAX_INCEPTION when path is empty.

    Args:
        path: explicit path (e.g. config.eval.inception_path); '' defers to the
            environment variable.

    Returns:
        The path of an existing file (with ~ expanded).

    Raises:
        FileNotFoundError: one line saying which file is needed, where it is
            published and how to pass it, if no path is given or the file is absent.
    """
    path = path or os.environ.get(INCEPTION_ENV_VAR, '')
    if not path:
        raise FileNotFoundError(_missing_weights_message(
            f'No Inception weights given (eval.inception_path and ${INCEPTION_ENV_VAR} '
            'are empty)'))
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_weights_message(f'No file at {path}'))
    return path


def load_inception_variables(path: str = '',
                             expected_hash_prefix: str | None = INCEPTION_HASH_PREFIX
                             ) -> dict[str, Any]:
    """Reads pytorch-fid's Inception weights (a .pth file; PyTorch not needed).

    Args:
        path: the .pth file, or '' for $DDPM_JAX_INCEPTION.
        expected_hash_prefix: leading hex digits of the file's hash (torch.hub
            convention, checked by `torch_checkpoint.check_hash`); None or '' skips
            the check (tests, or deliberately different weights).

    Returns:
        {'params': ..., 'batch_stats': ...} for `InceptionV3` (float32 NumPy arrays).

    Raises:
        FileNotFoundError: one line naming the file, its URL and how to pass it.
        ValueError: if the hash or the tensors do not match.
    """
    path = resolve_inception_path(path)
    if expected_hash_prefix:
        torch_checkpoint.check_hash(path, expected_hash_prefix)
    return params_from_torch_state_dict(torch_checkpoint.load_state_dict(path))


def make_feature_fn(variables: Mapping[str, Any], model: InceptionV3 | None = None
                    ) -> Callable[[Array], dict[str, Array]]:
    """A jitted `images -> features` function closing over the Inception variables.

    The variables are moved to the default device once and passed to the compiled
    function as arguments (not baked in as constants); it compiles once per input
    shape and dtype. Nothing is cached globally.

    Args:
        variables: {'params': ..., 'batch_stats': ...} (e.g. from
            `load_inception_variables`).
        model: the network; default `InceptionV3()` (resize to 299, HIGHEST precision).

    Returns:
        f(images [B, H, W, C] uint8 or float in [0, 255]) -> the dict of
        `InceptionV3.__call__`.
    """
    model = InceptionV3() if model is None else model
    variables = jax.device_put({c: variables[c] for c in ('params', 'batch_stats')})
    apply = jax.jit(model.apply)

    def feature_fn(images: Array) -> dict[str, Array]:
        return apply(variables, images)

    return feature_fn
