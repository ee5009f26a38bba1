"""Tests for latent diffusion (ddpm_jax.tasks.latent_diffusion) and cross-attention
conditioning (ddpm_jax.models.conditioning, the UNet's context): the measured scale
factor, exact resume through the trainer from a restored autoencoder, decoded samples,
and the context's effect, null context and lengths; the latent cache
(ddpm_jax.latent_cache): its contents, reuse, refusal, crash safety, and cached
training equal to uncached training."""

import importlib
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax import checkpointing, config_lib, latent_cache, parallel, samplers, tasks, train
from ddpm_jax import data as data_lib
from ddpm_jax import state as state_lib
from ddpm_jax.models import UNet, conditioning, create_model, make_model_fn
from ddpm_jax.tasks import diffusion as diffusion_task
from ddpm_jax.tasks import latent_diffusion

from configs import (autoencoder_vq_f4, default, digits_autoencoder, digits_ldm,
                     ldm_celebahq256, ldm_imagenet256)


def autoencoder_config():
    """A tiny KL autoencoder (f = 2) for 8x8 digits."""
    config = default.get_config()
    config.task = 'autoencoder'
    config.data.image_size = 8
    config.model.attention_resolutions = ()
    a = config.autoencoder
    a.base_channels, a.channel_mult, a.num_res_blocks = 8, (1, 2), 1
    a.z_channels, a.num_groups = 2, 4
    a.disc_base_channels, a.disc_num_layers, a.disc_num_groups = 8, 1, 4
    config.optim.ema_decays = (0.9,)
    config.train.global_batch_size = 8
    config.train.num_grid_samples = 4
    return config


def random_params(task, seed=0):
    """Parameters of the task's shapes drawn on the host (no init to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(task.init_params, jax.random.key(0))
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope='module')
def autoencoder():
    config = autoencoder_config()
    return config, random_params(tasks.create_task(config))['autoencoder']


def ldm_config(workdir=''):
    config = default.get_config()
    config.task = 'latent_diffusion'
    config.data.image_size = 8
    config.latent.autoencoder_workdir = workdir or '/nonexistent'
    m = config.model
    m.base_channels, m.channel_mult, m.num_res_blocks = 8, (1,), 1
    m.attention_resolutions = (8,)  # Image pixels: the 4x4 latent.
    m.num_groups = 4
    m.num_classes, m.class_dropout_prob = 10, 0.1
    m.context_encoder, m.context_dim = 'class', 8
    config.diffusion.num_timesteps = 20
    config.diffusion.var_type = 'fixed_small'
    config.optim.ema_decays = (0.9,)
    config.train.global_batch_size = 8
    config.train.num_train_steps = 4
    config.train.log_every_steps = 2
    config.train.checkpoint_every_steps = 2
    config.train.num_grid_samples = 0
    config.sample.respacing = '4'
    config.sample.guidance_scale = 2.0
    config.sample.clip_denoised = False
    return config


def test_scale_factor_gives_unit_variance_latents(autoencoder):
    task = latent_diffusion.LatentDiffusionTask(ldm_config(), autoencoder=autoencoder)
    assert task.latent_shape == (4, 4, 2)
    images, labels = data_lib.load_digits('test')
    batch = {'image': jnp.asarray(images[:16]), 'label': jnp.asarray(labels[:16])}
    rng = jax.random.key(5)

    @jax.jit
    def prepare(scale):
        state = {**task.init_task_state(), 'scale_factor': scale}
        examples = task.prepare_batch(batch, rng, state)
        encode_rng, _ = jax.random.split(rng)
        z = task.encode(batch['image'], jax.random.normal(encode_rng, (16, 4, 4, 2)))
        return examples, z, task.update_task_state(state, examples, ({'loss': 0},))

    examples, z, new_state = parallel.to_host(prepare(jnp.float32(0)))  # Unmeasured.
    z = z.astype(np.float64)
    assert abs(np.std(z) - 1) > 0.1  # The raw latents are not unit-variance...
    # torch's z.flatten().std(): the sample std, N - 1 (512 latents: 0.1% above N's).
    np.testing.assert_allclose(examples['scale_factor'], 1 / np.std(z, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(np.std(examples['image'].astype(np.float64), ddof=1), 1.0,
                               rtol=1e-5)
    np.testing.assert_allclose(new_state['scale_factor'], 1 / np.std(z, ddof=1), rtol=1e-5)
    examples, z, new_state = parallel.to_host(prepare(jnp.float32(2.5)))  # Kept once set.
    np.testing.assert_allclose(examples['image'], 2.5 * z, rtol=1e-6)
    assert float(new_state['scale_factor']) == 2.5


@pytest.mark.slow
def test_trains_checkpoints_resumes_and_samples_decoded_images(autoencoder, tmp_path):
    # The first stage as a task='autoencoder' run leaves it: a checkpoint in its workdir.
    ae_cfg, ae_params = autoencoder
    save_autoencoder(autoencoder, tmp_path / 'ae')
    loaded_cfg, loaded = latent_diffusion.load_autoencoder(str(tmp_path / 'ae'))
    assert loaded_cfg.autoencoder.to_dict() == ae_cfg.autoencoder.to_dict()
    jax.tree.map(np.testing.assert_array_equal, loaded, ae_params)

    config = ldm_config(str(tmp_path / 'ae'))
    mesh = parallel.create_mesh(jax.devices()[:1])
    trainer = train.Trainer(config, mesh=mesh)
    reference = trainer.train(str(tmp_path / 'ref'))
    trainer.train(str(tmp_path / 'run'), stop_at_step=2)
    resumed = trainer.train(str(tmp_path / 'run'))  # State and scale factor from disk.
    jax.tree.map(np.testing.assert_array_equal, parallel.to_host(resumed),
                 parallel.to_host(reference))
    scale = float(resumed.task_state['scale_factor'])
    assert scale > 0 and int(resumed.step) == 4

    sample_fn = trainer.task.make_sample_fn(mesh)
    ema = resumed.ema_params[0]['model']
    labels = np.array([0, 1, 2, 9])
    images = parallel.gather(sample_fn(ema, jax.random.key(1), labels,
                                       task_state=resumed.task_state))
    assert images.shape == (4, 8, 8, 1)  # Decoded: the data's size, not the latent's.
    assert np.isfinite(images).all() and np.abs(images).max() <= 1.0
    # The same draw by hand: the latent sampler with guidance, then the decoder of z / scale.
    task = trainer.task
    model_fn = samplers.make_cfg_model_fn(make_model_fn(task.model, ema), 2.0, null_label=10)
    sched = diffusion_task.create_sampling_schedule(task.latent_config)

    @jax.jit
    def by_hand():
        z = samplers.SAMPLERS['ddpm'].fn(
            model_fn, sched, (4, 4, 4, 2), jax.random.key(1), model_kwargs={'y': labels},
            cond_fn=None, mean_type='eps', var_type='fixed_small', clip_denoised=False,
            classifier_scale=0.0)
        x = task.autoencoder.apply({'params': ae_params}, z / scale,
                                   method=task.autoencoder.decode_latents)
        return jnp.clip(x, -1, 1)

    np.testing.assert_allclose(images, by_hand(), atol=2e-5)


def unet(**overrides):
    fields = dict(base_channels=8, channel_mult=(1,), num_res_blocks=1,
                  attention_resolutions=(4,), num_groups=4, num_classes=3,
                  class_dropout_prob=0.1, context_encoder='class', context_dim=8)
    fields.update(overrides)
    return UNet(**fields)


def perturbed_init(model, *args):
    """Random parameters of the model's shapes, drawn on the host (a fresh init would
    zero the output projections, hiding the context)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))['params']
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def test_cross_attention_depends_on_context_and_null_is_the_unconditional_branch():
    model = unet()
    x = jax.random.normal(jax.random.key(2), (3, 4, 4, 2))
    t = jnp.array([1, 5, 9])
    params = perturbed_init(model, x, t, jnp.zeros((3,), jnp.int32))
    assert 'down_0_attn_0_cross' in params and 'mid_attn_cross' in params
    assert 'label_emb' not in params  # The labels enter by cross-attention only.
    apply = jax.jit(lambda y: model.apply({'params': params}, x, t, y))
    out = {label: np.asarray(apply(jnp.full((3,), label)), np.float64) for label in range(4)}
    assert np.abs(out[0] - out[1]).max() > 1e-3
    # Classifier-free guidance: its unconditional branch is the null label's context.
    model_fn = lambda x, t, y: model.apply({'params': params}, x, t, y)
    cfg = samplers.make_cfg_model_fn(model_fn, 3.0, null_label=3)
    got = np.asarray(jax.jit(lambda: cfg(x, t, y=jnp.array([0, 0, 0])))(), np.float64)
    np.testing.assert_allclose(got, -2.0 * out[3] + 3.0 * out[0], rtol=1e-4, atol=1e-5)
    # Without a context encoder the UNet is the plain one: no cross-attention.
    plain = jax.eval_shape(lambda: unet(context_encoder='none', context_dim=0).init(
        jax.random.key(0), x, t, jnp.zeros((3,), jnp.int32)))['params']
    assert 'label_emb' in plain and not [k for k in plain if k.endswith('_cross')]


def test_context_lengths_one_and_several():
    block = conditioning.CrossAttentionBlock(num_heads=2, num_groups=4)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    one = jax.random.normal(jax.random.key(1), (2, 1, 6))
    params = perturbed_init(block, x, one)
    apply = jax.jit(lambda c: block.apply({'params': params}, x, c))
    out_one = np.asarray(apply(one))
    assert out_one.shape == x.shape
    # Attention to five copies of a token is attention to the token.
    np.testing.assert_allclose(apply(jnp.repeat(one, 5, axis=1)), out_one, rtol=1e-5,
                               atol=1e-6)
    several = jax.random.normal(jax.random.key(2), (2, 5, 6))
    assert np.abs(np.asarray(apply(several)) - out_one).max() > 1e-3
    # A token sequence through the learned transformer encoder, lengths 1 and 3.
    model = unet(context_encoder='tokens', context_vocab_size=3, context_layers=1)
    xs = jnp.zeros((2, 4, 4, 2))
    for tokens in (jnp.array([[0], [3]]), jnp.array([[0, 1, 2], [3, 3, 3]])):
        variables = jax.eval_shape(lambda tok=tokens: model.init(jax.random.key(0), xs,
                                                                 jnp.zeros(2, jnp.int32), tok))
        out = jax.eval_shape(lambda v, tok=tokens: model.apply(v, xs, jnp.zeros(2, jnp.int32),
                                                               tok), variables)
        assert out.shape == xs.shape


def _numpy_spatial_transformer(p, x, context, heads, depth):
    """LDM's SpatialTransformer (ldm/modules/attention.py) in float64 NumPy."""
    x, context = np.asarray(x, np.float64), np.asarray(context, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    b, hh, ww, c = x.shape
    g = x.reshape(b, hh * ww, 32 if c % 32 == 0 else c, -1)
    mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
    h = ((g - mean) / np.sqrt(var + 1e-6)).reshape(b, hh * ww, c)  # GroupNorm, eps 1e-6.
    h = h * p['norm']['norm']['scale'] + p['norm']['norm']['bias']
    lin = lambda q, a: a @ q['kernel'] + q.get('bias', 0.0)

    def layer_norm(q, a):
        mu, v = a.mean(-1, keepdims=True), a.var(-1, keepdims=True)
        return (a - mu) / np.sqrt(v + 1e-5) * q['scale'] + q['bias']

    def attention(q, name, a, ctx):
        split = lambda m: m.reshape(m.shape[0], m.shape[1], heads, -1).transpose(0, 2, 1, 3)
        qq, kk, vv = (split(lin(q[f'{name}_{n}'], src)) for n, src in
                      (('q', a), ('k', ctx), ('v', ctx)))
        logits = qq @ kk.transpose(0, 1, 3, 2) / np.sqrt(qq.shape[-1])
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out = (w @ vv).transpose(0, 2, 1, 3).reshape(a.shape)
        return lin(q[f'{name}_out'], out)

    gelu = lambda a: 0.5 * a * (1 + np.vectorize(math.erf)(a / np.sqrt(2)))
    h = lin(p['proj_in'], h)
    for i in range(depth):
        q = p[f'block_{i}']
        a = layer_norm(q['norm_1'], h)
        h = h + attention(q, 'self_attn', a, a)
        h = h + attention(q, 'cross_attn', layer_norm(q['norm_2'], h), context)
        a, gate = np.split(lin(q['ff_in'], layer_norm(q['norm_3'], h)), 2, axis=-1)
        h = h + lin(q['ff_out'], a * gelu(gate))
    return x + lin(p['proj_out'], h).reshape(x.shape)


@pytest.mark.parametrize('heads, depth', [(1, 1), (2, 2)])
def test_spatial_transformer_is_ldms(heads, depth):
    """conditioning.SpatialTransformer against LDM's block written out in float64 (the
    same block with LDM's PyTorch weights copied in agreed to 4.5e-6, 2026-12-02): q, k,
    v without biases, GEGLU with the exact gelu, GroupNorm eps 1e-6, LayerNorm 1e-5."""
    block = conditioning.SpatialTransformer(num_heads=heads, num_groups=32, depth=depth)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64))
    context = jax.random.normal(jax.random.key(1), (2, 3, 12))
    fresh = jax.jit(block.init)(jax.random.key(2), x, context)['params']
    np.testing.assert_array_equal(block.apply({'params': fresh}, x, context), x)  # proj_out 0.
    assert 'bias' not in fresh['block_0']['self_attn_q']
    params = perturbed_init(block, x, context)
    out = np.asarray(jax.jit(block.apply)({'params': params}, x, context), np.float64)
    expected = _numpy_spatial_transformer(params, x, context, heads, depth)
    assert np.abs(expected - np.asarray(x)).max() > 1.0  # The block does something.
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


def test_spatial_transformer_unet_replaces_the_attention_blocks():
    model = unet(context_block='spatial_transformer', context_depth=2)
    x = jax.random.normal(jax.random.key(2), (3, 4, 4, 2))
    t = jnp.array([1, 5, 9])
    params = perturbed_init(model, x, t, jnp.zeros((3,), jnp.int32))
    assert 'block_1' in params['down_0_attn_0'] and 'block_1' in params['mid_attn']
    assert not [k for k in params if k.endswith('_cross')]
    apply = jax.jit(lambda y: model.apply({'params': params}, x, t, y))
    assert np.abs(np.asarray(apply(jnp.zeros(3, jnp.int32)))
                  - np.asarray(apply(jnp.ones(3, jnp.int32)))).max() > 1e-3
    for field, value in (('context_block', 'transformer'), ('context_depth', 0)):
        with pytest.raises(ValueError, match=f'model.{field}'):
            jax.eval_shape(lambda f=field, v=value: unet(**{f: v}).init(
                jax.random.key(0), x, t, jnp.zeros((3,), jnp.int32)))


def test_ldm_imagenet256_has_ldms_parameter_count():
    """cin256-v2.yaml's UNetModel (use_spatial_transformer, context_dim 512) counted in
    PyTorch: 400,920,579 parameters, plus its ClassEmbedder's 1,001 x 512."""
    config = importlib.import_module('configs.ldm_imagenet256').get_config()
    latent = config.copy_and_resolve_references()
    latent.data.image_size, latent.data.channels = 64, 3  # VQ-f4 latents.
    latent.model.attention_resolutions = (32, 16, 8)
    m = config.model
    model = create_model(latent).clone(
        context_encoder=m.context_encoder, context_dim=m.context_dim,
        context_block=m.context_block, context_depth=m.context_depth)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros(1, jnp.int32),
        jnp.zeros(1, jnp.int32)))['params']
    assert sum(a.size for a in jax.tree.leaves(shapes)) == 400_920_579 + 1001 * 512


def test_config_rules(autoencoder):
    config = ldm_config('/somewhere')
    tasks.TASKS['latent_diffusion'].validate_config(config)
    for group, field, value, match in (
            ('sample', 'clip_denoised', True, 'sample.clip_denoised'),
            ('latent', 'autoencoder_workdir', '', 'latent.autoencoder_workdir'),
            ('latent', 'scale_factor', -1.0, 'latent.scale_factor'),
            ('latent', 'cache', 'workdir', 'latent.cache'),
            ('model', 'context_dim', 0, 'model.context_dim'),
            ('model', 'context_encoder', 'clip', 'model.context_encoder'),
            ('model', 'context_block', 'transformer', 'model.context_block'),
            ('model', 'context_depth', 0, 'model.context_depth')):
        bad = ml_collections.ConfigDict(config.to_dict())
        bad[group][field] = value
        with pytest.raises(ValueError, match=match):
            config_lib.validate(bad, mode='train', num_devices=1)
    with pytest.raises(ValueError, match='latent.autoencoder_workdir'):
        latent_diffusion.load_autoencoder('/nonexistent/ae')
    bad = ldm_config()
    bad.model.attention_resolutions = (1,)
    bad.model.channel_mult = (1, 2, 2, 2)
    with pytest.raises(ValueError, match='model.attention_resolutions'):
        latent_diffusion.LatentDiffusionTask(bad, autoencoder=autoencoder)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_ldm_configs_validate_and_match_the_papers_sizes():
    """The paper configs build (shapes only); LDM-4 CelebA-HQ has the paper's 274M."""
    for first, second, latent, unet_params in (
            (autoencoder_vq_f4, ldm_celebahq256, (64, 64, 3), 274e6),
            (digits_autoencoder, digits_ldm, (4, 4, 3), None)):
        ae_cfg, config = first.get_config(), second.get_config()
        config_lib.validate(ae_cfg, mode='train', num_devices=1)
        config_lib.validate(config, mode='train', num_devices=1)
        ae_shapes = jax.eval_shape(tasks.create_task(ae_cfg).init_params, jax.random.key(0))
        task = latent_diffusion.LatentDiffusionTask(
            config, autoencoder=(ae_cfg, ae_shapes['autoencoder']))
        assert task.latent_shape == latent
        count = _count(jax.eval_shape(task.init_params, jax.random.key(0)))
        if unet_params:  # Rombach et al. 2022 report 274M parameters for LDM-4 CelebA-HQ.
            assert abs(count - unet_params) < 0.005 * unet_params, count


def test_imagenet_ldm_samples_the_raw_parameters():
    """cin256-v2.yaml has use_ema: False: decay 0 keeps the EMA copy equal to the
    parameters, bit for bit, and sampling reads that copy; CelebA-HQ keeps LDM's 0.9999."""
    config = ldm_imagenet256.get_config()
    config_lib.validate(config, mode='train', num_devices=1)
    assert tuple(config.optim.ema_decays) == (0.0,)
    assert tuple(ldm_celebahq256.get_config().optim.ema_decays) == (0.9999,)
    rng = np.random.default_rng(0)
    ema, params = ({'model': {'w': rng.normal(size=(3, 4)).astype(np.float32)}}
                   for _ in range(2))
    new = state_lib.update_ema(ema, params, config.optim.ema_decays[0])
    np.testing.assert_array_equal(new['model']['w'], params['model']['w'])
    assert state_lib.select_ema_params(config, (new,)) is new
    # The generic EMA (no warm-up): e <- d e + (1 - d) p.
    slow = state_lib.update_ema(ema, params, 0.9999)['model']['w']
    want = 0.9999 * ema['model']['w'].astype(np.float64) + 1e-4 * params['model']['w']
    np.testing.assert_allclose(slow, want, rtol=1e-6)


# --- the latent cache ----------------------------------------------------------------


def save_autoencoder(autoencoder, workdir, step=7):
    """Writes the tiny autoencoder as a task='autoencoder' run's checkpoint."""
    ae_cfg, ae_params = autoencoder
    ae_task = tasks.create_task(ae_cfg)
    shapes = jax.eval_shape(lambda: state_lib.create_train_state(ae_task, jax.random.key(0)))
    ae_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes).replace(
        params={'autoencoder': ae_params, 'discriminator': random_params(ae_task)[
            'discriminator']})
    with checkpointing.create_checkpoint_manager(str(workdir), ae_cfg) as manager:
        checkpointing.save_checkpoint(manager, step, ae_state, ae_cfg, force=True)
        manager.wait_until_finished()
    return str(workdir)


@pytest.fixture(scope='module')
def ae_workdir(autoencoder, tmp_path_factory):
    return save_autoencoder(autoencoder, tmp_path_factory.mktemp('ae'))


def cached_config(ae_workdir, **data):
    config = ldm_config(ae_workdir)
    config.latent.cache = 'autoencoder_workdir'
    for field, value in data.items():
        config.data[field] = value
    return config


def uncached(config):
    config = ml_collections.ConfigDict(config.to_dict())
    config.latent.cache = 'none'
    return config


def test_cache_holds_the_posterior_in_the_image_streams_order(autoencoder, ae_workdir,
                                                              monkeypatch):
    config = cached_config(ae_workdir, random_flip=True)
    path, header = latent_cache.ensure_cache(config)
    assert os.path.basename(path) == 'step7_digits_train_8x8x1_flip'
    assert path.startswith(os.path.join(ae_workdir, 'latent_cache'))
    arrays = latent_cache.LatentRecords(path, ('mean', 'logvar', 'label'), 1500).arrays()
    assert arrays['mean'].shape == arrays['logvar'].shape == (1500, 2, 4, 4, 2)
    # The posterior of every training image and of its mirror image, in dataset order.
    task = latent_diffusion.LatentDiffusionTask(config, autoencoder=autoencoder)
    images, labels = data_lib.load_digits('train')
    posterior = jax.jit(task.posterior)
    for k, x in enumerate((images, images[:, :, ::-1])):
        want = parallel.to_host(posterior(jnp.asarray(x)))
        for name in ('mean', 'logvar'):  # Other batch compositions: float rounding only.
            np.testing.assert_allclose(arrays[name][:, k], want[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(arrays['label'], labels)
    assert np.abs(arrays['mean'][:, 0] - arrays['mean'][:, 1]).max() > 1e-2  # Not symmetric.

    # The cached stream is the image stream, batch for batch and flip for flip (here
    # as process 1 of 2).
    shard = dict(process_index=1, process_count=2)
    cached_iter = latent_cache.create_train_iterator(config, **shard)
    image_iter = data_lib.create_train_iterator(uncached(config), **shard)
    for _ in range(3):
        cached_batch, image_batch = next(cached_iter), next(image_iter)
        assert set(cached_batch) == {'mean', 'logvar', 'label'}
        np.testing.assert_array_equal(cached_batch['label'], image_batch['label'])
        want = parallel.to_host(posterior(jnp.asarray(image_batch['image'])))
        np.testing.assert_allclose(cached_batch['mean'], want['mean'], rtol=1e-5, atol=1e-6)
    assert cached_iter.get_state() == image_iter.get_state()

    # Written once: a second run reuses it without encoding.
    mtime = os.path.getmtime(os.path.join(path, 'mean.npy'))
    monkeypatch.setattr(latent_cache, '_encode_split', lambda *a, **k: pytest.fail('encoded'))
    assert latent_cache.ensure_cache(config)[0] == path
    assert os.path.getmtime(os.path.join(path, 'mean.npy')) == mtime


def test_mismatching_cache_is_refused_and_kept(autoencoder, ae_workdir, tmp_path):
    # The same workdir and step, but another autoencoder (e.g. retrained in place).
    config = cached_config(ae_workdir, split='test')
    path, _ = latent_cache.ensure_cache(config)
    header_file = os.path.join(path, 'header.json')
    with open(header_file) as f:
        header = json.load(f)
    header['autoencoder_fingerprint'] = '0' * 64
    with open(header_file, 'w') as f:
        json.dump(header, f)
    mtime = os.path.getmtime(os.path.join(path, 'mean.npy'))
    with pytest.raises(ValueError, match=r'^latent.cache: .*autoencoder_fingerprint') as error:
        latent_cache.ensure_cache(config)
    assert '\n' not in str(error.value)
    assert os.path.getmtime(os.path.join(path, 'mean.npy')) == mtime  # Not overwritten.


def test_half_written_cache_is_never_used(ae_workdir, monkeypatch):
    config = cached_config(ae_workdir, split='test', center_crop=True, random_flip=False)
    root = latent_cache.cache_root(config)
    name = 'step7_digits_test_8x8x1_crop'
    # A crash that killed a writer leaves a temporary directory (no header).
    os.makedirs(os.path.join(root, f'{name}.tmp-dead'))
    np.save(os.path.join(root, f'{name}.tmp-dead', 'mean.npy'), np.full((3,), np.nan))
    # A writer that fails after its first batch leaves nothing under the final name.
    real = data_lib.create_eval_iterator

    def crashing(cfg):
        iterator = real(cfg)
        yield next(iterator)
        raise KeyboardInterrupt('simulated crash')

    monkeypatch.setattr(data_lib, 'create_eval_iterator', crashing)
    with pytest.raises(KeyboardInterrupt):
        latent_cache.ensure_cache(config)
    assert sorted(os.listdir(root)).count(name) == 0
    assert [p for p in os.listdir(root) if p.startswith(name)] == [f'{name}.tmp-dead']
    monkeypatch.setattr(data_lib, 'create_eval_iterator', real)
    path, header = latent_cache.ensure_cache(config)  # A fresh, complete cache.
    assert os.path.basename(path) == name and header['num_examples'] == 297
    mean = latent_cache.LatentRecords(path, ('mean',), 297).arrays()['mean']
    assert mean.shape == (297, 4, 4, 2) and np.isfinite(mean).all()


def test_cached_step_equals_uncached_step(autoencoder, ae_workdir):
    """The first step's inputs and loss on the image batch (encoded in the step) and on
    the cached batch: the same examples and eps, so the same z, scale factor and loss up
    to the float rounding of the encoder in another batch composition."""
    config = cached_config(ae_workdir)
    task = latent_diffusion.LatentDiffusionTask(config, autoencoder=autoencoder)
    params = random_params(task, seed=3)
    prepare_rng, loss_rng = jax.random.split(jax.random.key(4))

    @jax.jit
    def first_step(batch):
        examples = task.prepare_batch(batch, prepare_rng, task.init_task_state())
        loss, _ = task.loss(0, params, examples, loss_rng)
        return examples, loss

    mesh = parallel.create_mesh()  # Four devices: the batch is sharded.
    out = {}
    for name, cfg in (('cached', config), ('images', uncached(config))):
        batch = parallel.to_global(next(train.create_train_iterator(cfg)), mesh)  # Trainer's.
        out[name] = parallel.to_host(first_step(batch))
    (cached, cached_loss), (images, images_loss) = out['cached'], out['images']
    assert set(cached) == set(images) and 'scale_factor' in cached
    for key, value in cached.items():
        if np.issubdtype(value.dtype, np.integer):  # Labels, timesteps: the same draws.
            np.testing.assert_array_equal(value, images[key])
        else:
            np.testing.assert_allclose(value, images[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached_loss, images_loss, rtol=1e-5)
    z = cached['image'].astype(np.float64)
    np.testing.assert_allclose(np.std(z, ddof=1), 1.0, rtol=1e-5)  # 1 / this batch's std...
    assert abs(cached['scale_factor'][0] - 1) > 0.1  # ...which was measured.


@pytest.mark.slow
def test_cached_training_resumes_bit_for_bit(ae_workdir, tmp_path):
    config = cached_config(ae_workdir)
    trainer = train.Trainer(config)
    reference = trainer.train(str(tmp_path / 'ref'))
    trainer.train(str(tmp_path / 'run'), stop_at_step=2)
    resumed = trainer.train(str(tmp_path / 'run'))  # Reads the cache and its position again.
    jax.tree.map(np.testing.assert_array_equal, parallel.to_host(resumed),
                 parallel.to_host(reference))
    assert int(resumed.step) == 4 and float(resumed.task_state['scale_factor']) > 0
