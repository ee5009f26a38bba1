"""Tests for the first-stage autoencoder (ddpm_jax.models.autoencoder,
ddpm_jax.autoencoder_losses, ddpm_jax.tasks.autoencoder): shapes for each f, the KL
and hinge terms and the sum/mean reconstruction reductions against float64 NumPy,
the VQ straight-through gradient and taming's legacy codebook/commitment weights, the
codebook's U(-1/K, 1/K) init, the adaptive weight against the full-model gradient,
the VQ task's loss at taming's scale, a short digits run, and the LPIPS perceptual
term (its loss, gradients, frozen constants, rules and resume)."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from ddpm_jax import autoencoder_losses as ae_losses
from ddpm_jax import checkpointing, config_lib, parallel, tasks, train
from ddpm_jax import data as data_lib
from ddpm_jax import state as state_lib
from ddpm_jax import torch_checkpoint
from ddpm_jax.models import autoencoder as ae_lib
from ddpm_jax.models import lpips as lpips_lib

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

    def codebook_loss(book, legacy):
        q, _ = ae_losses.quantize(z, book)
        return jnp.sum(ae_losses.vq_losses(z, q, beta=0.25, legacy=legacy)['vq'])

    zs, c = np.asarray(z).reshape(-1, 2), np.asarray(codes).ravel()
    want = np.zeros((4, 2))
    for vec, k in zip(zs, c):  # d/d e_k of mean_n ||z_n - e_k||^2 over the 8 elements.
        want[k] += 2.0 * (np.asarray(codebook)[k] - vec) / zs.size
    # taming's legacy form (LDM's default) puts beta on the codebook term; the
    # paper's form (legacy=False) gives it weight 1.
    for legacy, weight in ((True, 0.25), (False, 1.0)):
        g = np.asarray(jax.grad(codebook_loss)(codebook, legacy))
        np.testing.assert_allclose(g, weight * want, rtol=1e-5, atol=1e-7)
    assert not g[3].any()  # An unused code gets no gradient.
    moved = codebook - 0.5 * g  # One SGD step pulls each used code to its inputs.
    for k in (0, 1, 2):
        inputs = zs[c == k]
        before = np.sum((inputs - np.asarray(codebook)[k]) ** 2)
        assert np.sum((inputs - np.asarray(moved)[k]) ** 2) < before
    # Commitment mean ||z - sg(z_q)||^2 moves z only: weight 1 in the legacy form
    # (the quantiser's loss as a whole moves z by the same), beta in the paper's.
    d = np.asarray(z, np.float64) - np.asarray(z_q, np.float64)
    for legacy, weight in ((True, 1.0), (False, 0.25)):
        for term in ('commitment', 'vq'):
            commit = jax.grad(lambda z: jnp.sum(
                ae_losses.vq_losses(z, z_q, 0.25, legacy=legacy)[term]))(z)
            np.testing.assert_allclose(commit, weight * 2 * d / d.size, rtol=1e-5)
    # The values: taming's mean((z_q.detach() - z)**2) + beta * mean((z_q - z.detach())**2).
    m = np.mean(d ** 2)
    terms = ae_losses.vq_losses(z, z_q, 0.25)
    np.testing.assert_allclose(terms['commitment'], [m], rtol=1e-6)
    np.testing.assert_allclose(terms['codebook'], [0.25 * m], rtol=1e-6)
    np.testing.assert_allclose(terms['vq'], [1.25 * m], rtol=1e-6)
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


def test_codebook_init_is_tamings_symmetric_uniform():
    """U(-1/K, 1/K) (taming's VectorQuantizer2), not Flax's uniform(2/K) = U[0, 2/K)."""
    k = 4096
    model = ae_lib.Autoencoder(kind='vq', base_channels=8, channel_mult=(1, 2),
                               num_res_blocks=1, z_channels=3, codebook_size=k,
                               num_groups=4, out_channels=1)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)),
                        method=ae_lib.Autoencoder.quantize)['params']
    book = np.asarray(params['codebook'], np.float64) * k  # U(-1, 1) if right.
    assert book.shape == (k, 3)
    assert book.min() >= -1 and book.max() <= 1
    assert book.min() < -0.99 and book.max() > 0.99
    # Mean 0 and variance 1/3 of U(-1, 1); the standard errors over 12,288 draws are
    # 0.0052 and 0.0027.
    assert abs(book.mean()) < 0.02
    np.testing.assert_allclose(np.mean(book ** 2), 1 / 3, rtol=0.05)
    assert abs(np.mean(book < 0) - 0.5) < 0.02


def test_torch_init_is_ldms_pytorch_defaults(tiny_config):
    """autoencoder.init='torch': every autoencoder kernel and bias in U(+-1/sqrt(fan_in))
    (attention output projections too, not zero), norms and the codebook as before; the
    discriminator keeps its N(0, 0.02) kernels and draws its biases at that bound."""
    config = ae_config(tiny_config, kind='vq')
    ddpm = tasks.create_task(config).init_params(jax.random.key(0))
    config.autoencoder.init = 'torch'
    tasks.TASKS['autoencoder'].validate_config(config)
    torch = tasks.create_task(config).init_params(jax.random.key(0))
    flat_d, flat_t = (traverse_util.flatten_dict(p['autoencoder'], sep='/')
                      for p in (ddpm, torch))
    proj_outs = 0
    for path, value in flat_t.items():
        name = path.rsplit('/', 1)[-1]
        if name in ('kernel', 'bias') and path.rsplit('/', 1)[0] + '/kernel' in flat_t:
            kernel = flat_t[path.rsplit('/', 1)[0] + '/kernel']
            bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
            v = np.abs(np.asarray(value))
            assert v.max() <= bound and (v.size < 8 or v.max() > 0.5 * bound), path
            assert not np.array_equal(value, flat_d[path]), path
            proj_outs += 'proj_out' in path and name == 'kernel'
        else:
            np.testing.assert_array_equal(value, flat_d[path])  # Norms, the codebook.
    assert proj_outs >= 2  # The encoder's and decoder's mid attention.
    big = max((v for p, v in flat_t.items() if p.endswith('kernel')), key=np.size)
    bound = 1 / np.sqrt(np.prod(big.shape[:-1]))
    np.testing.assert_allclose(np.var(np.asarray(big, np.float64)) * 3 / bound ** 2, 1.0,
                               atol=6 * np.sqrt(0.8 / big.size))
    disc_d, disc_t = (traverse_util.flatten_dict(p['discriminator'], sep='/')
                      for p in (ddpm, torch))
    biases = [p for p in disc_t if p.endswith('bias') and p[:-4] + 'kernel' in disc_t]
    assert biases and all(np.any(disc_t[p]) and not np.any(disc_d[p]) for p in biases)
    for path in disc_t:
        if path not in biases:
            np.testing.assert_array_equal(disc_t[path], disc_d[path])


def test_reconstruction_reductions_against_numpy():
    """'sum' (LDM's KL loss) and 'mean' (taming's VQ loss) over pixels, with LPIPS."""
    rng = np.random.default_rng(0)
    x, x_rec = rng.uniform(-1, 1, size=(2, 3, 4, 5, 3))
    p = rng.uniform(0, 1, size=3)
    l1 = np.abs(x - x_rec).reshape(3, -1)
    args = [jnp.asarray(a, jnp.float32) for a in (x, x_rec, p)]
    np.testing.assert_allclose(ae_losses.l1_reconstruction(*args[:2]), l1.sum(1), rtol=1e-5)
    np.testing.assert_allclose(ae_losses.l1_reconstruction(*args[:2], 'mean'), l1.mean(1),
                               rtol=1e-5)
    # taming: torch.mean(|x - x_rec| + w * p) broadcasts p over the 60 pixels.
    np.testing.assert_allclose(ae_losses.perceptual_reconstruction(*args, 0.5, 'mean'),
                               np.mean(np.abs(x - x_rec) + 0.5 * p[:, None, None, None],
                                       axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(ae_losses.perceptual_reconstruction(*args, 0.5),
                               l1.sum(1) + 0.5 * 60 * p, rtol=1e-5)
    with pytest.raises(ValueError, match='reduction'):
        ae_losses.l1_reconstruction(*args[:2], 'max')


def test_vq_task_has_tamings_loss_scale_and_logs_codebook_usage():
    """taming's VQLPIPSWithDiscriminator: mean |x - x_rec| over all pixels + the legacy
    quantiser loss (weight 1) + disc_weight * lambda * g, lambda from the gradients of
    that mean, against the whole model's gradients in float64."""
    config = ae_config(default.get_config(), kind='vq')
    config.autoencoder.disc_weight = 0.75
    task = tasks.create_task(config)
    assert task.reduction == 'mean'
    params = random_params(task, seed=1)
    batch = {'image': jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1),
             'label': jnp.zeros((4,), jnp.int32)}
    x = batch['image']

    def rec_and_adv(ae):
        x_rec, _ = task.autoencoder.apply({'params': ae}, x)
        rec = jnp.mean(jnp.abs(x - x_rec))  # taming: torch.mean(rec_loss).
        adv = -jnp.mean(task.discriminator.apply({'params': params['discriminator']}, x_rec))
        return rec, adv

    @jax.jit
    def run():
        state = {**task.init_task_state(), 'step': jnp.asarray(2, jnp.int32)}  # disc_start.
        examples = task.prepare_batch(batch, jax.random.key(2), state)
        x_rec, latent = task.autoencoder.apply({'params': params['autoencoder']}, x)
        kernel = lambda g: g['decoder']['conv_out']['kernel']  # noqa: E731
        return (task.loss(0, params, examples, jax.random.key(3))[1], x_rec, latent,
                kernel(jax.grad(lambda q: rec_and_adv(q)[0])(params['autoencoder'])),
                kernel(jax.grad(lambda q: rec_and_adv(q)[1])(params['autoencoder'])))

    out, x_rec, latent, rec_grad, adv_grad = parallel.to_host(run())
    l1 = np.mean(np.abs(np.asarray(x, np.float64) - x_rec), axis=(1, 2, 3))
    m = np.mean((latent['z'].astype(np.float64) - latent['z_q']) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(out['rec_l1'], l1, rtol=1e-5)
    np.testing.assert_allclose(out['commitment'], m, rtol=1e-5)
    np.testing.assert_allclose(out['codebook'], 0.25 * m, rtol=1e-5)
    lam = np.linalg.norm(rec_grad.astype(np.float64)) / (
        np.linalg.norm(adv_grad.astype(np.float64)) + 1e-4)
    assert 0 < lam < 1e4
    np.testing.assert_allclose(out['d_weight'], 0.75 * lam, rtol=1e-4)
    g = -np.mean(task.discriminator.apply({'params': params['discriminator']},
                                          jnp.asarray(x_rec)), axis=(1, 2, 3))
    np.testing.assert_allclose(out['g_loss'], g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out['loss'], l1 + 1.25 * m + 0.75 * lam * g, rtol=1e-4,
                               atol=1e-7)
    codes = latent['codes']
    counts = np.bincount(codes.ravel(), minlength=16) / codes.size
    nonzero = counts[counts > 0]
    np.testing.assert_allclose(out['perplexity'], np.exp(-np.sum(nonzero * np.log(nonzero))),
                               rtol=1e-5)
    assert out['codebook_usage'][0] == np.mean(counts > 0)


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
    bad.autoencoder.lpips_weights_path = str(tmp_path / 'vgg.pth')
    with pytest.raises(ValueError, match='autoencoder.lpips_weights_path'):
        tasks.TASKS['autoencoder'].validate_config(bad)
    for field, value, match in (('kind', 'gumbel', 'autoencoder.kind'),
                                ('disc_num_layers', 3, 'autoencoder.disc_num_layers'),
                                ('channel_mult', (1, 1, 1, 1, 1), 'downsampling factor'),
                                ('kl_weight', -1.0, 'autoencoder.kl_weight'),
                                ('init', 'kaiming', r"autoencoder.init='kaiming'"),
                                ('lpips_dropout', 1.0, r'autoencoder.lpips_dropout=1.0')):
        bad = ml_collections.ConfigDict(config.to_dict())
        bad.autoencoder[field] = value
        with pytest.raises(ValueError, match=match):
            tasks.TASKS['autoencoder'].validate_config(bad)


# --- the LPIPS perceptual term -----------------------------------------------------------


@pytest.fixture(scope='module')
def lpips_files(tmp_path_factory):
    """(vgg.pth, VGG16 .pth) of random weights in torch's format (He-scaled VGG16)."""
    root = tmp_path_factory.mktemp('lpips_weights')
    rng = np.random.default_rng(0)
    vgg = {}
    for name, (_, shape) in lpips_lib.torch_vgg16_names().items():
        std = np.sqrt(2.0 / np.prod(shape[1:])) if len(shape) == 4 else 0.05
        vgg[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    lins = {name: rng.uniform(0, 0.2, shape).astype(np.float32)
            for name, (_, shape) in lpips_lib.torch_lin_names().items()}
    torch_checkpoint.save_state_dict(root / 'vgg16.pth', vgg)
    torch_checkpoint.save_state_dict(root / 'vgg.pth', lins)
    return str(root / 'vgg.pth'), str(root / 'vgg16.pth')


def perceptual_config(config, files, kind='kl'):
    """ae_config at 16x16 (LPIPS' smallest size) with the perceptual term on."""
    config = ae_config(config, kind)
    config.data.image_size = 16
    config.autoencoder.lpips_weights_path, config.autoencoder.vgg16_weights_path = files
    config.autoencoder.perceptual_weight = 0.5
    return config


def random_params(task, seed=0):
    rng = np.random.default_rng(seed)  # Drawn on the host: no init program to compile.
    shapes = jax.eval_shape(task.init_params, jax.random.key(0))
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def perceptual_examples(task):
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1), minval=-1, maxval=1)
    return task.prepare_batch({'image': x, 'label': jnp.zeros((4,), jnp.int32)},
                              jax.random.key(2), task.init_task_state())


def lpips_distance(lpips_params, x, x_rec, key, rate=0.5):
    """LPIPS(x, x_rec) with its training dropout drawn from `key` (None: none)."""
    model = lpips_lib.LPIPS()
    f0, f1 = (model.apply({'params': lpips_params}, v, method=lpips_lib.LPIPS.features)
              for v in (x, x_rec))
    return model.apply({'params': lpips_params}, f0, f1, key, rate,
                       method=lpips_lib.LPIPS.distance)


def test_perceptual_term_is_ldms_sum_and_its_gradient_reaches_the_autoencoder(lpips_files):
    config = perceptual_config(default.get_config(), lpips_files)
    task = tasks.create_task(config)
    params, examples = random_params(task), perceptual_examples(task)
    x = examples['image']

    key = jax.random.key(7)  # The loss's key: LPIPS's training dropout (0.5, LDM's).

    @jax.jit
    def run(p, lpips_params):
        (loss, terms), grads = jax.value_and_grad(
            lambda q: task.loss(0, q, examples, key), has_aux=True)(p)
        # Independently: the reconstruction and its LPIPS (parameters as arguments).
        x_rec, latent = task.autoencoder.apply({'params': p['autoencoder']}, x,
                                               examples['noise'])
        d = lpips_distance(lpips_params, x, x_rec, key)
        return loss, terms, grads, x_rec, latent, d

    loss, terms, grads, x_rec, latent, d = parallel.to_host(run(params, task.lpips_params))
    np.testing.assert_allclose(terms['lpips'], d, rtol=1e-5)
    undropped = np.asarray(lpips_distance(task.lpips_params, x, x_rec, None))
    assert np.all(np.abs(d - undropped) > 1e-4 * undropped)  # The dropout is on.
    assert np.all(d > 0) and np.isfinite(loss)
    # LDM: sum over the 16 x 16 x 1 pixels of (|x - x_rec| + 0.5 LPIPS), plus the KL.
    l1 = np.sum(np.abs(np.asarray(x, np.float64) - x_rec), axis=(1, 2, 3))
    kl = 0.5 * np.sum(latent['mean'].astype(np.float64) ** 2 + np.exp(latent['logvar'])
                      - 1 - latent['logvar'], axis=(1, 2, 3))
    want = l1 + 0.5 * 256 * d + 1e-6 * kl
    np.testing.assert_allclose(terms['loss'], want, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(want), rtol=1e-5)
    np.testing.assert_allclose(terms['rec_l1'], l1 / 256, rtol=1e-5)
    # The gradient reaches the encoder and the decoder; the LPIPS constants are no
    # parameters: the same parameter, optimiser and task-state trees (so the same
    # checkpoints) as without the term.
    for part in ('encoder', 'decoder'):
        leaves = jax.tree.leaves(grads['autoencoder'][part])
        assert all(np.all(np.isfinite(g)) for g in leaves)
        assert sum(np.sum(np.square(g)) for g in leaves) > 0, part
    plain = tasks.create_task(perceptual_config(default.get_config(), ('', '')))
    assert plain.lpips_params is None
    mesh = parallel.create_mesh(jax.devices()[:1])
    with_term = state_lib.create_abstract_train_state(task, mesh)
    without = state_lib.create_abstract_train_state(plain, mesh)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
    assert shapes(with_term) == shapes(without)
    assert set(with_term.params) == {'autoencoder', 'discriminator'}


@pytest.mark.slow
def test_adaptive_weight_includes_the_perceptual_term(lpips_files):
    """lambda from the task against gradients of the whole model's LDM losses, with the
    loss's LPIPS dropout mask (LDM differentiates the very nll_loss it adds up)."""
    config = perceptual_config(default.get_config(), lpips_files)
    config.autoencoder.disc_start = 0
    task = tasks.create_task(config)
    params, examples = random_params(task), perceptual_examples(task)
    x, noise = examples['image'], examples['noise']

    key = jax.random.key(8)  # One LPIPS dropout mask for the loss and for lambda.

    @jax.jit
    def run(p, lpips_params):
        terms = task.loss(0, p, examples, key)[1]

        def rec_and_adv(ae):
            x_rec, _ = task.autoencoder.apply({'params': ae}, x, noise)
            d = lpips_distance(lpips_params, x, x_rec, key)
            rec = jnp.mean(jnp.sum(jnp.abs(x - x_rec), axis=(1, 2, 3)) + 0.5 * 256 * d)
            adv = -jnp.mean(task.discriminator.apply({'params': p['discriminator']}, x_rec))
            return rec, adv

        kernel = lambda g: g['decoder']['conv_out']['kernel']  # noqa: E731
        return (terms, kernel(jax.grad(lambda q: rec_and_adv(q)[0])(p['autoencoder'])),
                kernel(jax.grad(lambda q: rec_and_adv(q)[1])(p['autoencoder'])))

    terms, rec_grad, adv_grad = parallel.to_host(run(params, task.lpips_params))
    lam = np.linalg.norm(rec_grad.astype(np.float64)) / (
        np.linalg.norm(adv_grad.astype(np.float64)) + 1e-4)
    assert 0 < lam < 1e4
    np.testing.assert_allclose(terms['d_weight'], 0.5 * lam, rtol=1e-4)  # disc_weight 0.5.
    np.testing.assert_allclose(terms['loss'] - terms['d_weight'] * terms['g_loss'],
                               terms['rec_l1'] * 256 + 0.5 * 256 * terms['lpips']
                               + 1e-6 * terms['kl'], rtol=1e-5)


def test_perceptual_config_rules_and_old_records(lpips_files, tmp_path):
    validate = tasks.TASKS['autoencoder'].validate_config
    config = perceptual_config(default.get_config(), lpips_files)
    validate(config)
    lin_field, vgg_field = 'autoencoder.lpips_weights_path', 'autoencoder.vgg16_weights_path'
    for field, value, match in (
            ('lpips_weights_path', '', rf'{lin_field} is empty.*lpips/weights/v0\.1/vgg\.pth'),
            ('vgg16_weights_path', '', rf'{vgg_field} is empty.*vgg16-397923af\.pth'),
            ('vgg16_weights_path', str(tmp_path / 'no.pth'),
             rf"{vgg_field}='.*no\.pth' is not a file.*download\.pytorch\.org")):
        bad = ml_collections.ConfigDict(config.to_dict())
        bad.autoencoder[field] = value
        with pytest.raises(ValueError, match=match) as e:
            validate(bad)
        assert "to '' for no LPIPS term" in str(e.value)
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.data.image_size = 8
    with pytest.raises(ValueError, match=r'data\.image_size=8 .* at least 16x16'):
        validate(bad)
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.data.channels = 2
    with pytest.raises(ValueError, match=r'data\.channels=2'):
        validate(bad)
    # A file without the right tensors stops the task's construction, naming it.
    torch_checkpoint.save_state_dict(tmp_path / 'empty.pth', {'x': np.zeros(2, np.float32)})
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.autoencoder.lpips_weights_path = str(tmp_path / 'empty.pth')
    with pytest.raises(ValueError, match=rf'{lin_field}=.* has no tensor lin0\.model\.1'):
        tasks.create_task(bad)
    # perceptual=False reads no file (parameter shapes only) and refuses to train.
    task = tasks.AutoencoderTask(bad, perceptual=False)
    x = jnp.zeros((2, 16, 16, 1))
    examples = task.prepare_batch({'image': x}, jax.random.key(0), task.init_task_state())
    with pytest.raises(ValueError, match='perceptual=False'):
        jax.eval_shape(lambda p: task.loss(0, p, examples, None),
                       jax.eval_shape(task.init_params, jax.random.key(0)))
    # perceptual_weight = 0 switches the term off: no file is read.
    off = ml_collections.ConfigDict(bad.to_dict())
    off.autoencoder.perceptual_weight = 0.0
    assert tasks.create_task(off).lpips_params is None
    # A record written before vgg16_weights_path existed loads (upgraded) and builds.
    old = config_lib.to_json_dict(ae_config(default.get_config()))
    del old['autoencoder']['vgg16_weights_path']
    upgraded = config_lib.upgrade_json_dict(json.loads(json.dumps(old)))
    assert upgraded['autoencoder']['vgg16_weights_path'] == ''
    assert config_lib.from_json_dict(upgraded).to_dict() == ae_config(
        default.get_config()).to_dict()
    assert tasks.AutoencoderTask(config_lib.from_json_dict(old)).lpips_params is None
    # A record from before LPIPS's training dropout ran without it.
    del old['autoencoder']['lpips_dropout']
    assert config_lib.upgrade_json_dict(old)['autoencoder']['lpips_dropout'] == 0.0


@pytest.mark.slow
def test_perceptual_run_resumes_bit_for_bit_and_the_term_can_be_switched_on(lpips_files,
                                                                            tmp_path):
    """With the term on, 2 steps + resume + 2 == 4 steps; a run checkpointed without
    it resumes with it (the LPIPS constants are not in the checkpoint). No grids:
    the task state then holds no (empty) grid images, which orbax could not save."""
    config = perceptual_config(default.get_config(), lpips_files)
    config.train.num_grid_samples = 0
    mesh = parallel.create_mesh(jax.devices()[:1])
    trainer = train.Trainer(config, mesh=mesh)
    reference = trainer.train(str(tmp_path / 'ref'))
    trainer.train(str(tmp_path / 'run'), stop_at_step=2)
    resumed = trainer.train(str(tmp_path / 'run'))  # Everything comes back from disk.
    assert int(resumed.step) == 4 and 'grid_images' not in resumed.task_state
    jax.tree.map(np.testing.assert_array_equal, parallel.to_host(resumed),
                 parallel.to_host(reference))
    assert checkpointing.load_config(str(tmp_path / 'run')).autoencoder.perceptual_weight == 0.5
    plain = ml_collections.ConfigDict(config.to_dict())
    plain.autoencoder.lpips_weights_path = plain.autoencoder.vgg16_weights_path = ''
    train.Trainer(plain, mesh=mesh).train(str(tmp_path / 'switch'), stop_at_step=2)
    switched = trainer.train(str(tmp_path / 'switch'))
    assert int(switched.step) == 4
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(parallel.to_host(switched)))
