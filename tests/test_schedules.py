"""Tests for ddpm_jax.schedules: closed-form betas, derived constants, respacing, errors."""

import math

import jax
import numpy as np
import pytest

from ddpm_jax import schedules


def _np_cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], max_beta)


@pytest.mark.parametrize('num_timesteps', [1000, 500, 100])
def test_linear_matches_ho_with_improved_ddpm_scaling(num_timesteps):
    scale = 1000 / num_timesteps
    expected = np.linspace(1e-4 * scale, 0.02 * scale, num_timesteps)
    betas = schedules.get_beta_schedule('linear', num_timesteps)
    assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    if num_timesteps == 1000:
        assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)


def test_linear_small_t_is_capped():
    # 0.02 * 1000 / 10 = 2 would leave (0, 1]; the cap keeps abar > 0.
    betas = schedules.get_beta_schedule('linear', 10)
    expected = np.minimum(np.linspace(0.01, 2.0, 10), 0.999)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas[-1] == 0.999


@pytest.mark.parametrize('num_timesteps', [1000, 50])
def test_cosine_matches_closed_form_and_cap(num_timesteps):
    betas = schedules.get_beta_schedule('cosine', num_timesteps)
    np.testing.assert_allclose(betas, _np_cosine_betas(num_timesteps), rtol=1e-10)
    assert betas[-1] == 0.999  # abar(1) = 0 would give beta = 1.
    # abar_t = f(t) / f(0) (Nichol & Dhariwal 2021, Eq. 17), before the cap bites.
    t = np.arange(1, num_timesteps) / num_timesteps
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = np.cumprod(1 - betas)[:-1]
    np.testing.assert_allclose(abar, [f(u) / f(0) for u in t], rtol=1e-9)


def test_other_named_schedules_match_closed_forms():
    t = 1000
    np.testing.assert_allclose(schedules.get_beta_schedule('jsd', 10),
                               [1 / 10, 1 / 9, 1 / 8, 1 / 7, 1 / 6, 1 / 5, 1 / 4, 1 / 3,
                                1 / 2, 1.0], rtol=1e-12)
    np.testing.assert_allclose(schedules.get_beta_schedule('quadratic', t),
                               np.linspace(0.01, math.sqrt(0.02), t) ** 2, rtol=1e-12)
    np.testing.assert_allclose(schedules.get_beta_schedule('constant', t),
                               np.full(t, 0.02), rtol=1e-12)
    x = np.linspace(-6, 6, t)
    np.testing.assert_allclose(schedules.get_beta_schedule('sigmoid', t),
                               (0.02 - 1e-4) / (1 + np.exp(-x)) + 1e-4, rtol=1e-12)
    for name, warm in (('warmup10', 100), ('warmup50', 500)):
        expected = np.full(t, 0.02)
        expected[:warm] = np.linspace(1e-4, 0.02, warm)
        np.testing.assert_allclose(schedules.get_beta_schedule(name, t), expected,
                                   rtol=1e-12)


def test_betas_from_alpha_bar_linear_alpha_bar_is_jsd():
    # abar(t) = 1 - t gives beta_i = 1 / (T - i): the jsd schedule.
    betas = schedules.betas_from_alpha_bar(lambda u: 1.0 - u, 8, max_beta=1.0)
    np.testing.assert_allclose(betas, 1.0 / (8 - np.arange(8)), rtol=1e-12)
    capped = schedules.betas_from_alpha_bar(lambda u: 1.0 - u, 8)
    assert capped[-1] == 0.999


def test_create_schedule_fields_match_closed_forms():
    betas = np.linspace(1e-3, 0.2, 20)
    sched = schedules.create_schedule(betas)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    pvar = betas * (1 - abar_prev) / (1 - abar)
    expected = {
        'betas': betas,
        'alphas_cumprod': abar,
        'alphas_cumprod_prev': abar_prev,
        'alphas_cumprod_next': np.concatenate([abar[1:], [0.0]]),
        'sqrt_alphas_cumprod': np.sqrt(abar),
        'sqrt_one_minus_alphas_cumprod': np.sqrt(1 - abar),
        'log_one_minus_alphas_cumprod': np.log(1 - abar),
        'sqrt_recip_alphas_cumprod': 1 / np.sqrt(abar),
        'sqrt_recipm1_alphas_cumprod': np.sqrt(1 / abar - 1),
        'posterior_variance': pvar,
        'posterior_log_variance_clipped': np.log(np.concatenate([[pvar[1]], pvar[1:]])),
        'posterior_mean_coef1': betas * np.sqrt(abar_prev) / (1 - abar),
        'posterior_mean_coef2': (1 - abar_prev) * np.sqrt(alphas) / (1 - abar),
    }
    for name, value in expected.items():
        field = getattr(sched, name)
        assert field.dtype == np.float32, name
        np.testing.assert_allclose(np.asarray(field), value, rtol=2e-6, atol=1e-7,
                                   err_msg=name)
    assert sched.posterior_variance[0] == 0.0
    assert sched.timesteps.dtype == np.int32
    np.testing.assert_array_equal(sched.timesteps, np.arange(20))
    assert sched.num_timesteps == 20
    # A pytree of arrays: passes through jit.
    out = jax.jit(lambda s: s.alphas_cumprod * 2)(sched)
    np.testing.assert_allclose(out, 2 * abar, rtol=2e-6)


def test_jsd_end_is_finite():
    sched = schedules.make_schedule('jsd', 10)
    for name, field in sched._asdict().items():
        assert np.all(np.isfinite(np.asarray(field))), name
    assert sched.alphas_cumprod[-1] == 0.0


def test_respacing_all_steps_is_identity():
    full = schedules.make_schedule('cosine', 50)
    for spec in ('', None, '50', list(range(50)), 'ddim50'):
        sched = schedules.make_schedule('cosine', 50, spec)
        for name in full._fields:
            np.testing.assert_allclose(np.asarray(getattr(sched, name)),
                                       np.asarray(getattr(full, name)), rtol=1e-6,
                                       err_msg=f'{spec!r} {name}')


@pytest.mark.parametrize('name,spec', [('linear', '10'), ('cosine', '3,5,7'),
                                       ('linear', 'ddim20'), ('cosine', [3, 17, 60, 99])])
def test_respaced_marginals_equal_original_at_kept_steps(name, spec):
    kept = schedules.space_timesteps(100, spec)
    sched = schedules.make_schedule(name, 100, spec)
    abar = np.cumprod(1 - schedules.get_beta_schedule(name, 100))
    np.testing.assert_array_equal(sched.timesteps, kept)
    np.testing.assert_allclose(sched.alphas_cumprod, abar[kept], rtol=1e-6)
    # beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}}.
    prev = np.concatenate([[1.0], abar[kept][:-1]])
    np.testing.assert_allclose(sched.betas, 1 - abar[kept] / prev, rtol=1e-5)


def test_space_timesteps_hand_computed():
    steps = schedules.space_timesteps(300, '10,15,20')
    # Three sections of 100; strides 99/9, 99/14, 99/19, accumulated and rounded.
    expected = (list(range(0, 100, 11))
                + [100 + k for k in (0, 7, 14, 21, 28, 35, 42, 49, 57, 64, 71, 78, 85, 92,
                                     99)]
                + [200 + k for k in (0, 5, 10, 16, 21, 26, 31, 36, 42, 47, 52, 57, 63, 68,
                                     73, 78, 83, 89, 94, 99)])
    assert steps == expected
    assert schedules.space_timesteps(100, 'ddim10') == list(range(0, 100, 10))
    assert schedules.space_timesteps(10, 'ddim3') == [0, 4, 8]
    assert schedules.space_timesteps(10, '2,3') == [0, 4, 5, 7, 9]
    # Sections of 6 and 5; stride 2.5 rounds half to even: 2.5 -> 2.
    assert schedules.space_timesteps(11, '3,2') == [0, 2, 5, 6, 10]
    assert schedules.space_timesteps(10, '1') == [0]
    assert schedules.space_timesteps(5, '') == [0, 1, 2, 3, 4]
    assert schedules.space_timesteps(5, [4, 0, 2]) == [0, 2, 4]


def test_respace_composes_timestep_maps():
    full = schedules.make_schedule('linear', 100)
    half = schedules.respace(full, '50')
    quarter = schedules.respace(half, 'ddim10')
    expected_t = np.asarray(schedules.space_timesteps(100, '50'))[list(range(0, 50, 5))]
    np.testing.assert_array_equal(quarter.timesteps, expected_t)
    abar = np.cumprod(1 - schedules.get_beta_schedule('linear', 100))
    np.testing.assert_allclose(quarter.alphas_cumprod, abar[expected_t], rtol=1e-5)
    direct = schedules.make_schedule('linear', 100, list(expected_t))
    np.testing.assert_allclose(quarter.betas, direct.betas, rtol=1e-5)


@pytest.mark.parametrize('call,match', [
    (lambda: schedules.get_beta_schedule('cosin', 10), 'valid'),
    (lambda: schedules.get_beta_schedule('linear', 0), 'num_timesteps'),
    (lambda: schedules.make_schedule('bogus', 10), 'bogus'),
    (lambda: schedules.create_schedule(np.array([0.1, 0.0])), r'\(0, 1\]'),
    (lambda: schedules.create_schedule(np.array([0.1, 1.5])), r'\(0, 1\]'),
    (lambda: schedules.create_schedule(np.array([-0.1, 0.5])), r'\(0, 1\]'),
    (lambda: schedules.create_schedule(np.array([0.1, 0.2]), [0]), 'shape'),
    (lambda: schedules.space_timesteps(300, '5,200'), 'section'),
    (lambda: schedules.space_timesteps(100, 'ddim30'), 'exactly 30'),
    (lambda: schedules.space_timesteps(100, 'ddimx'), 'ddim'),
    (lambda: schedules.space_timesteps(100, 'ten'), 'parse'),
    (lambda: schedules.space_timesteps(10, [3, 10]), 'range'),
    (lambda: schedules.space_timesteps(10, [3, 3]), 'Duplicate'),
    (lambda: schedules.make_schedule('linear', 10, '11'), 'section'),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_endpoints_give_latent_diffusions_schedule():
    """LDM's 'linear' (make_beta_schedule: linspace(sqrt(0.0015), sqrt(0.0195), 1000) ** 2,
    float64) is 'quadratic' with beta_start / beta_end; endpoints are used as given
    (no 1000 / T scaling), and a schedule without endpoints refuses them."""
    ldm = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_array_equal(
        schedules.get_beta_schedule('quadratic', 1000, 0.0015, 0.0195), ldm)
    sched = schedules.make_schedule('quadratic', 1000, beta_start=0.0015, beta_end=0.0195)
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), np.cumprod(1 - ldm),
                               rtol=1e-6)
    np.testing.assert_array_equal(schedules.get_beta_schedule('linear', 100, 0.001, 0.01),
                                  np.linspace(0.001, 0.01, 100))
    assert schedules.get_beta_schedule('quadratic', 1000)[0] == pytest.approx(1e-4)
    for name, start, end, match in (('cosine', 0.001, 0.01, "schedule 'cosine' has no"),
                                    ('linear', 0.01, 0.001, 'need 0 < beta_start'),
                                    ('linear', 0.0, 0.01, 'need 0 < beta_start')):
        with pytest.raises(ValueError, match=match):
            schedules.make_schedule(name, 10, beta_start=start, beta_end=end)
