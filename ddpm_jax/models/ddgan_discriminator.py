"""The time-conditioned discriminator of denoising diffusion GANs (Xiao et al. 2022).

D(x_{t-1}, x_t, t) tells a real pair of consecutive diffusion states from a pair
whose x_{t-1} the generator made. The design follows the paper's discriminator
(App. C, Table 6/7: "Discriminator_small" for 32px, the same blocks for larger
images), not the ADM classifier:

* the pair enters concatenated on channels through a 1x1 convolution to
  `base_channels` (the paper's 2 ngf);
* residual down blocks of LeakyReLU(0.2) -> 3x3 conv -> + dense(t embedding) ->
  LeakyReLU -> (2x average-pool down) -> 3x3 conv, with a 1x1 (pooled) skip, summed
  and scaled by 1/sqrt(2); every block but the first halves the resolution
  (`Discriminator_small`), or every block (`downsample_first`, `Discriminator_large`);
* the timestep embedding is sinusoidal -> dense -> LeakyReLU -> dense, then
  LeakyReLU, shared by all blocks;
* a minibatch standard-deviation channel (Karras et al. 2018, groups of up to 4),
  a 3x3 conv, LeakyReLU, a **sum** over pixels, and a linear logit. A
  class-conditional D adds the projection term <embed(y), h> (Miyato & Koyama
  2018).

No normalisation layers. Three departures from the paper's code: 2x average
pooling instead of its (1, 3, 3, 1) FIR blur before subsampling; an identity skip
where a block keeps its width and resolution (theirs always has a 1x1 conv; with
it, one digits run scored Frechet distance 20.3 instead of 16.7); and no zero
initialisation of each block's second conv and of the final conv (theirs start at
zero, so D's first logits are constant).
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers

_SLOPE = 0.2


def _act(x: jax.Array) -> jax.Array:
    return nn.leaky_relu(x, _SLOPE)


def _conv(features: int, kernel: int, name: str, *, bias: bool = True) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                   use_bias=bias, kernel_init=layers.default_init('adm'),
                   param_dtype=jnp.float32, name=name)


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

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = _conv(self.features, 3, 'conv_0')(_act(x))
        h = h + nn.Dense(self.features, kernel_init=layers.default_init('adm'),
                         name='temb_proj')(temb)[:, None, None, :]
        h = _act(h)
        skip = x
        if self.downsample:
            h, skip = layers.avg_pool_2x(h), layers.avg_pool_2x(skip)
        h = _conv(self.features, 3, 'conv_1')(h)
        if skip.shape[-1] != self.features or self.downsample:
            skip = _conv(self.features, 1, 'skip', bias=False)(skip)
        return (h + skip) / math.sqrt(2.0)


class DDGANDiscriminator(nn.Module):
    """D(pair, t, y) -> [B] logits for the pair (x_{t-1}, x_t) stacked on channels.

    Attributes:
        base_channels: Channels of the 1x1 input conv; block k has
            base_channels * channel_mult[k].
        channel_mult: Channel multiplier per block; every block after the first
            halves the resolution.
        downsample_first: The first block halves it too.
        temb_dim: Width of the timestep embedding.
        num_classes: > 0 adds the projection term of the label.
        stddev_group: Minibatch-stddev group size (0 disables it).
    """
    base_channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 4, 4)
    temb_dim: int = 128
    num_classes: int = 0
    stddev_group: int = 4
    downsample_first: bool = False

    @nn.compact
    def __call__(self, pair: jax.Array, t: jax.Array, y: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        del train  # No dropout or normalisation statistics.
        dense = lambda n, name: nn.Dense(n, kernel_init=layers.default_init('adm'), name=name)
        temb = layers.timestep_embedding(jnp.broadcast_to(t, (pair.shape[0],)), self.temb_dim)
        temb = dense(self.temb_dim, 'temb_0')(temb)
        temb = _act(dense(self.temb_dim, 'temb_1')(_act(temb)))
        h = _conv(self.base_channels, 1, 'conv_in')(pair)
        for level, mult in enumerate(self.channel_mult):
            h = DownBlock(self.base_channels * mult,
                          downsample=level > 0 or self.downsample_first,
                          name=f'down_{level}')(h, temb)
        if self.stddev_group:
            h = minibatch_stddev(h, self.stddev_group)
        width = self.base_channels * self.channel_mult[-1]
        h = _act(_conv(width, 3, 'conv_out')(h))
        h = jnp.sum(h, axis=(1, 2))  # [B, width]
        logit = dense(1, 'logit')(h)[:, 0]
        if self.num_classes > 0:
            if y is None:
                raise ValueError('A class-conditional discriminator needs labels y.')
            embed = nn.Embed(self.num_classes, width, name='class_embed')(y)
            logit = logit + jnp.sum(embed * h, axis=-1)
        return logit.astype(jnp.float32)
