"""Model construction: the diffusion UNet, NCSN++ and the noise-aware classifier.

`create_model(config)` builds the module that `MODELS` names for config.model.name
('unet', 'ncsnpp', 'classifier') and validates it against config.data; `count_params` counts parameters through
`jax.eval_shape`, so even a 500M-parameter model is never allocated;
`make_model_fn` turns a module and its parameters into the samplers' and losses'
`model_fn(x, t, **kwargs)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax.models import layers
from ddpm_jax.models.classifier import Classifier
from ddpm_jax.models.ncsnpp import NCSNpp
from ddpm_jax.models.unet import UNet

__all__ = ['MODELS', 'UNet', 'NCSNpp', 'Classifier', 'create_model', 'example_inputs', 'make_model_fn',
           'param_shapes', 'count_params']

_COMMON_FIELDS = ('variant', 'base_channels', 'channel_mult', 'num_res_blocks',
                  'attention_resolutions', 'num_heads', 'num_head_channels', 'dropout',
                  'resblock_updown', 'use_scale_shift_norm', 'conv_resample', 'num_groups',
                  'num_classes', 'legacy_qkv_order', 'dtype', 'remat', 'remat_policy')


def _create_unet(config: ml_collections.ConfigDict, **kwargs) -> nn.Module:
    m = config.model
    return UNet(class_dropout_prob=m.class_dropout_prob, learn_sigma=m.learn_sigma,
                latent_dim=m.latent_dim, mapping_layers=m.mapping_layers,
                mapping_activation=m.mapping_activation, output_tanh=m.output_tanh,
                timestep_scale=m.timestep_scale, low_res_size=m.low_res_size, **kwargs)


def _create_classifier(config: ml_collections.ConfigDict, **kwargs) -> nn.Module:
    m = config.model
    if m.pool not in layers.POOLS:
        raise ValueError(f'model.pool must be one of {layers.POOLS}, got {m.pool!r}.')
    if m.num_classes < 1:
        raise ValueError(f'A classifier needs model.num_classes >= 1, got {m.num_classes}.')
    return Classifier(pool=m.pool, **kwargs)


def _create_ncsnpp(config: ml_collections.ConfigDict, **kwargs) -> nn.Module:
    m = config.model
    unsupported = [(m.num_classes > 0, 'model.num_classes > 0 (class conditioning)'),
                   (m.learn_sigma, 'model.learn_sigma=True'),
                   (m.low_res_size > 0, 'model.low_res_size > 0 (super-resolution)'),
                   (m.context_encoder != 'none', f'model.context_encoder={m.context_encoder!r}'),
                   (m.timestep_scale != 1.0, f'model.timestep_scale={m.timestep_scale}'),
                   (m.bias_init != 'zeros', "model.bias_init='torch' (NCSN++'s biases start "
                                            'at zero)'),
                   (m.mapping_activation != 'silu', "model.mapping_activation other than "
                                                    "'silu' (DDGAN's generator maps z with SiLU)")]
    for bad, what in unsupported:
        if bad:
            raise ValueError(f"model.name='ncsnpp' (score_sde's NCSN++) does not take {what}.")
    ncsnpp = m.ncsnpp.to_dict()
    ncsnpp['fir_kernel'] = tuple(ncsnpp['fir_kernel'])
    keep = ('base_channels', 'channel_mult', 'num_res_blocks', 'attention_resolutions',
            'dropout', 'conv_resample', 'dtype', 'remat', 'remat_policy')
    return NCSNpp(latent_dim=m.latent_dim, mapping_layers=m.mapping_layers,
                  output_tanh=m.output_tanh, **{k: kwargs[k] for k in keep}, **ncsnpp)


# The networks selectable by `model.name`: name -> builder(config, **common fields).
MODELS: Mapping[str, Callable[..., nn.Module]] = {
    'unet': _create_unet,
    'ncsnpp': _create_ncsnpp,
    'classifier': _create_classifier,
}


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Builds the model described by `config.model` for `config.data` images.

    Args:
        config: the whole config (reads config.model and config.data.image_size).

    Returns:
        The module `MODELS[config.model.name]` builds (`UNet`, `NCSNpp`, `Classifier`).

    Raises:
        ValueError: for an unknown model name or an invalid architecture (the
            message names the config field).
    """
    m = config.model
    if m.name not in MODELS:
        raise ValueError(f'model.name={m.name!r} is not valid; choose one of {tuple(MODELS)}.')
    kwargs = {f: m[f] for f in _COMMON_FIELDS}
    kwargs['channel_mult'] = tuple(m.channel_mult)
    kwargs['attention_resolutions'] = tuple(m.attention_resolutions)
    model = MODELS[m.name](config, **kwargs)
    if isinstance(model, NCSNpp):
        model.check(config.data.image_size)
    else:
        layers.check_architecture(model, image_size=config.data.image_size)
    return model


def make_model_fn(model: nn.Module, params: Any, *, train: bool = False,
                  rngs: Mapping[str, jax.Array] | None = None,
                  pass_labels: bool = True) -> Callable[..., jax.Array]:
    """Wraps `model.apply` as `model_fn(x, t, y=None) -> output`.

    The one adapter between a Flax module and the pure maths (samplers, losses,
    likelihood), which call `model_fn(x, t, **model_kwargs)`.

    Args:
        model: A UNet, NCSNpp or Classifier.
        params: Its 'params' collection.
        train: Training mode (dropout on; needs a 'dropout' rng).
        rngs: Flax rngs for `apply` (e.g. {'dropout': key}).
        pass_labels: Give `y` to the model. False for a model that takes no labels
            (an unconditional UNet, a classifier), where `y` then only feeds
            classifier guidance and is dropped here.

    Returns:
        `model_fn(x [B, H, W, C], t int32 [B], y=None, **kwargs)`; other keyword
        arguments (e.g. a generator's latent `z`) go to the model.
    """
    def model_fn(x, t, y=None, **kwargs):
        if pass_labels and y is not None:
            kwargs['y'] = y
        return model.apply({'params': params}, x, t, train=train, rngs=rngs, **kwargs)
    return model_fn


def example_inputs(model: nn.Module, image_size: int, channels: int, batch_size: int = 1
                   ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Zero inputs with which `model.init` traces the model.

    Args:
        model: a UNet, NCSNpp or Classifier.
        image_size: image side in pixels.
        channels: image channels.
        batch_size: B.

    Returns:
        (x [B, H, W, C] float32, t [B] int32, model_kwargs) where model_kwargs holds
        `y` for a class-conditional UNet, `z` for a generator (latent_dim > 0) and
        `low_res` for a super-resolution UNet (low_res_size > 0).
    """
    x = jnp.zeros((batch_size, image_size, image_size, channels), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.int32)
    kwargs = {}
    if isinstance(model, NCSNpp):  # Its Fourier embedding takes sigma > 0 (log sigma).
        t = jnp.ones((batch_size,), jnp.float32)
        if model.latent_dim > 0:
            kwargs['z'] = jnp.zeros((batch_size, model.latent_dim), jnp.float32)
        return x, t, kwargs
    if isinstance(model, UNet) and model.num_classes > 0:
        kwargs['y'] = jnp.zeros((batch_size,), jnp.int32)
    if isinstance(model, UNet) and model.latent_dim > 0:
        kwargs['z'] = jnp.zeros((batch_size, model.latent_dim), jnp.float32)
    if isinstance(model, UNet) and model.low_res_size > 0:
        kwargs['low_res'] = jnp.zeros((batch_size, model.low_res_size, model.low_res_size,
                                       channels), jnp.float32)
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
