"""The released PyTorch weights of ADM, Improved DDPM, score_sde and DDGAN as ddpm_jax trees.

Owns the one correspondence between the state dicts that openai/guided-diffusion
(ADM, Dhariwal & Nichol 2021: `UNetModel`, `SuperResModel`, and `EncoderUNetModel`,
the noise-aware classifier) and openai/improved-diffusion (Nichol & Dhariwal 2021:
`UNetModel`) published and the parameters of `models.UNet` / `models.Classifier`.
Both repositories name tensors after their module lists, e.g.

    time_embed.{0,2}                     the timestep MLP (Linear, [out, in])
    label_emb.weight                     class embedding ([classes, 4 * width])
    input_blocks.0.0                     the first 3x3 convolution
    input_blocks.<k>.0 / .1              a ResBlock / its AttentionBlock
    input_blocks.<k>.0.op                a plain strided-conv Downsample
    middle_block.{0,1,2}                 ResBlock, AttentionBlock, ResBlock
    output_blocks.<k>.{0,1,2}            ResBlock, AttentionBlock, up-sampling (.conv)
    out.{0,2}                            GroupNorm and the last convolution (UNet)
    out.0, out.2.{positional_embedding,qkv_proj,c_proj}   the classifier's head
    ResBlock: in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection
    AttentionBlock: norm, qkv, proj_out (1-D convolutions of kernel size 1)

and store convolutions as [out, in, kh, kw] (Flax: [kh, kw, in, out]), linear
layers as [out, in] (Flax: [in, out]), 1-D convolutions as [out, in, 1] and the
attention pool's positional embedding as [C, HW + 1] (ours: [HW + 1, C]).

The mapping is built by walking the architecture in the reference's module order
(`state_dict_layout`), each entry pairing a tensor name with a Flax parameter path
and a layout conversion; every parameter of our model must be covered exactly once.
`import_state_dict` and `export_state_dict` are exact inverses (a transpose is
lossless; float16 and bfloat16 widen to float32 exactly, and export writes the
dtype asked for). A missing, extra or mis-shaped tensor is a ValueError naming it,
and, given candidate configs, the message says which of them the file fits.

score_sde_pytorch's NCSN++ / DDPM++ and DDGAN's generator (`models.NCSNpp`) name theirs
`all_modules.<k>.<layer>` in the order their constructor appends modules
(`_walk_ncsnpp`), plus DDGAN's `z_transform.<k>`; NIN layers store [in, out] matrices,
as ours. Their files carry DataParallel's 'module.' prefix and score_sde's `sigmas`
buffer, both dropped on import, and score_sde's training checkpoints bundle the EMA
weights as a list (`_load_ncsnpp`).

What the mapping cannot express is in the model, behind config fields: the head
split of the fused qkv (`model.legacy_qkv_order`; QKVAttentionLegacy in all
released files but `64x64_diffusion.pt`, and in Improved DDPM), Improved DDPM's
timestep rescaling (`model.timestep_scale`) and the super-resolution input
(`model.low_res_size`).
"""

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from ddpm_jax import torch_checkpoint
from ddpm_jax.models import Classifier, UNet, create_model, param_shapes
from ddpm_jax.models.ncsnpp import NCSNpp

logger = logging.getLogger('ddpm_jax')

__all__ = ['TensorSpec', 'state_dict_layout', 'import_state_dict', 'export_state_dict',
           'load_checkpoint', 'matching_configs', 'layout_mismatch']

# Layout conversions, PyTorch -> Flax; `_TO_TORCH` holds the inverses.
_TO_FLAX = {
    'copy': lambda a: a,
    'conv': lambda a: a.transpose(2, 3, 1, 0),  # [O, I, kh, kw] -> [kh, kw, I, O]
    'linear': lambda a: a.T,  # [O, I] -> [I, O]
    'conv1d': lambda a: a[:, :, 0].T,  # [O, I, 1] -> Dense [I, O]
    'conv1x1': lambda a: a[:, :, 0, 0].T,  # [O, I, 1, 1] -> Dense [I, O]
    'transpose': lambda a: a.T,  # positional embedding [C, T] -> [T, C]
}
_TO_TORCH = {
    'copy': lambda a: a,
    'conv': lambda a: a.transpose(3, 2, 0, 1),
    'linear': lambda a: a.T,
    'conv1d': lambda a: a.T[:, :, None],
    'conv1x1': lambda a: a.T[:, :, None, None],
    'transpose': lambda a: a.T,
}
_SHAPE_TO_TORCH = {
    'copy': lambda s: s,
    'conv': lambda s: (s[3], s[2], s[0], s[1]),
    'linear': lambda s: (s[1], s[0]),
    'conv1d': lambda s: (s[1], s[0], 1),
    'conv1x1': lambda s: (s[1], s[0], 1, 1),
    'transpose': lambda s: (s[1], s[0]),
}
EXPORT_DTYPES = ('float32', 'float16')


class TensorSpec(NamedTuple):
    """One tensor of a reference state dict and the Flax parameter it holds.

    Attributes:
        torch_name: its key in the state dict, e.g. 'input_blocks.1.0.in_layers.2.weight'.
        flax_path: its path in the 'params' tree, e.g. ('down_0_res_0', 'in_conv', 'kernel').
        kind: the layout conversion (a key of `_TO_FLAX`).
        torch_shape: shape in the state dict.
        flax_shape: shape in the Flax tree.
    """
    torch_name: str
    flax_path: tuple[str, ...]
    kind: str
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]


# --- the walk over the architecture ------------------------------------------------------


def _layer(torch_prefix: str, flax_prefix: tuple[str, ...], kind: str) -> list[tuple]:
    """weight and bias of a Conv / Linear / 1-D conv ('kernel' and 'bias' in Flax)."""
    return [(f'{torch_prefix}.weight', flax_prefix + ('kernel',), kind),
            (f'{torch_prefix}.bias', flax_prefix + ('bias',), 'copy')]


def _norm(torch_prefix: str, flax_prefix: tuple[str, ...]) -> list[tuple]:
    """A GroupNorm32; ours is `layers.GroupNorm` wrapping an nn.GroupNorm named 'norm'."""
    return [(f'{torch_prefix}.weight', flax_prefix + ('norm', 'scale'), 'copy'),
            (f'{torch_prefix}.bias', flax_prefix + ('norm', 'bias'), 'copy')]


def _res_block(t: str, f: tuple[str, ...], flat: Mapping[tuple, Any]) -> list[tuple]:
    entries = (_norm(f'{t}.in_layers.0', f + ('in_norm',))
               + _layer(f'{t}.in_layers.2', f + ('in_conv',), 'conv')
               + _layer(f'{t}.emb_layers.1', f + ('emb_proj',), 'linear')
               + _norm(f'{t}.out_layers.0', f + ('out_norm',))
               + _layer(f'{t}.out_layers.3', f + ('out_conv',), 'conv'))
    if f + ('skip', 'kernel') in flat:  # A 1x1 conv when the channels change.
        entries += _layer(f'{t}.skip_connection', f + ('skip',), 'conv')
    return entries


def _attention(t: str, f: tuple[str, ...]) -> list[tuple]:
    return (_norm(f'{t}.norm', f + ('norm',)) + _layer(f'{t}.qkv', f + ('qkv',), 'conv1d')
            + _layer(f'{t}.proj_out', f + ('proj_out',), 'conv1d'))


def _walk(model: UNet | Classifier, image_size: int, flat: Mapping[tuple, Any]
          ) -> list[tuple]:
    """(torch name, flax path, kind) for every tensor, in the reference's order."""
    levels = len(model.channel_mult)
    attn = set(model.attention_resolutions)
    entries = (_layer('time_embed.0', ('time_embed_0',), 'linear')
               + _layer('time_embed.2', ('time_embed_1',), 'linear'))
    if isinstance(model, UNet) and model.num_classes > 0:
        entries.append(('label_emb.weight', ('label_emb', 'embedding'), 'copy'))
    entries += _layer('input_blocks.0.0', ('conv_in',), 'conv')
    k, resolution = 1, image_size
    for level in range(levels):
        for i in range(model.num_res_blocks):
            entries += _res_block(f'input_blocks.{k}.0', (f'down_{level}_res_{i}',), flat)
            if resolution in attn:
                entries += _attention(f'input_blocks.{k}.1', (f'down_{level}_attn_{i}',))
            k += 1
        if level != levels - 1:
            name = (f'down_{level}_downsample',)
            if model.resblock_updown:
                entries += _res_block(f'input_blocks.{k}.0', name, flat)
            elif model.conv_resample:
                entries += _layer(f'input_blocks.{k}.0.op', name + ('conv',), 'conv')
            k += 1
            resolution //= 2
    entries += (_res_block('middle_block.0', ('mid_res_0',), flat)
                + _attention('middle_block.1', ('mid_attn',))
                + _res_block('middle_block.2', ('mid_res_1',), flat))

    if isinstance(model, Classifier):
        entries += _norm('out.0', ('out_norm',))
        if model.pool == 'attention':
            entries.append(('out.2.positional_embedding',
                            ('attention_pool', 'positional_embedding'), 'transpose'))
            entries += (_layer('out.2.qkv_proj', ('attention_pool', 'qkv'), 'conv1d')
                        + _layer('out.2.c_proj', ('attention_pool', 'c_proj'), 'conv1d'))
        else:  # 'adaptive': mean pool, then a 1x1 conv ([O, I, 1, 1]) that is our Dense.
            entries += _layer('out.3', ('out_proj',), 'conv1x1')
        return entries

    k = 0
    for level in reversed(range(levels)):
        for i in range(model.num_res_blocks + 1):
            entries += _res_block(f'output_blocks.{k}.0', (f'up_{level}_res_{i}',), flat)
            j = 1
            if resolution in attn:
                entries += _attention(f'output_blocks.{k}.1', (f'up_{level}_attn_{i}',))
                j = 2
            if level and i == model.num_res_blocks:
                name = (f'up_{level}_upsample',)
                if model.resblock_updown:
                    entries += _res_block(f'output_blocks.{k}.{j}', name, flat)
                elif model.conv_resample:
                    entries += _layer(f'output_blocks.{k}.{j}.conv', name + ('conv',), 'conv')
                resolution *= 2
            k += 1
    entries += _norm('out.0', ('out_norm',)) + _layer('out.2', ('conv_out',), 'conv')
    return entries


def _ncsnpp_block(t: str, f: tuple[str, ...], flat: Mapping[tuple, Any]) -> list[tuple]:
    """ResnetBlockBigGANpp / ResnetBlockDDPMpp (and DDGAN's AdaGN versions)."""
    def norm(name, ours):
        if f + (ours, 'style', 'kernel') in flat:  # DDGAN's AdaptiveGroupNorm.
            return _layer(f'{t}.{name}.style', f + (ours, 'style'), 'linear')
        return _norm(f'{t}.{name}', f + (ours,))
    entries = (norm('GroupNorm_0', 'norm_0') + _layer(f'{t}.Conv_0', f + ('conv_0',), 'conv')
               + _layer(f'{t}.Dense_0', f + ('dense_0',), 'linear')
               + norm('GroupNorm_1', 'norm_1') + _layer(f'{t}.Conv_1', f + ('conv_1',), 'conv'))
    if f + ('skip', 'kernel') in flat:
        kernel = flat[f + ('skip', 'kernel')]
        if len(kernel) == 4:  # BigGAN's Conv_2 (1x1 conv); DDPM++'s NIN_0 is a matrix.
            entries += _layer(f'{t}.Conv_2', f + ('skip',), 'conv')
        else:
            entries += [(f'{t}.NIN_0.W', f + ('skip', 'kernel'), 'copy'),
                        (f'{t}.NIN_0.b', f + ('skip', 'bias'), 'copy')]
    return entries


def _ncsnpp_attention(t: str, f: tuple[str, ...]) -> list[tuple]:
    entries = _norm(f'{t}.GroupNorm_0', f + ('norm',))
    for k, ours in enumerate(('q', 'k', 'v', 'proj_out')):
        entries += [(f'{t}.NIN_{k}.W', f + (ours, 'kernel'), 'copy'),
                    (f'{t}.NIN_{k}.b', f + (ours, 'bias'), 'copy')]
    return entries


def _ncsnpp_resample(t: str, f: tuple[str, ...], flat: Mapping[tuple, Any]) -> list[tuple]:
    """layerspp.Upsample / Downsample with a conv: FIR's fused Conv2d_0, else Conv_0."""
    if f + ('kernel',) in flat:
        return _layer(f'{t}.Conv2d_0', f, 'conv')
    return _layer(f'{t}.Conv_0', f + ('conv',), 'conv')


def _walk_ncsnpp(model: NCSNpp, image_size: int, flat: Mapping[tuple, Any]) -> list[tuple]:
    """(torch name, flax path, kind) of score_sde's NCSN++ (`all_modules.<k>`, in order)
    and of DDGAN's generator (also `z_transform.<k>`)."""
    modules = []  # (flax name, entries builder) per module of all_modules, in order.
    if model.embedding_type == 'fourier':
        modules.append(lambda t: [(f'{t}.W', ('time_fourier',), 'copy')])
    modules += [lambda t: _layer(t, ('time_dense_0',), 'linear'),
                lambda t: _layer(t, ('time_dense_1',), 'linear'),
                lambda t: _layer(t, ('conv_in',), 'conv')]
    block = lambda name: lambda t: _ncsnpp_block(t, (name,), flat)  # noqa: E731
    attention = lambda name: lambda t: _ncsnpp_attention(t, (name,))  # noqa: E731

    def resample(name):  # A level's resampling: BigGAN block, or layerspp's Up/Downsample.
        if model.resblock_type != 'ddpm':
            return block(name)
        if model.conv_resample:
            return lambda t: _ncsnpp_resample(t, (name,), flat)
        return lambda t: []  # No parameters, but an entry of all_modules.

    levels, attn = len(model.channel_mult), set(model.attention_resolutions)
    resolution = image_size
    for level in range(levels):
        for i in range(model.num_res_blocks):
            modules.append(block(f'down_{level}_res_{i}'))
            if resolution in attn:
                modules.append(attention(f'down_{level}_attn_{i}'))
        if level != levels - 1:
            modules.append(resample(f'down_{level}_downsample'))
            pyramid = (f'down_{level}_pyramid',)
            if model.progressive_input == 'input_skip':
                modules.append(lambda t, p=pyramid: _layer(f'{t}.Conv_0', p, 'conv'))
            elif model.progressive_input == 'residual':
                modules.append(lambda t, p=pyramid: _ncsnpp_resample(t, p, flat))
            resolution //= 2
    modules += [block('mid_res_0'), attention('mid_attn'), block('mid_res_1')]
    for level in reversed(range(levels)):
        for i in range(model.num_res_blocks + 1):
            modules.append(block(f'up_{level}_res_{i}'))
        if resolution in attn:
            modules.append(attention(f'up_{level}_attn'))
        if model.progressive != 'none':
            if level == levels - 1 or model.progressive == 'output_skip':
                modules += [lambda t, n=f'up_{level}_pyramid_norm': _norm(t, (n,)),
                            lambda t, n=f'up_{level}_pyramid_conv': _layer(t, (n,), 'conv')]
            else:
                modules.append(lambda t, n=f'up_{level}_pyramid': _ncsnpp_resample(t, (n,), flat))
        if level != 0:
            modules.append(resample(f'up_{level}_upsample'))
            resolution *= 2
    if model.progressive != 'output_skip':
        modules += [lambda t: _norm(t, ('out_norm',)), lambda t: _layer(t, ('conv_out',), 'conv')]
    entries = []
    for k, build in enumerate(modules):
        entries += build(f'all_modules.{k}')
    for k in range(model.latent_dim and model.mapping_layers):  # z_transform: PixelNorm first.
        entries += _layer(f'z_transform.{2 * k + 1}', (f'mapping_{k}',), 'linear')
    return entries


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten(flat: Mapping[tuple, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _model_for(config: ml_collections.ConfigDict) -> UNet | Classifier | NCSNpp:
    """The config's model, checked to be one the reference repositories define."""
    model = create_model(config)
    if isinstance(model, NCSNpp):  # score_sde's NCSN++ / DDPM++, DDGAN's generator.
        return model
    if not isinstance(model, (UNet, Classifier)):
        raise ValueError(f'model.name={config.model.name!r}: released checkpoints exist only '
                         "for 'unet', 'classifier' and 'ncsnpp'.")
    if model.variant != 'adm':
        raise ValueError(f"model.variant={model.variant!r}: guided-diffusion and "
                         "improved-diffusion checkpoints are the 'adm' variant.")
    if isinstance(model, UNet) and model.latent_dim > 0:
        raise ValueError(f'model.latent_dim={model.latent_dim}: a DDGAN generator has no '
                         'released guided-diffusion counterpart.')
    return model


def state_dict_layout(config: ml_collections.ConfigDict) -> list[TensorSpec]:
    """Every tensor of the reference state dict of `config`'s model, in its order.

    Shapes come from `jax.eval_shape` of the model's initialisation: nothing is
    allocated, so this is cheap even for the 550M-parameter models.

    Args:
        config: A whole config (model and data.image_size / data.channels).

    Returns:
        TensorSpecs in the order `Module.state_dict()` lists them.

    Raises:
        ValueError: A model the reference cannot express (DDPM variant, a generator),
            named by its config field.
    """
    model = _model_for(config)
    shapes = param_shapes(model, config.data.image_size, config.data.channels)
    flat = {path: tuple(leaf.shape) for path, leaf in _flatten(shapes).items()}
    specs, seen = [], set()
    walk = _walk_ncsnpp if isinstance(model, NCSNpp) else _walk
    for torch_name, flax_path, kind in walk(model, config.data.image_size, flat):
        if flax_path not in flat:  # The walk and the model disagree: a bug, not a user error.
            raise AssertionError(f'{torch_name} maps to the missing parameter {flax_path}.')
        seen.add(flax_path)
        shape = flat[flax_path]
        specs.append(TensorSpec(torch_name, flax_path, kind, tuple(_SHAPE_TO_TORCH[kind](shape)),
                                shape))
    uncovered = sorted('/'.join(p) for p in set(flat) - seen)
    if uncovered:
        raise ValueError(f'Parameters with no reference tensor: {uncovered[:5]}; the config '
                         'uses a feature the released models do not have.')
    return specs


# --- comparing a state dict with a layout ---------------------------------------------


def layout_mismatch(shapes: Mapping[str, tuple[int, ...]], specs: list[TensorSpec]
                    ) -> list[str]:
    """Lines naming each missing, extra or mis-shaped tensor ([] when they match).

    Args:
        shapes: {tensor name: shape} of a state dict.
        specs: the layout it should have (`state_dict_layout`).
    """
    want = {s.torch_name: s.torch_shape for s in specs}
    missing = [n for n in want if n not in shapes]
    extra = [n for n in shapes if n not in want]
    wrong = [f'{n}: file {tuple(shapes[n])}, config {want[n]}' for n in want
             if n in shapes and tuple(shapes[n]) != want[n]]
    lines = []
    for what, names in (('missing', missing), ('extra', extra), ('mis-shaped', wrong)):
        if names:
            more = f' (and {len(names) - 10} more)' if len(names) > 10 else ''
            lines.append(f'{len(names)} {what} tensor(s): {", ".join(names[:10])}{more}')
    return lines


def matching_configs(shapes: Mapping[str, tuple[int, ...]],
                     candidates: Mapping[str, ml_collections.ConfigDict]) -> list[str]:
    """The names of the candidate configs whose layout has exactly these names and shapes.

    Args:
        shapes: {tensor name: shape} of a state dict.
        candidates: {name: config}, e.g. every config in configs/released/.
    """
    names = []
    for name, candidate in candidates.items():
        try:
            specs = state_dict_layout(candidate)
        except ValueError:
            continue
        if not layout_mismatch(shapes, specs):
            names.append(name)
    return names


# --- import and export ---------------------------------------------------------------


def import_state_dict(state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict,
                      *, candidates: Mapping[str, ml_collections.ConfigDict] | None = None,
                      source: str = 'The state dict') -> dict[str, Any]:
    """A reference state dict as the 'params' tree of `config`'s model.

    Args:
        state_dict: {name: array} (float16, bfloat16 or float32), e.g. from
            `torch_checkpoint.load_state_dict`.
        config: The config whose model the weights are for.
        candidates: Configs to name in the error when the file does not fit `config`.
        source: How the error message names the state dict (e.g. the file).

    Returns:
        The nested {module: {param: float32 np.ndarray}} tree.

    Raises:
        ValueError: A missing, extra or mis-shaped tensor (each named, with the
            candidate configs that fit the file), or a tensor that is not floating point.
    """
    specs = state_dict_layout(config)
    shapes = {name: tuple(np.shape(a)) for name, a in state_dict.items()}
    problems = layout_mismatch(shapes, specs)
    if problems:
        hint = ''
        if candidates:
            fits = matching_configs(shapes, candidates)
            hint = (f'\nIt fits {", ".join(fits)}.' if fits else
                    f'\nIt fits none of the {len(candidates)} candidate configs.')
        raise ValueError(f'{source} does not match the model of the config '
                         f'(model.name={config.model.name!r}, data.image_size='
                         f'{config.data.image_size}):\n  ' + '\n  '.join(problems) + hint)
    flat = {}
    for spec in specs:
        array = np.asarray(state_dict[spec.torch_name])
        if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == 'bfloat16'):
            raise ValueError(f'{source}: tensor {spec.torch_name} has dtype {array.dtype}, '
                             'not floating point.')
        flat[spec.flax_path] = np.ascontiguousarray(
            _TO_FLAX[spec.kind](array.astype(np.float32)))
    return _unflatten(flat)


def export_state_dict(params: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                      dtype: str = 'float32') -> 'OrderedDict[str, np.ndarray]':
    """The 'params' tree of `config`'s model as a reference state dict.

    Args:
        params: The model's parameter tree (jax or numpy arrays).
        config: The config of that model.
        dtype: 'float32' or 'float16' (the tensors' dtype in the state dict).

    Returns:
        An OrderedDict in the order the reference's `state_dict()` lists it; write it
        with `torch_checkpoint.save_state_dict`.

    Raises:
        ValueError: An unknown dtype, or a tree that is not the config's model's.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f'dtype={dtype!r} is not valid; choose one of {EXPORT_DTYPES}.')
    specs = state_dict_layout(config)
    flat = _flatten(jax.device_get(params))
    want = {spec.flax_path: spec.flax_shape for spec in specs}
    problems = ([f'missing parameter {"/".join(p)}' for p in want if p not in flat]
                + [f'extra parameter {"/".join(p)}' for p in flat if p not in want]
                + [f'{"/".join(p)}: shape {np.shape(flat[p])}, config {want[p]}' for p in want
                   if p in flat and tuple(np.shape(flat[p])) != want[p]])
    if problems:
        raise ValueError('The parameters are not those of the config\'s model: '
                         + '; '.join(problems[:10]))
    out = OrderedDict()
    for spec in specs:
        array = np.asarray(flat[spec.flax_path], np.float32)
        out[spec.torch_name] = np.ascontiguousarray(_TO_TORCH[spec.kind](array)).astype(dtype)
    return out


def _without_wrapper(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A score_sde / DDGAN state dict without DataParallel's 'module.' prefix and without
    score_sde's `sigmas` buffer (the SDE's noise levels, not a parameter)."""
    names = list(state_dict)
    if names and all(n.startswith('module.') for n in names):
        state_dict = {n[len('module.'):]: a for n, a in state_dict.items()}
    return {n: a for n, a in state_dict.items() if n != 'sigmas'}


def _load_ncsnpp(path: str, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The weights of a score_sde or DDGAN file for an NCSN++ config.

    Takes a plain state dict (DDGAN's netG_<epoch>.pth, which holds the EMA weights) or
    a score_sde training checkpoint ({'model', 'ema', 'optimizer', 'step'}), whose EMA
    weights (`ema.shadow_params`, a list in the order of the model's trainable
    parameters: all but the fixed Fourier frequencies) replace the model's, as
    score_sde's evaluation does (`ema.copy_to`).
    """
    try:
        return _without_wrapper(torch_checkpoint.load_state_dict(path))
    except torch_checkpoint.TorchCheckpointError as plain_error:
        try:
            state_dict = _without_wrapper(torch_checkpoint.load_state_dict(path, key='model'))
        except torch_checkpoint.TorchCheckpointError:
            raise plain_error from None
    try:
        shadow = torch_checkpoint.load_state_dict(path, key='ema.shadow_params')
    except torch_checkpoint.TorchCheckpointError:
        return state_dict  # No EMA in the file: the model's own weights.
    trainable = [name for name in state_dict if name != 'all_modules.0.W'
                 or config.model.ncsnpp.embedding_type != 'fourier']
    if len(shadow) != len(trainable):
        raise ValueError(f'{path}: ema.shadow_params has {len(shadow)} tensors, the model '
                         f'{len(trainable)} trainable parameters.')
    for i, name in enumerate(trainable):
        if np.shape(shadow[str(i)]) != np.shape(state_dict[name]):
            raise ValueError(f'{path}: ema.shadow_params[{i}] has shape '
                             f'{np.shape(shadow[str(i)])}, parameter {name} '
                             f'{np.shape(state_dict[name])}.')
        state_dict[name] = shadow[str(i)]
    logger.info('%s: the EMA weights (ema.shadow_params, decay as trained).', path)
    return state_dict


def load_checkpoint(path: str, config: ml_collections.ConfigDict, *,
                    candidates: Mapping[str, ml_collections.ConfigDict] | None = None
                    ) -> dict[str, Any]:
    """Reads a released `.pt` / `.pth` file (without torch) as the params of `config`'s model.

    guided-diffusion / improved-diffusion files are plain state dicts; for an NCSN++
    config (`model.name='ncsnpp'`) the file may also be DDGAN's generator (its
    'module.' prefix dropped) or a score_sde training checkpoint (its EMA weights:
    `_load_ncsnpp`).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a PyTorch state dict, or one that does not fit the config
            (see `import_state_dict`).
    """
    if config.model.name == 'ncsnpp':
        state_dict = _load_ncsnpp(path, config)
    else:
        state_dict = torch_checkpoint.load_state_dict(path)
    return import_state_dict(state_dict, config, candidates=candidates, source=str(path))
