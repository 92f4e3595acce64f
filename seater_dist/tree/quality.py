"""What the manifest reports about the quality of each split level.

* :func:`level_record`: sizes, timing and the clustering objective of one level (mean squared distance
  to the group means), next to unconstrained k-means on the same nodes.
* spot checks: a few batched nodes of every level are solved again by the reference solver
  k-means-constrained (``reference.split_reference``), and the level records our objective against it
  (manifest keys ``exact_samples`` and ``ratio_vs_exact``). The checks run beside the next levels, so on
  Ray they fill CPUs that a single big node leaves idle.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from seater_dist.config import TreeSettings
from seater_dist.tree.reference import split_reference

_SSE_ROWS = 1 << 18  # rows per chunk when summing over a (possibly memory-mapped) input


class ReferenceSolver(Protocol):
    """Runs :func:`reference_node` on Ray or in-process (``executor.Runner``)."""

    def reference_submit(self, idx_list: list[np.ndarray], k: int, seed: int) -> list[Any]: ...

    def reference_wait(self, pending: list[Any]) -> list[tuple[float, float]]: ...


def level_record(lvl: int, depth: int | None, sizes: np.ndarray, k: int, stats: dict[str, np.ndarray],
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


def level_sse(emb: np.ndarray, group: np.ndarray) -> float:
    """Sum of squared distances of every item to the mean of its group (group int [N]), in chunks."""
    _, inv = np.unique(group, return_inverse=True)
    counts = np.bincount(inv).astype(np.float64)
    sums = np.zeros((counts.size, emb.shape[1]))
    sq = 0.0
    for start in range(0, emb.shape[0], _SSE_ROWS):
        chunk = np.asarray(emb[start : start + _SSE_ROWS], dtype=np.float64)
        np.add.at(sums, inv[start : start + _SSE_ROWS], chunk)
        sq += float(np.einsum("nd,nd->", chunk, chunk))
    return max(sq - float((sums**2).sum(1).dot(1.0 / counts)), 0.0)


# -------------------------------------------------------------------------------------------- spot checks
def submit_reference_check(solver: ReferenceSolver, batched: list[tuple[np.ndarray, float]], k: int,
                           s: TreeSettings, level: int) -> tuple[list[float], list[np.ndarray], Any]:
    """Start solving up to ``quality_sample_nodes`` of this level's batched nodes (items, our sse) of at
    most ``quality_sample_max_items`` items with the reference solver.
    -> (our objectives, the nodes' items, the pending solves for :func:`attach_reference_check`)."""
    picks = [(idx, sse) for idx, sse in batched if idx.size <= s.quality_sample_max_items][: s.quality_sample_nodes]
    nodes = [p[0] for p in picks]
    return [p[1] for p in picks], nodes, solver.reference_submit(nodes, k, s.seed + level)


def attach_reference_check(rec: dict[str, Any], solver: ReferenceSolver, ours: list[float],
                           nodes: list[np.ndarray], pending: Any) -> None:
    """Add the reference-versus-ours comparison of one level to its record."""
    # A node of identical items has objective 0 under both solvers: their ratio is 1, not 0/0.
    samples = [{"items": int(idx.size), "ours": o, "exact": ref_sse,
                "ratio": o / ref_sse if ref_sse > 0 else (1.0 if o <= 0 else float("inf")),
                "exact_seconds": round(secs, 3)}
               for o, idx, (ref_sse, secs) in zip(ours, nodes, solver.reference_wait(pending))]
    if samples:
        rec["exact_samples"] = samples
        rec["ratio_vs_exact"] = float(np.mean([x["ratio"] for x in samples]))


def reference_node(emb: np.ndarray, idx: np.ndarray, k: int, seed: int) -> tuple[float, float]:
    """Reference solver (n_init 3) objective of one node's items. -> (sse, seconds)."""
    t = time.time()
    _, sse = split_reference(emb[np.sort(idx)], k, seed, n_init=3)
    return sse, time.time() - t
