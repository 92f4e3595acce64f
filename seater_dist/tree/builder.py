"""Build the item tree of docs/method.md §1 top-down, one level at a time, on Ray tasks or in-process.

    >>> tree = build_tree(embeddings, TreeSettings(k=16))   # float32 [N, d], may be a np.memmap
    >>> tree.save("runs/microvideo/tree")

Every item carries its current node; a level splits every node of n > k items into k groups of
sizes floor(n/k) or floor(n/k)+1 (a node of n <= k items gives each item its own child), and the
branch taken becomes the item's path entry at that level. ``ItemTree.from_paths`` numbers the tokens.
Recursing by depth (not "while a group exceeds k") gives every item exactly D = ceil(log_k N) tokens:
a node that must hold n <= k^h items in h more levels splits into groups of at most
ceil(n/k) <= k^(h-1) items, which fit in h-1 levels.

How a node is split (``executor``):

* ``n > settings.large_node``: alone, faiss k-means centroids then balanced Lloyd iterations with an
  approximate (Sinkhorn-priced, greedily repaired) assignment (``lloyd.split_large``); the root of
  millions of items is one such task with every CPU.
* ``n <= settings.exact_threshold``: the reference solver k-means-constrained, one node at a time
  (off by default: the same problem as below, solved more slowly).
* otherwise: our exact constrained k-means (``lloyd.split_batch``: the optimal balanced assignment by
  one min-cost flow per node, restarted from random items); the nodes of a level (their sizes differ
  by at most one) are stacked into padded arrays so that distances and centroids are batched, and
  packed into tasks of ``task_items`` items.

The ablations (``settings.kind`` unbalanced or random) are built by ``ablation``; the per-level
quality figures of the manifest come from ``quality``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

import numpy as np

from seater_dist import artifacts
from seater_dist.config import TreeSettings
from seater_dist.files import load_npy
from seater_dist.tree.ablation import random_paths, unbalanced_paths
from seater_dist.tree.balance import group_nodes, group_of_rank
from seater_dist.tree.executor import Runner, batched_nodes
from seater_dist.tree.item_tree import ItemTree, TreeError, depth_for
from seater_dist.tree.quality import attach_reference_check, level_record, submit_reference_check

log = logging.getLogger("seater_dist.tree")

_CHECK_ROWS = 1 << 18  # rows per chunk when checking / hashing a (possibly memory-mapped) input


def build_tree(embeddings: np.ndarray, settings: TreeSettings | None = None, *,
               use_ray: bool | None = None) -> ItemTree:
    """The k-ary item tree of ``embeddings`` (float32 [N, d], may be a np.memmap), k = ``settings.k``.

    settings.kind: ``balanced`` (SEATER), ``unbalanced`` or ``random`` (the paper's ablations).
    use_ray: None uses Ray when it is initialised; True requires it; False runs in this process.
    The manifest records N, k, D, settings, timings, per-level quality figures, the embeddings'
    sha256 (of their float32 C-order bytes) and ``balanced``.
    """
    settings = settings or TreeSettings()
    k = settings.k
    t0 = time.time()
    emb = _check_embeddings(embeddings)
    checksum = embeddings_sha256(emb)
    n, d = emb.shape
    runner = Runner(emb, use_ray)
    log.info("building a %s tree over %s items (d=%d, k=%d) %s", settings.kind, f"{n:,}", d, k,
             "on Ray" if runner.ray else "in-process")
    if settings.kind == "random":
        paths, levels = random_paths(emb, k, settings.seed)
    elif settings.kind == "balanced":
        paths, levels = _balanced_paths(runner, n, k, settings)
    else:
        paths, levels = unbalanced_paths(runner, n, k, settings)
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


def _balanced_paths(runner: Runner, n: int, k: int, s: TreeSettings) -> tuple[np.ndarray, list[dict]]:
    """Branch indices int16 [N, D-1] of the balanced tree, and one record per split level."""
    depth = depth_for(n, k)
    paths = np.zeros((n, depth - 1), dtype=np.int16)
    node = np.zeros(n, dtype=np.int64)
    levels, checks = [], []
    for lvl in range(depth - 1):
        t = time.time()
        order, starts, sizes = group_nodes(node)
        rank = np.arange(n) - np.repeat(starts[:-1], sizes)
        branch = np.empty(n, dtype=np.int16)
        branch[order] = group_of_rank(rank, np.repeat(sizes, sizes), k)  # right for nodes of <= k items
        units, results, stats = runner.split_level(order, starts, sizes, k, s, "balanced", lvl, branch)
        # The quality check runs beside the next levels (on Ray it fills CPUs a single big node leaves idle).
        checks.append(submit_reference_check(runner, batched_nodes(units, results), k, s, lvl))
        paths[:, lvl] = branch
        node = node * k + branch
        rec = level_record(lvl, depth, sizes, k, stats, time.time() - t, len(units))
        levels.append(rec)
        log.info("built level %d/%d: %s nodes in %.1f s (objective %.3fx unconstrained k-means)", lvl + 1,
                 depth - 1, f"{sizes.size:,}", rec["seconds"], rec.get("ratio_vs_unconstrained") or float("nan"))
    for rec, check in zip(levels, checks):
        attach_reference_check(rec, runner, *check)
    return paths, levels


# -------------------------------------------------------------------------------------------- input
def load_embeddings(path: str | os.PathLike) -> np.ndarray:
    """The item embeddings of a ``.npy`` file (local or URI), memory-mapped (never unpickled); TreeError
    naming the file."""
    path = artifacts.local_copy(path, TreeError)
    if path.is_dir():
        raise TreeError(f"{path}: a directory; --embeddings takes the .npy file of item embeddings "
                        f"(e.g. {path / 'item_embeddings.npy'}, written by `seater embed`)")
    if not path.is_file():
        raise TreeError(f"{path}: embeddings file not found" if not path.exists() else
                        f"{path}: not a regular file (a .npy file of item embeddings is expected)")
    if path.stat().st_size == 0:
        raise TreeError(f"{path}: empty file (0 bytes); expected a .npy array of item embeddings [N, d]")
    return load_npy(path, TreeError, "a .npy array of item embeddings [N, d] (`seater embed` writes one)", mmap=True)


def _check_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """float32 C-contiguous [N, d] view of the input (no copy for a float32 memmap); finite values."""
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise TreeError(f"embeddings must be a non-empty 2-D array [N, d], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TreeError(f"embeddings must be floating point, got dtype {arr.dtype}")
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    varies = arr.shape[0] == 1
    for start in range(0, arr.shape[0], _CHECK_ROWS):
        chunk = arr[start : start + _CHECK_ROWS]
        ok = np.isfinite(chunk).all(1)
        if not ok.all():
            row = start + int(np.flatnonzero(~ok)[0])
            raise TreeError(f"embeddings row {row} has a NaN or infinite value")
        varies = varies or bool((chunk != arr[0]).any())
    if not varies:
        raise TreeError(f"embeddings: all {arr.shape[0]:,} rows are identical, so no tree can tell the items apart; "
                        "use trained item embeddings (`seater embed` writes them)")
    return arr


def embeddings_sha256(arr: np.ndarray) -> str:
    """sha256 of float32 [N, d] rows in C order, read in chunks (a memmap is never loaded whole)."""
    h = hashlib.sha256()
    for start in range(0, arr.shape[0], _CHECK_ROWS):
        h.update(np.ascontiguousarray(arr[start : start + _CHECK_ROWS]).tobytes())
    return h.hexdigest()
