"""The diffusion UNet of DDPM (Ho et al. 2020) and ADM (Dhariwal & Nichol 2021).

Owns `UNet`, the noise (or x_0 / v) predictor, and `encode`, its downsampling half,
which the noise-aware classifier reuses. The architecture follows the PixelCNN++
style UNet of Ho et al. 2020 (Appendix B) with the improvements of Nichol & Dhariwal
2021 (learned variances: twice the output channels) and Dhariwal & Nichol 2021
(Sec. 3: attention at several resolutions, several heads, BigGAN up/down-sampling
residual blocks, adaptive group normalisation, class embeddings added to the time
embedding). The label embedding has one extra "null" row (index num_classes) when
the model is trained for classifier-free guidance (Ho & Salimans 2022).

Parameter names are fixed per block (e.g. 'down_1_res_0', 'up_2_attn_1', 'mid_attn'),
so a model with `remat=True` has exactly the parameter tree of the plain one.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import conditioning
from ddpm_jax.models import layers


REMAT_POLICIES = ('full', 'save_convs')
# The generator's mapping-network activations: 'silu' is DDGAN's (NCSN++'s act);
# 'leaky_relu' (slope 0.2) is what this library's first DDGAN generators used (their
# stored configs are upgraded to it: config_json.upgrade_json_dict).
MAPPING_ACTIVATIONS = {'silu': nn.silu, 'leaky_relu': lambda x: nn.leaky_relu(x, 0.2)}


def mapping_network(z: jax.Array, num_layers: int, width: int, activation) -> jax.Array:
    """DDGAN's z_transform (float32): pixel norm, then `num_layers` x (dense to `width`,
    activation), the dense layers named 'mapping_<k>' in the calling module and
    initialised as their dense_layer.dense, U(+-sqrt(3 / fan_out))
    (`ddgan_discriminator.reference_init`). Call from a compact method."""
    init = nn.initializers.variance_scaling(1.0, 'fan_out', 'uniform')
    h = z.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-8)
    for k in range(num_layers):
        h = activation(layers.ChannelDense(width, init, jnp.float32, name=f'mapping_{k}')(h))
    return h


def _save_convs(prim, *_, **params) -> bool:
    """Remat policy: keep convolution and weight-matmul outputs, recompute the rest.

    Inside a rematerialised block the norms, nonlinearities, dropout masks and
    attention's batched products are recomputed in the backward pass, while the
    outputs of the expensive, weight-bearing ops (convolutions, Winograd's included,
    and dense layers: dot_general without batch dimensions) are stored.
    """
    if prim.name == 'conv_general_dilated':
        return True
    if prim.name == 'name':  # checkpoint_name: layers.conv3x3_winograd's output.
        return params['name'] == layers.WINOGRAD_OUTPUT
    if prim.name == 'dot_general':
        (_, _), (lhs_batch, _) = params['dimension_numbers']
        return not lhs_batch
    return False


def rematerialised(cls: type[nn.Module], remat: bool, policy: str = 'full') -> type[nn.Module]:
    """`cls`, wrapped in `nn.remat` with `policy` when `remat` is set.

    Rematerialisation recomputes a block's activations in the backward pass instead of
    storing them (Chen et al. 2016). `policy` says what a rematerialised block still
    stores: 'full' nothing but its inputs; 'save_convs' also its convolution and dense
    outputs (`_save_convs`), recomputing only the cheap elementwise work and
    attention's softmax, so most of the saving of memory-bound activations at a
    fraction of the recompute. Both give gradients equal to the plain model's.
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f'model.remat_policy must be one of {REMAT_POLICIES}, got {policy!r}.')
    if not remat:
        return cls
    return nn.remat(cls, **({} if policy == 'full' else {'policy': _save_convs}))


def block_classes(remat: bool, policy: str = 'full'
                  ) -> tuple[type[nn.Module], type[nn.Module]]:
    """ResBlock and AttentionBlock, each `rematerialised` when `remat` is set."""
    return (rematerialised(layers.ResBlock, remat, policy),
            rematerialised(layers.AttentionBlock, remat, policy))


def block_factories(arch: Any, train: bool
                    ) -> tuple[type[nn.Module], type[nn.Module], dict, dict]:
    """Block classes (rematerialised if arch.remat) and their shared keyword arguments.

    Args:
        arch: a UNet or Classifier.
        train: enables dropout in the residual blocks.

    Returns:
        (ResBlock class, AttentionBlock class, ResBlock kwargs, AttentionBlock kwargs).
    """
    res_block, attn_block = block_classes(arch.remat, arch.remat_policy)
    common = dict(variant=arch.variant, dtype=layers.get_dtype(arch.dtype),
                  num_groups=arch.num_groups)
    res_kwargs = dict(dropout=arch.dropout, use_scale_shift_norm=arch.use_scale_shift_norm,
                      deterministic=not train, **common)
    attn_kwargs = dict(num_heads=arch.num_heads, num_head_channels=arch.num_head_channels,
                       legacy_qkv_order=arch.legacy_qkv_order, **common)
    return res_block, attn_block, res_kwargs, attn_kwargs


def attend(arch: Any, attn_block: type[nn.Module], attn_kwargs: dict, name: str,
           h: jax.Array, context: jax.Array | None) -> jax.Array:
    """Self-attention, then (with a context) cross-attention to the context; or, with
    `arch.context_block='spatial_transformer'`, LDM's SpatialTransformer in place of
    both (`ddpm_jax.models.conditioning`).

    The cross-attention block is named '<name>_cross', so a model without a context
    has exactly the parameters of one without cross-attention.
    """
    if context is not None and arch.context_block == 'spatial_transformer':
        block = rematerialised(conditioning.SpatialTransformer, arch.remat, arch.remat_policy)
        return block(num_heads=attn_kwargs['num_heads'],
                     num_head_channels=attn_kwargs['num_head_channels'],
                     num_groups=attn_kwargs['num_groups'], depth=arch.context_depth,
                     dtype=attn_kwargs['dtype'], name=name)(h, context)
    h = attn_block(name=name, **attn_kwargs)(h)
    if context is not None:
        h = conditioning.CrossAttentionBlock(
            num_heads=attn_kwargs['num_heads'], num_head_channels=attn_kwargs['num_head_channels'],
            num_groups=attn_kwargs['num_groups'], dtype=attn_kwargs['dtype'],
            name=f'{name}_cross')(h, context)
    return h


def encode(arch: Any, x: jax.Array, emb: jax.Array, train: bool,
           context: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """The input blocks and middle block of the UNet.

    Must be called from inside the compact `__call__` of `arch`, which owns the
    submodules it creates.

    Args:
        arch: the calling module (UNet or Classifier), with the config.model fields.
        x: [B, H, W, C] input images.
        emb: [B, 4 * base_channels] conditioning embedding.
        train: enables dropout.
        context: [B, L, D] tokens the attention blocks also attend to, or None.

    Returns:
        (h, skips): the middle block's output [B, H / 2^(L-1), W / 2^(L-1), C_L] and
        the activations saved for the skip connections, in order.
    """
    dtype = layers.get_dtype(arch.dtype)
    res_block, attn_block, res_kwargs, attn_kwargs = block_factories(arch, train)
    chans = layers.level_channels(arch.base_channels, arch.channel_mult)

    h = layers.conv(chans[0], arch.variant, dtype, name='conv_in')(x.astype(dtype))
    skips = [h]
    resolution = x.shape[1]
    for level, ch in enumerate(chans):
        for i in range(arch.num_res_blocks):
            h = res_block(ch, name=f'down_{level}_res_{i}', **res_kwargs)(h, emb)
            if resolution in arch.attention_resolutions:
                h = attend(arch, attn_block, attn_kwargs, f'down_{level}_attn_{i}', h,
                           context)
            skips.append(h)
        if level != len(chans) - 1:
            if arch.resblock_updown:
                h = res_block(ch, down=True, name=f'down_{level}_downsample',
                              **res_kwargs)(h, emb)
            else:
                h = layers.Downsample(ch, arch.conv_resample, arch.variant, dtype,
                                      name=f'down_{level}_downsample')(h)
            skips.append(h)
            resolution //= 2

    h = res_block(chans[-1], name='mid_res_0', **res_kwargs)(h, emb)
    h = attend(arch, attn_block, attn_kwargs, 'mid_attn', h, context)
    h = res_block(chans[-1], name='mid_res_1', **res_kwargs)(h, emb)
    return h, skips


def embed_timesteps(arch: Any, t: jax.Array, batch_size: int) -> jax.Array:
    """Sinusoidal embedding of t followed by the two-layer MLP (width 4 * base).

    Kept in float32, like ADM's time embedding under mixed precision.

    Args:
        arch: the calling module.
        t: [B] or scalar timesteps.
        batch_size: B.

    Returns:
        [B, 4 * base_channels] float32.
    """
    t = jnp.broadcast_to(jnp.asarray(t), (batch_size,))
    emb_dim = 4 * arch.base_channels
    emb = layers.timestep_embedding(t, arch.base_channels, arch.variant)
    emb = layers.dense(emb_dim, arch.variant, jnp.float32, name='time_embed_0')(emb)
    emb = layers.dense(emb_dim, arch.variant, jnp.float32,
                       name='time_embed_1')(nn.silu(emb))
    return emb


def check_input(x: jax.Array, arch: Any) -> None:
    """Checks the input rank and spatial size against the architecture."""
    if x.ndim != 4:
        raise ValueError(f'Expected NHWC images [B, H, W, C], got shape {x.shape}.')
    height, width = x.shape[1:3]
    if height != width:
        raise ValueError(f'Expected square images, got {height}x{width} (data.image_size).')
    layers.check_architecture(arch, image_size=height)


class UNet(nn.Module):
    """Timestep- (and optionally class-) conditional UNet.

    Attributes mirror config.model (see configs/default.py). The output has the
    input's channels, doubled when `learn_sigma` (mean output first, then the
    variance interpolation v of Nichol & Dhariwal 2021, Eq. 15).

    With `latent_dim > 0` it is a DDGAN generator G(x_t, z, t) (Xiao et al. 2022,
    Sec. 4): z ~ N(0, I) is normalised (pixel norm), mapped by `mapping_layers`
    dense layers, each followed by `mapping_activation` (their NCSN++ generator's
    z_transform: PixelNorm, dense(nz), SiLU, then n_mlp x (dense, SiLU), so
    mapping_layers = n_mlp + 1; weights initialised as their dense_layer.py, see
    `ddgan_discriminator.reference_init`), projected linearly and added to the time
    embedding, which drives the adaptive group norms of every residual block when
    `use_scale_shift_norm` is set. `output_tanh` squashes the output into (-1, 1)
    (their generator's final torch.tanh, on unless --not_use_tanh); it is only
    allowed for a generator.

    With `low_res_size > 0` it is ADM's super-resolution model ("ADM-U", Dhariwal &
    Nichol 2021, App. I; guided-diffusion's SuperResModel): the low-resolution image
    (`low_res`, [B, low_res_size, low_res_size, C]) is upsampled bilinearly to the
    input's size and concatenated after x on the channels, so the first convolution
    sees 2C channels; the output keeps C (2C with learn_sigma).

    `timestep_scale` multiplies t before the embedding: 1000 / T for Improved DDPM's
    released models, trained with `rescale_timesteps` (their T = 4000).

    With `context_encoder` 'class' or 'tokens' the labels y are turned into a context
    sequence [B, L, context_dim] (`ddpm_jax.models.conditioning`) that every
    attention block attends to after its self-attention (LDM's cross-attention,
    Rombach et al. 2022, Sec. 3.3), or, with `context_block='spatial_transformer'`,
    LDM's SpatialTransformer (`context_depth` transformer blocks) in place of each
    self-attention block; the labels are then not added to the time embedding.
    The null label (num_classes, or the null token) gives the null context of
    classifier-free guidance.
    """
    variant: str = 'adm'
    base_channels: int = 128
    channel_mult: Sequence[float] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    num_head_channels: int = -1
    dropout: float = 0.0
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False
    conv_resample: bool = True
    num_groups: int = 32
    num_classes: int = 0
    class_dropout_prob: float = 0.0
    learn_sigma: bool = False
    latent_dim: int = 0
    mapping_layers: int = 3
    mapping_activation: str = 'silu'
    output_tanh: bool = False
    legacy_qkv_order: bool = False
    timestep_scale: float = 1.0
    low_res_size: int = 0
    context_encoder: str = 'none'
    context_dim: int = 0
    context_layers: int = 1
    context_vocab_size: int = 0
    context_block: str = 'cross_attention'
    context_depth: int = 1
    dtype: str = 'float32'
    remat: bool = False
    remat_policy: str = 'full'

    @property
    def num_label_embeddings(self) -> int:
        """Rows of the label embedding: num_classes, plus the null label for CFG."""
        if self.num_classes <= 0:
            return 0
        return self.num_classes + (1 if self.class_dropout_prob > 0 else 0)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
                 train: bool = False, z: jax.Array | None = None,
                 low_res: jax.Array | None = None) -> jax.Array:
        """Predicts the model output for noisy images.

        Args:
            x: [B, H, W, C] noisy images x_t.
            t: [B] int32 original (training) timesteps, or a scalar.
            y: [B] int32 labels in 0..num_classes-1, or num_classes (the null label,
                only when class_dropout_prob > 0); required iff num_classes > 0.
            train: enables dropout (needs the 'dropout' rng collection).
            z: [B, latent_dim] latent noise; required iff latent_dim > 0.
            low_res: [B, low_res_size, low_res_size, C] images in [-1, 1]; required iff
                low_res_size > 0 (a super-resolution model).

        Returns:
            [B, H, W, C] float32, or [B, H, W, 2C] with learn_sigma.

        Raises:
            ValueError: for a label given to an unconditional model or missing for a
                conditional one, or an input the architecture cannot take.
        """
        check_input(x, self)
        if self.num_classes < 0:
            raise ValueError(f'model.num_classes must be >= 0, got {self.num_classes}.')
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError('model.class_dropout_prob must be in [0, 1), got '
                             f'{self.class_dropout_prob}.')
        if self.class_dropout_prob > 0 and self.num_classes == 0:
            raise ValueError('model.class_dropout_prob > 0 needs a class-conditional model '
                             '(model.num_classes > 0).')
        if self.num_classes > 0 and y is None:
            raise ValueError(f'The model is class-conditional (model.num_classes='
                             f'{self.num_classes}): a label y is required.')
        if self.num_classes == 0 and y is not None:
            raise ValueError('The model is unconditional (model.num_classes=0) but a label '
                             'y was given.')

        if (self.latent_dim > 0) != (z is not None):
            raise ValueError(f'model.latent_dim={self.latent_dim}: a latent z is '
                             f'{"required" if self.latent_dim > 0 else "not taken"}.')
        if self.output_tanh and self.latent_dim == 0:
            raise ValueError('model.output_tanh is for a DDGAN generator (model.latent_dim '
                             '> 0), whose output is x_0 in [-1, 1].')
        batch_size, out_channels = x.shape[0], x.shape[-1] * (2 if self.learn_sigma else 1)
        if low_res is not None or self.low_res_size:
            x = self._concat_low_res(x, low_res)
        if self.timestep_scale != 1.0:
            t = jnp.asarray(t, jnp.float32) * self.timestep_scale
        emb = embed_timesteps(self, t, batch_size)
        context = None
        if self.context_encoder != 'none':  # The labels enter by cross-attention only.
            conditioning.check_context(self)
            context = conditioning.create_context_encoder(self, self.num_label_embeddings)(y)
        elif y is not None:
            if y.shape != (batch_size,):
                raise ValueError(f'Labels y must have shape [{batch_size}], got {y.shape}.')
            # N(0, 1) rows as ADM's nn.Embedding (Flax's default is ~1/sqrt(D)).
            emb = emb + nn.Embed(self.num_label_embeddings, emb.shape[-1],
                                 embedding_init=nn.initializers.normal(1.0),
                                 param_dtype=jnp.float32, name='label_emb')(y)

        if z is not None:
            emb = emb + self._map_latent(z, batch_size, emb.shape[-1])

        dtype = layers.get_dtype(self.dtype)
        res_block, attn_block, res_kwargs, attn_kwargs = block_factories(self, train)
        chans = layers.level_channels(self.base_channels, self.channel_mult)

        h, skips = encode(self, x, emb, train, context)
        resolution = h.shape[1]
        for level in reversed(range(len(chans))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(chans[level], name=f'up_{level}_res_{i}', **res_kwargs)(h, emb)
                if resolution in self.attention_resolutions:
                    h = attend(self, attn_block, attn_kwargs, f'up_{level}_attn_{i}', h,
                               context)
            if level != 0:
                if self.resblock_updown:
                    h = res_block(chans[level], up=True, name=f'up_{level}_upsample',
                                  **res_kwargs)(h, emb)
                else:
                    h = layers.Upsample(chans[level], self.conv_resample, self.variant, dtype,
                                        name=f'up_{level}_upsample')(h)
                resolution *= 2

        # The output head runs in float32, as in ADM's mixed-precision training.
        h = nn.silu(layers.GroupNorm(self.num_groups, self.variant, jnp.float32,
                                     name='out_norm')(h))
        h = layers.conv(out_channels, self.variant, jnp.float32, zero_init=True,
                        name='conv_out')(h)
        if self.output_tanh:
            h = jnp.tanh(h)
        return h.astype(jnp.float32)

    def _concat_low_res(self, x: jax.Array, low_res: jax.Array | None) -> jax.Array:
        """[x, bilinear upsampling of low_res] on channels (SuperResModel.forward)."""
        if self.low_res_size <= 0 or low_res is None:
            raise ValueError(f'model.low_res_size={self.low_res_size}: a low-resolution image '
                             f'low_res is {"required" if low_res is None else "not taken"}.')
        want = (x.shape[0], self.low_res_size, self.low_res_size, x.shape[-1])
        if low_res.shape != want:
            raise ValueError(f'The upsampler takes low_res images of shape {want} '
                             f'(model.low_res_size={self.low_res_size}), got {low_res.shape}.')
        if self.low_res_size > x.shape[1]:
            raise ValueError(f'model.low_res_size={self.low_res_size} exceeds the output size '
                             f'data.image_size={x.shape[1]}.')
        upsampled = layers.upsample_bilinear(low_res, x.shape[1])
        return jnp.concatenate([x, upsampled.astype(x.dtype)], axis=-1)

    def _map_latent(self, z: jax.Array, batch_size: int, emb_dim: int) -> jax.Array:
        """The mapping network: pixel norm, then dense layers each followed by the
        activation, then a linear projection (float32)."""
        if z.shape != (batch_size, self.latent_dim):
            raise ValueError(f'z must have shape [{batch_size}, {self.latent_dim}], got '
                             f'{z.shape}.')
        if self.mapping_activation not in MAPPING_ACTIVATIONS:
            raise ValueError(f'model.mapping_activation must be one of '
                             f'{tuple(MAPPING_ACTIVATIONS)}, got {self.mapping_activation!r}.')
        h = mapping_network(z, self.mapping_layers, emb_dim,
                            MAPPING_ACTIVATIONS[self.mapping_activation])
        return layers.dense(emb_dim, self.variant, jnp.float32, name='latent_emb')(h)
