"""Top-K metrics of docs/method.md §7: HR@K, Recall@K, NDCG@K with the official IDCG, averaged over users.

For a user with ground truth set G and ranked list R (best first):

    HR@K     = 1 if R[:K] ∩ G else 0
    Recall@K = |R[:K] ∩ G| / |G|
    NDCG@K   = DCG / IDCG,  DCG = Σ_{hits at 0-based rank r < K} 1/log2(r + 2),
               IDCG = Σ_{i < min(|G|, K)} 1/log2(i + 2)        (over all positives, not over the hits)

Training's validation adds up :func:`metric_sums` of its batches, then calls :func:`finalize`; offline
evaluation keeps :func:`per_user_metrics` (one value per user) for its per-user table and intervals.

    >>> compute_metrics(np.array([[3, 1, 2]]), [np.array([1, 9])], ks=(2,))
    {'hr@2': 1.0, 'ndcg@2': 0.38685280723454163, 'recall@2': 0.5}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def per_user_metrics(topk: np.ndarray, ground_truth: Sequence[np.ndarray],
                     ks: Iterable[int] = (20, 50)) -> dict[str, np.ndarray]:
    """Every metric of every user: ``{"hr@K": float64 [U], "recall@K": ..., "ndcg@K": ...}``.

    topk int [U, K_max]: ranked item ids, -1 padded; ground_truth: U arrays of item ids (duplicates count
    once). A repeated item in a ranked list counts only at its first rank. Raises ValueError on shape
    mismatch, K > K_max, or a user with empty ground truth (a bug upstream, never silently skipped).
    """
    topk = np.asarray(topk)
    ks = tuple(int(k) for k in ks)
    if topk.ndim != 2 or topk.shape[0] != len(ground_truth):
        raise ValueError(f"topk must be [U, K] with U = len(ground_truth) = {len(ground_truth)}, got {topk.shape}")
    if ks and max(ks) > topk.shape[1]:
        raise ValueError(f"K={max(ks)} exceeds the {topk.shape[1]} ranked items per user")
    if topk.shape[0] == 0:
        return {f"{m}@{k}": np.zeros(0) for k in ks for m in ("hr", "recall", "ndcg")}
    hits, gt_size = _hit_matrix(topk, ground_truth)  # bool [U, K_max], int [U]
    discount = 1.0 / np.log2(np.arange(topk.shape[1]) + 2.0)
    values: dict[str, np.ndarray] = {}
    for k in ks:
        h = hits[:, :k]
        n_hit = h.sum(1)
        ideal = np.cumsum(discount[:k])[np.minimum(gt_size, k) - 1]
        values[f"hr@{k}"] = (n_hit > 0).astype(np.float64)
        values[f"recall@{k}"] = n_hit / gt_size
        values[f"ndcg@{k}"] = (h * discount[:k]).sum(1) / ideal
    return values


def metric_sums(topk: np.ndarray, ground_truth: Sequence[np.ndarray], ks: Iterable[int] = (20, 50)) -> dict[str, float]:
    """Per-metric SUMS over users of :func:`per_user_metrics`, plus ``users`` (the count)."""
    values = per_user_metrics(topk, ground_truth, ks)
    return {"users": float(len(ground_truth)), **{name: float(v.sum()) for name, v in values.items()}}


def _hit_matrix(topk: np.ndarray, ground_truth: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """bool [U, K]: topk[u, r] is in set(ground_truth[u]) and is the first occurrence of that item in row u;
    int [U]: |set(ground_truth[u])|. Vectorised with (user, item) keys."""
    U, K = topk.shape
    gt_sets = [np.unique(np.asarray(g, dtype=np.int64)) for g in ground_truth]
    gt_size = np.array([g.size for g in gt_sets], dtype=np.int64)
    if (gt_size == 0).any():
        raise ValueError(f"user {int(np.flatnonzero(gt_size == 0)[0])} has empty ground truth")
    gt_items = np.concatenate(gt_sets)
    width = int(max(gt_items.max(initial=0), topk.max(initial=0))) + 2  # +1 for the -1 pad shifted to 0
    gt_keys = np.repeat(np.arange(U, dtype=np.int64), gt_size) * width + gt_items + 1
    top_keys = np.arange(U, dtype=np.int64)[:, None] * width + topk.astype(np.int64) + 1
    _, first = np.unique(top_keys.ravel(), return_index=True)
    is_first = np.zeros(U * K, dtype=bool)
    is_first[first] = True
    hits = np.isin(top_keys.ravel(), gt_keys) & is_first & (topk.ravel() >= 0)
    return hits.reshape(U, K), gt_size


def finalize(sums: Mapping[str, float]) -> dict[str, float]:
    """Sums (possibly added up over shards) -> means per user, keys ``recall@K``, ``hr@K``, ``ndcg@K``."""
    users = float(sums.get("users", 0.0))
    if users <= 0:
        raise ValueError("finalize: no users were evaluated")
    return {name: value / users for name, value in sorted(sums.items()) if name != "users"}


def compute_metrics(topk: np.ndarray, ground_truth: Sequence[np.ndarray],
                    ks: Iterable[int] = (20, 50)) -> dict[str, float]:
    """Means over users: finalize(metric_sums(topk, ground_truth, ks))."""
    return finalize(metric_sums(topk, ground_truth, ks))


def add_sums(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """Add two :func:`metric_sums` results (shards of one evaluation)."""
    return {key: float(a.get(key, 0.0)) + float(b.get(key, 0.0)) for key in set(a) | set(b)}
