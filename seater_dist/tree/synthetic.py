"""Deterministic skewed, clustered item embeddings for tests and benchmarks of the tree builders.

Isotropic Gaussian noise hides what a balanced clustering costs (plain k-means already splits it into
near-equal groups), so the builders are measured on a hierarchical Gaussian mixture whose cluster
weights follow Zipf laws at every level: a few huge topics, many small ones, sub-topics inside topics,
and so on.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 20  # rows generated per step; fixed so that the output does not depend on memory


def mixture_centers(
    d: int, seed: int, fanout: tuple[int, ...] = (24, 16, 12), spread: tuple[float, ...] = (4.0, 1.6, 0.6),
    zipf: float = 1.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Leaf centres and weights of a hierarchical mixture.

    Returns centers float32 [L, d] and weights float64 [L] (sum 1), L = prod(fanout). Each level's
    children sit around their parent with standard deviation ``spread[level]`` per dimension, and get
    Zipf(``zipf``) weights in a random order.
    """
    rng = np.random.default_rng(seed)
    centers, weights = np.zeros((1, d)), np.ones(1)
    for f, s in zip(fanout, spread):
        child = centers[:, None, :] + rng.normal(0.0, s, size=(centers.shape[0], f, d))
        w = 1.0 / np.arange(1, f + 1) ** zipf
        w = np.stack([rng.permutation(w / w.sum()) for _ in range(centers.shape[0])])
        centers, weights = child.reshape(-1, d), (weights[:, None] * w).reshape(-1)
    return centers.astype(np.float32), weights / weights.sum()


def skewed_clustered_embeddings(n: int, d: int = 64, seed: int = 0, out: np.ndarray | None = None,
                                noise: float = 0.25) -> np.ndarray:
    """float32 [n, d] embeddings drawn from :func:`mixture_centers`, identical for the same (n, d, seed).

    ``out``: an array (e.g. ``np.lib.format.open_memmap``) of shape [n, d] to fill in place, so that
    millions of rows never sit in memory twice.
    """
    centers, weights = mixture_centers(d, seed)
    out = np.empty((n, d), dtype=np.float32) if out is None else out
    if out.shape != (n, d):
        raise ValueError(f"out has shape {out.shape}, expected ({n}, {d})")
    cdf = np.cumsum(weights)
    for c, start in enumerate(range(0, n, _CHUNK)):
        stop = min(n, start + _CHUNK)
        rng = np.random.default_rng([seed, c])
        leaf = np.minimum(np.searchsorted(cdf, rng.random(stop - start)), centers.shape[0] - 1)
        out[start:stop] = centers[leaf] + rng.normal(0.0, noise, size=(stop - start, d)).astype(np.float32)
    return out
