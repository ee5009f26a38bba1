"""Tests for ddpm_jax.released: the released ADM / Improved DDPM weights in ddpm_jax.

The reference networks are re-derived here, independently of ddpm_jax.released,
from their PyTorch definitions (openai/guided-diffusion guided_diffusion/unet.py and
openai/improved-diffusion improved_diffusion/unet.py): `ref_structure` follows the
constructors' module lists, `ref_shapes` names every tensor of `state_dict()`, and
`ref_forward` is a float64 NumPy port of the forward passes (GroupNorm(32) with eps
1e-5, both QKVAttention orders, scale-shift norm, BigGAN up/down blocks, the
attention pool, F.interpolate's bilinear upsampling). The imported Flax models must
reproduce it; the released configs must have exactly its tensor names and shapes.
"""

import importlib
import math
import os
import pathlib
import subprocess
import sys
from collections import OrderedDict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from ddpm_jax import (checkpointing, config_lib, import_checkpoint, models, parallel, released,
                      sample_mode, torch_checkpoint, train)
from ddpm_jax.models import layers

RELEASED_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'released'

# --- the reference architecture, from the PyTorch constructors ---------------------------


def ref_hparams(**overrides):
    """Constructor arguments of UNetModel / SuperResModel / EncoderUNetModel."""
    h = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3,
             num_res_blocks=1, attention_ds=(2,), channel_mult=(1, 2), conv_resample=True,
             num_classes=None, num_heads=1, num_head_channels=-1, use_scale_shift_norm=False,
             resblock_updown=False, new_order=False, pool=None, super_res=False,
             timestep_scale=1.0)
    h.update(overrides)
    return h


def ref_structure(h):
    """(input_blocks, middle_block, output_blocks, out channels, final ds): lists of layers.

    Layers: ('conv', cin, cout), ('res', cin, cout, up, down), ('attn', ch, heads),
    ('down', ch, use_conv), ('up', ch, use_conv).
    """
    mc, mult = h['model_channels'], h['channel_mult']

    def heads(ch):
        return h['num_heads'] if h['num_head_channels'] == -1 else ch // h['num_head_channels']

    ch = int(mult[0] * mc)
    inputs = [[('conv', h['in_channels'] * (2 if h['super_res'] else 1), ch)]]
    chans, ds = [ch], 1
    for level, m in enumerate(mult):
        for _ in range(h['num_res_blocks']):
            block = [('res', ch, int(m * mc), False, False)]
            ch = int(m * mc)
            if ds in h['attention_ds']:
                block.append(('attn', ch, heads(ch)))
            inputs.append(block)
            chans.append(ch)
        if level != len(mult) - 1:
            inputs.append([('res', ch, ch, False, True)] if h['resblock_updown']
                          else [('down', ch, h['conv_resample'])])
            chans.append(ch)
            ds *= 2
    middle = [('res', ch, ch, False, False), ('attn', ch, heads(ch)),
              ('res', ch, ch, False, False)]
    outputs = []
    if h['pool'] is None:
        for level, m in reversed(list(enumerate(mult))):
            for i in range(h['num_res_blocks'] + 1):
                block = [('res', ch + chans.pop(), int(mc * m), False, False)]
                ch = int(mc * m)
                if ds in h['attention_ds']:
                    block.append(('attn', ch, heads(ch)))
                if level and i == h['num_res_blocks']:
                    block.append(('res', ch, ch, True, False) if h['resblock_updown']
                                 else ('up', ch, h['conv_resample']))
                    ds //= 2
                outputs.append(block)
    return inputs, middle, outputs, ch, ds


def _layer_shapes(prefix, layer, h):
    emb = 4 * h['model_channels']
    kind, out = layer[0], {}
    if kind == 'conv':
        out[f'{prefix}.weight'], out[f'{prefix}.bias'] = (layer[2], layer[1], 3, 3), (layer[2],)
    elif kind == 'res':
        cin, cout = layer[1], layer[2]
        out.update({f'{prefix}.in_layers.0.weight': (cin,), f'{prefix}.in_layers.0.bias': (cin,),
                    f'{prefix}.in_layers.2.weight': (cout, cin, 3, 3),
                    f'{prefix}.in_layers.2.bias': (cout,)})
        width = 2 * cout if h['use_scale_shift_norm'] else cout
        out.update({f'{prefix}.emb_layers.1.weight': (width, emb),
                    f'{prefix}.emb_layers.1.bias': (width,),
                    f'{prefix}.out_layers.0.weight': (cout,),
                    f'{prefix}.out_layers.0.bias': (cout,),
                    f'{prefix}.out_layers.3.weight': (cout, cout, 3, 3),
                    f'{prefix}.out_layers.3.bias': (cout,)})
        if cin != cout:
            out[f'{prefix}.skip_connection.weight'] = (cout, cin, 1, 1)
            out[f'{prefix}.skip_connection.bias'] = (cout,)
    elif kind == 'attn':
        ch = layer[1]
        out.update({f'{prefix}.norm.weight': (ch,), f'{prefix}.norm.bias': (ch,),
                    f'{prefix}.qkv.weight': (3 * ch, ch, 1), f'{prefix}.qkv.bias': (3 * ch,),
                    f'{prefix}.proj_out.weight': (ch, ch, 1), f'{prefix}.proj_out.bias': (ch,)})
    elif layer[2]:  # 'down' (Downsample.op) or 'up' (Upsample.conv) with a convolution.
        name = 'op' if kind == 'down' else 'conv'
        out[f'{prefix}.{name}.weight'] = (layer[1], layer[1], 3, 3)
        out[f'{prefix}.{name}.bias'] = (layer[1],)
    return out


def ref_shapes(h):
    """{name: shape} of the reference model's state_dict(), in its order."""
    mc, emb = h['model_channels'], 4 * h['model_channels']
    inputs, middle, outputs, ch, ds = ref_structure(h)
    shapes = OrderedDict([('time_embed.0.weight', (emb, mc)), ('time_embed.0.bias', (emb,)),
                          ('time_embed.2.weight', (emb, emb)), ('time_embed.2.bias', (emb,))])
    if h['num_classes']:
        shapes['label_emb.weight'] = (h['num_classes'], emb)
    for k, block in enumerate(inputs):
        for j, layer in enumerate(block):
            shapes.update(_layer_shapes(f'input_blocks.{k}.{j}', layer, h))
    for j, layer in enumerate(middle):
        shapes.update(_layer_shapes(f'middle_block.{j}', layer, h))
    for k, block in enumerate(outputs):
        for j, layer in enumerate(block):
            shapes.update(_layer_shapes(f'output_blocks.{k}.{j}', layer, h))
    shapes['out.0.weight'], shapes['out.0.bias'] = (ch,), (ch,)
    if h['pool'] is None:
        first = int(h['channel_mult'][0] * mc)
        shapes['out.2.weight'] = (h['out_channels'], first, 3, 3)
        shapes['out.2.bias'] = (h['out_channels'],)
    elif h['pool'] == 'attention':
        shapes['out.2.positional_embedding'] = (ch, (h['image_size'] // ds) ** 2 + 1)
        shapes['out.2.qkv_proj.weight'], shapes['out.2.qkv_proj.bias'] = (3 * ch, ch, 1), (3 * ch,)
        shapes['out.2.c_proj.weight'] = (h['out_channels'], ch, 1)
        shapes['out.2.c_proj.bias'] = (h['out_channels'],)
    else:
        shapes['out.3.weight'], shapes['out.3.bias'] = (h['out_channels'], ch, 1, 1), (
            h['out_channels'],)
    return shapes


# --- the reference forward pass in float64 NumPy (NCHW, PyTorch layouts) -------------------


def np_conv(x, w, b, stride=1):
    pad = w.shape[-1] // 2
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (x.shape[2] - w.shape[2]) // stride + 1
    wo = (x.shape[3] - w.shape[3]) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            patch = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
            out += np.einsum('nchw,oc->nohw', patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def np_group_norm(x, w, b, groups=32, eps=1e-5):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return g.reshape(x.shape) * w.reshape(shape) + b.reshape(shape)


def silu(x):
    return x / (1 + np.exp(-x))


def np_qkv_attention(qkv, heads, new_order):
    """QKVAttention (new_order) / QKVAttentionLegacy on [N, 3 * H * C, T]."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = np.split(qkv, 3, axis=1)
        q, k, v = (a.reshape(bs * heads, ch, length) for a in (q, k, v))
    else:
        q, k, v = np.split(qkv.reshape(bs * heads, 3 * ch, length), 3, axis=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = np.einsum('bct,bcs->bts', q * scale, k * scale)
    weight = np.exp(weight - weight.max(-1, keepdims=True))
    weight /= weight.sum(-1, keepdims=True)
    return np.einsum('bts,bcs->bct', weight, v).reshape(bs, -1, length)


def np_conv1d(x, w, b):
    return np.einsum('oc,bct->bot', w[:, :, 0], x) + b[None, :, None]


def np_upsample_nearest(x):
    return x.repeat(2, axis=2).repeat(2, axis=3)


def np_avg_pool(x):
    n, c, hh, ww = x.shape
    return x.reshape(n, c, hh // 2, 2, ww // 2, 2).mean(axis=(3, 5))


def np_bilinear(x, size):
    """F.interpolate(x, (size, size), mode='bilinear', align_corners=False)."""
    def axis_weights(n_in):
        w = np.zeros((size, n_in))
        for i in range(size):
            src = max((i + 0.5) * n_in / size - 0.5, 0.0)
            i0 = int(src)
            i1 = i0 + (1 if i0 < n_in - 1 else 0)
            w[i, i0] += 1 - (src - i0)
            w[i, i1] += src - i0
        return w
    return np.einsum('ih,jw,nchw->ncij', axis_weights(x.shape[2]), axis_weights(x.shape[3]), x)


def np_layer(sd, p, layer, x, emb, h):
    kind = layer[0]
    if kind == 'conv':
        return np_conv(x, sd[f'{p}.weight'], sd[f'{p}.bias'])
    if kind == 'down':
        return np_conv(x, sd[f'{p}.op.weight'], sd[f'{p}.op.bias'], 2) if layer[2] else (
            np_avg_pool(x))
    if kind == 'up':
        x = np_upsample_nearest(x)
        return np_conv(x, sd[f'{p}.conv.weight'], sd[f'{p}.conv.bias']) if layer[2] else x
    if kind == 'attn':
        b, c, hh, ww = x.shape
        xs = x.reshape(b, c, -1)
        qkv = np_conv1d(np_group_norm(xs, sd[f'{p}.norm.weight'], sd[f'{p}.norm.bias']),
                        sd[f'{p}.qkv.weight'], sd[f'{p}.qkv.bias'])
        a = np_qkv_attention(qkv, layer[2], h['new_order'])
        return (xs + np_conv1d(a, sd[f'{p}.proj_out.weight'], sd[f'{p}.proj_out.bias'])
                ).reshape(b, c, hh, ww)
    # ResBlock._forward
    _, cin, cout, up, down = layer
    hid = silu(np_group_norm(x, sd[f'{p}.in_layers.0.weight'], sd[f'{p}.in_layers.0.bias']))
    if up:
        hid, x = np_upsample_nearest(hid), np_upsample_nearest(x)
    elif down:
        hid, x = np_avg_pool(hid), np_avg_pool(x)
    hid = np_conv(hid, sd[f'{p}.in_layers.2.weight'], sd[f'{p}.in_layers.2.bias'])
    e = (silu(emb) @ sd[f'{p}.emb_layers.1.weight'].T + sd[f'{p}.emb_layers.1.bias'])
    e = e[:, :, None, None]
    norm = lambda a: np_group_norm(a, sd[f'{p}.out_layers.0.weight'],  # noqa: E731
                                   sd[f'{p}.out_layers.0.bias'])
    if h['use_scale_shift_norm']:
        scale, shift = e[:, :cout], e[:, cout:]
        hid = silu(norm(hid) * (1 + scale) + shift)
    else:
        hid = silu(norm(hid + e))
    hid = np_conv(hid, sd[f'{p}.out_layers.3.weight'], sd[f'{p}.out_layers.3.bias'])
    if cin != cout:
        x = np_conv(x, sd[f'{p}.skip_connection.weight'], sd[f'{p}.skip_connection.bias'])
    return x + hid


def np_timestep_embedding(t, dim):
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = np.asarray(t, np.float64)[:, None] * freqs[None]
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def ref_forward(sd, h, x, t, y=None, low_res=None):
    """The reference model's forward(x, timesteps, y / low_res), NCHW float64."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    inputs, middle, outputs, _, _ = ref_structure(h)
    emb = np_timestep_embedding(np.asarray(t) * h['timestep_scale'], h['model_channels'])
    emb = silu(emb @ sd['time_embed.0.weight'].T + sd['time_embed.0.bias'])
    emb = emb @ sd['time_embed.2.weight'].T + sd['time_embed.2.bias']
    if h['num_classes']:
        emb = emb + sd['label_emb.weight'][y]
    if h['super_res']:
        x = np.concatenate([x, np_bilinear(low_res, x.shape[2])], axis=1)
    hs, hid = [], x
    for k, block in enumerate(inputs):
        for j, layer in enumerate(block):
            hid = np_layer(sd, f'input_blocks.{k}.{j}', layer, hid, emb, h)
        hs.append(hid)
    for j, layer in enumerate(middle):
        hid = np_layer(sd, f'middle_block.{j}', layer, hid, emb, h)
    if h['pool'] is None:
        for k, block in enumerate(outputs):
            hid = np.concatenate([hid, hs.pop()], axis=1)
            for j, layer in enumerate(block):
                hid = np_layer(sd, f'output_blocks.{k}.{j}', layer, hid, emb, h)
    hid = silu(np_group_norm(hid, sd['out.0.weight'], sd['out.0.bias']))
    if h['pool'] == 'attention':  # AttentionPool2d, always the new qkv order.
        b, c = hid.shape[:2]
        xs = hid.reshape(b, c, -1)
        xs = np.concatenate([xs.mean(-1, keepdims=True), xs], axis=-1)
        xs = xs + sd['out.2.positional_embedding'][None]
        qkv = np_conv1d(xs, sd['out.2.qkv_proj.weight'], sd['out.2.qkv_proj.bias'])
        a = np_qkv_attention(qkv, c // h['num_head_channels'], new_order=True)
        return np_conv1d(a, sd['out.2.c_proj.weight'], sd['out.2.c_proj.bias'])[:, :, 0]
    if h['pool'] == 'adaptive':
        return np_conv(hid.mean(axis=(2, 3), keepdims=True), sd['out.3.weight'],
                       sd['out.3.bias'])[:, :, 0, 0]
    return np_conv(hid, sd['out.2.weight'], sd['out.2.bias'])


# --- the variants: reference arguments and our config ------------------------------------


def our_config(h, learn_sigma=False):
    """The ddpm_jax config of the reference model `h`."""
    config = default.get_config()
    config.data.image_size = h['image_size']
    config.data.channels = h['in_channels']
    m = config.model
    m.name = 'unet' if h['pool'] is None else 'classifier'
    if h['pool'] is not None:
        config.task = 'classifier'
        m.pool = h['pool']
    m.base_channels = h['model_channels']
    m.channel_mult = tuple(h['channel_mult'])
    m.num_res_blocks = h['num_res_blocks']
    m.attention_resolutions = tuple(h['image_size'] // ds for ds in h['attention_ds'])
    m.num_heads = h['num_heads']
    m.num_head_channels = h['num_head_channels']
    m.use_scale_shift_norm = h['use_scale_shift_norm']
    m.resblock_updown = h['resblock_updown']
    m.conv_resample = h['conv_resample']
    m.num_classes = h['num_classes'] or (h['out_channels'] if h['pool'] else 0)
    m.legacy_qkv_order = not h['new_order']
    m.learn_sigma = learn_sigma
    m.timestep_scale = h['timestep_scale']
    m.low_res_size = h['image_size'] // 2 if h['super_res'] else 0
    m.num_groups = 32
    return config


VARIANTS = {  # name: (reference arguments, learn_sigma)
    'adm_new_order': (ref_hparams(new_order=True, use_scale_shift_norm=True,
                                  resblock_updown=True, num_classes=5, num_head_channels=16,
                                  out_channels=6), True),
    'adm_legacy_plain': (ref_hparams(num_heads=2, attention_ds=(1, 2)), False),
    'adm_avg_pool_nearest': (ref_hparams(conv_resample=False, num_heads=4,
                                         use_scale_shift_norm=True), False),
    'iddpm': (ref_hparams(num_heads=4, use_scale_shift_norm=True, out_channels=6,
                          timestep_scale=0.25, num_res_blocks=2), True),
    'super_res': (ref_hparams(super_res=True, use_scale_shift_norm=True,
                              resblock_updown=True, num_classes=5, num_head_channels=16,
                              out_channels=6), True),
    'classifier_attention_pool': (ref_hparams(pool='attention', num_head_channels=16,
                                              use_scale_shift_norm=True,
                                              resblock_updown=True, out_channels=7), False),
    'classifier_adaptive_pool': (ref_hparams(pool='adaptive', num_head_channels=32,
                                             out_channels=7), False),
}


def random_state_dict(h, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    sd = OrderedDict()
    for name, shape in ref_shapes(h).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.0 if len(shape) == 1 else 1.0 / math.sqrt(fan_in)
        value = rng.normal(0.0, scale, shape)
        if len(shape) == 1 and ('norm' in name or name.endswith(('layers.0.weight',
                                                                  'out.0.weight'))):
            value = 1.0 + 0.2 * value  # GroupNorm gains near 1.
        sd[name] = value.astype(dtype)
    return sd


# --- tests ---------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(VARIANTS))
@pytest.mark.parametrize('dtype', [np.float32, np.float16])
def test_round_trip_bit_for_bit(tmp_path, name, dtype):
    h, learn_sigma = VARIANTS[name]
    config = our_config(h, learn_sigma)
    sd = random_state_dict(h, dtype=dtype)
    path = tmp_path / 'model.pt'
    torch_checkpoint.save_state_dict(path, sd, legacy=dtype == np.float16)
    params = released.load_checkpoint(str(path), config)
    # The tree is exactly the model's (names, shapes, float32).
    model = models.create_model(config)
    want = models.param_shapes(model, h['image_size'], h['in_channels'])
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for got, shape in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert got.shape == shape.shape and got.dtype == np.float32
    out = released.export_state_dict(params, config, dtype=np.dtype(dtype).name)
    assert list(out) == list(sd)
    for key in sd:
        assert out[key].dtype == sd[key].dtype and out[key].shape == sd[key].shape
        assert out[key].tobytes() == sd[key].tobytes(), key
    # Through a file again: the written state dict reads back identically.
    torch_checkpoint.save_state_dict(tmp_path / 'again.pt', out)
    again = torch_checkpoint.load_state_dict(tmp_path / 'again.pt')
    assert all(again[k].tobytes() == sd[k].tobytes() for k in sd)


def test_missing_extra_and_misshaped_tensors_are_named():
    h, learn_sigma = VARIANTS['adm_new_order']
    config = our_config(h, learn_sigma)
    sd = random_state_dict(h)
    missing = OrderedDict(sd)
    del missing['middle_block.1.qkv.bias']
    with pytest.raises(ValueError, match=r'1 missing tensor\(s\): middle_block\.1\.qkv\.bias'):
        released.import_state_dict(missing, config)
    extra = OrderedDict(sd, **{'output_blocks.9.0.weight': np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r'1 extra tensor\(s\): output_blocks\.9\.0\.weight'):
        released.import_state_dict(extra, config)
    wrong = OrderedDict(sd)
    wrong['label_emb.weight'] = np.zeros((6, 128), np.float32)
    with pytest.raises(ValueError, match=r'label_emb\.weight: file \(6, 128\), config '
                                         r'\(5, 128\)'):
        released.import_state_dict(wrong, config)
    ints = OrderedDict(sd)
    ints['out.2.bias'] = ints['out.2.bias'].astype(np.int32)
    with pytest.raises(ValueError, match='out.2.bias has dtype int32'):
        released.import_state_dict(ints, config)


def test_mismatch_names_the_config_that_fits():
    candidates = {name: our_config(*VARIANTS[name]) for name in
                  ('adm_new_order', 'adm_legacy_plain', 'iddpm')}
    sd = random_state_dict(VARIANTS['iddpm'][0])
    with pytest.raises(ValueError, match=r'(?s)does not match.*It fits iddpm\.$'):
        released.import_state_dict(sd, candidates['adm_legacy_plain'], candidates=candidates)
    other = random_state_dict(VARIANTS['super_res'][0])
    with pytest.raises(ValueError, match='It fits none of the 3 candidate configs'):
        released.import_state_dict(other, candidates['iddpm'], candidates=candidates)


def test_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / 'ckpt.pt'
    torch_checkpoint.save_torch_object(path, {'model': {'w': np.zeros(2, np.float32)},
                                              'step': 3})
    config = our_config(*VARIANTS['iddpm'])
    with pytest.raises(ValueError, match='not a PyTorch state dict'):
        released.load_checkpoint(str(path), config)


def _ours(config, params, h, x, t, y=None, low_res=None):
    model = models.create_model(config)
    kwargs = {}
    if y is not None:
        kwargs['y'] = jnp.asarray(y)
    if low_res is not None:
        kwargs['low_res'] = jnp.asarray(low_res.transpose(0, 2, 3, 1), jnp.float32)
    out = model.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32),
                      jnp.asarray(t), **kwargs)
    out = np.asarray(out, np.float64)
    return out if h['pool'] else out.transpose(0, 3, 1, 2)


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_imported_model_equals_reference_forward(name):
    """The whole imported network against the float64 NumPy port of PyTorch's."""
    h, learn_sigma = VARIANTS[name]
    config = our_config(h, learn_sigma)
    sd = random_state_dict(h, seed=1)
    params = released.import_state_dict(sd, config)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, h['in_channels'], 8, 8))
    t = np.asarray([7, 930], np.int32)
    y = np.asarray([1, 4], np.int32) if h['num_classes'] else None
    low_res = rng.uniform(-1, 1, size=(2, 3, 4, 4)) if h['super_res'] else None
    want = ref_forward(sd, h, x, t, y=y, low_res=low_res)
    got = _ours(config, params, h, x, t, y=y, low_res=low_res)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), name


@pytest.mark.parametrize('new_order', [True, False])
def test_one_attention_block_and_one_res_block(new_order):
    """Single imported blocks against the NumPy port of AttentionBlock and ResBlock."""
    h = ref_hparams(new_order=new_order, num_head_channels=16, use_scale_shift_norm=True,
                    resblock_updown=True)
    config = our_config(h)
    sd = random_state_dict(h, seed=4)
    tree = released.import_state_dict(sd, config)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 64, 4, 4))  # [N, C, H, W], 4 heads of 16 channels.
    got = layers.AttentionBlock(num_head_channels=16, legacy_qkv_order=not new_order).apply(
        {'params': tree['mid_attn']}, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    want = np_layer(sd, 'middle_block.1', ('attn', 64, 4), x, None, h)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=0,
                               atol=1e-5 * np.abs(want).max())
    # The BigGAN down-sampling ResBlock with scale-shift norm (input_blocks.2.0).
    x, emb = rng.normal(size=(2, 32, 8, 8)), rng.normal(size=(2, 128))
    got = layers.ResBlock(32, use_scale_shift_norm=True, down=True).apply(
        {'params': tree['down_0_downsample']}, jnp.asarray(x.transpose(0, 2, 3, 1)),
        jnp.asarray(emb))
    want = np_layer(sd, 'input_blocks.2.0', ('res', 32, 32, False, True), x, emb, h)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=0,
                               atol=1e-5 * np.abs(want).max())


def test_legacy_and_new_order_differ():
    """The two head splits are different functions of the same weights (test can fail)."""
    h, learn_sigma = VARIANTS['adm_new_order']
    config = our_config(h, learn_sigma)
    sd = random_state_dict(h, seed=1)
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8))
    t, y = np.asarray([7, 930]), np.asarray([1, 4])
    new = _ours(config, released.import_state_dict(sd, config), h, x, t, y=y)
    config.model.legacy_qkv_order = True
    legacy = _ours(config, released.import_state_dict(sd, config), h, x, t, y=y)
    h_legacy = dict(h, new_order=False)
    np.testing.assert_allclose(legacy, ref_forward(sd, h_legacy, x, t, y=y), rtol=0,
                               atol=1e-5 * np.abs(legacy).max())
    assert np.max(np.abs(new - legacy)) > 1e-2


def test_bilinear_upsampling_closed_form():
    # F.interpolate([[1, 2], [3, 4]], (4, 4), mode='bilinear', align_corners=False).
    want = np.array([[1.0, 1.25, 1.75, 2.0], [1.5, 1.75, 2.25, 2.5],
                     [2.5, 2.75, 3.25, 3.5], [3.0, 3.25, 3.75, 4.0]])
    x = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])[None, :, :, None]
    np.testing.assert_allclose(np.asarray(layers.upsample_bilinear(x, 4))[0, :, :, 0], want,
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(np_bilinear(np.asarray(x).transpose(0, 3, 1, 2), 4)[0, 0], want)
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 5))  # Non-integer ratio 5 -> 12.
    np.testing.assert_allclose(
        np.asarray(layers.upsample_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), 12)),
        np_bilinear(x, 12).transpose(0, 2, 3, 1), rtol=0, atol=1e-5)


def test_upsampler_rejects_wrong_low_res_size():
    h, learn_sigma = VARIANTS['super_res']
    config = our_config(h, learn_sigma)
    model = models.create_model(config)
    params = models.param_shapes(model, 8, 3)
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match=r'low_res images of shape \(1, 4, 4, 3\).*'
                                         r'model.low_res_size=4.*got \(1, 2, 2, 3\)'):
        jax.eval_shape(lambda: model.apply({'params': params}, x, 0, y=jnp.zeros(1, int),
                                           low_res=jnp.zeros((1, 2, 2, 3))))
    with pytest.raises(ValueError, match='model.low_res_size=4: a low-resolution image '
                                         'low_res is required'):
        jax.eval_shape(lambda: model.apply({'params': params}, x, 0, y=jnp.zeros(1, int)))


# --- the released configs ----------------------------------------------------------------

# name: (reference constructor arguments, learn_sigma) from guided-diffusion's README
# flags through script_util.create_model / create_classifier / sr_create_model, and
# improved-diffusion's README flags through its create_model.
_ADM = dict(model_channels=256, num_res_blocks=2, attention_ds=None, resblock_updown=True,
            use_scale_shift_norm=True, num_head_channels=64, out_channels=6)


def _adm(size, mult, **kw):
    args = dict(_ADM, image_size=size, channel_mult=mult, num_classes=1000)
    args.update(kw)
    args['attention_ds'] = tuple(size // r for r in kw.get('attention_res', (32, 16, 8)))
    args.pop('attention_res', None)
    return ref_hparams(**args)


def _classifier(size, mult, depth):
    return ref_hparams(image_size=size, model_channels=128, num_res_blocks=depth,
                       channel_mult=mult, attention_ds=tuple(size // r for r in (32, 16, 8)),
                       num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                       pool='attention', out_channels=1000)


LSUN = _adm(256, (1, 1, 2, 2, 4, 4), num_classes=None)
RELEASED = {
    'adm_64x64_diffusion': _adm(64, (1, 2, 3, 4), model_channels=192, num_res_blocks=3,
                                new_order=True),
    'adm_128x128_diffusion': _adm(128, (1, 1, 2, 3, 4), num_heads=4, num_head_channels=-1),
    'adm_256x256_diffusion': _adm(256, (1, 1, 2, 2, 4, 4)),
    'adm_256x256_diffusion_uncond': LSUN,
    'adm_512x512_diffusion': _adm(512, (0.5, 1, 1, 2, 2, 4, 4)),
    'adm_lsun_bedroom': LSUN, 'adm_lsun_cat': LSUN, 'adm_lsun_horse': LSUN,
    'adm_lsun_horse_nodropout': LSUN,
    'adm_64x64_classifier': _classifier(64, (1, 2, 3, 4), 4),
    'adm_128x128_classifier': _classifier(128, (1, 1, 2, 3, 4), 2),
    'adm_256x256_classifier': _classifier(256, (1, 1, 2, 2, 4, 4), 2),
    'adm_512x512_classifier': _classifier(512, (0.5, 1, 1, 2, 2, 4, 4), 2),
    'adm_64_256_upsampler': _adm(256, (1, 1, 2, 2, 4, 4), model_channels=192, num_heads=4,
                                 num_head_channels=-1, super_res=True),
    'adm_128_512_upsampler': _adm(512, (1, 1, 2, 2, 4, 4), model_channels=192,
                                  attention_res=(32, 16), super_res=True),
    'iddpm_cifar10': ref_hparams(image_size=32, model_channels=128, num_res_blocks=3,
                                 channel_mult=(1, 2, 2, 2), attention_ds=(2, 4), num_heads=4,
                                 use_scale_shift_norm=True, out_channels=6,
                                 timestep_scale=0.25),
    'iddpm_imagenet64': ref_hparams(image_size=64, model_channels=128, num_res_blocks=3,
                                    channel_mult=(1, 2, 3, 4), attention_ds=(4, 8),
                                    num_heads=4, use_scale_shift_norm=True, out_channels=6,
                                    timestep_scale=0.25),
}
# The published flags of every released file (guided-diffusion's README MODEL_FLAGS and
# SAMPLE_FLAGS, improved-diffusion's MODEL_FLAGS / DIFFUSION_FLAGS): (diffusion_steps,
# noise_schedule, learn_sigma, class_cond classes, dropout, timestep_respacing,
# classifier_scale). The classifiers take the schedule of the model they guide (the
# README samples 64x64_classifier.pt with the cosine 64x64 model); improved-diffusion
# publishes no respacing, and '' samples all 4000 steps.
_CLF = (1000, 'linear', False, 1000, 0.0, '', 0.0)
_LSUN = (1000, 'linear', True, 0, 0.1, '', 0.0)  # SAMPLE_FLAGS --timestep_respacing 1000.
_UPSAMPLER = (1000, 'linear', True, 1000, 0.0, '250', 0.0)
PUBLISHED = {
    'adm_64x64_diffusion': (1000, 'cosine', True, 1000, 0.1, '250', 1.0),
    'adm_128x128_diffusion': (1000, 'linear', True, 1000, 0.0, '250', 0.5),
    'adm_256x256_diffusion': (1000, 'linear', True, 1000, 0.0, '250', 1.0),
    'adm_256x256_diffusion_uncond': (1000, 'linear', True, 0, 0.0, '250', 10.0),
    'adm_512x512_diffusion': (1000, 'linear', True, 1000, 0.0, '250', 4.0),
    'adm_lsun_bedroom': _LSUN, 'adm_lsun_cat': _LSUN, 'adm_lsun_horse': _LSUN,
    'adm_lsun_horse_nodropout': _LSUN[:4] + (0.0,) + _LSUN[5:],
    'adm_64x64_classifier': (1000, 'cosine') + _CLF[2:],
    'adm_128x128_classifier': _CLF, 'adm_256x256_classifier': _CLF,
    'adm_512x512_classifier': _CLF,
    'adm_64_256_upsampler': _UPSAMPLER, 'adm_128_512_upsampler': _UPSAMPLER,
    'iddpm_cifar10': (4000, 'cosine', True, 0, 0.3, '', 0.0),
    'iddpm_imagenet64': (4000, 'cosine', True, 0, 0.0, '', 0.0),
}


def _load_released(name):
    return importlib.import_module(f'configs.released.{name}')


def test_every_released_config_is_listed():
    files = {p.stem for p in RELEASED_DIR.glob('*.py') if p.stem != '__init__'}
    assert files == set(RELEASED)


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_released_config_has_the_files_tensors(name):
    module = _load_released(name)
    assert module.__doc__.startswith('python -m ddpm_jax.import_checkpoint --checkpoint=')
    assert f'--config=configs/released/{name}.py --workdir=/path\n' in module.__doc__
    config = module.get_config()
    assert set(released._flatten(config.to_dict())) == set(
        released._flatten(default.get_config().to_dict()))
    specs = released.state_dict_layout(config)
    want = ref_shapes(RELEASED[name])
    assert [s.torch_name for s in specs] == list(want)
    assert {s.torch_name: s.torch_shape for s in specs} == dict(want)
    assert config.model.legacy_qkv_order != RELEASED[name]['new_order']
    assert config.model.timestep_scale == RELEASED[name]['timestep_scale']


def test_every_released_config_has_published_flags():
    assert set(PUBLISHED) == set(RELEASED)


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_released_config_has_the_published_flags(name):
    config = _load_released(name).get_config()
    d, m, s = config.diffusion, config.model, config.sample
    assert (d.num_timesteps, d.schedule, m.learn_sigma, m.num_classes, m.dropout,
            s.respacing, s.classifier_scale) == PUBLISHED[name]
    # learn_sigma: the second half of the output is the learned_range interpolation.
    assert (d.var_type == 'learned_range') == m.learn_sigma
    # Improved DDPM feeds the network t * 1000 / T (rescale_timesteps=True); ADM feeds t.
    assert m.timestep_scale == (1000 / d.num_timesteps if name.startswith('iddpm') else 1.0)


def test_released_parameter_counts():
    """The sizes of the reference state dicts.

    Each number is the sum of the tensor sizes of `state_dict()` of the PyTorch model
    that guided-diffusion's / improved-diffusion's own script_util builds from the
    README flags (measured with torch 2.13; the imported networks then matched the
    PyTorch forward to <= 4e-6 relative, README "Published checkpoints").
    """
    count = lambda name: sum(int(np.prod(s)) for s in ref_shapes(RELEASED[name]).values())
    assert count('adm_64x64_diffusion') == 295_904_454
    assert count('adm_128x128_diffusion') == 421_529_606
    assert count('adm_256x256_diffusion') == 553_838_086
    assert count('adm_256x256_diffusion_uncond') == 552_814_086  # No label_emb.
    assert count('adm_lsun_bedroom') == 552_814_086
    assert count('adm_512x512_diffusion') == 558_997_638
    assert count('adm_64x64_classifier') == 65_438_568
    assert count('adm_128x128_classifier') == 42_568_040
    assert count('adm_256x256_classifier') == 54_096_360
    assert count('adm_512x512_classifier') == 54_448_360
    assert count('adm_64_256_upsampler') == 311_795_910
    assert count('adm_128_512_upsampler') == 308_835_270
    assert count('iddpm_cifar10') == 52_546_438  # "50M" in the file name.
    assert count('iddpm_imagenet64') == 121_063_942  # "100M" in the file name.


# --- the import command ------------------------------------------------------------------


def _tiny_import_config(config):
    """small_config (8x8 digits, width 8, one level) as a released-style model."""
    config.model.use_scale_shift_norm = True
    config.model.learn_sigma = True
    config.diffusion.var_type = 'learned_range'
    config.diffusion.loss_type = 'rescaled_mse'
    h = ref_hparams(in_channels=1, model_channels=8, out_channels=2, channel_mult=(1,),
                    attention_ds=(), use_scale_shift_norm=True)
    return config, h


def _write_tiny_checkpoint(tmp_path, h):
    sd = random_state_dict(h, seed=3, dtype=np.float16)
    path = tmp_path / 'tiny.pt'
    torch_checkpoint.save_state_dict(path, sd)
    return str(path), sd


def test_import_command_then_sample(small_config, tmp_path):
    config, h = _tiny_import_config(small_config)
    path, sd = _write_tiny_checkpoint(tmp_path, h)
    workdir = str(tmp_path / 'run')
    import_checkpoint.import_checkpoint(path, config, workdir)

    mesh = parallel.create_mesh()
    step, params, ema = checkpointing.restore_for_inference(config, workdir, mesh)
    assert step == 0
    exported = released.export_state_dict(ema['model'], config, dtype='float16')
    assert all(exported[k].tobytes() == sd[k].tobytes() for k in sd)  # EMA = the file.
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, ema)
    assert all(jax.tree.leaves(same))
    assert (tmp_path / 'run' / 'config.json').exists()

    result = sample_mode.sample_and_save(config, workdir)
    with np.load(result['npz']) as f:
        assert f['images'].shape == (4, 8, 8, 1) and f['images'].std() > 0

    with pytest.raises(ValueError, match='already holds checkpoints'):
        import_checkpoint.import_checkpoint(path, config, workdir)


def test_imported_state_has_fresh_optimiser_and_every_ema_equal(small_config):
    config, h = _tiny_import_config(small_config)
    config.optim.ema_decays = (0.9, 0.99)
    params = released.import_state_dict(random_state_dict(h), config)
    state = import_checkpoint.create_imported_state(config, params, parallel.create_mesh())
    assert int(state.step) == 0 and len(state.ema_params) == 2
    for tree in (state.params['model'],) + tuple(e['model'] for e in state.ema_params):
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), tree, params)
        assert all(jax.tree.leaves(same))
    adam = state.opt_state['model'][1][0]  # chain(clip, adam): ScaleByAdamState.
    assert int(adam.count) == 0
    assert not any(np.any(np.asarray(m)) for m in jax.tree.leaves((adam.mu, adam.nu)))


def test_import_command_refuses_a_file_that_does_not_fit(small_config, tmp_path):
    config, h = _tiny_import_config(small_config)
    path, _ = _write_tiny_checkpoint(tmp_path, h)
    other = ml_collections.ConfigDict(config.to_dict())
    other.model.base_channels = 16
    with pytest.raises(ValueError, match=r'(?s)mis-shaped.*It fits tiny\.$'):
        import_checkpoint.import_checkpoint(path, other, str(tmp_path / 'run'),
                                            candidates={'wide': other, 'tiny': config})
    assert not (tmp_path / 'run').exists()  # Nothing is created for a refused file.


@pytest.mark.slow
def test_training_continues_from_an_import(small_config, tmp_path):
    config, h = _tiny_import_config(small_config)
    path, _ = _write_tiny_checkpoint(tmp_path, h)
    workdir = str(tmp_path / 'run')
    import_checkpoint.import_checkpoint(path, config, workdir)
    config.train.num_train_steps = 2
    config.train.num_grid_samples = 0
    imported = released.import_state_dict(torch_checkpoint.load_state_dict(path), config)
    state = train.run_training(config, workdir)
    assert int(state.step) == 2
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                         state.params['model'], imported)
    assert 0 < max(jax.tree.leaves(moved)) < 0.1  # Fine-tuned from the import, not re-initialised.


@pytest.mark.slow
def test_import_command_line_names_the_fitting_config(tmp_path):
    """The CLI: a file of one config given another names it, from the sibling configs."""
    configs_dir = tmp_path / 'cfgs'
    configs_dir.mkdir()
    body = ('from configs import default\n\ndef get_config():\n'
            '    c = default.get_config()\n    c.model.base_channels = {w}\n'
            '    c.model.num_groups = 8\n    return c\n')
    (configs_dir / 'narrow.py').write_text(body.format(w=8))
    (configs_dir / 'wide.py').write_text(body.format(w=16))
    narrow = importlib.import_module('configs.default').get_config()
    narrow.model.base_channels, narrow.model.num_groups = 8, 8
    h = ref_hparams(in_channels=1, model_channels=8, out_channels=1, attention_ds=(2,))
    sd = random_state_dict(h)
    torch_checkpoint.save_state_dict(tmp_path / 'n.pt', sd)
    released.import_state_dict(sd, narrow)  # It does fit narrow.py.
    result = subprocess.run(
        [sys.executable, '-m', 'ddpm_jax.import_checkpoint', f'--checkpoint={tmp_path}/n.pt',
         f'--config={configs_dir}/wide.py', f'--workdir={tmp_path}/run'],
        capture_output=True, text=True, cwd=RELEASED_DIR.parent.parent,
        env=dict(os.environ, JAX_PLATFORMS='cpu'), check=False)
    assert result.returncode != 0
    assert 'ERROR:' in result.stderr and 'It fits narrow.' in result.stderr, result.stderr
    assert not (tmp_path / 'run').exists()


def test_import_validates_the_whole_config_first(small_config, tmp_path):
    small_config.model.timestep_scale = 0.0  # Only config_lib.validate reads it.
    with pytest.raises(ValueError, match=r'^model\.timestep_scale=0\.0 must be > 0\.$'):
        import_checkpoint.import_checkpoint(str(tmp_path / 'absent.pt'), small_config,
                                            str(tmp_path / 'run'))
    assert not os.listdir(tmp_path)


def test_missing_checkpoint_names_the_released_file_and_where_it_is_published():
    guided = 'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/'
    improved = 'https://openaipublic.blob.core.windows.net/diffusion/march-2021/'
    config = str(RELEASED_DIR / 'adm_64x64_diffusion.py')
    assert import_checkpoint.missing_checkpoint_message('/x/w.pt', config) == (
        f"--checkpoint=/x/w.pt does not exist: --config={config} is the model of "
        "guided-diffusion's released weights file 64x64_diffusion.pt, published at "
        f'{guided}64x64_diffusion.pt; download it and pass its path.')
    message = import_checkpoint.missing_checkpoint_message(
        'w.pt', str(RELEASED_DIR / 'iddpm_cifar10.py'))
    assert f'published at {improved}cifar10_uncond_50M_500K.pt;' in message
    for name in sorted(RELEASED):  # Each released config names its file and release.
        message = import_checkpoint.missing_checkpoint_message(
            'w.pt', str(RELEASED_DIR / f'{name}.py'))
        assert f'published at {guided if name.startswith("adm_") else improved}' in message
    config = str(RELEASED_DIR.parent / 'cifar10_vp.py')  # No file named: the README's list.
    assert 'README.md, "Published checkpoints"' in import_checkpoint.missing_checkpoint_message(
        'w.pt', config)


@pytest.mark.parametrize('argv, expected', [
    ([], '--checkpoint={tmp}/64x64_diffusion.pt does not exist: --config={config} is the '
         "model of guided-diffusion's released weights file 64x64_diffusion.pt, published at "
         'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/64x64_diffusion.pt;'),
    (['--config.model.dropuot=0.1'], 'unknown config field in --config.model.dropuot=0.1:'),
    (['--checkpoint='], '--checkpoint must be set.'),
])
def test_import_command_bad_input_is_one_error_line(tmp_path, argv, expected):
    """Run outside the repository: one `ERROR:` line naming the flag; nothing written."""
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    config = RELEASED_DIR / 'adm_64x64_diffusion.py'
    result = subprocess.run(
        [sys.executable, '-m', 'ddpm_jax.import_checkpoint', f'--config={config}',
         f'--checkpoint={tmp_path}/64x64_diffusion.pt', f'--workdir={tmp_path}/run'] + argv,
        capture_output=True, text=True, cwd=cwd, env=dict(os.environ, JAX_PLATFORMS='cpu'),
        timeout=300, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith('ERROR:')]
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith('ERROR: ' + expected.format(tmp=tmp_path, config=config))
    assert os.listdir(tmp_path) == ['cwd'] and not os.listdir(cwd)


def test_configs_saved_before_the_new_model_fields_still_match():
    """Checkpoints written before model.legacy_qkv_order / timestep_scale / low_res_size."""
    config = default.get_config()
    saved = config_lib.to_json_dict(config)
    for field in ('legacy_qkv_order', 'timestep_scale', 'low_res_size'):
        del saved['model'][field]
    checkpointing.check_config_compatible(saved, config)
    config.model.legacy_qkv_order = True
    with pytest.raises(checkpointing.CheckpointMismatchError, match='model.legacy_qkv_order'):
        checkpointing.check_config_compatible(saved, config)


def test_imported_classifier_serves_guidance(small_config, tmp_path):
    """An imported classifier's workdir is a valid sample.classifier_workdir."""
    h = ref_hparams(in_channels=1, model_channels=32, out_channels=10, channel_mult=(1,),
                    attention_ds=(), pool='adaptive', num_head_channels=32)
    config = our_config(h)
    config.data.dataset = 'digits'
    config.diffusion.num_timesteps = small_config.diffusion.num_timesteps
    sd = random_state_dict(h, seed=6)
    torch_checkpoint.save_state_dict(tmp_path / 'clf.pt', sd)
    workdir = str(tmp_path / 'clf')
    import_checkpoint.import_checkpoint(str(tmp_path / 'clf.pt'), config, workdir)
    small_config.sample.classifier_workdir = workdir
    small_config.sample.classifier_scale = 1.0
    classifier, params = sample_mode.restore_classifier(small_config, parallel.create_mesh())
    assert classifier.num_classes == 10
    exported = released.export_state_dict(params, config)
    assert all(exported[k].tobytes() == sd[k].tobytes() for k in sd)
