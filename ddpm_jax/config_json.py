"""Config records as JSON: conversion both ways and the upgrade of older schemas.

Kept apart from `config_lib` (which re-exports these names) because it imports
nothing of the package: modules that `config_lib` itself imports, such as the tasks,
read saved configs through it.
"""

import json
from collections.abc import Mapping
from typing import Any

import ml_collections

__all__ = ['to_json_dict', 'from_json_dict', 'upgrade_json_dict', 'fill_missing']


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON types (tuples become lists)."""
    return json.loads(config.to_json())


def from_json_dict(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Inverse of `to_json_dict` (JSON lists become tuples again)."""
    return ml_collections.ConfigDict(_lists_to_tuples(dict(saved)))


def _lists_to_tuples(tree):
    if isinstance(tree, Mapping):
        return {k: _lists_to_tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_lists_to_tuples(v) for v in tree)
    return tree


# configs/default.py's `model.ncsnpp` group (tests/test_ncsnpp.py holds them equal).
NCSNPP_DEFAULTS = {'fir': True, 'fir_kernel': [1, 3, 3, 1], 'skip_rescale': True,
                   'resblock_type': 'biggan', 'progressive': 'none',
                   'progressive_input': 'residual', 'progressive_combine': 'sum',
                   'embedding_type': 'positional', 'fourier_scale': 16.0, 'init_scale': 0.0,
                   'centered': True, 'z_emb_dim': 256}


def upgrade_json_dict(saved: Mapping[str, Any]) -> dict:
    """A config record of an earlier schema in the current one.

    Version 0.1 had no `task` (a classifier was trained when model.name was
    'classifier'), called `diffusion.timestep_sampling` `timestep_sampler`, and had no
    `model.latent_dim` / `model.mapping_layers` (0 and 3: not a generator).
    DDGAN records from before the match with DDGAN's code have no
    `model.mapping_activation` / `model.output_tanh` ('leaky_relu' and False, what
    they were trained with; 'silu' for a non-generator, where it is unused, so that
    such records still equal today's default), `gan.disc_temb_dim` (128),
    `gan.disc_init` ('adm'), `gan.disc_blocks` ('simple') or `optim.min_learning_rate`
    (0).
    Records before `data.wordnet_label_order` on `imagenet_resized` get False (TFDS's
    label order, what they trained with), others True (no effect there).
    Records before NCSN++ get configs/default.py's `model.ncsnpp` group.
    Autoencoder records before the LPIPS term have no `autoencoder.vgg16_weights_path`
    ('': no perceptual term, which they could not have had). Latent diffusion records
    before latent caching have no `latent.cache` ('none': encode in the step).
    """
    saved = json.loads(json.dumps(saved))  # A deep copy.
    if 'task' not in saved:
        is_classifier = saved.get('model', {}).get('name') == 'classifier'
        saved['task'] = 'classifier' if is_classifier else 'diffusion'
    d = saved.get('diffusion', {})
    if 'timestep_sampler' in d:
        d['timestep_sampling'] = d.pop('timestep_sampler')
    d.setdefault('beta_start', 0.0)  # Added with the schedules' endpoints (0: Ho et al.'s).
    d.setdefault('beta_end', 0.0)
    model = saved.get('model', {})
    model.setdefault('latent_dim', 0)  # Added with the DDGAN generator.
    model.setdefault('mapping_layers', 3)
    # Added when DDGAN was matched to its reference code: generators stored before used a
    # leaky-ReLU mapping and no output tanh, and their discriminators a 128-wide
    # timestep embedding; their learning rates decayed to 0.
    generator = model['latent_dim'] > 0
    model.setdefault('mapping_activation', 'leaky_relu' if generator else 'silu')
    model.setdefault('output_tanh', False)
    if 'gan' in saved:
        saved['gan'].setdefault('disc_temb_dim', 128)
        saved['gan'].setdefault('disc_init', 'adm')
        saved['gan'].setdefault('disc_blocks', 'simple')  # Before the FIR / skip-conv match.
    if 'optim' in saved:
        saved['optim'].setdefault('min_learning_rate', 0.0)
        saved['optim'].setdefault('eps_before_bias_correction', False)  # optax's, before.
    for name in ('disc_num_res_blocks', 'disc_attention_resolutions', 'disc_num_groups'):
        saved.get('gan', {}).pop(name, None)  # The ADM-encoder discriminator before 0.2.
    model.setdefault('legacy_qkv_order', False)  # Added with the released checkpoints.
    model.setdefault('timestep_scale', 1.0)
    model.setdefault('low_res_size', 0)
    model.setdefault('remat_policy', 'full')  # Added with the remat policies.
    model.setdefault('bias_init', 'zeros')  # Added with PyTorch's bias initialisation.
    # Added with NCSN++ (model.name='ncsnpp'); configs/default.py's values, unused by
    # the networks of the records before it.
    for name, value in NCSNPP_DEFAULTS.items():
        model.setdefault('ncsnpp', {}).setdefault(name, value)
    for name, value in (('context_encoder', 'none'), ('context_dim', 0),
                        ('context_layers', 1), ('context_vocab_size', 0)):
        model.setdefault(name, value)  # Added with cross-attention (latent diffusion).
    model.setdefault('context_block', 'cross_attention')  # Before LDM's SpatialTransformer.
    model.setdefault('context_depth', 1)
    data = saved.get('data', {})
    # Added with the renumbering of imagenet_resized's labels (sorted WordNet IDs); the
    # runs on it before kept TFDS's order.
    data.setdefault('wordnet_label_order',
                    not str(data.get('dataset', '')).startswith('imagenet_resized'))
    if 'latent' in saved:  # Added with latent caching.
        saved['latent'].setdefault('cache', 'none')
    if 'autoencoder' in saved:  # Added with the LPIPS term (lpips_weights_path was unused).
        saved['autoencoder'].setdefault('vgg16_weights_path', '')
        saved['autoencoder'].setdefault('init', 'ddpm')  # Added with LDM's initialisation.
        saved['autoencoder'].setdefault('lpips_dropout', 0.0)  # Added with LPIPS's dropout.
    return saved


def fill_missing(saved: Mapping[str, Any], schema: Mapping[str, Any]) -> dict:
    """`saved` with every field it lacks taken from `schema` (both JSON dicts).

    A record written before a field existed (a sampler option, a whole group) cannot
    say its value; where a stored config becomes the config of a run (a cascade's
    base model, a guidance classifier), the running config's value stands in for it.
    Fields `saved` has are kept as they are.
    """
    out = json.loads(json.dumps(saved))  # A deep copy.
    for key, value in schema.items():
        if key not in out:
            out[key] = json.loads(json.dumps(value))
        elif isinstance(value, Mapping) and isinstance(out[key], Mapping):
            out[key] = fill_missing(out[key], value)
    return out
