"""Tests for ddpm_jax.ode_likelihood on Gaussian data with a full covariance.

x_0 ~ N(MU, SIGMA) with SIGMA = R diag(LAM) R^T. Under a VP / VE SDE the marginal at t is
N(alpha MU, alpha^2 SIGMA + std^2 I), all with eigenvectors R, so the probability-flow
map is x(1) = alpha_1 MU + R diag(sqrt(v_1 / v_eps)) R^T (x - alpha_eps MU) and the change
of variables adds 0.5 sum log(v_1 / v_eps): the likelihood the ODE computes is known in
closed form (float64 NumPy below).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import ode_likelihood
from ddpm_jax import schedules
from ddpm_jax import sde as sde_lib

_RS = np.random.RandomState(0)
D = 3
R, _ = np.linalg.qr(_RS.randn(D, D))
LAM = np.array([0.05, 0.2, 0.6])
MU = np.array([0.3, -0.2, 0.1])
SIGMA = R @ np.diag(LAM) @ R.T


def gauss_score(sde):
    r, lam, mu = (jnp.asarray(a, jnp.float32) for a in (R, LAM, MU))

    def score(x, t):
        a, std = sde_lib.marginal_coefs(sde, t)
        v = a[:, None] ** 2 * lam + std[:, None] ** 2  # [B, D] eigenvalues of Sigma_t.
        y = (x - a[:, None] * mu) @ r  # Coordinates in the eigenbasis.
        return -(y / v) @ r.T
    return score


def expected_logp(sde, x, eps):
    """What the ODE likelihood computes: prior log-density of the exact flow map plus the
    log-determinant of its Jacobian; and the true log p_eps(x)."""
    ae, se = [float(v) for v in sde_lib.marginal_coefs(sde, jnp.float32(eps))]
    a1, s1 = [float(v) for v in sde_lib.marginal_coefs(sde, jnp.float32(1.0))]
    ve, v1 = ae ** 2 * LAM + se ** 2, a1 ** 2 * LAM + s1 ** 2
    x = np.asarray(x, np.float64)
    y = (x - ae * MU) @ R
    z = a1 * MU + (y * np.sqrt(v1 / ve)) @ R.T
    p = sde_lib.prior_std(sde)
    prior = np.sum(-0.5 * np.log(2 * np.pi * p * p) - z ** 2 / (2 * p * p), axis=1)
    flow = prior + 0.5 * np.sum(np.log(v1 / ve))
    true = np.sum(-0.5 * np.log(2 * np.pi * ve) - y ** 2 / (2 * ve), axis=1)
    return flow, true, z


def _data(n, seed=1):
    rs = np.random.RandomState(seed)
    return (MU + (rs.randn(n, D) * np.sqrt(LAM)) @ R.T).astype(np.float32)


@pytest.mark.parametrize('sde,eps', [
    (sde_lib.VPSDE(), 1e-5),
    pytest.param(sde_lib.SubVPSDE(), 1e-5, marks=pytest.mark.slow),
    (sde_lib.VESDE(0.01, 20.0), 1e-5)])
def test_exact_trace_gives_the_exact_log_density(sde, eps):
    x = _data(8)
    out = ode_likelihood.ode_log_likelihood(sde, gauss_score(sde), x, None, eps=eps,
                                            trace='exact')
    flow, true, z = expected_logp(sde, x, eps)
    np.testing.assert_allclose(out.z, z, atol=2e-3)
    np.testing.assert_allclose(out.logp, flow, atol=2e-3)
    np.testing.assert_allclose(out.prior_logp + out.delta_logp, out.logp, rtol=1e-6)
    # The prior p_1 differs from the true marginal at t = 1 only slightly.
    np.testing.assert_allclose(out.logp, true, atol=0.05)


def test_hutchinson_estimators_are_unbiased_around_the_exact_value():
    sde = sde_lib.VPSDE()
    n = 256
    x = np.repeat(_data(1, seed=2), n, axis=0)  # One point, n independent probes.
    flow, _, _ = expected_logp(sde, x[:1], 1e-5)
    run = jax.jit(lambda r, kind: ode_likelihood.ode_log_likelihood(
        sde, gauss_score(sde), x, r, trace=kind, rtol=1e-4, atol=1e-4),
        static_argnums=1)
    for kind in ('rademacher', 'gaussian'):
        logp = np.asarray(run(jax.random.key(3), kind).logp, np.float64)
        se = logp.std() / math.sqrt(n)
        assert logp.std() > 1e-3  # A genuine estimator (the Jacobian is not diagonal).
        assert abs(logp.mean() - flow[0]) < 4 * se + 1e-3, (kind, logp.mean(), flow, se)


def test_vp_view_of_an_exact_eps_model_gives_the_gaussian_likelihood():
    sched = schedules.make_schedule('linear', 1000)
    abar_all = jnp.asarray(np.cumprod(1 - schedules.get_beta_schedule('linear', 1000)),
                           jnp.float32)
    r, lam, mu = (jnp.asarray(a, jnp.float32) for a in (R, LAM, MU))

    def eps_model(x, t):
        abar = abar_all[t][:, None]
        v = abar * lam + 1 - abar
        y = (x - jnp.sqrt(abar) * mu) @ r
        return (jnp.sqrt(1 - abar) * y / v) @ r.T  # eps = -sqrt(1 - abar) score.

    view, score = sde_lib.make_vp_score_fn(eps_model, sched)
    x = _data(8, seed=4)
    out = ode_likelihood.ode_log_likelihood(view, score, x, None, eps=1e-3,
                                            trace='exact', rtol=1e-4, atol=1e-4)
    _, true, _ = expected_logp(view, x, 1e-3)
    # The model is evaluated at the nearest trained step (rounding t (N - 1)).
    np.testing.assert_allclose(out.logp, true, atol=0.05)


def test_bits_per_dim_convention():
    # A uniform density on [-1, 1]^D (log p = -D log 2) is 8 bits per 8-bit pixel.
    d = 12
    logp = jnp.asarray([-d * math.log(2.0)])
    np.testing.assert_allclose(ode_likelihood.bits_per_dim(logp, d), 8.0, rtol=1e-6)
    np.testing.assert_allclose(ode_likelihood.bits_per_dim(jnp.asarray([0.0]), d,
                                                           centered=False), 8.0)
    np.testing.assert_allclose(ode_likelihood.bits_per_dim(jnp.asarray([-3.0]), 2),
                               3.0 / (2 * math.log(2.0)) + 7.0, rtol=1e-6)


def test_uniform_dequantize_stays_in_the_pixel_bin():
    k = np.arange(256, dtype=np.float64)
    x = jnp.asarray(np.tile(k / 127.5 - 1.0, (64, 1)), jnp.float32)
    y = np.asarray(ode_likelihood.uniform_dequantize(jax.random.key(5), x), np.float64)
    u = (y + 1.0) / 2.0 * 256.0  # k + U(0, 1).
    np.testing.assert_array_equal(np.floor(u), np.broadcast_to(k, u.shape))
    np.testing.assert_allclose((u - k).mean(), 0.5, atol=0.01)
    assert (u - k).min() >= 0.0 and (u - k).max() < 1.0


def test_likelihood_compiles_once_and_reports_its_nfe():
    sde = sde_lib.VPSDE()
    calls = [0]

    def counted(x, t):
        jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
        return gauss_score(sde)(x, t)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x, rng):
        return ode_likelihood.ode_log_likelihood(sde, counted, x, rng, rtol=1e-4,
                                                 atol=1e-4)

    chex.clear_trace_counter()
    for seed in (0, 1):
        calls[0] = 0
        out = run(jnp.asarray(_data(4, seed=seed)), jax.random.key(seed))
        jax.effects_barrier()
        assert calls[0] == int(out.nfe) > 10
    chex.clear_trace_counter()


def test_ode_bpd_and_errors():
    sde = sde_lib.VPSDE()
    x = jnp.asarray(np.round((np.clip(_data(4), -1, 1) + 1) * 127.5) / 127.5 - 1.0)
    bpd, nfe = ode_likelihood.ode_bpd(sde, gauss_score(sde), x, jax.random.key(6),
                                      rtol=1e-4, atol=1e-4)
    assert bpd.shape == (4,) and np.all(np.isfinite(bpd)) and int(nfe) > 0
    with pytest.raises(ValueError, match='trace'):
        ode_likelihood.ode_log_likelihood(sde, gauss_score(sde), x, None, trace='skilling')
    with pytest.raises(ValueError, match='rng'):
        ode_likelihood.ode_log_likelihood(sde, gauss_score(sde), x, None)
    with pytest.raises(ValueError, match='eps'):
        ode_likelihood.ode_log_likelihood(sde, gauss_score(sde), x, None, trace='exact',
                                          eps=0.0)
