"""Build the item tree of SEATER_SPEC §1 top-down, one level at a time, on Ray tasks or in-process.

    >>> tree = build_tree(embeddings, k=16)            # float32 [N, d], may be a np.memmap
    >>> tree.save("runs/microvideo/tree")

Every item carries its current node; a level splits every node of n > k items into k groups of
sizes floor(n/k) or floor(n/k)+1 (a node of n <= k items gives each item its own child), and the
branch taken becomes the item's path entry at that level. ``ItemTree.from_paths`` numbers the tokens.
Recursing by depth (not "while a group exceeds k") gives every item exactly D = ceil(log_k N) tokens:
a node that must hold n <= k^h items in h more levels splits into groups of at most
ceil(n/k) <= k^(h-1) items, which fit in h-1 levels.

How a node is split (measured on skewed clustered embeddings, bench/bench_tree.py):

* ``n > settings.large_node``: alone, faiss k-means centroids then balanced Lloyd iterations with an
  approximate (Sinkhorn-priced, greedily repaired) assignment (``balanced_kmeans.split_large``);
  the root of 6.1M items is one such task with every CPU.
* ``n <= settings.exact_threshold``: k-means-constrained itself, one node at a time (off by default:
  same problem as below, 3-10x slower per node).
* otherwise: exact constrained k-means (``balanced_kmeans.split_batch``: the optimal balanced
  assignment by one min-cost flow per node, restarted from random items); the nodes of a level
  (their sizes differ by at most one) are stacked into padded arrays so that distances and centroids
  are batched, and packed into tasks of ``task_items`` items.

With Ray initialised, the embeddings go to the object store once (``ray.put``) and each task gets
the index array of its nodes' items; otherwise (or with ``use_ray=False``) the same work runs in
this process, so the library needs no Ray.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from seater_dist.config import TreeSettings
from seater_dist.tree import balanced_kmeans as bk
from seater_dist.tree.item_tree import ItemTree, TreeError, depth_for

log = logging.getLogger("seater_dist.tree")

_CHECK_ROWS = 1 << 18  # rows per chunk when checking / hashing a (possibly memory-mapped) input


@dataclass
class _Unit:
    """One task's work: whole nodes of one level. idx int64 [n_items] (items, node after node),
    starts int64 [n_nodes + 1] offsets of each node in idx, method in {large, batch, exact, plain}."""

    method: str
    idx: np.ndarray
    starts: np.ndarray
    seed: int
    cpus: int = 1


@dataclass
class _UnitResult:
    """branch int16 [n_items] aligned with the unit's idx; per node: sse, sse_unconstrained float64."""

    branch: np.ndarray
    sse: np.ndarray
    sse_unconstrained: np.ndarray
    seconds: float


# ============================================================================================ public
def build_tree(embeddings: np.ndarray, k: int, settings: TreeSettings | None = None,
               use_ray: bool | None = None) -> ItemTree:
    """The k-ary item tree of ``embeddings`` (float32 [N, d], may be a np.memmap).

    settings.kind: ``balanced`` (SEATER), ``unbalanced`` or ``random`` (the paper's ablations).
    use_ray: None uses Ray when it is initialised; True requires it; False runs in this process.
    The manifest records N, k, D, settings, timings, per-level quality figures, the embeddings'
    sha256 (of their float32 C-order bytes) and ``balanced``.
    """
    settings = (settings or TreeSettings(k=k)).model_copy(update={"k": k})
    t0 = time.time()
    emb = _check_embeddings(embeddings)
    checksum = _sha256_rows(emb)
    n, d = emb.shape
    runner = _Runner(emb, use_ray)
    log.info("building a %s tree over %s items (d=%d, k=%d) %s", settings.kind, f"{n:,}", d, k,
             "on Ray" if runner.ray else "in-process")
    if settings.kind == "random":
        paths, levels = _random_paths(emb, k, settings.seed)
    elif settings.kind == "balanced":
        paths, levels = _balanced_paths(runner, n, k, settings)
    else:
        paths, levels = _unbalanced_paths(runner, n, k, settings)
    runner.close()
    balanced = settings.kind != "unbalanced"
    manifest = {
        "balanced": balanced, "num_items": n, "k": k, "dim": d, "embeddings_sha256": checksum,
        "settings": settings.model_dump(mode="json"), "levels": levels, "used_ray": runner.ray,
    }
    tree = ItemTree.from_paths(paths, k, manifest=manifest)
    tree.manifest["depth"] = tree.depth
    tree.manifest["seconds_total"] = round(time.time() - t0, 3)
    tree.validate(balanced=balanced)
    log.info("built the tree: %s items, depth %d, %s tokens in %.1f s", f"{n:,}", tree.depth,
             f"{tree.num_tokens:,}", time.time() - t0)
    return tree


# ============================================================================================ input
def _check_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """float32 C-contiguous [N, d] view of the input (no copy for a float32 memmap); finite values."""
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise TreeError(f"embeddings must be a non-empty 2-D array [N, d], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TreeError(f"embeddings must be floating point, got dtype {arr.dtype}")
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    for start in range(0, arr.shape[0], _CHECK_ROWS):
        ok = np.isfinite(arr[start : start + _CHECK_ROWS]).all(1)
        if not ok.all():
            row = start + int(np.flatnonzero(~ok)[0])
            raise TreeError(f"embeddings row {row} has a NaN or infinite value")
    return arr


def _sha256_rows(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    for start in range(0, arr.shape[0], _CHECK_ROWS):
        h.update(np.ascontiguousarray(arr[start : start + _CHECK_ROWS]).tobytes())
    return h.hexdigest()


# ============================================================================================ levels
def _group_of_rank(rank: np.ndarray, size: np.ndarray, k: int) -> np.ndarray:
    """Balanced group of the item at ``rank`` in a node of ``size`` items: the first n mod k groups
    take floor(n/k)+1 items, the others floor(n/k); n <= k gives one item per group. int arrays."""
    m = np.minimum(size, k)
    q, e = size // m, size % m
    big = rank < (q + 1) * e
    return np.where(big, rank // (q + 1), e + (rank - (q + 1) * e) // np.maximum(q, 1))


def _group_nodes(node: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items sorted by node (stable: by id inside a node). -> (order [N], starts [M+1], sizes [M])."""
    order = np.argsort(node, kind="stable")
    sorted_node = node[order]
    cut = np.flatnonzero(np.diff(sorted_node)) + 1
    starts = np.concatenate([[0], cut, [node.size]]).astype(np.int64)
    return order, starts, np.diff(starts)


def _balanced_paths(runner: "_Runner", n: int, k: int, s: TreeSettings) -> tuple[np.ndarray, list[dict]]:
    """Branch indices int16 [N, D-1] of the balanced tree, and one record per split level."""
    depth = depth_for(n, k)
    paths = np.zeros((n, depth - 1), dtype=np.int16)
    node = np.zeros(n, dtype=np.int64)
    levels, checks = [], []
    for lvl in range(depth - 1):
        t = time.time()
        order, starts, sizes = _group_nodes(node)
        rank = np.arange(n) - np.repeat(starts[:-1], sizes)
        branch = np.empty(n, dtype=np.int16)
        branch[order] = _group_of_rank(rank, np.repeat(sizes, sizes), k)  # right for nodes of <= k items
        units = _plan_units(order, starts, sizes, k, s, runner.cpus, mode="balanced", level=lvl)
        results = runner.run(units, k, s)
        stats = _collect(units, results, branch)
        # The quality check runs beside the next levels (on Ray it fills CPUs a single big node leaves idle).
        checks.append(_submit_exact_check(runner, units, results, k, s, lvl))
        paths[:, lvl] = branch
        node = node * k + branch
        rec = _level_record(lvl, depth, sizes, k, stats, time.time() - t, len(units))
        levels.append(rec)
        log.info("built level %d/%d: %s nodes in %.1f s (objective %.3fx unconstrained k-means)", lvl + 1,
                 depth - 1, f"{sizes.size:,}", rec["seconds"], rec.get("ratio_vs_unconstrained") or float("nan"))
    for rec, check in zip(levels, checks):
        _attach_exact_check(rec, runner, *check)
    return paths, levels


def _unbalanced_paths(runner: "_Runner", n: int, k: int, s: TreeSettings) -> tuple[np.ndarray, list[dict]]:
    """Plain k-means recursing while a group exceeds k (the paper's imbalanced ablation).

    Items of a group of <= k items that ends at level L above the deepest one get a chain of
    single-child nodes between that group and their leaf: paths[i, L] = rank in the group, then 0s.
    Returns paths int16 [N, D_max-1].
    """
    node = np.zeros(n, dtype=np.int64)
    done_at = np.full(n, -1, dtype=np.int64)  # level of the node (<= k items) each item ended in
    columns: list[np.ndarray] = []
    levels = []
    lvl = 0
    while True:
        t = time.time()
        active = done_at < 0
        order, starts, sizes = _group_nodes(np.where(active, node, -1))
        first = 1 if not active[order[0]] else 0  # the "-1" block of finished items sorts first
        starts, sizes = starts[first:], sizes[first:]
        small = sizes <= k
        finished = np.repeat(small, sizes)
        done_at[order[starts[0]:][finished]] = lvl
        if small.all():
            break
        big = ~small
        units = _plan_units(order, starts, sizes, k, s, runner.cpus, mode="plain", level=lvl)
        results = runner.run(units, k, s)
        branch = np.zeros(n, dtype=np.int16)
        stats = _collect(units, results, branch)
        columns.append(np.where(done_at >= 0, 0, branch).astype(np.int16))
        node = np.unique(node * k + branch, return_inverse=True)[1]  # dense ids: no overflow however deep
        levels.append(_level_record(lvl, None, sizes[big], k, stats, time.time() - t, len(units)))
        log.info("built level %d: %s nodes split by plain k-means in %.1f s", lvl + 1, f"{int(big.sum()):,}",
                 time.time() - t)
        lvl += 1
    depth = int(done_at.max()) + 1
    paths = np.zeros((n, depth - 1), dtype=np.int16)
    for c, col in enumerate(columns[: depth - 1]):
        paths[:, c] = col
    # rank inside the final group, for items whose group sits above the deepest internal level
    order, starts, sizes = _group_nodes(node)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts[:-1], sizes)
    short = done_at < depth - 1
    paths[short, done_at[short]] = rank[short]
    return paths, levels


def _random_paths(emb: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, list[dict]]:
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
        branch[order] = _group_of_rank(rank, np.repeat(sizes, sizes), k)
        paths[:, lvl] = branch
        node = node * k + branch
        sse = _level_sse(emb, node)
        levels.append({"level": lvl + 1, "nodes": int(sizes.size), "seconds": round(time.time() - t, 3),
                       "objective": sse / n})
    return paths, levels


def _level_sse(emb: np.ndarray, group: np.ndarray) -> float:
    """Sum of squared distances of every item to the mean of its group (group int [N]), in chunks."""
    _, inv = np.unique(group, return_inverse=True)
    counts = np.bincount(inv).astype(np.float64)
    sums = np.zeros((counts.size, emb.shape[1]))
    sq = 0.0
    for start in range(0, emb.shape[0], _CHECK_ROWS):
        chunk = np.asarray(emb[start : start + _CHECK_ROWS], dtype=np.float64)
        np.add.at(sums, inv[start : start + _CHECK_ROWS], chunk)
        sq += float(np.einsum("nd,nd->", chunk, chunk))
    return max(sq - float((sums**2).sum(1).dot(1.0 / counts)), 0.0)


# ============================================================================================ planning
def _plan_units(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray, k: int, s: TreeSettings,
                cpus: int, mode: str, level: int) -> list[_Unit]:
    """Pack the nodes of one level that need clustering (n > k) into tasks.

    Large nodes get a task each (with all CPUs when they are fewer than the CPUs); exact and batched
    nodes are packed in node order into tasks of about ``task_items`` items.
    """
    need = np.flatnonzero(sizes > k)
    if need.size == 0:
        return []
    level_items = int(sizes[need].sum())
    target = s.task_items or int(np.clip(level_items // (4 * cpus), 2_000, 400_000))
    units: list[_Unit] = []
    large = need[sizes[need] > s.large_node]
    exact = need[(sizes[need] <= s.exact_threshold) & (sizes[need] <= s.large_node)]
    batch = np.setdiff1d(need, np.concatenate([large, exact]))
    large_cpus = max(1, cpus // max(1, large.size))
    for node in large:
        units.append(_make_unit("large" if mode == "balanced" else "plain", order, starts, [node],
                                s.seed + 7919 * level + int(node), large_cpus))
    for method, nodes in (("exact" if mode == "balanced" else "plain", exact),
                          ("batch" if mode == "balanced" else "plain", batch)):
        chunk: list[int] = []
        items = 0
        for node in nodes:
            chunk.append(int(node))
            items += int(sizes[node])
            if items >= target:
                units.append(_make_unit(method, order, starts, chunk, s.seed + 7919 * level + chunk[0], 1))
                chunk, items = [], 0
        if chunk:
            units.append(_make_unit(method, order, starts, chunk, s.seed + 7919 * level + chunk[0], 1))
    return units


def _make_unit(method: str, order: np.ndarray, starts: np.ndarray, nodes: list[int], seed: int, cpus: int) -> _Unit:
    nodes_arr = np.asarray(nodes, dtype=np.int64)
    lo, hi = starts[nodes_arr], starts[nodes_arr + 1]
    idx = np.concatenate([order[a:b] for a, b in zip(lo, hi)]) if len(nodes) > 1 else order[lo[0]:hi[0]]
    unit_starts = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64)
    return _Unit(method, idx.astype(np.int64), unit_starts, seed, cpus)


# ============================================================================================ running
def _run_unit(emb: np.ndarray, unit: _Unit, k: int, s_json: dict[str, Any]) -> _UnitResult:
    """Split every node of ``unit`` (runs in a Ray task or in-process)."""
    previous = bk.limit_blas_threads(unit.cpus)
    try:
        return _split_unit(emb, unit, k, s_json)
    finally:
        if previous is not None:  # leave the caller's process (in-process runs) as it was
            bk.limit_blas_threads(previous)


def _split_unit(emb: np.ndarray, unit: _Unit, k: int, s_json: dict[str, Any]) -> _UnitResult:
    t = time.time()
    s = TreeSettings.model_validate(s_json)
    rng = np.random.default_rng(unit.seed)
    sizes = np.diff(unit.starts)
    branch = np.empty(unit.idx.size, dtype=np.int16)
    sse = np.zeros(sizes.size)
    sse_unc = np.full(sizes.size, np.nan)
    if unit.method in ("large", "plain") and sizes.size == 1 and sizes[0] > s.large_node:
        whole = unit.idx.size == emb.shape[0]  # the root: use the stored array, no 1.5 GB copy
        x = emb if whole else emb[np.sort(unit.idx)]
        if unit.method == "large":
            res = bk.split_large(x, k, unit.seed, s.kmeans_iters, s.balanced_iters, s.price_steps,
                                 s.max_points_per_centroid, s.n_init, unit.cpus)
        else:
            res = bk.plain_large(x, k, unit.seed, s.kmeans_iters, s.max_points_per_centroid, s.n_init, unit.cpus)
        if whole:
            branch[:] = res.assign[0][unit.idx]
        else:
            branch[np.argsort(unit.idx)] = res.assign[0]
        sse[0], sse_unc[0] = res.sse[0], res.sse_unconstrained[0]
    elif unit.method == "exact":
        for j, (a, b) in enumerate(zip(unit.starts[:-1], unit.starts[1:])):
            labels, sse[j] = bk.split_exact(emb[np.sort(unit.idx[a:b])], k, unit.seed + j, s.n_init)
            branch[a:b][np.argsort(unit.idx[a:b])] = labels  # labels follow the sorted rows
    else:
        x = _stack(emb, unit)
        if unit.method == "plain":
            res = bk.plain_batch(x, sizes, k, rng, s.kmeans_iters, s.n_init)
        else:
            res = bk.split_batch(x, sizes, k, rng, s.kmeans_iters, s.balanced_iters, s.n_init)
        valid = np.arange(x.shape[1])[None, :] < sizes[:, None]
        branch[:] = res.assign[valid]
        sse[:], sse_unc[:] = res.sse, res.sse_unconstrained
    return _UnitResult(branch, sse, sse_unc, time.time() - t)


def _best_per_node(unit: _Unit, results: list[_UnitResult]) -> _UnitResult:
    """Combine runs of the same unit from different seeds: every node keeps its lowest-objective split."""
    if len(results) == 1:
        return results[0]
    first = results[0]  # arrays from the object store are read-only
    best = _UnitResult(first.branch.copy(), first.sse.copy(), first.sse_unconstrained.copy(), first.seconds)
    for other in results[1:]:
        for j in np.flatnonzero(other.sse < best.sse):
            a, b = unit.starts[j], unit.starts[j + 1]
            best.branch[a:b] = other.branch[a:b]
            best.sse[j], best.sse_unconstrained[j] = other.sse[j], other.sse_unconstrained[j]
    best.seconds = max(r.seconds for r in results)
    return best


def _stack(emb: np.ndarray, unit: _Unit) -> np.ndarray:
    """The unit's nodes as a padded float32 [B, n_max, d] array (rows in the unit's idx order)."""
    sizes = np.diff(unit.starts)
    n_max = int(sizes.max())
    x = np.zeros((sizes.size, n_max, emb.shape[1]), dtype=np.float32)
    row = np.repeat(np.arange(sizes.size), sizes)
    col = np.arange(unit.idx.size) - np.repeat(unit.starts[:-1], sizes)
    sorted_pos = np.argsort(unit.idx, kind="stable")
    gathered = np.empty((unit.idx.size, emb.shape[1]), dtype=np.float32)
    gathered[sorted_pos] = emb[unit.idx[sorted_pos]]  # read the store / memmap in increasing row order
    x[row, col] = gathered
    return x


def _collect(units: list[_Unit], results: list[_UnitResult], branch: np.ndarray) -> dict[str, np.ndarray]:
    """Write every unit's branches into ``branch`` [N]; per-node sizes, sse, sse_unconstrained."""
    sizes, sse, unc, method = [], [], [], []
    for unit, res in zip(units, results):
        branch[unit.idx] = res.branch
        sizes.append(np.diff(unit.starts))
        sse.append(res.sse)
        unc.append(res.sse_unconstrained)
        method.append(np.full(unit.starts.size - 1, unit.method))
    if not units:
        return {"sizes": np.zeros(0, np.int64), "sse": np.zeros(0), "sse_unc": np.zeros(0), "method": np.zeros(0, str)}
    return {"sizes": np.concatenate(sizes), "sse": np.concatenate(sse), "sse_unc": np.concatenate(unc),
            "method": np.concatenate(method)}


def _submit_exact_check(runner: "_Runner", units: list[_Unit], results: list[_UnitResult], k: int,
                        s: TreeSettings, level: int) -> tuple[list[float], list[np.ndarray], Any]:
    """Start solving up to ``quality_sample_nodes`` batched nodes of this level with exact constrained
    k-means. -> (our objectives, the nodes' items, the pending solves for :func:`_attach_exact_check`)."""
    picks = []
    for unit, res in zip(units, results):
        if unit.method != "batch":
            continue
        for j, (a, b) in enumerate(zip(unit.starts[:-1], unit.starts[1:])):
            if b - a <= s.quality_sample_max_items and len(picks) < s.quality_sample_nodes:
                picks.append((unit.idx[a:b], float(res.sse[j])))
    nodes = [p[0] for p in picks]
    return [p[1] for p in picks], nodes, runner.exact_submit(nodes, k, s.seed + level)


def _attach_exact_check(rec: dict[str, Any], runner: "_Runner", ours: list[float], nodes: list[np.ndarray],
                        pending: Any) -> None:
    """Add the exact-versus-ours comparison of one level to its record."""
    samples = [{"items": int(idx.size), "ours": o, "exact": exact_sse, "ratio": o / exact_sse,
                "exact_seconds": round(secs, 3)}
               for o, idx, (exact_sse, secs) in zip(ours, nodes, runner.exact_wait(pending))]
    if samples:
        rec["exact_samples"] = samples
        rec["ratio_vs_exact"] = float(np.mean([x["ratio"] for x in samples]))


def _level_record(lvl: int, depth: int | None, sizes: np.ndarray, k: int, stats: dict[str, np.ndarray],
                  seconds: float, tasks: int) -> dict[str, Any]:
    """What the manifest keeps about one split level (objectives are mean squared distances)."""
    clustered = stats["sizes"].sum()
    rec: dict[str, Any] = {
        "level": lvl + 1, "nodes": int(sizes.size), "node_items_min": int(sizes.min()),
        "node_items_max": int(sizes.max()), "clustered_nodes": int(stats["sizes"].size),
        "tasks": tasks, "seconds": round(seconds, 3),
        "methods": {str(m): int((stats["method"] == m).sum()) for m in np.unique(stats["method"])},
    }
    if clustered:
        rec["objective"] = float(stats["sse"].sum() / clustered)
        unc = stats["sse_unc"]
        ok = np.isfinite(unc)
        if ok.any():
            rec["objective_unconstrained"] = float(unc[ok].sum() / stats["sizes"][ok].sum())
            rec["ratio_vs_unconstrained"] = float(stats["sse"][ok].sum() / unc[ok].sum())
    return rec


class _Runner:
    """Runs units on Ray tasks (embeddings put in the object store once) or in this process."""

    def __init__(self, emb: np.ndarray, use_ray: bool | None):
        self.emb = emb
        self.ray = _ray_ready() if use_ray is None else use_ray
        if self.ray and not _ray_ready():
            raise TreeError("use_ray=True but Ray is not initialised (call seater_dist.ray_env.init_ray first)")
        self.cpus = os.cpu_count() or 1
        self.ref = None
        if self.ray:
            import ray

            self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            self.node_cpus = max(1, int(max(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"])))
            self.ref = ray.put(emb)  # once; every task reads the same shared-memory copy
            self.remote = ray.remote(_run_unit)
            self.remote_exact = ray.remote(_exact_node)

    def run(self, units: list[_Unit], k: int, s: TreeSettings) -> list[_UnitResult]:
        s_json = s.model_dump(mode="json")
        if not self.ray:
            out = []
            for u in units:  # one at a time, each with the process's CPUs (faiss threads)
                u.cpus = self.cpus if u.method in ("large", "plain") else 1
                out.append(_run_unit(self.emb, u, k, s_json))
            return out
        import ray

        # Fewer batched tasks than CPUs (the top levels of a small tree): the idle CPUs run the same
        # nodes from other seeds, and each node keeps its best split. Free in wall time, and it evens
        # out the unlucky restarts that a single big node is most exposed to.
        replicas = self.cpus // len(units) if units and all(u.method == "batch" for u in units) else 1
        refs = []
        for u in units:
            u.cpus = min(u.cpus, self.node_cpus)
            refs.append([self.remote.options(num_cpus=u.cpus).remote(self.ref, replace(u, seed=u.seed + 104_729 * r),
                                                                    k, s_json) for r in range(max(1, replicas))])
        return [_best_per_node(u, ray.get(r)) for u, r in zip(units, refs)]

    def exact_submit(self, idx_list: list[np.ndarray], k: int, seed: int) -> list[Any]:
        """Exact constrained k-means of each node: Ray futures, or the results in-process."""
        if not self.ray:
            return [_exact_node(self.emb, idx, k, seed) for idx in idx_list]
        return [self.remote_exact.remote(self.ref, idx, k, seed) for idx in idx_list]

    def exact_wait(self, pending: list[Any]) -> list[tuple[float, float]]:
        if not self.ray or not pending:
            return pending
        import ray

        return ray.get(pending)

    def close(self) -> None:
        self.ref = None


def _exact_node(emb: np.ndarray, idx: np.ndarray, k: int, seed: int) -> tuple[float, float]:
    """Exact constrained k-means (n_init 3) objective of one node's items. -> (sse, seconds)."""
    t = time.time()
    _, sse = bk.split_exact(emb[np.sort(idx)], k, seed, n_init=3)
    return sse, time.time() - t


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency, but the library works without it
        return False
    return ray.is_initialized()
