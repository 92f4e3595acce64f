"""seater-dist: SEATER generative retrieval (Si et al.) on Ray.

    from seater_dist import build_tree, ItemTree, SeaterRetriever

Heavy modules (torch, ray, faiss) are imported on first use, so `seater --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ItemTree": "seater_dist.tree.item_tree",
    "build_tree": "seater_dist.tree.builder",
    "SeaterRetriever": "seater_dist.model.retriever",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'seater_dist' has no attribute {name!r}")
