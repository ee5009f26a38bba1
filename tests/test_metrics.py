"""Tests for ddpm_jax.metrics: streaming stats, Frechet distance, IS, precision/recall.

Every number is checked against a closed form or an independent float64 NumPy/SciPy
computation, never against the module's own output.
"""

import numpy as np
import pytest
import scipy.linalg

from ddpm_jax import metrics


def _random_spd(rng, dim, jitter=0.1):
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + jitter * np.eye(dim)


def _random_rotation(rng, dim):
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def _fid_sqrtm(mu1, sigma1, mu2, sigma2):
    """The pytorch-fid / ADM formula with scipy's sqrtm (real part), in float64."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


# ---------------------------------------------------------------------------
# Frechet distance.
# ---------------------------------------------------------------------------


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    dim = 12
    m1, m2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = metrics.frechet_distance(m1, np.diag(s1), m2, np.diag(s2))
    assert isinstance(got, float)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize('dim', [2, 16, 64])
def test_frechet_distance_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = _random_spd(rng, dim), _random_spd(rng, dim)
    expected = _fid_sqrtm(mu1, sigma1, mu2, sigma2)
    got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    # Symmetric in its two Gaussians.
    np.testing.assert_allclose(metrics.frechet_distance(mu2, sigma2, mu1, sigma1), got,
                               rtol=1e-12)


def test_frechet_distance_zero_for_identical_stats():
    rng = np.random.default_rng(1)
    dim = 32
    mu, sigma = rng.standard_normal(dim), _random_spd(rng, dim)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)
    # A mean shift alone gives exactly ||mu1 - mu2||^2.
    shift = rng.standard_normal(dim)
    np.testing.assert_allclose(metrics.frechet_distance(mu, sigma, mu + shift, sigma),
                               shift @ shift, rtol=1e-9)


def test_frechet_distance_commuting_closed_form():
    # sigma_i = Q diag(a_i) Q^T share eigenvectors: (s1 s2)^{1/2} = Q diag(sqrt(a1 a2)) Q^T.
    rng = np.random.default_rng(2)
    dim = 20
    q = _random_rotation(rng, dim)
    a1, a2 = rng.uniform(0.01, 5.0, dim), rng.uniform(0.01, 5.0, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a1) - np.sqrt(a2)) ** 2)
    got = metrics.frechet_distance(mu1, (q * a1) @ q.T, mu2, (q * a2) @ q.T)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_rank_deficient_commuting():
    # Zero eigenvalues in both covariances (and in different directions).
    rng = np.random.default_rng(3)
    dim = 16
    q = _random_rotation(rng, dim)
    a1, a2 = rng.uniform(0.5, 2.0, dim), rng.uniform(0.5, 2.0, dim)
    a1[:6] = 0.0
    a2[4:9] = 0.0
    expected = np.sum((np.sqrt(a1) - np.sqrt(a2)) ** 2)
    with np.errstate(all='raise'):
        got = metrics.frechet_distance(np.zeros(dim), (q * a1) @ q.T, np.zeros(dim),
                                       (q * a2) @ q.T)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_frechet_distance_low_rank_sample_covariance():
    # sigma1 = B B^T with rank r < D, as from too few samples. The non-zero eigenvalues
    # of sigma1 sigma2 = B (B^T sigma2) are those of the r x r SPD matrix B^T sigma2 B,
    # so Tr((sigma1 sigma2)^{1/2}) = sum sqrt(eigvalsh(B^T sigma2 B)).
    rng = np.random.default_rng(4)
    dim, rank = 32, 10
    b = rng.standard_normal((dim, rank))
    sigma1, sigma2 = b @ b.T, _random_spd(rng, dim)
    expected = (np.trace(sigma1) + np.trace(sigma2)
                - 2 * np.sum(np.sqrt(np.linalg.eigvalsh(b.T @ sigma2 @ b))))
    got = metrics.frechet_distance(np.zeros(dim), sigma1, np.zeros(dim), sigma2)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, expected, rtol=1e-7)


def test_frechet_distance_scalar_gaussians():
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    np.testing.assert_allclose(metrics.frechet_distance(1.0, 4.0, -2.0, 9.0), 9.0 + 1.0,
                               rtol=1e-12)


@pytest.mark.parametrize('shapes, match', [
    (((3,), (3, 3), (4,), (3, 3)), 'mu1 .* mu2'),
    (((3,), (3, 3), (3,), (4, 4)), 'sigma2'),
    (((3,), (3, 4), (3,), (3, 3)), 'sigma1'),
    (((3, 1), (3, 3), (3, 1), (3, 3)), 'mean vectors'),
])
def test_frechet_distance_shape_errors(shapes, match):
    args = [np.eye(s[0]) if len(s) == 2 and s[0] == s[1] else np.ones(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        metrics.frechet_distance(*args)


def test_frechet_distance_rejects_non_finite():
    sigma = np.eye(2)
    sigma[0, 0] = np.nan
    with pytest.raises(ValueError, match='sigma1'):
        metrics.frechet_distance(np.zeros(2), sigma, np.zeros(2), np.eye(2))


def test_fid_from_features_matches_reference_formula():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 6)) * [1, 2, 3, 1, 1, 1]
    y = rng.standard_normal((300, 6)) + 0.5
    expected = _fid_sqrtm(x.mean(0), np.cov(x, rowvar=False), y.mean(0),
                          np.cov(y, rowvar=False))
    np.testing.assert_allclose(metrics.fid_from_features(x, y), expected, rtol=1e-8)
    with pytest.raises(ValueError, match='features2: 6 samples'):
        metrics.fid_from_features(x, y[:6])
    assert np.isfinite(metrics.fid_from_features(x, y[:6], check_samples=False))


@pytest.mark.parametrize('num_samples, dim', [(1, 1), (5, 8), (2048, 2048)])
def test_check_enough_samples_raises(num_samples, dim):
    with pytest.raises(ValueError, match=f'at least {dim + 1} samples'):
        metrics.check_enough_samples(num_samples, dim, 'samples')


def test_check_enough_samples_passes():
    metrics.check_enough_samples(2049, 2048)
    metrics.check_enough_samples(2, 1)


# ---------------------------------------------------------------------------
# Streaming statistics.
# ---------------------------------------------------------------------------


def _stream(features, split_points):
    stats = metrics.init_stats(features.shape[1])
    for batch in np.split(features, split_points):
        stats = metrics.update_stats(stats, batch)
    return stats


@pytest.mark.parametrize('offset', [0.0, 1e4])
def test_streaming_stats_match_numpy(offset):
    rng = np.random.default_rng(6)
    x = offset + rng.standard_normal((1000, 7)) @ rng.standard_normal((7, 7))
    expected_mu, expected_sigma = x.mean(axis=0), np.cov(x, rowvar=False)
    # Uneven batches, including an empty one and a single row.
    stats = _stream(x, [1, 1, 37, 500, 999])
    assert stats.count == 1000
    mu, sigma = metrics.finalize_stats(stats)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(sigma, sigma.T)
    # Two halves accumulated separately (e.g. on two hosts) and merged.
    merged = metrics.merge_stats(_stream(x[:313], [100]), _stream(x[313:], [7, 400]))
    mu, sigma = metrics.finalize_stats(merged)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=0, atol=1e-10)


def test_streaming_stats_beat_naive_moments_at_large_offset():
    # Features ~ 1e4 + N(0, 1): E[x x^T] - mu mu^T loses ~8 digits; the centred
    # (Chan et al.) update does not. The naive check proves this test can fail.
    rng = np.random.default_rng(7)
    x = 1e4 + rng.standard_normal((3000, 8))
    expected = np.cov(x, rowvar=False)
    n, mu = len(x), x.mean(axis=0)
    naive = (x.T @ x - n * np.outer(mu, mu)) / (n - 1)
    assert np.max(np.abs(naive - expected)) > 1e-9
    _, sigma = metrics.finalize_stats(_stream(x, [1, 500, 1234, 2999]))
    np.testing.assert_allclose(sigma, expected, rtol=0, atol=1e-10)


def test_streaming_stats_float32_input_is_accumulated_in_float64():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    mu, sigma = metrics.finalize_stats(_stream(x, [50]))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False),
                               rtol=0, atol=1e-12)


def test_streaming_stats_errors():
    stats = metrics.init_stats(3)
    with pytest.raises(ValueError, match=r'\[B, 3\]'):
        metrics.update_stats(stats, np.zeros((4, 2)))
    with pytest.raises(ValueError, match='at least 2'):
        metrics.finalize_stats(metrics.update_stats(stats, np.zeros((1, 3))))
    with pytest.raises(ValueError, match='3-d and 2-d'):
        metrics.merge_stats(stats, metrics.init_stats(2))
    with pytest.raises(ValueError, match='positive integer'):
        metrics.init_stats(0)


# ---------------------------------------------------------------------------
# Inception Score.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('num_classes', [1, 4, 10])
def test_inception_score_balanced_one_hot_is_num_classes(num_classes):
    # Each split holds every class equally often: p(y) uniform, KL = log C per sample.
    num_splits, per_split = 5, 3 * num_classes
    labels = np.tile(np.arange(num_classes), num_splits * per_split // num_classes)
    probs = np.eye(num_classes)[labels]
    mean, std = metrics.inception_score(probs, num_splits, from_logits=False)
    np.testing.assert_allclose(mean, num_classes, rtol=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_uniform_predictions_is_one():
    mean, std = metrics.inception_score(np.zeros((100, 7)), num_splits=4)  # logits
    np.testing.assert_allclose([mean, std], [1.0, 0.0], atol=1e-12)
    probs = np.full((100, 7), 1 / 7)
    np.testing.assert_allclose(metrics.inception_score(probs, 4, from_logits=False)[0], 1.0,
                               rtol=1e-12)


def _reference_inception_score(logits, bounds):
    """Direct float64 formula: exp(mean_x KL(p(y|x) || p(y))) per split."""
    probs = np.exp(logits) / np.sum(np.exp(logits), axis=1, keepdims=True)
    scores = []
    for start, stop in bounds:
        p = probs[start:stop]
        marginal = p.mean(axis=0)
        kl = [sum(p[i, c] * np.log(p[i, c] / marginal[c]) for c in range(p.shape[1]))
              for i in range(len(p))]
        scores.append(np.exp(np.mean(kl)))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_direct_formula():
    rng = np.random.default_rng(9)
    n, num_splits = 103, 4  # N not divisible: splits of 25, 26, 26, 26 rows.
    logits = 3 * rng.standard_normal((n, 6))
    bounds = [(0, 25), (25, 51), (51, 77), (77, 103)]
    expected = _reference_inception_score(logits, bounds)
    np.testing.assert_allclose(metrics.inception_score(logits, num_splits), expected,
                               rtol=1e-12)
    probs = np.exp(logits) / np.sum(np.exp(logits), axis=1, keepdims=True)
    np.testing.assert_allclose(
        metrics.inception_score(probs, num_splits, from_logits=False), expected, rtol=1e-10)
    # The ADM evaluator's fixed-size splits: 40, 40 and a last, shorter 23.
    expected_adm = _reference_inception_score(logits, [(0, 40), (40, 80), (80, 103)])
    np.testing.assert_allclose(metrics.inception_score(logits, split_size=40),
                               expected_adm, rtol=1e-12)


def test_inception_score_errors():
    with pytest.raises(ValueError, match='probability vectors'):
        metrics.inception_score(np.ones((10, 3)), 2, from_logits=False)
    with pytest.raises(ValueError, match='num_splits'):
        metrics.inception_score(np.zeros((3, 3)), 4)
    with pytest.raises(ValueError, match='num_classes'):
        metrics.inception_score(np.zeros((3,)), 1)


# ---------------------------------------------------------------------------
# Precision and recall.
# ---------------------------------------------------------------------------


def _on_line(xs, dim=3):
    """Points x * e_1 in `dim` dimensions."""
    points = np.zeros((len(xs), dim))
    points[:, 0] = xs
    return points


def test_knn_radii_counts_self_as_the_zeroth_neighbour():
    # Integers 0..9: the k-th nearest *other* point is at distance 1 inside and k at
    # the ends for k <= 2 (radii are squared).
    points = _on_line(np.arange(10.0))
    np.testing.assert_array_equal(metrics.knn_radii(points, k=1), np.ones(10))
    expected_k2 = np.array([4.0] + [1.0] * 8 + [4.0])
    np.testing.assert_array_equal(metrics.knn_radii(points, k=2), expected_k2)
    expected_k3 = np.array([9.0, 4.0] + [4.0] * 6 + [4.0, 9.0])
    for batch_size in (1, 3, 10):
        np.testing.assert_array_equal(
            metrics.knn_radii(points, k=3, batch_size=batch_size), expected_k3)


def test_precision_recall_identical_sets():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((200, 16))
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    assert metrics.precision_recall(x, x, batch_size=64, dtype=np.float64) == (1.0, 1.0)


def test_precision_recall_disjoint_clouds():
    rng = np.random.default_rng(11)
    real = rng.standard_normal((150, 8))
    fake = rng.standard_normal((120, 8)) + 100.0
    assert metrics.precision_recall(real, fake, batch_size=50) == (0.0, 0.0)


@pytest.mark.parametrize('num_inside', [0, 3, 7])
def test_precision_recall_partial_overlap_on_a_line(num_inside):
    # Real: integers 0..9, so with k = 1 every real radius is 1. Fake: `num_inside`
    # points at 0.5, 1.5, ... (each within 0.5 of a real point), the rest at 100,
    # 110, ... (far from everything, 10 apart). Precision = num_inside / 10.
    # Fake radii: 1 for the inside points (neighbours 1 apart), 10 for the far ones,
    # which cover no real point. Inside fakes 0.5 .. num_inside - 0.5 with radius 1 cover reals
    # 0 .. num_inside, so recall = (num_inside + 1) / 10 (0 without inside points).
    real = _on_line(np.arange(10.0))
    inside = 0.5 + np.arange(num_inside)
    far = 100.0 + 10.0 * np.arange(10 - num_inside)
    fake = _on_line(np.concatenate([inside, far]))
    expected_recall = (num_inside + 1) / 10 if num_inside else 0.0
    for batch_size in (1, 4, 10000):
        precision, recall = metrics.precision_recall(real, fake, k=1, batch_size=batch_size)
        assert precision == num_inside / 10
        assert recall == expected_recall


def test_precision_recall_boundary_counts_as_inside():
    # A fake point exactly at the k-NN radius of a real point is inside (<=).
    real = _on_line([0.0, 2.0, 4.0])  # k = 1 radii: 4 (squared), i.e. distance 2.
    fake = _on_line([-2.0, 10.0, 13.0])  # -2 is exactly 2 from real 0.
    precision, recall = metrics.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(1 / 3, abs=0)
    # Fake radii: 12^2 for -2 (to 10), 3^2 for 10 and 13; -2 covers every real point.
    assert recall == 1.0


def _brute_force_precision_recall(real, fake, k):
    """Full float64 distance matrices; radii include the self-distance as in ADM."""
    def sq_dists(a, b):
        return np.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)

    real_radii = np.sort(sq_dists(real, real), axis=1)[:, k]
    fake_radii = np.sort(sq_dists(fake, fake), axis=1)[:, k]
    cross = sq_dists(real, fake)  # [N_real, N_fake]
    precision = np.mean(np.any(cross <= real_radii[:, None], axis=0))
    recall = np.mean(np.any(cross <= fake_radii[None, :], axis=1))
    return precision, recall


@pytest.mark.parametrize('k', [1, 3, 5])
def test_precision_recall_blocked_equals_brute_force(k):
    rng = np.random.default_rng(12 + k)
    real = rng.standard_normal((90, 6))
    fake = 0.8 * rng.standard_normal((70, 6)) + 0.7
    expected = _brute_force_precision_recall(real, fake, k)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    for batch_size in (1, 7, 32, 90, 1000):
        got = metrics.precision_recall(real, fake, k, batch_size=batch_size, dtype=np.float64)
        assert got == pytest.approx(expected, abs=0)
    assert metrics.precision_recall(real, fake, k, dtype=np.float32) == pytest.approx(
        expected, abs=0)


def _reference_float16_distances(u, v):
    """The reference's DistanceBlock, op by op over whole matrices: features cast to
    float16; tf.square rounded per element, summed in float32, rounded; the product
    of float16 inputs accumulated in float32 (exact products; cuBLAS's order of
    summation may differ, and so a rare float16 rounding at a tie), rounded; then
    norm_u - 2 * product + norm_v and max(., 0), each rounded to float16. If any entry
    is not finite: the same graph in float32. Returned as float32."""
    u16, v16 = np.float16(u), np.float16(v)
    with np.errstate(over='ignore', invalid='ignore'):
        nu = np.float16(np.sum(np.float32(np.float16(u16 * u16)), axis=1))
        nv = np.float16(np.sum(np.float32(np.float16(v16 * v16)), axis=1))
        product = np.float16(np.float32(u16) @ np.float32(v16).T)
        two_product = np.float16(np.float16(2) * product)
        d = np.float16(np.float16(nu[:, None] - two_product) + nv[None, :])
        d = np.maximum(d, np.float16(0))
    if np.all(np.isfinite(d)):
        return np.float32(d)
    u32, v32 = np.float32(u), np.float32(v)
    d = (np.sum(u32 * u32, 1)[:, None] - 2 * (u32 @ v32.T)) + np.sum(v32 * v32, 1)[None, :]
    return np.maximum(d, 0)


def _reference_float16_precision_recall(real, fake, k, block):
    """The ADM evaluator's ManifoldEstimator: full rows of distances per row block,
    each [block, block] piece from `_reference_float16_distances` (its own float32
    fallback), radii by np.partition, then the same pieces against the radii."""
    def radii(x):
        out = np.zeros(len(x), np.float32)
        for r in range(0, len(x), block):
            row = np.concatenate([_reference_float16_distances(x[r:r + block], x[c:c + block])
                                  for c in range(0, len(x), block)], axis=1)
            rows = np.arange(r, min(r + block, len(x)))
            row[rows - r, rows] = 0  # Ours zeroes the self-distances (see knn_radii).
            out[r:r + block] = np.partition(row, k, axis=1)[:, k]
        return out

    real_radii, fake_radii = radii(real), radii(fake)
    fake_in = np.zeros(len(fake), bool)
    real_in = np.zeros(len(real), bool)
    for r in range(0, len(real), block):
        for f in range(0, len(fake), block):
            d = _reference_float16_distances(real[r:r + block], fake[f:f + block])
            fake_in[f:f + block] |= np.any(d <= real_radii[r:r + block, None], axis=0)
            real_in[r:r + block] |= np.any(d <= fake_radii[None, f:f + block], axis=1)
    return float(np.mean(fake_in)), float(np.mean(real_in))


def _inception_like(rng, n, dim=256, scale=1.0):
    """Non-negative features with squared norms in the hundreds, like pool3's."""
    return np.float32(scale * rng.gamma(0.5, 2.0, (n, dim)))


def test_precision_recall_float16_is_the_reference_distance_graph():
    # The default (float16) reproduces the reference's float16 distances exactly, and
    # they decide points near the balls' edges differently from float32 ones.
    rng = np.random.default_rng(20)
    real, fake = _inception_like(rng, 300), 1.05 * _inception_like(rng, 260)
    assert 100 < np.median(np.sum(real * real, 1)) < 2000
    expected = _reference_float16_precision_recall(real, fake, 3, block=10000)
    for batch_size in (64, 300, 10000):  # No block overflows: the blocking is invisible.
        got = metrics.precision_recall(real, fake, batch_size=batch_size)
        assert got == expected
    np.testing.assert_array_equal(
        metrics.knn_radii(real), _reference_float16_radii(real))
    assert metrics.precision_recall(real, fake, dtype=np.float32) != expected


def _reference_float16_radii(x, k=3):
    d = _reference_float16_distances(x, x)
    np.fill_diagonal(d, 0)
    return np.partition(d, k, axis=1)[:, k]


def test_precision_recall_float16_falls_back_per_block():
    # Features whose squares overflow float16 (> 65504) in some rows: the blocks holding
    # them are computed in float32, the others stay float16, as the reference's
    # tf.cond does block by block.
    rng = np.random.default_rng(21)
    real, fake = _inception_like(rng, 120), _inception_like(rng, 100)
    real[:40] *= 30.0  # Squared norms ~1e5-1e6: inf in float16.
    fake[60:] *= 30.0
    for block in (40, 50):
        expected = _reference_float16_precision_recall(real, fake, 3, block=block)
        assert metrics.precision_recall(real, fake, batch_size=block) == expected
    everything_large = _reference_float16_precision_recall(real * 30, fake * 30, 3, 10000)
    assert everything_large == metrics.precision_recall(real * 30, fake * 30,
                                                        dtype=np.float32)


def test_precision_recall_errors():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match='feature dimensions differ'):
        metrics.precision_recall(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match='more than k=3'):
        metrics.precision_recall(x, x[:3])
    with pytest.raises(ValueError, match='batch_size'):
        metrics.precision_recall(x, x, batch_size=0)
    with pytest.raises(ValueError, match='dtype must be float16, float32 or float64'):
        metrics.precision_recall(x, x, dtype=np.int32)
