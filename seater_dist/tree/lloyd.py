"""Balanced k-means by Lloyd iterations: split a node's n items into k groups of sizes floor(n/k) or
floor(n/k)+1 (docs/method.md §1), minimising the sum of squared distances to the group means.

* :func:`split_batch`: our method for nodes up to ``large_node`` items, B nodes at once. Exact
  constrained k-means: Lloyd steps whose assignment is the optimal balanced one
  (``assignment.assign_exact``), restarted from random items. The centroid and distance steps of all the
  nodes of a task are batched numpy operations.
* :func:`split_large`: one node of millions of items. faiss k-means for the centroids, then balanced
  Lloyd steps whose assignment uses annealed Sinkhorn prices and a greedy repair (linear in n: a flow
  over millions x k arcs would not fit in memory or time).
* :func:`balanced_lloyd`: the Lloyd iterations both of them run.

The authors' tool, k-means-constrained, solves the same problem as :func:`split_batch`; it is our
yardstick (``reference.split_reference``). Quality and speed against it: docs/tree-measurements.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seater_dist.tree.assignment import (
    WARM_MIN,
    WARM_MOVED,
    assign_exact,
    dual_prices,
    group_counts,
    node_costs,
    repair,
    update_prices,
)

_PROBE_ITERS = 5  # Lloyd iterations of every restart before only the best one continues
_SAMPLED_PROBE_ITERS = 3  # the same on a sample, where 5x as many restarts run (5 steps cost more, same quality)
_PROBE_SAMPLE = 512  # restarts of bigger nodes probe on this many random items
_STAGE_GROWTH = 4  # after the probes, bigger nodes refine on samples this much larger at each stage
_SAMPLED_RESTARTS = 5  # restarts on a sample are cheap: n_init x this many (see split_batch)


@dataclass
class SplitResult:
    """Groups of one or many nodes' items, with the clustering objective (sum of squared distances).

    assign: int16 [B, n] group per item (-1 on padding); sse: float64 [B] of the balanced groups;
    sse_unconstrained: float64 [B] of unconstrained k-means on the same node (nan if not run);
    prices: float32 [B, k] the balanced assignment's final group prices (None if not priced);
    centers: float32 [B, k, d] the groups' means (None if not kept).
    """

    assign: np.ndarray
    sse: np.ndarray
    sse_unconstrained: np.ndarray
    prices: np.ndarray | None = None
    centers: np.ndarray | None = None

    def keep_better(self, other: "SplitResult", better: np.ndarray) -> None:
        """Take ``other``'s split for the nodes where ``better`` (bool [B]) is set."""
        for name in ("assign", "sse", "prices", "centers"):
            mine = getattr(self, name)
            if mine is not None:
                mine[better] = getattr(other, name)[better]


# -------------------------------------------------------------------------------------------- batched
def split_batch(x: np.ndarray, n_real: np.ndarray, k: int, rng: np.random.Generator, kmeans_iters: int,
                balanced_iters: int, n_init: int = 1) -> SplitResult:
    """Balanced k-means of B nodes at once: exact constrained k-means, restarted n_init times.

    x: float32 [B, n, d], node b's items in rows 0..n_real[b]-1 (the rest is padding);
    n_real: int [B], every entry > k. Each restart seeds k random items of the node and runs
    _PROBE_ITERS Lloyd steps with the optimal balanced assignment; the best restart of every node then
    runs on to ``balanced_iters`` steps (cheaper than running every restart to the end).
    Nodes above _PROBE_SAMPLE items probe on that many random items, with _SAMPLED_RESTARTS x n_init
    restarts of _SAMPLED_PROBE_ITERS steps, since each costs a few ms; the kept centres then run
    ``balanced_iters`` steps on random samples 4x larger (:func:`_stage_samples`) and finally on every
    item, each stage's first step compared with the previous stage's prices so that the next steps can
    start warm. Each stage moves fewer items, so the full-size flows are few and mostly warm.
    Then ``kmeans_iters`` unconstrained Lloyd steps from the kept centres give the unconstrained
    k-means objective that the manifest reports next to ours.

    Seeds are random items, not k-means++: seeds drawn by mass land several in each big dense cluster,
    which a balanced split must cut anyway, while k-means++ spreads them by distance and leaves the big
    clusters under-seeded.
    """
    n_real = np.asarray(n_real, dtype=np.int64)
    x = x - masked_mean(x, n_real)[:, None, :]  # centre each node: smaller norms, exacter float32 distances
    sampled = n_init > 1 and int(n_real.max()) > _PROBE_SAMPLE
    px, pn = _random_rows(x, n_real, _PROBE_SAMPLE, rng) if sampled else (x, n_real)
    best: SplitResult | None = None
    probe = min(balanced_iters, _SAMPLED_PROBE_ITERS if sampled else _PROBE_ITERS) if n_init > 1 else balanced_iters
    for _ in range(n_init * (_SAMPLED_RESTARTS if sampled else 1)):  # short runs pick each node's basin ...
        res = balanced_lloyd(px, pn, _random_items(px, pn, k, rng), probe, 0, exact=True)
        if best is None:
            best = res
        else:
            best.keep_better(res, res.sse < best.sse)
    assert best is not None
    if sampled:  # ... the kept centres, found on a sample, run on over larger samples, then every item
        for m in _stage_samples(int(n_real.max())):
            sx, sn = _random_rows(x, n_real, m, rng)
            best = balanced_lloyd(sx, sn, best.centers, balanced_iters, 0, exact=True, prices=best.prices)
        best = balanced_lloyd(x, n_real, best.centers, balanced_iters, 0, exact=True, prices=best.prices)
    elif probe < balanced_iters:  # ... and only the best one runs on to convergence
        res = balanced_lloyd(x, n_real, best.centers, balanced_iters - probe, 0, exact=True)
        best.keep_better(res, res.sse <= best.sse)
    _, best.sse_unconstrained = kmeans_steps(x, n_real, best.centers, kmeans_iters)
    return best


def _stage_samples(n: int) -> list[int]:
    """Sample sizes between the probes (_PROBE_SAMPLE items) and all n items: _STAGE_GROWTH x larger
    each, up to n / 2 (20,000 items: 2,048 and 8,192; 2,500 items: none)."""
    sizes, m = [], _PROBE_SAMPLE * _STAGE_GROWTH
    while 2 * m <= n:
        sizes.append(m)
        m *= _STAGE_GROWTH
    return sizes


def _random_rows(x: np.ndarray, n_real: np.ndarray, m: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Up to m random items of every node. x float32 [B, n, d] -> (float32 [B, m, d], int [B] real rows)."""
    pick = np.argsort(rng.random((x.shape[0], x.shape[1])) + (np.arange(x.shape[1])[None, :] >= n_real[:, None]),
                      axis=1)[:, :m]  # padding sorts last
    return np.take_along_axis(x, pick[..., None], axis=1), np.minimum(n_real, m)


def _random_items(x: np.ndarray, n_real: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct random items of every node (n_real > k) as centres. x [B, n, d] -> float32 [B, k, d]."""
    return _random_rows(x, n_real, k, rng)[0].astype(np.float32)


# -------------------------------------------------------------------------------------------- large
def split_large(x: np.ndarray, k: int, seed: int, kmeans_iters: int, balanced_iters: int, price_steps: int,
                max_points_per_centroid: int, n_init: int = 1, threads: int = 1,
                fit_items: int = 262_144) -> SplitResult:
    """Balanced k-means of one large node: faiss k-means centroids, then balanced Lloyd steps.

    x: float32 [n, d] with n > k. The balanced Lloyd steps run on a random sample of ``fit_items``
    items (the centroids of millions of items are settled long before all of them are needed); then every
    item is assigned once with the sample's prices, refined on all items, and repaired to exact sizes.
    Returns a SplitResult with B = 1.
    """
    n = x.shape[0]
    # faiss trains on a sample (max_points_per_centroid x k items), so 20 iterations cost little
    centers = faiss_centers(x, k, seed, max(kmeans_iters, 20), max_points_per_centroid, n_init, threads)
    if n > fit_items:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, fit_items, replace=False))
        fit = balanced_lloyd(x[sample][None], np.array([fit_items]), centers[None], balanced_iters, price_steps,
                             exact=False)
        centers, prices = fit.centers[0], fit.prices
        iters = 1
    else:
        prices, iters = None, balanced_iters
    # x is not centred here: at the root that would copy all N x d floats
    return balanced_lloyd(x[None], np.array([n]), centers[None], iters, price_steps, record_unconstrained=True,
                          prices=prices, exact=False)


def faiss_centers(x: np.ndarray, k: int, seed: int, iters: int, max_points_per_centroid: int, n_init: int,
                  threads: int) -> np.ndarray:
    """faiss k-means centroids float32 [k, d] of x [n, d], trained with ``threads`` OpenMP threads."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    km = faiss.Kmeans(x.shape[1], k, niter=iters, nredo=n_init, seed=seed % (2**31), verbose=False,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.astype(np.float32)


# -------------------------------------------------------------------------------------------- Lloyd steps
def balanced_lloyd(x: np.ndarray, n_real: np.ndarray, centers: np.ndarray, iters: int, price_steps: int,
                   record_unconstrained: bool = False, prices: np.ndarray | None = None,
                   exact: bool = True) -> SplitResult:
    """Lloyd iterations whose assignment step is balanced.

    x float32 [B, n, d] (padded), n_real int [B], centers float32 [B, k, d]. Every iteration ends
    exactly balanced. ``exact``: the optimal assignment for the centres, node by node
    (``assignment.assign_exact``), i.e. exact constrained k-means. Otherwise Sinkhorn prices and
    the greedy ``assignment.repair`` (for single nodes of millions of items, where a flow over n x k arcs
    would not fit and the prices leave a tiny fraction of the items to repair).
    With ``record_unconstrained`` the first distance matrix also gives the unconstrained objective
    of the initial centers (used for faiss-initialised large nodes).
    prices float [B, k] (nan: none): group prices from an earlier fit, e.g. on a sample. The Sinkhorn route
    starts from them; the exact route counts how many items step 1 moves away from their cheapest group
    under them (0 without), which decides whether step 2 may start warm.
    """
    bsz, n, _ = x.shape
    k = centers.shape[1]
    valid = np.arange(n)[None, :] < n_real[:, None]  # [B, n]
    x2 = np.einsum("bnd,bnd->bn", x, x)
    warm = prices is not None
    prices = np.zeros((bsz, k), dtype=np.float32) if prices is None else prices.astype(np.float32)
    sse_unc = np.full(bsz, np.nan)
    # exact route: each node's prices certified at its last step (None: not priced), for a warm start
    duals: list[np.ndarray | None] = [None] * bsz
    moved = np.ones(bsz)  # share of each node's items that changed group at the last step
    assign = None
    for it in range(max(1, iters)):
        dist = sqdist(x, x2, centers)
        if it == 0 and record_unconstrained:
            sse_unc = np.where(valid, dist.min(2), 0.0).sum(1, dtype=np.float64)
        if exact:
            if it == 0:  # step 1 is measured against each item's cheapest group under the given prices (if any)
                assign = (dist - np.nan_to_num(prices)[:, None, :]).argmin(2)
            new = assign.copy()
            fresh_full = np.zeros(bsz, dtype=bool)  # nodes whose assignment came from a full flow this step
            for b in np.flatnonzero(moved > 0):  # a node whose groups did not change keeps its centres
                new[b], duals[b] = assign_exact(dist[b], int(n_real[b]), duals[b], float(moved[b]))
                fresh_full[b] = duals[b] is None
        else:
            stages = 6 if it == 0 and not warm else 1  # a cold start anneals from a high temperature
            prices = update_prices(dist, valid, n_real, prices, stages, price_steps)
            adjusted = dist - prices[:, None, :]
            new = repair(adjusted, adjusted.argmin(2), valid, n_real, k)
        converged = it > 0 and np.array_equal(new, assign)
        if assign is not None:
            moved = ((new != assign) & valid).sum(1) / n_real
        if exact:  # a full flow's result is priced only if the next step may start warm from it
            for b in np.flatnonzero(fresh_full & (moved <= WARM_MOVED) & (n_real >= WARM_MIN)):
                duals[b] = dual_prices(node_costs(dist[b], int(n_real[b])), new[b, : n_real[b]])
        assign = new
        if converged:  # the groups did not change: later iterations would repeat this one
            break
        centers = centroids(x, assign, valid, k)
    sse = group_sse(x, assign, valid, centers)
    out = np.where(valid, assign, -1).astype(np.int16)
    if exact:
        prices = np.stack([np.full(k, np.nan) if p is None else p for p in duals]).astype(np.float32)
    return SplitResult(out, sse, sse_unc, prices, centers)


def kmeans_steps(x: np.ndarray, n_real: np.ndarray, centers: np.ndarray, iters: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Unconstrained Lloyd steps. -> (centers [B, k, d], sse float64 [B] of the final centers)."""
    n = x.shape[1]
    k = centers.shape[1]
    valid = np.arange(n)[None, :] < n_real[:, None]
    x2 = np.einsum("bnd,bnd->bn", x, x)
    for _ in range(iters):
        assign = sqdist(x, x2, centers).argmin(2)
        centers = centroids(x, assign, valid, k, previous=centers)
    dist = sqdist(x, x2, centers)
    sse = np.where(valid, np.maximum(dist.min(2), 0.0), 0.0).sum(1, dtype=np.float64)
    return centers, sse


# -------------------------------------------------------------------------------------------- numeric helpers
def sqdist(x: np.ndarray, x2: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared distances float32 [B, n, k] of x [B, n, d] (x2 = row norms [B, n]) to centers [B, k, d]."""
    c2 = np.einsum("bkd,bkd->bk", centers, centers)
    ct = np.ascontiguousarray(centers.transpose(0, 2, 1))
    dist = np.stack([x[b] @ ct[b] for b in range(x.shape[0])]) if x.shape[0] <= 16 else np.matmul(x, ct)
    dist *= -2.0
    dist += x2[:, :, None]
    dist += c2[:, None, :]
    return dist


def centroids(x: np.ndarray, assign: np.ndarray, valid: np.ndarray, k: int,
              previous: np.ndarray | None = None) -> np.ndarray:
    """Group means [B, k, d]; an empty group keeps its previous centre (or stays at 0)."""
    bsz, n, d = x.shape
    counts = group_counts(assign, valid, k).astype(np.float32)  # [B, k]
    if bsz <= 16:  # one BLAS product per node (numpy's stacked matmul does not use BLAS and is much slower)
        sums = np.stack([_onehot(assign[b], valid[b], k) @ x[b] for b in range(bsz)])
    else:  # many small nodes: sum the rows of each (node, group) after sorting by it
        key = (np.arange(bsz)[:, None] * k + assign)[valid]
        order = np.argsort(key, kind="stable")
        rows = x[valid][order]
        first = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
        sums = np.zeros((bsz * k, d), dtype=np.float32)
        sums[key[order][first]] = np.add.reduceat(rows, first, axis=0)
        sums = sums.reshape(bsz, k, d)
    centers = sums / np.maximum(counts, 1.0)[:, :, None]
    if previous is not None:
        centers = np.where(counts[:, :, None] > 0, centers, previous)
    return centers.astype(np.float32)


def _onehot(assign: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """float32 [k, n] indicator of assign [n] (padding rows are all zero)."""
    return ((np.arange(k)[:, None] == assign[None, :]) & valid[None, :]).astype(np.float32)


def masked_mean(x: np.ndarray, n_real: np.ndarray) -> np.ndarray:
    """Mean float32 [B, d] of every node's real rows of x [B, n, d]."""
    valid = (np.arange(x.shape[1])[None, :] < n_real[:, None]).astype(np.float32)
    return (np.einsum("bn,bnd->bd", valid, x) / n_real[:, None]).astype(np.float32)


def group_sse(x: np.ndarray, assign: np.ndarray, valid: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Sum of squared distances [B] of every real item to its group's centre (float64 accumulation).

    Read off the [B, n, k] distance matrix rather than x - centers[assign], which would copy x."""
    dist = sqdist(x, np.einsum("bnd,bnd->bn", x, x), centers)
    sq = np.maximum(np.take_along_axis(dist, np.maximum(assign, 0)[..., None], axis=2)[..., 0], 0.0)
    return np.where(valid, sq, 0.0).sum(1, dtype=np.float64)
