"""Random balanced trees for tests and benchmarks (no embeddings, no clustering).

The tree stage builds real trees from item embeddings (``seater_dist.tree``); the model only needs a valid
balanced shape, so tests and ``bench/bench_beam.py`` use these.

    >>> tree = random_balanced_tree(10, k=3, seed=0)
    >>> tree.depth, tree.codes.shape
    (3, (10, 3))
"""

from __future__ import annotations

import numpy as np

from seater_dist.tree.balance import balanced_paths
from seater_dist.tree.item_tree import ItemTree


def random_balanced_tree(num_items: int, k: int, seed: int | None = 0) -> ItemTree:
    """A balanced tree (docs/method.md §1 sizes) with items assigned to leaves in a random order (seeded)."""
    rng = np.random.default_rng(seed)
    paths = balanced_paths(num_items, k)
    shuffled = np.empty_like(paths)
    shuffled[rng.permutation(num_items)] = paths
    return ItemTree.from_paths(shuffled, k, manifest={"balanced": True, "kind": "random-toy"})
