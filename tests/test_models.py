"""Tests for ddpm_jax.models: UNet, Classifier, their blocks, create_model, count_params.

Compilation dominates on a shared 2-core CPU, so the models are tiny (width 8, 8x8
images), parameters are mostly drawn with NumPy from `jax.eval_shape` shapes instead
of compiling `model.init`, and compiled functions are shared via module fixtures.
"""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import default
from ddpm_jax import checkpointing, config_lib, models, parallel, tasks
from ddpm_jax.models import layers, unet
from conftest import threefry_lowered_as_jax_ships_it

IMAGE_SIZE = 8
CHANNELS = 1
BATCH = 2


def _config(tiny_config, **model_overrides):
    config = tiny_config
    for key, value in model_overrides.items():
        config.model[key] = value
    return config


ADM_FEATURES = dict(variant='adm', resblock_updown=True, use_scale_shift_norm=True,
                    learn_sigma=True, num_classes=3, class_dropout_prob=0.1, dropout=0.1,
                    num_head_channels=4)


def random_params(model, seed=0, scale=0.3):
    """Parameters with every leaf random (so zero-initialised layers are not zero)."""
    shapes = models.param_shapes(model, IMAGE_SIZE, CHANNELS)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32), shapes)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, CHANNELS)), jnp.float32)
    t = jnp.asarray([3, 17], jnp.int32)
    return x, t


def make_forward(model):
    return jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y=y))


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def adm():
    """A tiny ADM UNet with every feature on, random params and a compiled forward."""
    config = default.get_config()
    config.data.image_size, config.data.channels = IMAGE_SIZE, CHANNELS
    config.model.update(dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions=(4,), num_groups=4, **ADM_FEATURES))
    model = models.create_model(config)
    return config, model, random_params(model), make_forward(model)


@pytest.fixture(scope='module')
def ddpm():
    """A tiny DDPM UNet with random params and a compiled forward."""
    config = default.get_config()
    config.data.image_size, config.data.channels = IMAGE_SIZE, CHANNELS
    config.model.update(dict(variant='ddpm', base_channels=8, channel_mult=(1, 2),
                             num_res_blocks=1, attention_resolutions=(4,), num_groups=4))
    model = models.create_model(config)
    return config, model, random_params(model), make_forward(model)


# --- shapes, dtypes, initialisation ---------------------------------------------------

def test_ddpm_output_shape_and_dtype(ddpm):
    _, _, params, forward = ddpm
    x, t = inputs()
    out = forward(params, x, t, None)
    chex.assert_shape(out, x.shape)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and float(jnp.abs(out).max()) > 0


def test_adm_learned_sigma_doubles_channels(adm):
    _, _, params, forward = adm
    x, t = inputs()
    out = forward(params, x, t, jnp.asarray([0, 2]))
    chex.assert_shape(out, x.shape[:3] + (2 * CHANNELS,))
    assert out.dtype == jnp.float32


@pytest.mark.parametrize('variant', ['ddpm', 'adm'])
def test_zero_output_and_zero_residual_branches_at_init(tiny_config, variant):
    # One resolution level keeps the compilation of `init` cheap.
    features = ADM_FEATURES if variant == 'adm' else dict(variant='ddpm')
    model = models.create_model(_config(tiny_config, channel_mult=(1,),
                                        attention_resolutions=(8,), **features))
    x, t = inputs()
    kwargs = {'y': jnp.asarray([0, 1])} if variant == 'adm' else {}
    variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), x, t, **kwargs)
    out = model.apply(variables, x, t, **kwargs)
    np.testing.assert_array_equal(out, 0.0)
    params = variables['params']
    assert not np.any(params['conv_out']['kernel'])
    assert not np.any(params['down_0_res_0']['out_conv']['kernel'])
    assert not np.any(params['up_0_res_1']['out_conv']['kernel'])
    assert not np.any(params['down_0_attn_0']['proj_out']['kernel'])
    assert not np.any(params['mid_attn']['proj_out']['kernel'])
    assert np.any(params['down_0_res_0']['in_conv']['kernel'])  # The rest is not zero.
    assert np.any(params['conv_in']['kernel'])


def test_scalar_timestep_broadcasts(ddpm):
    _, _, params, forward = ddpm
    x, t = inputs()
    np.testing.assert_allclose(forward(params, x, jnp.int32(3), None),
                               forward(params, x, jnp.asarray([3, 3]), None), atol=1e-6)


def test_timestep_changes_output(ddpm):
    _, _, params, forward = ddpm
    x, _ = inputs()
    x = jnp.concatenate([x[:1], x[:1]])
    out = forward(params, x, jnp.asarray([0, 500]), None)
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3


@pytest.mark.parametrize('variant', ['ddpm', 'adm'])
def test_timestep_embedding_closed_form(variant):
    t = np.array([0.0, 1.0, 17.0, 999.0])
    dim = 8
    half = dim // 2
    denom = half - 1 if variant == 'ddpm' else half
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / denom)
    args = t[:, None] * freqs[None]
    if variant == 'ddpm':  # Ho et al. 2020 (hojonathanho/diffusion): [sin, cos].
        want = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    else:  # guided-diffusion: [cos, sin].
        want = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    got = layers.timestep_embedding(jnp.asarray(t), dim, variant)
    np.testing.assert_allclose(got, want, atol=2e-4)


# --- conditioning -------------------------------------------------------------------------

def test_labels_change_conditional_output(adm):
    _, _, params, forward = adm
    x, t = inputs()
    x, t = jnp.concatenate([x[:1], x[:1]]), jnp.asarray([5, 5])
    out = forward(params, x, t, jnp.asarray([0, 1]))
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3
    again = forward(params, x, t, jnp.asarray([0, 0]))
    np.testing.assert_allclose(again[0], again[1], atol=1e-6)


def test_null_label_row_exists_only_with_class_dropout(adm):
    config, model, params, forward = adm
    emb = params['label_emb']['embedding']
    assert emb.shape[0] == config.model.num_classes + 1
    x, t = inputs()
    x, t = jnp.concatenate([x[:1], x[:1]]), jnp.asarray([5, 5])
    null = config.model.num_classes
    out = forward(params, x, t, jnp.asarray([null, 0]))
    assert np.all(np.isfinite(out))
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3

    plain = model.clone(class_dropout_prob=0.0)
    shapes = models.param_shapes(plain, IMAGE_SIZE, CHANNELS)
    assert shapes['label_emb']['embedding'].shape[0] == config.model.num_classes


def test_unconditional_model_has_no_label_embedding(ddpm):
    _, _, params, _ = ddpm
    assert 'label_emb' not in params


# --- mixed precision and rematerialisation ----------------------------------------------

def test_bfloat16_close_to_float32(adm):
    _, model, params, forward = adm
    forward_bf16 = make_forward(model.clone(dtype='bfloat16'))
    x, t = inputs()
    y = jnp.asarray([0, 2])
    out32, out16 = forward(params, x, t, y), forward_bf16(params, x, t, y)
    assert out16.dtype == jnp.float32
    err = float(jnp.abs(out16 - out32).max())
    scale = float(jnp.abs(out32).max())
    assert err > 0  # The bf16 model really computes in bf16 ...
    assert err < 0.05 * scale  # ... and stays close (float32 norms and softmax).
    # Parameters stay float32 in a bf16 model.
    shapes = models.param_shapes(model.clone(dtype='bfloat16'), IMAGE_SIZE, CHANNELS)
    assert {s.dtype for s in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('policy', ['full', 'save_convs'])
def test_remat_gradients_equal_plain(tiny_config, policy):
    # One level keeps the two gradient compilations cheap; the middle block still has
    # a rematerialised attention block and the residual blocks use dropout and AdaGN.
    config = _config(tiny_config, channel_mult=(1,), attention_resolutions=(),
                     **ADM_FEATURES)
    model = models.create_model(config)
    remat_model = models.create_model(_config(config, remat=True, remat_policy=policy))
    params = random_params(model)
    assert (jax.tree.structure(models.param_shapes(remat_model, IMAGE_SIZE, CHANNELS))
            == jax.tree.structure(params))
    x, t = inputs()
    y = jnp.asarray([0, 2])

    def grad_fn(m):
        def loss(p):
            out = m.apply({'params': p}, x, t, y=y, train=True,
                          rngs={'dropout': jax.random.key(7)})
            return jnp.mean(out ** 2)
        return jax.jit(jax.grad(loss))

    # The remat model really contains checkpointed blocks.
    def has_remat(m):
        jaxpr = str(jax.make_jaxpr(grad_fn(m))(params))
        return 'checkpoint' in jaxpr or 'remat' in jaxpr

    assert has_remat(remat_model) and not has_remat(model)
    # ... with the policy asked for.
    assert ('_save_convs' in str(jax.make_jaxpr(grad_fn(remat_model))(params))) == (
        policy == 'save_convs')
    g_plain, g_remat = grad_fn(model)(params), grad_fn(remat_model)(params)
    chex.assert_trees_all_close(g_plain, g_remat, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g_plain['conv_in']['kernel']).max()) > 0
    assert float(jnp.abs(g_plain['mid_attn']['qkv']['kernel']).max()) > 0


def test_dropout_active_only_in_training(tiny_config):
    config = _config(tiny_config, channel_mult=(1,), attention_resolutions=(),
                     **ADM_FEATURES)
    model = models.create_model(config)
    params = random_params(model)
    x, t = inputs()
    y = jnp.asarray([0, 2])
    apply_fn = jax.jit(lambda p, rng, train: model.apply(
        {'params': p}, x, t, y=y, train=train, rngs={'dropout': rng}), static_argnums=2)
    a, b = apply_fn(params, jax.random.key(0), True), apply_fn(params, jax.random.key(1), True)
    assert float(jnp.abs(a - b).max()) > 1e-4
    c, d = apply_fn(params, jax.random.key(0), False), apply_fn(params, jax.random.key(1), False)
    np.testing.assert_array_equal(c, d)
    assert float(jnp.abs(a - c).max()) > 1e-4


# --- architecture details ------------------------------------------------------------------

def _attention_params(shapes):
    return {name: count(sub) for name, sub in shapes.items() if 'attn' in name}


def _attention_count(c):
    # GroupNorm (2C) + q, k, v (3C^2 + 3C) + output projection (C^2 + C).
    return 2 * c + 3 * (c * c + c) + c * c + c


@pytest.mark.parametrize('variant', ['ddpm', 'adm'])
@pytest.mark.parametrize('resolutions', [(4,), (8,), (8, 4), ()])
def test_attention_exists_at_requested_pixel_resolutions(tiny_config, variant, resolutions):
    config = _config(tiny_config, variant=variant, attention_resolutions=resolutions)
    shapes = models.param_shapes(models.create_model(config), IMAGE_SIZE, CHANNELS)
    attn = _attention_params(shapes)
    # Levels: 8x8 with 8 channels (level 0), 4x4 with 16 channels (level 1).
    want = {'mid_attn': _attention_count(16)}
    for level, (res, c) in enumerate([(8, 8), (4, 16)]):
        if res in resolutions:
            want[f'down_{level}_attn_0'] = _attention_count(c)
            for i in range(2):
                want[f'up_{level}_attn_{i}'] = _attention_count(c)
    assert attn == want


def test_ddpm_attention_uses_separate_qkv_and_adm_fused(tiny_config):
    ddpm_shapes = models.param_shapes(
        models.create_model(_config(tiny_config, variant='ddpm')), IMAGE_SIZE, CHANNELS)
    assert set(ddpm_shapes['mid_attn']) == {'norm', 'q', 'k', 'v', 'proj_out'}
    adm_shapes = models.param_shapes(
        models.create_model(_config(tiny_config, variant='adm')), IMAGE_SIZE, CHANNELS)
    assert set(adm_shapes['mid_attn']) == {'norm', 'qkv', 'proj_out'}
    assert adm_shapes['mid_attn']['qkv']['kernel'].shape == (16, 48)


def test_resblock_parameter_count_closed_form(tiny_config):
    c_in, c_out, e = 8, 16, 32
    for scale_shift in (False, True):
        block = layers.ResBlock(c_out, num_groups=4, use_scale_shift_norm=scale_shift)
        shapes = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 8, 8, c_in)),
                                jnp.zeros((1, e)))['params']
        emb_out = 2 * c_out if scale_shift else c_out
        want = (2 * c_in + 9 * c_in * c_out + c_out  # in_norm, in_conv
                + e * emb_out + emb_out  # emb_proj
                + 2 * c_out + 9 * c_out * c_out + c_out  # out_norm, out_conv
                + c_in * c_out + c_out)  # 1x1 skip
        assert count(shapes) == want


@pytest.mark.parametrize('as_convolution', [False, True])
@pytest.mark.parametrize('variant, kind, shape', [
    ('ddpm', 'conv', (2, 5, 6, 12)), ('adm', 'conv', (2, 5, 6, 12)),
    ('ddpm', 'dense', (2, 30, 12)), ('adm', 'dense', (2, 30, 12)),  # Tokens [B, T, C].
    ('adm', 'dense', (3, 12)), ('adm', 'dense', (2, 5, 6, 12)),
])
def test_channel_products_equal_flax_layers(variant, kind, shape, as_convolution,
                                            monkeypatch):
    # PointwiseConv / ChannelDense have nn.Conv's / nn.Dense's parameters (names, shapes,
    # initial values), so checkpoints and imported weights carry over; same outputs,
    # gradients and forward-mode derivatives (the ODE likelihood's) up to rounding,
    # computed as a 1x1 convolution or as a product.
    monkeypatch.setattr(layers, 'pointwise_as_convolution', lambda: as_convolution)
    x = jax.random.normal(jax.random.key(1), shape)
    if kind == 'conv':
        ours = layers.conv(7, variant, jnp.float32, kernel=1)
        plain = nn.Conv(7, (1, 1), padding='VALID', kernel_init=layers.default_init(variant))
        assert isinstance(ours, layers.PointwiseConv)
    else:
        ours = layers.dense(7, variant, jnp.float32)
        plain = nn.Dense(7, kernel_init=layers.default_init(variant))
        assert isinstance(ours, layers.ChannelDense)
    params = ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(params, plain.init(jax.random.key(0), x))
    params = jax.tree.map(lambda p: p + 0.1, params)  # A non-zero bias too.

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    for argnums in (0, 1):  # Parameters, input.
        got = jax.grad(functools.partial(loss, ours), argnums)(params, x)
        want = jax.grad(functools.partial(loss, plain), argnums)(params, x)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x),
                               rtol=1e-5, atol=1e-5)
    tangent = jax.random.normal(jax.random.key(2), x.shape)
    got = jax.jvp(lambda x: ours.apply(params, x), (x,), (tangent,))[1]
    want = jax.jvp(lambda x: plain.apply(params, x), (x,), (tangent,))[1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(ours.apply).lower(params, x).as_text()
    assert ('convolution' in hlo) == (as_convolution and len(shape) in (3, 4))
    out = type(ours)(7, layers.default_init(variant), jnp.bfloat16).apply(params, x)
    assert out.dtype == jnp.bfloat16


def _group_norm_f64(x, groups, eps):
    """Closed form in float64: (x - m) / sqrt(v + eps) over spatial axes x group channels."""
    x = np.asarray(x, np.float64)
    g = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)


@pytest.mark.parametrize('statistics', layers.GROUP_NORM_STATISTICS)
@pytest.mark.parametrize('shape', [(3, 5, 6, 16), (2, 7, 8)])
def test_normalize_groups_closed_form_and_derivatives(shape, statistics, monkeypatch):
    monkeypatch.setenv('DDPM_JAX_GROUP_NORM', statistics)
    groups, eps = 4, 1e-6
    key_x, key_t, key_g = jax.random.split(jax.random.key(0), 3)
    # A mean far larger than the spread, in float32: the two-pass and the shifted
    # one-pass variance keep it, the plain E[x^2] - E[x]^2 (the control) loses it.
    x = 100.0 + 0.03 * jax.random.normal(key_x, shape)
    want = _group_norm_f64(x, groups, eps)
    np.testing.assert_allclose(layers.normalize_groups(x, groups, eps), want, atol=2e-2)
    xg = x.reshape(shape[0], -1, groups, shape[-1] // groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    one_pass_var = jnp.mean(xg * xg, axis=(1, 3), keepdims=True) - mean * mean
    one_pass = ((xg - mean) * jax.lax.rsqrt(jnp.maximum(one_pass_var, 0) + eps)).reshape(shape)
    assert np.max(np.abs(one_pass - want)) > 0.2
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(jax.random.normal(key_x, shape)), jnp.float64) * 2 + 1
        t = jnp.asarray(np.asarray(jax.random.normal(key_t, shape)), jnp.float64)
        g = jnp.asarray(np.asarray(jax.random.normal(key_g, shape)), jnp.float64)
        f = functools.partial(layers.normalize_groups, num_groups=groups, epsilon=eps)
        y, jvp = jax.jvp(f, (x64,), (t,))
        np.testing.assert_allclose(y, _group_norm_f64(x64, groups, eps), atol=1e-12)
        h = 1e-6  # Central difference of the float64 closed form.
        numeric = (_group_norm_f64(x64 + h * t, groups, eps)
                   - _group_norm_f64(x64 - h * t, groups, eps)) / (2 * h)
        np.testing.assert_allclose(jvp, numeric, atol=1e-7)
        vjp = jax.vjp(f, x64)[1](g)[0]  # Reverse mode: <vjp(g), t> = <g, jvp(t)>.
        np.testing.assert_allclose(jnp.vdot(vjp, t), jnp.vdot(g, jvp), rtol=1e-10)
        # Second order (the DDGAN's R1 penalty differentiates a gradient), against
        # autodiff through the statistics of the plain formula.
        def plain(x):
            xg = x.reshape(shape[0], -1, groups, shape[-1] // groups)
            mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
            var = jnp.mean((xg - mean) ** 2, axis=(1, 3), keepdims=True)
            return ((xg - mean) / jnp.sqrt(var + eps)).reshape(shape)

        def grad_norm(norm, x):
            return jnp.sum(jax.grad(lambda x: jnp.sum(norm(x) ** 3))(x) ** 2)
        np.testing.assert_allclose(jax.grad(functools.partial(grad_norm, f))(x64),
                                   jax.grad(functools.partial(grad_norm, plain))(x64),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('statistics', layers.GROUP_NORM_STATISTICS)
@pytest.mark.parametrize('shape', [(3, 5, 6, 16), (2, 7, 8), (2, 3, 2, 5, 8)])
def test_group_norm_affine_closed_form_and_derivatives(shape, statistics, monkeypatch):
    # group_norm's own tangent rule (written so the gradient sums g and g * d once
    # each) against the float64 closed form, central differences in x, scale and bias,
    # reverse mode, and second derivatives through the plain formula.
    monkeypatch.setenv('DDPM_JAX_GROUP_NORM', statistics)
    groups, eps = 4, 1e-6
    keys = jax.random.split(jax.random.key(3), 8)
    with jax.enable_x64(True):
        normal = lambda key, s: jax.random.normal(key, s, jnp.float64)
        x = normal(keys[0], shape) * 2 + 1
        scale, bias = 1 + 0.3 * normal(keys[1], shape[-1:]), normal(keys[2], shape[-1:])
        primals = (x, scale, bias)
        tangents = (normal(keys[3], shape), normal(keys[4], shape[-1:]),
                    normal(keys[5], shape[-1:]))
        g = normal(keys[6], shape)
        f = functools.partial(layers.group_norm, num_groups=groups, epsilon=eps)

        def closed(x, scale, bias):
            return _group_norm_f64(x, groups, eps) * np.asarray(scale) + np.asarray(bias)
        y, jvp = jax.jvp(f, primals, tangents)
        np.testing.assert_allclose(y, closed(*primals), atol=1e-12)
        h = 1e-6
        numeric = (closed(*(p + h * t for p, t in zip(primals, tangents)))
                   - closed(*(p - h * t for p, t in zip(primals, tangents)))) / (2 * h)
        np.testing.assert_allclose(jvp, numeric, atol=1e-7)
        vjp = jax.vjp(f, *primals)[1](g)  # <vjp(g), t> = <g, jvp(t)>, all three.
        np.testing.assert_allclose(sum(jnp.vdot(v, t) for v, t in zip(vjp, tangents)),
                                   jnp.vdot(g, jvp), rtol=1e-10)

        def plain(x, scale, bias):
            xg = x.reshape(shape[0], -1, groups, shape[-1] // groups)
            mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
            var = jnp.mean((xg - mean) ** 2, axis=(1, 3), keepdims=True)
            return ((xg - mean) / jnp.sqrt(var + eps)).reshape(shape) * scale + bias

        def grad_norm(norm, *args):
            grads = jax.grad(lambda *a: jnp.sum(norm(*a) ** 3), argnums=(0, 1))(*args)
            return sum(jnp.sum(v ** 2) for v in grads)
        for ours, want in zip(jax.grad(functools.partial(grad_norm, f), (0, 1, 2))(*primals),
                              jax.grad(functools.partial(grad_norm, plain), (0, 1, 2))(*primals)):
            np.testing.assert_allclose(ours, want, rtol=1e-9, atol=1e-9)


def _full_size_passes(hlo: str, shape: tuple[int, ...]) -> int:
    """The compiled program's top-level ops that read or write an f32 array of shape."""
    entry = hlo[hlo.index('\nENTRY'):]
    entry = entry[:entry.index('\n}')]
    full = 'f32[' + ','.join(map(str, shape)) + ']'
    shapes, passes = {}, 0
    for line in entry.splitlines()[1:]:
        match = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w-]+)\((.*?)\)', line)
        if not match:
            continue
        name, out, op, args = match.groups()
        shapes[name] = out
        if op in ('parameter', 'constant', 'bitcast', 'tuple', 'get-tuple-element'):
            continue
        passes += out.startswith(full) or any(
            shapes.get(operand, '').startswith(full)
            for operand in re.findall(r'%([\w.\-]+)', args))
    return passes


def test_group_norm_gradient_sums_the_full_size_arrays_twice():
    # GroupNorm + SiLU, forward and gradient, compiled for this CPU: the statistics'
    # two reductions, the centred x, SiLU's gradient, its two spatial sums, x's gradient,
    # and the loss's product with x: 8 ops touch [4, 8, 8, 32] arrays. Through
    # normalize_groups and a separate affine transform (the control), reverse mode
    # takes four sums of written-out products: 12.
    shape = (4, 8, 8, 32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    scale, bias = jnp.linspace(0.5, 1.5, 32), jnp.linspace(-1.0, 1.0, 32)
    separate = lambda x, s, b, groups, eps: layers.normalize_groups(x, groups, eps) * s + b
    passes, grads = {}, {}
    for name, norm in (('group_norm', layers.group_norm), ('separate', separate)):
        loss = lambda x, s, b: jnp.sum(jax.nn.silu(norm(x, s, b, 8, 1e-6)) * x)
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)),
                     compiler_options=parallel.compiler_options())
        passes[name] = _full_size_passes(fn.lower(x, scale, bias).compile().as_text(), shape)
        grads[name] = fn(x, scale, bias)
    assert passes['group_norm'] <= 8 and passes['separate'] >= passes['group_norm'] + 4, passes
    for ours, want in zip(grads['group_norm'], grads['separate']):
        np.testing.assert_allclose(ours, want, rtol=1e-5,
                                   atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize('variant', layers.VARIANTS)
def test_group_norm_is_flax_group_norm(variant):
    # Same parameters as nn.GroupNorm (names, shapes, initial values), so checkpoints
    # and imported weights carry over; same outputs and gradients up to rounding.
    x = 2.0 + jax.random.normal(jax.random.key(1), (2, 4, 4, 64))
    ours = layers.GroupNorm(32, variant)
    plain = nn.GroupNorm(num_groups=32, epsilon=1e-6 if variant == 'ddpm' else 1e-5,
                         use_fast_variance=False)
    params = ours.init(jax.random.key(0), x)
    plain_params = plain.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(params['params']['norm'], plain_params['params'])
    params = jax.tree.map(lambda p: p + jnp.linspace(0.1, 0.5, p.shape[-1]), params)
    plain_params = {'params': params['params']['norm']}
    np.testing.assert_allclose(ours.apply(params, x), plain.apply(plain_params, x),
                               rtol=1e-5, atol=1e-5)

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)) * x)

    for argnums in (0, 1):
        got = jax.grad(functools.partial(loss, ours), argnums)(params, x)
        want = jax.grad(functools.partial(loss, plain), argnums)(plain_params, x)
        if argnums == 0:
            got = {'params': got['params']['norm']}
        chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='60 channels do not divide into 32 groups'):
        ours.init(jax.random.key(0), x[..., :60])


def test_updown_variants(tiny_config):
    config = _config(tiny_config, resblock_updown=True)
    shapes = models.param_shapes(models.create_model(config), IMAGE_SIZE, CHANNELS)
    assert 'in_conv' in shapes['down_0_downsample']  # A residual block ...
    assert 'in_conv' in shapes['up_1_upsample']
    config = _config(tiny_config, resblock_updown=False, conv_resample=False)
    shapes = models.param_shapes(models.create_model(config), IMAGE_SIZE, CHANNELS)
    assert 'down_0_downsample' not in shapes  # ... or parameter-free resampling.
    config = _config(tiny_config, resblock_updown=False, conv_resample=True)
    shapes = models.param_shapes(models.create_model(config), IMAGE_SIZE, CHANNELS)
    assert shapes['down_0_downsample']['conv']['kernel'].shape == (3, 3, 8, 8)


def test_fractional_channel_mult(tiny_config):
    config = _config(tiny_config, base_channels=16, channel_mult=(0.5, 1))
    shapes = models.param_shapes(models.create_model(config), IMAGE_SIZE, CHANNELS)
    assert shapes['conv_in']['kernel'].shape == (3, 3, CHANNELS, 8)
    assert shapes['mid_res_0']['in_conv']['kernel'].shape == (3, 3, 16, 16)


def test_count_params_without_allocation(tiny_config):
    model = models.create_model(tiny_config)
    n = models.count_params(model, image_size=IMAGE_SIZE, channels=CHANNELS)
    assert n == models.count_params(tiny_config)
    assert n == count(models.param_shapes(model, IMAGE_SIZE, CHANNELS))
    with pytest.raises(ValueError, match='image_size'):
        models.count_params(model)


# --- classifier -------------------------------------------------------------------------------

@pytest.mark.parametrize('pool', ['attention', 'adaptive'])
def test_classifier_logits(tiny_config, pool):
    config = _config(tiny_config, name='classifier', num_classes=5, pool=pool,
                     num_head_channels=8, resblock_updown=True, use_scale_shift_norm=True)
    model = models.create_model(config)
    assert isinstance(model, models.Classifier)
    params = random_params(model)
    x, t = inputs()
    logits = jax.jit(lambda p: model.apply({'params': p}, x, t))(params)
    chex.assert_shape(logits, (BATCH, 5))
    assert logits.dtype == jnp.float32
    assert float(jnp.abs(logits[0] - logits[1]).max()) > 1e-4
    if pool == 'attention':
        # Positional embedding: one row per 4x4 pixel plus the mean token.
        assert params['attention_pool']['positional_embedding'].shape == (17, 16)
        assert params['attention_pool']['c_proj']['kernel'].shape == (16, 5)
    else:
        assert params['out_proj']['kernel'].shape == (16, 5)
    assert not any('up_' in name for name in params)  # Encoder only.


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize('overrides, image_size, field', [
    (dict(channel_mult=(1, 2, 2)), 6, 'data.image_size'),
    (dict(attention_resolutions=(3,)), 8, 'model.attention_resolutions'),
    (dict(attention_resolutions=(16,)), 8, 'model.attention_resolutions'),
    (dict(base_channels=12, num_groups=8), 8, 'model.num_groups'),
    (dict(num_head_channels=6), 8, 'model.num_head_channels'),
    (dict(num_heads=3), 8, 'model.num_heads'),
    (dict(variant='ddpm', num_heads=2), 8, 'model.num_heads'),
    (dict(variant='ncsn'), 8, 'model.variant'),
    (dict(dtype='float16'), 8, 'model.dtype'),
    (dict(name='vit'), 8, 'model.name'),
    (dict(name='classifier', pool='max', num_classes=3), 8, 'model.pool'),
])
def test_bad_config_raises_naming_field(tiny_config, overrides, image_size, field):
    config = _config(tiny_config, **overrides)
    config.data.image_size = image_size
    with pytest.raises(ValueError, match=field.replace('.', r'\.')):
        models.create_model(config)


def _trace(model, x, t, y):
    rngs = {'params': jax.random.key(0)}
    return jax.eval_shape(lambda: model.init(rngs, x, t, y=y))


def test_label_errors(tiny_config):
    x, t = inputs()
    unconditional = models.create_model(tiny_config)
    with pytest.raises(ValueError, match=r'model\.num_classes'):
        _trace(unconditional, x, t, jnp.zeros((BATCH,), jnp.int32))
    conditional = models.create_model(_config(tiny_config, num_classes=4))
    with pytest.raises(ValueError, match=r'model\.num_classes'):
        _trace(conditional, x, t, None)
    _trace(conditional, x, t, jnp.zeros((BATCH,), jnp.int32))  # Fine with a label.


def test_input_size_checked_at_call(tiny_config):
    model = models.create_model(tiny_config)
    with pytest.raises(ValueError, match=r'data\.image_size'):
        _trace(model, jnp.zeros((1, 6, 6, 1)), jnp.zeros((1,), jnp.int32), None)
    with pytest.raises(ValueError, match=r'model\.attention_resolutions'):
        _trace(model, jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,), jnp.int32), None)


def test_module_constructed_directly_is_validated():
    model = models.UNet(base_channels=8, channel_mult=(1, 2), num_groups=3,
                        attention_resolutions=())
    with pytest.raises(ValueError, match=r'model\.num_groups'):
        _trace(model, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), None)
    assert isinstance(model, nn.Module)


def test_torch_default_biases_are_pytorchs_uniform():
    """Every bias beside a non-zero kernel ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
    fan_in = kh kw C_in (conv) or C_in (dense), as nn.Conv2d / nn.Linear start; biases of
    zero kernels, norm offsets and everything else unchanged."""
    rng = np.random.default_rng(0)
    params = {
        'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 16, 4096)), jnp.float32),
                 'bias': jnp.zeros(4096)},
        'dense': {'kernel': jnp.ones((64, 4096)), 'bias': jnp.zeros(4096)},
        'out': {'kernel': jnp.zeros((3, 3, 8, 3)), 'bias': jnp.zeros(3)},
        'norm': {'scale': jnp.ones(8), 'bias': jnp.zeros(8)},
        'embed': {'embedding': jnp.ones((10, 8))},
    }
    out = layers.torch_default_biases(params, jax.random.key(0))
    for name, fan_in in (('conv', 144), ('dense', 64)):
        b = np.asarray(out[name]['bias'], np.float64)
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(b).max() <= bound and np.abs(b).max() > 0.99 * bound
        # U(-a, a): mean 0, variance a^2 / 3 (4096 draws: 4 standard errors).
        assert abs(b.mean()) < 4 * bound / np.sqrt(3 * 4096)
        np.testing.assert_allclose(b.var() * 3 / bound ** 2, 1.0, atol=4 * np.sqrt(0.8 / 4096))
        np.testing.assert_array_equal(out[name]['kernel'], params[name]['kernel'])
    assert not np.array_equal(out['conv']['bias'][:64], out['dense']['bias'][:64])
    for name in ('out', 'norm', 'embed'):
        chex.assert_trees_all_equal(out[name], params[name])
    chex.assert_trees_all_equal(out, layers.torch_default_biases(params, jax.random.key(0)))


def test_bias_init_torch_through_the_task(tiny_config):
    """model.bias_init='torch': the same kernels as 'zeros', the biases of non-zero layers
    drawn, those of the zero-initialised layers (residual ends, attention output, the
    output convolution) still zero, so every block still starts as the identity."""
    zeros = tasks.create_task(tiny_config).init_params(jax.random.key(0))['model']
    tiny_config.model.bias_init = 'torch'
    config_lib.validate(tiny_config, mode='train', num_devices=1)
    torch = tasks.create_task(tiny_config).init_params(jax.random.key(0))['model']
    flat_z, flat_t = (traverse_util.flatten_dict(p, sep='/') for p in (zeros, torch))
    assert flat_z.keys() == flat_t.keys()
    drawn = 0
    for path, value in flat_z.items():
        if path.endswith('/bias') and path[:-4] + 'kernel' in flat_z:
            if np.any(flat_z[path[:-4] + 'kernel']):
                assert np.all(np.asarray(value) == 0) and np.any(flat_t[path]), path
                drawn += 1
            else:
                np.testing.assert_array_equal(flat_t[path], 0.0)
        else:
            np.testing.assert_array_equal(flat_t[path], value)
    assert drawn > 10
    # Resuming with the other initialisation is allowed: only the start differs.
    saved = config_lib.to_json_dict(tiny_config)
    tiny_config.model.bias_init = 'zeros'
    checkpointing.check_config_compatible(saved, tiny_config)
    tiny_config.model.bias_init = 'uniform'
    with pytest.raises(ValueError, match=r"model.bias_init='uniform'.*'zeros', 'torch'"):
        config_lib.validate(tiny_config, mode='train', num_devices=1)


@pytest.mark.parametrize('heads,dim,kv_len', [(1, 16, 12), (3, 8, 5)])
def test_attention_matches_float64_softmax_reference(heads, dim, kv_len):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, n, heads, dim)) for n in (12, kv_len, kv_len))
    logits = np.einsum('bqnd,bknd->bnqk', q, k) / np.sqrt(dim)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum('bnqk,bknd->bqnd', weights, v)
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    out = layers.attention(as32(q), as32(k), as32(v))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6, rtol=2e-6)
    as16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    out16 = layers.attention(as16(q), as16(k), as16(v)).astype(jnp.float32)
    assert np.max(np.abs(np.asarray(out16) - expected)) < 0.05


def test_group_norm_statistics_choice(monkeypatch):
    monkeypatch.delenv('DDPM_JAX_GROUP_NORM', raising=False)
    assert layers.group_norm_statistics() == 'two_pass'
    monkeypatch.setenv('DDPM_JAX_GROUP_NORM', 'one_pass')
    assert layers.group_norm_statistics() == 'one_pass'
    # A group whose first position (the one-pass shift) lies 5.6 std from its mean:
    # float32 against float64, the one-pass form less precise but still close.
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 8)).astype(np.float32) * 3 + 7
    x[:, 0, 0, :] = 60.0
    want = _group_norm_f64(x, 2, 1e-6)
    for choice, atol in zip(layers.GROUP_NORM_STATISTICS, (2e-6, 1e-4)):
        monkeypatch.setenv('DDPM_JAX_GROUP_NORM', choice)
        np.testing.assert_allclose(layers.normalize_groups(jnp.asarray(x), 2, 1e-6), want,
                                   atol=atol)
    monkeypatch.setenv('DDPM_JAX_GROUP_NORM', 'welford')
    with pytest.raises(ValueError, match='DDPM_JAX_GROUP_NORM'):
        layers.group_norm_statistics()


def _conv3x3_f64(x, kernel):
    """Closed form in float64: the 3x3 correlation of x padded by 1 (NHWC, HWIO)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    _, height, width, _ = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(p[:, i:i + height, j:j + width] @ kernel[i, j]
               for i in range(3) for j in range(3))


@pytest.mark.parametrize('shape, features', [
    ((2, 4, 6, 5), 7), ((1, 2, 2, 3), 4), ((3, 8, 8, 16), 16), ((2, 10, 4, 1), 2)])
def test_conv3x3_winograd_equals_the_convolution(shape, features):
    # F(2x2, 3x3) against the float64 closed form; its gradients, forward-mode
    # derivatives and second derivatives (the DDGAN's R1 penalty) against XLA's
    # convolution's.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, shape[-1], features)), jnp.float32)
    direct = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    want = _conv3x3_f64(x, kernel)
    got = jax.jit(layers.conv3x3_winograd)(x, kernel)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())

    def derivatives(conv):
        loss = lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
        penalty = lambda k: jnp.sum(jax.grad(loss)(x, k) ** 2)  # R1: d/dk |d loss/dx|^2.
        tangents = (jnp.cos(x), jnp.sin(kernel))
        return (jax.grad(loss, (0, 1))(x, kernel), jax.jvp(conv, (x, kernel), tangents),
                jax.grad(penalty)(kernel))

    got, want = (jax.jit(derivatives, static_argnums=0)(conv)
                 for conv in (layers.conv3x3_winograd, direct))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_winograd_input_transform_gradient_is_slices():
    # The transform's parts are written into one buffer by 16 in-place updates; their
    # gradient must be 16 slices of the incoming one, not the updates transposed (a
    # zeroed copy of the whole gradient per part).
    x = jnp.ones((2, 4, 4, 3))
    jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda x: jnp.sum(layers.winograd_input_transform(x) ** 2)))(x))
    assert jaxpr.count('dynamic_update_slice') == 16  # The forward's, nothing more.
    assert 'dynamic_slice' not in jaxpr and 'scatter' not in jaxpr


@pytest.mark.parametrize('shape, features, amd, intel', [
    ((8, 32, 32, 128), 128, True, False), ((8, 16, 16, 256), 256, True, True),
    ((8, 8, 8, 256), 256, True, True), ((8, 16, 16, 128), 256, True, True),
    ((8, 4, 4, 256), 256, False, False), ((8, 16, 16, 128), 128, False, False),
    ((16, 16, 16, 128), 128, True, False), ((32, 16, 16, 256), 256, True, False),
    ((8, 32, 32, 64), 64, False, False), ((8, 32, 32, 3), 128, False, False),
    ((8, 32, 32, 128), 3, False, False)])
def test_winograd_pays_for_wide_convolutions(shape, features, amd, intel):
    assert layers.winograd_pays(shape, features, 'AuthenticAMD') == amd
    assert layers.winograd_pays(shape, features, 'GenuineIntel') == intel
    assert not layers.winograd_pays(shape, features, '')  # Not measured elsewhere.


def _convolution_primitives(module, x):
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    return str(jax.make_jaxpr(module.apply)(params, x)).count('conv_general_dilated')


def test_convolution_algorithm_choice_and_dispatch(monkeypatch):
    monkeypatch.delenv('DDPM_JAX_CONVOLUTION', raising=False)
    # This test process has four CPU devices: XLA's defaults, so direct convolutions.
    assert parallel.compiler_options() is None
    assert layers.convolution_algorithm() == 'direct'
    conv = layers.conv(4, 'ddpm', jnp.float32)
    x = jnp.ones((2, 6, 6, 3))
    assert _convolution_primitives(conv, x) == 1
    monkeypatch.setenv('DDPM_JAX_CONVOLUTION', 'winograd')
    assert layers.convolution_algorithm() == 'winograd'
    assert _convolution_primitives(conv, x) == 0
    # Not 3x3 stride-1 padded by 1 with even sides in float32: XLA's convolution.
    assert _convolution_primitives(conv, jnp.ones((2, 5, 6, 3))) == 1
    assert _convolution_primitives(layers.conv(4, 'ddpm', jnp.float32, stride=2), x) == 1
    assert _convolution_primitives(layers.conv(4, 'ddpm', jnp.bfloat16), x) == 1
    assert _convolution_primitives(
        nn.Conv(4, (3, 3), padding='SAME', conv_general_dilated=layers.conv_general_dilated),
        x) == 1
    # Auto on one CPU device with XLA's own convolutions: on AMD and Intel CPUs, and
    # only where it pays there.
    monkeypatch.setenv('DDPM_JAX_CONVOLUTION', 'auto')
    monkeypatch.setattr(parallel, 'compiler_options', lambda: {'one': 'device'})
    monkeypatch.setattr(layers, 'cpu_vendor', lambda: '')
    assert layers.convolution_algorithm() == 'direct'
    monkeypatch.setattr(layers, 'cpu_vendor', lambda: 'AuthenticAMD')
    assert layers.convolution_algorithm() == 'winograd'
    assert _convolution_primitives(conv, x) == 1  # Too small to pay.
    wide = jax.ShapeDtypeStruct((8, 8, 8, 256), jnp.float32)
    assert _convolution_primitives(layers.conv(256, 'ddpm', jnp.float32), wide) == 0
    many_tiles = jax.ShapeDtypeStruct((8, 32, 32, 128), jnp.float32)
    assert _convolution_primitives(layers.conv(128, 'ddpm', jnp.float32), many_tiles) == 0
    monkeypatch.setattr(layers, 'cpu_vendor', lambda: 'GenuineIntel')
    assert layers.convolution_algorithm() == 'winograd'
    assert _convolution_primitives(layers.conv(256, 'ddpm', jnp.float32), wide) == 0
    assert _convolution_primitives(layers.conv(128, 'ddpm', jnp.float32), many_tiles) == 1
    monkeypatch.setenv('DDPM_JAX_CONVOLUTION', 'direct')
    assert _convolution_primitives(layers.conv(256, 'ddpm', jnp.float32), wide) == 1
    monkeypatch.setenv('DDPM_JAX_CONVOLUTION', 'fft')
    with pytest.raises(ValueError, match='DDPM_JAX_CONVOLUTION'):
        layers.convolution_algorithm()


def test_save_convs_policy_keeps_winograd_outputs(capsys):
    # remat_policy='save_convs' stores Winograd's output as it stores a convolution's.
    x, kernel = jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 5))
    f = lambda x, k: jnp.sin(layers.conv3x3_winograd(x, k)).sum()
    for policy, saved in ((unet._save_convs, True),
                          (jax.checkpoint_policies.nothing_saveable, False)):
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(f, policy=policy), x,
                                                kernel)
        out = capsys.readouterr().out
        assert (f"f32[2,4,4,5] named '{layers.WINOGRAD_OUTPUT}'" in out) == saved, out


def test_cpu_vendor_reads_cpuinfo(tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n'
                       'processor\t: 1\nvendor_id\t: AuthenticAMD\n')
    assert layers.cpu_vendor(str(cpuinfo)) == 'AuthenticAMD'
    cpuinfo.write_text('processor\t: 0\nCPU implementer\t: 0x41\n')  # An Arm machine.
    assert layers.cpu_vendor.__wrapped__(str(cpuinfo)) == ''
    assert layers.cpu_vendor(str(tmp_path / 'missing')) == ''


@pytest.mark.parametrize('name', ['ddpm', 'ncsnpp'])
def test_winograd_networks_equal_direct_ones(tiny_config, name, monkeypatch):
    # Same parameters, outputs to float32 rounding (the gradients: above).
    overrides = dict(variant='ddpm', channel_mult=(1, 2), attention_resolutions=(4,))
    if name == 'ncsnpp':
        overrides.update(name='ncsnpp', num_res_blocks=1, base_channels=16, num_groups=4)
    model = models.create_model(_config(tiny_config, **overrides))
    params = random_params(model)
    x, t = inputs()

    def run(algorithm):
        monkeypatch.setenv('DDPM_JAX_CONVOLUTION', algorithm)
        forward = lambda p: model.apply({'params': p}, x, t)
        jaxpr = str(jax.make_jaxpr(forward)(params))
        return jaxpr.count('conv_general_dilated'), np.asarray(jax.jit(forward)(params))

    (direct_convs, want), (winograd_convs, got) = run('direct'), run('winograd')
    assert winograd_convs < direct_convs  # Stride-2 and odd-sized ones stay.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_attention_implementation_cudnn_only_for_half_precision_on_gpu(monkeypatch):
    monkeypatch.delenv('DDPM_JAX_ATTENTION', raising=False)
    pick = layers.attention_implementation
    assert pick(jnp.bfloat16, 64) == 'xla'  # This process: a CPU.
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    assert pick(jnp.bfloat16, 64) == 'cudnn'
    assert pick(jnp.float16, 256) == 'cudnn'
    assert pick(jnp.float32, 64) == 'xla'
    assert pick(jnp.bfloat16, 264) == 'xla'
    assert pick(jnp.bfloat16, 12) == 'xla'
    monkeypatch.setenv('DDPM_JAX_ATTENTION', 'xla')
    assert pick(jnp.bfloat16, 64) == 'xla'
    monkeypatch.setenv('DDPM_JAX_ATTENTION', 'flash')
    with pytest.raises(ValueError, match='DDPM_JAX_ATTENTION'):
        pick(jnp.bfloat16, 64)


def test_upsample_nearest_and_its_derivatives_are_block_copies_and_sums():
    """upsample_nearest is np.repeat on both axes; its gradient sums each 2x2 block, its
    forward derivative is the upsampled tangent (float64 NumPy)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    cot = rng.normal(size=(2, 6, 10, 4)).astype(np.float32)
    out, vjp = jax.vjp(layers.upsample_nearest, jnp.asarray(x))
    np.testing.assert_array_equal(out, np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))
    block_sums = cot.astype(np.float64).reshape(2, 3, 2, 5, 2, 4).sum(axis=(2, 4))
    np.testing.assert_allclose(vjp(jnp.asarray(cot))[0], block_sums, rtol=1e-6, atol=1e-6)
    tangent = rng.normal(size=x.shape).astype(np.float32)
    _, jvp = jax.jvp(layers.upsample_nearest, (jnp.asarray(x),), (jnp.asarray(tangent),))
    np.testing.assert_array_equal(jvp, np.repeat(np.repeat(tangent, 2, axis=1), 2, axis=2))


# --- dropout --------------------------------------------------------------------------

def test_threefry_known_answers():
    """The written-out hash is Threefry-2x32-20: Random123's known-answer vectors."""
    cases = [((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6b200159, 0x99ba4efe)),
             ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
             ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0))]
    for key, (c0, c1), expected in cases:
        out = layers._threefry2x32(jnp.asarray(key, jnp.uint32), jnp.asarray([c0], jnp.uint32),
                                   jnp.asarray([c1], jnp.uint32))
        assert tuple(int(o[0]) for o in out) == expected


@pytest.mark.parametrize('shape', [(), (7,), (3, 5, 7), (2, 1, 3, 1, 5), (4, 8, 8, 16)])
def test_bernoulli_is_jax_random_bernoulli_bit_for_bit(shape):
    fast = jax.jit(layers.bernoulli, static_argnums=(1, 2))
    for p in (0.9, 0.5, 1 / 3, 1e-3, 0.999):
        for key in (jax.random.key(11), jax.random.PRNGKey(5)):
            np.testing.assert_array_equal(fast(key, p, shape),
                                          jax.random.bernoulli(key, p, shape))
    mask = fast(jax.random.key(3), 0.25, (64, 64))  # and it is a Bernoulli(p) mask
    assert abs(float(mask.mean()) - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4096)


def test_bernoulli_is_one_loop_on_the_cpu_and_falls_back_elsewhere():
    """The fast path compiles without JAX's rolled threefry loop (what makes it fast on
    a CPU); other PRNGs and 64-bit mode take jax.random.bernoulli itself."""
    def hlo(fn):
        return jax.jit(lambda k: fn(k, 0.9, (4, 4))).lower(jax.random.key(0)).compile().as_text()
    assert 'while' not in hlo(layers.bernoulli)
    with threefry_lowered_as_jax_ships_it():  # (The test suite unrolls it.)
        assert 'while' in hlo(jax.random.bernoulli)  # (or the first check proves nothing)
    rbg = jax.random.key(1, impl='rbg')
    assert not layers._fused_bernoulli_applies(rbg, (4, 4))
    np.testing.assert_array_equal(layers.bernoulli(rbg, 0.7, (4, 4)),
                                  jax.random.bernoulli(rbg, 0.7, (4, 4)))
    with jax.enable_x64(True):
        key = jax.random.key(2)
        assert not layers._fused_bernoulli_applies(key, (4, 4))
        np.testing.assert_array_equal(layers.bernoulli(key, 0.7, (4, 4)),
                                      jax.random.bernoulli(key, 0.7, (4, 4)))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_dropout_is_flax_dropout(dtype):
    """Same outputs as nn.Dropout bit for bit, from the same place in the rng tree."""
    class Net(nn.Module):
        dropout: type

        @nn.compact
        def __call__(self, x, train):
            h = nn.Dense(16, dtype=dtype)(x)
            h = self.dropout(0.3, deterministic=not train)(h)
            return self.dropout(0.1, deterministic=not train)(nn.Dense(16, dtype=dtype)(h))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), dtype)
    params = Net(nn.Dropout).init(jax.random.key(0), x, False)
    for train in (True, False):
        ours, flax_ = (Net(d).apply(params, x, train, rngs={'dropout': jax.random.key(4)})
                       for d in (layers.Dropout, nn.Dropout))
        assert ours.dtype == flax_.dtype == dtype
        np.testing.assert_array_equal(ours, flax_)
    h = jnp.ones((8, 8), dtype)
    rngs = {'dropout': jax.random.key(5)}
    np.testing.assert_array_equal(layers.Dropout(1.0, deterministic=False).apply({}, h, rngs=rngs),
                                  jnp.zeros_like(h))
    np.testing.assert_array_equal(layers.Dropout(0.5).apply({}, h), h)


def test_dropout_sharded_over_the_batch_is_the_unsharded_mask():
    """Each element's counter is its global index, so a batch-sharded mask (4 devices)
    is the one-device mask, and stays sharded (no gather)."""
    mesh = parallel.create_mesh()
    sharding = NamedSharding(mesh, P('data'))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 4, 6)), jnp.float32)
    rngs = {'dropout': jax.random.key(7)}
    drop = layers.Dropout(0.4, deterministic=False)
    fn = jax.jit(lambda h: drop.apply({}, h, rngs=rngs), in_shardings=sharding,
                 out_shardings=sharding)
    x = jax.device_put(x, sharding)
    assert parallel.num_mesh_devices(mesh) == 4
    hlo = fn.lower(x).compile().as_text()
    assert 'all-gather' not in hlo and 'all-reduce' not in hlo and 'all-to-all' not in hlo
    np.testing.assert_array_equal(fn(x), nn.Dropout(0.4, deterministic=False).apply({}, x, rngs=rngs))


def test_gradient_boundary_is_the_identity_in_every_mode():
    """Values, cotangents and tangents pass unchanged, NaN, infinities and -0 included;
    second derivatives too."""
    x = jnp.array([1.5, -0.0, jnp.inf, -jnp.inf, jnp.nan, 3e38, -2.0])
    w = jnp.array([2.0, -0.0, jnp.nan, jnp.inf, 1.0, -jnp.inf, 3e-38])
    y = layers.gradient_boundary(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(jnp.signbit(y), jnp.signbit(x))
    grad = jax.grad(lambda v: jnp.sum(layers.gradient_boundary(v) * w))(x)
    np.testing.assert_array_equal(grad, w)
    np.testing.assert_array_equal(jnp.signbit(grad), jnp.signbit(w))
    primal, tangent = jax.jvp(layers.gradient_boundary, (x,), (w,))
    np.testing.assert_array_equal(primal, x)
    np.testing.assert_array_equal(tangent, w)
    np.testing.assert_array_equal(jnp.signbit(tangent), jnp.signbit(w))
    v = jnp.array([1.0, -2.0, 0.5])
    hessian = jax.hessian(lambda v: jnp.sum(layers.gradient_boundary(v) ** 3))(v)
    np.testing.assert_array_equal(hessian, np.diag(6 * np.asarray(v)))


def _largest_loop_fusion(hlo: str) -> int:
    """The most operands of any loop fusion in a compiled program's text."""
    computations = {}
    for block in hlo.split('\n\n'):
        match = re.match(r'%?([\w.\-]+) \(', block.strip())
        if match:
            computations[match.group(1)] = block
    return max(computations[re.search(r'calls=%?([\w.\-]+)', line).group(1)]
               .count(' parameter(') for line in hlo.splitlines()
               if 'kind=kLoop' in line and ' fusion(' in line)


@jax.custom_jvp
def _divide_only_the_gradient(x):
    return x


@_divide_only_the_gradient.defjvp
def _divide_only_the_gradient_jvp(primals, tangents):
    return primals[0], tangents[0] / layers._exactly_one(primals[0])


def test_gradient_boundary_stops_xla_recomputing_a_residual_chain_per_consumer():
    """Without it XLA:CPU fuses the chain of residual gradients into each consumer, so
    the largest loop fusion grows with the number of blocks (32 operands for these 4);
    dividing only the gradient leaves the forward's chain of sums, which the last
    norm's projection's filter gradient recomputes (14); dividing the value too, 11.
    The gradients agree."""
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                             padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    def loss(params, x, boundary):
        kernels, biases, projection = params
        for kernel, bias in zip(kernels, biases):
            x = x + conv(jax.nn.silu(layers.normalize_groups(x, 4, 1e-6)), kernel) + bias
            x = boundary(x)
        return jnp.sum(conv(layers.normalize_groups(x, 4, 1e-6), projection) ** 2)

    rng = np.random.default_rng(0)
    params = ([jnp.asarray(rng.normal(size=(3, 3, 16, 16)) * 0.1, jnp.float32)
               for _ in range(4)],
              [jnp.asarray(rng.normal(size=(16,)), jnp.float32) for _ in range(4)],
              jnp.asarray(rng.normal(size=(1, 1, 16, 16)), jnp.float32))
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32)
    largest, grads = {}, {}
    for name, boundary in (('none', lambda x: x), ('gradient', _divide_only_the_gradient),
                           ('both', layers.gradient_boundary)):
        fn = jax.jit(jax.grad(functools.partial(loss, boundary=boundary)),
                     compiler_options=parallel.compiler_options())
        largest[name] = _largest_loop_fusion(fn.lower(params, x).compile().as_text())
        grads[name] = fn(params, x)
    assert largest['both'] < largest['gradient'] < largest['none'] - 8, largest
    for without, with_ in zip(jax.tree.leaves(grads['none']), jax.tree.leaves(grads['both'])):
        np.testing.assert_allclose(with_, without, rtol=1e-5,
                                   atol=1e-6 * float(jnp.max(jnp.abs(without))))
