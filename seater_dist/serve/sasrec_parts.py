"""The SASRec parts of a checkpoint each serving replica holds (docs/method.md §6). Plain PyTorch, numpy and
faiss: no Ray here.

* :class:`SasrecEncoderPart` - raw ids -> the user state (SASRec.user_state), or the popular items (lookup.py).
* :class:`IndexShardPart` - shard s of S owns a contiguous range of items: a faiss index over their rows
  (``flat``: exact IndexFlatIP; ``hnsw``: IndexHNSWFlat, inner product, ``M`` links per node,
  ``ef_construction`` at build time and ``ef_search`` candidates per query; built with every core, then
  queried with the replica's threads; optionally cached on disk, since HNSW over millions of items takes
  minutes to build). The router merges the shards' answers with ``merge.merge_top``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from seater_dist.data.samples import left_pad
from seater_dist.model.checkpoint import Checkpoint, CheckpointError
from seater_dist.model.layers import eval_mode
from seater_dist.model.retriever import ItemIdIndex
from seater_dist.model.sasrec import topk_inner_product
from seater_dist.serve.lookup import find_popularity, lookup_histories, popular_items
from seater_dist.serve.merge import EncodeResult

log = logging.getLogger(__name__)


class SasrecEncoderPart:
    """Raw-id histories -> SASRec user states (docs/method.md §6). ``max_top_n`` bounds top_n (default 50)."""

    kind = "sasrec"

    def __init__(self, ckpt: Checkpoint, max_top_n: int | None = None, popularity: str | None = None,
                 device: str | torch.device = "cpu", num_shards: int = 1, index: str = "flat") -> None:
        if ckpt.kind != "sasrec":
            raise CheckpointError(f"{ckpt.path}: a {ckpt.kind} checkpoint, expected sasrec")
        self.device = torch.device(device)
        self.model = ckpt.model.to(self.device).eval()
        self.max_len, self.pad = ckpt.settings.max_len, ckpt.num_items
        self.max_top_n = int(max_top_n or 50)
        self.index = ItemIdIndex(ckpt.item_ids)
        self.version = ckpt.model_version

        def answer(n: int) -> tuple[list[str], list[float]]:
            state = self._states([np.zeros(0, dtype=np.int64)])
            ids, scores = topk_inner_product(state, ckpt.item_table, n)
            keep = ids[0] >= 0
            return self.index.raw(ids[0][keep]).tolist(), scores[0][keep].astype(float).tolist()

        source = find_popularity(ckpt.path, ckpt.manifest, popularity)
        self.popular, self.popular_scores, self.popularity_source = popular_items(
            source, self.index, self.max_top_n, answer)
        self.info = {
            "model": "sasrec", "model_version": self.version, "tree_checksum": None, "num_items": ckpt.num_items,
            "max_top_n": self.max_top_n, "history_len": self.max_len, "shards": num_shards, "index": index,
            "popularity": self.popularity_source, "checkpoint": str(ckpt.path),
        }

    def _states(self, known: list[np.ndarray]) -> np.ndarray:
        batch = torch.from_numpy(left_pad(known, self.max_len, self.pad)).to(self.device)
        with eval_mode(self.model):
            return self.model.user_state(batch).float().cpu().numpy()

    def encode(self, histories: Sequence[Sequence[str]]) -> list[EncodeResult]:
        known, ignored = lookup_histories(self.index, histories)
        out = [EncodeResult(self.version, None, None, ign, (self.popular, self.popular_scores)) for ign in ignored]
        rows = [i for i, k in enumerate(known) if k.size]
        if rows:
            states = self._states([known[i] for i in rows])
            for j, i in enumerate(rows):
                out[i] = EncodeResult(self.version, states[j], None, ignored[i])
        return out


class IndexShardPart:
    """Shard ``shard`` of ``num_shards`` of the SASRec item table: a faiss index over a contiguous item range.

    index ``flat``: exact inner product (IndexFlatIP). ``hnsw``: IndexHNSWFlat with inner product, ``hnsw_m``
    links per node, ``ef_construction`` when building and ``ef_search`` candidates per query (recall rises
    and speed falls with it; top_n larger than ef_search searches top_n candidates).
    """

    def __init__(self, ckpt: Checkpoint, shard: int, num_shards: int, index: str = "flat", hnsw_m: int = 16,
                 ef_construction: int = 40, ef_search: int = 128, threads: int = 1,
                 cache_dir: str | os.PathLike | None = None, build_threads: int | None = None) -> None:
        import faiss

        if ckpt.kind != "sasrec":
            raise CheckpointError(f"{ckpt.path}: a {ckpt.kind} checkpoint, expected sasrec")
        if not 1 <= num_shards <= ckpt.num_items or not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} of {num_shards} over {ckpt.num_items} items")
        if index not in ("flat", "hnsw"):
            raise ValueError(f"index must be 'flat' or 'hnsw', got {index!r}")
        self.version = ckpt.model_version
        self.items = np.array_split(np.arange(ckpt.num_items, dtype=np.int64), num_shards)[shard]
        lo, hi = (int(self.items[0]), int(self.items[-1]) + 1) if self.items.size else (0, 0)
        table = np.ascontiguousarray(ckpt.item_table[lo:hi], dtype=np.float32)  # a view when already float32
        d = table.shape[1]
        cached = None
        if index == "hnsw" and cache_dir:
            cached = Path(cache_dir) / f"{self.version}-{shard}of{num_shards}-hnsw-m{hnsw_m}-efc{ef_construction}.faiss"
        if cached is not None and cached.is_file():
            self.index = faiss.read_index(str(cached))
            if self.index.ntotal != hi - lo or self.index.d != d:
                raise ValueError(f"{cached}: holds {self.index.ntotal} x {self.index.d}, expected {hi - lo} x {d}")
        else:
            if index == "flat":
                self.index = faiss.IndexFlatIP(d)
            else:
                self.index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                self.index.hnsw.efConstruction = ef_construction
            faiss.omp_set_num_threads(build_threads or os.cpu_count() or 1)  # building: every core
            t0 = time.perf_counter()
            self.index.add(table)
            log.info("faiss %s index over %d items built in %.1f s", index, hi - lo, time.perf_counter() - t0)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
                faiss.write_index(self.index, str(tmp))
                os.replace(tmp, cached)
        faiss.omp_set_num_threads(threads)  # serving: the replica's share
        if index == "hnsw":
            self.index.hnsw.efSearch = ef_search
        self.raw = pa.array(np.asarray(ckpt.item_ids, dtype=object)[lo:hi], type=pa.string())

    def search(self, states: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
        """User states [B, d] -> per user (global item ids, scores, raw ids), best first, at most n."""
        scores, local = self.index.search(np.ascontiguousarray(states, dtype=np.float32).reshape(-1, self.index.d), n)
        out = []
        for row_ids, row_scores in zip(local, scores):
            keep = row_ids >= 0
            ids = row_ids[keep]
            out.append((self.items[ids], row_scores[keep].astype(np.float32), self.raw.take(pa.array(ids)).to_pylist()))
        return out

