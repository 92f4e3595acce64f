"""Run the node splits of one level: pack nodes into units (one task each), run them on Ray tasks or
in this process, and gather each item's branch.

With Ray initialised, the embeddings go to the object store once (``ray.put``) and each task gets the
index array of its nodes' items; otherwise the same work runs in this process, so the library needs
no Ray.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from seater_dist.config import TreeSettings
from seater_dist.tree.ablation import plain_batch, plain_large
from seater_dist.tree.item_tree import TreeError
from seater_dist.tree.lloyd import split_batch, split_large
from seater_dist.tree.quality import reference_node
from seater_dist.tree.reference import split_reference
from seater_dist.tree.threads import limit_blas_threads


@dataclass
class Unit:
    """One task's work: whole nodes of one level. idx int64 [n_items] (items, node after node),
    starts int64 [n_nodes + 1] offsets of each node in idx, method in {large, batch, exact, plain}:
    ``lloyd.split_large``, ``lloyd.split_batch``, the reference solver ``reference.split_reference``
    (nodes up to ``exact_threshold`` items), plain k-means (the unbalanced ablation)."""

    method: str
    idx: np.ndarray
    starts: np.ndarray
    seed: int
    cpus: int = 1


@dataclass
class UnitResult:
    """branch int16 [n_items] aligned with the unit's idx; per node: sse, sse_unconstrained float64."""

    branch: np.ndarray
    sse: np.ndarray
    sse_unconstrained: np.ndarray
    seconds: float


# -------------------------------------------------------------------------------------------- packing
def plan_units(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray, k: int, s: TreeSettings,
               cpus: int, mode: str, level: int) -> list[Unit]:
    """Pack the nodes of one level that need clustering (n > k) into tasks.

    Large nodes get a task each (with all CPUs when they are fewer than the CPUs); reference-solver and
    batched nodes are packed in node order into tasks of about ``task_items`` items.
    """
    need = np.flatnonzero(sizes > k)
    if need.size == 0:
        return []
    level_items = int(sizes[need].sum())
    target = s.task_items or int(np.clip(level_items // (4 * cpus), 2_000, 400_000))
    units: list[Unit] = []
    large = need[sizes[need] > s.large_node]
    exact = need[(sizes[need] <= s.exact_threshold) & (sizes[need] <= s.large_node)]
    batch = np.setdiff1d(need, np.concatenate([large, exact]))
    large_cpus = max(1, cpus // max(1, large.size))
    for node in large:
        units.append(make_unit("large" if mode == "balanced" else "plain", order, starts, [node],
                               s.seed + 7919 * level + int(node), large_cpus))
    for method, nodes in (("exact" if mode == "balanced" else "plain", exact),
                          ("batch" if mode == "balanced" else "plain", batch)):
        chunk: list[int] = []
        items = 0
        for node in nodes:
            chunk.append(int(node))
            items += int(sizes[node])
            if items >= target:
                units.append(make_unit(method, order, starts, chunk, s.seed + 7919 * level + chunk[0], 1))
                chunk, items = [], 0
        if chunk:
            units.append(make_unit(method, order, starts, chunk, s.seed + 7919 * level + chunk[0], 1))
    return units


def make_unit(method: str, order: np.ndarray, starts: np.ndarray, nodes: list[int], seed: int, cpus: int) -> Unit:
    """The unit of the given nodes (indices into starts) of a level whose items are sorted by ``order``."""
    nodes_arr = np.asarray(nodes, dtype=np.int64)
    lo, hi = starts[nodes_arr], starts[nodes_arr + 1]
    idx = np.concatenate([order[a:b] for a, b in zip(lo, hi)]) if len(nodes) > 1 else order[lo[0]:hi[0]]
    unit_starts = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64)
    return Unit(method, idx.astype(np.int64), unit_starts, seed, cpus)


def collect(units: list[Unit], results: list[UnitResult], branch: np.ndarray) -> dict[str, np.ndarray]:
    """Write every unit's branches into ``branch`` [N]; per-node sizes, sse, sse_unconstrained, method."""
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


def batched_nodes(units: list[Unit], results: list[UnitResult]) -> list[tuple[np.ndarray, float]]:
    """(items, our sse) of every node split by ``split_batch``, in node order."""
    return [(unit.idx[a:b], float(res.sse[j]))
            for unit, res in zip(units, results) if unit.method == "batch"
            for j, (a, b) in enumerate(zip(unit.starts[:-1], unit.starts[1:]))]


# -------------------------------------------------------------------------------------------- one unit
def run_unit(emb: np.ndarray, unit: Unit, k: int, s_json: dict[str, Any]) -> UnitResult:
    """Split every node of ``unit`` (runs in a Ray task or in-process)."""
    previous = limit_blas_threads(unit.cpus)
    try:
        return _split_unit(emb, unit, k, s_json)
    finally:
        if previous is not None:  # leave the caller's process (in-process runs) as it was
            limit_blas_threads(previous)


def _split_unit(emb: np.ndarray, unit: Unit, k: int, s_json: dict[str, Any]) -> UnitResult:
    t = time.time()
    s = TreeSettings.model_validate(s_json)
    rng = np.random.default_rng(unit.seed)
    sizes = np.diff(unit.starts)
    branch = np.empty(unit.idx.size, dtype=np.int16)
    sse = np.zeros(sizes.size)
    sse_unc = np.full(sizes.size, np.nan)
    if unit.method in ("large", "plain") and sizes.size == 1 and sizes[0] > s.large_node:
        whole = unit.idx.size == emb.shape[0]  # the root: use the stored array, no copy of every item
        x = emb if whole else emb[np.sort(unit.idx)]
        if unit.method == "large":
            res = split_large(x, k, unit.seed, s.kmeans_iters, s.balanced_iters, s.price_steps,
                              s.max_points_per_centroid, s.n_init, unit.cpus)
        else:
            res = plain_large(x, k, unit.seed, s.kmeans_iters, s.max_points_per_centroid, s.n_init, unit.cpus)
        if whole:
            branch[:] = res.assign[0][unit.idx]
        else:
            branch[np.argsort(unit.idx)] = res.assign[0]
        sse[0], sse_unc[0] = res.sse[0], res.sse_unconstrained[0]
    elif unit.method == "exact":
        for j, (a, b) in enumerate(zip(unit.starts[:-1], unit.starts[1:])):
            labels, sse[j] = split_reference(emb[np.sort(unit.idx[a:b])], k, unit.seed + j, s.n_init)
            branch[a:b][np.argsort(unit.idx[a:b])] = labels  # labels follow the sorted rows
    else:
        x = _stack(emb, unit)
        if unit.method == "plain":
            res = plain_batch(x, sizes, k, rng, s.kmeans_iters, s.n_init)
        else:
            res = split_batch(x, sizes, k, rng, s.kmeans_iters, s.balanced_iters, s.n_init)
        valid = np.arange(x.shape[1])[None, :] < sizes[:, None]
        branch[:] = res.assign[valid]
        sse[:], sse_unc[:] = res.sse, res.sse_unconstrained
    return UnitResult(branch, sse, sse_unc, time.time() - t)


def _stack(emb: np.ndarray, unit: Unit) -> np.ndarray:
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


def _best_per_node(unit: Unit, results: list[UnitResult]) -> UnitResult:
    """Combine runs of the same unit from different seeds: every node keeps its lowest-objective split."""
    if len(results) == 1:
        return results[0]
    first = results[0]  # arrays from the object store are read-only
    best = UnitResult(first.branch.copy(), first.sse.copy(), first.sse_unconstrained.copy(), first.seconds)
    for other in results[1:]:
        for j in np.flatnonzero(other.sse < best.sse):
            a, b = unit.starts[j], unit.starts[j + 1]
            best.branch[a:b] = other.branch[a:b]
            best.sse[j], best.sse_unconstrained[j] = other.sse[j], other.sse_unconstrained[j]
    best.seconds = max(r.seconds for r in results)
    return best


# -------------------------------------------------------------------------------------------- runner
class Runner:
    """Runs units on Ray tasks (embeddings put in the object store once) or in this process."""

    def __init__(self, emb: np.ndarray, use_ray: bool | None):
        self.emb = emb
        self.ray = _ray_ready() if use_ray is None else use_ray
        if self.ray and not _ray_ready():
            raise TreeError("use_ray=True but Ray is not initialised (call seater_dist.runtime.ray_env.init_ray first)")
        self.cpus = os.cpu_count() or 1
        self.ref = None
        if self.ray:
            import ray

            self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            self.node_cpus = max(1, int(max(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"])))
            self.ref = ray.put(emb)  # once; every task reads the same shared-memory copy
            self.remote = ray.remote(run_unit)
            self.remote_reference = ray.remote(reference_node)

    def split_level(self, order: np.ndarray, starts: np.ndarray, sizes: np.ndarray, k: int, s: TreeSettings,
                    mode: str, level: int, branch: np.ndarray
                    ) -> tuple[list[Unit], list[UnitResult], dict[str, np.ndarray]]:
        """Split every node of more than k items of one level (``mode``: balanced or plain) and write the
        items' branches into ``branch`` [N]. -> (units, their results, per-node stats of :func:`collect`)."""
        units = plan_units(order, starts, sizes, k, s, self.cpus, mode=mode, level=level)
        results = self.run(units, k, s)
        return units, results, collect(units, results, branch)

    def run(self, units: list[Unit], k: int, s: TreeSettings) -> list[UnitResult]:
        s_json = s.model_dump(mode="json")
        if not self.ray:
            out = []
            for u in units:  # one at a time, each with the process's CPUs (faiss threads)
                u.cpus = self.cpus if u.method in ("large", "plain") else 1
                out.append(run_unit(self.emb, u, k, s_json))
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

    def reference_submit(self, idx_list: list[np.ndarray], k: int, seed: int) -> list[Any]:
        """The reference solver's objective on each node: Ray futures, or the results in-process."""
        if not self.ray:
            return [reference_node(self.emb, idx, k, seed) for idx in idx_list]
        return [self.remote_reference.remote(self.ref, idx, k, seed) for idx in idx_list]

    def reference_wait(self, pending: list[Any]) -> list[tuple[float, float]]:
        if not self.ray or not pending:
            return pending
        import ray

        return ray.get(pending)

    def close(self) -> None:
        self.ref = None


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency, but the library works without it
        return False
    return ray.is_initialized()
