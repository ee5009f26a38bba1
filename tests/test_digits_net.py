"""Tests for ddpm_jax.models.digits_net: training, the cache and the digits metrics.

The network is trained once for the module (a few seconds); every test that needs
it shares those variables.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import data, images, sample_quality
from ddpm_jax.models import digits_net


@pytest.fixture(scope='module')
def variables():
    return digits_net.train_digits_net(seed=0)


@pytest.fixture(scope='module')
def digits():
    """Both splits quantised as samples are: uint8 [N, 8, 8, 1] and labels."""
    train_x, train_y = data.load_digits('train')
    test_x, test_y = data.load_digits('test')
    return images.to_uint8(train_x), train_y, images.to_uint8(test_x), test_y


def _box_blur(pixels):
    """3x3 box blur with zero (background) padding, in float64, rounded to uint8."""
    padded = np.pad(pixels.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    total = sum(padded[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3))
    return np.rint(total / 9).astype(np.uint8)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_training_is_bit_for_bit_deterministic(variables):
    _assert_trees_equal(digits_net.train_digits_net(seed=0), variables)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))


def test_outputs_and_input_scaling(variables, digits):
    train_x = digits[0][:5]
    fn = digits_net.make_feature_fn(variables)
    out = fn(train_x)
    assert out['features'].shape == (5, digits_net.FEATURE_DIM)
    assert out['logits'].shape == (5, digits_net.NUM_CLASSES)
    # Float pixels in [0, 255] are the same input as uint8 pixels.
    as_float = fn(train_x.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(as_float['logits']), np.asarray(out['logits']))
    # The function is jittable and gives the same numbers under an outer jit.
    jitted = jax.jit(lambda x: fn(x)['features'] * 2.0)(jnp.asarray(train_x))
    np.testing.assert_allclose(np.asarray(jitted), 2.0 * np.asarray(out['features']),
                               rtol=1e-6, atol=1e-6)


def _features(variables, pixels):
    """The network's outputs on host uint8 pixels, as NumPy (one call, one compile)."""
    return {k: np.asarray(v, np.float64)
            for k, v in digits_net.make_feature_fn(variables)(pixels).items()}


def _score(variables, pixels, labels=None, reference_pixels=None):
    """`sample_quality.score` of these digits against the held-out ones: the metric
    that `--mode=fid` computes with `eval.metrics_network='digits'`."""
    def stats(x):
        out = _features(variables, x)
        features = out['features']
        return {'mu': features.mean(0), 'sigma': np.cov(features, rowvar=False),
                'features': features, 'logits': out['logits'],
                'predicted_label': np.argmax(out['logits'], -1)}
    return sample_quality.score(stats(pixels), stats(reference_pixels), labels=labels)


def test_held_out_accuracy(variables, digits):
    _, _, test_x, test_y = digits
    logits = _features(variables, test_x)['logits']
    accuracy = np.mean(np.argmax(logits, axis=-1) == test_y)
    assert accuracy >= 0.95, accuracy


def test_metric_ranks_real_digits_far_above_noise_and_blur(variables, digits):
    train_x, train_y, test_x, _ = digits
    real = _score(variables, train_x, train_y, test_x)
    noise_x = np.random.default_rng(0).integers(0, 256, train_x.shape, dtype=np.uint8)
    noise = _score(variables, noise_x, None, test_x)
    blur = _score(variables, _box_blur(train_x), train_y, test_x)
    fd_real = real['fid']
    assert 0 < fd_real < 20, fd_real  # Mostly the finite-sample bias of 297 references.
    assert noise['fid'] > 10 * fd_real, (noise, real)
    assert blur['fid'] > 10 * fd_real, (blur, real)
    # Blurred digits are also much harder to recognise.
    assert blur['label_accuracy'] < real['label_accuracy'] - 0.2
    assert abs(_score(variables, test_x, None, test_x)['fid']) < 1e-6  # Same Gaussian.


def test_label_accuracy_true_shuffled_and_unlabelled(variables, digits):
    _, _, test_x, test_y = digits
    assert _score(variables, test_x, test_y, test_x)['label_accuracy'] >= 0.95
    shuffled = np.random.default_rng(1).permutation(test_y)
    chance = _score(variables, test_x, shuffled, test_x)['label_accuracy']
    assert 0.03 < chance < 0.2, chance
    # -1 marks unconditional samples: left out of the accuracy, not counted wrong.
    partly = test_y.copy()
    partly[::2] = -1
    keep = partly >= 0
    predicted = np.argmax(_features(variables, test_x)['logits'], axis=-1)
    assert _score(variables, test_x, partly, test_x)['label_accuracy'] == pytest.approx(
        np.mean(predicted[keep] == test_y[keep]))
    assert 'label_accuracy' not in _score(variables, test_x, np.full_like(test_y, -1), test_x)


def test_cache_path_default(monkeypatch, tmp_path):
    name = os.path.basename(digits_net.cache_path(str(tmp_path)))
    assert re.fullmatch(rf'digits_net_{digits_net.VERSION}_[0-9a-f]{{8}}_seed0\.npz', name)
    monkeypatch.setenv(digits_net.CACHE_ENV_VAR, str(tmp_path))
    assert digits_net.cache_path() == os.path.join(str(tmp_path), name)
    monkeypatch.delenv(digits_net.CACHE_ENV_VAR)
    assert digits_net.cache_path() == os.path.join(
        os.path.expanduser('~'), '.cache', 'ddpm_jax', name)


def test_cache_round_trip_and_repair(monkeypatch, tmp_path, variables):
    calls = []

    def fake_train(seed=0):
        calls.append(seed)
        return variables

    cache_dir = str(tmp_path / 'cache')  # Not there yet: load_or_train creates it.
    path = digits_net.cache_path(cache_dir)
    monkeypatch.setattr(digits_net, 'train_digits_net', fake_train)
    first = digits_net.load_or_train(cache_dir)
    assert calls == [0]
    assert os.listdir(cache_dir) == [os.path.basename(path)]  # No temporary left behind.
    _assert_trees_equal(first, variables)
    with np.load(path) as npz:
        assert 'params/Dense_0/kernel' in npz.files

    def no_train(seed=0):
        raise AssertionError('the cache should have been used')

    monkeypatch.setattr(digits_net, 'train_digits_net', no_train)
    _assert_trees_equal(digits_net.load_or_train(cache_dir), variables)

    # A truncated file, garbage, and arrays of the wrong shape are all retrained.
    good = open(path, 'rb').read()
    bad_files = [good[:len(good) // 2], b'not an npz file']
    wrong = digits_net._flatten(variables)
    wrong['params/Dense_0/kernel'] = wrong['params/Dense_0/kernel'][:, :3]
    monkeypatch.setattr(digits_net, 'train_digits_net', fake_train)
    for i, content in enumerate(bad_files + [None]):
        if content is None:
            np.savez(path, **wrong)
        else:
            with open(path, 'wb') as f:
                f.write(content)
        _assert_trees_equal(digits_net.load_or_train(cache_dir), variables)
        assert len(calls) == 2 + i
        # Overwritten with the retrained variables (zip timestamps may differ).
        _assert_trees_equal(digits_net._read_cache(path), variables)
