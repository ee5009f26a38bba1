"""Tests for the first-stage autoencoder (ddpm_jax.models.autoencoder,
ddpm_jax.autoencoder_losses, ddpm_jax.tasks.autoencoder): shapes for each f, the KL
and hinge terms against float64 NumPy, the VQ straight-through gradient and codebook
update, the adaptive weight against the full-model gradient, and a short digits run."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax import autoencoder_losses as ae_losses
from ddpm_jax import data as data_lib
from ddpm_jax import parallel, tasks, train
from ddpm_jax.models import autoencoder as ae_lib

from configs import default


def ae_config(config, kind='kl'):
    """A tiny autoencoder config: 8x8 digits, width 8, f = 2, a one-layer D."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.task = 'autoencoder'
    config.data.image_size = 8
    config.optim.ema_decays = (0.9,)
    config.train.global_batch_size = 8
    config.train.num_train_steps = 4
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 2
    config.train.num_grid_samples = 4
    config.model.attention_resolutions = ()
    a = config.autoencoder
    a.kind = kind
    a.base_channels = 8
    a.channel_mult = (1, 2)
    a.num_res_blocks = 1
    a.z_channels = 2
    a.num_groups = 4
    a.codebook_size = 16
    a.disc_base_channels = 8
    a.disc_num_layers = 1
    a.disc_num_groups = 4
    a.disc_start = 2
    config.optim.b1, config.optim.b2 = 0.5, 0.9
    config.optim.learning_rate = 2e-3
    return config


@pytest.mark.parametrize('kind', ae_lib.KINDS)
@pytest.mark.parametrize('levels', [3, 4, 5])  # f = 4, 8, 16.
def test_latent_and_reconstruction_shapes_for_each_f(kind, levels):
    model = ae_lib.Autoencoder(kind=kind, base_channels=8, channel_mult=(1,) * levels,
                               num_res_blocks=1, attention_resolutions=(16,), z_channels=3,
                               codebook_size=8, num_groups=4, out_channels=3)
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    side = 32 // 2 ** (levels - 1)
    recon, terms = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert recon.shape == (2, 32, 32, 3)
    assert terms['z'].shape == (2, side, side, 3)
    latent = jax.eval_shape(lambda v: model.apply(v, x, method=model.encode), variables)
    first = latent[0] if kind == 'kl' else latent
    assert first.shape == (2, side, side, 3)
    decoded = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, side, side, 3)),
                                                   method=model.decode_latents), variables)
    assert decoded.shape == (2, 32, 32, 3)
    assert ae_lib.latent_shape(32, model) == (side, side, 3)


def test_kl_against_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 2, 2, 4))
    logvar = rng.normal(size=(3, 2, 2, 4))
    got = np.asarray(ae_losses.kl_standard_normal(jnp.asarray(mean, jnp.float32),
                                                  jnp.asarray(logvar, jnp.float32)))
    for b in range(3):
        mu, var = mean[b].ravel(), np.exp(logvar[b].ravel())
        # KL(N(mu, S) || N(0, I)) = (tr S + mu'mu - k - log det S) / 2.
        want = 0.5 * (var.sum() + mu @ mu - mu.size - np.log(var).sum())
        np.testing.assert_allclose(got[b], want, rtol=1e-5)
    assert float(ae_losses.kl_standard_normal(jnp.zeros((1, 2)), jnp.zeros((1, 2)))[0]) == 0
    clipped = ae_losses.clip_logvar(jnp.array([-100.0, 0.0, 100.0]))
    np.testing.assert_array_equal(clipped, [-30.0, 0.0, 20.0])


def test_hinge_and_generator_losses_by_hand():
    real = np.array([[2.0, 0.5], [-1.0, 1.0]]).reshape(2, 1, 2, 1)
    fake = np.array([[-2.0, 0.0], [0.5, -0.5]]).reshape(2, 1, 2, 1)
    d = np.asarray(ae_losses.hinge_discriminator_loss(jnp.asarray(real), jnp.asarray(fake)))
    want = [0.5 * (np.mean([0.0, 0.5]) + np.mean([0.0, 1.0])),
            0.5 * (np.mean([2.0, 0.0]) + np.mean([1.5, 0.5]))]
    np.testing.assert_allclose(d, want, rtol=1e-6)
    g = np.asarray(ae_losses.generator_adversarial_loss(jnp.asarray(fake)))
    np.testing.assert_allclose(g, [1.0, 0.0], atol=1e-7)


def test_vq_straight_through_gradient_and_codebook_update():
    codebook = jnp.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0], [5.0, 5.0]])
    z = jnp.array([[[[0.2, -0.1], [0.9, 1.3]], [[-0.8, 1.7], [0.1, 0.1]]]])  # [1, 2, 2, 2]
    z_q, codes = ae_losses.quantize(z, codebook)
    np.testing.assert_array_equal(codes, [[[0, 1], [2, 0]]])
    np.testing.assert_array_equal(z_q, np.asarray(codebook)[np.asarray(codes)])
    # Straight-through: the value of z_q, the gradient of the identity in z.
    weights = jax.random.normal(jax.random.key(0), z.shape)
    st = ae_losses.straight_through(z, z_q)
    np.testing.assert_allclose(st, z_q, atol=1e-7)
    grad = jax.grad(lambda z: jnp.sum(weights * ae_losses.straight_through(z, z_q)))(z)
    np.testing.assert_allclose(grad, weights, rtol=1e-6)

    def codebook_loss(book):
        q, _ = ae_losses.quantize(z, book)
        return jnp.sum(ae_losses.vq_losses(z, q, beta=0.25)['vq'])

    g = np.asarray(jax.grad(codebook_loss)(codebook))
    zs, c = np.asarray(z).reshape(-1, 2), np.asarray(codes).ravel()
    want = np.zeros((4, 2))
    for vec, k in zip(zs, c):  # d/d e_k of mean_n ||z_n - e_k||^2 over the 8 elements.
        want[k] += 2.0 * (np.asarray(codebook)[k] - vec) / zs.size
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    assert not g[3].any()  # An unused code gets no gradient.
    moved = codebook - 0.5 * g  # One SGD step pulls each used code to its inputs.
    for k in (0, 1, 2):
        inputs = zs[c == k]
        before = np.sum((inputs - np.asarray(codebook)[k]) ** 2)
        assert np.sum((inputs - np.asarray(moved)[k]) ** 2) < before
    # Commitment: beta * mean ||z - sg(z_q)||^2 moves z only.
    commit = jax.grad(lambda z: jnp.sum(ae_losses.vq_losses(z, z_q, 0.25)['commitment']))(z)
    np.testing.assert_allclose(commit, 0.25 * 2 * (z - z_q) / z.size, rtol=1e-5)
    perplexity, used = ae_losses.codebook_usage(codes, 4)
    p = np.array([2, 1, 1, 0]) / 4
    np.testing.assert_allclose(perplexity, np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))),
                               rtol=1e-6)
    assert float(used) == 0.75


@pytest.fixture(scope='module')
def tiny_task():
    """The tiny KL autoencoder task and random parameters of its shapes."""
    task = tasks.create_task(ae_config(default.get_config()))
    rng = np.random.default_rng(0)  # Drawn on the host: no init program to compile.
    shapes = jax.eval_shape(task.init_params, jax.random.key(0))
    return task, jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32),
                              shapes)


def test_adaptive_weight_matches_the_full_model_gradients(tiny_task):
    """The task's lambda (from the split decoder) against gradients of the whole model."""
    task, params = tiny_task
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(2), (4, 4, 4, 2))

    def losses(ae_params):
        x_rec, _ = task.autoencoder.apply({'params': ae_params}, x, noise)
        rec = jnp.mean(ae_losses.l1_reconstruction(x, x_rec))
        adv = jnp.mean(ae_losses.generator_adversarial_loss(
            task.discriminator.apply({'params': params['discriminator']}, x_rec)))
        return rec, adv

    @jax.jit
    def both(p):
        got = task.adaptive_weight(p, x, task.reconstruct(p['autoencoder'], x, noise)[0])
        kernel = lambda g: g['decoder']['conv_out']['kernel']
        return (got, kernel(jax.grad(lambda q: losses(q)[0])(p['autoencoder'])),
                kernel(jax.grad(lambda q: losses(q)[1])(p['autoencoder'])))

    got, rec_grad, adv_grad = parallel.to_host(both(params))
    want = (np.linalg.norm(rec_grad.astype(np.float64))
            / (np.linalg.norm(adv_grad.astype(np.float64)) + 1e-4))
    assert 0 < want < 1e4
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # Clipped to [0, 1e4] and detached.
    assert float(ae_losses.adaptive_weight(jnp.ones(3), jnp.zeros(3))) == 1e4
    assert float(jax.grad(lambda s: ae_losses.adaptive_weight(s * jnp.ones(3),
                                                              jnp.ones(3)))(2.0)) == 0.0


def test_adversarial_terms_switch_on_at_disc_start(tiny_task):
    task, params = tiny_task
    batch = {'image': jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1),
             'label': jnp.zeros((4,), jnp.int32)}

    @jax.jit
    def losses(step):
        state = {**task.init_task_state(), 'step': step}
        examples = task.prepare_batch(batch, jax.random.key(2), state)
        _, g_terms = task.loss(0, params, examples, jax.random.key(3))
        d_loss, _ = task.loss(1, params, examples, jax.random.key(3))
        return g_terms['d_weight'], d_loss

    for step, on in ((1, False), (2, True)):  # autoencoder.disc_start = 2.
        d_weight, d_loss = losses(jnp.asarray(step, jnp.int32))
        assert bool(np.all(np.asarray(d_weight) > 0)) == on
        assert (float(d_loss) > 0) == on
    # D's hinge loss of a fresh D (logits near 0) is near 1.
    assert 0.5 < float(d_loss) < 1.5


def test_vq_task_logs_codebook_usage():
    task = tasks.create_task(ae_config(default.get_config(), kind='vq'))
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(task.init_params, jax.random.key(0))
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    batch = {'image': jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1),
             'label': jnp.zeros((4,), jnp.int32)}

    @jax.jit
    def terms():
        examples = task.prepare_batch(batch, jax.random.key(2), task.init_task_state())
        _, latent = task.reconstruct(params['autoencoder'], batch['image'])
        return task.loss(0, params, examples, jax.random.key(3))[1], latent['codes']

    out, codes = parallel.to_host(terms())
    counts = np.bincount(codes.ravel(), minlength=16) / codes.size
    nonzero = counts[counts > 0]
    np.testing.assert_allclose(out['perplexity'], np.exp(-np.sum(nonzero * np.log(nonzero))),
                               rtol=1e-5)
    assert out['codebook_usage'][0] == np.mean(counts > 0)
    np.testing.assert_allclose(out['commitment'], 0.25 * out['codebook'], rtol=1e-5)


@pytest.mark.slow
def test_short_digits_run_improves_reconstructions(tiny_config):
    config = ae_config(tiny_config)
    config.train.global_batch_size = 32
    config.autoencoder.disc_start = 1000
    task = tasks.create_task(config)
    mesh = parallel.create_mesh(jax.devices()[:1])
    trainer = train.Trainer(config, mesh=mesh, task=task)
    step = trainer.train_step
    state = trainer.init_state()
    images, _ = data_lib.load_digits('test')
    x = jnp.asarray(images[:32], jnp.float32)  # Held-out digits.

    @jax.jit
    def error(params):
        recon, _ = task.autoencoder.apply({'params': params['autoencoder']}, x)
        return jnp.mean(jnp.abs(recon - x))

    before = float(error(state.params))
    iterator = data_lib.create_train_iterator(config)
    rng = jax.random.key(0)
    for _ in range(40):
        state, metrics = step(state, parallel.to_global(next(iterator), mesh), rng)
    iterator.close()
    after = float(error(state.params))
    assert after < 0.6 * before, (before, after)
    assert int(state.task_state['step']) == 40
    # The grid's images are the first batch's, and the grid shows them and their
    # reconstructions, alternating rows.
    grid, columns = task.make_grid_fn(mesh)(state.ema_params[0], state.task_state)
    n = config.train.num_grid_samples
    assert grid.shape == (2 * n, 8, 8, 1) and columns == n
    np.testing.assert_array_equal(grid[:n], np.asarray(state.task_state['grid_images']))
    assert np.abs(grid[n:]).max() <= 1.0
    assert float(metrics['finite']) == 1.0


def test_config_rules(tiny_config, tmp_path):
    config = ae_config(tiny_config)
    tasks.TASKS['autoencoder'].validate_config(config)
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.autoencoder.lpips_weights_path = str(tmp_path / 'vgg_lpips.npz')
    with pytest.raises(ValueError, match='autoencoder.lpips_weights_path'):
        tasks.TASKS['autoencoder'].validate_config(bad)
    for field, value, match in (('kind', 'gumbel', 'autoencoder.kind'),
                                ('disc_num_layers', 3, 'autoencoder.disc_num_layers'),
                                ('channel_mult', (1, 1, 1, 1, 1), 'downsampling factor'),
                                ('kl_weight', -1.0, 'autoencoder.kl_weight')):
        bad = ml_collections.ConfigDict(config.to_dict())
        bad.autoencoder[field] = value
        with pytest.raises(ValueError, match=match):
            tasks.TASKS['autoencoder'].validate_config(bad)
