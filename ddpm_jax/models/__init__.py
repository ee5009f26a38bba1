"""Model construction: the diffusion UNet and the noise-aware classifier.

`create_model(config)` builds the module named by config.model.name from the whole
config and validates it against config.data; `count_params` counts parameters
through `jax.eval_shape`, so even a 500M-parameter model is never allocated.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax.models import layers
from ddpm_jax.models.classifier import Classifier
from ddpm_jax.models.unet import UNet

__all__ = ['UNet', 'Classifier', 'create_model', 'example_inputs', 'param_shapes', 'count_params']

_COMMON_FIELDS = ('variant', 'base_channels', 'channel_mult', 'num_res_blocks',
                  'attention_resolutions', 'num_heads', 'num_head_channels', 'dropout',
                  'resblock_updown', 'use_scale_shift_norm', 'conv_resample', 'num_groups',
                  'num_classes', 'dtype', 'remat')


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Builds the model described by `config.model` for `config.data` images.

    Args:
        config: the whole config (reads config.model and config.data.image_size).

    Returns:
        A `UNet` (config.model.name == 'unet') or a `Classifier` ('classifier').

    Raises:
        ValueError: for an unknown model name or an invalid architecture (the
            message names the config field).
    """
    m = config.model
    kwargs = {f: m[f] for f in _COMMON_FIELDS}
    kwargs['channel_mult'] = tuple(m.channel_mult)
    kwargs['attention_resolutions'] = tuple(m.attention_resolutions)
    if m.name == 'unet':
        model = UNet(class_dropout_prob=m.class_dropout_prob, learn_sigma=m.learn_sigma,
                     **kwargs)
        if m.class_dropout_prob > 0 and m.num_classes == 0:
            raise ValueError('model.class_dropout_prob > 0 needs model.num_classes > 0.')
    elif m.name == 'classifier':
        if m.pool not in layers.POOLS:
            raise ValueError(f'model.pool must be one of {layers.POOLS}, got {m.pool!r}.')
        if m.num_classes < 1:
            raise ValueError(f'A classifier needs model.num_classes >= 1, got {m.num_classes}.')
        model = Classifier(pool=m.pool, **kwargs)
    else:
        raise ValueError(f"model.name must be 'unet' or 'classifier', got {m.name!r}.")
    layers.check_architecture(model, image_size=config.data.image_size)
    return model


def example_inputs(model: nn.Module, image_size: int, channels: int, batch_size: int = 1
                   ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Zero inputs with which `model.init` traces the model.

    Args:
        model: a UNet or Classifier.
        image_size: image side in pixels.
        channels: image channels.
        batch_size: B.

    Returns:
        (x [B, H, W, C] float32, t [B] int32, model_kwargs) where model_kwargs holds
        `y` for a class-conditional UNet.
    """
    x = jnp.zeros((batch_size, image_size, image_size, channels), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.int32)
    kwargs = {}
    if isinstance(model, UNet) and model.num_classes > 0:
        kwargs['y'] = jnp.zeros((batch_size,), jnp.int32)
    return x, t, kwargs


def param_shapes(model: nn.Module, image_size: int, channels: int) -> Any:
    """The parameter pytree of `model` as ShapeDtypeStructs (nothing allocated)."""
    x, t, kwargs = example_inputs(model, image_size, channels)
    rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
    return jax.eval_shape(lambda: model.init(rngs, x, t, **kwargs))['params']


def count_params(model_or_config: nn.Module | ml_collections.ConfigDict, *,
                 image_size: int | None = None, channels: int | None = None) -> int:
    """Counts parameters with `jax.eval_shape` (no parameter is allocated).

    Args:
        model_or_config: a whole config (image size and channels from config.data) or
            a model together with `image_size` and `channels`.
        image_size: image side, required with a model.
        channels: image channels, required with a model.

    Returns:
        The number of scalar parameters.

    Raises:
        ValueError: if a model is given without image_size and channels.
    """
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
        if image_size is None or channels is None:
            raise ValueError('count_params(model) needs image_size and channels.')
    else:
        model = create_model(model_or_config)
        image_size = model_or_config.data.image_size
        channels = model_or_config.data.channels
    shapes = param_shapes(model, image_size, channels)
    return int(sum(np.prod(p.shape, dtype=np.int64) for p in jax.tree.leaves(shapes)))
