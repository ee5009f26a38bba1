"""NCSN++ / DDPM++ / DDGAN's generator (models/ncsnpp.py), its FIR resampling
(models/resampling.py) and its PyTorch state dicts (released.py).

The reference outputs in tests/data/ncsnpp_reference.npz were computed by the reference
code itself: score_sde_pytorch's `models/ncsnpp.py` and denoising-diffusion-gan's
`score_sde/models/ncsnpp_generator_adagn.py` (PyTorch 2.13, CPU, float32), every
parameter set to random float16-exact values, on float16-exact inputs; the file holds
their state dicts (float16), inputs and outputs. Three small networks cover every
branch: Fourier features with FIR, the residual input and output pyramids and the fused
up/down-sampling convolutions; DDPM++ blocks with the plain resampling, the skip output
pyramid and the concatenated input skips; DDGAN's generator with adaptive group norms.
(score_sde_pytorch's `upsample_conv_2d` and the plain `Upsample` do not run in PyTorch
as published: a negative-step slice, a 4-entry stride and `F.interpolate`'s third
positional argument; the fixtures come from the obvious repairs, which compute what
score_sde's JAX original computes: `jax.lax.conv_transpose` of the flipped kernel,
stride 2, nearest 2x.)
"""

import hashlib
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_ve
from configs import default
from configs import digits_ncsnpp
from ddpm_jax import config_json
from ddpm_jax import config_lib
from ddpm_jax import models
from ddpm_jax import released
from ddpm_jax import score_matching
from ddpm_jax import sde as sde_lib
from ddpm_jax import tasks
from ddpm_jax import torch_checkpoint
from ddpm_jax.models import ncsnpp as ncsnpp_lib
from ddpm_jax.models import resampling
from ddpm_jax.tasks import score as score_task

FIXTURE = 'tests/data/ncsnpp_reference.npz'

# The reference networks of the fixture, in our config fields.
CASES = {
    'ncsnpp_fourier_residual': dict(
        ncsnpp=dict(fir=True, skip_rescale=True, resblock_type='biggan', progressive='residual',
                    progressive_input='residual', progressive_combine='sum',
                    embedding_type='fourier'),
        attention_resolutions=(4,)),
    'ddpm_blocks_skips_cat': dict(
        ncsnpp=dict(fir=False, skip_rescale=False, resblock_type='ddpm',
                    progressive='output_skip', progressive_input='input_skip',
                    progressive_combine='cat', embedding_type='positional'),
        attention_resolutions=(8,)),
    'ddgan_generator': dict(
        ncsnpp=dict(fir=True, skip_rescale=True, resblock_type='biggan', progressive='none',
                    progressive_input='residual', progressive_combine='sum',
                    embedding_type='positional', z_emb_dim=8),
        attention_resolutions=(4,), latent_dim=4, mapping_layers=2),
}


def _config(case=None, **overrides):
    config = default.get_config()
    config.data.image_size, config.data.channels = 8, 3
    m = config.model
    m.name = 'ncsnpp'
    m.base_channels, m.channel_mult, m.num_res_blocks, m.dropout = 8, (1, 2), 1, 0.0
    spec = dict(CASES[case]) if case else {}
    spec.update(overrides)
    for key, value in spec.pop('ncsnpp', {}).items():
        m.ncsnpp[key] = value
    for key, value in spec.items():
        m[key] = value
    return config


@pytest.mark.parametrize('case', sorted(CASES))
def test_outputs_equal_the_reference_networks(case):
    """Each fixture network imported into ours gives the reference's output; export gives
    back the reference's state dict, names in its order."""
    config = _config(case)
    with np.load(FIXTURE) as f:
        prefix = f'{case}/sd/'
        state_dict = {k[len(prefix):]: f[k] for k in f.files if k.startswith(prefix)}
        x, t, want = (f[f'{case}/{k}'] for k in ('x', 't', 'out'))
        z = f[f'{case}/z'] if f'{case}/z' in f.files else None
    params = released.import_state_dict(state_dict, config)
    model = models.create_model(config)
    kwargs = {} if z is None else {'z': jnp.asarray(z, jnp.float32)}
    out = model.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32),
                      jnp.asarray(t), **kwargs)
    got = np.asarray(out).transpose(0, 3, 1, 2)
    assert np.abs(want).max() > 1.0  # Random weights everywhere: nothing is vacuous.
    np.testing.assert_allclose(got, want, atol=3e-6 * np.abs(want).max(), rtol=0)
    exported = released.export_state_dict(params, config)
    assert list(exported) == list(state_dict)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, state_dict[name].astype(np.float32))
    assert models.count_params(config) == sum(v.size for v in state_dict.values())


# Each config's PyTorch layout: the number of tensors, sha256 of its 'name:(shape)'
# lines, and the parameter count, all read off the reference's own module
# (score_sde_pytorch's configs, DDGAN's README commands) without its `sigmas` buffer.
LAYOUTS = {
    'cifar10_vp': (564, '97770a8f39855c706df2db4504280f3a7991394029ef301c55ad187fa6247dc9',
                   61_804_419),
    'cifar10_ve': (571, 'fdf90ce3183eace38c235f52af86a66b6623311002a39879838585156e277c86',
                   62_758_915),
    'cifar10_vp_deep': (956, 'b2e98ab98124915d1f744942aadb3953aa6356d354e2f6ba914ddc1771813c4e',
                        106_632_579),
    'cifar10_ve_deep': (963, '49cd0e372e549bef6b01b6590f09c13b67d7e08c52d0f8e3fc9e4a2dd6457fb7',
                        107_587_075),
    'cifar10_ddgan': (384, '73bb38cc69f5f07d8fff72c45d19608ef38e90b07dc31a215fbb42f4cf21192e',
                      48_432_515),
    'celebahq256_ddgan': (548, 'f750985c4268c518fa393af1781fe0a01cbb8ff73aba84ec0bd0eb4b5602b7dd',
                          39_726_979),
}


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_config_networks_have_the_reference_layouts(name):
    config = importlib.import_module(f'configs.{name}').get_config()
    specs = released.state_dict_layout(config)
    lines = '\n'.join(f'{s.torch_name}:{tuple(s.torch_shape)}' for s in specs)
    count, digest, num_params = LAYOUTS[name]
    assert (len(specs), hashlib.sha256(lines.encode()).hexdigest()) == (count, digest)
    assert models.count_params(config) == num_params


# --- FIR resampling against float64 NumPy -------------------------------------------


def _upfirdn_np(x, k, up, down, pad):
    """upfirdn2d on [B, H, W, C] in float64: zeros after each sample, pad (crop when
    negative), convolve with outer(k, k) (flipped), keep every `down`-th sample."""
    b, h, w, c = x.shape
    y = np.zeros((b, h * up, w * up, c))
    y[:, ::up, ::up] = x
    p0, p1 = pad
    y = np.pad(y, ((0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)), (0, 0)))
    y = y[:, max(-p0, 0):y.shape[1] - max(-p1, 0), max(-p0, 0):y.shape[2] - max(-p1, 0)]
    k2 = np.asarray(k, np.float64)[::-1, ::-1]
    n = k2.shape[0]
    out = np.zeros((b, y.shape[1] - n + 1, y.shape[2] - n + 1, c))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = np.einsum('bhwc,hw->bc', y[:, i:i + n, j:j + n], k2)
    return out[:, ::down, ::down]


def _kernel2d(k):
    k = np.outer(k, k).astype(np.float64)
    return k / k.sum()


@pytest.mark.parametrize('k', [(1, 3, 3, 1), (1, 1), (1, 2, 1), (2, 1, 0.5, 3)])
def test_fir_resampling_is_upfirdn2d(k):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 3))
    w = rng.normal(size=(3, 3, 3, 5))
    xj, wj = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    n = len(k)
    got = np.asarray(resampling.upsample_2x(xj, k))
    p = n - 2
    np.testing.assert_allclose(got, _upfirdn_np(x, _kernel2d(k) * 4, 2, 1,
                                                ((p + 1) // 2 + 1, p // 2)), atol=1e-5)
    got = np.asarray(resampling.downsample_2x(xj, k))
    np.testing.assert_allclose(got, _upfirdn_np(x, _kernel2d(k), 1, 2,
                                                ((p + 1) // 2, p // 2)), atol=1e-5)

    # upsample_conv_2d: a transposed convolution of stride 2 of the flipped kernel (each
    # input pixel scatters x[i, j] w[2 - a, 2 - b] to (2i + a, 2j + b)), then the filter.
    t = np.zeros((2, 2 * 6 + 1, 2 * 6 + 1, 5))
    for i in range(6):
        for j in range(6):
            t[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3] += np.einsum('bc,hwco->bhwo', x[:, i, j],
                                                                w[::-1, ::-1])
    q = p - 2
    want = _upfirdn_np(t, _kernel2d(k) * 4, 1, 1, ((q + 1) // 2 + 1, q // 2 + 1))
    got = np.asarray(resampling.upsample_conv_2x(xj, wj, k))
    assert got.shape == (2, 12, 12, 5)
    np.testing.assert_allclose(got, want, atol=2e-5)

    # conv_downsample_2d: the filter, then the 3x3 convolution at stride 2.
    q = p + 2
    f = _upfirdn_np(x, _kernel2d(k), 1, 1, ((q + 1) // 2, q // 2))
    want = np.stack([np.stack([np.einsum('bhwc,hwco->bo', f[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3],
                                         w) for j in range(3)], 1) for i in range(3)], 1)
    got = np.asarray(resampling.conv_downsample_2x(xj, wj, k))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_fir_resampling_keeps_a_constant_inside():
    ones = jnp.ones((1, 8, 8, 1))
    np.testing.assert_allclose(resampling.upsample_2x(ones)[0, 2:-2, 2:-2], 1.0, rtol=1e-6)
    np.testing.assert_allclose(resampling.downsample_2x(ones)[0, 1:-1, 1:-1], 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match='model.ncsnpp.fir_kernel'):
        resampling.downsample_2x(ones, (1,))


# --- the network's invariants -----------------------------------------------------------


def _random_params(model, config, seed=0):
    x, t, kwargs = models.example_inputs(model, 8, config.data.channels, batch_size=2)
    params = model.init({'params': jax.random.key(seed)}, x, t, **kwargs)['params']
    leaves, treedef = jax.tree.flatten(params)
    rs = np.random.RandomState(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(0.2 * rs.randn(*a.shape), a.dtype)
                                        for a in leaves])


def test_remat_gives_the_same_gradients_and_bfloat16_is_close():
    # One level keeps the three gradient compilations cheap.
    config = _config('ncsnpp_fourier_residual', channel_mult=(1,), attention_resolutions=())
    model = models.create_model(config)
    params = _random_params(model, config)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t = jnp.asarray([0.1, 7.0])

    def grads(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x, t) ** 2)))

    plain = grads(model)(params)
    for policy in ('full', 'save_convs'):
        config.model.remat, config.model.remat_policy = True, policy
        remat_grads = grads(models.create_model(config))
        jaxpr = str(jax.make_jaxpr(remat_grads)(params))
        assert 'checkpoint' in jaxpr or 'remat' in jaxpr
        chex.assert_trees_all_close(remat_grads(params), plain, rtol=1e-5, atol=1e-6)
    # The Fourier frequencies are fixed: no gradient reaches them.
    assert float(jnp.abs(plain['time_fourier']).max()) == 0.0
    config.model.remat, config.model.dtype = False, 'bfloat16'
    out32 = jax.jit(model.apply)({'params': params}, x, t)
    out16 = jax.jit(models.create_model(config).apply)({'params': params}, x, t)
    assert out16.dtype == jnp.float32
    assert float(jnp.abs(out16 - out32).max() / jnp.abs(out32).max()) < 0.05


def test_init_follows_the_reference_scales():
    """default_init(scale): Glorot uniform at scale 1, 1e-10 at init_scale 0 (each
    residual branch's last conv, the attention output, the output conv), 0.1 for NIN."""
    config = _config('ncsnpp_fourier_residual', base_channels=32, attention_resolutions=(8,))
    config.data.image_size = 16
    model = models.create_model(config)
    x, t, kwargs = models.example_inputs(model, 16, 3)
    params = jax.jit(model.init)({'params': jax.random.key(0)}, x, t)['params']
    block = params['down_0_res_0']
    bound = np.sqrt(6.0 / (9 * 32 + 9 * 32))  # fan_avg uniform: sqrt(3 / fan_avg).
    w = np.asarray(block['conv_0']['kernel'])
    assert 0.9 * bound < np.abs(w).max() <= bound
    assert np.abs(block['conv_1']['kernel']).max() <= bound * 1e-5
    attn = params['down_1_attn_0']
    q_bound = np.sqrt(3 * 0.1 / 64)
    assert 0.9 * q_bound < np.abs(attn['q']['kernel']).max() <= q_bound
    assert np.abs(attn['proj_out']['kernel']).max() <= 1e-5
    assert np.abs(params['conv_out']['kernel']).max() <= 1e-5
    assert float(np.std(params['time_fourier'])) == pytest.approx(16.0, rel=0.3)


# --- wiring: configs, tasks and validation ------------------------------------------------


def test_config_group_defaults_equal_the_upgrade_defaults():
    schema = config_lib.to_json_dict(default.get_config())['model']['ncsnpp']
    assert schema == config_json.NCSNPP_DEFAULTS


def test_score_task_feeds_sigma_to_a_continuous_ve_ncsnpp():
    """score_sde's labels: sigma(t) for NCSN++ on a continuous VE SDE (embedded as log
    sigma), 999 t otherwise; the loss by hand with s = output / sigma."""
    config = _config('ncsnpp_fourier_residual')
    config.data.channels = 1
    config.task = 'score'
    config.sde.kind, config.sde.sigma_min, config.sde.sigma_max = 've', 0.01, 50.0
    assert score_task.label_kind(config) == 'sigma'
    t = jnp.asarray([0.0, 0.5, 1.0])
    sde = score_task.create_sde(config)
    np.testing.assert_allclose(score_matching.noise_label(t, sde, 'sigma'),
                               0.01 * 5000.0 ** np.asarray(t), rtol=1e-5)
    task = tasks.create_task(config)
    params = jax.jit(task.init_params)(jax.random.key(0))
    leaves, treedef = jax.tree.flatten(params)
    rs = np.random.RandomState(3)
    params = jax.tree.unflatten(treedef, [jnp.asarray(0.1 * rs.randn(*a.shape), a.dtype)
                                          for a in leaves])
    batch = {'image': jnp.asarray(rs.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32),
             'label': jnp.zeros((4,), jnp.int32)}
    examples = task.prepare_batch(batch, jax.random.key(1), task.init_task_state())
    tt = np.asarray(examples['t'], np.float64)
    sigma = (0.01 * 5000.0 ** tt)[:, None, None, None]
    z = np.asarray(examples['noise'], np.float64)
    x_t = np.asarray(batch['image'], np.float64) + sigma * z
    out = np.asarray(jax.jit(task.model.apply)({'params': params['model']},
                                                jnp.asarray(x_t, jnp.float32),
                                      jnp.asarray(sigma[:, 0, 0, 0], jnp.float32)), np.float64)
    want = 0.5 * np.sum((sigma * out / sigma + z) ** 2, axis=(1, 2, 3))  # reduce_mean=False.
    config.sde.reduce_mean = False
    task = tasks.create_task(config)
    _, terms = jax.jit(task.loss, static_argnums=0)(0, params, examples, jax.random.key(2))
    np.testing.assert_allclose(terms['loss'], want, rtol=2e-4)
    config.sde.kind = 'vp'
    assert score_task.label_kind(config) == 'time'


@pytest.mark.parametrize('field,value,match', [
    ('num_classes', 3, r"does not take model.num_classes > 0"),
    ('ncsnpp.progressive', 'skip', r"model.ncsnpp.progressive must be one of"),
    ('ncsnpp.fir_kernel', (2,), r"model.ncsnpp.fir_kernel must be a 1-D kernel"),
    ('base_channels', 36, r"cannot be split into NCSN\+\+'s min\(C/4, 32\) GroupNorm groups"),
    ('attention_resolutions', (5,), r"model.attention_resolutions \[5\] never occur"),
    ('ncsnpp.embedding_type', 'fourier', r"embedding_type='fourier' embeds log sigma"),
    ('bias_init', 'torch', r"does not take model.bias_init='torch'"),
])
def test_config_errors_name_the_field(tiny_config, field, value, match):
    config = tiny_config
    config.model.name = 'ncsnpp'
    config.model.channel_mult = (1, 4)
    config.model.ncsnpp.embedding_type = 'positional'
    config_lib.validate(config, mode='train', num_devices=1)
    group, _, name = field.rpartition('.')
    (config.model[group] if group else config.model)[name] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(config, mode='train', num_devices=1)


def _score_sde_checkpoint(tmp_path, config, params):
    """A score_sde training checkpoint: DataParallel names, the `sigmas` buffer, Adam's
    state and the EMA as a list of the trainable parameters (all but the Fourier W)."""
    state_dict = released.export_state_dict(params, config)
    model = {'module.sigmas': np.geomspace(50, 0.01, 10).astype(np.float32)}
    model.update({f'module.{k}': v for k, v in state_dict.items()})
    shadow = [v + 1.0 for k, v in state_dict.items() if k != 'all_modules.0.W']
    optimizer = {'state': {0: {'step': np.asarray(3.0, np.float32),
                               'exp_avg': np.zeros(3, np.float32)}},
                 'param_groups': [{'lr': 2e-4, 'betas': (0.9, 0.999), 'params': [0]}]}
    path = tmp_path / 'checkpoint_3.pth'
    torch_checkpoint.save_torch_object(path, {'optimizer': optimizer, 'model': model,
                                              'ema': {'decay': 0.999, 'num_updates': 3,
                                                      'shadow_params': shadow},
                                              'step': 3})
    return path, state_dict


def test_score_sde_and_ddgan_files_import(tmp_path):
    config = _config('ncsnpp_fourier_residual')
    params = jax.device_get(_random_params(models.create_model(config), config))
    path, state_dict = _score_sde_checkpoint(tmp_path, config, params)
    loaded = released.load_checkpoint(str(path), config)
    # The EMA weights replace the trainable ones; the Fourier frequencies are the model's.
    np.testing.assert_array_equal(loaded['time_fourier'], params['time_fourier'])
    np.testing.assert_allclose(loaded['conv_in']['kernel'], params['conv_in']['kernel'] + 1.0,
                               rtol=1e-6)
    # DDGAN's netG_<epoch>.pth: a DataParallel state dict.
    config = _config('ddgan_generator')
    params = jax.device_get(_random_params(models.create_model(config), config))
    exported = released.export_state_dict(params, config)
    torch_checkpoint.save_state_dict(tmp_path / 'netG_1200.pth',
                                     {f'module.{k}': v for k, v in exported.items()})
    loaded = released.load_checkpoint(str(tmp_path / 'netG_1200.pth'), config)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    # A file of another network names what is wrong.
    config.model.ncsnpp.z_emb_dim = 16
    with pytest.raises(ValueError, match='mis-shaped'):
        released.load_checkpoint(str(tmp_path / 'netG_1200.pth'), config)


def test_norm_channels_walk_the_reference():
    """The widths `check_architecture` validates are those of the network's group norms."""
    config = _config('ddpm_blocks_skips_cat')
    model = models.create_model(config)
    shapes = models.param_shapes(model, 8, 3)
    widths = set()

    def visit(tree):
        for key, value in tree.items():
            if key == 'norm' and 'scale' in value:
                widths.add(value['scale'].shape[0])
            elif isinstance(value, dict):
                visit(value)
    visit(shapes)
    assert widths <= set(ncsnpp_lib.norm_channels(model)) and widths


def test_uncentered_network_embeds_half_the_sigma():
    """`ncsnpp.centered=False` (score_sde's VE models, trained on [0, 1] data): fed our
    sigma, it is the centred network fed sigma / 2, the level in its training units."""
    config = _config('ncsnpp_fourier_residual')
    model = models.create_model(config)
    params = _random_params(model, config)
    config.model.ncsnpp.centered = False
    uncentered = models.create_model(config)
    y = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    sigma = jnp.asarray([0.04, 30.0])
    np.testing.assert_array_equal(uncentered.apply({'params': params}, y, sigma),
                                  model.apply({'params': params}, y, sigma / 2))
    assert not np.allclose(uncentered.apply({'params': params}, y, sigma),
                           model.apply({'params': params}, y, sigma))


@pytest.mark.slow
def test_a_ddgan_generator_file_imports_into_a_workdir_and_samples(tiny_config, tmp_path):
    """DDGAN's netG_<epoch>.pth: the workdir's generator and its EMA are the file's, the
    discriminator starts fresh, and the 'ddgan' sampler runs on it."""
    from configs import ddgan
    from ddpm_jax import checkpointing, import_checkpoint, parallel, sample_mode
    config = ddgan.make_ddgan(tiny_config, num_timesteps=2, latent_dim=4, n_mlp=1)
    config.model.ncsnpp.z_emb_dim = 8
    config.gan.disc_base_channels = 8
    model = models.create_model(config)
    assert isinstance(model, models.NCSNpp) and model.output_tanh
    params = jax.device_get(_random_params(model, config))
    exported = released.export_state_dict(params, config)
    path = tmp_path / 'netG_1200.pth'
    torch_checkpoint.save_state_dict(path, {f'module.{k}': v for k, v in exported.items()})
    workdir = str(tmp_path / 'run')
    import_checkpoint.import_checkpoint(str(path), config, workdir)
    step, state_params, ema = checkpointing.restore_for_inference(
        config, workdir, parallel.create_mesh())
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(ema['generator']), params)
    assert 'discriminator' in state_params
    result = sample_mode.sample_and_save(config, workdir)
    assert result['nfe'] == 2
    with np.load(result['npz']) as f:
        assert f['images'].shape == (4, 8, 8, 1) and f['images'].std() > 0


def test_score_sdes_ve_configs_get_their_prior_in_our_units():
    """cifar10_ve.py (NCSN++ on [0, 1] data) samples from score_sde's prior N(0, 50^2)
    mapped by y = 2x - 1: mean -1; a centred VE model (digits_ncsnpp.py) from mean 0."""
    assert score_task.create_sde(cifar10_ve.get_config()).prior_mean == -1.0
    assert score_task.create_sde(digits_ncsnpp.get_config()).prior_mean == 0.0
