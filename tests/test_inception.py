"""Tests for ddpm_jax.models.inception: the FID Inception-v3, its input pipeline and weights.

The reference numbers come from an independent float64 NumPy re-implementation of
pytorch-fid's forward pass, written here in PyTorch's own NCHW layout on the
torch-named tensors, so one comparison checks the architecture (block wiring,
paddings, the count_include_pad=False and max-pool patches, concatenation order)
and the OIHW -> HWIO state-dict mapping together. Weights are random (He-scaled so
activations stay O(1)); the real file is not needed. The full network runs at 299
only for the output shapes; the numerical checks run its fully convolutional body
on 139x139 inputs (Mixed_7 at 3x3, so every pool window touches a border).
"""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax import torch_checkpoint
from ddpm_jax.models import inception

SMALL = 139  # Smallest input whose grids are 15, 7 and 3 (not 1) wide: fast, with borders.


# ----------------------------------------------------------------------------- helpers


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def random_variables(seed=0):
    """Random {'params', 'batch_stats'} of the right shapes, as float32 NumPy arrays."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(inception.variable_shapes())
    out = {}
    for path, leaf in flat.items():
        shape, name = leaf.shape, path[-1]
        if name == 'kernel' and len(shape) == 4:  # HWIO: fan-in = kh * kw * cin.
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
        elif name == 'kernel':
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[0]), shape)
        elif name == 'scale':
            value = rng.uniform(0.5, 1.5, shape)
        elif name == 'var':
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = rng.normal(0.0, 0.1, shape)
        out[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# NumPy float64 reference of pytorch-fid, NCHW, torch names and layouts.


def np_conv2d(x, w, stride=(1, 1), padding=(0, 0)):
    """torch.nn.functional.conv2d without bias: x [B, C, H, W], w [O, C, kh, kw]."""
    (ph, pw), (sh, sw) = padding, stride
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    kh, kw = w.shape[2:]
    patches = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    patches = patches[:, :, ::sh, ::sw]  # [B, C, Ho, Wo, kh, kw]
    return np.tensordot(patches, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)


def np_basic_conv(sd, name, x, stride=(1, 1), padding=(0, 0), eps=1e-3):
    """torchvision BasicConv2d in eval mode: conv, BatchNorm(eps), ReLU."""
    y = np_conv2d(x, sd[f'{name}.conv.weight'], stride, padding)
    per_channel = lambda v: v[None, :, None, None]  # noqa: E731
    y = ((y - per_channel(sd[f'{name}.bn.running_mean']))
         / np.sqrt(per_channel(sd[f'{name}.bn.running_var']) + eps)
         * per_channel(sd[f'{name}.bn.weight']) + per_channel(sd[f'{name}.bn.bias']))
    return np.maximum(y, 0.0)


def np_avg_pool_exclude_pad(x):
    """F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), by counting."""
    _, _, h, w = x.shape
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            window = x[:, :, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            out[:, :, i, j] = window.mean(axis=(2, 3))  # mean over real pixels only
    return out


def np_max_pool(x, stride, padding):
    """F.max_pool2d(x, 3, stride, padding) (padding never wins the max)."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
               constant_values=-np.inf)
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
    return patches[:, :, ::stride, ::stride].max(axis=(4, 5))


def np_inception_a(sd, n, x):
    c = lambda name, y, **k: np_basic_conv(sd, f'{n}.{name}', y, **k)  # noqa: E731
    b1 = c('branch1x1', x)
    b5 = c('branch5x5_2', c('branch5x5_1', x), padding=(2, 2))
    b3 = c('branch3x3dbl_1', x)
    b3 = c('branch3x3dbl_3', c('branch3x3dbl_2', b3, padding=(1, 1)), padding=(1, 1))
    bp = c('branch_pool', np_avg_pool_exclude_pad(x))
    return np.concatenate([b1, b5, b3, bp], axis=1)


def np_inception_b(sd, n, x):
    c = lambda name, y, **k: np_basic_conv(sd, f'{n}.{name}', y, **k)  # noqa: E731
    b3 = c('branch3x3', x, stride=(2, 2))
    bd = c('branch3x3dbl_2', c('branch3x3dbl_1', x), padding=(1, 1))
    bd = c('branch3x3dbl_3', bd, stride=(2, 2))
    return np.concatenate([b3, bd, np_max_pool(x, 2, 0)], axis=1)


def np_inception_c(sd, n, x):
    c = lambda name, y, **k: np_basic_conv(sd, f'{n}.{name}', y, **k)  # noqa: E731
    b1 = c('branch1x1', x)
    b7 = c('branch7x7_2', c('branch7x7_1', x), padding=(0, 3))
    b7 = c('branch7x7_3', b7, padding=(3, 0))
    bd = c('branch7x7dbl_2', c('branch7x7dbl_1', x), padding=(3, 0))
    bd = c('branch7x7dbl_3', bd, padding=(0, 3))
    bd = c('branch7x7dbl_4', bd, padding=(3, 0))
    bd = c('branch7x7dbl_5', bd, padding=(0, 3))
    bp = c('branch_pool', np_avg_pool_exclude_pad(x))
    return np.concatenate([b1, b7, bd, bp], axis=1)


def np_inception_d(sd, n, x):
    c = lambda name, y, **k: np_basic_conv(sd, f'{n}.{name}', y, **k)  # noqa: E731
    b3 = c('branch3x3_2', c('branch3x3_1', x), stride=(2, 2))
    b7 = c('branch7x7x3_2', c('branch7x7x3_1', x), padding=(0, 3))
    b7 = c('branch7x7x3_3', b7, padding=(3, 0))
    b7 = c('branch7x7x3_4', b7, stride=(2, 2))
    return np.concatenate([b3, b7, np_max_pool(x, 2, 0)], axis=1)


def np_inception_e(sd, n, x, max_pool):
    c = lambda name, y, **k: np_basic_conv(sd, f'{n}.{name}', y, **k)  # noqa: E731
    b1 = c('branch1x1', x)
    b3 = c('branch3x3_1', x)
    b3 = np.concatenate([c('branch3x3_2a', b3, padding=(0, 1)),
                         c('branch3x3_2b', b3, padding=(1, 0))], axis=1)
    bd = c('branch3x3dbl_2', c('branch3x3dbl_1', x), padding=(1, 1))
    bd = np.concatenate([c('branch3x3dbl_3a', bd, padding=(0, 1)),
                         c('branch3x3dbl_3b', bd, padding=(1, 0))], axis=1)
    pooled = np_max_pool(x, 1, 1) if max_pool else np_avg_pool_exclude_pad(x)
    return np.concatenate([b1, b3, bd, c('branch_pool', pooled)], axis=1)


def np_fid_inception(sd, images_nhwc):
    """pytorch-fid's InceptionV3 (resize_input=False, normalize_input=True) + fc."""
    x = images_nhwc.astype(np.float64).transpose(0, 3, 1, 2) / 255.0 * 2.0 - 1.0
    x = np_basic_conv(sd, 'Conv2d_1a_3x3', x, stride=(2, 2))
    x = np_basic_conv(sd, 'Conv2d_2a_3x3', x)
    x = np_basic_conv(sd, 'Conv2d_2b_3x3', x, padding=(1, 1))
    x = np_max_pool(x, 2, 0)
    x = np_basic_conv(sd, 'Conv2d_3b_1x1', x)
    x = np_basic_conv(sd, 'Conv2d_4a_3x3', x)
    x = np_max_pool(x, 2, 0)
    for name in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):
        x = np_inception_a(sd, name, x)
    x = np_inception_b(sd, 'Mixed_6a', x)
    for name in ('Mixed_6b', 'Mixed_6c'):
        x = np_inception_c(sd, name, x)
    mixed_6_conv = np_basic_conv(sd, 'Mixed_6d.branch1x1', x)  # TF mixed_6/conv:0
    x = np_inception_c(sd, 'Mixed_6e', np_inception_c(sd, 'Mixed_6d', x))
    x = np_inception_d(sd, 'Mixed_7a', x)
    x = np_inception_e(sd, 'Mixed_7b', x, max_pool=False)
    x = np_inception_e(sd, 'Mixed_7c', x, max_pool=True)
    pool3 = x.mean(axis=(2, 3))
    return {'pool3': pool3,
            'logits': pool3 @ sd['fc.weight'].T + sd['fc.bias'],
            'logits_unbiased': pool3 @ sd['fc.weight'].T,
            'spatial': mixed_6_conv[:, :7].transpose(0, 2, 3, 1)}


def np_resize_reference(x, height, width):
    """align_corners=False bilinear via np.interp in float64 (NHWC).

    Output pixel centres (i + 0.5) map to input coordinate (i + 0.5) * in/out - 0.5
    in pixel-index units; np.interp holds the end values outside [0, in - 1], which
    is PyTorch's clamping of the source index. Bilinear is separable, so one 1-D
    interpolation per axis.
    """
    def along(v, axis, out_size):
        n = v.shape[axis]
        coords = (np.arange(out_size) + 0.5) * n / out_size - 0.5
        return np.apply_along_axis(lambda r: np.interp(coords, np.arange(n), r), axis, v)
    return along(along(x.astype(np.float64), 2, width), 1, height)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def variables():
    return random_variables(seed=0)


@pytest.fixture(scope='module')
def small_forward():
    """The network body without the 299 resize, compiled once for SMALL inputs."""
    return jax.jit(inception.InceptionV3(resize_input=False).apply)


@pytest.fixture(scope='module')
def small_images():
    return random_images((2, SMALL, SMALL, 3), seed=1)


# ----------------------------------------------------------------------------- tests


def test_parameter_count_and_variable_structure():
    shapes = inception.variable_shapes()
    assert set(shapes) == {'params', 'batch_stats'}
    # torchvision inception_v3(aux_logits=False) has 23,834,568 parameters with 1000
    # classes; the FID graph's 1008-way fc adds 8 * (2048 + 1).
    assert count(shapes['params']) == 23_850_960
    flat = traverse_util.flatten_dict(shapes['params'])
    assert sum(1 for path in flat if path[-2:] == ('conv', 'kernel')) == 94
    bn_channels = sum(leaf.shape[0] for path, leaf in flat.items() if path[-2:] == ('bn', 'scale'))
    assert count(shapes['batch_stats']) == 2 * bn_channels  # running mean and variance


def test_output_shapes_at_299(variables):
    images = random_images((2, 32, 32, 3), seed=2)
    out = jax.jit(inception.InceptionV3().apply)(variables, images)
    assert {k: v.shape for k, v in out.items()} == {
        'pool3': (2, 2048), 'logits': (2, 1008), 'logits_unbiased': (2, 1008),
        'spatial': (2, 17, 17, 7)}
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
    # pool3 and the sFID features are post-ReLU averages / values.
    assert np.asarray(out['pool3']).min() >= 0 and np.asarray(out['spatial']).min() >= 0
    np.testing.assert_allclose(out['logits'] - out['logits_unbiased'],
                               np.broadcast_to(variables['params']['fc']['bias'], (2, 1008)),
                               atol=1e-4)


@pytest.mark.parametrize('in_hw', [(32, 32), (8, 8), (512, 512), (17, 40), (299, 299)])
def test_resize_matches_float64_reference(in_hw):
    x = np.random.default_rng(3).uniform(0, 1, (1, *in_hw, 3)).astype(np.float32)
    got = np.asarray(inception.resize_bilinear(jnp.asarray(x), 299, 299))
    want = np_resize_reference(x, 299, 299)
    assert got.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    if in_hw == (299, 299):
        np.testing.assert_array_equal(got, x)  # same size: identity, as in PyTorch


def test_resize_closed_form():
    # F.interpolate(tensor([[0., 1.]]), size=4, mode='linear', align_corners=False)
    # is [0, 0.25, 0.75, 1]; shrinking 4 -> 2 averages pairs (no antialias needed).
    up = inception.resize_bilinear(jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1), 1, 4)
    np.testing.assert_allclose(np.asarray(up).ravel(), [0.0, 0.25, 0.75, 1.0], atol=1e-7)
    down = inception.resize_bilinear(jnp.asarray([0.0, 1.0, 4.0, 9.0]).reshape(1, 1, 4, 1), 1, 2)
    np.testing.assert_allclose(np.asarray(down).ravel(), [0.5, 6.5], atol=1e-6)
    # Shrinking 8 -> 2 samples at 1.5 and 5.5, so it reads only pixels 1, 2 and 5, 6:
    # no antialiasing filter (an antialiased resize would average all eight).
    x = np.arange(8.0) ** 2
    down = inception.resize_bilinear(jnp.asarray(x).reshape(1, 1, 8, 1), 1, 2)
    np.testing.assert_allclose(np.asarray(down).ravel(), [(1 + 4) / 2, (25 + 36) / 2])


def test_tf1_resize_and_the_tf_graphs_scaling_closed_form():
    """pipeline='tf': TF1's ResizeBilinear (align_corners=False, no half-pixel offset:
    output i samples input i * in / out) of the [0, 255] image, then (x - 128) / 128."""
    # tf.compat.v1.image.resize_bilinear([0, 1], 4) samples 0, 0.5, 1, 1.5 -> 0, .5, 1, 1.
    up = inception.resize_bilinear(jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1), 1, 4,
                                   tf1=True)
    np.testing.assert_allclose(np.asarray(up).ravel(), [0.0, 0.5, 1.0, 1.0], atol=1e-7)
    # Shrinking 8 -> 2 samples at 0 and 4 exactly (PyTorch's grid: 1.5 and 5.5).
    x = np.arange(8.0) ** 2
    down = inception.resize_bilinear(jnp.asarray(x).reshape(1, 1, 8, 1), 1, 2, tf1=True)
    np.testing.assert_allclose(np.asarray(down).ravel(), [0.0, 16.0])
    images = random_images((2, 20, 24, 3), seed=4)
    got = np.asarray(inception.preprocess_images(jnp.asarray(images), pipeline='tf'))
    xf = images.astype(np.float64)
    for axis, size in ((2, 299), (1, 299)):  # Width, then height, as a NumPy loop.
        n = xf.shape[axis]
        src = np.arange(size) * n / size
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        shape = [1, 1, 1, 1]
        shape[axis] = size
        frac = (src - i0).reshape(shape)
        xf = np.take(xf, i0, axis=axis) * (1 - frac) + np.take(xf, i1, axis=axis) * frac
    np.testing.assert_allclose(got, (xf - 128) / 128, atol=2e-6)
    pytorch = np.asarray(inception.preprocess_images(jnp.asarray(images)))
    assert np.abs(got - pytorch).max() > 0.05
    with pytest.raises(ValueError, match='pipeline must be one of'):
        inception.preprocess_images(jnp.asarray(images), pipeline='torch')


def test_preprocess_resizes_then_normalises():
    images = random_images((2, 20, 24, 3), seed=4)
    got = np.asarray(inception.preprocess_images(jnp.asarray(images)))
    want = 2.0 * np_resize_reference(images / 255.0, 299, 299) - 1.0
    assert got.shape == (2, 299, 299, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.min() >= -1.0 and got.max() <= 1.0
    grey = np.asarray(inception.preprocess_images(jnp.asarray(images[..., :1])))
    np.testing.assert_array_equal(grey, np.repeat(grey[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(grey[..., 0], got[..., 0])
    with pytest.raises(ValueError, match='C = 1 or 3'):
        inception.preprocess_images(jnp.zeros((1, 8, 8, 4), jnp.uint8))


def test_basic_conv2d_matches_float64_reference():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 9, 11, 5))  # NHWC
    # A small variance makes eps visible: 1e-3 vs PyTorch's default 1e-5 differ by 1%+.
    sd = {'l.conv.weight': rng.normal(size=(6, 5, 1, 7)),
          'l.bn.weight': rng.uniform(0.5, 1.5, 6), 'l.bn.bias': rng.normal(size=6),
          'l.bn.running_mean': rng.normal(size=6), 'l.bn.running_var': rng.uniform(0.01, 0.05, 6)}
    variables = {'params': {'conv': {'kernel': sd['l.conv.weight'].transpose(2, 3, 1, 0)},
                            'bn': {'scale': sd['l.bn.weight'], 'bias': sd['l.bn.bias']}},
                 'batch_stats': {'bn': {'mean': sd['l.bn.running_mean'],
                                        'var': sd['l.bn.running_var']}}}
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), variables)
    for stride, padding in [((1, 1), (0, 3)), ((2, 2), (1, 2))]:
        layer = inception.BasicConv2d(6, (1, 7), strides=stride, padding=padding)
        got = np.asarray(layer.apply(variables, jnp.asarray(x, jnp.float32)))
        want = np_basic_conv(sd, 'l', x.transpose(0, 3, 1, 2), stride, padding)
        want = want.transpose(0, 2, 3, 1)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        wrong_eps = np_basic_conv(sd, 'l', x.transpose(0, 3, 1, 2), stride, padding, eps=1e-5)
        assert np.abs(wrong_eps.transpose(0, 2, 3, 1) - got).max() > 1e-2


def test_avg_pool_excludes_padding_at_the_border():
    ones = jnp.ones((1, 5, 6, 2))
    # count_include_pad=True would give 4/9 at corners and 6/9 on edges.
    np.testing.assert_allclose(np.asarray(inception.avg_pool_exclude_pad(ones)), 1.0, atol=1e-7)
    x = np.random.default_rng(6).normal(size=(2, 5, 6, 3))
    got = np.asarray(inception.avg_pool_exclude_pad(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), atol=1e-6)
    np.testing.assert_allclose(got[:, 0, 3], x[:, :2, 2:5].mean(axis=(1, 2)), atol=1e-6)
    want = np_avg_pool_exclude_pad(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_network_matches_float64_pytorch_fid_reference(variables, small_forward, small_images):
    want = np_fid_inception(
        {k: v.astype(np.float64) for k, v in
         inception.torch_state_dict_from_params(variables).items()}, small_images)
    got = small_forward(variables, small_images)
    assert got['spatial'].shape == (2, 7, 7, 7)
    for key in ('pool3', 'logits', 'logits_unbiased', 'spatial'):
        scale = np.abs(want[key]).max()
        assert scale > 0.1, key  # activations neither vanished nor saturated
        np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=1e-4,
                                   atol=1e-4 * scale, err_msg=key)
    # The Mixed_7c max-pool patch matters: averaging there gives different features.
    sd = {k: v.astype(np.float64) for k, v in
          inception.torch_state_dict_from_params(variables).items()}
    x = np.random.default_rng(7).normal(size=(2, 2048, 3, 3))
    assert np.abs(np_inception_e(sd, 'Mixed_7c', x, True)
                  - np_inception_e(sd, 'Mixed_7c', x, False)).max() > 1e-2


def test_grey_images_equal_repeated_rgb(variables, small_forward):
    grey = random_images((2, SMALL, SMALL, 1), seed=8)
    got = jax.jit(inception.InceptionV3(resize_input=False).apply)(variables, grey)
    want = small_forward(variables, np.repeat(grey, 3, axis=-1))
    for key in got:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


# --------------------------------------------------------------------- state dict


EXPECTED_TORCH_SHAPES = {
    # Written from torchvision's Inception3 and pytorch-fid's fid_inception_v3.
    'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3),
    'Conv2d_1a_3x3.bn.weight': (32,),
    'Conv2d_1a_3x3.bn.bias': (32,),
    'Conv2d_1a_3x3.bn.running_mean': (32,),
    'Conv2d_1a_3x3.bn.running_var': (32,),
    'Conv2d_4a_3x3.conv.weight': (192, 80, 3, 3),
    'Mixed_5b.branch1x1.conv.weight': (64, 192, 1, 1),
    'Mixed_5b.branch5x5_2.conv.weight': (64, 48, 5, 5),
    'Mixed_5b.branch_pool.conv.weight': (32, 192, 1, 1),
    'Mixed_5d.branch3x3dbl_3.bn.running_var': (96,),
    'Mixed_6a.branch3x3.conv.weight': (384, 288, 3, 3),
    'Mixed_6b.branch7x7_2.conv.weight': (128, 128, 1, 7),
    'Mixed_6d.branch1x1.conv.weight': (192, 768, 1, 1),
    'Mixed_6d.branch7x7dbl_4.conv.weight': (160, 160, 7, 1),
    'Mixed_6e.branch7x7dbl_5.conv.weight': (192, 192, 1, 7),
    'Mixed_7a.branch3x3_2.conv.weight': (320, 192, 3, 3),
    'Mixed_7a.branch7x7x3_4.conv.weight': (192, 192, 3, 3),
    'Mixed_7b.branch3x3_2b.conv.weight': (384, 384, 3, 1),
    'Mixed_7b.branch3x3dbl_1.conv.weight': (448, 1280, 1, 1),
    'Mixed_7c.branch3x3dbl_3a.conv.weight': (384, 384, 1, 3),
    'Mixed_7c.branch_pool.conv.weight': (192, 2048, 1, 1),
    'fc.weight': (1008, 2048),
    'fc.bias': (1008,),
}


@pytest.fixture(scope='module')
def torch_sd(variables):
    return inception.torch_state_dict_from_params(variables)


def test_torch_names_follow_pytorch_fid(torch_sd):
    # 94 BasicConv2d x (conv.weight + 4 BatchNorm tensors) + fc.weight + fc.bias.
    assert len(torch_sd) == 94 * 5 + 2
    for name, shape in EXPECTED_TORCH_SHAPES.items():
        assert torch_sd[name].shape == shape, name
    assert all(v.dtype == np.float32 for v in torch_sd.values())
    assert not any('num_batches_tracked' in k or 'AuxLogits' in k for k in torch_sd)


def test_state_dict_round_trip_is_bit_exact(variables, torch_sd):
    back = inception.params_from_torch_state_dict(torch_sd)
    flat_a = traverse_util.flatten_dict(variables)
    flat_b = traverse_util.flatten_dict(back)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        assert flat_b[k].dtype == np.float32
        np.testing.assert_array_equal(flat_b[k], flat_a[k], err_msg=str(k))
    # The layouts really are transposed: OIHW -> HWIO and [out, in] -> [in, out].
    np.testing.assert_array_equal(
        back['params']['Mixed_6b']['branch7x7_2']['conv']['kernel'][0, 4, 5, 6],
        torch_sd['Mixed_6b.branch7x7_2.conv.weight'][6, 5, 0, 4])
    np.testing.assert_array_equal(back['params']['fc']['kernel'][10, 3],
                                  torch_sd['fc.weight'][3, 10])
    again = inception.torch_state_dict_from_params(back)
    assert again.keys() == torch_sd.keys()
    for k in torch_sd:
        np.testing.assert_array_equal(again[k], torch_sd[k])
    # num_batches_tracked of an existing BatchNorm is ignored.
    with_counter = dict(torch_sd, **{'Mixed_5b.branch1x1.bn.num_batches_tracked': np.int64(0)})
    inception.params_from_torch_state_dict(with_counter)


def test_state_dict_mismatches_are_refused_by_name(torch_sd):
    missing = dict(torch_sd)
    del missing['Mixed_6c.branch7x7dbl_3.bn.running_var']
    with pytest.raises(ValueError, match=r'missing 1 .*Mixed_6c\.branch7x7dbl_3\.bn\.running_var'):
        inception.params_from_torch_state_dict(missing)
    extra = dict(torch_sd, **{'AuxLogits.fc.weight': np.zeros((1008, 768), np.float32)})
    with pytest.raises(ValueError, match=r'1 unexpected .*AuxLogits\.fc\.weight'):
        inception.params_from_torch_state_dict(extra)
    stray = dict(torch_sd, **{'fc.num_batches_tracked': np.int64(0)})
    with pytest.raises(ValueError, match=r'fc\.num_batches_tracked'):
        inception.params_from_torch_state_dict(stray)
    misshaped = dict(torch_sd, **{'fc.weight': torch_sd['fc.weight'].T})
    with pytest.raises(ValueError, match=r'fc\.weight has shape \(2048, 1008\), expected '
                                         r'\(1008, 2048\)'):
        inception.params_from_torch_state_dict(misshaped)
    w = torch_sd['Mixed_7b.branch3x3_2a.conv.weight']
    transposed = dict(torch_sd, **{'Mixed_7b.branch3x3_2a.conv.weight': w.transpose(0, 1, 3, 2)})
    with pytest.raises(ValueError, match=r'Mixed_7b\.branch3x3_2a\.conv\.weight has shape'):
        inception.params_from_torch_state_dict(transposed)
    integer = dict(torch_sd, **{'fc.bias': np.zeros(1008, np.int64)})
    with pytest.raises(ValueError, match=r'fc\.bias has dtype int64'):
        inception.params_from_torch_state_dict(integer)


def test_flax_variables_mismatch_is_refused(variables):
    broken = jax.tree.map(lambda v: v, variables)
    del broken['batch_stats']['Mixed_5b']['branch1x1']['bn']['var']
    with pytest.raises(ValueError, match='Mixed_5b/branch1x1/bn/var'):
        inception.torch_state_dict_from_params(broken)


# ------------------------------------------------------------------------ file loading


@pytest.mark.parametrize('legacy', [False, True])  # torch >= 1.6 zip / older format
def test_load_inception_variables_from_pth(tmp_path, variables, torch_sd, small_forward,
                                           small_images, legacy):
    path = str(tmp_path / 'inception.pth')
    # As pytorch-fid's file would hold them, with BatchNorm's num_batches_tracked.
    counters = {k.replace('.bn.weight', '.bn.num_batches_tracked'): np.asarray(0, np.int64)
                for k in torch_sd if k.endswith('.bn.weight')}
    torch_checkpoint.save_state_dict(path, {**torch_sd, **counters}, legacy=legacy)
    with open(path, 'rb') as f:
        prefix = hashlib.sha256(f.read()).hexdigest()[:8]
    loaded = inception.load_inception_variables(path, expected_hash_prefix=prefix)
    flat_a, flat_b = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(loaded)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_b[k], flat_a[k], err_msg=str(k))
    unchecked = inception.load_inception_variables(path, expected_hash_prefix=None)
    np.testing.assert_array_equal(unchecked['params']['fc']['bias'],
                                  variables['params']['fc']['bias'])
    with pytest.raises(ValueError, match='6726825d'):
        inception.load_inception_variables(path)  # checks the real file's prefix by default
    feature_fn = inception.make_feature_fn(loaded, inception.InceptionV3(resize_input=False))
    got, want = feature_fn(small_images), small_forward(variables, small_images)
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def test_missing_weights_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.INCEPTION_ENV_VAR, raising=False)
    for path in ('', str(tmp_path / 'absent.pth')):
        with pytest.raises(FileNotFoundError) as info:
            inception.load_inception_variables(path)
        message = str(info.value)
        assert '\n' not in message
        for needed in ('pt_inception-2015-12-05-6726825d.pth', 'eval.inception_path',
                       'DDPM_JAX_INCEPTION',
                       'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                       'pt_inception-2015-12-05-6726825d.pth'):
            assert needed in message
    assert str(tmp_path / 'absent.pth') in message


def test_resolve_inception_path_uses_env_var_when_empty(tmp_path, monkeypatch):
    from_env, explicit = tmp_path / 'env.pth', tmp_path / 'explicit.pth'
    from_env.write_bytes(b'x')
    explicit.write_bytes(b'y')
    monkeypatch.setenv(inception.INCEPTION_ENV_VAR, str(from_env))
    assert inception.resolve_inception_path('') == str(from_env)
    assert inception.resolve_inception_path(str(explicit)) == str(explicit)
    monkeypatch.setenv(inception.INCEPTION_ENV_VAR, str(tmp_path / 'gone.pth'))
    with pytest.raises(FileNotFoundError, match='gone.pth'):
        inception.resolve_inception_path('')
