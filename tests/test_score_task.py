"""Tests for the score task (ddpm_jax.tasks.score), its maths (ddpm_jax.score_matching),
the ODE likelihood of --mode=eval, and the score-based configs."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_ve, cifar10_vp, default, digits_ncsn, digits_score
from ddpm_jax import config_lib
from ddpm_jax import data
from ddpm_jax import evaluate
from ddpm_jax import ode_likelihood
from ddpm_jax import parallel
from ddpm_jax import sample_mode
from ddpm_jax import schedules
from ddpm_jax import score_matching
from ddpm_jax import sde as sde_lib
from ddpm_jax import sde_samplers
from ddpm_jax import tasks
from ddpm_jax import train
from ddpm_jax.models import make_model_fn
from ddpm_jax.tasks import score as score_task
from test_evaluate import _write_checkpoint

B0, B1 = 0.1, 20.0


def _score_config(config, kind='vp'):
    config.task = 'score'
    config.sde.kind = kind
    config.sample.sampler = 'heun'
    config.sample.num_steps = 3
    config.eval.likelihood = 'ode'
    config.eval.ode_rtol = 1e-3
    config.eval.ode_atol = 1e-3
    return config


# ---------------------------------------------------------------------------
# The maths: loss, conventions, importance sampling (float64 NumPy references).
# ---------------------------------------------------------------------------


def test_dsm_loss_by_hand():
    rs = np.random.RandomState(0)
    score, noise = rs.randn(2, 3, 2, 1), rs.randn(2, 3, 2, 1)
    std, g2 = np.array([0.5, 2.0]), np.array([3.0, 0.25])
    standard = [np.mean((std[i] * score[i] + noise[i]) ** 2) for i in range(2)]
    likelihood = [g2[i] * 0.5 * np.sum((score[i] + noise[i] / std[i]) ** 2) for i in range(2)]
    args = [jnp.asarray(a, jnp.float32) for a in (score, noise, std, g2)]
    np.testing.assert_allclose(score_matching.dsm_loss(*args, weighting='standard'),
                               standard, rtol=1e-5)
    np.testing.assert_allclose(
        score_matching.dsm_loss(*args, weighting='likelihood', reduce_mean=False),
        likelihood, rtol=1e-5)
    with pytest.raises(ValueError, match='weighting'):
        score_matching.dsm_loss(*args, weighting='uniform')


@pytest.mark.parametrize('sde', [sde_lib.VPSDE(), sde_lib.VESDE(0.01, 50.0)])
def test_exact_score_gives_the_closed_form_dsm_loss(sde):
    """For x_0 ~ N(0, v) the true score is -x_t / m, m = alpha^2 v + std^2, and
    E || std s + z ||^2 = alpha^2 v / m per dimension; the network output that gives it
    follows score_sde's convention (VP: -std s; VE: sigma s)."""
    v, n = 0.3, 200_000
    t = np.array([0.05, 0.3, 0.9])
    alpha = np.exp(-0.25 * t ** 2 * (B1 - B0) - 0.5 * t * B0) if isinstance(
        sde, sde_lib.VPSDE) else np.ones(3)
    std = np.sqrt(1 - alpha ** 2) if isinstance(sde, sde_lib.VPSDE) else 0.01 * 5000.0 ** t
    rs = np.random.RandomState(1)
    x0 = np.sqrt(v) * rs.randn(3, n)
    z = rs.randn(3, n)
    x_t = alpha[:, None] * x0 + std[:, None] * z
    m = alpha ** 2 * v + std ** 2
    true_score = -x_t / m[:, None]
    output = (-std[:, None] * true_score if isinstance(sde, sde_lib.VPSDE)
              else std[:, None] * true_score)
    tj = jnp.asarray(t, jnp.float32)
    score = score_matching.score_from_output(sde, jnp.asarray(output, jnp.float32), tj)
    np.testing.assert_allclose(score, true_score, rtol=2e-4, atol=1e-4)
    loss = score_matching.dsm_loss(score, jnp.asarray(z, jnp.float32),
                                   sde_lib.marginal_coefs(sde, tj)[1], jnp.ones(3),
                                   weighting='standard')
    np.testing.assert_allclose(loss, alpha ** 2 * v / m, rtol=0.01)
    np.testing.assert_allclose(score_matching.noise_label(tj), 999.0 * t, rtol=1e-6)


def _ratio_np(kind, t):
    """g^2 / std^2 in float64."""
    b = B0 * t + 0.5 * (B1 - B0) * t ** 2
    beta = B0 + t * (B1 - B0)
    if kind == 'vp':
        return beta / -np.expm1(-b)
    return beta * -np.expm1(-2 * b) / np.expm1(-b) ** 2


@pytest.mark.parametrize('kind,eps', [('vp', 1e-5), ('subvp', 1e-3)])
def test_importance_sampled_t_has_the_density_g2_over_std2(kind, eps):
    sde = sde_lib.VPSDE() if kind == 'vp' else sde_lib.SubVPSDE()
    grid = np.geomspace(eps, 1.0, 200_001)
    ratio = _ratio_np(kind, grid)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (ratio[1:] + ratio[:-1]) * np.diff(grid))])
    z = cdf[-1]
    np.testing.assert_allclose(score_matching.importance_normalizer(sde, eps), z, rtol=1e-4)
    t_check = np.array([eps * 3, 0.01, 0.2, 0.7])
    np.testing.assert_allclose(score_matching.importance_density(sde, t_check, eps),
                               _ratio_np(kind, t_check) / z, rtol=1e-4)
    n = 200_000
    t = np.asarray(score_matching.sample_importance_t(sde, jax.random.key(0), (n,), eps),
                   np.float64)
    assert t.min() >= eps and t.max() <= 1.0
    # Histogram in log t against the formula's mass per bin, within 4 binomial sigmas.
    edges = np.geomspace(eps, 1.0, 21)
    counts, _ = np.histogram(t, edges)
    expected = n * np.diff(np.interp(edges, grid, cdf)) / z
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected) + 1), (counts, expected)
    # ... and not uniform: most of the mass sits at small t.
    assert np.mean(t < 0.1) > 0.4


def test_importance_sampling_of_ve_is_uniform():
    sde = sde_lib.VESDE(0.01, 50.0)
    t = np.asarray(score_matching.sample_importance_t(sde, jax.random.key(1), (100_000,), 1e-5))
    assert abs(t.mean() - 0.5) < 0.005 and abs(np.mean(t < 0.25) - 0.25) < 0.005


# ---------------------------------------------------------------------------
# The task: its loss, training, resume, sampling and eval.
# ---------------------------------------------------------------------------


def test_task_loss_by_hand(small_config):
    config = _score_config(small_config)
    task = tasks.create_task(config)
    params = jax.jit(task.init_params)(jax.random.key(0))
    # Random weights everywhere (the UNet's last layer starts at zero: output 0).
    leaves, treedef = jax.tree.flatten(params)
    rs = np.random.RandomState(5)
    params = jax.tree.unflatten(treedef, [
        jnp.asarray(0.1 * rs.randn(*leaf.shape), leaf.dtype) for leaf in leaves])
    batch = {'image': jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (4, 8, 8, 1)),
                                  jnp.float32),
             'label': jnp.zeros((4,), jnp.int32)}
    examples = task.prepare_batch(batch, jax.random.key(1), task.init_task_state())
    t = np.asarray(examples['t'], np.float64)
    assert np.all((t >= config.sde.training_eps) & (t <= 1.0))
    loss, terms = task.loss(0, params, examples, jax.random.key(2))
    # By hand: x_t with the VP closed form, the network at label 999 t, s = -out / std.
    alpha = np.exp(-0.25 * t ** 2 * (B1 - B0) - 0.5 * t * B0)[:, None, None, None]
    std = np.sqrt(1.0 - alpha ** 2)
    x0, z = np.asarray(batch['image'], np.float64), np.asarray(examples['noise'], np.float64)
    x_t = alpha * x0 + std * z
    out = np.asarray(make_model_fn(task.model, params['model'])(
        jnp.asarray(x_t, jnp.float32), jnp.asarray(999.0 * t, jnp.float32)), np.float64)
    expected = np.mean((std * (-out / std) + z) ** 2, axis=(1, 2, 3))
    assert np.abs(out).mean() > 0.1  # The sign convention matters below.
    np.testing.assert_allclose(terms['loss'], expected, rtol=2e-4)
    np.testing.assert_allclose(loss, expected.mean(), rtol=2e-4)

    # The likelihood weighting with importance sampling draws t from g^2 / std^2.
    config.sde.weighting = 'likelihood'
    task = tasks.create_task(config)
    t_imp = task.prepare_batch({'image': jnp.zeros((512, 8, 8, 1)),
                                'label': jnp.zeros((512,), jnp.int32)},
                               jax.random.key(3), None)['t']
    assert float(jnp.median(t_imp)) < 0.1  # Uniform t would have median 0.5.


def test_ncsn_discrete_levels(small_config):
    config = _score_config(small_config, 've')
    config.sde.continuous = False
    config.sde.num_scales = 10
    task = tasks.create_task(config)
    t = np.asarray(task.prepare_batch({'image': jnp.zeros((256, 8, 8, 1)),
                                       'label': jnp.zeros((256,), jnp.int32)},
                                      jax.random.key(0), None)['t'])
    levels = np.round(t * 9)
    np.testing.assert_allclose(t * 9, levels, atol=1e-5)
    assert set(levels.astype(int)) == set(range(10))


@pytest.mark.parametrize('field, value, match', [
    ('sde.kind', 'cld', r"sde.kind='cld' is not valid"),
    ('sde.weighting', 'uniform', r"sde.weighting='uniform' is not valid"),
    ('sde.continuous', False, r"sde.continuous=False .*needs sde.kind='ve'"),
    ('sde.beta_max', 0.05, r'sde.beta_min=0.1, sde.beta_max=0.05'),
    ('sde.num_scales', 1, r'sde.num_scales=1 must be an int >= 2'),
    ('sde.sampling_eps', 0.0, r'sde.sampling_eps=0.0 must be in \(0, 1\)'),
    ('sample.sampler', 'ddim', r"task='score' samples with sample.sampler"),
    ('sample.respacing', '10', r"sample.respacing='10': task='score'"),
    ('eval.likelihood', 'vb', r"eval.likelihood='vb': task='score' has no variational"),
    ('eval.ode_trace', 'hutch', r"eval.ode_trace='hutch' is not valid"),
    ('eval.ode_eps', 1.0, r'eval.ode_eps=1.0 must be in \(0, 1\)'),
])
def test_config_errors_name_the_field(small_config, field, value, match):
    config = _score_config(small_config)
    group, key = field.split('.')
    config[group][key] = value
    mode = 'eval' if group == 'eval' else 'sample'
    with pytest.raises(ValueError, match=match):
        config_lib.validate(config, mode=mode)


@pytest.mark.parametrize('kind', ['vp', 'subvp', 've'])
def test_heun_first_sigma_and_its_cap_on_every_sde(small_config, kind):
    """Heun runs on every SDE (sub-VP through its closed-form t(sigma)); its schedule
    starts at sigma(1), or at sample.heun_sigma_max when that is smaller."""
    config = _score_config(small_config, kind)
    config_lib.validate(config, mode='sample')
    sde = score_task.create_sde(config)
    alpha = math.exp(-(B0 + B1) / 4)  # alpha(1) = exp(-int_0^1 beta / 2).
    # VP: sigma = sqrt(1 / alpha^2 - 1); sub-VP: (1 - alpha^2) / alpha; VE: sigma_max.
    top = {'vp': math.sqrt(1 / alpha ** 2 - 1), 'subvp': 1 / alpha - alpha, 've': 50.0}[kind]
    sigmas, y_std = score_task._heun_constants(config, sde)  # noqa: SLF001
    np.testing.assert_allclose(float(sigmas[0]), top, rtol=1e-5)
    config.sample.heun_sigma_max = 30.0
    sigmas, y_std = score_task._heun_constants(config, sde)  # noqa: SLF001
    assert float(sigmas[0]) == pytest.approx(30.0, rel=1e-6)
    assert y_std == pytest.approx(30.0, rel=2e-3)  # The prior scaled to the first sigma.


def test_langevin_samples_a_discrete_ncsn_model(small_config, tmp_path):
    """--mode=sample with 'langevin' on an NCSN model (VE, discrete levels): L T + 1 NFE,
    and every level it evaluates is a trained one."""
    config = _score_config(small_config, 've')
    config.sde.continuous = False
    config.sde.num_scales = 4
    config.sde.sigma_max = 10.0
    config.sample.sampler = 'langevin'
    config.sample.langevin_num_levels = 0
    config.sample.langevin_steps_per_level = 3
    config.sample.langevin_denoise = True
    workdir = str(tmp_path / 'run')
    _write_checkpoint(config, workdir)
    result = sample_mode.sample_and_save(config, workdir)
    assert result['nfe'] == 4 * 3 + 1
    with np.load(result['npz']) as f:
        assert f['images'].shape == (4, 8, 8, 1) and f['images'].std() > 1.0
    sde = score_task.create_sde(config)
    hi, lo, num_levels = score_task._langevin_levels(config, sde)  # noqa: SLF001
    assert (hi, num_levels) == (pytest.approx(10.0), 4)
    assert lo == pytest.approx(0.01, rel=1e-5)
    # The Langevin levels are the model's: t(sigma_i) = i / (N - 1) exactly.
    t = sde_lib.t_of_sigma(sde, sde_lib.ncsn_sigmas(hi, lo, num_levels))
    np.testing.assert_allclose(np.asarray(t) * 3, [3, 2, 1, 0], atol=1e-4)
    # sample.langevin_init: with a negligible step the samples are the start, sigma_1 N(0, I)
    # (the VE prior) or NCSN's U(-1, 1).
    config.sample.langevin_step_size = 1e-14
    config.sample.langevin_denoise = False
    starts = {}
    for init in ('prior', 'uniform'):
        config.sample.langevin_init = init
        x, _ = score_task._run_sampler(  # noqa: SLF001
            config, sde, lambda x, t: jnp.zeros_like(x), (256, 8, 8, 1), jax.random.key(0),
            (hi, lo, num_levels))
        starts[init] = np.asarray(x)
    assert abs(starts['prior'].std() - 10.0) < 0.3
    assert np.abs(starts['uniform']).max() <= 1.001 and abs(starts['uniform'].var() - 1 / 3) < 0.01


@pytest.mark.parametrize('field, value, match', [
    ('langevin_sigma_max', 80.0, r'sample.langevin_sigma_max=80.0 is outside the model'),
    ('langevin_sigma_min', 1e-4, r'sample.langevin_sigma_min=0.0001 is outside the model'),
    ('langevin_num_levels', 1, r'sample.langevin_num_levels=1 must be an int >= 2'),
    ('langevin_step_size', 0.0, r'sample.langevin_step_size=0.0 must be > 0'),
    ('heun_sigma_max', -1.0, r'sample.heun_sigma_max=-1.0 must be >= 0'),
    ('heun_round_sigma', True, r"sample.heun_round_sigma=True .*task='score' is continuous"),
])
def test_langevin_config_errors_name_the_field(small_config, field, value, match):
    config = _score_config(small_config, 've')
    config.sample.sampler = 'langevin'
    config.sample[field] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(config, mode='sample')


@pytest.mark.parametrize('name', ['cifar10_ve', 'cifar10_vp', 'digits_score', 'digits_ncsn'])
def test_score_configs(name):
    module = {'cifar10_ve': cifar10_ve, 'cifar10_vp': cifar10_vp,
              'digits_score': digits_score, 'digits_ncsn': digits_ncsn}[name]
    config = module.get_config()
    assert module.__doc__.startswith(f'python main.py --config=configs/{name}.py --workdir=')
    assert set(config_lib.to_json_dict(config)) == set(config_lib.to_json_dict(
        default.get_config()))
    assert config.task == 'score'
    if name == 'cifar10_ve':
        # score_sde's 0.01 .. 50 on [0, 1] data, in our [-1, 1] units.
        assert (config.sde.kind, config.sde.sigma_min, config.sde.sigma_max,
                config.sde.training_eps, config.sde.sampling_eps) == ('ve', 0.02, 100.0, 1e-5, 1e-5)
        assert not config.model.ncsnpp.centered
        assert (config.optim.learning_rate, config.optim.ema_decays,
                config.train.global_batch_size) == (2e-4, (0.999,), 128)
    elif name == 'cifar10_vp':
        assert (config.sde.kind, config.sde.beta_min, config.sde.beta_max,
                config.sde.sampling_eps, config.eval.ode_eps) == ('vp', 0.1, 20.0, 1e-3, 1e-5)
    elif name == 'digits_ncsn':
        c, smp = config.sde, config.sample
        assert (c.kind, c.continuous, c.sigma_max, c.sigma_min, c.num_scales, smp.sampler) == (
            've', False, 10.0, 0.01, 24, 'langevin')
        # NCSNv2 Technique 1: sigma_1 ~ the largest distance between training digits.
        x = data.load_digits('train')[0].reshape(-1, 64).astype(np.float64)
        sq = np.sum(x ** 2, 1)
        largest = np.sqrt(np.max(sq[:, None] + sq[None] - 2 * x @ x.T))
        assert 0.9 < c.sigma_max / largest < 1.1
        # Technique 4: the step size for gamma = (sigma_1 / sigma_L)^(1 / (L - 1)), T = 5.
        gamma = (c.sigma_max / c.sigma_min) ** (1 / (c.num_scales - 1))
        assert smp.langevin_step_size == pytest.approx(
            sde_samplers.ncsnv2_step_size(gamma, c.sigma_min, smp.langevin_steps_per_level),
            rel=0.01)
    for mode in ('train', 'sample', 'eval'):
        config_lib.validate(config, mode=mode, num_devices=4, num_processes=1)


@pytest.mark.slow
def test_score_task_resumes_bit_for_bit_and_samples(small_config, tmp_path):
    config = _score_config(small_config)
    config.train.num_grid_samples = 4  # The grid goes through the score sampler.
    trainer = train.Trainer(config)
    reference = trainer.train(str(tmp_path / 'ref'))
    trainer.train(str(tmp_path / 'run'), stop_at_step=2)
    resumed = trainer.train(str(tmp_path / 'run'))  # Everything comes back from disk.
    assert int(resumed.step) == 4
    jax.tree.map(np.testing.assert_array_equal, parallel.to_host(resumed),
                 parallel.to_host(reference))
    assert (tmp_path / 'run' / 'samples' / 'step_4.png').exists()
    for sampler, nfe in (('heun', 5), ('sde', 1000)):
        config.sample.sampler = sampler
        result = sample_mode.sample_and_save(config, str(tmp_path / 'run'))
        assert result['nfe'] == nfe
        with np.load(result['npz']) as f:
            assert f['images'].shape == (4, 8, 8, 1) and f['images'].std() > 1.0


@pytest.mark.parametrize('task', ['score', pytest.param('diffusion', marks=pytest.mark.slow)])
def test_eval_ode_likelihood_of_a_tiny_model_is_finite(small_config, tmp_path, task):
    config = _score_config(small_config) if task == 'score' else small_config
    config.eval.likelihood = 'ode'
    config.eval.ode_rtol = config.eval.ode_atol = 1e-3
    config.eval.num_images = 4
    workdir = str(tmp_path / 'run')
    _write_checkpoint(config, workdir)
    result = evaluate.evaluate(config, workdir)
    assert result['likelihood'] == 'ode' and result['num_images'] == 4
    assert np.isfinite(result['total_bpd']) and 0 < result['total_bpd'] < 100
    assert result['nfe'] >= 7


class _ExactGaussianEps(nn.Module):
    """The exact eps of x_0 ~ N(MU, S2 I) under a discrete schedule (a Flax module)."""
    alphas_cumprod: tuple

    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        self.param('unused', nn.initializers.zeros, ())
        abar = jnp.asarray(self.alphas_cumprod, jnp.float32)[t][:, None, None, None]
        return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * MU) / (abar * S2 + 1 - abar)


MU, S2 = 0.2, 0.09


def test_eval_ode_bpd_of_an_exact_eps_model_is_the_gaussian_bpd(small_config):
    """Through the VP view, an exact eps model's ODE bits/dim is that of the Gaussian
    marginal at eps of the dequantised image (closed form, float64)."""
    config = small_config
    config.data.image_size = 2  # D = 4: the exact trace is 4 JVPs.
    config.diffusion.num_timesteps = 1000
    config.eval.likelihood = 'ode'
    config.eval.ode_trace = 'exact'
    config.eval.ode_eps = 1e-3
    config.eval.ode_rtol = config.eval.ode_atol = 1e-4
    config.eval.global_batch_size = 4
    sched = schedules.make_schedule('linear', 1000)
    model = _ExactGaussianEps(tuple(np.asarray(sched.alphas_cumprod, np.float64).tolist()))
    params = {'unused': jnp.zeros(())}
    mesh = parallel.create_mesh()
    rs = np.random.RandomState(0)
    images = np.round((MU + np.sqrt(S2) * rs.randn(4, 2, 2, 1)).clip(-1, 1) * 127.5) / 127.5
    eval_step = evaluate.make_eval_step_fn(config, model, mesh)
    batch = parallel.to_global({'image': images.astype(np.float32),
                                'label': np.zeros(4, np.int32),
                                'mask': np.ones(4, bool)}, mesh)
    sums = parallel.to_host(eval_step(params, batch, jnp.int32(0)))
    # The closed form at the dequantised points (each image's key: fold_in(eval, index)).
    view = sde_lib.vp_view(sched)
    alpha, std = (float(v) for v in sde_lib.marginal_coefs(view, jnp.float32(1e-3)))
    var = alpha ** 2 * S2 + std ** 2
    eval_rng = config_lib.rng_for(config, 'eval')
    bpds = []
    for i in range(4):
        deq_rng, _ = jax.random.split(jax.random.fold_in(eval_rng, i))
        y = np.asarray(ode_likelihood.uniform_dequantize(deq_rng, images[i:i + 1]), np.float64)
        logp = np.sum(-0.5 * np.log(2 * np.pi * var) - (y - alpha * MU) ** 2 / (2 * var))
        bpds.append(-logp / (4 * math.log(2)) + 7)
    # The model is evaluated at the nearest trained step: 0.05 nats at most per image
    # (test_ode_likelihood), i.e. 0.02 bits/dim over D = 4 per image.
    np.testing.assert_allclose(sums['total_bpd'], sum(bpds), atol=0.03)  # Measured 0.005.
    assert abs(sum(bpds) - 4 * 7) > 1.0  # The reference is not the offset alone.
    assert float(sums['count']) == 4
