"""FIR resampling of images: StyleGAN2's `upfirdn2d` operations as NCSN++ and DDGAN use them.

Owns the 2x up- and down-sampling with a finite-impulse-response filter (Karras et al.
2020, StyleGAN2; used by NCSN++, Song et al. 2021b, App. H, and by DDGAN's networks)
and their fusions with a 3x3 convolution, exactly as `up_or_down_sampling.py` of
score_sde / denoising-diffusion-gan compute them:

* `upsample_2x(x, k)`: zeros inserted after every pixel, the filter outer(k, k) / sum^2
  times 4 (so a constant image keeps its value), padding ((n + 1) // 2 + 1, n // 2)
  with n = len(k) - 2 (`upsample_2d`);
* `downsample_2x(x, k)`: the filter outer(k, k) / sum^2, padding ((n + 1) // 2, n // 2),
  every second pixel (`downsample_2d`);
* `upsample_conv_2x(x, w, k)`: a transposed convolution of stride 2 (zeros inserted
  between pixels, full padding K - 1, the kernel w as a correlation), then the filter
  times 4 with padding ((n + 1) // 2 + 1, n // 2 + 1), n = len(k) - 2 - (K - 1)
  (`upsample_conv_2d`);
* `conv_downsample_2x(x, w, k)`: the filter with padding ((n + 1) // 2, n // 2),
  n = len(k) - 2 + K - 1, then the convolution with stride 2 and no padding
  (`conv_downsample_2d`).

The 1-D kernel k (e.g. (1, 3, 3, 1)) is applied along each axis in turn, which is the
separable 2-D filter outer(k, k) the references build; the filter is a convolution
(k reversed), as `upfirdn2d` flips its kernel. Negative paddings crop. Everything runs
in the input's dtype on NHWC arrays; w is a Flax [K, K, C_in, C_out] kernel (PyTorch's
[C_out, C_in, K, K] transposed). No parameters: pure functions of arrays.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_KERNEL = (1, 3, 3, 1)


def check_kernel(kernel: Sequence[float]) -> None:
    """Raises ValueError unless `kernel` is a 1-D FIR kernel of at least 2 taps, non-zero sum."""
    k = np.asarray(kernel, np.float64)
    if k.ndim != 1 or k.size < 2 or k.sum() == 0:
        raise ValueError(f'model.ncsnpp.fir_kernel must be a 1-D kernel of >= 2 taps with a '
                         f'non-zero sum, got {tuple(np.ravel(k))}.')


def _taps(kernel: Sequence[float], gain: float) -> np.ndarray:
    """The 1-D taps: k / sum(k) times gain, reversed (a convolution, as upfirdn2d)."""
    check_kernel(kernel)
    k = np.asarray(kernel, np.float64)
    return (k / k.sum() * gain)[::-1]


def _filter_axis(x: jax.Array, taps: np.ndarray, axis: int, pad: tuple[int, int], *,
                 up: int = 1, down: int = 1) -> jax.Array:
    """upfirdn along one axis: insert up - 1 zeros after each sample, pad (negative:
    crop), correlate with the (already reversed) taps, keep every `down`-th sample."""
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (pad[0], pad[1] + up - 1, up - 1)  # Interior zeros, and after the last.
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    n_out = x.shape[axis] - len(taps) + 1
    out = None
    for j, tap in enumerate(taps):
        part = jax.lax.slice_in_dim(x, j, j + (n_out - 1) // down * down + 1, down, axis)
        term = part * jnp.asarray(tap, x.dtype)
        out = term if out is None else out + term
    return out


def _filter_2d(x: jax.Array, taps: np.ndarray, pad: tuple[int, int], *, up: int = 1,
               down: int = 1) -> jax.Array:
    x = _filter_axis(x, taps, 1, pad, up=up, down=down)
    return _filter_axis(x, taps, 2, pad, up=up, down=down)


def upsample_2x(x: jax.Array, kernel: Sequence[float] = DEFAULT_KERNEL) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C] (`upsample_2d(x, k, factor=2)`)."""
    n = len(kernel) - 2
    return _filter_2d(x, _taps(kernel, 2.0), ((n + 1) // 2 + 1, n // 2), up=2)


def downsample_2x(x: jax.Array, kernel: Sequence[float] = DEFAULT_KERNEL) -> jax.Array:
    """[B, H, W, C] -> [B, H/2, W/2, C] (`downsample_2d(x, k, factor=2)`)."""
    n = len(kernel) - 2
    return _filter_2d(x, _taps(kernel, 1.0), ((n + 1) // 2, n // 2), down=2)


def upsample_conv_2x(x: jax.Array, w: jax.Array, kernel: Sequence[float] = DEFAULT_KERNEL
                     ) -> jax.Array:
    """[B, H, W, C_in] -> [B, 2H, 2W, C_out]: `upsample_conv_2d(x, w, k, factor=2)`, the
    stride-2 transposed convolution with w ([K, K, C_in, C_out], odd K) then the filter."""
    size = w.shape[0]
    y = jax.lax.conv_general_dilated(
        x, w.astype(x.dtype), window_strides=(1, 1), padding=((size - 1, size - 1),) * 2,
        lhs_dilation=(2, 2), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    n = len(kernel) - 2 - (size - 1)
    return _filter_2d(y, _taps(kernel, 2.0), ((n + 1) // 2 + 1, n // 2 + 1))


def conv_downsample_2x(x: jax.Array, w: jax.Array, kernel: Sequence[float] = DEFAULT_KERNEL
                       ) -> jax.Array:
    """[B, H, W, C_in] -> [B, H/2, W/2, C_out]: `conv_downsample_2d(x, w, k, factor=2)`,
    the filter then the convolution with w ([K, K, C_in, C_out]) at stride 2."""
    size = w.shape[0]
    n = len(kernel) - 2 + size - 1
    x = _filter_2d(x, _taps(kernel, 1.0), ((n + 1) // 2, n // 2))
    return jax.lax.conv_general_dilated(
        x, w.astype(x.dtype), window_strides=(2, 2), padding='VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
