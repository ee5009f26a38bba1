"""NCSN++ and DDPM++ (Song et al. 2021b, App. H), and DDGAN's NCSN++ generator.

Owns `NCSNpp`, the score network of score_sde (`models/ncsnpp.py` of
yang-song/score_sde and score_sde_pytorch), which with different settings is

* NCSN++ (their VE models): FIR resampling (`model.fir`, kernel (1, 3, 3, 1)), BigGAN
  residual blocks that resample inside (`resblock_type='biggan'`), skip connections
  rescaled by 1/sqrt(2) (`skip_rescale`), an input pyramid added at every resolution
  (`progressive_input='residual'`) and random Fourier features of log sigma
  (`embedding_type='fourier'`, scale 16);
* DDPM++ (their VP models): the same blocks without FIR or pyramids, conditioned on
  the sinusoidal embedding of the timestep (`embedding_type='positional'`);
* DDGAN's generator (Xiao et al. 2022, `score_sde/models/ncsnpp_generator_adagn.py`):
  NCSN++ whose group norms are adaptive (`AdaptiveGroupNorm`: gamma, beta =
  dense(z_emb), gamma's bias starting at 1) to the latent z mapped by pixel norm and
  `mapping_layers` dense + SiLU layers to `z_emb_dim`, with a tanh on the output.

Every block follows the reference line by line: GroupNorm with min(C / 4, 32) groups and
epsilon 1e-6, SiLU, the time embedding (Fourier or sinusoidal of width nf, then
dense(4 nf), SiLU, dense(4 nf)) added after each block's first convolution through
dense(SiLU(temb)), single-head attention whose q, k, v, out are NIN layers, the
strided-convolution downsampling with TensorFlow's (0, 1) padding when not FIR. The
time input `t` is what the reference's `time_cond` is: the timestep or label for the
positional embedding (999 t for score_sde's continuous VP models, the step index for
DDGAN), sigma itself for the Fourier embedding (which embeds log sigma). The
reference's `scale_by_sigma` (VE) is `score_matching.score_from_output`'s division by
sigma, outside the network. Its `centered=False` (score_sde's VE models, trained on
[0, 1] data x) maps the input to 2x - 1 first, which is our data y itself; what remains
is the noise level: y's sigma is twice x's, so with `centered=False` the Fourier
embedding takes log(sigma / 2), the level in the units the network was trained in
(and the configs double sigma_min and sigma_max). With s_y = output / sigma_y =
s_x / 2 the loss, the samplers' steps and the likelihood are then score_sde's exactly,
mapped by y = 2x - 1.

Initialisation is the reference's `default_init(scale)`: variance scaling with fan_avg
and a uniform distribution (Glorot uniform at scale 1), scale 0 turned into 1e-10 for
the last convolution of each residual branch, the attention output and the output
convolution (`model.init_scale`), scale 0.1 for the other NIN layers; biases zero; the
Fourier frequencies are N(0, fourier_scale^2) and never trained (a parameter under
stop_gradient, as score_sde's Flax model keeps them).

Parameter names: 'conv_in', 'down_<l>_res_<i>', 'down_<l>_attn_<i>',
'down_<l>_downsample', 'down_<l>_pyramid', 'mid_res_0', 'mid_attn', 'mid_res_1',
'up_<l>_res_<i>', 'up_<l>_attn', 'up_<l>_pyramid_norm' / '_conv' / 'up_<l>_pyramid',
'up_<l>_upsample', 'out_norm', 'conv_out'; `reference_modules` lists them in the order of
the reference's `all_modules`, which is how `released` maps a PyTorch state dict.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers
from ddpm_jax.models import resampling
from ddpm_jax.models import unet

RESBLOCK_TYPES = ('biggan', 'ddpm')
PROGRESSIVE = ('none', 'output_skip', 'residual')
PROGRESSIVE_INPUT = ('none', 'input_skip', 'residual')
PROGRESSIVE_COMBINE = ('sum', 'cat')
EMBEDDING_TYPES = ('fourier', 'positional')

Dtype = Any


def _init(scale: float) -> nn.initializers.Initializer:
    """score_sde's `default_init(scale)`: scale 0 means 1e-10."""
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, 'fan_avg',
                                            'uniform')


def num_groups(channels: int) -> int:
    """NCSN++'s GroupNorm groups: min(C / 4, 32)."""
    return min(channels // 4, 32)


def _conv(features: int, dtype: Dtype, *, kernel: int = 3, scale: float = 1.0,
          name: str | None = None) -> nn.Module:
    """ddpm_conv3x3 / ddpm_conv1x1: padding K // 2, default_init(scale), zero bias."""
    if kernel == 1:
        return layers.PointwiseConv(features, _init(scale), dtype, name=name)
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                   kernel_init=_init(scale), dtype=dtype, param_dtype=jnp.float32, name=name,
                   conv_general_dilated=layers.conv_general_dilated)


def _nin(features: int, dtype: Dtype, *, scale: float = 0.1, name: str | None = None
         ) -> layers.ChannelDense:
    """score_sde's NIN: a [C_in, C_out] matrix over the channels (default init scale 0.1)."""
    return layers.ChannelDense(features, _init(scale), dtype, name=name)


def _norm(channels: int, dtype: Dtype, name: str) -> layers.GroupNorm:
    return layers.GroupNorm(num_groups(channels), 'ddpm', dtype, name=name)


def _combine_skip(x: jax.Array, h: jax.Array, skip_rescale: bool) -> jax.Array:
    """The residual sum (over sqrt(2) with skip_rescale): a `layers.gradient_boundary`."""
    return layers.gradient_boundary((x + h) / math.sqrt(2.0) if skip_rescale else x + h)


class AdaptiveGroupNorm(nn.Module):
    """DDGAN's AdaptiveGroupNorm: GroupNorm without affine, then gamma * h + beta with
    (gamma, beta) = dense(z_emb) (their dense_layer init: U(+-sqrt(3 / fan_out)); the
    bias starts at 1 for gamma, 0 for beta)."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, zemb: jax.Array) -> jax.Array:
        channels = x.shape[-1]

        def bias_init(key, shape, dtype=jnp.float32):
            del key
            return jnp.concatenate([jnp.ones((channels,), dtype), jnp.zeros((channels,), dtype)])
        style = nn.Dense(2 * channels, kernel_init=nn.initializers.variance_scaling(
            1.0, 'fan_out', 'uniform'), bias_init=bias_init, param_dtype=jnp.float32,
            name='style')(zemb.astype(jnp.float32))
        gamma, beta = jnp.split(style[:, None, None, :], 2, axis=-1)
        h = layers.normalize_groups(x.astype(jnp.float32), num_groups(channels), 1e-6)
        return (gamma * h + beta).astype(self.dtype)


def _group_norm(channels: int, dtype: Dtype, name: str, zemb: jax.Array | None):
    """A GroupNorm of the block, adaptive to z_emb for the DDGAN generator."""
    if zemb is None:
        return _norm(channels, dtype, name)
    return lambda h: AdaptiveGroupNorm(dtype, name=name)(h, zemb)


class ResnetBlock(nn.Module):
    """ResnetBlockBigGANpp (`biggan`, optionally resampling both branches) or
    ResnetBlockDDPMpp (`ddpm`); with z_emb their DDGAN "_Adagn" versions.

    Attributes:
        out_channels: output channels.
        kind: 'biggan' or 'ddpm'.
        up / down: resample 2x inside (biggan only): FIR or nearest / 2x2 mean.
        fir / fir_kernel: FIR resampling and its kernel.
        dropout: rate before the last conv.
        skip_rescale: divide the sum by sqrt(2).
        init_scale: default_init scale of the last conv.
        deterministic: no dropout.
        dtype: compute dtype.
    """
    out_channels: int
    kind: str = 'biggan'
    up: bool = False
    down: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = resampling.DEFAULT_KERNEL
    dropout: float = 0.0
    skip_rescale: bool = True
    init_scale: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, zemb: jax.Array | None = None
                 ) -> jax.Array:
        x = x.astype(self.dtype)
        in_channels = x.shape[-1]
        h = nn.silu(_group_norm(in_channels, self.dtype, 'norm_0', zemb)(x))
        if self.up:
            if self.fir:
                h, x = (resampling.upsample_2x(a, self.fir_kernel) for a in (h, x))
            else:
                h, x = layers.upsample_nearest(h), layers.upsample_nearest(x)
        elif self.down:
            if self.fir:
                h, x = (resampling.downsample_2x(a, self.fir_kernel) for a in (h, x))
            else:
                h, x = layers.avg_pool_2x(h), layers.avg_pool_2x(x)
        h = _conv(self.out_channels, self.dtype, name='conv_0')(h)
        t = layers.ChannelDense(self.out_channels, _init(1.0), self.dtype,
                                name='dense_0')(nn.silu(temb))
        h = h + t.astype(self.dtype)[:, None, None, :]
        h = nn.silu(_group_norm(self.out_channels, self.dtype, 'norm_1', zemb)(h))
        if self.dropout > 0:
            h = layers.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = _conv(self.out_channels, self.dtype, scale=self.init_scale, name='conv_1')(h)
        if self.kind == 'biggan':
            if in_channels != self.out_channels or self.up or self.down:
                x = _conv(self.out_channels, self.dtype, kernel=1, name='skip')(x)
        elif in_channels != self.out_channels:
            x = _nin(self.out_channels, self.dtype, name='skip')(x)
        return _combine_skip(x, h, self.skip_rescale)


class AttnBlock(nn.Module):
    """AttnBlockpp: GroupNorm, single-head attention over all pixels with NIN q, k, v
    (init scale 0.1) and output (init_scale), a residual, rescaled by 1/sqrt(2) with
    skip_rescale. The attention itself is `layers.attention` (1/sqrt(C))."""
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        b, height, width, c = x.shape
        h = _norm(c, self.dtype, 'norm')(x).reshape(b, height * width, 1, c)
        q, k, v = (_nin(c, self.dtype, name=n)(h) for n in ('q', 'k', 'v'))
        h = layers.attention(q, k, v).reshape(b, height, width, c)
        h = _nin(c, self.dtype, scale=self.init_scale, name='proj_out')(h)
        return _combine_skip(x, h, self.skip_rescale)


class Resample(nn.Module):
    """layerspp.Upsample / Downsample: FIR (optionally fused with a 3x3 conv) or nearest /
    strided conv ((0, 1) padding) / 2x2 mean."""
    out_channels: int
    up: bool
    with_conv: bool
    fir: bool
    fir_kernel: Sequence[int] = resampling.DEFAULT_KERNEL
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.fir:
            if not self.with_conv:
                return (resampling.upsample_2x if self.up else resampling.downsample_2x)(
                    x, self.fir_kernel)
            kernel = self.param('kernel', _init(1.0), (3, 3, x.shape[-1], self.out_channels),
                                jnp.float32)
            bias = self.param('bias', nn.initializers.zeros_init(), (self.out_channels,),
                              jnp.float32)
            fused = resampling.upsample_conv_2x if self.up else resampling.conv_downsample_2x
            return fused(x, kernel.astype(self.dtype), self.fir_kernel) + bias.astype(self.dtype)
        if self.up:
            x = layers.upsample_nearest(x)
            return _conv(self.out_channels, self.dtype, name='conv')(x) if self.with_conv else x
        if not self.with_conv:
            return layers.avg_pool_2x(x)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(self.out_channels, (3, 3), strides=(2, 2), padding='VALID',
                       kernel_init=_init(1.0), dtype=self.dtype, param_dtype=jnp.float32,
                       name='conv')(x)


class NCSNpp(nn.Module):
    """The NCSN++ / DDPM++ score network, or DDGAN's generator with `latent_dim > 0`.

    Attributes mirror config.model (configs/default.py): base_channels is the
    reference's nf, channel_mult its ch_mult, attention_resolutions its
    attn_resolutions, conv_resample its resamp_with_conv; the rest carry the
    reference's names. Output: [B, H, W, C] float32 (tanh'd with output_tanh).
    """
    base_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attention_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    conv_resample: bool = True
    fir: bool = True
    fir_kernel: Sequence[int] = resampling.DEFAULT_KERNEL
    skip_rescale: bool = True
    resblock_type: str = 'biggan'
    progressive: str = 'none'
    progressive_input: str = 'residual'
    progressive_combine: str = 'sum'
    embedding_type: str = 'fourier'
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    centered: bool = True
    latent_dim: int = 0
    mapping_layers: int = 4
    z_emb_dim: int = 256
    output_tanh: bool = False
    dtype: str = 'float32'
    remat: bool = False
    remat_policy: str = 'full'

    def check(self, image_size: int | None = None) -> None:
        """Validates the fields (`check_architecture`), naming the config field."""
        for field, value, choices in (('resblock_type', self.resblock_type, RESBLOCK_TYPES),
                                      ('progressive', self.progressive, PROGRESSIVE),
                                      ('progressive_input', self.progressive_input,
                                       PROGRESSIVE_INPUT),
                                      ('progressive_combine', self.progressive_combine,
                                       PROGRESSIVE_COMBINE),
                                      ('embedding_type', self.embedding_type, EMBEDDING_TYPES)):
            if value not in choices:
                raise ValueError(f'model.ncsnpp.{field} must be one of {choices}, got {value!r}.')
        resampling.check_kernel(self.fir_kernel)
        check_architecture(self, image_size=image_size)

    def _check_inputs(self, x: jax.Array, z: jax.Array | None) -> None:
        self.check(x.shape[1] if x.ndim == 4 else None)
        if x.ndim != 4 or x.shape[1] != x.shape[2]:
            raise ValueError(f'Expected square NHWC images [B, H, W, C], got shape {x.shape}.')
        if (self.latent_dim > 0) != (z is not None):
            raise ValueError(f'model.latent_dim={self.latent_dim}: a latent z is '
                             f'{"required" if self.latent_dim > 0 else "not taken"}.')
        if z is not None and z.shape != (x.shape[0], self.latent_dim):
            raise ValueError(f'z must have shape [{x.shape[0]}, {self.latent_dim}], got {z.shape}.')

    def _embed(self, t: jax.Array, batch_size: int) -> jax.Array:
        nf = self.base_channels
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch_size,))
        if self.embedding_type == 'fourier':
            w = self.param('time_fourier', nn.initializers.normal(self.fourier_scale), (nf,),
                           jnp.float32)
            if not self.centered:  # Trained on [0, 1] data: its noise level is sigma / 2.
                t = t / 2
            proj = jnp.log(t)[:, None] * jax.lax.stop_gradient(w)[None, :] * 2 * math.pi
            temb = jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)
        else:
            temb = layers.timestep_embedding(t, nf, 'ddpm')
        temb = layers.ChannelDense(4 * nf, _init(1.0), jnp.float32, name='time_dense_0')(temb)
        return layers.ChannelDense(4 * nf, _init(1.0), jnp.float32,
                                   name='time_dense_1')(nn.silu(temb))

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, train: bool = False,
                 z: jax.Array | None = None) -> jax.Array:
        """The network output for inputs x [B, H, W, C] at noise input t ([B] or scalar:
        a timestep / label, or sigma > 0 for the Fourier embedding) and, for a
        generator, latents z [B, latent_dim]."""
        self._check_inputs(x, z)
        dtype = layers.get_dtype(self.dtype)
        channels, batch_size = x.shape[-1], x.shape[0]
        temb = self._embed(t, batch_size)
        zemb = (unet.mapping_network(z, self.mapping_layers, self.z_emb_dim, nn.silu)
                if z is not None else None)
        res_cls = unet.rematerialised(ResnetBlock, self.remat, self.remat_policy)
        attn_cls = unet.rematerialised(AttnBlock, self.remat, self.remat_policy)
        res_kw = dict(kind=self.resblock_type, fir=self.fir, fir_kernel=tuple(self.fir_kernel),
                      dropout=self.dropout, skip_rescale=self.skip_rescale,
                      init_scale=self.init_scale, deterministic=not train, dtype=dtype)
        attn_kw = dict(skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=dtype)

        def res(out, name, h, **kw):
            return res_cls(out, name=name, **res_kw, **kw)(h, temb, zemb)

        def resample(out, up, name, h, with_conv):
            return Resample(out, up, with_conv, self.fir, tuple(self.fir_kernel), dtype,
                            name=name)(h)

        chans = layers.level_channels(self.base_channels, self.channel_mult)
        levels = len(chans)
        resolution = x.shape[1]
        x = x.astype(dtype)
        pyramid_in = x if self.progressive_input != 'none' else None
        hs = [_conv(self.base_channels, dtype, name='conv_in')(x)]
        for level, ch in enumerate(chans):
            for i in range(self.num_res_blocks):
                h = res(ch, f'down_{level}_res_{i}', hs[-1])
                if resolution in self.attention_resolutions:
                    h = attn_cls(name=f'down_{level}_attn_{i}', **attn_kw)(h)
                hs.append(h)
            if level != levels - 1:
                if self.resblock_type == 'ddpm':
                    h = resample(ch, False, f'down_{level}_downsample', hs[-1], self.conv_resample)
                else:
                    h = res(ch, f'down_{level}_downsample', hs[-1], down=True)
                if self.progressive_input == 'input_skip':
                    pyramid_in = resample(0, False, f'down_{level}_pyramid_resample', pyramid_in,
                                          False)
                    h = self._combine(pyramid_in, h, f'down_{level}_pyramid', dtype)
                elif self.progressive_input == 'residual':
                    pyramid_in = resample(h.shape[-1], False, f'down_{level}_pyramid',
                                          pyramid_in, True)
                    pyramid_in = _combine_skip(pyramid_in, h, self.skip_rescale)
                    h = pyramid_in
                hs.append(h)
                resolution //= 2

        h = res(chans[-1], 'mid_res_0', hs[-1])
        h = attn_cls(name='mid_attn', **attn_kw)(h)
        h = res(chans[-1], 'mid_res_1', h)

        pyramid = None
        for level in reversed(range(levels)):
            for i in range(self.num_res_blocks + 1):
                h = res(chans[level], f'up_{level}_res_{i}',
                        jnp.concatenate([h, hs.pop()], axis=-1))
            if resolution in self.attention_resolutions:
                h = attn_cls(name=f'up_{level}_attn', **attn_kw)(h)
            if self.progressive != 'none':
                pyramid = self._output_pyramid(level, levels, h, pyramid, channels, dtype)
                if self.progressive == 'residual' and level != levels - 1:
                    h = pyramid  # (Not at the lowest resolution, where it only starts.)
            if level != 0:
                if self.resblock_type == 'ddpm':
                    h = resample(chans[level], True, f'up_{level}_upsample', h, self.conv_resample)
                else:
                    h = res(chans[level], f'up_{level}_upsample', h, up=True)
                resolution *= 2
        assert not hs

        if self.progressive == 'output_skip':
            h = pyramid
        else:
            h = nn.silu(_norm(h.shape[-1], jnp.float32, 'out_norm')(h))
            h = _conv(channels, jnp.float32, scale=self.init_scale, name='conv_out')(h)
        h = h.astype(jnp.float32)
        return jnp.tanh(h) if self.output_tanh else h

    def _combine(self, pyramid_in: jax.Array, h: jax.Array, name: str, dtype: Dtype) -> jax.Array:
        """layerspp.Combine: a 1x1 conv of the pyramid to h's channels, summed or concatenated."""
        p = _conv(h.shape[-1], dtype, kernel=1, name=name)(pyramid_in)
        return p + h if self.progressive_combine == 'sum' else jnp.concatenate([p, h], axis=-1)

    def _output_pyramid(self, level: int, levels: int, h: jax.Array, pyramid: jax.Array | None,
                        channels: int, dtype: Dtype) -> jax.Array:
        """The output pyramid after level `level`'s blocks ('output_skip' or 'residual')."""
        def head(out, scale):
            p = nn.silu(_norm(h.shape[-1], dtype, f'up_{level}_pyramid_norm')(h))
            return _conv(out, dtype, scale=scale, name=f'up_{level}_pyramid_conv')(p)

        if self.progressive == 'output_skip':
            new = head(channels, self.init_scale)
            if level == levels - 1:
                return new
            up = Resample(0, True, False, self.fir, tuple(self.fir_kernel), dtype,
                          name=f'up_{level}_pyramid_resample')(pyramid)
            return up + new
        if level == levels - 1:
            return head(h.shape[-1], 1.0)
        up = Resample(h.shape[-1], True, True, self.fir, tuple(self.fir_kernel), dtype,
                      name=f'up_{level}_pyramid')(pyramid)
        return _combine_skip(up, h, self.skip_rescale)


def norm_channels(arch: Any) -> list[int]:
    """The channels of every group norm of the network, in order (the reference's walk).

    Also the widths of its residual blocks' inputs and outputs, so the checks of
    `check_architecture` cover every layer.
    """
    chans = layers.level_channels(arch.base_channels, arch.channel_mult)
    seen, in_ch, hs_c = [], arch.base_channels, [arch.base_channels]
    for level, ch in enumerate(chans):
        for _ in range(arch.num_res_blocks):
            seen += [in_ch, ch]
            in_ch = ch
            hs_c.append(in_ch)
        if level != len(chans) - 1:
            if arch.resblock_type != 'ddpm':
                seen += [in_ch, in_ch]
            if arch.progressive_input == 'input_skip' and arch.progressive_combine == 'cat':
                in_ch *= 2
            hs_c.append(in_ch)
    seen += [in_ch] * 4
    for level in reversed(range(len(chans))):
        for _ in range(arch.num_res_blocks + 1):
            seen += [in_ch + hs_c.pop(), chans[level]]
            in_ch = chans[level]
    return seen


def check_architecture(arch: Any, image_size: int | None = None) -> None:
    """Validates the NCSN++ fields of `arch` (an NCSNpp or config.model with the ncsnpp
    group flattened in), naming the config field.

    Raises:
        ValueError: on a bad size, a width whose min(C / 4, 32) groups do not divide
            it, an image size the levels cannot halve, or attention resolutions that
            never occur.
    """
    if arch.base_channels < 4:
        raise ValueError(f'model.base_channels must be >= 4 (GroupNorm of min(C/4, 32) '
                         f'groups), got {arch.base_channels}.')
    layers.check_levels(arch)
    for ch in norm_channels(arch):
        if ch < 4 or ch % num_groups(ch):
            raise ValueError(
                f'A layer of {ch} channels (model.base_channels={arch.base_channels}, '
                f'model.channel_mult={tuple(arch.channel_mult)}) cannot be split into '
                f'NCSN++\'s min(C/4, 32) GroupNorm groups: use multiples of 32.')
    if arch.latent_dim > 0 and (arch.mapping_layers < 1 or arch.z_emb_dim < 1):
        raise ValueError(f'A DDGAN generator needs model.mapping_layers >= 1 and '
                         f'model.ncsnpp.z_emb_dim >= 1, got {arch.mapping_layers}, '
                         f'{arch.z_emb_dim}.')
    if image_size is not None:
        layers.level_resolutions(arch, image_size)
