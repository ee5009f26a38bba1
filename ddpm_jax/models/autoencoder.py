"""The first stage of latent diffusion: a convolutional autoencoder and a patch discriminator.

`Autoencoder` is the encoder/decoder of Esser et al. 2021 (taming transformers'
`Encoder`/`Decoder`), which Rombach et al. 2022 (LDM) reuse: residual blocks without
a time embedding, 2x down/upsampling between `len(channel_mult)` levels (so the
downsampling factor is f = 2^(len(channel_mult) - 1)), self-attention at chosen
resolutions and in the middle block, GroupNorm, swish. Its latent is either

* 'kl': a diagonal Gaussian (mean, log-variance clipped to [-30, 20] as LDM's
  `DiagonalGaussianDistribution`), sampled by reparameterisation, regularised by a
  small KL to N(0, I) (LDM's `AutoencoderKL`); or
* 'vq': vector-quantised with a learned codebook and the straight-through
  estimator (van den Oord et al. 2017; taming's `VQModel`).

`PatchDiscriminator` is pix2pix's PatchGAN (Isola et al. 2017) as taming's
`NLayerDiscriminator`, with GroupNorm in place of BatchNorm (or no normalisation,
`num_groups=0`): batch statistics would couple the examples of a data-parallel
batch and need a mutable collection; group statistics do neither.

Layers are `ddpm_jax.models.layers`' 'ddpm' variant (TensorFlow-style padding of
the stride-2 convolution = taming's (0, 1) pad, GroupNorm epsilon 1e-6 as taming).

Initialisation (`autoencoder.init`; the same architecture and parameters either way):

* 'ddpm' (the default, the digits configs): convolutions and attention projections
  draw DDPM's Glorot-uniform ("fan_avg", variance scaling 1.0) kernels with zero
  biases, and every attention block's output projection `proj_out` starts at zero
  (the block starts as the identity);
* 'torch' (autoencoder_kl_f4 / vq_f4): LDM's, i.e. PyTorch's defaults on every layer
  (`layers.torch_default_init`: kaiming_uniform(a=sqrt(5)) kernels, i.e.
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases of the same bound, `proj_out` drawn like
  any other convolution), and the discriminator's biases at that bound too.

The VQ codebook is drawn from U(-1/K, 1/K) as taming's `VectorQuantizer2`
(`embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)`); the discriminator's
N(0, 0.02) convolution kernels are taming's `weights_init` (its biases start at
zero under 'ddpm'; PyTorch's, and 'torch', at U(-1/sqrt(fan_in), 1/sqrt(fan_in))).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax import autoencoder_losses
from ddpm_jax.models import layers

KINDS = ('kl', 'vq')
INITS = ('ddpm', 'torch')  # autoencoder.init (the module docstring).
_VARIANT = 'ddpm'


def symmetric_uniform(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound) (taming's codebook init with bound 1/K; Flax's
    `initializers.uniform(scale)` would draw U[0, scale))."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def downsampling_factor(channel_mult: Sequence[float]) -> int:
    """f = 2^(levels - 1): image side / latent side."""
    return 2 ** (len(channel_mult) - 1)


class ResnetBlock(nn.Module):
    """taming's ResnetBlock without a time embedding: two (norm, swish, conv), a skip."""
    out_channels: int
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(layers.GroupNorm(self.num_groups, _VARIANT, self.dtype, name='norm_0')(x))
        h = layers.conv(self.out_channels, _VARIANT, self.dtype, name='conv_0')(h)
        h = nn.silu(layers.GroupNorm(self.num_groups, _VARIANT, self.dtype, name='norm_1')(h))
        h = layers.conv(self.out_channels, _VARIANT, self.dtype, name='conv_1')(h)
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, _VARIANT, self.dtype, kernel=1, name='skip')(x)
        return x + h


class Encoder(nn.Module):
    """Image [B, H, W, C] -> [B, H/f, W/f, out_channels] (taming's Encoder)."""
    base_channels: int
    channel_mult: Sequence[float]
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    out_channels: int
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chans = layers.level_channels(self.base_channels, self.channel_mult)
        attn = dict(num_groups=self.num_groups, variant=_VARIANT, dtype=self.dtype)
        h = layers.conv(chans[0], _VARIANT, self.dtype, name='conv_in')(x.astype(self.dtype))
        resolution = x.shape[1]
        for level, ch in enumerate(chans):
            for i in range(self.num_res_blocks):
                h = ResnetBlock(ch, self.num_groups, self.dtype, name=f'down_{level}_res_{i}')(h)
                if resolution in self.attention_resolutions:
                    h = layers.AttentionBlock(name=f'down_{level}_attn_{i}', **attn)(h)
            if level != len(chans) - 1:
                h = layers.Downsample(ch, True, _VARIANT, self.dtype,
                                      name=f'down_{level}_downsample')(h)
                resolution //= 2
        h = ResnetBlock(chans[-1], self.num_groups, self.dtype, name='mid_res_0')(h)
        h = layers.AttentionBlock(name='mid_attn', **attn)(h)
        h = ResnetBlock(chans[-1], self.num_groups, self.dtype, name='mid_res_1')(h)
        h = nn.silu(layers.GroupNorm(self.num_groups, _VARIANT, self.dtype, name='norm_out')(h))
        return layers.conv(self.out_channels, _VARIANT, jnp.float32, name='conv_out')(h)


class Decoder(nn.Module):
    """Latent [B, h, w, z] -> image [B, h f, w f, out_channels] (taming's Decoder).

    `features_only=True` stops before the last convolution `conv_out` (the layer the
    adaptive GAN weight looks at; see `apply_output_layer`).
    """
    base_channels: int
    channel_mult: Sequence[float]
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    out_channels: int
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, features_only: bool = False) -> jax.Array:
        chans = layers.level_channels(self.base_channels, self.channel_mult)
        attn = dict(num_groups=self.num_groups, variant=_VARIANT, dtype=self.dtype)
        h = layers.conv(chans[-1], _VARIANT, self.dtype, name='conv_in')(z.astype(self.dtype))
        h = ResnetBlock(chans[-1], self.num_groups, self.dtype, name='mid_res_0')(h)
        h = layers.AttentionBlock(name='mid_attn', **attn)(h)
        h = ResnetBlock(chans[-1], self.num_groups, self.dtype, name='mid_res_1')(h)
        resolution = z.shape[1]
        for level in reversed(range(len(chans))):
            for i in range(self.num_res_blocks + 1):
                h = ResnetBlock(chans[level], self.num_groups, self.dtype,
                                name=f'up_{level}_res_{i}')(h)
                if resolution in self.attention_resolutions:
                    h = layers.AttentionBlock(name=f'up_{level}_attn_{i}', **attn)(h)
            if level != 0:
                h = layers.Upsample(chans[level], True, _VARIANT, self.dtype,
                                    name=f'up_{level}_upsample')(h)
                resolution *= 2
        h = nn.silu(layers.GroupNorm(self.num_groups, _VARIANT, jnp.float32,
                                     name='norm_out')(h))
        if features_only:
            return h.astype(jnp.float32)
        return output_layer(self.out_channels, name='conv_out')(h).astype(jnp.float32)


def output_layer(channels: int, name: str | None = None) -> nn.Conv:
    """The decoder's last layer (a float32 3x3 convolution)."""
    return layers.conv(channels, _VARIANT, jnp.float32, name=name)


def apply_output_layer(conv_params: Any, features: jax.Array) -> jax.Array:
    """The decoder's `conv_out` on `Decoder(..., features_only=True)` features.

    Args:
        conv_params: `params['decoder']['conv_out']` ({'kernel', 'bias'}).
        features: [B, H, W, C_0] float32.
    """
    channels = conv_params['kernel'].shape[-1]
    return output_layer(channels).apply({'params': conv_params}, features)


class Autoencoder(nn.Module):
    """The KL or VQ first-stage autoencoder (see the module docstring).

    Attributes mirror `config.autoencoder`; `out_channels` is the image's.
    Methods: `encode` (image -> latent parameters), `quantize` (VQ only),
    `decode` (latent -> image), `__call__` (image -> reconstruction, terms).
    """
    kind: str = 'kl'
    base_channels: int = 128
    channel_mult: Sequence[float] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = ()
    z_channels: int = 3
    codebook_size: int = 8192
    num_groups: int = 32
    out_channels: int = 3
    dtype: str = 'float32'

    def setup(self):
        if self.kind not in KINDS:
            raise ValueError(f'autoencoder.kind must be one of {KINDS}, got {self.kind!r}.')
        dtype = layers.get_dtype(self.dtype)
        arch = dict(base_channels=self.base_channels, channel_mult=tuple(self.channel_mult),
                    num_res_blocks=self.num_res_blocks,
                    attention_resolutions=tuple(self.attention_resolutions),
                    num_groups=self.num_groups, dtype=dtype)
        moments = 2 * self.z_channels if self.kind == 'kl' else self.z_channels
        self.encoder = Encoder(out_channels=moments, **arch)
        self.quant_conv = layers.conv(moments, _VARIANT, jnp.float32, kernel=1)
        self.post_quant_conv = layers.conv(self.z_channels, _VARIANT, jnp.float32, kernel=1)
        self.decoder = Decoder(out_channels=self.out_channels, **arch)
        if self.kind == 'vq':
            self.codebook = self.param(
                'codebook', symmetric_uniform(1.0 / self.codebook_size),
                (self.codebook_size, self.z_channels), jnp.float32)

    @property
    def factor(self) -> int:
        return downsampling_factor(self.channel_mult)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array] | jax.Array:
        """Image [B, H, W, C] in [-1, 1] -> latent parameters at [B, H/f, W/f, z].

        Returns:
            'kl': (mean, logvar), the log-variance clipped to [-30, 20];
            'vq': the encoder output before quantisation.
        """
        h = self.quant_conv(self.encoder(x))
        if self.kind == 'vq':
            return h
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, autoencoder_losses.clip_logvar(logvar)

    def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """VQ: (straight-through z_q, z_q, codes) of encoder outputs z [B, h, w, z]."""
        z_q, codes = autoencoder_losses.quantize(z, self.codebook)
        return autoencoder_losses.straight_through(z, z_q), z_q, codes

    def decode(self, z: jax.Array, features_only: bool = False) -> jax.Array:
        """Latent [B, h, w, z] -> image [B, h f, w f, C] (unclipped), or the features
        before the last layer. A VQ latent is decoded as given (quantise it first)."""
        return self.decoder(self.post_quant_conv(z), features_only=features_only)

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """What latent diffusion decodes: a KL latent as is, a VQ latent after
        quantisation (LDM's VQModelInterface diffuses before the quantiser)."""
        if self.kind == 'vq':
            z = self.quantize(z)[0]
        return self.decode(z)

    def __call__(self, x: jax.Array, noise: jax.Array | None = None,
                 features_only: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Reconstructs x.

        Args:
            x: [B, H, W, C] images in [-1, 1].
            noise: 'kl': N(0, I) noise of the latent's shape for the posterior sample
                (None decodes the mean); ignored for 'vq'.
            features_only: Return the decoder's features before its last layer.

        Returns:
            (reconstruction [B, H, W, C] or features, terms): 'kl': {'mean',
            'logvar', 'z'}; 'vq': {'z' (encoder output), 'z_q', 'codes'}.
        """
        if self.kind == 'kl':
            mean, logvar = self.encode(x)
            z = mean if noise is None else autoencoder_losses.sample_diagonal_gaussian(
                mean, logvar, noise)
            terms = {'mean': mean, 'logvar': logvar, 'z': z}
        else:
            z_e = self.encode(x)
            z, z_q, codes = self.quantize(z_e)
            terms = {'z': z_e, 'z_q': z_q, 'codes': codes}
        return self.decode(z, features_only=features_only), terms


class PatchDiscriminator(nn.Module):
    """PatchGAN (taming's NLayerDiscriminator): [B, H, W, C] -> patch logits [B, h, w, 1].

    4x4 convolutions (padding 1, N(0, 0.02) weights as taming's weights_init): one
    of stride 2 and LeakyReLU(0.2); `num_layers - 1` more of stride 2 with a norm;
    one of stride 1 with a norm; a stride-1 convolution to one logit per patch.
    Channels double per layer up to 8x `base_channels`. The norm is GroupNorm with
    `num_groups` groups (taming: BatchNorm), or none when `num_groups == 0`.
    """
    base_channels: int = 64
    num_layers: int = 3
    num_groups: int = 32
    dtype: str = 'float32'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = layers.get_dtype(self.dtype)
        init = nn.initializers.normal(0.02)
        norm = self.num_groups > 0

        def conv(features, stride, name, bias):
            return nn.Conv(features, (4, 4), strides=(stride, stride),
                           padding=((1, 1), (1, 1)), use_bias=bias, kernel_init=init,
                           dtype=dtype, param_dtype=jnp.float32, name=name)

        h = nn.leaky_relu(conv(self.base_channels, 2, 'conv_0', True)(x.astype(dtype)), 0.2)
        for n in range(1, self.num_layers + 1):
            stride = 2 if n < self.num_layers else 1
            features = self.base_channels * min(2 ** n, 8)
            h = conv(features, stride, f'conv_{n}', not norm)(h)
            if norm:
                h = layers.GroupNorm(self.num_groups, _VARIANT, dtype, name=f'norm_{n}')(h)
            h = nn.leaky_relu(h, 0.2)
        h = conv(1, 1, 'conv_out', True)(h)
        return h.astype(jnp.float32)


def latent_shape(image_size: int, autoencoder: Autoencoder) -> tuple[int, int, int]:
    """(h, w, z) of the latent of an image of side `image_size`."""
    side = image_size // autoencoder.factor
    return side, side, autoencoder.z_channels


def check_autoencoder(arch: Any, image_size: int, prefix: str = 'autoencoder') -> None:
    """Validates the autoencoder fields (config.autoencoder or a module).

    Raises:
        ValueError: Naming the field: an unknown kind, an image side not divisible
            by f, channels not divisible by the groups, attention resolutions that
            never occur, a codebook of fewer than 2 entries.
    """
    p = prefix
    if arch.kind not in KINDS:
        raise ValueError(f'{p}.kind={arch.kind!r} is not valid; choose one of {KINDS}.')
    if not arch.channel_mult:
        raise ValueError(f'{p}.channel_mult must not be empty.')
    if arch.base_channels <= 0 or arch.num_res_blocks < 1 or arch.z_channels < 1:
        raise ValueError(f'{p}.base_channels, {p}.num_res_blocks and {p}.z_channels must be '
                         f'positive (got {arch.base_channels}, {arch.num_res_blocks}, '
                         f'{arch.z_channels}).')
    factor = downsampling_factor(arch.channel_mult)
    if image_size % factor:
        raise ValueError(f'data.image_size={image_size} is not divisible by the '
                         f'downsampling factor f={factor} of {p}.channel_mult='
                         f'{tuple(arch.channel_mult)}.')
    for ch in layers.level_channels(arch.base_channels, arch.channel_mult):
        if ch <= 0 or ch % arch.num_groups:
            raise ValueError(f'{p}.num_groups={arch.num_groups} does not divide the {ch} '
                             f'channels of a level of {p}.channel_mult x {p}.base_channels.')
    resolutions = [image_size // 2 ** level for level in range(len(arch.channel_mult))]
    unknown = sorted(set(arch.attention_resolutions) - set(resolutions))
    if unknown:
        raise ValueError(f'{p}.attention_resolutions {unknown} never occur: the resolutions '
                         f'at data.image_size={image_size} are {resolutions}.')
    if arch.kind == 'vq' and arch.codebook_size < 2:
        raise ValueError(f'{p}.codebook_size={arch.codebook_size} must be >= 2.')
