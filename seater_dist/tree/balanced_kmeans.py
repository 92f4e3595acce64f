"""Balanced k-means: split a node's n items into m = k groups of sizes floor(n/k) or floor(n/k)+1.

Three ways, all returning each item's group index (int [n]):

* :func:`split_exact` — k-means-constrained (Lloyd iterations whose assignment step is a min-cost
  flow), the authors' tool. The reference in tests and benchmarks: its Python-side overhead makes
  it 7 ms at n = 93, 0.18 s at n = 1,489, 26 s at n = 20,000 with 10 restarts.
* :func:`split_batch` — our method for nodes up to ``large_node`` items: the same exact constrained
  k-means (Lloyd steps whose assignment is the optimal balanced one, :func:`_assign_exact`), restarted
  from random items, the restarts of nodes above _PROBE_SAMPLE items probing on a sample and the
  kept one refined on growing samples; the centroid and distance steps of all the nodes of a task are
  batched numpy operations. CPU per node at k = 8 (skewed data, one thread): 1.1 ms at n = 39,
  17 ms at 312, 100 ms at 2,500, 0.47 s at 20,000.
* :func:`split_large` — one node of millions of items: faiss k-means for the centroids, then balanced
  Lloyd steps whose assignment uses annealed Sinkhorn prices and a greedy repair (linear in n; a
  flow over 6.1M x k arcs would not fit in the budget).

The approximate assignment (large nodes) works on the Lagrangian dual of the transportation problem
min sum_i D[i, a_i] subject to the group sizes: group j gets a price lambda_j and item i goes to
argmin_j D[i, j] - lambda_j. The prices come from annealed Sinkhorn steps on the entropy-smoothed dual,
warm-started from the previous Lloyd iteration; the small imbalance left is removed by :func:`_repair`,
which moves the items with the smallest cost increase from over-full to under-full groups (optimal
for k = 2, tested). On nodes of a few hundred items this greedy path lands 5-25% above the optimal
assignment (measured: 23% on a level of 93-item nodes, k = 16), which is why every node that fits
gets the exact flow instead. Alternatives measured and dropped: greedy assignment on k-means
centroids (1.3-1.7x unconstrained), Jacobi/coordinate-ascent prices (5-12% above optimal), and a
batched successive-shortest-path solver on the k-group graph (exact, but 2.5x slower than one
min-cost flow per node at n = 93, and hopeless at n = 20,000).

Quality (tests/test_tree_kmeans.py, bench/bench_tree.py; against k-means-constrained with 10 restarts on
skewed nodes): on average between 1.6% below and 1.0% above it from 312 to 5,000 items. Single nodes
stray further, as k-means-constrained's own runs do. On 128 nodes of 312 items (32 nodes x 4 seeds):

=====================================  ======  ==========  =============
against k-means-constrained, n_init 10  mean    worst node  nodes > 1.05
=====================================  ======  ==========  =============
ours (3 restarts, no sampling)          1.010   1.122       4 / 128
ours with 10 restarts of 3 steps        1.003   1.037       0 / 128 (2x the CPU)
k-means-constrained, n_init 3           1.020   1.308       13 / 128
k-means-constrained, n_init 10 (other   1.003   1.115       1 / 128
seeds)
=====================================  ======  ==========  =============

From 700 to 2,500 items (sampled probes) the worst of 32 nodes per size was 2.8% above (see
:func:`split_batch`). The default keeps 3 restarts: 10 would double the CPU of the 312-item level.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

_DAMPING = 0.5
_PROBE_ITERS = 5  # Lloyd iterations of every restart before only the best one continues
_SAMPLED_PROBE_ITERS = 3  # the same on a sample, where 5x as many restarts run (5 steps: +50% CPU at 2,500 items, same quality)
_PROBE_SAMPLE = 512  # restarts of bigger nodes probe on this many random items
_STAGE_GROWTH = 4  # after the probes, bigger nodes refine on samples this much larger at each stage
_SAMPLED_RESTARTS = 5  # restarts on a sample are cheap: n_init x this many (see split_batch)
_LSA_MAX = 128  # nodes up to this size get the Hungarian method instead of a min-cost flow
_WARM_MAX = 1 / 4  # largest share of a node a warm attempt frees (doubling from 3x the share that moved)
_WARM_MOVED = 1 / 12  # warm attempts only once at most this share of the node moved at the last step
_WARM_MIN = 1000  # below, a full flow (<= 1 ms) costs little more than a warm attempt that may fail


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


def limit_blas_threads(threads: int) -> int | None:
    """Set numpy's OpenBLAS thread count; returns the previous count (None if OpenBLAS is not found).

    The products here are small (k = 8..32 columns); OpenBLAS threads spinning against other busy
    processes made one node's split 10x slower on a shared 2-core machine, so tasks use one thread
    per CPU they were given.
    """
    controls = _openblas_thread_controls()
    if controls is None:
        return None
    setter, getter = controls
    previous = int(getter())
    setter(int(max(1, threads)))
    return previous


@functools.cache
def _openblas_thread_controls() -> tuple[Any, Any] | None:
    """(set_num_threads, get_num_threads) of the OpenBLAS loaded in this process, looked up once
    (reading /proc/self/maps costs 3 ms, once per Ray task otherwise)."""
    import ctypes

    try:
        libs = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()}
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            setter, getter = f"{prefix}_set_num_threads{suffix}", f"{prefix}_get_num_threads{suffix}"
            if hasattr(lib, setter) and hasattr(lib, getter):
                return getattr(lib, setter), getattr(lib, getter)
    return None


# -------------------------------------------------------------------------------------------- sizes
def group_sizes(n: int, k: int) -> np.ndarray:
    """The min(n, k) group sizes of SEATER_SPEC §1: floor(n/k)+1 for the first n mod k, floor(n/k) after."""
    m = min(n, k)
    return n // m + (np.arange(m) < n % m) if n >= k else np.ones(n, dtype=np.int64)


# -------------------------------------------------------------------------------------------- exact
def split_exact(x: np.ndarray, k: int, seed: int = 0, n_init: int = 1) -> tuple[np.ndarray, float]:
    """Exact constrained k-means of one node. x float [n, d], n > k -> (group int [n], sse)."""
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


# -------------------------------------------------------------------------------------------- batched
def split_batch(x: np.ndarray, n_real: np.ndarray, k: int, rng: np.random.Generator, kmeans_iters: int,
                balanced_iters: int, n_init: int = 1) -> SplitResult:
    """Balanced k-means of B nodes at once: exact constrained k-means, restarted n_init times.

    x: float32 [B, n, d], node b's items in rows 0..n_real[b]-1 (the rest is padding);
    n_real: int [B], every entry > k. Each restart seeds k random items of the node and runs
    _PROBE_ITERS Lloyd steps with the optimal balanced assignment; the best restart of every node then
    runs on to ``balanced_iters`` steps (30% faster than running every restart to the end at 20k items,
    k = 8; with 3 probe steps instead of 5, one test node landed 9.8% above k-means-constrained).
    Nodes above _PROBE_SAMPLE items probe on that many random items, with _SAMPLED_RESTARTS x n_init
    restarts of _SAMPLED_PROBE_ITERS steps, since each costs a few ms; the kept centres then run
    ``balanced_iters`` steps on random samples 4x larger (:func:`_stage_samples`) and finally on every
    item, each stage's first step compared with the previous stage's prices so that the next steps can
    start warm. Each stage moves fewer items, so the full-size flows are few and mostly warm: the
    20,000-item root takes 0.47 s against 0.99 s with one 1,024-item probe stage and then every item.
    Measured on skewed nodes of 700 to 5,000 items (k = 8, 8 nodes x 4 seeds per size, 4 x 4 at 5,000;
    against k-means-constrained with n_init 10; one thread):

    ==============================  ==========  ===========  ==============  ==================
    probes (Lloyd steps each)       worst node  mean         ms per 2,500    ms per 1,500
    ==============================  ==========  ===========  ==============  ==================
    12 on 1,024 items (5)           1.053 [1]_  0.984-1.011  214             198
    12 on 512 items (5)             1.049       0.986-1.002  121             104
    15 on 512 items (5)             1.037       0.984-1.001  145             126
    15 on 512 items (3, default)    1.028 [2]_  0.997-1.004  98              87
    ==============================  ==========  ===========  ==============  ==================

    .. [1] at 700 items, below that sample size: 3 restarts on every item.
    .. [2] measured at 700, 1,500 and 2,500 items only.
    Then ``kmeans_iters`` unconstrained Lloyd steps from the kept centres give the unconstrained
    k-means objective that the manifest reports next to ours.

    Why random items and not k-means++ (measured on skewed nodes of 2,500 and 312 items, k = 8,
    against k-means-constrained with n_init 10): seeds drawn by mass land several in each big dense
    cluster, which a balanced split must cut anyway; k-means++ spreads them by distance, leaving the
    big clusters under-seeded. Mean/max objective ratio with 3 restarts: 1.006/1.018 (random items)
    against 1.043/1.318 (k-means++ then 3 unconstrained steps) at 2,500 items; 1.001/1.006 against
    0.998/0.999 at 312 items.
    """
    n_real = np.asarray(n_real, dtype=np.int64)
    x = x - _masked_mean(x, n_real)[:, None, :]  # centre each node: smaller norms, exacter float32 distances
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
    _, best.sse_unconstrained = _lloyd(x, n_real, best.centers, kmeans_iters)
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


def split_large(x: np.ndarray, k: int, seed: int, kmeans_iters: int, balanced_iters: int, price_steps: int,
                max_points_per_centroid: int, n_init: int = 1, threads: int = 1,
                fit_items: int = 262_144) -> SplitResult:
    """Balanced k-means of one large node: faiss k-means centroids, then balanced Lloyd steps.

    x: float32 [n, d] with n > k. The balanced Lloyd steps run on a random sample of ``fit_items``
    items (the centroids of 6.1M items are settled long before all of them are needed); then every
    item is assigned once with the sample's prices, refined on all items, and repaired to exact sizes.
    Returns a SplitResult with B = 1.
    """
    n = x.shape[0]
    # faiss trains on a sample (max_points_per_centroid x k items), so 20 iterations cost little
    centers = _faiss_centers(x, k, seed, max(kmeans_iters, 20), max_points_per_centroid, n_init, threads)
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


def plain_large(x: np.ndarray, k: int, seed: int, kmeans_iters: int, max_points_per_centroid: int,
                n_init: int = 1, threads: int = 1) -> SplitResult:
    """Unconstrained k-means of one large node (the unbalanced ablation). x float32 [n, d], n > k."""
    centers = _faiss_centers(x, k, seed, kmeans_iters, max_points_per_centroid, n_init, threads)
    dist = _sqdist(x[None], np.einsum("nd,nd->n", x, x)[None], centers[None])
    assign = _never_one_group(dist.argmin(2), np.array([x.shape[0]]), k)
    sse = _sse(x[None], assign, np.ones_like(assign, dtype=bool), centers[None])
    return SplitResult(assign.astype(np.int16), sse, sse.copy())


def plain_batch(x: np.ndarray, n_real: np.ndarray, k: int, rng: np.random.Generator, kmeans_iters: int,
                n_init: int = 1) -> SplitResult:
    """Unconstrained k-means of B nodes at once (the unbalanced ablation); x float32 [B, n, d]."""
    n_real = np.asarray(n_real, dtype=np.int64)
    x = x - _masked_mean(x, n_real)[:, None, :]
    valid = np.arange(x.shape[1])[None, :] < n_real[:, None]
    centers, sse = _lloyd(x, n_real, _kmeans_pp(x, n_real, k, rng), kmeans_iters)
    assign = _never_one_group(_sqdist(x, np.einsum("bnd,bnd->bn", x, x), centers).argmin(2), n_real, k)
    sse = _sse(x, assign, valid, _centroids(x, assign, valid, k))
    return SplitResult(np.where(valid, assign, -1).astype(np.int16), sse, sse.copy())


def _never_one_group(assign: np.ndarray, n_real: np.ndarray, k: int) -> np.ndarray:
    """Nodes whose k-means put every item in one group (duplicates) are cut by rank instead, so
    the unbalanced recursion always makes progress. assign int [B, n] -> int [B, n]."""
    valid = np.arange(assign.shape[1])[None, :] < n_real[:, None]
    one = (_counts(assign, valid, k) > 0).sum(1) <= 1
    if one.any():
        assign = assign.copy()
        assign[one] = np.arange(assign.shape[1])[None, :] % k
    return assign


def _faiss_centers(x: np.ndarray, k: int, seed: int, iters: int, max_points_per_centroid: int, n_init: int,
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
    (:func:`_assign_exact`), i.e. exact constrained k-means. Otherwise Sinkhorn prices and
    the greedy :func:`_repair` (for single nodes of millions of items, where a flow over n x k arcs
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
        dist = _sqdist(x, x2, centers)
        if it == 0 and record_unconstrained:
            sse_unc = np.where(valid, dist.min(2), 0.0).sum(1, dtype=np.float64)
        if exact:
            if it == 0:  # step 1 is measured against each item's cheapest group under the given prices (if any)
                assign = (dist - np.nan_to_num(prices)[:, None, :]).argmin(2)
            new = assign.copy()
            fresh_full = np.zeros(bsz, dtype=bool)  # nodes whose assignment came from a full flow this step
            for b in np.flatnonzero(moved > 0):  # a node whose groups did not change keeps its centres
                new[b], duals[b] = _assign_exact(dist[b], int(n_real[b]), duals[b], float(moved[b]))
                fresh_full[b] = duals[b] is None
        else:
            stages = 6 if it == 0 and not warm else 1  # a cold start anneals from a high temperature
            prices = _update_prices(dist, valid, n_real, prices, stages, price_steps)
            adjusted = dist - prices[:, None, :]
            new = _repair(adjusted, adjusted.argmin(2), valid, n_real, k)
        converged = it > 0 and np.array_equal(new, assign)
        if assign is not None:
            moved = ((new != assign) & valid).sum(1) / n_real
        if exact:  # a full flow's result is priced only if the next step may start warm from it
            for b in np.flatnonzero(fresh_full & (moved <= _WARM_MOVED) & (n_real >= _WARM_MIN)):
                duals[b] = _dual_prices(_node_costs(dist[b], int(n_real[b])), new[b, : n_real[b]])
        assign = new
        if converged:  # the groups did not change: later iterations would repeat this one
            break
        centers = _centroids(x, assign, valid, k)
    sse = _sse(x, assign, valid, centers)
    out = np.where(valid, assign, -1).astype(np.int16)
    if exact:
        prices = np.stack([np.full(k, np.nan) if p is None else p for p in duals]).astype(np.float32)
    return SplitResult(out, sse, sse_unc, prices, centers)


def _update_prices(dist: np.ndarray, valid: np.ndarray, n_real: np.ndarray, prices: np.ndarray,
                   stages: int, iters: int = 3, factor: float = 0.4) -> np.ndarray:
    """Annealed Sinkhorn on the dual of the balanced assignment (see the module docstring).

    dist float32 [B, n, k], valid bool [B, n], prices float32 [B, k] -> new prices [B, k].
    The temperature starts at tau_end / factor**(stages-1) and ends at tau_end = 1e-3 x the node's
    distance spread; each stage runs ``iters`` Sinkhorn steps prices_j += tau (log cap_j - log s_j),
    where s_j is the soft size of group j. Every step increases the smoothed dual, so the prices
    never diverge (Newton steps on the same dual stalled in tests once the assignment hardened).
    """
    bsz, n, k = dist.shape
    lo, extra = n_real // k, n_real % k
    cap = _caps(_counts((dist - prices[:, None, :]).argmin(2), valid, k), lo, extra).astype(np.float32)
    log_cap = np.log(cap)
    spread = np.where(valid, dist.max(2) - dist.min(2), 0.0).sum(1) / n_real / 2  # [B]
    tau_end = np.maximum(spread * 1e-3, 1e-12).astype(np.float32)
    mask = valid[..., None].astype(np.float32)
    for s in range(stages - 1, -1, -1):
        tau = (tau_end / factor**s)[:, None, None]
        for _ in range(iters):
            a = (prices[:, None, :] - dist) / tau
            a -= a.max(2, keepdims=True)
            np.exp(a, out=a)
            a *= mask / a.sum(2, keepdims=True)
            soft = np.maximum(a.sum(1), 1e-30)  # [B, k]
            prices = prices + tau[:, :, 0] * (log_cap - np.log(soft))
            prices -= prices.mean(1, keepdims=True)
    return prices.astype(np.float32)


def _caps(counts: np.ndarray, lo: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """Group capacities [B, k]: lo, plus one for the ``extra`` groups that currently hold the most items.

    The spec fixes the sizes, not which groups are the larger ones; giving the +1 to the groups with
    the most demand is what exact constrained k-means (size_min = lo, size_max = lo + 1) would pick.
    """
    bsz, k = counts.shape
    order = np.argsort(-counts, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(k)[None, :].repeat(bsz, 0), axis=1)
    return lo[:, None] + (rank < extra[:, None])


def _repair(adjusted: np.ndarray, assign: np.ndarray, valid: np.ndarray, n_real: np.ndarray,
            k: int) -> np.ndarray:
    """Make every node exactly balanced by the cheapest moves from over-full to under-full groups.

    adjusted float32 [B, n, k] (distances minus prices), assign int [B, n] -> balanced assign [B, n].
    Each round, every over-full group offers its `excess` items with the smallest cost increase
    (each to its cheapest under-full group), and every under-full group accepts its `deficit`
    cheapest offers. A node's globally cheapest offer is always accepted, so every round makes
    progress; moves only go from over-full to under-full groups, so no item moves twice.
    """
    bsz, n, _ = adjusted.shape
    lo, extra = n_real // k, n_real % k
    assign = assign.copy()
    cap = _caps(_counts(assign, valid, k), lo, extra)
    while True:
        excess = _counts(assign, valid, k) - cap  # [B, k]
        if not (excess > 0).any():
            return assign
        src_excess = np.take_along_axis(excess, assign, axis=1)  # [B, n]
        b_idx, i_idx = np.nonzero(valid & (src_excess > 0))
        src = assign[b_idx, i_idx]
        rows = adjusted[b_idx, i_idx]  # [C, k]
        gain = rows - rows[np.arange(src.size), src][:, None]
        gain[excess[b_idx] >= 0] = np.inf  # only under-full targets
        tgt = gain.argmin(1)
        cost = gain[np.arange(src.size), tgt]
        keep = _rank_within(b_idx * k + src, cost) < excess[b_idx, src]
        b_idx, i_idx, tgt, cost = b_idx[keep], i_idx[keep], tgt[keep], cost[keep]
        keep = _rank_within(b_idx * k + tgt, cost) < -excess[b_idx, tgt]
        assign[b_idx[keep], i_idx[keep]] = tgt[keep]


def _assign_exact(dist: np.ndarray, n_real: int, prices: np.ndarray | None = None, moved: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """The optimal balanced assignment of one node, and dual prices that certify it.

    dist float32 [n, k] (rows past n_real are padding); prices float64 [k] certified at this node's
    previous Lloyd step (or None), moved: the fraction of its items that changed group at that step
    -> (int64 [n] group per item, 0 on padding; float64 [k] prices if the warm route certified it,
    else None). Three exact routes, cheapest first:
    * n <= _LSA_MAX: scipy's rectangular Hungarian on item x group-slot costs (0.08 ms at n = 39, k = 8,
      against 0.35 ms for a min-cost flow, whose setup dominates at that size).
    * warm, on nodes of at least _WARM_MIN items once few items move between Lloyd steps: items keep
      their cheapest group under the previous prices, except the ones with the smallest margins (3x the
      fraction that moved last step, at least 1/16) and each group's surplus; a min-cost flow places
      only those (:func:`_assign_restricted`). The result is kept only if :func:`_dual_prices` proves
      it optimal. (Early steps move 5-20% of a node, and items that are wrong under the old prices reach
      far down the margins, which is why the route waits. At 20k items a certified warm step costs
      4-5 ms against 70 ms for a full flow.)
    * otherwise: one min-cost flow over the whole node (:func:`_min_cost_flow`).
    """
    if n_real <= _LSA_MAX:
        return _assign_lsa(dist, n_real), None
    k = dist.shape[1]
    d = _node_costs(dist, n_real)
    out = np.zeros(dist.shape[0], dtype=np.int64)
    fraction = max(1 / 16, 3 * moved) if moved <= _WARM_MOVED else 1.0
    while prices is not None and fraction <= _WARM_MAX and n_real >= _WARM_MIN:
        assign = _assign_restricted(d, prices, fraction)
        certified = _dual_prices(d, assign)
        if certified is not None:
            out[:n_real] = assign
            return out, certified
        fraction *= 2
    out[:n_real] = _min_cost_flow(d, np.full(k, n_real // k), np.ones(k, dtype=np.int64))
    return out, None  # balanced_lloyd prices it only if the next step may start warm


def _node_costs(dist: np.ndarray, n_real: int) -> np.ndarray:
    """One node's assignment costs: float32 [n, k] squared distances (padded) -> float64 [n_real, k] >= 0
    (float32 rounding can leave tiny negatives)."""
    return np.maximum(dist[:n_real].astype(np.float64), 0.0)


def _assign_lsa(dist: np.ndarray, n_real: int) -> np.ndarray:
    """Optimal balanced assignment of a small node by the Hungarian method: group j owns floor(n/k)
    mandatory slots (a bonus larger than any rerouting forces them full) and one optional slot.
    dist float32 [n, k] -> int64 [n] (0 on padding)."""
    from scipy.optimize import linear_sum_assignment

    k = dist.shape[1]
    d = _node_costs(dist, n_real)
    slot_group, mandatory = _lsa_slots(n_real, k)
    cost = d[:, slot_group]
    cost[:, mandatory] -= (k + 1) * (float(d.max()) + 1.0)
    rows, slots = linear_sum_assignment(cost)
    out = np.zeros(dist.shape[0], dtype=np.int64)
    out[rows] = slot_group[slots]
    return out


@functools.lru_cache(maxsize=64)
def _lsa_slots(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The slots of :func:`_assign_lsa`: group int [k (floor(n/k)+1)] of each slot, and whether it is mandatory."""
    lo = n // k
    return np.repeat(np.arange(k), lo + 1), np.tile(np.r_[np.ones(lo, dtype=bool), False], k)


def _assign_restricted(d: np.ndarray, prices: np.ndarray, fraction: float) -> np.ndarray:
    """Warm start: items keep their cheapest price-adjusted group, except the ``fraction`` with the
    smallest margin to their second-cheapest and, in each group, all but the floor(n/k) members with the
    largest margins; a min-cost flow places those freed items under the remaining size bounds.
    d float64 [n, k], prices [k] -> int64 [n], sizes floor(n/k) or floor(n/k)+1."""
    n, k = d.shape
    lo = n // k
    adjusted = d - prices
    two = np.partition(adjusted, 1, axis=1)
    margin = two[:, 1] - two[:, 0]
    assign = adjusted.argmin(1)
    kept = np.ones(n, dtype=bool)
    kept[np.argpartition(margin, int(fraction * n))[: int(fraction * n)]] = False
    kept &= _rank_within(np.where(kept, assign, k), -margin) < lo  # no group keeps more than floor(n/k)
    free = np.flatnonzero(~kept)
    count = np.bincount(assign[kept], minlength=k)
    assign[free] = _min_cost_flow(d[free], lo - count, np.ones(k, dtype=np.int64))
    return assign


def _dual_prices(d: np.ndarray, assign: np.ndarray) -> np.ndarray | None:
    """Prices p [k] under which every item's group is its cheapest (d - p), proving a balanced
    assignment optimal; None if it is not (up to 1e-9 of the largest distance).

    d float64 [n, k], assign int [n] with sizes floor(n/k) or floor(n/k)+1. Moving one item of group
    i to group j costs w[i, j] = min over i's items of d[x, j] - d[x, i]; a node z closes paths from a
    group that may shrink (size floor+1) to one that may grow (size floor). The assignment is optimal
    iff this (k+1)-node graph has no negative cycle (min-cost-flow optimality), and then Bellman-Ford's
    shortest distances h satisfy d[x, i] - h[i] <= d[x, j] - h[j] for every item x of group i.
    """
    n, k = d.shape
    lo = n // k
    order = np.argsort(assign, kind="stable")
    size = np.bincount(assign, minlength=k)  # every group is non-empty: sizes >= floor(n/k) >= 1
    delta = d[order] - d[order, assign[order]][:, None]
    w = np.full((k + 1, k + 1), np.inf)
    w[:k, :k] = np.minimum.reduceat(delta, np.r_[0, np.cumsum(size)[:-1]], axis=0)
    np.fill_diagonal(w, np.inf)
    w[:k, k] = np.where(size == lo, 0.0, np.inf)      # j may take one more item
    w[k, :k] = np.where(size == lo + 1, 0.0, np.inf)  # i may give one away
    eps = 1e-9 * max(float(d.max()), 1e-30)
    h = np.zeros(k + 1)
    for _ in range(k + 2):
        relaxed = np.minimum(h, (h[:, None] + w).min(0))
        if not (relaxed < h - eps).any():
            return h[:k] - h[k]
        h = relaxed
    return None


def _min_cost_flow(cost: np.ndarray, mandatory: np.ndarray, optional: np.ndarray) -> np.ndarray:
    """Min-cost assignment of m items to k groups by ortools' min-cost flow, group j taking exactly
    mandatory[j] items plus up to optional[j] more (the problem k-means-constrained solves): each item
    supplies one unit over unit-capacity item -> group arcs; group j consumes its mandatory units and
    passes up to optional[j] more to a sink that consumes the rest. (Consuming the mandatory units at
    the groups, rather than luring them onto the sink with a large negative cost, keeps the cost range
    small: 19% less solver time at m = 312.) cost float64 [m, k] >= 0, rounded to integers at 1e-9 of
    its largest entry -> int64 [m]. About 0.6 ms at m = 312 (k = 8), 6 ms at m = 2,500, 60 ms at 20,000."""
    from ortools.graph.python.min_cost_flow import SimpleMinCostFlow

    m, k = cost.shape
    mandatory = np.asarray(mandatory, np.int64)
    unit = max(float(cost.max()), 1e-30) / 1e9
    arc_cost = np.rint(cost / unit).astype(np.int64)
    flow = SimpleMinCostFlow()
    items, groups, sink = np.arange(m), m + np.arange(k), m + k
    flow.add_arcs_with_capacity_and_unit_cost(np.repeat(items, k), m + np.tile(np.arange(k), m),
                                              np.ones(m * k, dtype=np.int64), arc_cost.ravel())
    flow.add_arcs_with_capacity_and_unit_cost(groups, np.full(k, sink), np.asarray(optional, np.int64),
                                              np.zeros(k, dtype=np.int64))
    flow.set_nodes_supplies(np.r_[items, groups, sink],
                            np.r_[np.ones(m, dtype=np.int64), -mandatory, -(m - mandatory.sum())])
    if flow.solve() != flow.OPTIMAL:
        raise RuntimeError("min-cost flow found no balanced assignment")
    return flow.flows(np.arange(m * k)).reshape(m, k).argmax(1)


def _rank_within(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rank (0-based) of each element by ``key`` inside its ``group``. Both [C] -> int [C]."""
    order = np.lexsort((key, group))
    g = group[order]
    start = np.searchsorted(g, g, side="left")
    rank = np.empty(group.size, dtype=np.int64)
    rank[order] = np.arange(group.size) - start
    return rank


# -------------------------------------------------------------------------------------------- unconstrained
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


def _lloyd(x: np.ndarray, n_real: np.ndarray, centers: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Unconstrained Lloyd steps. -> (centers [B, k, d], sse float64 [B] of the final centers)."""
    n = x.shape[1]
    k = centers.shape[1]
    valid = np.arange(n)[None, :] < n_real[:, None]
    x2 = np.einsum("bnd,bnd->bn", x, x)
    for _ in range(iters):
        assign = _sqdist(x, x2, centers).argmin(2)
        centers = _centroids(x, assign, valid, k, previous=centers)
    dist = _sqdist(x, x2, centers)
    sse = np.where(valid, np.maximum(dist.min(2), 0.0), 0.0).sum(1, dtype=np.float64)
    return centers, sse


# -------------------------------------------------------------------------------------------- helpers
def _sqdist(x: np.ndarray, x2: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared distances float32 [B, n, k] of x [B, n, d] (x2 = row norms [B, n]) to centers [B, k, d]."""
    c2 = np.einsum("bkd,bkd->bk", centers, centers)
    ct = np.ascontiguousarray(centers.transpose(0, 2, 1))
    dist = np.stack([x[b] @ ct[b] for b in range(x.shape[0])]) if x.shape[0] <= 16 else np.matmul(x, ct)
    dist *= -2.0
    dist += x2[:, :, None]
    dist += c2[:, None, :]
    return dist


def _centroids(x: np.ndarray, assign: np.ndarray, valid: np.ndarray, k: int,
               previous: np.ndarray | None = None) -> np.ndarray:
    """Group means [B, k, d]; an empty group keeps its previous centre (or stays at 0)."""
    bsz, n, d = x.shape
    counts = _counts(assign, valid, k).astype(np.float32)  # [B, k]
    if bsz <= 16:  # one BLAS product per node (numpy's stacked matmul does not use BLAS: 40x slower)
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


def _counts(assign: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Items per group int64 [B, k] of assign [B, n] (padding excluded)."""
    bsz = assign.shape[0]
    flat = (np.arange(bsz)[:, None] * k + assign)[valid]
    return np.bincount(flat, minlength=bsz * k).reshape(bsz, k)


def _masked_mean(x: np.ndarray, n_real: np.ndarray) -> np.ndarray:
    valid = (np.arange(x.shape[1])[None, :] < n_real[:, None]).astype(np.float32)
    return (np.einsum("bn,bnd->bd", valid, x) / n_real[:, None]).astype(np.float32)


def _sse(x: np.ndarray, assign: np.ndarray, valid: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Sum of squared distances [B] of every real item to its group's centre (float64 accumulation).

    Read off the [B, n, k] distance matrix rather than x - centers[assign], which would copy x."""
    dist = _sqdist(x, np.einsum("bnd,bnd->bn", x, x), centers)
    sq = np.maximum(np.take_along_axis(dist, np.maximum(assign, 0)[..., None], axis=2)[..., 0], 0.0)
    return np.where(valid, sq, 0.0).sum(1, dtype=np.float64)
