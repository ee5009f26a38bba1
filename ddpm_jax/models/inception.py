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
ways: it resizes the [0, 255] images with TF1's ResizeBilinear (align_corners=False,
no half-pixel offset: output pixel i samples the input at i * in / out) and then
normalises by (x - 128) / 128 (its `Sub` and `Mul` after `ResizeBilinear`; see
torch-fidelity's `feature_extractor_inceptionv3.py`). The ADM evaluator (and TTUR's
FID code) run the TF graph; `input_pipeline='tf'` (`eval.inception_input='tf'`)
reproduces it, so that statistics compare with theirs (e.g. an ADM reference
batch's `mu`/`sigma`).

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
                     The graph numbers its classes its own way (tench, ImageNet
                     label 0, is output 449): `imagenet_class_logits` picks the 1000
                     ImageNet classes' logits in the dataset's label order.
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
    'INPUT_SIZE', 'NUM_CLASSES', 'POOL3_DIM', 'IMAGENET_CLASS_OUTPUTS', 'imagenet_class_logits', 'SPATIAL_CHANNELS', 'InceptionV3', 'BasicConv2d',
    'FIDInceptionA', 'InceptionB', 'FIDInceptionC', 'InceptionD', 'FIDInceptionE_1',
    'FIDInceptionE_2', 'bilinear_source_indices', 'resize_bilinear', 'preprocess_images',
    'INPUT_PIPELINES', 'tf1_bilinear_source_indices',
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
POOL3_DIM = 2048  # FID's features.
SPATIAL_CHANNELS = 7  # ADM evaluator: spatial = mixed_6/conv:0[..., :7].
BN_EPSILON = 1e-3  # TF graph's BatchNormWithGlobalNormalization; torchvision's eps=0.001.

# The graph's output scoring ImageNet class c, for c = 0..999 numbered as TFDS's
# imagenet2012 and guided-diffusion number them, and as `data` renumbers
# imagenet_resized (WordNet IDs in sorted order, n01440764 first): the `target_class`
# of each synset in the graph's
# label map, `imagenet_2012_challenge_label_map_proto.pbtxt` (shipped with
# inception-2015-12-05; e.g. n01440764 -> 449, n02510455 (giant panda) -> 169).
# Outputs 0 and 1001-1007 score no class.
IMAGENET_CLASS_OUTPUTS = (
    449, 450, 442, 443, 444, 445, 446, 383, 384, 385, 386, 387, 388, 389, 390, 391,
    392, 393, 394, 395, 396, 397, 398, 399, 400, 494, 495, 496, 497, 498, 499, 500,
    501, 458, 459, 460, 461, 462, 463, 464, 465, 466, 467, 468, 469, 470, 471, 472,
    473, 475, 476, 474, 477, 478, 479, 480, 481, 482, 483, 484, 485, 486, 487, 488,
    489, 490, 491, 492, 493, 601, 602, 603, 604, 605, 606, 607, 608, 609, 610, 611,
    401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416,
    417, 418, 419, 420, 421, 214, 215, 217, 216, 213, 218, 647, 648, 649, 650, 651,
    652, 653, 654, 655, 656, 226, 613, 614, 615, 616, 617, 618, 619, 620, 612, 422,
    423, 424, 425, 427, 426, 428, 429, 430, 438, 431, 432, 433, 434, 435, 436, 437,
    439, 440, 441, 6, 22, 193, 14, 173, 99, 87, 69, 116, 198, 43, 89, 200,
    98, 161, 132, 32, 180, 42, 18, 207, 181, 105, 77, 189, 20, 204, 63, 31,
    66, 21, 25, 45, 170, 119, 210, 107, 126, 88, 145, 59, 160, 152, 72, 33,
    91, 4, 27, 113, 123, 36, 156, 109, 158, 131, 26, 71, 56, 146, 144, 125,
    176, 139, 134, 90, 2, 192, 154, 150, 94, 5, 19, 191, 196, 117, 141, 68,
    93, 51, 208, 184, 97, 29, 171, 124, 128, 47, 64, 211, 112, 187, 114, 86,
    115, 79, 130, 140, 110, 82, 17, 177, 149, 15, 3, 41, 127, 84, 143, 133,
    60, 172, 179, 118, 168, 148, 70, 197, 50, 106, 49, 151, 46, 205, 102, 28,
    58, 155, 136, 202, 34, 62, 1, 159, 67, 174, 55, 10, 95, 8, 11, 201,
    85, 153, 30, 190, 76, 206, 61, 163, 103, 209, 74, 35, 621, 622, 623, 624,
    625, 626, 627, 628, 629, 630, 224, 631, 632, 633, 634, 635, 636, 637, 638, 639,
    640, 641, 642, 643, 644, 645, 646, 225, 657, 658, 188, 129, 164, 157, 13, 53,
    183, 195, 101, 39, 80, 147, 78, 120, 167, 108, 162, 165, 81, 52, 9, 65,
    57, 12, 121, 186, 48, 23, 182, 40, 212, 44, 16, 178, 38, 83, 104, 96,
    185, 122, 73, 135, 137, 138, 203, 54, 100, 175, 142, 166, 37, 111, 92, 199,
    75, 194, 24, 7, 169, 447, 451, 448, 452, 453, 456, 457, 454, 455, 547, 853,
    896, 223, 345, 246, 230, 232, 677, 265, 264, 522, 688, 845, 752, 540, 847, 704,
    767, 233, 907, 967, 341, 718, 916, 307, 705, 683, 518, 905, 258, 807, 908, 296,
    353, 785, 909, 884, 266, 733, 991, 849, 777, 811, 933, 941, 254, 985, 835, 533,
    839, 689, 252, 940, 805, 300, 706, 779, 538, 817, 716, 872, 719, 949, 851, 820,
    580, 833, 887, 707, 267, 673, 591, 539, 239, 377, 836, 576, 568, 891, 749, 563,
    548, 890, 929, 701, 241, 987, 342, 914, 827, 721, 902, 382, 762, 303, 335, 301,
    801, 690, 695, 370, 713, 797, 979, 761, 996, 674, 698, 583, 543, 708, 243, 268,
    376, 347, 910, 881, 297, 545, 778, 898, 298, 670, 756, 856, 865, 720, 313, 550,
    959, 966, 523, 529, 315, 821, 667, 579, 715, 253, 897, 972, 834, 336, 799, 1000,
    662, 512, 346, 262, 316, 879, 660, 808, 796, 305, 235, 279, 919, 995, 356, 309,
    784, 261, 712, 934, 299, 256, 348, 671, 757, 280, 971, 567, 955, 275, 792, 276,
    236, 337, 911, 227, 684, 725, 703, 517, 581, 895, 249, 375, 840, 505, 551, 750,
    573, 350, 344, 554, 369, 787, 696, 730, 562, 802, 924, 293, 525, 980, 659, 592,
    748, 269, 961, 963, 294, 560, 770, 773, 582, 918, 892, 814, 228, 374, 988, 371,
    687, 238, 546, 270, 244, 867, 973, 894, 508, 536, 697, 532, 818, 917, 782, 977,
    763, 338, 339, 781, 984, 598, 922, 946, 302, 717, 509, 661, 866, 875, 920, 880,
    271, 251, 871, 829, 290, 272, 764, 686, 869, 277, 824, 854, 691, 852, 260, 255,
    728, 511, 599, 284, 588, 585, 595, 755, 915, 552, 699, 354, 351, 520, 513, 333,
    870, 937, 295, 506, 921, 826, 564, 584, 504, 759, 685, 352, 877, 942, 994, 306,
    527, 257, 679, 843, 732, 842, 850, 883, 783, 789, 575, 926, 722, 281, 596, 931,
    901, 888, 841, 565, 245, 983, 372, 693, 964, 731, 381, 378, 857, 923, 285, 855,
    314, 788, 838, 566, 373, 769, 556, 702, 542, 534, 572, 846, 939, 862, 976, 273,
    860, 571, 863, 537, 927, 286, 570, 965, 668, 578, 694, 219, 541, 310, 663, 997,
    876, 519, 760, 753, 586, 952, 751, 938, 355, 809, 521, 962, 221, 729, 510, 587,
    379, 589, 559, 800, 709, 832, 950, 259, 380, 868, 747, 590, 776, 943, 549, 726,
    557, 507, 288, 278, 960, 222, 986, 577, 925, 822, 858, 515, 234, 676, 237, 600,
    775, 274, 593, 804, 263, 680, 340, 530, 998, 724, 528, 516, 514, 287, 957, 311,
    692, 247, 794, 526, 574, 535, 810, 681, 828, 837, 945, 569, 561, 531, 304, 250,
    978, 675, 786, 944, 970, 989, 903, 758, 555, 308, 780, 664, 710, 312, 594, 700,
    282, 711, 289, 283, 766, 825, 291, 242, 597, 678, 882, 349, 765, 727, 544, 220,
    292, 334, 666, 874, 990, 969, 558, 790, 682, 343, 936, 665, 524, 928, 317, 231,
    906, 669, 958, 819, 795, 772, 502, 899, 912, 904, 935, 831, 503, 672, 951, 815,
    723, 248, 240, 714, 553, 930, 791, 932, 861, 774, 803, 754, 813, 844, 771, 793,
    974, 968, 873, 768, 975, 993, 885, 734, 736, 737, 738, 739, 740, 741, 742, 743,
    744, 735, 745, 746, 318, 229, 319, 320, 321, 322, 323, 324, 325, 326, 816, 999,
    953, 864, 806, 948, 830, 900, 798, 947, 859, 823, 361, 992, 359, 365, 368, 366,
    363, 364, 367, 360, 362, 954, 848, 982, 330, 357, 358, 331, 327, 328, 332, 886,
    913, 956, 893, 878, 812, 981, 329, 889,
)

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


def tf1_bilinear_source_indices(in_size: int, out_size: int
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Taps and weights of TF1's ResizeBilinear with align_corners=False and
    half_pixel_centers=False (the FID graph's): output pixel i samples the input at
    s = i * in_size / out_size, reading floor(s) and min(floor(s) + 1, in_size - 1)
    with weights 1 - frac and frac (TF's legacy scaler; no antialiasing).

    Returns:
        (i0, i1, w0, w1) as `bilinear_source_indices`.
    """
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    return i0.astype(np.int32), i1.astype(np.int32), 1.0 - w1, w1


def _resize_axis(x: Array, axis: int, out_size: int, taps=bilinear_source_indices) -> Array:
    i0, i1, w0, w1 = taps(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w0 = jnp.asarray(w0.reshape(shape), x.dtype)
    w1 = jnp.asarray(w1.reshape(shape), x.dtype)
    return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear(images: Array, height: int = INPUT_SIZE, width: int = INPUT_SIZE,
                    *, tf1: bool = False) -> Array:
    """`F.interpolate(images, (height, width), mode='bilinear', align_corners=False)`,
    or with `tf1` TF1's `tf.image.resize_bilinear` (no half-pixel offset,
    `tf1_bilinear_source_indices`).

    Bilinear interpolation is separable, so the width and height passes are two
    two-tap gathers (exact, and O(output) rather than a dense resampling matmul).

    Args:
        images: [B, H, W, C] float.
        height: output height.
        width: output width.
        tf1: TF1's legacy sampling grid instead of PyTorch's.

    Returns:
        [B, height, width, C], same dtype.
    """
    taps = tf1_bilinear_source_indices if tf1 else bilinear_source_indices
    x = _resize_axis(images, 2, width, taps)
    return _resize_axis(x, 1, height, taps)


# How images reach the network: pytorch-fid's, or the TF graph's (the ADM evaluator's).
INPUT_PIPELINES = ('pytorch_fid', 'tf')


def preprocess_images(images: Array, resize_input: bool = True,
                      pipeline: str = 'pytorch_fid') -> Array:
    """pytorch-fid's input pipeline: [0, 255] -> [0, 1] -> resize to 299 -> [-1, 1];
    or with `pipeline='tf'` the TF graph's: [0, 255] -> TF1 resize to 299 ->
    (x - 128) / 128.

    Args:
        images: [B, H, W, C] uint8, or float in [0, 255]; C is 3, or 1 for grey
            images, which are repeated to RGB as PIL's convert('RGB') does.
        resize_input: resize to 299x299 (pytorch-fid's `resize_input`). FID is
            defined with it on; off only makes sense for inputs already 299x299.
        pipeline: One of `INPUT_PIPELINES`.

    Returns:
        [B, 299, 299, 3] float32 in [-1, 1] (input size if resize_input is False).

    Raises:
        ValueError: if images is not 4-D with 1 or 3 channels, or an unknown pipeline.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError('Inception expects [B, H, W, C] images with C = 1 or 3, got shape '
                         f'{tuple(images.shape)}.')
    if pipeline not in INPUT_PIPELINES:
        raise ValueError(f'pipeline must be one of {INPUT_PIPELINES}, got {pipeline!r}.')
    x = jnp.asarray(images).astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if pipeline == 'tf':  # ExpandDims -> ResizeBilinear -> Sub 128 -> Mul 1/128.
        if resize_input:
            x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE, tf1=True)
        return (x - 128.0) * (1.0 / 128.0)
    x = x / 255.0
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
        input_pipeline: 'pytorch_fid' (default) or 'tf', the TF graph's resize and
            normalisation (`preprocess_images`).
    """

    resize_input: bool = True
    precision: Any = DEFAULT_PRECISION
    input_pipeline: str = 'pytorch_fid'

    @nn.compact
    def __call__(self, images: Array) -> dict[str, Array]:
        """Features of a batch of images.

        Args:
            images: [B, H, W, C] uint8 or float in [0, 255], C = 3 (or 1: grey).

        Returns:
            {'pool3': [B, 2048], 'logits': [B, 1008], 'logits_unbiased': [B, 1008],
             'spatial': [B, 17, 17, 7]}, float32 (see the module docstring).
        """
        # [B, 299, 299, 3]
        x = preprocess_images(images, self.resize_input, self.input_pipeline)
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


def imagenet_class_logits(logits: Array) -> Array:
    """The graph's logits [..., 1008] of the 1000 ImageNet classes, in the dataset's
    class order ([..., 1000]; see `IMAGENET_CLASS_OUTPUTS`): the argmax is the
    graph's prediction as a TFDS / guided-diffusion ImageNet label."""
    return jnp.take(logits, jnp.asarray(IMAGENET_CLASS_OUTPUTS), axis=-1)
