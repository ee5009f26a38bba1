"""The noise-aware classifier p(y | x_t, t) used for classifier guidance.

Owns `Classifier`: the downsampling half of the ADM UNet (input blocks and middle
block, conditioned on the timestep only) followed by a pooling head, as in
Dhariwal & Nichol 2021 (Sec. 4 and App. F): either attention pooling
(`AttentionPool2d`, after CLIP, Radford et al. 2021) or "adaptive" global mean
pooling with a zero-initialised linear layer.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.models import layers
from ddpm_jax.models import unet


class Classifier(nn.Module):
    """Timestep-conditional image classifier for noisy inputs x_t.

    Attributes mirror config.model (see configs/default.py); `num_classes` is the
    number of logits and `pool` selects the head ('attention' or 'adaptive').
    """
    variant: str = 'adm'
    base_channels: int = 128
    channel_mult: Sequence[float] = (1, 2, 3, 4)
    num_res_blocks: int = 4
    attention_resolutions: Sequence[int] = (32, 16, 8)
    num_heads: int = 1
    num_head_channels: int = 64
    dropout: float = 0.0
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    conv_resample: bool = True
    num_groups: int = 32
    num_classes: int = 1000
    pool: str = 'attention'
    legacy_qkv_order: bool = False  # See layers.AttentionBlock (the pool's is never legacy).
    dtype: str = 'float32'
    remat: bool = False
    remat_policy: str = 'full'

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
        """Computes class logits.

        Args:
            x: [B, H, W, C] noisy images x_t.
            t: [B] int32 original (training) timesteps, or a scalar.
            train: enables dropout (needs the 'dropout' rng collection).

        Returns:
            [B, num_classes] float32 logits.

        Raises:
            ValueError: for an unknown pool, num_classes < 1 or an input the
                architecture cannot take.
        """
        if self.pool not in layers.POOLS:
            raise ValueError(f'model.pool must be one of {layers.POOLS}, got {self.pool!r}.')
        if self.num_classes < 1:
            raise ValueError(f'A classifier needs model.num_classes >= 1, got '
                             f'{self.num_classes}.')
        unet.check_input(x, self)
        emb = unet.embed_timesteps(self, t, x.shape[0])
        h, _ = unet.encode(self, x, emb, train)

        # The head runs in float32, as in ADM's mixed-precision classifier.
        h = nn.silu(layers.GroupNorm(self.num_groups, self.variant, jnp.float32,
                                     name='out_norm')(h))
        if self.pool == 'attention':
            logits = layers.AttentionPool2d(self.num_classes, self.num_heads,
                                            self.num_head_channels, jnp.float32,
                                            name='attention_pool')(h)
        else:
            logits = layers.dense(self.num_classes, self.variant, jnp.float32, zero_init=True,
                                  name='out_proj')(h.mean(axis=(1, 2)))
        return logits.astype(jnp.float32)
