"""The reference solver: k-means-constrained, the SEATER authors' tool, used as our yardstick.

It solves the same problem as our own exact constrained k-means (``lloyd.split_batch``): Lloyd
iterations whose assignment step is a min-cost flow. Its per-node overhead makes it much slower, so
the builder uses it only for spot checks of quality (``quality``) and, when ``exact_threshold`` is set,
for small nodes.
"""

from __future__ import annotations

import numpy as np


def split_reference(x: np.ndarray, k: int, seed: int = 0, n_init: int = 1) -> tuple[np.ndarray, float]:
    """k-means-constrained split of one node into k groups of floor(n/k) or floor(n/k)+1 items.

    x float [n, d], n > k -> (group int64 [n], sum of squared distances to the group means).
    """
    from k_means_constrained import KMeansConstrained

    n = x.shape[0]
    x64 = np.ascontiguousarray(x, dtype=np.float64)
    model = KMeansConstrained(n_clusters=k, size_min=n // k, size_max=n // k + 1, n_init=n_init,
                              random_state=seed)
    labels = model.fit_predict(x64).astype(np.int64)
    return labels, sse_of(x64, labels)


def sse_of(x: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of x [n, d] to the mean of its group (labels int [n])."""
    x = np.asarray(x, dtype=np.float64)
    m = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=m).astype(np.float64)
    sums = np.zeros((m, x.shape[1]))
    np.add.at(sums, labels, x)
    means = sums / np.maximum(counts, 1)[:, None]
    return float(((x - means[labels]) ** 2).sum())
