"""Tests for ddpm_jax.likelihood: KL, decoder, VB terms and the full bound on analytic data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from ddpm_jax import likelihood
from ddpm_jax import schedules


def test_normal_kl_closed_form():
    rng = np.random.RandomState(0)
    m1, m2 = rng.normal(size=10), rng.normal(size=10)
    s1, s2 = rng.uniform(0.1, 2, 10), rng.uniform(0.1, 2, 10)
    expected = np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    got = likelihood.normal_kl(m1, 2 * np.log(s1), m2, 2 * np.log(s2))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(likelihood.normal_kl(m1, np.log(s1), m1, np.log(s1)), 0,
                               atol=1e-6)


def test_approx_standard_normal_cdf():
    x = np.linspace(-5, 5, 101)
    exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(likelihood.approx_standard_normal_cdf(x), exact, atol=3e-4)


@pytest.mark.parametrize('mean,log_scale', [(0.0, -3.0), (0.9, -1.0), (-0.3, -6.0),
                                            (2.0, 0.5)])
def test_discretized_likelihood_is_a_distribution(mean, log_scale):
    x = (jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0).reshape(1, 256)
    logp = likelihood.discretized_gaussian_log_likelihood(
        x, jnp.full_like(x, mean), jnp.full_like(x, log_scale))
    assert bool(jnp.all(logp <= 0))
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(logp))), 1.0, atol=2e-3)
    # An interior bin matches the exact Gaussian bin mass.
    k = 140
    centre = k / 127.5 - 1
    sd = math.exp(log_scale)
    phi = lambda v: 0.5 * (1 + math.erf((v - mean) / (sd * math.sqrt(2))))  # noqa: E731
    exact = phi(centre + 1 / 255) - phi(centre - 1 / 255)
    if exact > 1e-6:
        np.testing.assert_allclose(math.exp(float(logp[0, k])), exact, rtol=0.05,
                                   atol=1e-4)


def test_discretized_likelihood_edge_bins_are_open():
    x = jnp.array([[-1.0, 1.0]])
    logp = likelihood.discretized_gaussian_log_likelihood(x, jnp.array([[-5.0, 5.0]]),
                                                          jnp.zeros((1, 2)))
    # Mass of (-inf, -1 + 1/255] under N(-5, 1) is ~1, as is [1 - 1/255, inf) under N(5, 1).
    np.testing.assert_allclose(np.exp(logp), 1.0, atol=1e-3)


def _np_sched(name, t):
    betas = schedules.get_beta_schedule(name, t)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    pvar = betas * (1 - abar_prev) / (1 - abar)
    coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
    return betas, abar, pvar, coef1


def test_prior_bpd_closed_form():
    sched = schedules.make_schedule('linear', 20)
    _, abar, _, _ = _np_sched('linear', 20)
    x0 = np.random.RandomState(1).uniform(-1, 1, (3, 4, 4, 1))
    a = abar[-1]
    # KL(N(sqrt(a) x, 1 - a) || N(0, 1)) = 0.5 (-log(1 - a) + (1 - a) + a x^2 - 1).
    kl = 0.5 * (-np.log(1 - a) + (1 - a) + a * x0 ** 2 - 1)
    expected = kl.reshape(3, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(likelihood.prior_bpd(sched, jnp.asarray(x0, jnp.float32)),
                               expected, rtol=1e-4, atol=1e-9)


def test_vb_terms_nonnegative_and_zero_for_true_posterior():
    sched = schedules.make_schedule('cosine', 20)
    rng = np.random.RandomState(2)
    shape = (4, 4, 4, 1)
    x0 = jnp.asarray(np.round(rng.uniform(-1, 1, shape) * 127.5) / 127.5, jnp.float32)
    noise = jnp.asarray(rng.normal(size=shape), jnp.float32)
    i = jnp.array([0, 3, 10, 19])
    x_t = diffusion.q_sample(sched, x0, i, noise)
    random_out = jnp.asarray(rng.normal(size=shape[:-1] + (2,)), jnp.float32)

    @jax.jit
    def terms(random_out, noise):
        outs = [likelihood.vb_terms_bpd(sched, random_out, x0, x_t, i, mean_type='eps',
                                        var_type=v)['output']
                for v in ('learned', 'learned_range')]
        # Model outputs the true noise with the posterior variance: KL terms vanish.
        exact = likelihood.vb_terms_bpd(sched, noise, x0, x_t, i, mean_type='eps',
                                        var_type='fixed_small', clip_denoised=False)
        return outs, exact['output']

    outs, exact = terms(random_out, noise)
    for out in outs:
        assert out.shape == (4,)
        assert bool(jnp.all(out >= 0)), out
    np.testing.assert_allclose(exact[1:], 0.0, atol=1e-4)
    assert float(exact[0]) > 0  # The decoder NLL of a sharp Gaussian is still > 0.


def _quantised_gaussian(s, batch, side, seed):
    z = np.random.RandomState(seed).normal(0, s, size=(batch, side, side, 1))
    k = np.clip(np.round((z + 1) * 127.5), 0, 255).astype(int)
    edges = (np.arange(255) + 0.5) / 127.5 - 1
    cdf = np.array([0.5 * (1 + math.erf(e / (s * math.sqrt(2)))) for e in edges])
    probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    entropy_bits = -np.sum(probs[probs > 0] * np.log2(probs[probs > 0]))
    return jnp.asarray(k / 127.5 - 1, jnp.float32), entropy_bits


def test_bound_of_optimal_model_on_gaussian_data_approaches_entropy():
    """For x0 ~ N(0, s^2): E[eps | x_t] = sqrt(1-abar) x_t / (abar s^2 + 1 - abar).

    The true reverse step q(x_{t-1} | x_t) is then Gaussian with variance
    beta~_t + coef1_t^2 Var(x0 | x_t), Var(x0 | x_t) = s^2 (1-abar) / (abar s^2 + 1-abar).
    A 'learned' model that outputs exactly that is optimal, and its bound should sit
    just above the entropy of the 8-bit-quantised data (measured gap 0.00-0.03
    bits/dim over 6 seeds, Monte-Carlo standard error ~0.02). With 'fixed_small'
    (beta~_t only) the bound is valid but loose, ~1.4-1.5 bits/dim above: the first
    steps pay for the missing coef1^2 Var(x0 | x_t).
    """
    s, num_steps = 0.2, 100
    betas, abar, pvar, coef1 = _np_sched('linear', num_steps)
    sched = schedules.make_schedule('linear', num_steps)
    x0, entropy_bits = _quantised_gaussian(s, batch=64, side=12, seed=0)
    var_x0 = s * s * (1 - abar) / (abar * s * s + 1 - abar)
    log_var = jnp.asarray(np.log(pvar + coef1 ** 2 * var_x0), jnp.float32)
    abar_j = jnp.asarray(abar, jnp.float32)

    def eps_fn(x, t):
        a = abar_j[t][:, None, None, None]
        return jnp.sqrt(1 - a) * x / (a * s * s + 1 - a)

    def learned_fn(x, t):
        lv = jnp.broadcast_to(log_var[t][:, None, None, None], x.shape)
        return jnp.concatenate([eps_fn(x, t), lv], axis=-1)

    rng = jax.random.key(0)
    learned = jax.jit(lambda x: likelihood.calc_bpd_loop(
        learned_fn, sched, x, rng, var_type='learned'))(x0)
    small = jax.jit(lambda x: likelihood.calc_bpd_loop(
        eps_fn, sched, x, rng, var_type='fixed_small'))(x0)
    bound = float(jnp.mean(learned['total_bpd']))
    loose = float(jnp.mean(small['total_bpd']))
    assert entropy_bits - 0.05 < bound < entropy_bits + 0.1, (bound, entropy_bits)
    assert loose > bound + 1.0, (loose, bound)
    assert loose < entropy_bits + 2.0, (loose, entropy_bits)
    for out in (learned, small):
        assert out['vb'].shape == (64, num_steps)
        assert bool(jnp.all(out['vb'] >= 0))
        np.testing.assert_allclose(out['total_bpd'],
                                   out['vb'].sum(1) + out['prior_bpd'], rtol=1e-5)
    # The mse column is that of the eps predictor, which is (nearly) exact for t > 0:
    # E|eps - E[eps|x_t]|^2 = 1 - (1 - abar) / (abar s^2 + 1 - abar) in closed form.
    mmse = 1 - (1 - abar) / (abar * s * s + 1 - abar)
    np.testing.assert_allclose(np.asarray(learned['mse']).mean(0)[50:], mmse[50:],
                               rtol=0.1, atol=2e-3)


def test_calc_bpd_loop_calls_model_with_original_timesteps():
    sched = schedules.make_schedule('linear', 100, '0,3,1,2')
    t_orig = np.asarray(sched.timesteps)
    np.testing.assert_array_equal(t_orig, [25, 37, 49, 50, 75, 99])

    def model_fn(x, t):  # Predicts x0 = t / 1000 everywhere.
        return jnp.broadcast_to((t / 1000.0)[:, None, None, None], x.shape)

    x0 = jnp.zeros((2, 4, 4, 1))
    out = jax.jit(lambda x, r: likelihood.calc_bpd_loop(
        model_fn, sched, x, r, mean_type='x0', clip_denoised=False))(x0, jax.random.key(0))
    np.testing.assert_allclose(out['xstart_mse'],
                               np.broadcast_to((t_orig / 1000.0) ** 2, (2, 6)), rtol=1e-5)


def test_calc_bpd_loop_rejects_bad_types():
    sched = schedules.make_schedule('linear', 10)
    x0 = jnp.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match='var_type'):
        likelihood.calc_bpd_loop(lambda x, t: x, sched, x0, jax.random.key(0),
                                 var_type='large')
    with pytest.raises(ValueError, match='2C'):
        likelihood.calc_bpd_loop(lambda x, t: x, sched, x0, jax.random.key(0),
                                 var_type='learned')
