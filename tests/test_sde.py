"""Tests for ddpm_jax.sde: marginals, discretisations, reverse drifts and the VP view."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import schedules
from ddpm_jax import sde as sde_lib

MU = np.array([0.5, -0.3, 0.1])
S = np.array([0.4, 0.8, 0.2])


def _np_vp_alpha(t, b0=0.1, b1=20.0):
    return np.exp(-0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0)


def test_vp_discretisation_is_the_linear_schedule():
    betas = sde_lib.vp_discrete_betas(sde_lib.VPSDE(0.1, 20.0, 1000))
    i = np.arange(1000, dtype=np.float64)
    formula = 0.1 / 1000 + i * (20.0 - 0.1) / (1000 * 999)
    np.testing.assert_allclose(betas, formula, rtol=1e-12, atol=0)
    np.testing.assert_allclose(betas, schedules.get_beta_schedule('linear', 1000),
                               rtol=1e-12, atol=0)
    # And the chain's log abar approximates the SDE's log alpha(t)^2 at t = (i + 1) / N
    # (log(1 - b) = -b - b^2 / 2 - ...: 0.7 % at the end).
    log_abar = np.cumsum(np.log1p(-betas))
    t = (i + 1) / 1000
    np.testing.assert_allclose(log_abar, 2 * np.log(_np_vp_alpha(t)), rtol=1e-2, atol=1e-3)


def test_discretize_is_the_ddpm_step_and_the_smld_step():
    vp = sde_lib.VPSDE(num_scales=100)
    betas = sde_lib.vp_discrete_betas(vp)
    t100 = jnp.arange(100) / 99.0
    f, g = sde_lib.discretize(vp, jnp.ones((100, 2)), t100)
    np.testing.assert_allclose(np.asarray(1.0 + f)[:, 0], np.sqrt(1 - betas), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.sqrt(betas), rtol=1e-6)
    x = jnp.ones((10, 2))
    t = jnp.arange(10) / 9.0
    ve = sde_lib.VESDE(0.01, 50.0, 10)
    sig = np.exp(np.linspace(np.log(0.01), np.log(50.0), 10))
    f, g = sde_lib.discretize(ve, x, t)
    np.testing.assert_array_equal(np.asarray(f), 0.0)
    expected = np.sqrt(sig ** 2 - np.append(0.0, sig[:-1]) ** 2)
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5)
    np.testing.assert_allclose(sde_lib.ve_discrete_sigmas(ve), sig, rtol=1e-12)


@pytest.mark.parametrize('kind', ['vp', 'subvp', 've'])
def test_marginal_closed_forms(kind):
    t = np.array([1e-3, 0.1, 0.5, 1.0])
    a = _np_vp_alpha(t)
    if kind == 'vp':
        sde, alpha, std = sde_lib.VPSDE(), a, np.sqrt(1 - a ** 2)
    elif kind == 'subvp':
        sde, alpha, std = sde_lib.SubVPSDE(), a, 1 - a ** 2
    else:
        sde = sde_lib.VESDE(0.01, 50.0)
        alpha, std = np.ones_like(t), 0.01 * (50.0 / 0.01) ** t
    got_a, got_s = sde_lib.marginal_coefs(sde, jnp.asarray(t))
    np.testing.assert_allclose(got_a, alpha, rtol=1e-5)
    np.testing.assert_allclose(got_s, std, rtol=1e-4)
    # The variance ODE of the SDE, dV/dt = 2 (d log alpha / dt) V + g^2 for the kernel's
    # variance V = std^2, holds (finite differences of the closed form).
    h = 1e-3
    tm = np.array([0.2, 0.5, 0.8])
    ap, sp = [np.asarray(v, np.float64) for v in sde_lib.marginal_coefs(sde, tm + h)]
    am, sm = [np.asarray(v, np.float64) for v in sde_lib.marginal_coefs(sde, tm - h)]
    a0, s0 = [np.asarray(v, np.float64) for v in sde_lib.marginal_coefs(sde, tm)]
    _, g = sde_lib.drift_diffusion(sde, jnp.zeros((3, 1)), tm)
    dv = (sp ** 2 - sm ** 2) / (2 * h)
    dlog_a = (np.log(ap) - np.log(am)) / (2 * h)
    # float32 differences: atol covers the cancellation where V is near 1.
    np.testing.assert_allclose(dv, 2 * dlog_a * s0 ** 2 + np.asarray(g, np.float64) ** 2,
                               rtol=2e-3, atol=2e-4)


def test_forward_sde_simulation_matches_the_marginal():
    sde = sde_lib.VPSDE()
    n, steps = 20000, 500
    x0 = jnp.broadcast_to(jnp.asarray(MU, jnp.float32), (n, 3))

    def body(x, k):
        t = jnp.full((n,), k / steps)
        f, g = sde_lib.drift_diffusion(sde, x, t)
        z = jax.random.normal(jax.random.fold_in(jax.random.key(0), k), x.shape)
        return x + f / steps + g[:, None] * math.sqrt(1 / steps) * z, None

    x, _ = jax.lax.scan(body, x0, jnp.arange(steps // 2))  # t = 0.5
    a = _np_vp_alpha(0.5)
    np.testing.assert_allclose(np.mean(x, 0), a * MU, atol=4 * 1 / math.sqrt(n) + 2e-3)
    np.testing.assert_allclose(np.var(x, 0), 1 - a ** 2, rtol=0.04)


def test_perturb_and_marginal_prob():
    sde = sde_lib.SubVPSDE()
    x0 = jnp.asarray(np.tile(MU, (2, 1)), jnp.float32)
    t = jnp.asarray([0.2, 0.9])
    noise = jnp.ones_like(x0)
    a = _np_vp_alpha(np.asarray([0.2, 0.9]))[:, None]
    np.testing.assert_allclose(sde_lib.perturb(sde, x0, t, noise), a * MU + (1 - a ** 2),
                               rtol=1e-5)
    mean, std = sde_lib.marginal_prob(sde, x0, t)
    np.testing.assert_allclose(mean, a * MU, rtol=1e-5)
    np.testing.assert_allclose(std, (1 - a ** 2)[:, 0], rtol=1e-5)


@pytest.mark.parametrize('sde', [sde_lib.VPSDE(), sde_lib.VESDE(0.01, 50.0)])
def test_prior_sample_and_logp(sde):
    z = sde_lib.prior_sample(sde, jax.random.key(1), (4, 2, 3))
    s = sde_lib.prior_std(sde)
    assert z.shape == (4, 2, 3)
    zz = np.asarray(z, np.float64).reshape(4, -1)
    expected = np.sum(-0.5 * np.log(2 * np.pi * s * s) - zz ** 2 / (2 * s * s), axis=1)
    np.testing.assert_allclose(sde_lib.prior_logp(sde, z), expected, rtol=1e-5)


def _gauss_score(sde):
    def score(x, t):
        a, std = sde_lib.marginal_coefs(sde, t)
        a, std = a[:, None], std[:, None]
        return -(x - a * MU) / (a ** 2 * S ** 2 + std ** 2)
    return score


def test_reverse_drift_and_probability_flow():
    sde = sde_lib.VPSDE()
    x = jnp.asarray(np.random.RandomState(0).randn(5, 3), jnp.float32)
    t = jnp.full((5,), 0.3)
    score = _gauss_score(sde)
    f, g = sde_lib.drift_diffusion(sde, x, t)
    b = 0.1 + 0.3 * 19.9
    np.testing.assert_allclose(f, -0.5 * b * np.asarray(x), rtol=1e-5)
    np.testing.assert_allclose(g, np.sqrt(b), rtol=1e-6)
    rd, rg = sde_lib.reverse_drift_diffusion(sde, score, x, t)
    od = sde_lib.ode_drift(sde, score, x, t)
    s = np.asarray(score(x, t))
    np.testing.assert_allclose(rd, np.asarray(f) - b * s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(od, np.asarray(f) - 0.5 * b * s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rg, np.sqrt(b), rtol=1e-6)
    # The probability-flow ODE transports the Gaussian marginal: the standardised
    # coordinate (x - alpha mu) / std_x is constant, so dx/dt = (x - alpha mu) d log std_x
    # + alpha' mu, with std_x^2 = alpha^2 S^2 + std^2 (closed form in float64).
    tt, h = 0.3, 1e-4
    def std_x(t):
        a = _np_vp_alpha(t)
        return np.sqrt(a ** 2 * S ** 2 + 1 - a ** 2)
    a = _np_vp_alpha(tt)
    da = (_np_vp_alpha(tt + h) - _np_vp_alpha(tt - h)) / (2 * h)
    dlog = (np.log(std_x(tt + h)) - np.log(std_x(tt - h))) / (2 * h)
    expected = (np.asarray(x, np.float64) - a * MU) * dlog + da * MU
    np.testing.assert_allclose(od, expected, rtol=1e-3, atol=1e-4)


def test_vp_view_knots_and_inverse_sigma():
    sched = schedules.make_schedule('cosine', 50)
    view = sde_lib.vp_view(sched)
    t = jnp.arange(50) / 49.0
    alpha, std = sde_lib.marginal_coefs(view, t)
    abar = np.cumprod(1 - schedules.get_beta_schedule('cosine', 50))
    np.testing.assert_allclose(np.asarray(alpha) ** 2, abar, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(std) ** 2, 1 - abar, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(sde_lib.t_to_step(view, t), np.arange(50))
    # beta(t) = -d log abar / dt between knots.
    tm = jnp.asarray([0.105, 0.5, 0.77])
    h = 1e-4
    lp = np.log(np.asarray(sde_lib.marginal_coefs(view, tm + h)[0], np.float64) ** 2)
    lm = np.log(np.asarray(sde_lib.marginal_coefs(view, tm - h)[0], np.float64) ** 2)
    np.testing.assert_allclose(sde_lib.beta(view, tm), -(lp - lm) / (2 * h), rtol=2e-2)
    for sde in (view, sde_lib.VPSDE(), sde_lib.VESDE()):
        tt = jnp.asarray([0.01, 0.3, 0.9])
        np.testing.assert_allclose(
            sde_lib.t_of_sigma(sde, sde_lib.sigma_of_t(sde, tt)), tt, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize('mean_type', ['eps', 'x0', 'v'])
def test_vp_view_score_of_an_exact_gaussian_model(mean_type):
    """Any parameterisation of the exact Gaussian denoiser gives the exact score."""
    sched = schedules.make_schedule('linear', 100)
    abar_all = np.cumprod(1 - schedules.get_beta_schedule('linear', 100))

    def model_fn(x, t):
        abar = jnp.asarray(abar_all, jnp.float32)[t][:, None]
        a, sg = jnp.sqrt(abar), jnp.sqrt(1 - abar)
        x0 = MU + a * S ** 2 / (abar * S ** 2 + 1 - abar) * (x - a * MU)
        eps = (x - a * x0) / sg
        return {'eps': eps, 'x0': x0, 'v': a * eps - sg * x0}[mean_type]

    view, score = sde_lib.make_vp_score_fn(model_fn, sched, mean_type=mean_type)
    t = jnp.asarray([0.0, 10 / 99, 0.5, 1.0, 77 / 99])
    x = jnp.asarray(np.random.RandomState(1).randn(5, 3), jnp.float32)
    i = np.round(np.asarray(t) * 99).astype(int)
    abar = abar_all[i][:, None]
    expected = -(np.asarray(x, np.float64) - np.sqrt(abar) * MU) / (abar * S ** 2 + 1 - abar)
    np.testing.assert_allclose(score(x, t), expected, rtol=2e-4, atol=2e-4)
    assert isinstance(view, sde_lib.DiscreteVPSDE)


def test_vp_view_classifier_guidance_shifts_the_score():
    sched = schedules.make_schedule('linear', 100)
    model = lambda x, t, y=None: jnp.zeros_like(x) + y[:, None]  # noqa: E731
    grad = lambda x, t, y=None: jnp.full_like(x, 2.0) * t[:, None]  # noqa: E731
    kwargs = {'y': jnp.asarray([1.0, -1.0])}
    _, plain = sde_lib.make_vp_score_fn(model, sched, model_kwargs=kwargs)
    _, guided = sde_lib.make_vp_score_fn(model, sched, model_kwargs=kwargs, cond_fn=grad,
                                         classifier_scale=0.5)
    x = jnp.ones((2, 3))
    t = jnp.asarray([0.5, 1.0])
    std = np.sqrt(1 - np.cumprod(1 - schedules.get_beta_schedule('linear', 100)))
    i = np.array([50, 99])  # round(t * 99).
    np.testing.assert_allclose(plain(x, t), -np.array([[1.0], [-1.0]]) / std[i, None]
                               * np.ones((2, 3)), rtol=1e-5)
    np.testing.assert_allclose(guided(x, t) - plain(x, t), 0.5 * 2.0 * i[:, None]
                               * np.ones((2, 3)), rtol=1e-5)


@pytest.mark.parametrize('kind', ['vp', 'subvp'])
def test_t_of_sigma_inverts_the_forward_marginal_in_float64(kind):
    """t(sigma) against the float64 forward map: alpha(t) = exp(-t^2 (b1 - b0) / 4 -
    t b0 / 2), sigma = std / alpha with std = sqrt(1 - alpha^2) (VP) or 1 - alpha^2
    (sub-VP, Song et al. 2021b, Eq. 29); and sigma(t(sigma)) = sigma from 1e-4 to 200."""
    sde = sde_lib.VPSDE() if kind == 'vp' else sde_lib.SubVPSDE()
    t = np.array([1e-4, 1e-3, 0.02, 0.25, 0.5, 0.8, 1.0])
    alpha = np.exp(-t ** 2 * (sde.beta_max - sde.beta_min) / 4 - t * sde.beta_min / 2)
    std = np.sqrt(1 - alpha ** 2) if kind == 'vp' else 1 - alpha ** 2
    sigma = std / alpha
    np.testing.assert_allclose(sde_lib.sigma_of_t(sde, jnp.asarray(t)), sigma, rtol=2e-4)
    np.testing.assert_allclose(sde_lib.t_of_sigma(sde, jnp.asarray(sigma)), t, rtol=1e-5)
    sig = np.geomspace(1e-4, 200.0, 13)
    np.testing.assert_allclose(
        sde_lib.sigma_of_t(sde, sde_lib.t_of_sigma(sde, jnp.asarray(sig))), sig, rtol=1e-4)
    if kind == 'subvp':  # Not the VP inverse: the two differ by far more than rounding.
        assert abs(float(sde_lib.t_of_sigma(sde, 1.0))
                   - float(sde_lib.t_of_sigma(sde_lib.VPSDE(), 1.0))) > 0.04


def test_sigma_score_is_the_score_of_y():
    """grad_y log p(y; sigma) for Gaussian data, y = x_0 + sigma n in every SDE's VE
    variables: -(y - MU) / (S^2 + sigma^2)."""
    y = jnp.asarray(np.random.RandomState(3).randn(4, 3) * 2, jnp.float32)
    sigma = jnp.asarray([0.05, 0.5, 2.0, 10.0])
    sg = np.asarray(sigma, np.float64)[:, None]
    expected = -(np.asarray(y, np.float64) - MU) / (S ** 2 + sg ** 2)
    for sde in (sde_lib.VPSDE(), sde_lib.SubVPSDE(), sde_lib.VESDE(0.01, 50.0)):
        score = sde_lib.sigma_score_from_score(sde, _gauss_score(sde))
        np.testing.assert_allclose(score(y, sigma), expected, rtol=2e-3, atol=2e-4)


def test_denoiser_from_score_is_tweedie():
    sde = sde_lib.VPSDE()
    denoise = sde_lib.denoiser_from_score(sde, _gauss_score(sde))
    y = jnp.asarray(np.random.RandomState(2).randn(4, 3) * 3, jnp.float32)
    sigma = jnp.asarray([0.1, 1.0, 3.0, 20.0])
    sg = np.asarray(sigma, np.float64)[:, None]
    expected = MU + S ** 2 / (S ** 2 + sg ** 2) * (np.asarray(y, np.float64) - MU)
    np.testing.assert_allclose(denoise(y, sigma), expected, rtol=1e-3, atol=1e-3)


def test_ncsn_sigmas_and_errors():
    sig = sde_lib.ncsn_sigmas(1.0, 0.01, 10)
    np.testing.assert_allclose(sig, np.geomspace(1.0, 0.01, 10), rtol=1e-12)
    with pytest.raises(ValueError, match='sigma_1'):
        sde_lib.ncsn_sigmas(0.01, 1.0, 10)
    with pytest.raises(ValueError, match='beta_min'):
        sde_lib.validate_sde(sde_lib.VPSDE(beta_min=30.0))
    with pytest.raises(ValueError, match='sigma_min'):
        sde_lib.validate_sde(sde_lib.VESDE(sigma_min=0.0))
    with pytest.raises(ValueError, match='prior_mean'):
        sde_lib.validate_sde(sde_lib.VESDE(prior_mean=float('nan')))
    with pytest.raises(ValueError, match='num_scales'):
        sde_lib.validate_sde(sde_lib.VPSDE(num_scales=1))
    with pytest.raises(ValueError, match='num_scales'):
        sde_lib.validate_sde(sde_lib.VPSDE(num_scales=10))  # beta_max / N = 2 > 1.
    with pytest.raises(ValueError, match='mean_type'):
        sde_lib.make_vp_score_fn(lambda x, t: x, schedules.make_schedule('linear', 10),
                                 mean_type='score')
    with pytest.raises(ValueError, match='jsd'):
        sde_lib.vp_view(schedules.make_schedule('jsd', 10))
    assert diffusion.MEAN_TYPES  # The view accepts exactly diffusion's mean types.


def test_ve_prior_with_a_mean_is_score_sdes_prior_in_our_units():
    """score_sde's VE prior N(0, 50^2) on x in [0, 1], through y = 2x - 1, is
    N(-1, 100^2): the density of y is that of x over 2^D."""
    sde = sde_lib.VESDE(0.02, 100.0, 1000, prior_mean=-1.0)
    y = np.random.default_rng(0).normal(-1.0, 100.0, (3, 4, 4, 2))
    x = (y + 1.0) / 2.0
    d = x[0].size
    theirs = (-0.5 * d * np.log(2 * np.pi * 50.0 ** 2)
              - 0.5 * np.sum(x.reshape(3, -1) ** 2, axis=1) / 50.0 ** 2)
    np.testing.assert_allclose(sde_lib.prior_logp(sde, jnp.asarray(y, jnp.float32)),
                               theirs - d * np.log(2.0), rtol=1e-6)
    centred = sde_lib.prior_logp(sde._replace(prior_mean=0.0), jnp.asarray(y, jnp.float32))
    assert np.all(np.abs(np.asarray(centred) - (theirs - d * np.log(2.0))) > 1e-3)
    key = jax.random.key(3)
    np.testing.assert_allclose(sde_lib.prior_sample(sde, key, (5, 3)),
                               -1.0 + 100.0 * jax.random.normal(key, (5, 3)), rtol=1e-6)
