"""The balanced k-ary item tree (docs/method.md §1): ItemTree and its builder.

    from seater_dist.tree import ItemTree, TreeError, depth_for, build_tree

Modules, from the bottom up: ``item_tree`` (the tree, its checks and files), ``balance`` (the balanced
split rule by rank), ``assignment`` (balanced assignment on a cost matrix), ``lloyd`` (balanced k-means),
``reference`` (k-means-constrained, our yardstick), ``quality`` (per-level figures), ``ablation``
(unbalanced and random trees), ``executor`` (tasks on Ray or in-process), ``builder`` (``build_tree``).
``build_tree`` is imported on first use, so importing ItemTree does not load the solvers.
"""

from __future__ import annotations

import importlib
from typing import Any

from seater_dist.tree.item_tree import ItemTree, TreeError, depth_for

__all__ = ["ItemTree", "TreeError", "build_tree", "depth_for"]


def __getattr__(name: str) -> Any:
    if name == "build_tree":
        return importlib.import_module("seater_dist.tree.builder").build_tree
    raise AttributeError(f"module 'seater_dist.tree' has no attribute {name!r}")
