"""Synthetic artifacts shared by the benchmarks: random-weight checkpoints over N items, and a dataset of
synthetic users over the same catalogue. Speed does not depend on the weights, so nothing is trained.

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


def _print(message: str) -> None:
    print(message, flush=True)


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
    from seater_dist.model.toy_trees import random_balanced_tree

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

    from seater_dist.config import PrepareSettings
    from seater_dist.data.dataset import load_dataset
    from seater_dist.data.prepare import prepare_local

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
