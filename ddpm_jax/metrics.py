"""Sample-quality metrics on feature vectors: FID, Inception Score, precision and recall.

This module owns the arithmetic that turns classifier outputs into the numbers
reported for image generators; it never runs a network. The feature extractor
(e.g. Inception-v3 pool_3 features and logits) lives elsewhere and hands arrays in:

* `FeatureStats` and `init_stats` / `update_stats` / `merge_stats` /
  `finalize_stats`: streaming mean and covariance of feature vectors in float64, so
  50k x 2048 features never have to be held at once and per-host statistics can be
  merged.
* `frechet_distance` (FID, Heusel et al. 2017) and `fid_from_features`;
  `check_enough_samples` guards against rank-deficient covariances.
* `inception_score` (Salimans et al. 2016, Sec. 4).
* `knn_radii` and `precision_recall`: improved precision and recall
  (Kynkaanniemi et al. 2019, Sec. 2) with blocked pairwise distances.

Every function is pure NumPy on the host: no Flax, no I/O and no global state. The
conventions follow the evaluator used by ADM (Dhariwal & Nichol 2021),
openai/guided-diffusion `evaluations/evaluator.py`, so numbers are comparable with
published ones: the covariance is `np.cov(rowvar=False)` (ddof=1); the Inception
Score is exp(mean KL) per split with the improved-gan split rule; precision and
recall use squared Euclidean distances, the k-th neighbour radius taken from the
distance row *including* the zero self-distance, and `distance <= radius`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# The improved precision/recall paper and the ADM evaluator both use k = 3.
DEFAULT_NUM_NEIGHBOURS = 3
# Rows (and columns) of one block of the pairwise-distance matrix, as in the ADM
# evaluator's `ManifoldEstimator` (row_batch_size = col_batch_size = 10000).
DEFAULT_DISTANCE_BATCH_SIZE = 10000


# ---------------------------------------------------------------------------
# Streaming feature statistics.
# ---------------------------------------------------------------------------


class FeatureStats(NamedTuple):
    """Running first and second moments of feature vectors (a pytree).

    Stored in the form of Chan, Golub & LeVeque (1979), "Updating formulae and a
    pairwise algorithm for computing sample variances": the count, the mean and the
    co-moment matrix M2 = sum_i (x_i - mean)(x_i - mean)^T, all in float64. Keeping
    centred sums instead of raw sums sum_i x_i x_i^T avoids the catastrophic
    cancellation of E[x x^T] - mean mean^T when features have a large offset.

    Attributes:
        count: Number of feature vectors seen.
        mean: [D] float64 mean.
        m2: [D, D] float64 sum of outer products of deviations from `mean`.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray


def init_stats(dim: int) -> FeatureStats:
    """Empty statistics for `dim`-dimensional features.

    Args:
        dim: Feature dimension D (2048 for Inception pool_3).

    Returns:
        A `FeatureStats` with count 0.

    Raises:
        ValueError: If `dim` is not a positive integer.
    """
    if int(dim) != dim or dim < 1:
        raise ValueError(f'feature dimension must be a positive integer, got {dim!r}')
    dim = int(dim)
    return FeatureStats(count=0, mean=np.zeros((dim,), np.float64),
                        m2=np.zeros((dim, dim), np.float64))


def _stats_dim(stats: FeatureStats) -> int:
    return stats.mean.shape[0]


def merge_stats(a: FeatureStats, b: FeatureStats) -> FeatureStats:
    """Statistics of the union of two disjoint sets of features.

    The pairwise update of Chan et al. (1979) for the mean and co-moment matrix: with
    delta = mean_b - mean_a and n = n_a + n_b,
        mean = mean_a + delta * n_b / n,
        M2 = M2_a + M2_b + delta delta^T * n_a n_b / n.
    Only deviations and differences of means are ever squared, never the raw
    features, so a large common offset causes no catastrophic cancellation.

    Args:
        a, b: Statistics of the two sets (same feature dimension).

    Returns:
        The merged `FeatureStats`; its value does not depend on how the data was
        split (up to rounding).

    Raises:
        ValueError: If the feature dimensions differ.
    """
    if _stats_dim(a) != _stats_dim(b):
        raise ValueError(f'cannot merge statistics of {_stats_dim(a)}-d and '
                         f'{_stats_dim(b)}-d features')
    if b.count == 0:
        return a
    if a.count == 0:
        return b
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + np.outer(delta, delta) * (a.count * b.count / n)
    return FeatureStats(count=n, mean=mean, m2=m2)


def update_stats(stats: FeatureStats, features: np.ndarray) -> FeatureStats:
    """Adds a batch of feature vectors to running statistics.

    The batch's own mean and co-moment matrix are computed exactly in float64 about
    the batch mean and then merged with `merge_stats` (Chan et al. 1979).

    Args:
        stats: Statistics so far.
        features: [B, D] features of any float dtype; B may be 0.

    Returns:
        Updated statistics (the input is not modified).

    Raises:
        ValueError: If `features` is not 2-D or its D differs from the statistics'.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != _stats_dim(stats):
        raise ValueError(f'features must have shape [B, {_stats_dim(stats)}], '
                         f'got {features.shape}')
    count = features.shape[0]
    if count == 0:
        return stats
    mean = features.mean(axis=0)
    centred = features - mean
    batch = FeatureStats(count=count, mean=mean, m2=centred.T @ centred)
    return merge_stats(stats, batch)


def finalize_stats(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of everything added so far.

    The covariance uses ddof=1, i.e. it equals `np.cov(features, rowvar=False)`,
    which is what pytorch-fid and the ADM evaluator (`compute_statistics`) use.

    Args:
        stats: Accumulated statistics.

    Returns:
        (mu [D], sigma [D, D]) in float64; sigma is exactly symmetric.

    Raises:
        ValueError: If fewer than 2 vectors were seen.
    """
    if stats.count < 2:
        raise ValueError(f'need at least 2 feature vectors for a covariance, got {stats.count}')
    # M2 accumulates matrix products whose two triangles may differ in the last bit.
    sigma = 0.5 * (stats.m2 + stats.m2.T) / (stats.count - 1)
    return stats.mean.copy(), sigma


def check_enough_samples(num_samples: int, dim: int, name: str = 'features') -> None:
    """Raises unless there are more samples than feature dimensions.

    With N <= D samples the D x D sample covariance has rank at most N - 1 < D, so it
    is singular and the FID is dominated by the missing directions, not by sample
    quality. N = D + 1 is the bare minimum; FID is biased for small N (Chong &
    Forsyth 2020), and published numbers use 50,000 samples.

    Args:
        num_samples: Number of feature vectors N.
        dim: Feature dimension D.
        name: What the features are (e.g. 'reference', 'samples'), for the message.

    Raises:
        ValueError: If num_samples <= dim.
    """
    if num_samples <= dim:
        raise ValueError(
            f'{name}: {num_samples} samples of {dim}-d features give a singular covariance '
            f'(rank <= {max(num_samples - 1, 0)}); FID needs at least {dim + 1} samples, '
            f'and in practice >= 10,000 (50,000 for published numbers).')


# ---------------------------------------------------------------------------
# Frechet distance.
# ---------------------------------------------------------------------------


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh; rounding-level negative eigenvalues -> 0."""
    eigvals, eigvecs = np.linalg.eigh(sigma)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((sigma1 sigma2)^{1/2}) for symmetric PSD matrices, in float64.

    With A = sigma1^{1/2} sigma2^{1/2}, A^T A = sigma2^{1/2} sigma1 sigma2^{1/2}, and
    XY and YX have the same eigenvalues (X = sigma2^{1/2}, Y = sigma1 sigma2^{1/2}),
    so the eigenvalues of sigma1 sigma2 are real, non-negative and equal to the
    squared singular values of A. The trace of the principal square root is the sum
    of the square roots of those eigenvalues, hence
        Tr((sigma1 sigma2)^{1/2}) = sum_i s_i(A) = ||sigma1^{1/2} sigma2^{1/2}||_*.
    Unlike `scipy.linalg.sqrtm(sigma1 @ sigma2)` this never goes complex (sigma1
    sigma2 is not symmetric, so a Schur-based sqrtm picks up imaginary rounding
    noise), stays finite for singular (rank-deficient) covariances, where sqrtm
    fails, and is symmetric in its arguments. The nuclear norm is 1-Lipschitz in the
    nuclear norm, so rounding in the two square roots moves the result by at most
    the size of that rounding, rather than by its square root as taking
    eigenvalues of sigma1^{1/2} sigma2 sigma1^{1/2} and then square roots would.

    Args:
        sigma1, sigma2: [D, D] symmetric positive semi-definite matrices.

    Returns:
        The trace, a Python float.
    """
    product = _psd_sqrt(sigma1) @ _psd_sqrt(sigma2)
    return float(np.sum(np.linalg.svd(product, compute_uv=False)))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})
    (Dowson & Landau 1982; used as FID by Heusel et al. 2017), computed in float64. The
    trace of the matrix square root comes from `trace_sqrt_product`, so no `eps`
    jitter is needed for singular covariances (the ADM evaluator and pytorch-fid
    add eps * I and retry when sqrtm fails). The result is not clipped at zero.

    Args:
        mu1, sigma1: [D] mean and [D, D] covariance of the first Gaussian (for FID,
            of the generated samples' features).
        mu2, sigma2: Same for the second (the reference set).

    Returns:
        The squared Frechet distance, a Python float.

    Raises:
        ValueError: If the shapes do not match each other or are not [D] / [D, D],
            or if any input is not finite.
    """
    # atleast_* as in the ADM evaluator, so 1-d Gaussians may be given as scalars.
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f'mean vectors must be 1-d of equal length, got mu1 {mu1.shape} '
                         f'and mu2 {mu2.shape}')
    dim = mu1.shape[0]
    for name, sigma in (('sigma1', sigma1), ('sigma2', sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f'{name} must have shape {(dim, dim)} to match the means, '
                             f'got {sigma.shape}')
    for name, x in (('mu1', mu1), ('sigma1', sigma1), ('mu2', mu2), ('sigma2', sigma2)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f'{name} has non-finite entries')
    # eigh reads one triangle only; symmetrise so both triangles count equally.
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid_from_features(features1: np.ndarray, features2: np.ndarray, *,
                      check_samples: bool = True) -> float:
    """Frechet distance between the Gaussians fitted to two feature arrays.

    Args:
        features1: [N1, D] features (e.g. of generated samples).
        features2: [N2, D] features (e.g. of the reference set).
        check_samples: If True, require N > D for both sets (`check_enough_samples`).

    Returns:
        The FID, a Python float.

    Raises:
        ValueError: On shape mismatches or, with `check_samples`, too few samples.
    """
    stats = []
    for name, features in (('features1', features1), ('features2', features2)):
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f'{name} must be 2-d [N, D], got shape {features.shape}')
        if check_samples:
            check_enough_samples(features.shape[0], features.shape[1], name)
        stats.append(finalize_stats(update_stats(init_stats(features.shape[1]), features)))
    (mu1, sigma1), (mu2, sigma2) = stats
    return frechet_distance(mu1, sigma1, mu2, sigma2)


# ---------------------------------------------------------------------------
# Inception Score.
# ---------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def inception_score(logits_or_probs: np.ndarray, num_splits: int = 10, *,
                    from_logits: bool = True,
                    split_size: int | None = None) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, Sec. 4).

    Per split, p(y) is the split's mean of p(y|x) and the score is
    exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y))); the result is the mean and
    the (population, ddof=0) standard deviation of the per-split scores. By default
    the N rows are cut into `num_splits` contiguous chunks
    `[i * N // num_splits, (i + 1) * N // num_splits)`, as in openai/improved-gan
    `inception_score/model.py`. The ADM evaluator instead uses fixed chunks of
    `split_size=5000` rows (the last one possibly shorter) and reports only the
    mean; pass `split_size=5000` to reproduce it. For N = 50,000 the two agree.
    Terms with p(y|x) = 0 contribute 0 (the limit of p log p), where the reference
    code would produce NaN.

    Args:
        logits_or_probs: [N, C] classifier logits, or probabilities if
            `from_logits` is False.
        num_splits: Number of equal contiguous splits (ignored if `split_size`).
        from_logits: Whether the input is logits (softmaxed here in float64).
        split_size: If given, rows per split instead of `num_splits` splits.

    Returns:
        (mean, std) of the per-split scores, Python floats. Ranges from 1 to C.

    Raises:
        ValueError: If the input is not 2-d, a split would be empty, or (when
            `from_logits` is False) rows are not probability vectors.
    """
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f'expected [N, num_classes] logits or probabilities, got {x.shape}')
    n = x.shape[0]
    if from_logits:
        log_probs = _log_softmax(x)
        probs = np.exp(log_probs)
    else:
        probs = x
        row_sums = probs.sum(axis=1)
        if np.any(probs < 0) or not np.allclose(row_sums, 1.0, atol=1e-3):
            raise ValueError('rows are not probability vectors (negative entries or sums '
                             'far from 1); pass from_logits=True for logits')
        with np.errstate(divide='ignore'):
            log_probs = np.log(probs)
    if split_size is not None:
        if split_size < 1:
            raise ValueError(f'split_size must be >= 1, got {split_size}')
        bounds = [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
    else:
        if num_splits < 1 or num_splits > n:
            raise ValueError(f'num_splits must be in [1, N={n}], got {num_splits}')
        bounds = [(i * n // num_splits, (i + 1) * n // num_splits) for i in range(num_splits)]
    if not bounds:
        raise ValueError('no samples given')
    scores = []
    for start, stop in bounds:
        p, log_p = probs[start:stop], log_probs[start:stop]
        # 0 * log 0 = 0: a class never predicted in the split contributes nothing;
        # np.where discards the NaNs that 0 * (-inf) produces in the masked entries.
        with np.errstate(divide='ignore', invalid='ignore'):
            log_marginal = np.log(p.mean(axis=0))
            terms = np.where(p > 0, p * (log_p - log_marginal), 0.0)
        scores.append(np.exp(np.mean(np.sum(terms, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------
# Improved precision and recall.
# ---------------------------------------------------------------------------


def _as_features(features: np.ndarray, name: str, dtype) -> np.ndarray:
    features = np.asarray(features, dtype=dtype)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f'{name} must be a non-empty [N, D] array, got shape {features.shape}')
    return features


def _check_batching(k: int, batch_size: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f'k must be a positive integer, got {k!r}')
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')


def _squared_distances(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray,
                       b_sq: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] squared Euclidean distances ||a||^2 - 2 a.b + ||b||^2, >= 0.

    The expansion turns the work into one matrix product (as in the ADM evaluator's
    `_batch_pairwise_distances`); clipping removes negative rounding residue.
    """
    dist = a @ b.T
    dist *= -2
    dist += a_sq[:, None]
    dist += b_sq[None, :]
    return np.maximum(dist, 0, out=dist)


class _Features(NamedTuple):
    """Feature vectors ready for `_distance_block`: `x` in the arithmetic dtype and
    their squared norms; for float16 distances also `x32`, `sq32` (float32)."""
    x: np.ndarray
    sq: np.ndarray
    x32: np.ndarray | None = None
    sq32: np.ndarray | None = None

    def rows(self, start: int, stop: int) -> '_Features':
        return _Features(*(None if v is None else v[start:stop] for v in self))


def _prepare(features: np.ndarray, name: str, dtype) -> _Features:
    """`features` as `_distance_block` reads them (see `knn_radii`'s `dtype`)."""
    if np.dtype(dtype) not in (np.float16, np.float32, np.float64):
        raise ValueError(f'dtype must be float16, float32 or float64, got {dtype!r}')
    if np.dtype(dtype) != np.float16:
        x = _as_features(features, name, dtype)
        return _Features(x, np.einsum('ij,ij->i', x, x))
    x32 = _as_features(features, name, np.float32)
    x16 = x32.astype(np.float16)
    with np.errstate(over='ignore'):  # Overflow is inf: that block falls back.
        # tf.reduce_sum(tf.square(U), 1) in float16: each square rounded to float16,
        # summed with a float32 accumulator (TF's GPU reductions of half), rounded once.
        sq16 = np.sum(np.square(x16).astype(np.float32), axis=1).astype(np.float16)
    return _Features(x16, sq16, x32, np.einsum('ij,ij->i', x32, x32))


def _distance_block(a: _Features, b: _Features) -> np.ndarray:
    """Squared distances between two blocks of `_prepare`d features.

    For float16 features, the distance graph of Kynkaanniemi et al.'s code and the ADM
    evaluator (`DistanceBlock`): features cast to float16, norms and product in
    float16 (the product accumulated in float32, as cuBLAS does, then rounded), every
    later operation rounded to float16; a block with a non-finite entry is computed
    again in float32. Returned as float32.
    """
    if a.x32 is None:
        return _squared_distances(a.x, a.sq, b.x, b.sq)
    product = (a.x.astype(np.float32) @ b.x.astype(np.float32).T)
    with np.errstate(over='ignore', invalid='ignore'):
        product = product.astype(np.float16)
        # NumPy's float16 arithmetic rounds each operation to float16, as TF's does.
        dist = (a.sq[:, None] - np.float16(2) * product) + b.sq[None, :]
    dist = np.maximum(dist, np.float16(0))
    if np.all(np.isfinite(dist)):
        return dist.astype(np.float32)
    return _squared_distances(a.x32, a.sq32, b.x32, b.sq32)


def knn_radii(features: np.ndarray, k: int = DEFAULT_NUM_NEIGHBOURS, *,
              batch_size: int = DEFAULT_DISTANCE_BATCH_SIZE,
              dtype=np.float16) -> np.ndarray:
    """Squared distance from each feature vector to its k-th nearest neighbour.

    The radius of the hypersphere around each sample in the manifold estimate of
    Kynkaanniemi et al. (2019), Sec. 2. As in their code and the ADM evaluator
    (`ManifoldEstimator.manifold_radii`: `np.partition(d, seq)[:, k]` over a full
    row of distances that includes the sample itself), it is the (k+1)-th smallest
    entry of the row including the zero self-distance, i.e. the k-th nearest
    *other* sample. Self-distances are set to exactly 0 so rounding in the
    expanded formula cannot push them past a genuine neighbour.

    The N x N matrix is never formed: rows and columns are processed in blocks of
    `batch_size`, keeping the k+1 smallest distances per row seen so far, so memory
    is O(batch_size^2 + batch_size * k).

    Args:
        features: [N, D] feature vectors, N > k.
        k: Neighbourhood size (3 in the paper and the ADM evaluator).
        batch_size: Rows and columns per distance block.
        dtype: float16 (the default) computes each block of distances as
            Kynkaanniemi et al.'s code and the ADM evaluator do (`DistanceBlock`):
            in float16, every operation rounded to float16 (the matrix product and
            the norms' sums accumulated in float32, as on their GPUs), and again in
            float32 for a block with a non-finite entry (features too large for
            float16). On Inception features (squared norms in the hundreds) float16's
            spacing there, 0.25-0.5, decides some points near a ball's edge, so the
            reference's numbers need it. float32 or float64: every step in that dtype.

    Returns:
        [N] squared radii: float32 for float16 distances, else `dtype`.

    Raises:
        ValueError: If N <= k or the arguments are malformed.
    """
    _check_batching(k, batch_size)
    return _knn_radii(_prepare(features, 'features', dtype), k, batch_size)


def _knn_radii(x: _Features, k: int, batch_size: int) -> np.ndarray:
    """`knn_radii` of `_prepare`d features."""
    n = x.x.shape[0]
    if n <= k:
        raise ValueError(f'need more than k={k} feature vectors for k-NN radii, got {n}')
    radii = np.empty((n,), dtype=np.float32 if x.x32 is not None else x.x.dtype)
    for r0 in range(0, n, batch_size):
        r1 = min(r0 + batch_size, n)
        nearest = None  # [rows, <= k+1]: the smallest distances of each row so far.
        for c0 in range(0, n, batch_size):
            c1 = min(c0 + batch_size, n)
            block = _distance_block(x.rows(r0, r1), x.rows(c0, c1))
            if c0 == r0:  # Row and column blocks share their start: the self-distances.
                np.fill_diagonal(block, 0)
            merged = block if nearest is None else np.concatenate([nearest, block], axis=1)
            if merged.shape[1] > k + 1:
                merged = np.partition(merged, k, axis=1)[:, :k + 1]
            nearest = merged
        radii[r0:r1] = np.partition(nearest, k, axis=1)[:, k]
    return radii


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray,
                     k: int = DEFAULT_NUM_NEIGHBOURS, *,
                     batch_size: int = DEFAULT_DISTANCE_BATCH_SIZE,
                     dtype=np.float16) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Sec. 2).

    Each set's manifold is the union of balls around its samples with radius the
    distance to the k-th nearest neighbour in the same set (`knn_radii`).
    Precision is the fraction of fake samples inside the real manifold (within the
    radius of at least one real sample, `distance <= radius`); recall is the
    fraction of real samples inside the fake manifold. Matches the ADM evaluator's
    `ManifoldEstimator.evaluate_pr` with the reference batch as `real_features`.
    Distances are compared squared, which gives the same answer as unsquared.

    Both directions are decided in one blocked pass over the [N_real, N_fake]
    distance matrix, so memory is O(batch_size^2), never N_real x N_fake.

    Args:
        real_features: [N_real, D] reference features, N_real > k.
        fake_features: [N_fake, D] generated-sample features, N_fake > k.
        k: Neighbourhood size (3 in the paper and the ADM evaluator).
        batch_size: Rows and columns per distance block (10,000 in the ADM
            evaluator; with float16 distances, the blocks that fall back to float32
            are these).
        dtype: Arithmetic of the distances: float16 as the reference code (see
            `knn_radii`), float32, or float64 (exact enough for tests).

    Returns:
        (precision, recall), Python floats in [0, 1].

    Raises:
        ValueError: If the feature dimensions differ, a set has <= k samples, or
            the arguments are malformed.
    """
    _check_batching(k, batch_size)
    real = _prepare(real_features, 'real_features', dtype)
    fake = _prepare(fake_features, 'fake_features', dtype)
    if real.x.shape[1] != fake.x.shape[1]:
        raise ValueError(f'feature dimensions differ: real {real.x.shape[1]}, '
                         f'fake {fake.x.shape[1]}')
    real_radii = _knn_radii(real, k, batch_size)
    fake_radii = _knn_radii(fake, k, batch_size)
    num_real, num_fake = len(real.x), len(fake.x)
    fake_in_real = np.zeros((num_fake,), dtype=bool)  # -> precision
    real_in_fake = np.zeros((num_real,), dtype=bool)  # -> recall
    for r0 in range(0, num_real, batch_size):
        r1 = min(r0 + batch_size, num_real)
        for f0 in range(0, num_fake, batch_size):
            f1 = min(f0 + batch_size, num_fake)
            dist = _distance_block(real.rows(r0, r1), fake.rows(f0, f1))  # [R, F]
            fake_in_real[f0:f1] |= np.any(dist <= real_radii[r0:r1, None], axis=0)
            real_in_fake[r0:r1] |= np.any(dist <= fake_radii[None, f0:f1], axis=1)
    return float(np.mean(fake_in_real)), float(np.mean(real_in_fake))
