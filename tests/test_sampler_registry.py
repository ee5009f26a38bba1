"""Tests for ddpm_jax.sampler_registry: every sampler name runs through --mode=sample and
reports its NFE; the config fields of the new samplers are checked with their names."""

import jax
import numpy as np
import pytest

from configs import default
from ddpm_jax import config_lib
from ddpm_jax import sample_mode
from ddpm_jax import sampler_registry
from ddpm_jax import samplers
from ddpm_jax import schedules
from ddpm_jax import sde_samplers
from test_evaluate import _write_checkpoint

# name -> (config overrides, the NFE it must report; None: adaptive, checked as a range),
# on tiny_config's T = 20 steps.
CASES = {
    'dpm_solver_3m': ({'respacing': '5'}, 5),
    'dpm_solver_2s': ({'respacing': '5'}, 5),
    'heun': ({'num_steps': 3}, 5),  # 2 N - 1.
    'ode': ({'ode_rtol': 1e-3, 'ode_atol': 1e-3}, None),
    'pc': ({'respacing': '4'}, 8),  # N (predictor + 1 corrector step).
    'sde': ({'respacing': '4', 'predictor': 'euler_maruyama'}, 4),
    'ddim': ({'respacing': '4'}, 4),
    # L T + 1 (final denoising), levels between the schedule's smallest and largest sigma.
    'langevin': ({'langevin_num_levels': 3, 'langevin_steps_per_level': 2,
                  'langevin_denoise': True}, 7),
}


@pytest.fixture
def checkpoint(small_config, tmp_path):
    """A width-8 UNet checkpoint with random weights (written without compiling)."""
    workdir = str(tmp_path / 'run')
    _write_checkpoint(small_config, workdir)
    return small_config, workdir


def test_registry_holds_every_sampler_with_its_config_fields():
    assert set(samplers.SAMPLERS) <= set(sampler_registry.SAMPLERS)
    assert set(sde_samplers.SDE_SAMPLERS) <= set(sampler_registry.SAMPLERS)
    assert {'heun', 'ode', 'pc', 'sde', 'dpm_solver_3m', 'dpm_solver_2s'} <= set(
        sampler_registry.SAMPLERS)
    config = default.get_config()
    for name, spec in sampler_registry.SAMPLERS.items():
        for option in spec.options:
            field, _ = sampler_registry.OPTION_FIELDS[option]
            group, key = field.split('.')
            assert key in config[group], (name, field)
    assert sampler_registry.sampler_options(config, 'ode') == {
        'solver': 'tsit5', 'rtol': 1e-5, 'atol': 1e-5, 'denoise': True}
    assert sampler_registry.sampler_options(config, 'heun') == {
        'num_steps': 18, 's_churn': 0.0, 'sigma_max': 0.0, 'round_sigma': False}
    assert sampler_registry.sampler_options(config, 'langevin') == {
        'step_size': 2e-5, 'steps_per_level': 100, 'num_levels': 10,
        'langevin_sigma_max': 0.0, 'langevin_sigma_min': 0.0, 'final_denoise': False,
        'langevin_init': 'prior'}


@pytest.mark.parametrize('name', [
    'heun', 'langevin', pytest.param('ode', marks=pytest.mark.slow),
    pytest.param('sde', marks=pytest.mark.slow), pytest.param('pc', marks=pytest.mark.slow),
    pytest.param('dpm_solver_3m', marks=pytest.mark.slow),
    pytest.param('dpm_solver_2s', marks=pytest.mark.slow),
    pytest.param('ddim', marks=pytest.mark.slow)])
def test_each_sampler_samples_through_sample_mode_and_reports_its_nfe(checkpoint, name):
    config, workdir = checkpoint
    overrides, nfe = CASES[name]
    config.sample.sampler = name
    for key, value in overrides.items():
        config.sample[key] = value
    result = sample_mode.sample_and_save(config, workdir)
    with np.load(result['npz']) as f:
        images = f['images']
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert images.std() > 1.0  # Not blank.
    if nfe is None:
        assert 7 <= result['nfe'] < 4096 * 6  # At least one 6-stage step plus the first.
    else:
        assert result['nfe'] == nfe


@pytest.mark.parametrize('field, value, match', [
    ('sample.sampler', 'euler', r"sample.sampler='euler'.*'heun', 'ode', 'pc'"),
    ('sample.num_steps', 0, r'sample.num_steps=0 must be an int >= 1'),
    ('sample.s_churn', -1.0, r'sample.s_churn=-1.0 must be >= 0'),
    ('sample.ode_solver', 'rk4', r"sample.ode_solver='rk4'.*'tsit5', 'dopri5'"),
    ('sample.ode_rtol', 0.0, r'sample.ode_rtol=0.0 must be > 0'),
    ('sample.ode_atol', -1e-5, r'sample.ode_atol=-1e-05 must be > 0'),
    ('sample.predictor', 'ancestral', r"sample.predictor='ancestral'.*'reverse_diffusion'"),
    ('sample.pc_snr', 0.0, r'sample.pc_snr=0.0 must be > 0'),
    ('sample.heun_sigma_max', -80.0, r'sample.heun_sigma_max=-80.0 must be >= 0'),
    ('sample.langevin_step_size', -1.0, r'sample.langevin_step_size=-1.0 must be > 0'),
    ('sample.langevin_steps_per_level', 0, r'sample.langevin_steps_per_level=0 must be'),
    ('sample.langevin_init', 'zeros', r"sample.langevin_init='zeros'.*'prior', 'uniform'"),
    ('sample.langevin_num_levels', 0, r"langevin_num_levels=0 .*is for task='score'"),
    ('sample.langevin_sigma_max', 1e6, r'sample.langevin_sigma_max=1000000.0 is outside'),
    ('sample.langevin_sigma_min', 1e-9, r'sample.langevin_sigma_min=1e-09 is outside'),
])
def test_sampler_config_errors_name_the_field(tiny_config, field, value, match):
    group, key = field.split('.')
    tiny_config[group][key] = value
    if key.startswith('langevin_'):
        tiny_config.sample.sampler = 'langevin'
    with pytest.raises(ValueError, match=match):
        config_lib.validate(tiny_config, mode='sample')


@pytest.mark.parametrize('name', ['heun', 'ode'])
def test_full_schedule_samplers_reject_respacing(tiny_config, name):
    tiny_config.sample.sampler = name
    tiny_config.sample.respacing = '10'
    with pytest.raises(ValueError, match=f"sample.respacing='10' must be empty.*'{name}'"):
        config_lib.validate(tiny_config, mode='sample')
    tiny_config.sample.respacing = ''
    config_lib.validate(tiny_config, mode='sample')


def _first_call_step(sampler, sched, **options):
    """The training timestep of a sampler's first model call (a toy eps model)."""
    calls = []

    def model_fn(x, t):
        jax.debug.callback(lambda t: calls.append(int(np.asarray(t)[0])), t)
        return 0.1 * x

    jax.jit(lambda r: sampler(model_fn, sched, (2, 4), r, **options))(jax.random.key(0))
    jax.effects_barrier()
    return calls[0], len(calls)


def test_heun_sigma_max_cap_moves_the_first_sigma_to_the_cap():
    """Uncapped, Heun starts at the cosine schedule's largest sigma (~20,000, step
    T - 1); with sample.heun_sigma_max = 80 its first call is at the step where the VP
    view's piecewise-linear log-SNR reaches -log 80 (float64), and the NFE is unchanged."""
    T = 1000
    sched = schedules.make_schedule('cosine', T)
    abar = np.cumprod(1 - schedules.get_beta_schedule('cosine', T))
    sigma = np.sqrt((1 - abar) / abar)
    assert sigma[-1] > 1e4
    heun = sde_samplers.vp_heun_sample
    step, nfe = _first_call_step(heun, sched, num_steps=4)
    assert (step, nfe) == (T - 1, 7)
    log_sigma = np.log(sigma)
    k = np.searchsorted(log_sigma, np.log(80.0)) - 1
    expected = round(k + (np.log(80.0) - log_sigma[k]) / (log_sigma[k + 1] - log_sigma[k]))
    step, nfe = _first_call_step(heun, sched, num_steps=4, sigma_max=80.0)
    assert (step, nfe) == (expected, 7)
    assert abs(sigma[expected] / 80.0 - 1) < 0.05
    # A cap above the model's range is no cap.
    assert _first_call_step(heun, sched, num_steps=4, sigma_max=1e6)[0] == T - 1
    first = sde_samplers.karras_sigmas(4, float(sigma[0]),
                                       sde_samplers.capped_sigma_max(float(sigma[-1]), 80.0))
    assert float(first[0]) == pytest.approx(80.0)
