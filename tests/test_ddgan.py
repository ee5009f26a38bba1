"""Tests for the denoising diffusion GAN (ddpm_jax.tasks.ddgan, samplers.ddgan_sample,
the 'vp' schedule): closed forms in float64, R1 by hand, the two optimisers kept apart,
exact resume and sharding through the generic trainer, and a short digits run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import config_lib, parallel, samplers, schedules
from ddpm_jax import data as data_lib
from ddpm_jax import state as state_lib
from ddpm_jax import tasks, train
from ddpm_jax.models import ddgan_discriminator


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
        after, _ = step(jax.device_put(host_state, parallel.replicated_sharding(mesh)),
                        global_batch, jax.random.key(2))
        after = parallel.to_host(after.params)
        change = {part: max(float(np.abs(x - y).max()) for x, y in zip(
            jax.tree.leaves(before[part]), jax.tree.leaves(after[part]))) for part in before}
        other = 'discriminator' if frozen == 'generator' else 'generator'
        assert change[frozen] < 1e-20 and change[other] > 1e-6, (frozen, change)
    task = tasks.create_task(gan_config)
    params = task.init_params(jax.random.key(0))
    examples = task.prepare_batch({k: jnp.asarray(v) for k, v in batch.items()},
                                  jax.random.key(2), jnp.zeros((), jnp.int32))
    grads = jax.grad(lambda p: task.loss(0, p, examples, jax.random.key(3))[0])(params)
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
    config_lib.validate(gan_config, num_devices=4)
    for field, value, match in [('sample.sampler', 'ddpm', "sample.sampler='ddgan'"),
                                ('diffusion.mean_type', 'eps', "mean_type='x0'"),
                                ('model.latent_dim', 0, 'model.latent_dim > 0'),
                                ('sample.respacing', '2', 'exactly its training steps')]:
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
    disc = ddgan_discriminator.DDGANDiscriminator(base_channels=8, channel_mult=(1, 2),
                                                  num_classes=3)
    rng = np.random.default_rng(1)
    pair = jnp.asarray(rng.normal(size=(4, 8, 8, 2)), jnp.float32)
    t, y = jnp.array([0, 1, 2, 3]), jnp.array([0, 1, 2, 0])
    params = disc.init(jax.random.key(0), pair, t, y)
    base = np.asarray(disc.apply(params, pair, t, y))
    assert base.shape == (4,) and np.abs(base).max() > 0.05  # No zero-initialised head.
    for changed in (disc.apply(params, pair.at[:, :, :, 0].add(0.5), t, y),
                    disc.apply(params, pair, t + 1, y),
                    disc.apply(params, pair, t, (y + 1) % 3)):
        assert np.all(np.abs(np.asarray(changed) - base) > 1e-6)
