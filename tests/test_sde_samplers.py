"""Tests for ddpm_jax.sde_samplers on Gaussian data, whose score is known in closed form.

x_0 ~ N(MU, diag(S^2)); at time t of a VP / VE SDE the marginal is
N(alpha MU, alpha^2 S^2 + std^2), so the exact score, denoiser and probability-flow map
(the standardised coordinate is conserved) serve as the "model".
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import samplers
from ddpm_jax import schedules
from ddpm_jax import sde as sde_lib
from ddpm_jax import sde_samplers

DIM = 16
_RS = np.random.RandomState(0)
MU = _RS.uniform(-0.5, 0.5, DIM)
S = _RS.uniform(0.2, 0.8, DIM)


def gauss_score(sde):
    def score(x, t):
        a, std = sde_lib.marginal_coefs(sde, t)
        a, std = a[:, None], std[:, None]
        return -(x - a * MU) / (a ** 2 * S ** 2 + std ** 2)
    return score


def exact_flow(sde, x, t_from, t_to):
    """The probability-flow map of Gaussian data, float64."""
    a0, s0 = [float(v) for v in sde_lib.marginal_coefs(sde, jnp.float32(t_from))]
    a1, s1 = [float(v) for v in sde_lib.marginal_coefs(sde, jnp.float32(t_to))]
    std0 = np.sqrt(a0 ** 2 * S ** 2 + s0 ** 2)
    std1 = np.sqrt(a1 ** 2 * S ** 2 + s1 ** 2)
    return a1 * MU + std1 / std0 * (np.asarray(x, np.float64) - a0 * MU)


def assert_data_moments(x, var_tol):
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    # Mean within 5 standard errors; variance ratio within var_tol (sampling + bias).
    np.testing.assert_array_less(np.abs(x.mean(0) - MU), 5 * S / np.sqrt(n) + 0.01)
    np.testing.assert_allclose(x.var(0) / S ** 2, 1.0, atol=var_tol)


@pytest.mark.parametrize('solver', ['tsit5', pytest.param('dopri5', marks=pytest.mark.slow)])
def test_ode_sample_is_the_exact_flow_map(solver):
    sde = sde_lib.VPSDE()
    z = jax.random.normal(jax.random.key(0), (2000, DIM))
    out = jax.jit(lambda z: sde_samplers.ode_sample(
        sde, gauss_score(sde), z.shape, None, x_init=z, solver=solver))(z)
    np.testing.assert_allclose(out.samples, exact_flow(sde, z, 1.0, 1e-3), atol=2e-3)
    assert_data_moments(out.samples, 0.15)
    assert 20 < int(out.nfe) < 400


def test_ode_sample_denoise_is_one_reverse_diffusion_mean_step():
    """score_sde's noise removal after the ODE: at t = eps (discrete VP step 0,
    beta_0 = b0 / N), x + (1 - sqrt(1 - beta_0)) x + beta_0 s(x, eps), in float64."""
    sde = sde_lib.VPSDE()
    z = jax.random.normal(jax.random.key(0), (500, DIM))
    run = lambda denoise: jax.jit(lambda z: sde_samplers.ode_sample(  # noqa: E731
        sde, gauss_score(sde), z.shape, None, x_init=z, denoise=denoise))(z)
    plain, denoised = run(False), run(True)
    assert int(denoised.nfe) == int(plain.nfe) + 1
    x = np.asarray(plain.samples, np.float64)
    beta = 0.1 / 1000
    a, std = [float(v) for v in sde_lib.marginal_coefs(sde, jnp.float32(1e-3))]
    score = -(x - a * MU) / (a ** 2 * S ** 2 + std ** 2)
    expected = x + (1.0 - np.sqrt(1.0 - beta)) * x + beta * score
    np.testing.assert_allclose(denoised.samples, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected - x).max() > 1e-3  # The step is not negligible here.


@pytest.mark.slow
def test_ode_sample_ve():
    sde = sde_lib.VESDE(0.01, 10.0)
    z = 10.0 * jax.random.normal(jax.random.key(1), (500, DIM))
    out = sde_samplers.ode_sample(sde, gauss_score(sde), z.shape, None, x_init=z,
                                  eps=1e-5, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.samples, exact_flow(sde, z, 1.0, 1e-5), atol=2e-3)


def _em_exact_law(sde, num_steps, eps):
    """Mean and variance of pc_sample's Euler-Maruyama output (denoised), float64."""
    m, v = np.zeros(DIM), np.ones(DIM)
    dt = 1.0 / num_steps
    for t in np.linspace(1.0, eps, num_steps, dtype=np.float32).astype(np.float64):
        a, std = [float(u) for u in sde_lib.marginal_coefs(sde, jnp.float32(t))]
        b = 0.1 + t * 19.9
        var_t = a ** 2 * S ** 2 + std ** 2
        # x_mean = x - [f - g^2 s] dt = c1 x + c0.
        c1 = 1 + 0.5 * b * dt - b * dt / var_t
        c0 = b * dt * a * MU / var_t
        m, v_mean = c1 * m + c0, c1 ** 2 * v
        v = v_mean + b * dt
    return m, v_mean


def test_euler_maruyama_matches_its_exact_law_and_the_data():
    sde = sde_lib.VPSDE()
    n = 4000
    out = jax.jit(lambda r: sde_samplers.pc_sample(
        sde, gauss_score(sde), (n, DIM), r, num_steps=100))(jax.random.key(2))
    assert int(out.nfe) == 100
    m, v = _em_exact_law(sde, 100, 1e-3)
    x = np.asarray(out.samples, np.float64)
    np.testing.assert_array_less(np.abs(x.mean(0) - m), 5 * np.sqrt(v / n))
    np.testing.assert_allclose(x.var(0) / v, 1.0, atol=5 * np.sqrt(2 / n))
    # The algorithm's own law is close to the data at 100 steps.
    np.testing.assert_allclose(m, MU, atol=0.02)
    np.testing.assert_allclose(v / S ** 2, 1.0, atol=0.1)


@pytest.mark.parametrize('sde,predictor,corrector,eps', [
    (sde_lib.VPSDE(num_scales=200), 'reverse_diffusion', 'none', 1e-3),
    (sde_lib.VPSDE(num_scales=200), 'euler_maruyama', 'langevin', 1e-3),
    pytest.param(sde_lib.SubVPSDE(num_scales=200), 'euler_maruyama', 'none', 1e-3,
                 marks=pytest.mark.slow),
    pytest.param(sde_lib.VESDE(0.01, 5.0, 200), 'reverse_diffusion', 'langevin', 1e-5,
                 marks=pytest.mark.slow),
])
def test_reverse_sde_and_pc_samples_have_the_data_moments(sde, predictor, corrector, eps):
    out = sde_samplers.pc_sample(sde, gauss_score(sde), (2000, DIM), jax.random.key(3),
                                 num_steps=200, predictor=predictor, corrector=corrector,
                                 snr=0.16, eps=eps)
    assert int(out.nfe) == 200 * (2 if corrector == 'langevin' else 1)
    assert_data_moments(out.samples, 0.17)


def _ancestral_exact_law(sde, num_steps, eps, corrector, snr):
    """Mean and variance per dimension of pc_sample's 'ancestral_sampling' output
    (denoised) with corrector 'ald' or 'none', float64: on Gaussian data every step is
    affine in x, so the law stays Gaussian (score_sde's AncestralSamplingPredictor and
    AnnealedLangevinDynamics written out)."""
    m, v = np.zeros(DIM), np.full(DIM, sde_lib.prior_std(sde) ** 2)
    n = sde.num_scales
    ve = isinstance(sde, sde_lib.VESDE)
    ladder = (sde_lib.ve_discrete_sigmas(sde) if ve else sde_lib.vp_discrete_betas(sde))
    for t in np.linspace(1.0, eps, num_steps, dtype=np.float32):
        a, std = [float(u) for u in sde_lib.marginal_coefs(sde, jnp.float32(t))]
        var_t = a ** 2 * S ** 2 + std ** 2  # score = -(x - a MU) / var_t.
        i = int(np.floor(np.float32(t) * (n - 1) * (1 + 1e-5)))
        if corrector == 'ald':  # x += step s + sqrt(2 step) z, step = 2 alpha (r std)^2.
            alpha = 1.0 if ve else 1.0 - ladder[i]
            step = 2.0 * alpha * (snr * std) ** 2
            c1, c0 = 1 - step / var_t, step * a * MU / var_t
            m, v = c1 * m + c0, c1 ** 2 * v + 2 * step
        if ve:  # x_mean = x + (s_i^2 - s_{i-1}^2) s; var s_{i-1}^2 (s_i^2 - s_{i-1}^2) / s_i^2.
            d = ladder[i] ** 2 - (ladder[i - 1] ** 2 if i > 0 else 0.0)
            c1, c0, noise = 1 - d / var_t, d * a * MU / var_t, (ladder[i] ** 2 - d) * d / ladder[i] ** 2
        else:  # x_mean = (x + beta s) / sqrt(1 - beta); var beta.
            b = ladder[i]
            c1, c0, noise = (1 - b / var_t) / np.sqrt(1 - b), b * a * MU / var_t / np.sqrt(1 - b), b
        m, v_mean = c1 * m + c0, c1 ** 2 * v
        v = v_mean + noise
    return m, v_mean


@pytest.mark.parametrize('sde, corrector, eps', [
    (sde_lib.VPSDE(num_scales=100), 'none', 1e-3),
    (sde_lib.VPSDE(num_scales=100), 'ald', 1e-3),
    (sde_lib.VESDE(0.01, 5.0, 100), 'ald', 1e-5),
])
def test_ancestral_predictor_and_ald_corrector_match_their_exact_law(sde, corrector, eps):
    n = 4000
    out = jax.jit(lambda r: sde_samplers.pc_sample(
        sde, gauss_score(sde), (n, DIM), r, num_steps=100, eps=eps,
        predictor='ancestral_sampling', corrector=corrector, snr=0.16))(jax.random.key(5))
    assert int(out.nfe) == 100 * (2 if corrector == 'ald' else 1)
    m, v = _ancestral_exact_law(sde, 100, eps, corrector, 0.16)
    x = np.asarray(out.samples, np.float64)
    np.testing.assert_array_less(np.abs(x.mean(0) - m), 5 * np.sqrt(v / n) + 1e-4)
    np.testing.assert_allclose(x.var(0) / v, 1.0, atol=5 * np.sqrt(2 / n))
    # The algorithm's own law reaches the data (the chain is the DDPM / SMLD one).
    np.testing.assert_allclose(m, MU, atol=0.03)
    np.testing.assert_allclose(v / S ** 2, 1.0, atol=0.12)


@pytest.mark.parametrize('sde', [sde_lib.VPSDE(num_scales=50), sde_lib.VESDE(0.01, 5.0, 50)])
def test_ancestral_step_by_hand(sde):
    """sde.ancestral_step against score_sde's AncestralSamplingPredictor in float64, at
    the chain's first and last steps and between knots (i = int(t (N - 1)))."""
    t = np.array([1.0, 0.5, 0.013, 0.0], np.float32)
    x = np.random.RandomState(1).normal(size=(4, DIM)).astype(np.float32)
    score = lambda x, t: -x * 0.7 + 0.1  # noqa: E731
    x_mean, std = sde_lib.ancestral_step(sde, score, jnp.asarray(x), jnp.asarray(t))
    i = np.floor(t.astype(np.float64) * 49 * (1 + 1e-5)).astype(int)
    s = -x.astype(np.float64) * 0.7 + 0.1
    if isinstance(sde, sde_lib.VESDE):
        sig = sde_lib.ve_discrete_sigmas(sde)
        prev = np.where(i > 0, sig[np.maximum(i - 1, 0)], 0.0)
        want_mean = x + (sig[i] ** 2 - prev ** 2)[:, None] * s
        want_std = np.sqrt(prev ** 2 * (sig[i] ** 2 - prev ** 2) / sig[i] ** 2)
        assert want_std[-1] == 0.0  # The last step adds no noise.
    else:
        b = sde_lib.vp_discrete_betas(sde)[i]
        want_mean = (x + b[:, None] * s) / np.sqrt(1 - b)[:, None]
        want_std = np.sqrt(b)
    np.testing.assert_allclose(x_mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, want_std, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('sde', [sde_lib.VPSDE(num_scales=50), sde_lib.VESDE(0.01, 5.0, 50)])
def test_ald_corrector_step_is_r_std_squared(sde):
    """One 'ald' step from a fixed x: x + step s + sqrt(2 step) z with step = 2 alpha
    (r std(t))^2 (score_sde's AnnealedLangevinDynamics), whatever the batch holds; the
    batch's mean and variance estimate both terms ('langevin' takes another step)."""
    n, r, x0 = 4000, 0.3, 3.0
    run = lambda corrector: np.asarray(sde_samplers.pc_sample(  # noqa: E731
        sde, gauss_score(sde), (n, DIM), jax.random.key(6), num_steps=1, eps=1e-3,
        predictor='none', corrector=corrector, snr=r, x_init=jnp.full((n, DIM), x0)).samples,
        np.float64)
    a, std = [float(u) for u in sde_lib.marginal_coefs(sde, jnp.float32(1.0))]
    alpha = 1.0 if isinstance(sde, sde_lib.VESDE) else 1.0 - sde_lib.vp_discrete_betas(sde)[-1]
    step = 2 * alpha * (r * std) ** 2
    drift = step * -(x0 - a * MU) / (a ** 2 * S ** 2 + std ** 2)
    out = run('ald')
    np.testing.assert_array_less(np.abs(out.mean(0) - x0 - drift), 5 * np.sqrt(2 * step / n))
    np.testing.assert_allclose(out.var(0) / (2 * step), 1.0, atol=5 * np.sqrt(2 / n))
    assert np.abs(run('langevin').var(0) / (2 * step) - 1.0).min() > 0.3


def test_ancestral_predictor_refuses_sub_vp():
    sde = sde_lib.SubVPSDE()
    with pytest.raises(ValueError, match="'ancestral_sampling'.*sub-VP"):
        sde_samplers.pc_sample(sde, gauss_score(sde), (2, DIM), jax.random.key(0),
                               num_steps=5, predictor='ancestral_sampling')


def test_pc_corrector_only_returns_the_noisy_sample():
    """score_sde's NonePredictor returns (x, x): with no predictor, noise removal keeps
    the last corrector step's noise (the same x with or without `denoise`)."""
    sde = sde_lib.VPSDE()
    run = lambda predictor, denoise: np.asarray(sde_samplers.pc_sample(  # noqa: E731
        sde, gauss_score(sde), (8, DIM), jax.random.key(4), num_steps=5,
        predictor=predictor, corrector='langevin', denoise=denoise).samples)
    np.testing.assert_array_equal(run('none', True), run('none', False))
    assert np.abs(run('reverse_diffusion', True) - run('reverse_diffusion', False)).max() > 1e-3


@pytest.mark.slow
def test_pc_corrector_only_is_worse_than_pc():
    """The test can fail: without a predictor, one Langevin step per level does not
    reach the data (variance far too large for VE), while PC does."""
    sde = sde_lib.VESDE(0.01, 5.0, 200)
    out = sde_samplers.pc_sample(sde, gauss_score(sde), (500, DIM), jax.random.key(4),
                                 num_steps=200, predictor='none', corrector='langevin',
                                 eps=1e-5)
    assert np.min(np.var(np.asarray(out.samples), 0) / S ** 2) > 2.0


def _langevin_law(sigmas, step, per_level, denoise=False, start_var=None):
    """Mean and variance per dimension of annealed Langevin dynamics on N(MU, S^2) data
    with the exact score, from x of mean 0 and variance `start_var` (default sigma_1^2,
    the prior): each step is linear, x' = MU + c (x - MU) + sqrt(2 a) z with
    c = 1 - a / (S^2 + sigma^2), float64."""
    sig = np.asarray(sigmas, np.float32).astype(np.float64)
    m, v = np.zeros(DIM), np.full(DIM, sig[0] ** 2 if start_var is None else start_var)
    for s in sig:
        a = step * (s / sig[-1]) ** 2
        c = 1 - a / (S ** 2 + s ** 2)
        for _ in range(per_level):
            m, v = MU + c * (m - MU), c ** 2 * v + 2 * a
    if denoise:  # x + sigma_L^2 s = MU + S^2 / (S^2 + sigma_L^2) (x - MU).
        c = S ** 2 / (S ** 2 + sig[-1] ** 2)
        m, v = MU + c * (m - MU), c ** 2 * v
    return m, v


def _gauss_sigma_score(x, sigma):
    return -(x - MU) / (S ** 2 + sigma[:, None] ** 2)


@pytest.mark.parametrize('denoise', [False, True])
def test_annealed_langevin_matches_its_exact_law_and_the_data(denoise):
    """NCSN's settings (eps 2e-5, T 100, sigma 1 .. 0.01, L 10) on Gaussian data with the
    exact score: the sample mean and variance are the closed-form law's within sampling
    error, and that law is the data's (variance within 5 %)."""
    sigmas = sde_lib.ncsn_sigmas(1.0, 0.01, 10)
    step, per_level, n = 2e-5, 100, 4000
    out = jax.jit(lambda r: sde_samplers.annealed_langevin_sample(
        _gauss_sigma_score, sigmas, (n, DIM), r, step_size=step, steps_per_level=per_level,
        denoise=denoise))(jax.random.key(5))
    assert int(out.nfe) == 1000 + denoise
    m, v = _langevin_law(sigmas, step, per_level, denoise)
    x = np.asarray(out.samples, np.float64)
    np.testing.assert_array_less(np.abs(x.mean(0) - m), 5 * np.sqrt(v / n))
    np.testing.assert_allclose(x.var(0) / v, 1.0, atol=5 * np.sqrt(2 / n))
    # Pooled over the dimensions: 4 standard errors, tight enough to tell the law of half
    # the step (NCSN's printed alpha / 2 form read as ours) from this one.
    pooled_tol = 4 * np.sqrt(2 / (n * DIM))
    np.testing.assert_allclose(np.mean(x.var(0) / v), 1.0, atol=pooled_tol)
    _, v_half = _langevin_law(sigmas, step / 2, per_level, denoise)
    assert abs(np.mean(v_half / v) - 1) > pooled_tol
    np.testing.assert_allclose(v / S ** 2, 1.0, atol=0.05)
    np.testing.assert_allclose(m, MU, atol=0.01)


def test_annealed_langevin_uniform_start_is_ncsns():
    """init='uniform' starts from U(-1, 1) (NCSN's torch.rand over the data range): a
    short run's law is the one from variance 1/3, not from the prior's sigma_1^2 = 4;
    with a negligible step the samples are the start itself."""
    sigmas = sde_lib.ncsn_sigmas(2.0, 1.0, 2)
    n = 8000
    run = lambda step, init: sde_samplers.annealed_langevin_sample(  # noqa: E731
        _gauss_sigma_score, sigmas, (n, DIM), jax.random.key(6), step_size=step,
        steps_per_level=2, init=init).samples
    x = np.asarray(run(0.05, 'uniform'), np.float64)
    m, v = _langevin_law(sigmas, 0.05, 2, start_var=1 / 3)
    _, v_prior = _langevin_law(sigmas, 0.05, 2)
    assert np.mean(v_prior / v) > 1.5
    np.testing.assert_allclose(np.mean(x.var(0) / v), 1.0, atol=4 * np.sqrt(2 / (n * DIM)))
    np.testing.assert_array_less(np.abs(x.mean(0) - m), 5 * np.sqrt(v / n))
    start = np.asarray(run(1e-14, 'uniform'))
    assert np.abs(start).max() <= 1.0 + 1e-5 and abs(start.var() - 1 / 3) < 0.01
    with pytest.raises(ValueError, match='init must be one of'):
        run(0.05, 'zeros')


def test_langevin_step_sizes_by_hand():
    # alpha_i = eps sigma_i^2 / sigma_L^2: 2e-5 (1 / 0.01)^2 = 0.2, 2e-5 (0.1 / 0.01)^2.
    np.testing.assert_allclose(sde_samplers.langevin_step_sizes([1.0, 0.1, 0.01], 2e-5),
                               [0.2, 2e-3, 2e-5], rtol=1e-12)
    with pytest.raises(ValueError, match='step_size'):
        sde_samplers.langevin_step_sizes([1.0, 0.1], 0.0)
    # The sampler takes those steps: with a zero score from x = 0 it only adds noise,
    # sqrt(2 alpha_i) z per step, so the variance is 2 T sum_i alpha_i = 0.80808.
    n, steps = 4000, 2
    out = sde_samplers.annealed_langevin_sample(
        lambda x, s: jnp.zeros_like(x), [1.0, 0.1, 0.01], (n, DIM), jax.random.key(9),
        step_size=2e-5, steps_per_level=steps, x_init=jnp.zeros((n, DIM)))
    expected = 2 * steps * (0.2 + 2e-3 + 2e-5)
    np.testing.assert_allclose(np.mean(np.var(np.asarray(out.samples, np.float64), 0)),
                               expected, rtol=4 * np.sqrt(2 / (n * DIM)))


def test_ncsnv2_step_size_rule_matches_a_simulated_level():
    """NCSNv2's Eq. 4 against T steps of the linear recursion from variance
    (gamma sigma)^2 at a level sigma of one-point data; its step size brings the ratio to
    its minimum, near 1."""
    gamma, sigma_l, steps = 1.36, 0.01, 5
    eps = sde_samplers.ncsnv2_step_size(gamma, sigma_l, steps)
    for e in (eps, 0.3 * eps, 3.0 * eps):
        for sigma in (sigma_l, 2.5):
            a = e * (sigma / sigma_l) ** 2
            v = (gamma * sigma) ** 2
            for _ in range(steps):
                v = (1 - a / sigma ** 2) ** 2 * v + 2 * a
            np.testing.assert_allclose(
                sde_samplers.langevin_variance_ratio(e, gamma, sigma_l, steps),
                v / sigma ** 2, rtol=1e-10)
    best = sde_samplers.langevin_variance_ratio(eps, gamma, sigma_l, steps)
    assert 1.0 < best < 1.2
    for e in (0.9 * eps, 1.1 * eps):
        assert sde_samplers.langevin_variance_ratio(e, gamma, sigma_l, steps) > best


def _gauss_denoiser(x, sigma):
    sg = sigma[:, None]
    return MU + S ** 2 / (S ** 2 + sg ** 2) * (x - MU)


def test_karras_heun_converges_at_second_order():
    z = jax.random.normal(jax.random.key(6), (64, DIM))
    x_init = MU + np.sqrt(S ** 2 + 80.0 ** 2) * np.asarray(z)
    target = MU + S * np.asarray(z, np.float64)  # The exact flow from sigma = 80 to 0.
    errors = {}
    for n in (20, 40, 80):
        out = sde_samplers.karras_sample(_gauss_denoiser, sde_samplers.karras_sigmas(n),
                                         z.shape, None, x_init=x_init)
        assert int(out.nfe) == 2 * n - 1
        errors[n] = np.abs(np.asarray(out.samples, np.float64) - target).max()
    euler = sde_samplers.karras_sample(_gauss_denoiser, sde_samplers.karras_sigmas(40),
                                       z.shape, None, x_init=x_init, second_order=False)
    assert int(euler.nfe) == 40
    assert errors[20] / errors[40] > 3.0 and errors[40] / errors[80] > 3.0
    assert errors[80] < 5e-3
    assert np.abs(np.asarray(euler.samples) - target).max() > 5 * errors[40]


def test_karras_sigmas_and_snapping():
    sig = np.asarray(sde_samplers.karras_sigmas(5, 0.002, 80.0, rho=7.0), np.float64)
    i = np.arange(5) / 4
    expected = (80.0 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sig, np.append(expected, 0.0), rtol=1e-6)
    sched = schedules.make_schedule('linear', 100)
    ladder = np.asarray(sde_samplers.vp_sigmas(sched), np.float64)
    abar = np.cumprod(1 - schedules.get_beta_schedule('linear', 100))
    np.testing.assert_allclose(ladder, np.sqrt((1 - abar) / abar), rtol=1e-5)
    snapped = np.asarray(sde_samplers.snap_sigmas(jnp.asarray(sig), sched), np.float64)
    assert snapped[-1] == 0.0
    for s_in, s_out in zip(sig[:-1], snapped[:-1]):
        assert s_out == pytest.approx(ladder[np.argmin(np.abs(np.log(ladder / s_in)))],
                                      rel=1e-6)


@pytest.mark.slow
def test_karras_churn_reaches_the_data():
    n = 2000
    out = jax.jit(lambda r: sde_samplers.karras_sample(
        _gauss_denoiser, sde_samplers.karras_sigmas(40), (n, DIM), r, s_churn=40.0,
        s_tmin=0.05, s_tmax=50.0, s_noise=1.003))(jax.random.key(7))
    assert np.all(np.isfinite(out.samples))
    assert_data_moments(out.samples, 0.17)


# ---------------------------------------------------------------------------
# Discrete VP models: the exact Gaussian eps model on the linear schedule.
# ---------------------------------------------------------------------------

T = 1000
ABAR = np.cumprod(1 - schedules.get_beta_schedule('linear', T))
LAMBDA = 0.5 * (np.log(ABAR) - np.log1p(-ABAR))


def eps_model(x, t):
    abar = jnp.asarray(ABAR, jnp.float32)[t][:, None]
    a, sg = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    x0 = MU + a * S ** 2 / (abar * S ** 2 + 1 - abar) * (x - a * MU)
    return (x - a * x0) / sg


def _exact_final(x_T, i_T, i_0):
    """The exact flow from abar[i_T] to abar[i_0] followed by the exact denoiser."""
    aT, a0 = np.sqrt(ABAR[i_T]), np.sqrt(ABAR[i_0])
    sT = np.sqrt(aT ** 2 * S ** 2 + 1 - aT ** 2)
    s0 = np.sqrt(a0 ** 2 * S ** 2 + 1 - a0 ** 2)
    x = a0 * MU + s0 / sT * (np.asarray(x_T, np.float64) - aT * MU)
    return MU + a0 * S ** 2 / (a0 ** 2 * S ** 2 + 1 - a0 ** 2) * (x - a0 * MU)


def _lambda_uniform_schedule(n):
    target = np.linspace(LAMBDA[0], LAMBDA[-1], n)
    kept = sorted({int(np.argmin(np.abs(LAMBDA - lam))) for lam in target})
    return schedules.make_schedule('linear', T, kept), kept


def test_dpm_solver_3m_and_2s_converge_at_their_order():
    x_T = np.asarray(jax.random.normal(jax.random.key(8), (64, DIM)))
    errors = {'3m': [], '3m_exact': [], '2s': []}
    for n in (11, 21, 41):
        sched, kept = _lambda_uniform_schedule(n)
        exact = _exact_final(x_T, kept[-1], kept[0])
        outs = {
            '3m': sde_samplers.dpm_solver_3m_sample(eps_model, sched, x_T.shape, None,
                                                    x_T=x_T, clip_denoised=False,
                                                    lower_order_final=False),
            '3m_exact': sde_samplers.dpm_solver_3m_sample(
                eps_model, sched, x_T.shape, None, x_T=x_T, clip_denoised=False,
                lower_order_final=False, exact_taylor=True),
            '2s': sde_samplers.dpm_solver_2s_sample(eps_model, sched, x_T.shape, None,
                                                    x_T=x_T, clip_denoised=False),
        }
        for k, v in outs.items():
            errors[k].append(np.abs(np.asarray(v, np.float64) - exact).max())
    e = {k: np.asarray(v) for k, v in errors.items()}
    # Halving h: 2nd order divides the error by ~4, 3rd order by ~8 (measured: 2S 3.1 and
    # 3.6, Taylor-exact 3M 13 and 16; samplers.dpm_solver_sample's 2M 2.6 and 3.7, error
    # 7.3e-3 at 40 steps; the authors' 3M (coefficient 1 on the second difference) 5.3
    # and 4.5, i.e. 2nd order with a smaller constant than 2M).
    ratios = e['2s'][:-1] / e['2s'][1:]
    assert ratios[0] > 2.0 and 3.0 < ratios[1] < 6.0, e['2s']
    assert np.all(e['3m_exact'][:-1] / e['3m_exact'][1:] > 8.0), e['3m_exact']
    assert e['3m_exact'][-1] < 7e-4
    ratios = e['3m'][:-1] / e['3m'][1:]
    assert 3.5 < ratios[-1] < 7.0, e['3m']  # Measured 7.1, then 5.3.
    assert 2 * e['3m_exact'][-1] < e['3m'][-1] < 5e-3, (e['3m'], e['3m_exact'])


def test_dpm_solver_3m_and_2s_defaults_beat_ddim_on_uniform_steps():
    x_T = np.asarray(jax.random.normal(jax.random.key(9), (64, DIM)))

    def errors(num_steps, *fns):
        sched = schedules.make_schedule('linear', T, f'ddim{num_steps}')
        exact = _exact_final(x_T, int(sched.timesteps[-1]), int(sched.timesteps[0]))
        # Clipping to [-1, 1] is on (the defaults); the dimensions are independent, so
        # compare the entries well inside the box.
        inside = np.abs(exact) < 0.9
        assert inside.sum() > 300
        return [np.abs(np.asarray(fn(eps_model, sched, x_T.shape, None, x_T=x_T))
                       - exact)[inside].max() for fn in fns]

    # Measured max errors at 20 steps: DDIM 0.168, 2M 0.106, 3M 0.102 (its last step is
    # 1st order), 2S 0.069: its 19 gaps begin with a DDIM step (0.121 with that step
    # last, the authors' order, where the gap is the longest in log-SNR).
    ddim, dpm2m, dpm3m, dpm2s = errors(
        20, samplers.ddim_sample, samplers.dpm_solver_sample,
        sde_samplers.dpm_solver_3m_sample, sde_samplers.dpm_solver_2s_sample)
    assert dpm3m < 0.8 * ddim and dpm3m < 1.05 * dpm2m
    assert dpm2s < 0.7 * dpm2m
    # 21 steps, 20 gaps, all 2nd order: 2S 0.064, 2M 0.099.
    dpm2m, dpm2s = errors(21, samplers.dpm_solver_sample, sde_samplers.dpm_solver_2s_sample)
    assert dpm2s < 0.75 * dpm2m


def test_two_stage_plan_puts_the_first_order_step_first():
    """Rows (a, b, c, kind) with kind 2 = 2S a -> c via b, 1 = DDIM a -> c, 0 = the final
    x0 at step 0; N model calls; an odd number N - 1 of gaps begins with DDIM N-1 -> N-2
    (the authors' orders [2] * (K - 1) + [1] end with it: see dpm_solver_2s_sample)."""
    plan = lambda n: sde_samplers._two_stage_plan(n).tolist()  # noqa: E731
    assert plan(6) == [[5, 4, 4, 1], [4, 3, 2, 2], [2, 1, 0, 2], [0, 0, 0, 0]]
    assert plan(7) == [[6, 5, 4, 2], [4, 3, 2, 2], [2, 1, 0, 2], [0, 0, 0, 0]]
    assert plan(2) == [[1, 0, 0, 1], [0, 0, 0, 0]]
    assert plan(1) == [[0, 0, 0, 0]]
    for n in range(1, 12):
        rows = np.asarray(plan(n))
        assert sum({0: 1, 1: 1, 2: 2}[k] for k in rows[:, 3]) == n
        assert list(rows[1:, 0]) == list(rows[:-1, 2])  # Contiguous from N - 1 to 0.


def _gauss_x0(x, abar):
    """The exact E[x_0 | x_t] of the Gaussian data at abar, float64."""
    a = np.sqrt(abar)
    return MU + a * S ** 2 / (abar * S ** 2 + 1 - abar) * (x - a * MU)


def _dpm_solver_2s_np(x_T, abar, orders):
    """DPM-Solver++ singlestep (Lu et al. 2022b, Alg. 1; dpm_solver_pytorch.py's
    singlestep_dpm_solver_second_update, 'dpmsolver++') in float64 on the exact x0 of the
    Gaussian data, from step N - 1 down to step 0 of abar [N] in solver steps of the
    given orders (2: through the next step), then x0 at step 0."""
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))
    x, a = np.asarray(x_T, np.float64), len(abar) - 1
    for order in orders:
        c = a - order
        h = lam[c] - lam[a]
        d = _gauss_x0(x, abar[a])
        if order == 2:
            b = a - 1
            r = (lam[b] - lam[a]) / h
            u = (np.sqrt((1 - abar[b]) / (1 - abar[a])) * x
                 - np.sqrt(abar[b]) * np.expm1(-r * h) * d)
            d = d + 0.5 / r * (_gauss_x0(u, abar[b]) - d)
        x = np.sqrt((1 - abar[c]) / (1 - abar[a])) * x - np.sqrt(abar[c]) * np.expm1(-h) * d
        a = c
    assert a == 0
    return _gauss_x0(x, abar[0])


@pytest.mark.parametrize('num_steps', [6, 7])
def test_dpm_solver_2s_in_float64(num_steps):
    """N steps: N - 1 solver NFE in orders [2] * K, or [1] + [2] * K for an odd count
    (the authors' order-2 singlestep plan: [2] * K + [1]), then x0 at step 0. N = 6 starts
    with the DDIM step 5 -> 4, checked on the intermediates."""
    sched = schedules.make_schedule('linear', T, f'ddim{num_steps}')
    abar = ABAR[np.asarray(sched.timesteps)]
    assert abar.shape == (num_steps,)
    nfe = num_steps - 1
    orders = [1] * (nfe % 2) + [2] * (nfe // 2)
    x_T = np.asarray(jax.random.normal(jax.random.key(13), (64, DIM)))
    x, inter = sde_samplers.dpm_solver_2s_sample(eps_model, sched, x_T.shape, None, x_T=x_T,
                                                 clip_denoised=False,
                                                 return_intermediates=True)
    expected = _dpm_solver_2s_np(x_T, abar, orders)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)
    if nfe % 2:
        # The first-order step last (the authors' order) lands far from it.
        other = _dpm_solver_2s_np(x_T, abar, orders[::-1])
        assert np.abs(other - expected).max() > 0.1
        # The state after the first row is DDIM's step from step N - 1 to N - 2.
        x1, d1 = (np.asarray(inter[k][0], np.float64) for k in ('x_t', 'pred_x0'))
        lam = 0.5 * (np.log(abar) - np.log1p(-abar))
        a, b = num_steps - 1, num_steps - 2
        ddim = (np.sqrt((1 - abar[b]) / (1 - abar[a])) * x1
                - np.sqrt(abar[b]) * np.expm1(-(lam[b] - lam[a])) * d1)
        np.testing.assert_allclose(inter['x_t'][1], ddim, rtol=1e-5, atol=1e-5)


def test_vp_view_of_an_eps_model_gives_the_ddim_trajectory():
    sched = schedules.make_schedule('linear', T, 'ddim25')
    x_T = jax.random.normal(jax.random.key(10), (8, DIM))
    ddim, inter = samplers.ddim_sample(eps_model, sched, x_T.shape, None, x_T=x_T,
                                       clip_denoised=False, return_intermediates=True)
    view, score = sde_lib.make_vp_score_fn(eps_model, sched, mean_type='eps')
    ladder = sde_samplers.vp_sigmas(sched)
    sigmas = jnp.append(ladder[::-1], 0.0)
    abar_top = float(sched.alphas_cumprod[-1])
    for denoiser in (sde_lib.denoiser_from_score(view, score),
                     sde_samplers.make_vp_denoiser(eps_model, sched, mean_type='eps',
                                                   clip_denoised=False)):
        out, k_inter = sde_samplers.karras_sample(
            denoiser, sigmas, x_T.shape, None, x_init=x_T / np.sqrt(abar_top),
            second_order=False, return_intermediates=True)
        assert int(out.nfe) == 25
        np.testing.assert_allclose(out.samples, ddim, rtol=1e-4, atol=1e-4)
        # The states match step by step: x_vp = y sqrt(abar).
        abar = np.asarray(sched.alphas_cumprod)[::-1]
        np.testing.assert_allclose(
            np.asarray(k_inter['x']) * np.sqrt(abar)[:, None, None], inter['x_t'],
            rtol=1e-4, atol=1e-4)


def test_sde_samplers_table_fits_the_samplers_registry():
    assert not set(sde_samplers.SDE_SAMPLERS) & set(samplers.SAMPLERS)
    common = ('model_fn', 'sched', 'shape', 'rng', 'mean_type', 'var_type',
              'clip_denoised', 'model_kwargs', 'cond_fn', 'classifier_scale')
    for name, spec in sde_samplers.SDE_SAMPLERS.items():
        assert isinstance(spec, samplers.SamplerSpec)
        params = inspect.signature(spec.fn).parameters
        assert all(p in params for p in common + spec.options), name


def test_vp_view_samplers_with_the_registry_signature():
    """vp_ode / vp_heun / vp_pc called as tasks/diffusion calls a SAMPLERS entry."""
    sched = schedules.make_schedule('linear', T)
    common = dict(mean_type='eps', var_type='fixed_small', clip_denoised=False,
                  model_kwargs=None, cond_fn=None, classifier_scale=0.0, return_nfe=True)
    z = np.asarray(jax.random.normal(jax.random.key(11), (1000, DIM)))
    view = sde_lib.vp_view(sched)
    x, nfe = jax.jit(lambda z: sde_samplers.vp_ode_sample(
        eps_model, sched, z.shape, None, x_T=z, **common))(z)
    # Measured: 577 NFE (the discrete model makes the drift piecewise constant in t),
    # max error 3.3e-3 against the exact flow.
    np.testing.assert_allclose(x, exact_flow(view, z, 1.0, 1e-3), atol=1e-2)
    assert 100 < int(nfe) < 1500
    x, nfe = jax.jit(lambda z: sde_samplers.vp_heun_sample(
        eps_model, sched, z.shape, None, x_T=z, **common))(z)
    assert int(nfe) == 35
    ladder = np.asarray(sde_samplers.vp_sigmas(sched))
    sigmas = sde_samplers.karras_sigmas(18, float(ladder[0]), float(ladder[-1]))
    ref = sde_samplers.karras_sample(_gauss_denoiser, sigmas, z.shape, None,
                                     x_init=z * np.sqrt(1 + float(sigmas[0]) ** 2))
    np.testing.assert_allclose(x, ref.samples, atol=5e-3)
    x, nfe = jax.jit(lambda r: sde_samplers.vp_pc_sample(
        eps_model, sched, (2000, DIM), r, **common))(jax.random.key(12))
    assert int(nfe) == 2 * T
    assert_data_moments(x, 0.15)


@pytest.mark.parametrize('corrector', ['none', 'langevin'])
def test_vp_pc_sample_steps_the_chain_on_score_sdes_grid(corrector):
    """On score_sde's grid t = linspace(1, 1e-3, 1000), every step of a 1000-step
    schedule's view runs the model at int(t (N - 1)) = 999 - j, the step whose beta the
    predictor (and alpha the corrector) takes: the same samples as on the knots
    themselves (eps 1e-7). At the nearest step instead, steps 500 on would pair the
    model at step 1000 - j with beta_{999 - j}."""
    sched = schedules.make_schedule('linear', 1000)
    steps = []

    def recording_model(x, t):
        jax.debug.callback(lambda t: steps.append(int(np.asarray(t)[0])), t, ordered=True)
        return eps_model(x, t)

    def run(eps):
        return sde_samplers.vp_pc_sample(
            recording_model, sched, (16, DIM), jax.random.key(13), clip_denoised=False,
            corrector=corrector, eps=eps)

    grid = run(1e-3)
    assert steps[::1 + (corrector != 'none')] == list(range(999, -1, -1))
    np.testing.assert_allclose(grid, run(1e-7), rtol=1e-6, atol=1e-6)


def _np_gauss_denoiser(y, sigma):
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (y - MU)


def _edm_sampler_np(denoise, y0, t_steps, round_sigma, zs, s_churn, s_tmin, s_tmax,
                    s_noise):
    """NVlabs/edm generate.py's `edm_sampler` loop in float64: t_steps [N + 1] already
    rounded (ending with 0), t_hat = round_sigma(t_cur + gamma t_cur), the noise
    sqrt(t_hat^2 - t_cur^2) S_noise zs[i] (clamped at 0, which EDM's rounding never
    needs: it does not go below t_cur), Heun while i < N - 1. Returns the sample and
    the [N, 2] (t_cur, t_hat) of each step."""
    num_steps = len(t_steps) - 1
    x_next = np.asarray(y0, np.float64)
    hats = []
    for i in range(num_steps):
        t_cur, t_next = float(t_steps[i]), float(t_steps[i + 1])
        x_cur = x_next
        gamma = min(s_churn / num_steps, np.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0
        t_hat = round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + np.sqrt(max(t_hat ** 2 - t_cur ** 2, 0.0)) * s_noise * zs[i]
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        hats.append((t_cur, t_hat))
    return x_next, np.asarray(hats)


def _edm_round_sigma_np(levels):
    """iDDPMPrecond.round_sigma: the nearest of the float32 levels, searched in decreasing
    order (EDM's u), so a tie goes to the larger level."""
    u = np.sort(np.asarray(levels, np.float32))[::-1]
    return lambda s: float(u[np.argmin(np.abs(np.float32(s) - u))])


def _karras_noise(noise_rng, num_steps, shape):
    """The z of each step of karras_sample(rng=noise_rng): split, then fold_in(., i)."""
    _, rng = jax.random.split(noise_rng)
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(rng, i), shape),
                                np.float64) for i in range(num_steps)])


# gamma = 0.5 / 10 on sigma in [0.005, 50]: the first step (80.3) has none, the last
# (0.01, levels ~40 % apart) rounds back to itself (no noise), the others go up a level.
_CHURN = dict(s_churn=0.5, s_tmin=0.005, s_tmax=50.0, s_noise=1.007)


def test_make_round_sigma_is_the_nearest_level_in_absolute_distance():
    sched = schedules.make_schedule('linear', T)
    levels = np.asarray(sde_samplers.vp_sigmas(sched))
    x = np.exp(np.random.RandomState(1).uniform(np.log(levels[0]), np.log(levels[-1]), 500))
    lo, hi = levels[:5].astype(np.float64), levels[1:6].astype(np.float64)
    mid = 0.5 * (lo + hi)  # Between the log and the linear midpoint: log rounds up.
    x = np.concatenate([x, levels[:5], 0.999 * mid, 1.001 * mid,
                        0.5 * (np.sqrt(lo * hi) + mid), [0.0]]).astype(np.float32)
    got = np.asarray(sde_samplers.make_round_sigma(sched)(jnp.asarray(x)))
    near = _edm_round_sigma_np(levels)
    np.testing.assert_array_equal(got, [near(v) if v > 0 else 0.0 for v in x])
    assert np.all(np.isin(got[:-1], levels)) and got[-1] == 0.0
    # Not the nearest in log (snap_sigmas): they differ near the small levels' midpoints.
    assert np.any(got != np.asarray(sde_samplers.snap_sigmas(jnp.asarray(x), sched)))
    assert sde_samplers.make_round_sigma(sched)(jnp.ones((2, 3))).shape == (2, 3)
    # Exact float32 ties between two levels go to the larger one (EDM's argmin over u).
    lo, hi = levels[:-1], levels[1:]
    mid = (0.5 * (lo.astype(np.float64) + hi)).astype(np.float32)
    tie = np.abs(mid - lo) == np.abs(hi - mid)
    assert tie.sum() > 10
    got = np.asarray(sde_samplers.make_round_sigma(sched)(jnp.asarray(mid[tie])))
    np.testing.assert_array_equal(got, hi[tie])


def test_karras_round_sigma_is_edm_sampler_in_float64():
    """karras_sample with EDM's rounded schedule and `round_sigma` is edm_sampler with
    iDDPMPrecond's rounding, on the exact denoiser of the Gaussian data."""
    sched = schedules.make_schedule('linear', T)
    levels = np.asarray(sde_samplers.vp_sigmas(sched))
    rounder = sde_samplers.make_round_sigma(sched)
    sigmas = sde_samplers.karras_sigmas(10, float(levels[0]), 80.0)
    rounded = jnp.append(rounder(sigmas[:-1]), 0.0)
    near = _edm_round_sigma_np(levels)
    np.testing.assert_array_equal(rounded[:-1], [near(v) for v in np.asarray(sigmas[:-1])])
    rng = jax.random.key(14)
    y0 = np.asarray(float(rounded[0]) * jax.random.normal(jax.random.key(15), (64, DIM)))
    out = sde_samplers.karras_sample(_gauss_denoiser, rounded, y0.shape, rng, x_init=y0,
                                     round_sigma=rounder, **_CHURN)
    assert int(out.nfe) == 19
    expected, hats = _edm_sampler_np(_np_gauss_denoiser, y0, np.asarray(rounded, np.float64),
                                     near, _karras_noise(rng, 10, y0.shape), **_CHURN)
    np.testing.assert_allclose(out.samples, expected, rtol=1e-5, atol=1e-5)
    # The case mix of _CHURN: no churn, churn onto the next level, churn rounded away.
    assert hats[0, 1] == hats[0, 0] and np.all(hats[1:-1, 1] > hats[1:-1, 0])
    assert hats[-1, 1] == hats[-1, 0]
    # Unrounded churn differs by more than the tolerance.
    plain = sde_samplers.karras_sample(_gauss_denoiser, rounded, y0.shape, rng, x_init=y0,
                                       **_CHURN)
    assert np.abs(np.asarray(plain.samples) - expected).max() > 1e-2


def test_karras_round_sigma_below_sigma_adds_no_noise():
    """A rounding below sigma_i gives sqrt(max(sigma_hat^2 - sigma_i^2, 0)) = 0, no NaN."""
    sigmas = sde_samplers.karras_sigmas(6)
    y0 = np.asarray(80.0 * jax.random.normal(jax.random.key(16), (8, DIM)))
    down = lambda s: 0.8 * s  # noqa: E731  sigma (1 + 1/6) 0.8 < sigma.
    out = sde_samplers.karras_sample(_gauss_denoiser, sigmas, y0.shape, jax.random.key(17),
                                     x_init=y0, s_churn=1.0, round_sigma=down)
    zeros = np.zeros((6,) + y0.shape)
    expected, hats = _edm_sampler_np(_np_gauss_denoiser, y0, np.asarray(sigmas, np.float64),
                                     down, zeros, s_churn=1.0, s_tmin=0.0, s_tmax=np.inf,
                                     s_noise=1.0)
    assert np.all(hats[:, 1] < hats[:, 0])
    assert np.all(np.isfinite(out.samples))
    np.testing.assert_allclose(out.samples, expected, rtol=1e-5, atol=1e-5)


def test_vp_heun_round_sigma_is_edm_sampler_for_a_discrete_model():
    """vp_heun_sample(round_sigma=True, sigma_max=80) on the exact eps model of the
    Gaussian data is edm_sampler(sigma_max=80) with round_sigma over the model's levels."""
    sched = schedules.make_schedule('linear', T)
    levels = np.asarray(sde_samplers.vp_sigmas(sched))
    x_T = np.asarray(jax.random.normal(jax.random.key(18), (64, DIM)))
    rng = jax.random.key(19)
    x, nfe = sde_samplers.vp_heun_sample(
        eps_model, sched, x_T.shape, rng, x_T=x_T, clip_denoised=False, num_steps=10,
        sigma_max=80.0, round_sigma=True, return_nfe=True, **_CHURN)
    assert int(nfe) == 19
    # EDM: sigma_min = max(0.002, 0.01), sigma_max = min(80, 157.4), float64 steps.
    i = np.arange(10) / 9
    t_steps = (80.0 ** (1 / 7) + i * (float(levels[0]) ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    near = _edm_round_sigma_np(levels)
    t_steps = np.append([near(t) for t in t_steps], 0.0)
    y0 = x_T * np.sqrt(1 + t_steps[0] ** 2)  # x_T is x_vp = y / sqrt(1 + sigma^2).
    zs = _karras_noise(jax.random.split(rng)[1], 10, x_T.shape)
    expected, _ = _edm_sampler_np(_np_gauss_denoiser, y0, t_steps, near, zs, **_CHURN)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_vp_heun_round_sigma_evaluates_the_model_only_at_its_levels(monkeypatch):
    sched = schedules.make_schedule('linear', T)
    levels = np.asarray(sde_samplers.vp_sigmas(sched))
    seen = []
    make_denoiser = sde_lib.denoiser_from_score

    def recording(view, score):
        denoise = make_denoiser(view, score)

        def recorded(y, sigma):
            jax.debug.callback(lambda s: seen.append(np.asarray(s)), sigma)
            return denoise(y, sigma)
        return recorded

    monkeypatch.setattr(sde_lib, 'denoiser_from_score', recording)
    for round_sigma in (True, False):
        seen.clear()
        _, nfe = sde_samplers.vp_heun_sample(
            eps_model, sched, (4, DIM), jax.random.key(20), clip_denoised=False,
            num_steps=10, round_sigma=round_sigma, return_nfe=True, **_CHURN)
        jax.effects_barrier()
        assert len(seen) == int(nfe) == 19
        on_ladder = np.isin(np.concatenate(seen), levels)
        assert on_ladder.all() if round_sigma else on_ladder.mean() < 0.5, round_sigma


def test_vp_heun_without_round_sigma_is_unchanged():
    """round_sigma=False (the default) is karras_sample on the unrounded schedule with the
    VP view's denoiser, bit for bit, churn included."""
    sched = schedules.make_schedule('linear', T)
    x_T = np.asarray(jax.random.normal(jax.random.key(21), (8, DIM)))
    rng = jax.random.key(22)
    run = lambda **kw: np.asarray(sde_samplers.vp_heun_sample(  # noqa: E731
        eps_model, sched, x_T.shape, rng, x_T=x_T, clip_denoised=False, num_steps=10,
        **_CHURN, **kw))
    view, score = sde_lib.make_vp_score_fn(eps_model, sched, clip_denoised=False)
    levels = sde_samplers._vp_sigmas_np(sched)  # float64, as vp_heun_sample.
    sigmas = sde_samplers.karras_sigmas(10, float(levels[0]), float(levels[-1]))
    ref = sde_samplers.karras_sample(
        sde_lib.denoiser_from_score(view, score), sigmas, x_T.shape,
        jax.random.split(rng)[1], x_init=x_T * jnp.sqrt(1.0 + jnp.square(sigmas[0])),
        **_CHURN)
    np.testing.assert_array_equal(run(), ref.samples)
    np.testing.assert_array_equal(run(round_sigma=False), ref.samples)
    assert np.abs(run(round_sigma=True) - run()).max() > 1e-3


# ---------------------------------------------------------------------------
# One compile per shape, and the reported NFE is the executed one.
# ---------------------------------------------------------------------------


class _Counter:
    def __init__(self):
        self.calls = 0

    def bump(self):
        self.calls += 1


def _counted(fn, counter):
    def wrapped(x, t, *args, **kwargs):
        jax.debug.callback(counter.bump)
        return fn(x, t, *args, **kwargs)
    return wrapped


def _cases():
    vp = sde_lib.VPSDE(num_scales=50)
    sched = schedules.make_schedule('linear', T, 'ddim10')
    sched9 = schedules.make_schedule('linear', T, [0, 100, 200, 300, 400, 500, 600, 700, 999])
    return {
        'langevin': lambda f, r: sde_samplers.annealed_langevin_sample(
            lambda x, s: f(x, s), sde_lib.ncsn_sigmas(1.0, 0.01, 3), (4, DIM), r,
            steps_per_level=5, denoise=True),
        'pc': lambda f, r: sde_samplers.pc_sample(
            vp, f, (4, DIM), r, num_steps=50, predictor='reverse_diffusion',
            corrector='langevin', corrector_steps=2),
        'ode': lambda f, r: sde_samplers.ode_sample(vp, f, (4, DIM), r, rtol=1e-4,
                                                    atol=1e-4),
        'heun': lambda f, r: sde_samplers.karras_sample(
            f, sde_samplers.karras_sigmas(6), (4, DIM), r, s_churn=1.0),
        '3m': lambda f, r: sde_samplers.dpm_solver_3m_sample(
            f, sched, (4, DIM), r, return_nfe=True),
        '2s_even': lambda f, r: sde_samplers.dpm_solver_2s_sample(
            f, sched, (4, DIM), r, return_nfe=True),
        '2s_odd': lambda f, r: sde_samplers.dpm_solver_2s_sample(
            f, sched9, (4, DIM), r, return_nfe=True),
        'vp_langevin': lambda f, r: sde_samplers.vp_langevin_sample(
            f, sched, (4, DIM), r, num_levels=3, steps_per_level=4, final_denoise=True,
            return_nfe=True),
    }


@pytest.mark.parametrize('name', ['langevin', 'pc', 'ode', 'heun', '3m', '2s_even',
                                  '2s_odd', 'vp_langevin'])
def test_compiles_once_and_reports_its_nfe(name):
    chex.clear_trace_counter()
    counter = _Counter()
    case = _cases()[name]
    if name in ('3m', '2s_even', '2s_odd', 'vp_langevin'):
        model = _counted(eps_model, counter)
    elif name == 'heun':
        model = _counted(_gauss_denoiser, counter)
    elif name == 'langevin':
        model = _counted(lambda x, s: -(x - MU) / (S ** 2 + s[:, None] ** 2), counter)
    else:
        model = _counted(gauss_score(sde_lib.VPSDE(num_scales=50)), counter)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(rng):
        return case(model, rng)

    for seed in (0, 1):
        counter.calls = 0
        result = run(jax.random.key(seed))
        jax.effects_barrier()
        nfe = int(result[1]) if isinstance(result, tuple) else int(result.nfe)
        assert counter.calls == nfe, (name, counter.calls, nfe)
    expected = {'langevin': 16, 'pc': 150, 'heun': 11, '3m': 10, '2s_even': 10,
                '2s_odd': 9, 'vp_langevin': 13}
    if name in expected:
        assert nfe == expected[name]
    chex.clear_trace_counter()


def test_vp_langevin_of_an_exact_discrete_model_reaches_the_data():
    """NCSN's settings through the VP view of the exact eps model of Gaussian data (linear
    schedule, sigma from 1 down to its smallest, 0.01): the samples have the data's mean
    and variance (the model is evaluated at the nearest trained step; 4 standard errors
    of the variance are 0.13). Unclipped: these data leave [-1, 1], and clipping x_0
    biases the score (mean off by 0.17 when clipped)."""
    sched = schedules.make_schedule('linear', T)
    n = 2000
    x, nfe = jax.jit(lambda r: sde_samplers.vp_langevin_sample(
        eps_model, sched, (n, DIM), r, langevin_sigma_max=1.0, num_levels=10,
        steps_per_level=100, clip_denoised=False, return_nfe=True))(jax.random.key(8))
    assert int(nfe) == 1000
    assert_data_moments(x, 0.15)
    # NCSN's uniform start reaches the data as well.
    x = jax.jit(lambda r: sde_samplers.vp_langevin_sample(
        eps_model, sched, (n, DIM), r, langevin_sigma_max=1.0, num_levels=10,
        steps_per_level=100, clip_denoised=False, langevin_init='uniform'))(jax.random.key(8))
    assert_data_moments(x, 0.15)
    with pytest.raises(ValueError, match="langevin_init='uniform' draws its own"):
        sde_samplers.vp_langevin_sample(eps_model, sched, (2, DIM), jax.random.key(0),
                                        x_T=jnp.zeros((2, DIM)), langevin_init='uniform')
    with pytest.raises(ValueError, match='sigma_max=300 is outside'):
        sde_samplers.vp_langevin_sample(eps_model, sched, (2, DIM), jax.random.key(0),
                                        langevin_sigma_max=300.0)


def test_bad_arguments_name_the_field():
    vp = sde_lib.VPSDE()
    score = gauss_score(vp)
    with pytest.raises(ValueError, match='predictor'):
        sde_samplers.pc_sample(vp, score, (2, DIM), jax.random.key(0), num_steps=5,
                               predictor='rk4')
    with pytest.raises(ValueError, match='corrector'):
        sde_samplers.pc_sample(vp, score, (2, DIM), jax.random.key(0), num_steps=5,
                               corrector='hmc')
    with pytest.raises(ValueError, match='snr'):
        sde_samplers.pc_sample(vp, score, (2, DIM), jax.random.key(0), num_steps=5,
                               snr=0.0)
    with pytest.raises(ValueError, match='solver'):
        sde_samplers.ode_sample(vp, score, (2, DIM), jax.random.key(0), solver='euler')
    with pytest.raises(ValueError, match='rtol'):
        sde_samplers.ode_sample(vp, score, (2, DIM), jax.random.key(0), rtol=-1.0)
    with pytest.raises(ValueError, match='x_init'):
        sde_samplers.ode_sample(vp, score, (2, DIM), None, x_init=jnp.zeros((3, DIM)))
    with pytest.raises(ValueError, match='sigma_min'):
        sde_samplers.karras_sigmas(10, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match='s_churn'):
        sde_samplers.karras_sample(_gauss_denoiser, sde_samplers.karras_sigmas(3),
                                   (2, DIM), jax.random.key(0), s_churn=-1.0)
    with pytest.raises(ValueError, match='steps_per_level'):
        sde_samplers.annealed_langevin_sample(lambda x, s: x, [1.0, 0.1], (2, DIM),
                                              jax.random.key(0), steps_per_level=0)
    with pytest.raises(ValueError, match='mean_type'):
        sde_samplers.dpm_solver_3m_sample(eps_model, schedules.make_schedule('linear', 10),
                                          (2, DIM), jax.random.key(0), mean_type='score')


def test_pc_and_ode_samplers_start_at_a_draw_of_the_prior():
    """With a zero score the probability-flow ODE stands still, so x(eps) = x(1): the
    prior draw, N(prior_mean, sigma_max^2) (score_sde's VE prior in our units: mean -1)."""
    sde = sde_lib.VESDE(0.02, 100.0, 10, prior_mean=-1.0)
    rng = jax.random.key(3)
    zero_score = lambda x, t: jnp.zeros_like(x)
    out = sde_samplers.ode_sample(sde, zero_score, (6, 2), rng, denoise=False)
    prior = sde_lib.prior_sample(sde, jax.random.split(rng)[0], (6, 2))
    np.testing.assert_allclose(out.samples, prior, rtol=1e-6)
    # One reverse-diffusion step with a zero score and its noise removed: its start.
    pc = sde_samplers.pc_sample(sde, zero_score, (6, 2), rng, num_steps=1, eps=1e-5,
                                predictor='reverse_diffusion', corrector='none',
                                denoise=True)
    np.testing.assert_allclose(pc.samples, prior, rtol=1e-6)
