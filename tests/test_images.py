"""Tests for ddpm_jax.images: uint8 conversion, grids and files, against exact values."""

import numpy as np
import PIL.Image
import pytest

from ddpm_jax import images


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


def test_to_uint8_truncate_as_the_reference_scripts():
    x = np.array([-1.0, -0.5, 0.0, 1.0, 1.5, -2.0, 2.0 / 255.0 - 1.0, 0.999], np.float32)
    # floor(clip((x + 1) * 127.5, 0, 255)) of 0, 63.75, 127.5, 255, 318.75, -127.5,
    # 0.99999994 (pixel 1 through float32), 254.87.
    np.testing.assert_array_equal(images.to_uint8(x, 'truncate'),
                                  [0, 63, 127, 255, 255, 0, 0, 254])
    assert images.to_uint8(x, 'truncate').dtype == np.uint8
    # In float32, as torch computes ((x + 1) * 127.5).to(uint8): a data image p / 127.5 - 1
    # comes back as p or p - 1 (never above), some values as p - 1.
    pixels = np.arange(256)
    data = (pixels / 127.5 - 1.0).astype(np.float32)
    back = images.to_uint8(data, 'truncate').astype(int)
    assert set(np.unique(pixels - back)) == {0, 1}
    with pytest.raises(ValueError, match='quantize mode'):
        images.to_uint8(x, 'floor')


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
