"""Balanced assignment on a cost matrix: put each of a node's n items in one of k groups of sizes
floor(n/k) or floor(n/k)+1 at the least total cost (squared distance to the group's centre).

Two families:

* exact (:func:`assign_exact`): the optimal balanced assignment of one node, by the Hungarian method on
  small nodes, a warm-started restricted min-cost flow certified by dual prices, or one full min-cost
  flow. This is the assignment step of exact constrained k-means (``lloyd.split_batch``).
* approximate (:func:`update_prices` then :func:`repair`), for single nodes of millions of items where a
  flow over n x k arcs would not fit: it works on the Lagrangian dual of the transportation problem
  min sum_i D[i, a_i] subject to the group sizes. Group j gets a price lambda_j and item i goes to
  argmin_j D[i, j] - lambda_j; the prices come from annealed Sinkhorn steps on the entropy-smoothed dual,
  warm-started from the previous Lloyd iteration, and the small imbalance left is removed by the greedy
  :func:`repair`. On nodes of a few hundred items this path lands well above the optimum, which is why
  every node that fits gets the exact route instead (figures in docs/tree-measurements.md).
"""

from __future__ import annotations

import functools

import numpy as np

LSA_MAX = 128  # nodes up to this size get the Hungarian method instead of a min-cost flow
WARM_MAX = 1 / 4  # largest share of a node a warm attempt frees (doubling from 3x the share that moved)
WARM_MOVED = 1 / 12  # warm attempts only once at most this share of the node moved at the last step
WARM_MIN = 1000  # below, a full flow costs little more than a warm attempt that may fail


# -------------------------------------------------------------------------------------------- exact
def assign_exact(dist: np.ndarray, n_real: int, prices: np.ndarray | None = None, moved: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """The optimal balanced assignment of one node, and dual prices that certify it.

    dist float32 [n, k] (rows past n_real are padding); prices float64 [k] certified at this node's
    previous Lloyd step (or None), moved: the fraction of its items that changed group at that step
    -> (int64 [n] group per item, 0 on padding; float64 [k] prices if the warm route certified it,
    else None). Three exact routes, cheapest first:
    * n <= LSA_MAX: scipy's rectangular Hungarian on item x group-slot costs (a min-cost flow's setup
      dominates at that size).
    * warm, on nodes of at least WARM_MIN items once few items move between Lloyd steps: items keep
      their cheapest group under the previous prices, except the ones with the smallest margins (3x the
      fraction that moved last step, at least 1/16) and each group's surplus; a min-cost flow places
      only those (:func:`_assign_restricted`). The result is kept only if :func:`dual_prices` proves
      it optimal. (Early steps move many items, and items that are wrong under the old prices reach
      far down the margins, which is why the route waits.)
    * otherwise: one min-cost flow over the whole node (:func:`min_cost_flow`).
    """
    if n_real <= LSA_MAX:
        return _assign_lsa(dist, n_real), None
    k = dist.shape[1]
    d = node_costs(dist, n_real)
    out = np.zeros(dist.shape[0], dtype=np.int64)
    fraction = max(1 / 16, 3 * moved) if moved <= WARM_MOVED else 1.0
    while prices is not None and fraction <= WARM_MAX and n_real >= WARM_MIN:
        assign = _assign_restricted(d, prices, fraction)
        certified = dual_prices(d, assign)
        if certified is not None:
            out[:n_real] = assign
            return out, certified
        fraction *= 2
    out[:n_real] = min_cost_flow(d, np.full(k, n_real // k), np.ones(k, dtype=np.int64))
    return out, None  # balanced_lloyd prices it only if the next step may start warm


def node_costs(dist: np.ndarray, n_real: int) -> np.ndarray:
    """One node's assignment costs: float32 [n, k] squared distances (padded) -> float64 [n_real, k] >= 0
    (float32 rounding can leave tiny negatives)."""
    return np.maximum(dist[:n_real].astype(np.float64), 0.0)


def _assign_lsa(dist: np.ndarray, n_real: int) -> np.ndarray:
    """Optimal balanced assignment of a small node by the Hungarian method: group j owns floor(n/k)
    mandatory slots (a bonus larger than any rerouting forces them full) and one optional slot.
    dist float32 [n, k] -> int64 [n] (0 on padding)."""
    from scipy.optimize import linear_sum_assignment

    k = dist.shape[1]
    d = node_costs(dist, n_real)
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
    assign[free] = min_cost_flow(d[free], lo - count, np.ones(k, dtype=np.int64))
    return assign


def dual_prices(d: np.ndarray, assign: np.ndarray) -> np.ndarray | None:
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


def min_cost_flow(cost: np.ndarray, mandatory: np.ndarray, optional: np.ndarray) -> np.ndarray:
    """Min-cost assignment of m items to k groups by ortools' min-cost flow, group j taking exactly
    mandatory[j] items plus up to optional[j] more (the problem k-means-constrained solves): each item
    supplies one unit over unit-capacity item -> group arcs; group j consumes its mandatory units and
    passes up to optional[j] more to a sink that consumes the rest. (Consuming the mandatory units at
    the groups, rather than luring them onto the sink with a large negative cost, keeps the cost range
    small, which the solver is faster on.) cost float64 [m, k] >= 0, rounded to integers at 1e-9 of
    its largest entry -> int64 [m]."""
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


# -------------------------------------------------------------------------------------------- approximate
def update_prices(dist: np.ndarray, valid: np.ndarray, n_real: np.ndarray, prices: np.ndarray,
                  stages: int, iters: int = 3, factor: float = 0.4) -> np.ndarray:
    """Annealed Sinkhorn on the dual of the balanced assignment (see the module docstring).

    dist float32 [B, n, k], valid bool [B, n], prices float32 [B, k] -> new prices [B, k].
    The temperature starts at tau_end / factor**(stages-1) and ends at tau_end = 1e-3 x the node's
    distance spread; each stage runs ``iters`` Sinkhorn steps prices_j += tau (log cap_j - log s_j),
    where s_j is the soft size of group j. Every step increases the smoothed dual, so the prices
    never diverge (Newton steps on the same dual stalled once the assignment hardened).
    """
    bsz, n, k = dist.shape
    lo, extra = n_real // k, n_real % k
    cap = _caps(group_counts((dist - prices[:, None, :]).argmin(2), valid, k), lo, extra).astype(np.float32)
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


def repair(adjusted: np.ndarray, assign: np.ndarray, valid: np.ndarray, n_real: np.ndarray,
           k: int) -> np.ndarray:
    """Make every node exactly balanced by the cheapest moves from over-full to under-full groups.

    adjusted float32 [B, n, k] (distances minus prices), assign int [B, n] -> balanced assign [B, n].
    Each round, every over-full group offers its `excess` items with the smallest cost increase
    (each to its cheapest under-full group), and every under-full group accepts its `deficit`
    cheapest offers. A node's globally cheapest offer is always accepted, so every round makes
    progress; moves only go from over-full to under-full groups, so no item moves twice.
    (Optimal for k = 2.)
    """
    bsz, n, _ = adjusted.shape
    lo, extra = n_real // k, n_real % k
    assign = assign.copy()
    cap = _caps(group_counts(assign, valid, k), lo, extra)
    while True:
        excess = group_counts(assign, valid, k) - cap  # [B, k]
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


def _caps(counts: np.ndarray, lo: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """Group capacities [B, k]: lo, plus one for the ``extra`` groups that currently hold the most items.

    The method fixes the sizes, not which groups are the larger ones; giving the +1 to the groups with
    the most demand is what exact constrained k-means (size_min = lo, size_max = lo + 1) would pick.
    """
    bsz, k = counts.shape
    order = np.argsort(-counts, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(k)[None, :].repeat(bsz, 0), axis=1)
    return lo[:, None] + (rank < extra[:, None])


# -------------------------------------------------------------------------------------------- helpers
def group_counts(assign: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Items per group int64 [B, k] of assign [B, n] (padding excluded)."""
    bsz = assign.shape[0]
    flat = (np.arange(bsz)[:, None] * k + assign)[valid]
    return np.bincount(flat, minlength=bsz * k).reshape(bsz, k)


def _rank_within(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rank (0-based) of each element by ``key`` inside its ``group``. Both [C] -> int [C]."""
    order = np.lexsort((key, group))
    g = group[order]
    start = np.searchsorted(g, g, side="left")
    rank = np.empty(group.size, dtype=np.int64)
    rank[order] = np.arange(group.size) - start
    return rank
