"""Image output: [-1, 1] floats to uint8, sample grids, PNG and npz files.

This module owns how generated images leave the library: `to_uint8` quantises
model outputs to 8-bit pixels (by default rounding, the inverse of the data
pipeline's `p / 127.5 - 1`; or truncating, as the reference sampling scripts
write their .npz files), `make_grid` tiles a batch into one picture with 1-pixel
separators (optionally upscaled, nearest neighbour, so 8x8 digits are
viewable), and `save_png` / `save_npz` write files through `etils.epath`, so
local paths and cloud buckets both work. Pure NumPy and PIL; no JAX.
"""

import io
import math

import numpy as np
import PIL.Image
from etils import epath

__all__ = ['QUANTIZE_MODES', 'to_uint8', 'upscale_factor', 'make_grid', 'save_png', 'save_npz',
           'grid_columns']


# How samples in [-1, 1] become 8-bit pixels (`sample.quantize`).
QUANTIZE_MODES = ('round', 'truncate')


def to_uint8(images, mode: str = 'round') -> np.ndarray:
    """Quantises images in [-1, 1] to uint8 pixels.

    'round': clip(round((x + 1) * 127.5), 0, 255), NumPy's round-half-to-even; the
    data pipeline maps pixel p to p / 127.5 - 1, which this inverts exactly.
    'truncate': floor(clip((x + 1) * 127.5, 0, 255)) computed in float32, what
    guided-diffusion's and improved-diffusion's sampling scripts write
    (`((sample + 1) * 127.5).clamp(0, 255).to(th.uint8)`): half a level darker on
    average, and a data image p / 127.5 - 1 may come back as p - 1. Values outside
    [-1, 1] are clipped in both.

    Args:
        images: Array-like of any shape (e.g. [N, H, W, C]) with values in [-1, 1].
        mode: One of `QUANTIZE_MODES`.

    Returns:
        A uint8 NumPy array of the same shape.

    Raises:
        ValueError: An unknown mode.
    """
    if mode == 'round':
        x = np.asarray(images, np.float64)
        return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if mode == 'truncate':
        x = np.asarray(images, np.float32)
        return np.clip((x + np.float32(1.0)) * np.float32(127.5), 0, 255).astype(np.uint8)
    raise ValueError(f'quantize mode must be one of {QUANTIZE_MODES}, got {mode!r}')


def upscale_factor(image_size: int, min_size: int = 32) -> int:
    """The smallest integer factor that makes an image side at least `min_size` pixels.

    Args:
        image_size: Side of one image, in pixels.
        min_size: Target minimum side (0 or less: no upscaling).

    Returns:
        An integer >= 1.
    """
    if image_size <= 0:
        raise ValueError(f'image_size must be positive, got {image_size}')
    if min_size <= image_size:
        return 1
    return -(-min_size // image_size)


def grid_columns(num_images: int, num_classes: int = 0) -> int:
    """Columns for a sample grid: one per class when that fits, else a square-ish grid.

    Args:
        num_images: Images in the grid.
        num_classes: Classes of a conditional model whose labels cycle 0, 1, ...
            (0: unconditional).

    Returns:
        The number of columns (>= 1).
    """
    if 0 < num_classes <= num_images:
        return num_classes
    return max(1, math.ceil(math.sqrt(num_images)))


def make_grid(images: np.ndarray, ncols: int, *, padding: int = 1, pad_value: int = 0,
              scale: int = 1) -> np.ndarray:
    """Tiles images row-major into one picture with `padding`-pixel separators.

    Separators also run around the border, so the result has shape
    [rows * (H*scale + padding) + padding, ncols * (W*scale + padding) + padding, C]
    with rows = ceil(N / ncols). Empty cells of the last row are `pad_value`.

    Args:
        images: uint8 [N, H, W, C] (N >= 1).
        ncols: Images per row (>= 1; more than N is allowed).
        padding: Separator width in output pixels (not scaled).
        pad_value: Value of separators and empty cells.
        scale: Integer nearest-neighbour upscaling of each image (see `upscale_factor`).

    Returns:
        uint8 [H', W', C] grid.

    Raises:
        ValueError: Not a uint8 [N, H, W, C] array, or ncols / scale < 1, or padding < 0.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f'images must be [N, H, W, C] with N >= 1, got {images.shape}')
    if images.dtype != np.uint8:
        raise ValueError(f'images must be uint8 (see to_uint8), got {images.dtype}')
    if ncols < 1 or scale < 1 or padding < 0:
        raise ValueError(f'need ncols >= 1, scale >= 1, padding >= 0; got ncols={ncols}, '
                         f'scale={scale}, padding={padding}')
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    rows = -(-n // ncols)
    grid = np.full((rows * (h + padding) + padding, ncols * (w + padding) + padding, c),
                   pad_value, np.uint8)
    for k in range(n):
        r, col = divmod(k, ncols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[k]
    return grid


def save_png(path, grid: np.ndarray) -> str:
    """Writes a uint8 [H, W, C] (C = 1 or 3) or [H, W] image as PNG.

    One channel is written as 8-bit grayscale. Parent directories are created.

    Args:
        path: Destination (local path or anything `etils.epath` opens).
        grid: The image, e.g. from `make_grid`.

    Returns:
        The path as a string.

    Raises:
        ValueError: Wrong dtype or channel count.
    """
    grid = np.asarray(grid)
    if grid.dtype != np.uint8:
        raise ValueError(f'save_png needs uint8 pixels, got {grid.dtype}')
    if grid.ndim == 3 and grid.shape[-1] == 1:
        grid = grid[..., 0]
    if not (grid.ndim == 2 or (grid.ndim == 3 and grid.shape[-1] == 3)):
        raise ValueError(f'save_png needs [H, W], [H, W, 1] or [H, W, 3], got {grid.shape}')
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    PIL.Image.fromarray(grid).save(buffer, format='PNG')
    path.write_bytes(buffer.getvalue())
    return str(path)


def save_npz(path, **arrays) -> str:
    """Writes arrays to an uncompressed .npz (e.g. images=uint8 NHWC, labels=int32).

    Args:
        path: Destination; parent directories are created.
        **arrays: Named arrays.

    Returns:
        The path as a string.
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    path.write_bytes(buffer.getvalue())
    return str(path)
