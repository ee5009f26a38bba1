"""Tests for ddpm_jax.models.lpips: LPIPS against an independent float64 NumPy
implementation of Zhang et al. 2018's formula, fed the same torch-format weight
files; its invariants (d(x, x) = 0, symmetry, linearity in the learned weights); the
safe norm's gradient; and the one-line errors for missing or wrong files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import torch_checkpoint
from ddpm_jax.models import lpips

# torchvision's vgg16 `features` (cfg 'D'): 'M' is a 2x2 max pool.
VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M',
             512, 512, 512, 'M')
# The reference's ScalingLayer, as written in lpips/lpips.py.
REF_SHIFT = np.array([-.030, -.088, -.188])
REF_SCALE = np.array([.458, .448, .450])


def random_state_dicts(seed=0):
    """Random VGG16 `features` and LPIPS linear-layer state dicts (torch layouts and
    names as torchvision and the lpips package write them), He-scaled so that the
    activations neither vanish nor explode; plus a classifier tensor to be ignored."""
    rng = np.random.default_rng(seed)
    vgg, index, in_channels = {}, 0, 3
    for v in VGG16_CFG:
        if v == 'M':
            index += 1
            continue
        std = np.sqrt(2.0 / (9 * in_channels))
        vgg[f'features.{index}.weight'] = (std * rng.standard_normal(
            (v, in_channels, 3, 3))).astype(np.float32)
        vgg[f'features.{index}.bias'] = (0.05 * rng.standard_normal(v)).astype(np.float32)
        index, in_channels = index + 2, v  # The conv and its ReLU.
    vgg['classifier.6.bias'] = np.zeros(1000, np.float32)
    lins = {f'lin{k}.model.1.weight': rng.uniform(0, 0.2, (1, c, 1, 1)).astype(np.float32)
            for k, c in enumerate((64, 128, 256, 512, 512))}
    return vgg, lins


def reference_lpips(vgg, lins, x0, x1, masks=None):
    """LPIPS in float64 NumPy from the torch-layout state dicts, images NHWC in [-1, 1];
    with `masks` (one 0/1 array per tap), the reference's training-mode Dropout(0.5)
    before each lin layer: the kept squared differences doubled."""

    def conv3x3(x, w, b):  # Cross-correlation, padding 1; w is [O, I, 3, 3].
        n, h, wd, c = x.shape
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros((n * h * wd, w.shape[0]))
        for dy in range(3):
            for dx in range(3):
                window = np.ascontiguousarray(padded[:, dy:dy + h, dx:dx + wd])
                out += window.reshape(-1, c) @ w[:, :, dy, dx].T
        return out.reshape(n, h, wd, -1) + b

    def taps(x):
        x = (x.astype(np.float64) - REF_SHIFT) / REF_SCALE
        out, index = [], 0
        for v in VGG16_CFG:
            if v == 'M':  # The ReLU before each pool is a tap (relu1_2, ..., relu5_3).
                out.append(x)
                b, h, w, c = x.shape
                x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
                x = x.max(axis=(2, 4))
                index += 1
                continue
            x = np.maximum(conv3x3(x, vgg[f'features.{index}.weight'].astype(np.float64),
                                   vgg[f'features.{index}.bias'].astype(np.float64)), 0)
            index += 2
        return out

    total = 0.0
    for k, (f0, f1) in enumerate(zip(taps(x0), taps(x1))):
        f0 = f0 / (np.sqrt(np.sum(f0 ** 2, axis=-1, keepdims=True)) + 1e-10)
        f1 = f1 / (np.sqrt(np.sum(f1 ** 2, axis=-1, keepdims=True)) + 1e-10)
        w = lins[f'lin{k}.model.1.weight'].astype(np.float64).reshape(-1)
        diff = (f0 - f1) ** 2 if masks is None else 2.0 * masks[k] * (f0 - f1) ** 2
        total = total + np.mean(diff @ w, axis=(1, 2))
    return total


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """(vgg.pth path, VGG16 path, the two state dicts), written in torch's format."""
    root = tmp_path_factory.mktemp('lpips')
    vgg, lins = random_state_dicts()
    torch_checkpoint.save_state_dict(root / 'vgg16.pth', vgg)
    torch_checkpoint.save_state_dict(root / 'vgg.pth', lins, legacy=True)  # As released.
    return str(root / 'vgg.pth'), str(root / 'vgg16.pth'), vgg, lins


@pytest.fixture(scope='module')
def distance():
    """A jitted d(params, x0, x1): the parameters are arguments, not constants."""
    return jax.jit(lambda p, a, b: lpips.LPIPS().apply({'params': p}, a, b))


def images(seed, shape):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, shape)
    x1 = np.clip(x0 + 0.3 * rng.standard_normal(shape), -1, 1)
    return x0.astype(np.float32), x1.astype(np.float32)


def test_matches_float64_numpy_from_the_weight_files(weights, distance):
    lin_path, vgg_path, vgg, lins = weights
    params = lpips.load_lpips_params(lin_path, vgg_path)
    assert np.sum([p.size for p in jax.tree.leaves(params)]) == 14_714_688 + 1_472
    x0, x1 = images(0, (2, 32, 32, 3))
    got = np.asarray(distance(params, x0, x1))
    want = reference_lpips(vgg, lins, x0, x1)
    assert got.shape == (2,) and np.all(want > 0.01)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Grey images are compared as RGB with equal channels; a side that is not a power
    # of two is pooled in floor mode (24 -> 12 -> 6 -> 3 -> 1).
    x0, x1 = images(1, (1, 24, 24, 1))
    rgb = [np.repeat(x, 3, axis=-1) for x in (x0, x1)]
    np.testing.assert_allclose(np.asarray(distance(params, x0, x1)),
                               reference_lpips(vgg, lins, *rgb), rtol=1e-5)


def test_training_dropout_is_the_references_on_the_squared_differences(weights):
    """With a key, each tap's squared difference is dropped with probability 0.5 and
    the rest doubled before the lin layer (taming's NetLinLayer in train mode); an
    unbiased estimate of d; without one, d itself."""
    lin_path, vgg_path, vgg, lins = weights
    params = lpips.load_lpips_params(lin_path, vgg_path)
    x0, x1 = images(4, (2, 16, 16, 3))
    model = lpips.LPIPS()

    @jax.jit
    def dropped(p, key):
        f0, f1 = (model.apply({'params': p}, x, method=lpips.LPIPS.features)
                  for x in (x0, x1))
        return model.apply({'params': p}, f0, f1, key, 0.5, method=lpips.LPIPS.distance)

    key = jax.random.key(5)
    shapes = [(2, 16 >> k, 16 >> k, c) for k, c in enumerate(lpips.TAP_CHANNELS)]
    masks = [np.asarray(jax.random.bernoulli(k, 0.5, shape), np.float64)
             for k, shape in zip(jax.random.split(key, 5), shapes)]
    assert 0.4 < np.mean(masks[1]) < 0.6
    np.testing.assert_allclose(np.asarray(dropped(params, key)),
                               reference_lpips(vgg, lins, x0, x1, masks), rtol=1e-5)
    d = reference_lpips(vgg, lins, x0, x1)
    draws = np.stack([np.asarray(dropped(params, jax.random.key(k))) for k in range(64)])
    assert np.all(np.std(draws, axis=0) > 1e-3 * d)
    # The mean of 64 draws is within 4 standard errors of d.
    assert np.all(np.abs(draws.mean(0) - d) < 4 * draws.std(0) / 8)
    np.testing.assert_allclose(
        np.asarray(model.apply({'params': params}, *(model.apply(
            {'params': params}, x, method=lpips.LPIPS.features) for x in (x0, x1)),
            None, 0.5, method=lpips.LPIPS.distance)), d, rtol=1e-5)


def test_zero_on_equal_images_symmetric_and_linear_in_the_lin_weights(weights, distance):
    params = lpips.load_lpips_params(weights[0], weights[1])
    x0, x1 = images(2, (2, 32, 32, 3))
    d = np.asarray(distance(params, x0, x1))
    np.testing.assert_allclose(np.asarray(distance(params, x0, x0)), 0.0, atol=1e-12 * d.min())
    np.testing.assert_allclose(np.asarray(distance(params, x1, x0)), d, rtol=1e-6)
    # d is linear in the learned weights: doubling lin2 adds layer 2's share, which is
    # d with every other layer's weights zeroed.
    doubled = {**params, 'lin2': 2 * params['lin2']}
    only2 = {**params, **{f'lin{k}': np.zeros_like(params[f'lin{k}'])
                          for k in (0, 1, 3, 4)}}
    share = np.asarray(distance(only2, x0, x1))
    assert np.all(share > 1e-3 * d)
    np.testing.assert_allclose(np.asarray(distance(doubled, x0, x1)) - d, share, rtol=1e-4)


def test_normalisation_value_and_gradient_at_a_zero_feature_vector():
    x = np.random.default_rng(3).standard_normal((2, 3, 5))
    x[0, 1] = 0.0
    got = np.asarray(lpips.normalize_channels(jnp.asarray(x, jnp.float32)))
    want = x / (np.sqrt(np.sum(x ** 2, axis=-1, keepdims=True)) + 1e-10)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # sqrt has no derivative at 0: a naive norm gives NaN there; this one does not.
    weights = jnp.arange(5.0)
    grad = jax.grad(lambda v: jnp.sum(lpips.normalize_channels(v) * weights))(
        jnp.asarray(x, jnp.float32))
    assert np.all(np.isfinite(np.asarray(grad)))
    naive = jax.grad(lambda v: jnp.sum(v / (jnp.linalg.norm(v, axis=-1, keepdims=True)
                                            + 1e-10) * weights))(jnp.asarray(x, jnp.float32))
    assert np.isnan(np.asarray(naive)).any()  # What the safe norm avoids.


def test_too_small_or_wrong_images_are_refused(weights):
    model = lpips.LPIPS()
    params = lpips.load_lpips_params(weights[0], weights[1])
    with pytest.raises(ValueError, match=r'at least 16x16 .* got 8x8'):
        model.apply({'params': params}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match='C = 1 or 3'):
        model.apply({'params': params}, jnp.zeros((1, 16, 16, 2)), jnp.zeros((1, 16, 16, 2)))


def test_missing_and_wrong_files_name_the_field_and_the_tensor(weights, tmp_path):
    lin_path, vgg_path, vgg, lins = weights
    field = 'autoencoder.lpips_weights_path'
    vgg_field = 'autoencoder.vgg16_weights_path'
    with pytest.raises(ValueError, match=rf'{vgg_field} is empty.*vgg16-397923af\.pth.*'
                                         r'https://download\.pytorch\.org/models/'):
        lpips.load_lpips_params(lin_path, '')
    with pytest.raises(ValueError, match=rf"{field}='/no/vgg\.pth' is not a file.*"
                                         r'lpips/weights/v0\.1/vgg\.pth'):
        lpips.load_lpips_params('/no/vgg.pth', vgg_path)

    def refused(lin_dict, match, vgg_file=vgg_path):
        path = tmp_path / 'lin.pth'
        torch_checkpoint.save_state_dict(path, lin_dict)
        with pytest.raises(ValueError, match=match) as e:
            lpips.load_lpips_params(str(path), vgg_file)
        assert '\n' not in str(e.value)

    # The two files swapped: the VGG16 field names the first tensor it lacks.
    refused(vgg, rf"{vgg_field}='{lin_path}' has no tensor features\.0\.weight",
            vgg_file=lin_path)
    refused({k: v for k, v in lins.items() if k != 'lin3.model.1.weight'},
            rf'{field}=.* has no tensor lin3\.model\.1\.weight')
    refused({**lins, 'lin1.model.1.weight': np.ones((1, 64, 1, 1), np.float32)},
            r'lin1\.model\.1\.weight has shape \(1, 64, 1, 1\), expected \(1, 128, 1, 1\)')
    refused({**lins, 'lin4.model.1.weight': -lins['lin4.model.1.weight']},
            r'lin4\.model\.1\.weight has negative weights')
    garbage = tmp_path / 'garbage.pth'
    garbage.write_text('not a checkpoint')
    with pytest.raises(ValueError, match=rf'{field}: .*garbage\.pth'):
        lpips.load_lpips_params(str(garbage), vgg_path)
    # A name with a torch.hub hash prefix is checked against it.
    (tmp_path / 'vgg16-397923af.pth').symlink_to(vgg_path)
    with pytest.raises(ValueError, match=rf'{vgg_field}: .*sha256 .* 397923af'):
        lpips.load_lpips_params(lin_path, str(tmp_path / 'vgg16-397923af.pth'))
