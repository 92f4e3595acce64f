"""How sure a metric is: bootstrap confidence intervals over users, and paired tests between two models.

Every offline metric is a mean over users, so its uncertainty is that of a mean of U per-user values.
Both procedures resample users, never items, and take a fixed seed: the same per-user values in the
same order give the same interval and the same p-value, on any machine and any number of actors.

* :func:`bootstrap_ci`: the percentile bootstrap (Efron & Tibshirani, *An Introduction to the
  Bootstrap*, ch. 13). Draw U users with replacement, R times; the interval is the 2.5th and 97.5th
  percentiles of the R resampled means. On paired differences ``B_u - A_u`` it is the paired interval.
* :func:`sign_flip_pvalue`: the two-sided paired permutation test. Under "A and B are exchangeable for
  every user", each difference ``d_u`` is as likely to be ``-d_u``; the p-value is the share of random
  sign flips whose ``|mean|`` is at least the observed one, counting the observed assignment once:
  ``(1 + #{|mean(s * d)| >= |mean(d)|}) / (1 + R)``.

Both are vectorised: a chunk of resamples is a matrix (resample counts or signs, [chunk, U]) times the
per-user values [U, M], so R resamples of U users cost R·U·M multiply-adds in a few BLAS calls, in
memory bounded by ``CHUNK_CELLS``.

    >>> values = np.random.default_rng(0).binomial(1, 0.3, size=(10_000, 1)).astype(float)
    >>> lo, hi = bootstrap_ci(values)[0]          # about 0.3 -/+ 1.96 * sqrt(0.3 * 0.7 / 10_000)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

RESAMPLES = 1000  # bootstrap resamples of an interval
PERMUTATIONS = 5000  # sign flips of a p-value (its smallest value is 1 / (1 + PERMUTATIONS))
SEED = 0
LEVEL = 0.95
CHUNK_CELLS = 1 << 22  # resample-by-user cells held at once (32 MiB of float64)


def _as_matrix(values: np.ndarray) -> np.ndarray:
    """float64 [U, M] (a 1-D array is one metric); refuses an empty or non-finite sample."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"expected per-user values [users, metrics] with at least one user, got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("per-user values must be finite (a NaN or infinity came from the metrics)")
    return values


def _chunks(total: int, users: int) -> Iterator[int]:
    """Sizes of the resample chunks: as many resamples at once as CHUNK_CELLS allows."""
    step = max(1, CHUNK_CELLS // users)
    for start in range(0, total, step):
        yield min(step, total - start)


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """float64 [resamples, M]: the mean of every metric over ``resamples`` draws of U users with replacement.

    Means are taken around the first user's value (``v_0 + mean(v - v_0)``), so a sample whose users all
    have the same value resamples to exactly that value.
    """
    values = _as_matrix(values)
    users = values.shape[0]
    centred = np.asfortranarray(values - values[0])  # column-major: each metric's users contiguous for BLAS
    rng = np.random.default_rng(seed)
    out = []
    for size in _chunks(resamples, users):
        draws = rng.integers(0, users, size=(size, users)) + (np.arange(size) * users)[:, None]  # row r: r*U + user
        counts = np.bincount(draws.ravel(), minlength=size * users).reshape(size, users)  # times each user drawn
        out.append(counts.astype(np.float64) @ centred / users)
    return values[0] + np.concatenate(out)


def bootstrap_ci(values: np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES,
                 seed: int = SEED) -> np.ndarray:
    """float64 [M, 2]: the percentile-bootstrap ``level`` interval (lo, hi) of each metric's mean over users.

    values: float [U] or [U, M], one row per user (in a fixed order: the order is part of the seed's draw).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means = bootstrap_means(values, resamples, seed)
    tail = 100 * (1 - level) / 2
    return np.percentile(means, [tail, 100 - tail], axis=0).T


def sign_flip_pvalue(differences: np.ndarray, permutations: int = PERMUTATIONS, seed: int = SEED) -> np.ndarray:
    """float64 [M]: two-sided paired permutation (sign-flip) p-value of each metric's mean difference.

    differences: float [U] or [U, M], ``B_u - A_u`` per user. All-zero differences give p = 1; a
    difference of one sign for every user gives the smallest p, ``1 / (1 + permutations)``.
    """
    d = _as_matrix(differences)
    users = d.shape[0]
    observed = np.abs(d.sum(0)) / users
    tolerance = 1e-12 * np.maximum(1.0, observed)  # flips equal to the observed one up to rounding count
    rng = np.random.default_rng(seed)
    extreme = np.zeros(d.shape[1], dtype=np.int64)
    total, d = d.sum(0), np.asfortranarray(d)
    for size in _chunks(permutations, users):
        words = rng.integers(0, 1 << 64, size=(size, -(-users // 64)), dtype=np.uint64, endpoint=False)
        keep = np.unpackbits(words.view(np.uint8), axis=1)[:, :users]  # 1: keep d_u, 0: flip it
        flipped = np.abs(2 * (keep.astype(np.float64) @ d) - total) / users  # sum of s*d with s = 2*keep - 1
        extreme += (flipped >= observed - tolerance).sum(0)
    return (1 + extreme) / (1 + permutations)
