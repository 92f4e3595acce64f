"""The paper's tree ablations: an unbalanced tree by plain k-means, and a random balanced tree.

* unbalanced (:func:`unbalanced_paths`): plain (unconstrained) k-means, recursing while a group exceeds
  k items; its node splits are :func:`plain_large` (faiss) and :func:`plain_batch` (B nodes at once).
* random (:func:`random_paths`): a random order inside every node, cut into balanced groups by rank.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import numpy as np

from seater_dist.config import TreeSettings
from seater_dist.tree.assignment import group_counts
from seater_dist.tree.balance import group_nodes, group_of_rank
from seater_dist.tree.item_tree import depth_for
from seater_dist.tree.lloyd import (
    SplitResult,
    centroids,
    faiss_centers,
    group_sse,
    kmeans_steps,
    masked_mean,
    sqdist,
)
from seater_dist.tree.quality import level_record, level_sse

log = logging.getLogger("seater_dist.tree")


class LevelSplitter(Protocol):
    """Splits the nodes of one level (``executor.Runner``)."""

    def split_level(self, order: np.ndarray, starts: np.ndarray, sizes: np.ndarray, k: int, s: TreeSettings,
                    mode: str, level: int, branch: np.ndarray) -> tuple[list[Any], list[Any], dict[str, np.ndarray]]:
        ...


# -------------------------------------------------------------------------------------------- unbalanced
def unbalanced_paths(runner: LevelSplitter, n: int, k: int, s: TreeSettings) -> tuple[np.ndarray, list[dict]]:
    """Plain k-means recursing while a group exceeds k (the paper's imbalanced ablation).

    Items of a group of <= k items that ends at level L above the deepest one get a chain of
    single-child nodes between that group and their leaf: paths[i, L] = rank in the group, then 0s.
    Returns paths int16 [N, D_max-1] and one record per split level.
    """
    node = np.zeros(n, dtype=np.int64)
    done_at = np.full(n, -1, dtype=np.int64)  # level of the node (<= k items) each item ended in
    columns: list[np.ndarray] = []
    levels = []
    lvl = 0
    while True:
        t = time.time()
        active = done_at < 0
        order, starts, sizes = group_nodes(np.where(active, node, -1))
        first = 1 if not active[order[0]] else 0  # the "-1" block of finished items sorts first
        starts, sizes = starts[first:], sizes[first:]
        small = sizes <= k
        finished = np.repeat(small, sizes)
        done_at[order[starts[0]:][finished]] = lvl
        if small.all():
            break
        big = ~small
        branch = np.zeros(n, dtype=np.int16)
        units, _, stats = runner.split_level(order, starts, sizes, k, s, "plain", lvl, branch)
        columns.append(np.where(done_at >= 0, 0, branch).astype(np.int16))
        node = np.unique(node * k + branch, return_inverse=True)[1]  # dense ids: no overflow however deep
        levels.append(level_record(lvl, None, sizes[big], k, stats, time.time() - t, len(units)))
        log.info("built level %d: %s nodes split by plain k-means in %.1f s", lvl + 1, f"{int(big.sum()):,}",
                 time.time() - t)
        lvl += 1
    depth = int(done_at.max()) + 1
    paths = np.zeros((n, depth - 1), dtype=np.int16)
    for c, col in enumerate(columns[: depth - 1]):
        paths[:, c] = col
    # rank inside the final group, for items whose group sits above the deepest internal level
    order, starts, sizes = group_nodes(node)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts[:-1], sizes)
    short = done_at < depth - 1
    paths[short, done_at[short]] = rank[short]
    return paths, levels


def plain_large(x: np.ndarray, k: int, seed: int, kmeans_iters: int, max_points_per_centroid: int,
                n_init: int = 1, threads: int = 1) -> SplitResult:
    """Unconstrained k-means of one large node. x float32 [n, d], n > k."""
    centers = faiss_centers(x, k, seed, kmeans_iters, max_points_per_centroid, n_init, threads)
    dist = sqdist(x[None], np.einsum("nd,nd->n", x, x)[None], centers[None])
    assign = _never_one_group(dist.argmin(2), np.array([x.shape[0]]), k)
    sse = group_sse(x[None], assign, np.ones_like(assign, dtype=bool), centers[None])
    return SplitResult(assign.astype(np.int16), sse, sse.copy())


def plain_batch(x: np.ndarray, n_real: np.ndarray, k: int, rng: np.random.Generator, kmeans_iters: int,
                n_init: int = 1) -> SplitResult:
    """Unconstrained k-means of B nodes at once; x float32 [B, n, d] padded, n_real int [B]."""
    n_real = np.asarray(n_real, dtype=np.int64)
    x = x - masked_mean(x, n_real)[:, None, :]
    valid = np.arange(x.shape[1])[None, :] < n_real[:, None]
    centers, sse = kmeans_steps(x, n_real, _kmeans_pp(x, n_real, k, rng), kmeans_iters)
    assign = _never_one_group(sqdist(x, np.einsum("bnd,bnd->bn", x, x), centers).argmin(2), n_real, k)
    sse = group_sse(x, assign, valid, centroids(x, assign, valid, k))
    return SplitResult(np.where(valid, assign, -1).astype(np.int16), sse, sse.copy())


def _never_one_group(assign: np.ndarray, n_real: np.ndarray, k: int) -> np.ndarray:
    """Nodes whose k-means put every item in one group (duplicates) are cut by rank instead, so
    the unbalanced recursion always makes progress. assign int [B, n] -> int [B, n]."""
    valid = np.arange(assign.shape[1])[None, :] < n_real[:, None]
    one = (group_counts(assign, valid, k) > 0).sum(1) <= 1
    if one.any():
        assign = assign.copy()
        assign[one] = np.arange(assign.shape[1])[None, :] % k
    return assign


def _kmeans_pp(x: np.ndarray, n_real: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding of every node. x [B, n, d] -> centers float32 [B, k, d]."""
    bsz, n, d = x.shape
    rows = np.arange(bsz)
    valid = np.arange(n)[None, :] < n_real[:, None]
    first = (rng.random(bsz) * n_real).astype(np.int64)
    centers = np.empty((bsz, k, d), dtype=np.float32)
    centers[:, 0] = x[rows, first]
    best = np.where(valid, ((x - centers[:, :1]) ** 2).sum(2), 0.0)
    for j in range(1, k):
        cum = np.cumsum(best, axis=1)
        u = rng.random(bsz) * cum[:, -1]
        pick = np.minimum((cum < u[:, None]).sum(1), n_real - 1)
        centers[:, j] = x[rows, pick]
        best = np.minimum(best, np.where(valid, ((x - centers[:, j : j + 1]) ** 2).sum(2), 0.0))
    return centers


# -------------------------------------------------------------------------------------------- random
def random_paths(emb: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Random balanced splits (the paper's ablation): a random order inside every node, cut by rank."""
    n = emb.shape[0]
    depth = depth_for(n, k)
    rng = np.random.default_rng(seed)
    paths = np.zeros((n, depth - 1), dtype=np.int16)
    node = np.zeros(n, dtype=np.int64)
    levels = []
    for lvl in range(depth - 1):
        t = time.time()
        key = rng.random(n)
        order = np.lexsort((key, node))
        sorted_node = node[order]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_node)) + 1, [n]])
        sizes = np.diff(starts)
        rank = np.arange(n) - np.repeat(starts[:-1], sizes)
        branch = np.empty(n, dtype=np.int16)
        branch[order] = group_of_rank(rank, np.repeat(sizes, sizes), k)
        paths[:, lvl] = branch
        node = node * k + branch
        sse = level_sse(emb, node)
        levels.append({"level": lvl + 1, "nodes": int(sizes.size), "seconds": round(time.time() - t, 3),
                       "objective": sse / n})
    return paths, levels
