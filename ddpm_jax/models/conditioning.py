"""Conditioning by cross-attention (Rombach et al. 2022, Sec. 3.3): context encoders
and the cross-attention block the UNet's attention blocks are followed by.

A context encoder turns the labels `y` into a context sequence [B, L, D_ctx]:

* 'class': the label's learned embedding as one token (LDM's `ClassEmbedder`), with
  one extra "null" row (index num_classes) for classifier-free guidance;
* 'tokens': a small learned transformer over token ids [B, L] (LDM's
  `TransformerEmbedder` in spirit: token and position embeddings, pre-LayerNorm
  self-attention and MLP layers, a final LayerNorm). The id `vocab_size` is the null
  token: the null context is the encoder's output for an all-null sequence.

The UNet's attention blocks take the context by one of two blocks
(`model.context_block`):

* 'cross_attention' (`CrossAttentionBlock`): after each self-attention block, the
  pixels of the feature map attend to the context,
  x + proj_out(attention(q = W_q norm(x), k = W_k c, v = W_v c));
* 'spatial_transformer' (`SpatialTransformer`, LDM's block of the same name, which
  replaces the self-attention block, as LDM's UNet does with
  `use_spatial_transformer`): GroupNorm (epsilon 1e-6), a 1x1 projection, then per
  layer (`TransformerBlock`, LDM's BasicTransformerBlock) pre-LayerNorm
  self-attention, cross-attention to the context and a GEGLU feed-forward layer
  (4x wide), each residual, and a 1x1 projection out, added to x. Its q, k, v
  projections have no biases, as LDM's `CrossAttention`.

Both zero-initialise their output projection (as LDM's `proj_out`), so a freshly
initialised block adds nothing.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers

CONTEXT_ENCODERS = ('none', 'class', 'tokens')
CONTEXT_BLOCKS = ('cross_attention', 'spatial_transformer')


def _check_context_shape(context: jax.Array, batch_size: int) -> None:
    if context.ndim != 3 or context.shape[0] != batch_size:
        raise ValueError(f'The context must be [B={batch_size}, L, D], got {context.shape}.')


class CrossAttentionBlock(nn.Module):
    """Residual multi-head attention from the pixels of x to a context sequence.

    Attributes:
        num_heads: heads when num_head_channels == -1.
        num_head_channels: channels per head (-1: use num_heads).
        num_groups: GroupNorm groups.
        dtype: compute dtype.
    """
    num_heads: int = 1
    num_head_channels: int = -1
    num_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x [B, H, W, C], context [B, L, D] -> [B, H, W, C]."""
        b, height, width, c = x.shape
        _check_context_shape(context, b)
        heads = layers.num_attention_heads(c, self.num_heads, self.num_head_channels)
        h = layers.GroupNorm(self.num_groups, 'adm', self.dtype, name='norm')(x)
        h = h.reshape(b, height * width, c)
        context = context.astype(self.dtype)
        q = layers.dense(c, 'adm', self.dtype, name='q')(h)
        k = layers.dense(c, 'adm', self.dtype, name='k')(context)
        v = layers.dense(c, 'adm', self.dtype, name='v')(context)
        split = lambda a: a.reshape(b, a.shape[1], heads, c // heads)  # [B, T, N, D]
        h = layers.attention(split(q), split(k), split(v))
        h = layers.dense(c, 'adm', self.dtype, zero_init=True,
                         name='proj_out')(h.reshape(b, height * width, c))
        return x + h.reshape(b, height, width, c).astype(x.dtype)


def _multi_head_attention(x: jax.Array, context: jax.Array, num_heads: int, dtype: Any,
                          name: str) -> jax.Array:
    """LDM's `CrossAttention`: softmax(q k^T / sqrt(d)) v with q = x W_q, k = c W_k,
    v = c W_v (no biases), heads of d = C / num_heads channels, then W_out (with a
    bias). x [B, T, C], context [B, S, D] -> [B, T, C]."""
    b, t, c = x.shape
    q = layers.dense(c, 'adm', dtype, use_bias=False, name=f'{name}_q')(x)
    k = layers.dense(c, 'adm', dtype, use_bias=False, name=f'{name}_k')(context)
    v = layers.dense(c, 'adm', dtype, use_bias=False, name=f'{name}_v')(context)
    split = lambda a: a.reshape(b, a.shape[1], num_heads, c // num_heads)  # [B, T, N, D]
    h = layers.attention(split(q), split(k), split(v)).reshape(b, t, c)
    return layers.dense(c, 'adm', dtype, name=f'{name}_out')(h)


def _layer_norm(x: jax.Array, dtype: Any, name: str) -> jax.Array:
    """torch.nn.LayerNorm (epsilon 1e-5), statistics in float32."""
    h = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)(x.astype(jnp.float32))
    return h.astype(dtype)


class TransformerBlock(nn.Module):
    """LDM's BasicTransformerBlock on tokens [B, T, C]: pre-LayerNorm self-attention,
    cross-attention to the context and a GEGLU feed-forward layer, each residual:

        h = h + attn_1(norm_1(h));  h = h + attn_2(norm_2(h), context);
        h = h + W_2 (a * gelu(g)),  [a, g] = W_1 norm_3(h)  (a, g: 4C wide each;
                                                             gelu exact, as F.gelu).

    Attributes:
        num_heads: attention heads (C / num_heads channels each).
        dtype: compute dtype (LayerNorm statistics and the softmax in float32).
    """
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, context: jax.Array) -> jax.Array:
        c = h.shape[-1]
        a = _layer_norm(h, self.dtype, 'norm_1')
        h = h + _multi_head_attention(a, a, self.num_heads, self.dtype, 'self_attn')
        a = _layer_norm(h, self.dtype, 'norm_2')
        h = h + _multi_head_attention(a, context, self.num_heads, self.dtype, 'cross_attn')
        a = _layer_norm(h, self.dtype, 'norm_3')
        a, gate = jnp.split(layers.dense(8 * c, 'adm', self.dtype, name='ff_in')(a), 2,
                            axis=-1)
        a = a * nn.gelu(gate, approximate=False)
        return h + layers.dense(c, 'adm', self.dtype, name='ff_out')(a)


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer: x + proj_out(blocks(proj_in(norm(x)))) over the pixels
    of x as tokens, the blocks `TransformerBlock`s attending to the context.

    Attributes:
        num_heads: heads when num_head_channels == -1.
        num_head_channels: channels per head (-1: use num_heads).
        num_groups: GroupNorm groups (LDM's `Normalize`: 32, epsilon 1e-6).
        depth: transformer blocks (LDM's transformer_depth).
        dtype: compute dtype.
    """
    num_heads: int = 1
    num_head_channels: int = -1
    num_groups: int = 32
    depth: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x [B, H, W, C], context [B, L, D] -> [B, H, W, C]."""
        b, height, width, c = x.shape
        _check_context_shape(context, b)
        heads = layers.num_attention_heads(c, self.num_heads, self.num_head_channels)
        h = layers.GroupNorm(self.num_groups, 'adm', self.dtype, epsilon=1e-6,
                             name='norm')(x)
        h = layers.dense(c, 'adm', self.dtype, name='proj_in')(h.reshape(b, height * width, c))
        context = context.astype(self.dtype)
        for i in range(self.depth):
            h = TransformerBlock(heads, self.dtype, name=f'block_{i}')(h, context)
        h = layers.dense(c, 'adm', self.dtype, zero_init=True, name='proj_out')(h)
        return x + h.reshape(b, height, width, c).astype(x.dtype)


class ClassContextEncoder(nn.Module):
    """Labels [B] -> [B, 1, D]: one learned token per class (+ the null row)."""
    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        if y.ndim != 1:
            raise ValueError(f"model.context_encoder='class' takes labels [B], got {y.shape}.")
        return nn.Embed(self.num_embeddings, self.features,
                        embedding_init=nn.initializers.normal(1.0), param_dtype=jnp.float32,
                        name='embedding')(y)[:, None, :]


class TokenContextEncoder(nn.Module):
    """Token ids [B, L] (or labels [B], one token each) -> [B, L, D] by a transformer.

    Attributes:
        vocab_size: ids 0..vocab_size-1 are tokens, vocab_size is the null token.
        features: D.
        num_layers: pre-LayerNorm transformer layers.
        max_length: longest sequence (rows of the learned position embedding).
    """
    vocab_size: int
    features: int
    num_layers: int = 1
    max_length: int = 77

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim == 1:
            tokens = tokens[:, None]
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
            raise ValueError(f"model.context_encoder='tokens' takes ids [B, L<={self.max_length}], "
                             f'got {tokens.shape}.')
        d = self.features
        heads = max(1, d // 64)
        h = nn.Embed(self.vocab_size + 1, d, embedding_init=nn.initializers.normal(0.02),
                     name='token_embedding')(tokens)
        pos = self.param('position_embedding', nn.initializers.normal(0.02),
                         (self.max_length, d), jnp.float32)
        h = h + pos[None, :tokens.shape[1]]
        for n in range(self.num_layers):
            a = nn.LayerNorm(name=f'layer_{n}_norm_0')(h)
            h = h + nn.MultiHeadDotProductAttention(num_heads=heads, name=f'layer_{n}_attn')(a, a)
            a = nn.LayerNorm(name=f'layer_{n}_norm_1')(h)
            a = nn.Dense(4 * d, name=f'layer_{n}_mlp_0')(a)
            h = h + nn.Dense(d, name=f'layer_{n}_mlp_1')(nn.gelu(a))
        return nn.LayerNorm(name='norm_out')(h)


def check_context(arch: Any) -> None:
    """Validates the context fields of config.model (or a UNet).

    Raises:
        ValueError: Naming the field.
    """
    if arch.context_encoder not in CONTEXT_ENCODERS:
        raise ValueError(f'model.context_encoder={arch.context_encoder!r} is not valid; '
                         f'choose one of {CONTEXT_ENCODERS}.')
    if arch.context_encoder == 'none':
        return
    if arch.context_block not in CONTEXT_BLOCKS:
        raise ValueError(f'model.context_block={arch.context_block!r} is not valid; '
                         f'choose one of {CONTEXT_BLOCKS}.')
    if arch.context_depth < 1:
        raise ValueError(f'model.context_depth={arch.context_depth} must be >= 1.')
    if arch.context_dim < 1:
        raise ValueError(f'model.context_encoder={arch.context_encoder!r} needs '
                         f'model.context_dim >= 1, got {arch.context_dim}.')
    if arch.num_classes < 1:
        raise ValueError(f'model.context_encoder={arch.context_encoder!r} conditions on the '
                         f'labels y: set model.num_classes >= 1 (got {arch.num_classes}).')
    if arch.context_encoder == 'tokens':
        if arch.context_vocab_size < 1:
            raise ValueError(f"model.context_encoder='tokens' needs model.context_vocab_size "
                             f'>= 1, got {arch.context_vocab_size}.')
        if arch.class_dropout_prob > 0 and arch.context_vocab_size != arch.num_classes:
            raise ValueError(
                f"model.context_encoder='tokens' with label dropout: the null label "
                f'model.num_classes={arch.num_classes} must be the null token, i.e. '
                f'model.context_vocab_size={arch.context_vocab_size} must equal it.')
        if arch.context_layers < 0:
            raise ValueError(f'model.context_layers={arch.context_layers} must be >= 0.')


def create_context_encoder(arch: Any, num_label_embeddings: int) -> nn.Module:
    """The encoder `arch.context_encoder` names (a submodule of the calling UNet).

    Args:
        arch: the UNet (its context fields).
        num_label_embeddings: rows of a class embedding (num_classes, + 1 for CFG).
    """
    if arch.context_encoder == 'class':
        return ClassContextEncoder(num_label_embeddings, arch.context_dim, name='context_encoder')
    return TokenContextEncoder(arch.context_vocab_size, arch.context_dim, arch.context_layers,
                               name='context_encoder')
