"""Conditioning by cross-attention (Rombach et al. 2022, Sec. 3.3): context encoders
and the cross-attention block the UNet's attention blocks are followed by.

A context encoder turns the labels `y` into a context sequence [B, L, D_ctx]:

* 'class': the label's learned embedding as one token (LDM's `ClassEmbedder`), with
  one extra "null" row (index num_classes) for classifier-free guidance;
* 'tokens': a small learned transformer over token ids [B, L] (LDM's
  `TransformerEmbedder` in spirit: token and position embeddings, pre-LayerNorm
  self-attention and MLP layers, a final LayerNorm). The id `vocab_size` is the null
  token: the null context is the encoder's output for an all-null sequence.

`CrossAttentionBlock` lets the pixels of a feature map attend to the context:
x + proj_out(attention(q = W_q norm(x), k = W_k c, v = W_v c)), the output
projection zero-initialised (as LDM's SpatialTransformer's proj_out), so a freshly
initialised block is the identity.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers

CONTEXT_ENCODERS = ('none', 'class', 'tokens')


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
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(f'The context must be [B={b}, L, D], got {context.shape}.')
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
