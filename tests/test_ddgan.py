"""Tests for the denoising diffusion GAN (ddpm_jax.tasks.ddgan, samplers.ddgan_sample,
the 'vp' schedule): closed forms in float64, R1 by hand, the two optimisers kept apart,
exact resume and sharding through the generic trainer, a short digits run, and the
points matched to DDGAN's code (D's time embedding and initialisation, the mapping
network, the tanh output, the learning-rate floor, upgraded old records)."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import checkpointing, config_lib, models, parallel, samplers, schedules
from ddpm_jax import data as data_lib
from ddpm_jax import state as state_lib
from ddpm_jax import tasks, train
from ddpm_jax.models import ddgan_discriminator, layers


@pytest.fixture
def gan_config(tiny_config):
    config = tiny_config
    config.task = 'ddgan'
    config.model.latent_dim = 8
    config.model.mapping_layers = 2
    config.model.use_scale_shift_norm = True
    config.model.num_classes = 10
    config.diffusion.num_timesteps = 4
    config.diffusion.schedule = 'vp'
    config.diffusion.mean_type = 'x0'
    config.diffusion.var_type = 'fixed_small'
    config.gan.disc_base_channels = 8
    config.gan.disc_channel_mult = (1, 2)
    config.gan.lazy_reg = 2
    config.gan.r1_gamma = 1.0
    config.sample.sampler = 'ddgan'
    config.train.num_grid_samples = 0
    return config


def _mesh(n):
    return parallel.create_mesh(jax.devices()[:n])


@pytest.mark.parametrize('num_steps', [2, 4, 8])
def test_vp_schedule_marginals_follow_its_alpha_bar(num_steps):
    """abar_i = abar(t_{i+1}) / abar(t_0) with abar(t) = exp(-t^2 (20 - 0.1) / 2 - 0.1 t),
    t_k = 1e-3 + k (1 - 1e-3) / T (Xiao et al. 2022's discretised VP SDE)."""
    t = 1e-3 + np.arange(num_steps + 1) / num_steps * (1 - 1e-3)
    abar = np.exp(-0.5 * t ** 2 * 19.9 - 0.1 * t)
    betas = schedules.get_beta_schedule('vp', num_steps)
    np.testing.assert_allclose(np.cumprod(1 - betas), abar[1:] / abar[0], rtol=1e-12)
    if num_steps == 2:  # DDGAN's CelebA-HQ betas, uncapped.
        np.testing.assert_allclose(betas, [0.921324, 0.999451], atol=1e-6)


def test_ddgan_sampler_draws_from_the_posterior():
    """Each step x_{i-1} ~ q(x_{i-1} | x_i, x0_hat) (closed-form mean and variance in
    float64, over 8192 draws) and the last step returns x0_hat exactly."""
    sched = schedules.make_schedule('vp', 4)

    def generator(x, t, z):
        return jnp.tanh(0.5 * x + 0.01 * z[:, :1, None, None])

    shape = (8192, 1, 1, 1)
    out, inter = samplers.ddgan_sample(generator, sched, shape, jax.random.key(0),
                                       latent_dim=3, return_intermediates=True)
    x_t, x0_hat = np.asarray(inter['x_t'], np.float64), np.asarray(inter['pred_x0'],
                                                                   np.float64)
    betas = schedules.get_beta_schedule('vp', 4)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    states = np.concatenate([x_t, np.asarray(out, np.float64)[None]])  # x_3, ..., x_0 out.
    for k, i in enumerate(range(3, 0, -1)):  # Steps i = 3, 2, 1 (noise is added).
        coef1 = betas[i] * np.sqrt(abar_prev[i]) / (1 - abar[i])
        coef2 = (1 - abar_prev[i]) * np.sqrt(1 - betas[i]) / (1 - abar[i])
        var = betas[i] * (1 - abar_prev[i]) / (1 - abar[i])
        residual = states[k + 1] - (coef1 * x0_hat[k] + coef2 * x_t[k])
        assert abs(residual.mean()) < 4 * np.sqrt(var / residual.size)
        np.testing.assert_allclose(residual.var(), var, rtol=0.05)
    np.testing.assert_array_equal(states[-1], x0_hat[-1])  # i = 0: x_0 = x0_hat.
    with pytest.raises(ValueError, match='not defined for a GAN'):
        samplers.ddgan_sample(generator, sched, shape, jax.random.key(0), latent_dim=3,
                              cond_fn=lambda x, t: x)


def test_ddgan_sampler_draws_a_fresh_latent_per_step():
    """A generator that outputs its latent: each step's x0_hat is a new N(0, 1) draw."""
    sched = schedules.make_schedule('vp', 4)
    _, inter = samplers.ddgan_sample(
        lambda x, t, z: jnp.broadcast_to(z[:, :1, None, None], x.shape), sched,
        (4096, 1, 1, 1), jax.random.key(1), latent_dim=2, return_intermediates=True,
        clip_denoised=False)
    z = np.asarray(inter['pred_x0'], np.float64)[:, :, 0, 0, 0]  # [steps, batch]
    np.testing.assert_allclose(z.std(axis=1), 1.0, atol=0.05)
    correlation = np.corrcoef(z)
    assert np.abs(correlation - np.eye(4)).max() < 0.1  # Independent across steps.


class _QuadraticCritic(tasks.DDGANTask):
    """D(prev, x_t) = sum(a * prev^2) + sum(x_t): grad_prev D = 2 a prev by hand."""

    def discriminator_logits(self, disc_params, prev, x_t, i, labels):
        a = disc_params['a']
        return jnp.sum(a * prev ** 2, axis=(1, 2, 3)) + jnp.sum(x_t, axis=(1, 2, 3))


def test_r1_penalty_by_hand(gan_config):
    task = _QuadraticCritic(gan_config)
    rng = np.random.default_rng(0)
    prev = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
    x_t = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
    a = np.float32(0.3)
    labels = jnp.zeros((3,), jnp.int32)
    i = jnp.array([0, 1, 3])
    r1 = np.asarray(task.r1_penalty({'a': a}, jnp.asarray(prev), jnp.asarray(x_t), i, labels))
    expected = np.sum((2 * a * prev.astype(np.float64)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(r1, expected, rtol=1e-5)


def test_each_optimiser_moves_only_its_network(gan_config):
    """With the discriminator's learning rate ~0 a step moves only the generator (its
    loss's gradient is applied to it alone); and the discriminator's loss sends no
    gradient into the generator (stop_gradient), so the first phase moves only D."""
    batch = next(data_lib.create_train_iterator(gan_config))
    mesh = _mesh(1)
    task = tasks.create_task(gan_config)
    state = state_lib.create_sharded_train_state(task, jax.random.key(0), mesh)
    global_batch = parallel.to_global(batch, mesh)
    # Perturb D so that G's gradient is far from zero.
    host_state = parallel.to_host(state)
    noise = np.random.default_rng(0)
    host_state = host_state.replace(params=dict(host_state.params, discriminator=jax.tree.map(
        lambda x: x + 0.05 * noise.standard_normal(x.shape).astype(x.dtype),
        host_state.params['discriminator'])))
    before = host_state.params
    for frozen in ('discriminator',):  # One compile; the other way is checked below.
        config = gan_config.copy_and_resolve_references()
        config.gan[f'lr_{frozen}'] = 1e-30  # Adam moves by about lr: nothing.
        frozen_task = tasks.create_task(config)
        step = train.jit_train_step(train.make_train_step_fn(frozen_task, mesh), mesh)
        stepped, _ = step(jax.device_put(host_state, parallel.replicated_sharding(mesh)),
                          global_batch, jax.random.key(2))
        first = parallel.to_host(stepped)
        after = first.params
        # DDGAN's EMA starts at the parameters after the first update (e_1 = p_1), then
        # averages: e_2 = d e_1 + (1 - d) p_2.
        chex.assert_trees_all_equal(first.ema_params[0]['generator'], after['generator'])
        second = parallel.to_host(step(stepped, global_batch, jax.random.key(3))[0])
        d = np.float32(config.optim.ema_decays[0])
        chex.assert_trees_all_close(
            second.ema_params[0]['generator'],
            jax.tree.map(lambda e, p: d * e + (1 - d) * p, after['generator'],
                         second.params['generator']), rtol=1e-6, atol=1e-7)
        assert 0 < d < 1 and not np.allclose(jax.tree.leaves(second.params['generator'])[-1],
                                         jax.tree.leaves(after['generator'])[-1])
        change = {part: max(float(np.abs(x - y).max()) for x, y in zip(
            jax.tree.leaves(before[part]), jax.tree.leaves(after[part]))) for part in before}
        other = 'discriminator' if frozen == 'generator' else 'generator'
        assert change[frozen] < 1e-20 and change[other] > 1e-6, (frozen, change)
    task = tasks.create_task(gan_config)

    @jax.jit  # Compiled once: op by op, this part took longer than the step above.
    def discriminator_phase_grads(batch):
        params = task.init_params(jax.random.key(0))
        examples = task.prepare_batch(batch, jax.random.key(2), jnp.zeros((), jnp.int32))
        return jax.grad(lambda p: task.loss(0, p, examples, jax.random.key(3))[0])(params)

    grads = discriminator_phase_grads({k: jnp.asarray(v) for k, v in batch.items()})
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads['generator'])) == 0.0
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads['discriminator'])) > 0


@pytest.mark.slow
def test_ddgan_resumes_bit_for_bit_and_sharding_matches(gan_config, tmp_path):
    config = gan_config
    trainer = train.Trainer(config, mesh=_mesh(1))
    reference = trainer.train(str(tmp_path / 'ref'))
    trainer.train(str(tmp_path / 'run'), stop_at_step=2)
    resumed = trainer.train(str(tmp_path / 'run'))  # Everything comes back from disk.
    assert int(resumed.task_state) == 4  # Both networks, both optimisers, R1 clock.
    jax.tree.map(np.testing.assert_array_equal, parallel.to_host(resumed),
                 parallel.to_host(reference))
    sharded = train.Trainer(config, mesh=_mesh(4)).train(str(tmp_path / 'four'))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 parallel.to_host(sharded), parallel.to_host(reference))


@pytest.mark.slow
def test_short_digits_run_narrows_the_discriminator_advantage(gan_config, tmp_path):
    """After 40 steps the trained generator's fakes score closer to the real pairs
    under the final discriminator than the initial generator's do; samples from
    sample mode are digit-sized uint8 images that vary."""
    from ddpm_jax import sample_mode
    config = gan_config
    config.train.num_train_steps = 40
    config.train.checkpoint_every_steps = 40
    config.gan.lr_generator = 1e-3
    config.gan.lr_discriminator = 1e-3
    workdir = str(tmp_path / 'run')
    trainer = train.Trainer(config, mesh=_mesh(1))
    initial = trainer.init_state()
    final = trainer.train(workdir)
    task = trainer.task
    batch = next(data_lib.create_train_iterator(config))
    examples = task.prepare_batch({k: jnp.asarray(v) for k, v in batch.items()},
                                  jax.random.key(5), jnp.zeros((), jnp.int32))
    disc = final.params['discriminator']

    def advantage(generator_params):
        params = {'generator': generator_params, 'discriminator': disc}
        fake = task._fake_prev(params, examples, 'd_', jax.random.key(6))  # pylint: disable=protected-access
        args = (examples['d_x_t'], examples['d_i'], examples['label'])
        real = task.discriminator_logits(disc, examples['d_real_prev'], *args)
        return float(jnp.mean(real - task.discriminator_logits(disc, fake, *args)))

    assert advantage(final.params['generator']) < advantage(initial.params['generator'])
    config.sample.num_images = 8
    config.sample.global_batch_size = 8
    result = sample_mode.sample_and_save(config, workdir)
    with np.load(result['npz']) as f:
        images = f['images']
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8
    assert images.std() > 10  # Not blank.


def test_ddgan_config_rules(gan_config):
    gan_config.optim.lr_schedule, gan_config.optim.min_learning_rate = 'cosine', 1e-5
    config_lib.validate(gan_config, num_devices=4)
    for field, value, match in [('sample.sampler', 'ddpm', "sample.sampler='ddgan'"),
                                ('diffusion.mean_type', 'eps', "mean_type='x0'"),
                                ('model.latent_dim', 0, 'model.latent_dim > 0'),
                                ('sample.respacing', '2', 'exactly its training steps'),
                                ('gan.disc_init', 'he', "gan.disc_init='he' must be one of"),
                                ('optim.min_learning_rate', 1.0, 'must be below'),
                                ('optim.lr_schedule', 'constant', "'constant' it must be 0")]:
        config = gan_config.copy_and_resolve_references()
        group, name = field.split('.')
        config[group][name] = value
        with pytest.raises(ValueError, match=match):
            config_lib.validate(config, num_devices=4)


def test_minibatch_stddev_against_numpy():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(8, 3, 3, 5)).astype(np.float32)
    out = np.asarray(ddgan_discriminator.minibatch_stddev(jnp.asarray(h), 4))
    assert out.shape == (8, 3, 3, 6)
    np.testing.assert_array_equal(out[..., :5], h)
    h64 = h.astype(np.float64)
    for b in range(8):  # Example b is grouped with b +- 2, 4, 6 (groups of 4, stride B/4).
        group = h64[b % 2::2]
        expected = np.mean(np.sqrt(np.var(group, axis=0) + 1e-8))
        np.testing.assert_allclose(out[b, ..., 5], expected, rtol=1e-5)
    # A batch of 6 is split into groups of 3, the largest divisor up to 4.
    out6 = np.asarray(ddgan_discriminator.minibatch_stddev(jnp.asarray(h[:6]), 4))
    np.testing.assert_allclose(out6[0, 0, 0, 5],
                               np.mean(np.sqrt(np.var(h64[0:6:2], axis=0) + 1e-8)), rtol=1e-5)


def test_discriminator_logit_depends_on_pair_time_and_label():
    """The small D starts with a near-constant logit (their near-zero second and final
    convs); once its weights move, the logit depends on the pair, t and the label."""
    disc = ddgan_discriminator.DDGANDiscriminator(base_channels=8, channel_mult=(1, 2),
                                                  num_classes=3)
    rng = np.random.default_rng(1)
    pair = jnp.asarray(rng.normal(size=(4, 8, 8, 2)), jnp.float32)
    t, y = jnp.array([0, 1, 2, 3]), jnp.array([0, 1, 2, 0])
    params = disc.init(jax.random.key(0), pair, t, y)
    assert np.abs(np.asarray(disc.apply(params, pair, t, y))).max() < 1e-3
    params = jax.tree.map(lambda w: w + 0.05 * jnp.asarray(
        rng.normal(size=w.shape), w.dtype), params)  # As after some training.
    base = np.asarray(disc.apply(params, pair, t, y))
    assert base.shape == (4,) and np.abs(base).max() > 0.05
    for changed in (disc.apply(params, pair.at[:, :, :, 0].add(0.5), t, y),
                    disc.apply(params, pair, t + 1, y),
                    disc.apply(params, pair, t, (y + 1) % 3)):
        assert np.all(np.abs(np.asarray(changed) - base) > 1e-6)


# --- DDGAN's reference code (NVlabs/denoising-diffusion-gan) --------------------------


def _ddgan_sinusoid(t, dim):
    """score_sde/models/layers.py get_timestep_embedding in float64: [sin, cos] with
    frequencies exp(-ln(1e4) k / (dim/2 - 1))."""
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) / (half - 1) * np.arange(half))
    args = np.asarray(t, np.float64)[:, None] * freqs[None]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def _intermediate(state, *path):
    node = state['intermediates']
    for name in path:
        node = node[name]
    return np.asarray(node['__call__'][0], np.float64)


def test_discriminator_time_embedding_is_ddgans(gan_config):
    """D's embedding is 256 wide (--t_emb_dim's default, gan.disc_temb_dim) and is
    their [sin, cos] sinusoid: temb_0's output is emb(t) W + b by hand."""
    t = np.array([0.0, 1.0, 3.0, 2.5])
    np.testing.assert_allclose(layers.timestep_embedding(jnp.asarray(t), 256, 'ddpm'),
                               _ddgan_sinusoid(t, 256), atol=2e-5)
    disc = tasks.ddgan.create_discriminator(gan_config)
    assert disc.temb_dim == gan_config.gan.disc_temb_dim == 256
    pair = jnp.zeros((4, 8, 8, 2), jnp.float32)
    ti, y = jnp.array([0, 1, 3, 2]), jnp.array([0, 1, 2, 3])
    params = disc.init(jax.random.key(0), pair, ti, y)
    _, state = disc.apply(params, pair, ti, y, capture_intermediates=True,
                          mutable=['intermediates'])
    dense = jax.tree.map(lambda a: np.asarray(a, np.float64), params['params']['temb_0'])
    assert dense['kernel'].shape == (256, 256)
    want = _ddgan_sinusoid(np.asarray(ti), 256) @ dense['kernel'] + dense['bias']
    np.testing.assert_allclose(_intermediate(state, 'temb_0'), want, atol=1e-4)
    adm = np.concatenate(np.split(_ddgan_sinusoid(np.asarray(ti), 256), 2, axis=1)[::-1], 1)
    assert np.abs(_intermediate(state, 'temb_0') - adm @ dense['kernel']).max() > 0.1


@pytest.mark.parametrize('large', [False, True])
def test_discriminator_init_is_ddgans_fan_out_uniform(large):
    """Every kernel is U(-b, b) with b = sqrt(3 scale / fan_out) (dense_layer.py: mode
    'fan_avg' falls through to fan_out), scale 1e-10 for each block's second conv and
    the small D's final conv (init_scale=0), else 1; biases are zero."""
    disc = ddgan_discriminator.DDGANDiscriminator(base_channels=32, channel_mult=(1, 2, 2),
                                                  downsample_first=large)
    params = disc.init(jax.random.key(0), jnp.zeros((1, 16, 16, 2)),
                       jnp.zeros((1,), jnp.int32))['params']
    checked = set()
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [k.key for k in path]
        w = np.asarray(w, np.float64)
        if names[-1] == 'bias':
            assert not w.any(), names
            continue
        near_zero = names[-2] == 'conv_1' or (names[-2] == 'conv_out' and not large)
        fan_out = w.shape[-1] * (np.prod(w.shape[:2]) if w.ndim == 4 else 1)
        bound = np.sqrt(3 * (1e-10 if near_zero else 1.0) / fan_out)
        assert np.abs(w).max() <= bound * (1 + 1e-6), names
        if w.size >= 2048:
            assert np.abs(w).max() > 0.97 * bound, names
            np.testing.assert_allclose(w.var(), bound ** 2 / 3, rtol=0.1, err_msg=str(names))
        checked.add(names[-2])
    assert {'conv_in', 'conv_0', 'conv_1', 'skip', 'temb_proj', 'temb_0', 'temb_1',
            'conv_out', 'logit'} <= checked
    # The 1x1 skip of 32 -> 64 channels: fan_out 64 (PyTorch's default would be fan_in 32).
    skip = np.asarray(params['down_1']['skip']['kernel'])
    assert np.abs(skip).max() > 0.97 * np.sqrt(3 / 64) > 1 / np.sqrt(32)
    logits = disc.apply({'params': params}, jax.random.normal(jax.random.key(1),
                                                              (4, 16, 16, 2)),
                        jnp.arange(4))
    # The small D's logit starts at ~0 for every input; the large one's does not.
    assert (np.abs(np.asarray(logits)).max() > 1e-2) == large


def test_discriminator_adm_init_is_pytorch_default_everywhere():
    """gan.disc_init='adm' (the digits config): every kernel U(+-1/sqrt(fan_in)), no
    near-zero layer, so the small D's first logits already depend on the input."""
    disc = ddgan_discriminator.DDGANDiscriminator(base_channels=32, channel_mult=(1, 2, 2),
                                                  weight_init='adm')
    params = disc.init(jax.random.key(0), jnp.zeros((1, 16, 16, 2)),
                       jnp.zeros((1,), jnp.int32))['params']
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [k.key for k in path]
        w = np.asarray(w, np.float64)
        if names[-1] == 'kernel':
            fan_in = np.prod(w.shape[:-1])
            assert np.abs(w).max() <= (1 + 1e-6) / np.sqrt(fan_in), names
            if w.size >= 2048:
                np.testing.assert_allclose(w.var(), 1 / (3 * fan_in), rtol=0.1,
                                           err_msg=str(names))
    logits = disc.apply({'params': params}, jax.random.normal(jax.random.key(1),
                                                              (4, 16, 16, 2)), jnp.arange(4))
    assert np.abs(np.asarray(logits)).max() > 1e-2
    with pytest.raises(ValueError, match=r"gan.disc_init must be one of \('ddgan', 'adm'\)"):
        ddgan_discriminator.DDGANDiscriminator(weight_init='xavier').init(
            jax.random.key(0), jnp.zeros((1, 16, 16, 2)), jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize('activation', ['silu', 'leaky_relu'])
def test_generator_mapping_network_by_hand(gan_config, activation):
    """z -> pixel norm -> mapping_layers x (dense, activation) -> linear projection, in
    float64 from the parameters; the mapping kernels are U(+-sqrt(3 / fan_out))."""
    gan_config.model.mapping_activation = activation
    model = models.create_model(gan_config)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32)
    t, y = jnp.array([0, 2, 3]), jnp.array([1, 2, 3])
    z = rng.normal(size=(3, 8))
    params = model.init(jax.random.key(0), x, t, y=y, z=jnp.asarray(z, jnp.float32))
    _, state = model.apply(params, x, t, y=y, z=jnp.asarray(z, jnp.float32),
                           capture_intermediates=True, mutable=['intermediates'])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params['params'])
    act = {'silu': lambda v: v / (1 + np.exp(-v)),
           'leaky_relu': lambda v: np.where(v > 0, v, 0.2 * v)}[activation]
    h = z / np.sqrt(np.mean(z ** 2, axis=1, keepdims=True) + 1e-8)
    for k in range(gan_config.model.mapping_layers):
        kernel = p[f'mapping_{k}']['kernel']
        assert np.abs(kernel).max() <= np.sqrt(3 / kernel.shape[1]) * (1 + 1e-6)
        h = act(h @ kernel + p[f'mapping_{k}']['bias'])
    want = h @ p['latent_emb']['kernel'] + p['latent_emb']['bias']
    np.testing.assert_allclose(_intermediate(state, 'latent_emb'), want, rtol=1e-5,
                               atol=1e-6)


def test_generator_output_is_tanh_in_training_and_sampling(gan_config):
    """With model.output_tanh (the DDGAN configs) G's x_0 is tanh of the raw output:
    in the model, in the training step's fake x_{-1} (exactly G's x_0 at step 0) and
    in the sampler's x0 prediction."""
    gan_config.model.output_tanh = True
    task = tasks.create_task(gan_config)
    params = task.init_params(jax.random.key(0))
    g = params['generator']
    kernel = g['conv_out']['kernel']  # Zero at init: give G an output beyond [-1, 1].
    g['conv_out']['kernel'] = 3.0 * jax.random.normal(jax.random.key(1), kernel.shape)
    raw = task.model.clone(output_tanh=False)
    batch = next(data_lib.create_train_iterator(gan_config))
    examples = task.prepare_batch({k: jnp.asarray(v) for k, v in batch.items()},
                                  jax.random.key(2), jnp.zeros((), jnp.int32))
    examples['d_i'] = jnp.zeros_like(examples['d_i'])
    args = (examples['d_x_t'], jnp.zeros_like(examples['d_i']))
    kwargs = dict(y=examples['label'], z=examples['d_z'])
    raw_x0 = np.asarray(raw.apply({'params': g}, *args, **kwargs), np.float64)
    assert np.abs(raw_x0).max() > 2
    np.testing.assert_allclose(task.model.apply({'params': g}, *args, **kwargs),
                               np.tanh(raw_x0), atol=1e-6)
    fake = task._fake_prev(params, examples, 'd_', jax.random.key(3))  # pylint: disable=protected-access
    np.testing.assert_allclose(fake, np.tanh(raw_x0), atol=1e-6)
    _, inter = samplers.ddgan_sample(
        models.make_model_fn(task.model, g), task.sched, (8, 8, 8, 1), jax.random.key(4),
        latent_dim=8, clip_denoised=False, model_kwargs={'y': examples['label']},
        return_intermediates=True)
    pred = np.asarray(inter['pred_x0'])
    assert np.abs(pred).max() <= 1 and np.abs(pred).max() > 0.9  # Not clipped: tanh'd.
    from configs import default
    config = default.get_config()  # A diffusion model: its output is no x_0 in [-1, 1].
    config.model.output_tanh = True
    with pytest.raises(ValueError, match='output_tanh is for a DDGAN generator'):
        config_lib.validate(config, num_devices=1)


def test_cosine_schedule_ends_at_min_learning_rate(gan_config):
    """lr(s) = m + (p - m)(1 + cos(pi s / S)) / 2 (CosineAnnealingLR, eta_min = m = 1e-5)
    for each network's own peak p, in float64; 'linear' ends at m too."""
    gan_config.optim.lr_schedule = 'cosine'
    gan_config.optim.min_learning_rate = 1e-5
    gan_config.train.num_train_steps = 100
    optimizers = tasks.create_task(gan_config).create_optimizers()
    steps = np.array([0, 1, 25, 50, 99, 100, 150])
    for part, peak in (('generator', gan_config.gan.lr_generator),
                       ('discriminator', gan_config.gan.lr_discriminator)):
        want = 1e-5 + (peak - 1e-5) * (1 + np.cos(np.pi * np.minimum(steps, 100) / 100)) / 2
        got = [float(optimizers[part].learning_rate_fn(s)) for s in steps]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    optim = gan_config.optim.copy_and_resolve_references()
    optim.lr_schedule, optim.warmup_steps = 'linear', 10
    lr = state_lib.create_learning_rate_fn(optim, 110)
    np.testing.assert_allclose([float(lr(s)) for s in (4, 10, 60, 110)],
                               [2e-4 * 4 / 10, 2e-4, 1e-5 + (2e-4 - 1e-5) / 2, 1e-5],
                               rtol=1e-6)


def test_records_of_earlier_ddgans_keep_their_networks_or_fail_loudly():
    """A DDGAN record written before the reference match upgrades to what it was
    trained with (leaky-ReLU mapping, no tanh, D embedding 128, decay to 0), so its
    own config rebuilds its networks, and today's config is refused by name; an old
    non-GAN record still matches today's default."""
    from configs import cifar10_ddgan, default
    current = config_lib.to_json_dict(cifar10_ddgan.get_config())
    old = json.loads(json.dumps(current))
    for group, name in (('model', 'mapping_activation'), ('model', 'output_tanh'),
                        ('gan', 'disc_temb_dim'), ('gan', 'disc_init'),
                        ('optim', 'min_learning_rate')):
        del old[group][name]
    upgraded = config_lib.upgrade_json_dict(old)
    assert (upgraded['model']['mapping_activation'], upgraded['model']['output_tanh'],
            upgraded['gan']['disc_temb_dim'], upgraded['gan']['disc_init'],
            upgraded['optim']['min_learning_rate']) == ('leaky_relu', False, 128, 'adm', 0.0)
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r'model.mapping_activation.*; model.output_tanh'):
        checkpointing.check_config_compatible(old, cifar10_ddgan.get_config())
    plain = config_lib.to_json_dict(default.get_config())
    for group, name in (('model', 'mapping_activation'), ('model', 'output_tanh')):
        del plain[group][name]
    checkpointing.check_config_compatible(plain, default.get_config())


def test_fir_downsample_is_upfirdn2d_with_1331():
    """downsample_2d(x, (1, 3, 3, 1), factor=2): zero-pad 1, filter with outer(k, k) / 64,
    keep every second pixel, in float64 NumPy; a constant's interior stays constant."""
    from ddpm_jax.models import resampling
    x = np.random.default_rng(0).normal(size=(2, 8, 6, 3))
    k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros((2, 4, 3, 3))
    for i in range(4):
        for j in range(3):
            window = padded[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4]
            want[:, i, j] = np.einsum('bhwc,hw->bc', window, k)
    got = np.asarray(resampling.downsample_2x(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    flat = np.asarray(resampling.downsample_2x(jnp.ones((1, 8, 8, 1))))[0, ..., 0]
    # Output i reads input rows 2i-1..2i+2: the first and last rows/columns of the output
    # see one padded row (weight 1/8 of the kernel), the corners two.
    np.testing.assert_allclose(flat[1:-1, 1:-1], 1.0, rtol=1e-6)
    np.testing.assert_allclose(flat[[0, -1], 1:-1], 7 / 8, rtol=1e-6)
    np.testing.assert_allclose(flat[0, 0], 49 / 64, rtol=1e-6)


def test_disc_blocks_ddgan_has_their_layout_and_old_records_are_refused():
    """'ddgan' blocks: a skip conv in the first (shape-keeping) block too, so the CIFAR-10
    D has DDGAN's 12,741,633 parameters; 'simple' leaves it out. A record from before
    the field upgrades to 'simple', which today's CIFAR-10 config refuses by name."""
    from configs import cifar10_ddgan
    from ddpm_jax.tasks import ddgan as ddgan_task
    config = cifar10_ddgan.get_config()
    x = jnp.zeros((1, 32, 32, 6))

    def count(blocks):
        config.gan.disc_blocks = blocks
        disc = ddgan_task.create_discriminator(config)
        shapes = jax.eval_shape(
            lambda: disc.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32)))
        return sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(shapes))

    assert count('ddgan') == 12_741_633 and count('ddgan') - count('simple') == 128 * 128
    old = config_lib.to_json_dict(cifar10_ddgan.get_config())
    del old['gan']['disc_blocks']
    assert config_lib.upgrade_json_dict(old)['gan']['disc_blocks'] == 'simple'
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r"gan.disc_blocks: checkpoint='simple', config='ddgan'"):
        checkpointing.check_config_compatible(old, cifar10_ddgan.get_config())
