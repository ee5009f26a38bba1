"""The time-conditioned discriminator of denoising diffusion GANs (Xiao et al. 2022).

D(x_{t-1}, x_t, t) tells a real pair of consecutive diffusion states from a pair
whose x_{t-1} the generator made. The design follows the paper's discriminator
(App. C, Table 6/7: "Discriminator_small" for 32px, the same blocks for larger
images; NVlabs/denoising-diffusion-gan, score_sde/models/discriminator.py), not the
ADM classifier:

* the pair enters concatenated on channels through a 1x1 convolution to
  `base_channels` (the paper's 2 ngf);
* residual down blocks of LeakyReLU(0.2) -> 3x3 conv -> + dense(t embedding) ->
  LeakyReLU -> (2x down) -> 3x3 conv, with a 1x1 convolution skip of the (downsampled)
  input, without bias, summed and scaled by 1/sqrt(2); every block but the first
  halves the resolution (`Discriminator_small`), or every block (`downsample_first`,
  `Discriminator_large`). With `blocks='ddgan'` (their DownConvBlock) the 2x down is
  their `upfirdn2d.downsample_2d` with the (1, 3, 3, 1) FIR kernel (`resampling.downsample_2x`)
  and every block has the skip convolution; `blocks='simple'` (this module's first
  design, kept by `configs/digits_ddgan.py`) averages 2x2 pixels instead and skips
  by identity where a block keeps its width and resolution (on one digits run the
  skip convolution there scored Frechet distance 20.3 against 16.7);
* the timestep embedding is the DDPM sinusoid ([sin, cos], frequencies
  exp(-ln(1e4) k / (dim/2 - 1)): their layers.get_timestep_embedding) of width
  `temb_dim` (their --t_emb_dim, 256) -> dense -> LeakyReLU -> dense, then LeakyReLU,
  shared by all blocks;
* a minibatch standard-deviation channel (Karras et al. 2018, groups of up to 4),
  a 3x3 conv, LeakyReLU, a **sum** over pixels, and a linear logit. A
  class-conditional D adds the projection term <embed(y), h> (Miyato & Koyama
  2018).

Every conv and dense layer is initialised as their dense_layer.py: weights
U(-b, b) with b = sqrt(3 scale / fan_out) and zero biases (`reference_init`). Their
`variance_scaling_init_` asks for mode 'fan_avg', but their `_calculate_correct_fan`
returns fan_out for every mode but 'fan_in', so fan_out (out channels x kernel area)
is what it uses. scale is 1, except 1e-10 (their init_scale=0) for each block's
second conv and, in the small D only, the final conv: at initialisation the small
D's logit is ~0 for every input. `weight_init='adm'` instead draws every weight from
PyTorch's default U(+-1/sqrt(fan_in)) with no near-zero layers (this module's first
initialisation, which `configs/digits_ddgan.py` keeps: on its 1,500-step CPU run the
reference initialisation scored Frechet distance 22.5, label accuracy 0.895; scale 1
everywhere 17.8 / 0.962; 'adm' 14.9 / 0.998; seed 0).

No normalisation layers.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers
from ddpm_jax.models import resampling

_SLOPE = 0.2
# Their init_scale=0 (dense_layer.variance_scaling_init_ turns 0 into 1e-10).
_NEAR_ZERO = 1e-10
DISC_INITS = ('ddgan', 'adm')  # `DDGANDiscriminator.weight_init`: theirs, or PyTorch's defaults.
DISC_BLOCKS = ('ddgan', 'simple')  # `DDGANDiscriminator.blocks` (the module docstring).


def reference_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """DDGAN's dense_layer.py initialiser: U(-b, b), b = sqrt(3 scale / fan_out).

    Their `kaiming_uniform_(w, gain=scale, mode='fan_avg')` computes the fan with
    `_calculate_correct_fan`, which returns fan_out for any mode other than 'fan_in';
    the variance is scale / max(1, fan_out). fan_out is the output channels times the
    kernel area (Flax's 'fan_out' of a [kh, kw, in, out] or [in, out] kernel).
    """
    return nn.initializers.variance_scaling(scale, 'fan_out', 'uniform')


def _kernel_init(init: str, scale: float = 1.0) -> nn.initializers.Initializer:
    if init not in DISC_INITS:
        raise ValueError(f'gan.disc_init must be one of {DISC_INITS}, got {init!r}.')
    return reference_init(scale) if init == 'ddgan' else layers.default_init('adm')


def _act(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, _SLOPE)


def _conv(features: int, kernel: int, name: str, init: str, *, bias: bool = True,
          scale: float = 1.0) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                   use_bias=bias, kernel_init=_kernel_init(init, scale),
                   param_dtype=jnp.float32, name=name,
                   conv_general_dilated=layers.conv_general_dilated)


def _dense(features: int, name: str, init: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_kernel_init(init), param_dtype=jnp.float32,
                    name=name)


def minibatch_stddev(h: jax.Array, group_size: int = 4) -> jax.Array:
    """Appends one channel: the mean over features of the per-group standard deviation.

    Examples are split into groups of G, the largest divisor of B up to
    `group_size` (Karras et al. 2018, Sec. 3: example b is in group b mod B/G); every
    example of a group gets its group's value.
    """
    batch, height, width, channels = h.shape
    group = max(g for g in range(1, min(group_size, batch) + 1) if batch % g == 0)
    g = h.astype(jnp.float32).reshape(group, batch // group, height, width, channels)
    std = jnp.sqrt(jnp.var(g, axis=0) + 1e-8)  # [B/group, H, W, C]
    stat = jnp.mean(std, axis=(1, 2, 3))  # [B/group]
    stat = jnp.tile(stat, group)[:, None, None, None]  # Example b is in group b % (B/group).
    return jnp.concatenate([h, jnp.broadcast_to(stat, (batch, height, width, 1))
                            .astype(h.dtype)], axis=-1)


class DownBlock(nn.Module):
    """A residual block with the time embedding added after its first conv."""
    features: int
    downsample: bool
    weight_init: str = 'ddgan'
    blocks: str = 'ddgan'

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        if self.blocks not in DISC_BLOCKS:
            raise ValueError(f'gan.disc_blocks must be one of {DISC_BLOCKS}, got '
                             f'{self.blocks!r}.')
        h = _conv(self.features, 3, 'conv_0', self.weight_init)(_act(x))
        h = h + _dense(self.features, 'temb_proj', self.weight_init)(temb)[:, None, None, :]
        h = _act(h)
        skip = x
        if self.downsample:
            down = resampling.downsample_2x if self.blocks == 'ddgan' else layers.avg_pool_2x
            h, skip = down(h), down(skip)
        h = _conv(self.features, 3, 'conv_1', self.weight_init, scale=_NEAR_ZERO)(h)
        if (self.blocks == 'ddgan' or skip.shape[-1] != self.features
                or self.downsample):
            skip = _conv(self.features, 1, 'skip', self.weight_init, bias=False)(skip)
        return (h + skip) / math.sqrt(2.0)


class DDGANDiscriminator(nn.Module):
    """D(pair, t, y) -> [B] logits for the pair (x_{t-1}, x_t) stacked on channels.

    Attributes:
        base_channels: Channels of the 1x1 input conv; block k has
            base_channels * channel_mult[k].
        channel_mult: Channel multiplier per block; every block after the first
            halves the resolution.
        downsample_first: The first block halves it too, and the final conv has
            scale-1 initialisation: their `Discriminator_large` (the small one's
            final conv starts near zero).
        temb_dim: Width of the timestep embedding (their --t_emb_dim).
        num_classes: > 0 adds the projection term of the label.
        stddev_group: Minibatch-stddev group size (0 disables it).
        weight_init: 'ddgan' (their dense_layer.py, with the near-zero layers) or 'adm'
            (PyTorch's default fan-in uniform everywhere); see the module docstring.
        blocks: 'ddgan' (their FIR downsampling and skip convolutions) or 'simple'
            (average pooling, identity skips where the shape is kept).
    """
    base_channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 4, 4)
    temb_dim: int = 256
    num_classes: int = 0
    stddev_group: int = 4
    downsample_first: bool = False
    weight_init: str = 'ddgan'
    blocks: str = 'ddgan'

    @nn.compact
    def __call__(self, pair: jax.Array, t: jax.Array, y: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        del train  # No dropout or normalisation statistics.
        temb = layers.timestep_embedding(jnp.broadcast_to(t, (pair.shape[0],)), self.temb_dim,
                                         variant='ddpm')
        temb = _dense(self.temb_dim, 'temb_0', self.weight_init)(temb)
        temb = _act(_dense(self.temb_dim, 'temb_1', self.weight_init)(_act(temb)))
        h = _conv(self.base_channels, 1, 'conv_in', self.weight_init)(pair)
        for level, mult in enumerate(self.channel_mult):
            h = DownBlock(self.base_channels * mult,
                          downsample=level > 0 or self.downsample_first,
                          weight_init=self.weight_init, blocks=self.blocks,
                          name=f'down_{level}')(h, temb)
        if self.stddev_group:
            h = minibatch_stddev(h, self.stddev_group)
        width = self.base_channels * self.channel_mult[-1]
        out_scale = 1.0 if self.downsample_first else _NEAR_ZERO
        h = _act(_conv(width, 3, 'conv_out', self.weight_init, scale=out_scale)(h))
        h = jnp.sum(h, axis=(1, 2))  # [B, width]
        logit = _dense(1, 'logit', self.weight_init)(h)[:, 0]
        if self.num_classes > 0:
            if y is None:
                raise ValueError('A class-conditional discriminator needs labels y.')
            embed = nn.Embed(self.num_classes, width, name='class_embed')(y)
            logit = logit + jnp.sum(embed * h, axis=-1)
        return logit.astype(jnp.float32)
