"""The balanced split rule of docs/method.md §1, by rank, and the grouping of items by node.

A node of n items splits into min(n, k) groups: the first n mod k get floor(n/k)+1 items, the rest
floor(n/k) (n <= k: one item per group). :func:`group_of_rank` is the one implementation of that rule;
the builder (nodes of at most k items), the random ablation and the toy trees of the model tests use it.
"""

from __future__ import annotations

import numpy as np

from seater_dist.tree.item_tree import depth_for


def group_of_rank(rank: np.ndarray, size: np.ndarray, k: int) -> np.ndarray:
    """Balanced group of the item at ``rank`` (0-based) in a node of ``size`` items. int arrays, same shape.

    Groups are contiguous blocks of ranks: the first n mod k groups take floor(n/k)+1 ranks, the others
    floor(n/k); n <= k gives one rank per group.
    """
    m = np.minimum(size, k)
    q, e = size // m, size % m
    big = rank < (q + 1) * e
    return np.where(big, rank // (q + 1), e + (rank - (q + 1) * e) // np.maximum(q, 1))


def balanced_paths(num_items: int, k: int) -> np.ndarray:
    """Branch indices int64 [N, D-1] of the balanced tree whose leaves are items 0..N-1 in id order.

    Level by level over all items at once (no per-node loop), so it stays fast at millions of items.
    """
    depth = depth_for(num_items, k)
    rank = np.arange(num_items, dtype=np.int64)  # position inside the current node
    size = np.full(num_items, num_items, dtype=np.int64)  # items in the current node
    paths = np.empty((num_items, depth - 1), dtype=np.int64)
    for lvl in range(depth - 1):
        group = group_of_rank(rank, size, k)
        m = np.minimum(size, k)
        q, e = size // m, size % m
        paths[:, lvl] = group
        rank, size = rank - (group * q + np.minimum(group, e)), q + (group < e)
    return paths


def group_nodes(node: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items sorted by node (stable: by id inside a node). node int [N] -> (order [N], starts [M+1], sizes [M])."""
    order = np.argsort(node, kind="stable")
    sorted_node = node[order]
    cut = np.flatnonzero(np.diff(sorted_node)) + 1
    starts = np.concatenate([[0], cut, [node.size]]).astype(np.int64)
    return order, starts, np.diff(starts)
