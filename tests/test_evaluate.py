"""Tests for ddpm_jax.evaluate (bits/dim on the test split) and ddpm_jax.images."""

import json

import jax
import numpy as np
import PIL.Image
import pytest

from ddpm_jax import checkpointing
from ddpm_jax import evaluate
from ddpm_jax import images
from ddpm_jax import parallel
from ddpm_jax import train
from ddpm_jax.models import create_model


def _write_checkpoint(config, workdir, step=3):
    """Saves a train state with random host-drawn values (no XLA-compiled init).

    Float leaves ~ 0.1 N(0, 1) (the UNet then predicts some non-zero eps), integer
    leaves 0; the state's structure comes from `train.create_abstract_train_state`.
    """
    mesh = parallel.create_mesh()
    abstract = train.create_abstract_train_state(config, create_model(config), mesh)
    rng = np.random.default_rng(0)

    def fill(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            value = (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        else:
            value = np.zeros(leaf.shape, leaf.dtype)
        return jax.device_put(value, leaf.sharding)

    state = jax.tree.map(fill, abstract)
    with checkpointing.create_checkpoint_manager(workdir, config) as manager:
        checkpointing.save_checkpoint(manager, step, state, config, force=True)
        manager.wait_until_finished()


@pytest.fixture
def small_config(tiny_config):
    """tiny_config with a one-level UNet without attention: quick to compile."""
    tiny_config.model.channel_mult = (1,)
    tiny_config.model.attention_resolutions = ()
    return tiny_config


def test_evaluate_bits_per_dim(small_config, tmp_path):
    config = small_config
    workdir = str(tmp_path)
    _write_checkpoint(config, workdir)
    config.eval.num_images = 5
    config.eval.global_batch_size = 4  # Two batches; the second has 3 padding rows.
    result = evaluate.evaluate(config, workdir)

    assert result['step'] == 3 and result['num_images'] == 5
    assert np.isfinite(result['total_bpd']) and result['total_bpd'] > 0
    assert 0 <= result['prior_bpd'] < result['total_bpd']
    quarters = [result[f'vb_q{q}'] for q in range(4)]
    assert all(np.isfinite(quarters)) and all(q > 0 for q in quarters)
    # The bound decomposes: L_T + sum of the per-step terms, grouped by quarter.
    np.testing.assert_allclose(result['prior_bpd'] + sum(quarters), result['total_bpd'],
                               rtol=1e-6)
    np.testing.assert_allclose(sum(result['vb_per_step'][:5]), result['vb_q0'], rtol=1e-6)
    assert len(result['vb_per_step']) == config.diffusion.num_timesteps
    written = json.loads((tmp_path / 'eval_3.json').read_text())
    assert written == result  # JSON floats round-trip exactly.

    # Each image's noise depends on its index only and padding rows never count: one
    # batch of 12 (7 padding rows) gives the same bound as two batches of 4.
    config.eval.global_batch_size = 12
    again = evaluate.evaluate(config, workdir)
    assert again['num_images'] == 5
    for key in ('total_bpd', 'prior_bpd', 'vb_q0', 'vb_q3'):
        np.testing.assert_allclose(again[key], result[key], rtol=1e-5)


def test_evaluate_rejects_bad_batch(small_config, tmp_path):
    small_config.eval.global_batch_size = 6  # Not a multiple of the 4 devices.
    with pytest.raises(ValueError, match='eval.global_batch_size'):
        evaluate.evaluate(small_config, str(tmp_path))


def test_summarize_quarters():
    sums = {'count': np.float64(2.0), 'total_bpd': np.float64(30.0),
            'prior_bpd': np.float64(2.0),
            'vb': np.arange(8, dtype=np.float64) * 2.0,  # Means 0, 1, ..., 7.
            'mse': np.ones(8) * 4.0}
    result = evaluate.summarize(sums, step=7)
    assert result['total_bpd'] == 15.0 and result['prior_bpd'] == 1.0
    # N = 8 steps: quarter q holds steps 2q and 2q + 1.
    assert [result[f'vb_q{q}'] for q in range(4)] == [1.0, 5.0, 9.0, 13.0]
    assert result['mse_q2'] == 2.0 and result['num_images'] == 2


# --- images ------------------------------------------------------------------------------


def test_to_uint8_exact():
    x = np.array([-1.0, -0.5, 0.0, 1.0, 1.5, -2.0, 2.0 / 255.0 - 1.0, 0.999], np.float32)
    # (x + 1) * 127.5 = 0, 63.75, 127.5, 255, 318.75, -127.5, 1, 254.87: rounded
    # half to even, clipped to [0, 255].
    np.testing.assert_array_equal(images.to_uint8(x), [0, 64, 128, 255, 255, 0, 1, 255])
    assert images.to_uint8(x).dtype == np.uint8
    # The data pipeline's p / 127.5 - 1 round-trips every pixel value.
    pixels = np.arange(256)
    np.testing.assert_array_equal(
        images.to_uint8((pixels / 127.5 - 1.0).astype(np.float32)), pixels)


def test_make_grid_exact():
    imgs = np.array([[[[1], [2]], [[3], [4]]],
                     [[[5], [6]], [[7], [8]]],
                     [[[9], [10]], [[11], [12]]]], np.uint8)  # [3, 2, 2, 1]
    grid = images.make_grid(imgs, ncols=2)
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 2, 0, 5, 6, 0],
        [0, 3, 4, 0, 7, 8, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 9, 10, 0, 0, 0, 0],
        [0, 11, 12, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ], np.uint8)[..., None]
    np.testing.assert_array_equal(grid, expected)

    scaled = images.make_grid(imgs[:1], ncols=1, scale=2, pad_value=255)
    np.testing.assert_array_equal(scaled[..., 0], [
        [255, 255, 255, 255, 255, 255],
        [255, 1, 1, 2, 2, 255],
        [255, 1, 1, 2, 2, 255],
        [255, 3, 3, 4, 4, 255],
        [255, 3, 3, 4, 4, 255],
        [255, 255, 255, 255, 255, 255],
    ])
    assert images.upscale_factor(8) == 4 and images.upscale_factor(28) == 2
    assert images.upscale_factor(32) == 1 and images.upscale_factor(8, min_size=0) == 1
    assert images.grid_columns(20, num_classes=10) == 10 and images.grid_columns(5) == 3
    with pytest.raises(ValueError, match='uint8'):
        images.make_grid(imgs.astype(np.float32), ncols=2)


@pytest.mark.parametrize('channels, mode', [(1, 'L'), (3, 'RGB')])
def test_save_png_round_trip(tmp_path, channels, mode):
    grid = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    path = images.save_png(tmp_path / 'sub' / 'grid.png', grid)
    with PIL.Image.open(path) as image:
        assert image.mode == mode
        loaded = np.asarray(image)
    np.testing.assert_array_equal(loaded.reshape(grid.shape), grid)


def test_save_npz(tmp_path):
    x = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    path = images.save_npz(tmp_path / 'a' / 's.npz', images=x, labels=np.array([4], np.int32))
    with np.load(path) as f:
        np.testing.assert_array_equal(f['images'], x)
        assert f['labels'].dtype == np.int32 and f['labels'][0] == 4
