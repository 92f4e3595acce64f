"""Synthetic inputs shared by the benchmarks, and by the tests that need one: random balanced trees (no
embeddings), skewed clustered item embeddings, random-weight checkpoints over N items, and a dataset of
synthetic users over the same catalogue. Speed does not depend on the weights, so nothing is trained.

    tree = random_balanced_tree(10, k=3, seed=0)                # tree.depth == 3, tree.codes.shape == (10, 3)
    emb = skewed_clustered_embeddings(20_000, 64, seed=0)      # float32 [20000, 64]
    ids = item_ids(6_100_000)                                   # "item-0" ... "item-6099999"
    work = checkpoint_dir(Path("/tmp/seater-bench"), 6_100_000, k=16, beam=50, seed=0)
    seater = seater_checkpoint(work / "seater", ids, k=16, beam=50, seed=0)   # built once, then reused
    dataset = loo_dataset(Path("/tmp/seater-bench/eval-N6100000-U100000-s0"), 6_100_000, 100_000, seed=0)

Both the checkpoints and the dataset name item i ``item-i``, so a dataset and a checkpoint of the same N
share one catalogue (evaluate refuses anything else).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from seater_dist.tree.balance import balanced_paths
from seater_dist.tree.item_tree import ItemTree

_CHUNK = 1 << 20  # embedding rows generated per step; fixed so that the output does not depend on memory


def _print(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------ trees and embeddings
# The tree stage builds real trees from item embeddings (seater_dist.tree); the model only needs a valid balanced
# shape, so the tests and bench_beam use random_balanced_tree. Isotropic Gaussian noise hides what a balanced
# clustering costs (plain k-means already splits it into near-equal groups), so the tree builders are measured on
# a hierarchical Gaussian mixture whose cluster weights follow Zipf laws at every level: a few huge topics, many
# small ones, sub-topics inside topics, and so on.


def random_balanced_tree(num_items: int, k: int, seed: int | None = 0) -> ItemTree:
    """A balanced tree (docs/method.md §1 sizes) with items assigned to leaves in a random order (seeded)."""
    rng = np.random.default_rng(seed)
    paths = balanced_paths(num_items, k)
    shuffled = np.empty_like(paths)
    shuffled[rng.permutation(num_items)] = paths
    return ItemTree.from_paths(shuffled, k, manifest={"balanced": True, "kind": "random-toy"})


def mixture_centers(
    d: int, seed: int, fanout: tuple[int, ...] = (24, 16, 12), spread: tuple[float, ...] = (4.0, 1.6, 0.6),
    zipf: float = 1.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Leaf centres and weights of a hierarchical mixture.

    Returns centers float32 [L, d] and weights float64 [L] (sum 1), L = prod(fanout). Each level's
    children sit around their parent with standard deviation ``spread[level]`` per dimension, and get
    Zipf(``zipf``) weights in a random order.
    """
    rng = np.random.default_rng(seed)
    centers, weights = np.zeros((1, d)), np.ones(1)
    for f, s in zip(fanout, spread):
        child = centers[:, None, :] + rng.normal(0.0, s, size=(centers.shape[0], f, d))
        w = 1.0 / np.arange(1, f + 1) ** zipf
        w = np.stack([rng.permutation(w / w.sum()) for _ in range(centers.shape[0])])
        centers, weights = child.reshape(-1, d), (weights[:, None] * w).reshape(-1)
    return centers.astype(np.float32), weights / weights.sum()


def skewed_clustered_embeddings(n: int, d: int = 64, seed: int = 0, out: np.ndarray | None = None,
                                noise: float = 0.25) -> np.ndarray:
    """float32 [n, d] embeddings drawn from :func:`mixture_centers`, identical for the same (n, d, seed).

    ``out``: an array (e.g. ``np.lib.format.open_memmap``) of shape [n, d] to fill in place, so that
    millions of rows never sit in memory twice.
    """
    centers, weights = mixture_centers(d, seed)
    out = np.empty((n, d), dtype=np.float32) if out is None else out
    if out.shape != (n, d):
        raise ValueError(f"out has shape {out.shape}, expected ({n}, {d})")
    cdf = np.cumsum(weights)
    for c, start in enumerate(range(0, n, _CHUNK)):
        stop = min(n, start + _CHUNK)
        rng = np.random.default_rng([seed, c])
        leaf = np.minimum(np.searchsorted(cdf, rng.random(stop - start)), centers.shape[0] - 1)
        out[start:stop] = centers[leaf] + rng.normal(0.0, noise, size=(stop - start, d)).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------ checkpoints and datasets


def item_ids(items: int) -> np.ndarray:
    """Raw ids of N synthetic items: ``item-0`` ... ``item-{N-1}`` (object array of str)."""
    return np.array([f"item-{i}" for i in range(items)], dtype=object)


def checkpoint_dir(cache: Path, items: int, k: int, beam: int, seed: int) -> Path:
    """Where the synthetic checkpoints of one shape are cached (the name bench_serve has always used)."""
    return cache / f"serve-N{items}-k{k}-b{beam}-s{seed}"


def seater_checkpoint(path: Path, ids: np.ndarray, k: int, beam: int, seed: int,
                      log: Callable[[str], None] = _print) -> Path:
    """A SEATER checkpoint with random weights over a random balanced k-ary tree of ``len(ids)`` items,
    beam size ``beam``, other settings the defaults (d = 64, t = 20); reused when ``path`` holds one."""
    import torch

    from seater_dist.config import SeaterSettings
    from seater_dist.model.checkpoint import save_checkpoint
    from seater_dist.model.seater import SeaterModel

    if (path / "manifest.json").is_file():
        return path
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tree = random_balanced_tree(len(ids), k, seed=seed)
    settings = SeaterSettings(beam_size=beam)
    save_checkpoint(path, SeaterModel(tree, settings), settings, ids, tree=tree)
    log(f"SEATER checkpoint: {len(ids):,} items, k={k}, depth {tree.depth}, {tree.num_tokens:,} tokens "
        f"({time.perf_counter() - t0:.0f} s)")
    return path


def sasrec_checkpoint(path: Path, ids: np.ndarray, seed: int, log: Callable[[str], None] = _print) -> Path:
    """A SASRec checkpoint (d = 64) with random weights over ``len(ids)`` items; reused when present."""
    import torch

    from seater_dist.config import SasrecSettings
    from seater_dist.model.checkpoint import save_checkpoint
    from seater_dist.model.sasrec import SASRec

    if (path / "manifest.json").is_file():
        return path
    t0 = time.perf_counter()
    torch.manual_seed(seed + 1)
    settings = SasrecSettings()
    save_checkpoint(path, SASRec(len(ids), settings), settings, ids)
    log(f"SASRec checkpoint: {len(ids):,} items ({time.perf_counter() - t0:.0f} s)")
    return path


def loo_dataset(path: Path, items: int, users: int, seed: int, log: Callable[[str], None] = _print) -> Path:
    """A prepared leave-one-out dataset of ``users`` synthetic users that covers all ``items`` items
    (catalogue :func:`item_ids`), so every user is a test user; reused when ``path`` holds one.

    User u's sequence is L = max(3, ceil(N / U)) consecutive items of a seeded permutation of the catalogue
    (the permutation read cyclically from u·L); prepared by ``prepare_local`` (one process, no Ray).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.local_prepare import prepare_local
    from seater_dist.config import PrepareSettings
    from seater_dist.data.dataset import load_dataset

    if not (path / "manifest.json").is_file():
        t0 = time.perf_counter()
        length = max(3, math.ceil(items / users))
        order = np.random.default_rng(seed).permutation(items)
        item = order[(np.arange(users)[:, None] * length + np.arange(length)) % items].ravel()
        raw = path.parent / f"{path.name}-interactions.parquet"
        pq.write_table(pa.table({"user_id": np.repeat(np.arange(users), length).astype(str),
                                 "item_id": pa.array(item_ids(items)[item], pa.string()),
                                 "timestamp": np.tile(np.arange(length, dtype=np.int64), users)}), raw)
        prepare_local(PrepareSettings.build(input=str(raw), format="interactions", protocol="loo", out=str(path),
                                            min_user_count=3, min_item_count=1))
        raw.unlink()
        log(f"dataset: {users:,} users x {length} items over {items:,} items, loo ({time.perf_counter() - t0:.0f} s)")
    dataset = load_dataset(path)
    if dataset.num_items != items or dataset.item_ids[-1] != f"item-{items - 1}":
        raise SystemExit(f"{path}: holds {dataset.num_items:,} items, not the catalogue item-0..item-{items - 1}; "
                         "remove it to rebuild")
    return path
