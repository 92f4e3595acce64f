"""The part of a checkpoint each serving replica holds, and what it computes. Plain PyTorch, numpy and faiss:
no Ray here, so the sharded search runs (and is tested) in one process (:class:`ShardedSeater`).

SEATER
* :class:`SeaterEncoderPart` - raw ids -> item indices (unknown ids ignored), the encoder (Eq. 2) once per
  request, the popular items for histories with no known item. Keeps the token table's item/BOS/PAD rows,
  the encoder layers and the raw-id index; the decoder, the internal-node rows and the tree are dropped.
* :class:`BeamShardPart` - shard s of S owns a contiguous group of the root's children (``shard_roots``)
  and holds only the token rows of its subtrees (items and internal nodes), BOS, PAD and the root's k
  children (for the step-1 softmax, whose normaliser runs over all of them), plus the decoder. Its
  ``search`` is the constrained beam search of docs/method.md §5 restricted to its subtrees, returning
  every level's expanded nodes (``merge.ShardBeams``); ``expand`` scores the children of given nodes
  (teacher-forced), for the merge's rare second round trip.

SASRec
* :class:`SasrecEncoderPart` - raw ids -> the user state (SASRec.user_state).
* :class:`IndexShardPart` - shard s of S owns a contiguous range of items: a faiss index over their rows
  (``flat``: exact IndexFlatIP; ``hnsw``: IndexHNSWFlat, inner product, ``M`` links per node,
  ``ef_construction`` at build time and ``ef_search`` candidates per query; built with every core, then
  queried with the replica's threads; optionally cached on disk, since HNSW over millions of items takes
  minutes to build).

Popular items (a history with no known item): the training counts of the dataset the checkpoint was
trained on when we can find it (``popularity=`` a dataset directory or its items.parquet; otherwise
``<checkpoint>/../../dataset/items.parquet``, the layout ``seater run`` writes, used only when its item ids
are exactly the checkpoint's), else the model's own answer to an empty history. ``popularity_source`` says
which.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from seater_dist import artifacts
from seater_dist.data.samples import left_pad
from seater_dist.model.beam_search import search_levels
from seater_dist.model.checkpoint import Checkpoint, CheckpointError, catalogue_id, load_checkpoint
from seater_dist.model.layers import eval_mode
from seater_dist.model.retriever import ItemIdIndex
from seater_dist.model.sasrec import topk_inner_product
from seater_dist.model.seater import SeaterModel
from seater_dist.serve.merge import BeamMerge, EncodeResult, Expansion, ShardBeams
from seater_dist.tree.item_tree import ItemTree

log = logging.getLogger(__name__)

_TREE_ARRAYS = ("codes", "children", "parent", "level")


# ------------------------------------------------------------------------------------------ checkpoints


def tree_checksum(manifest: dict[str, Any]) -> str | None:
    """A short id of the tree's shape (sha256 over the checksums of its four arrays); None for SASRec."""
    sums = manifest.get("checksums", {})
    if manifest.get("model") != "seater":
        return None
    joined = "\n".join(sums.get(f"tree/{name}.npy", "") for name in _TREE_ARRAYS)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def choose_device(gpu: bool | None) -> torch.device:
    """cuda when asked (or, with None, when this process sees a GPU), else cpu."""
    use = torch.cuda.is_available() if gpu is None else (gpu and torch.cuda.is_available())
    return torch.device("cuda" if use else "cpu")


# ------------------------------------------------------------------------------------------ popularity


def find_popularity(checkpoint: Path, manifest: dict[str, Any], explicit: str | os.PathLike | None) -> Path | None:
    """The items.parquet (item_id, count) to rank popular items by, or None (use the model's answer).

    ``explicit``: a dataset directory or its items.parquet (an error if it has no counts). Otherwise the
    dataset ``seater run`` leaves beside the checkpoint (RUN/seater/best -> RUN/dataset), used only when
    its item ids are exactly the checkpoint's catalogue.
    """
    if explicit:
        path = artifacts.local_copy(explicit)
        path = path / "items.parquet" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: popularity file not found (a dataset directory or its items.parquet)")
        if "count" not in pq.read_schema(path).names:
            raise ValueError(f"{path}: has no 'count' column (expected a dataset's items.parquet)")
        return path
    candidate = (checkpoint.resolve().parents[1] / "dataset" / "items.parquet"
                 if len(checkpoint.resolve().parents) > 1 else None)
    if candidate is None or not candidate.is_file():
        return None
    try:
        table = pq.read_table(candidate, columns=["item_index", "item_id", "count"])
    except (pa.ArrowInvalid, OSError, KeyError):
        return None
    ids = table.column("item_id").to_numpy(zero_copy_only=False)[np.argsort(table.column("item_index").to_numpy())]
    return candidate if catalogue_id(ids) == manifest.get("catalogue") else None


def popular_items(path: Path | None, index: ItemIdIndex, n: int,
                  model_answer: Callable[[int], tuple[list[str], list[float]]]) -> tuple[list[str], list[float], str]:
    """(raw ids, scores, source): the n most counted items of ``path`` that the checkpoint knows (scores are
    the counts), else ``model_answer(n)`` (the model's answer to an empty history; scores are its own)."""
    if path is None:
        raw, scores = model_answer(n)
        return raw, scores, "model (answer to an empty history)"
    table = pq.read_table(path, columns=["item_id", "count"])
    counts = table.column("count").to_numpy().astype(np.float64)
    ids = table.column("item_id").to_numpy(zero_copy_only=False)
    order = np.argsort(-counts, kind="stable")
    raw: list[str] = []
    scores: list[float] = []
    for start in range(0, order.size, 4 * n):
        chunk = order[start : start + 4 * n]
        known = index.lookup([str(x) for x in ids[chunk]]) >= 0
        for i in chunk[known]:
            raw.append(str(ids[i]))
            scores.append(float(counts[i]))
        if len(raw) >= n:
            break
    return raw[:n], scores[:n], f"dataset counts ({path})"


# ------------------------------------------------------------------------------------------ SEATER encoder


class SeaterEncoderPart:
    """Raw-id histories -> encoder memories (docs/method.md §2, Eq. 2), once per request.

    ``beam_size`` overrides the checkpoint's beam (the most items a request may ask for). ``share_table``:
    read the item rows from the checkpoint's token table itself instead of a copy of them (the single layout,
    where a shard in the same process holds that table: one copy of 6.1M x 64 floats instead of two).
    """

    kind = "seater"

    def __init__(self, ckpt: Checkpoint, beam_size: int | None = None, popularity: str | None = None,
                 device: str | torch.device = "cpu", num_shards: int = 1, share_table: bool = False) -> None:
        if ckpt.kind != "seater":
            raise CheckpointError(f"{ckpt.path}: a {ckpt.kind} checkpoint, expected seater")
        model: SeaterModel = ckpt.model
        settings = ckpt.settings
        self.device = torch.device(device)
        self.beam = int(beam_size or settings.beam_size)
        self.history_len, self.pad, self.bos = settings.history_len, model.pad, model.bos
        self.depth = model.depth
        self.index = ItemIdIndex(ckpt.item_ids)
        self.version = ckpt.model_version

        def answer(n: int) -> tuple[list[str], list[float]]:
            history = torch.full((1, self.history_len), model.pad, dtype=torch.long)
            items, scores = model.beam_search(history, max(self.beam, n), n)
            keep = items[0] >= 0
            return self.index.raw(items[0][keep].numpy()).tolist(), scores[0][keep].tolist()

        source = find_popularity(ckpt.path, ckpt.manifest, popularity)
        self.popular, self.popular_scores, self.popularity_source = popular_items(source, self.index, self.beam, answer)
        self.info = {
            "model": "seater", "model_version": self.version, "tree_checksum": tree_checksum(ckpt.manifest),
            "num_items": ckpt.num_items, "k": ckpt.tree.k, "depth": ckpt.tree.depth, "beam_size": self.beam,
            "max_top_n": self.beam, "history_len": self.history_len, "shards": num_shards,
            "popularity": self.popularity_source, "checkpoint": str(ckpt.path),
        }
        # Keep only what encode() reads: the item/BOS/PAD rows, positions, encoder layers.
        n_rows = model.num_items + 2
        rows = model.tok_emb.weight.detach()[:n_rows]
        model.tok_emb = torch.nn.Embedding.from_pretrained(rows if share_table else rows.clone(), freeze=True)
        model.decoder = torch.nn.ModuleList()
        for name in ("child_table", "item_codes", "token_parent", "token_level"):
            setattr(model, name, torch.zeros(0, dtype=torch.long))
        self.model = model.to(self.device).eval()

    def lookup(self, histories: Sequence[Sequence[str]]) -> tuple[list[np.ndarray], list[list[str]]]:
        """Raw ids -> (known item indices of each history, oldest first; unknown raw ids of each history)."""
        return lookup_histories(self.index, histories)

    def encode(self, histories: Sequence[Sequence[str]]) -> list[EncodeResult]:
        known, ignored = self.lookup(histories)
        out = [EncodeResult(self.version, None, None, ign, (self.popular, self.popular_scores)) for ign in ignored]
        rows = [i for i, k in enumerate(known) if k.size]
        if rows:
            batch = torch.from_numpy(left_pad([known[i] for i in rows], self.history_len, self.pad))
            with eval_mode(self.model):
                memory, pad_mask = self.model.encode(batch.to(self.device))
            memory, pad_mask = memory.float().cpu().numpy(), pad_mask.cpu().numpy()
            for j, i in enumerate(rows):
                out[i] = EncodeResult(self.version, memory[j], pad_mask[j], ignored[i])
        return out


def lookup_histories(index: ItemIdIndex, histories: Sequence[Sequence[str]]
                     ) -> tuple[list[np.ndarray], list[list[str]]]:
    """Raw ids -> (known item indices of each history, oldest first; unknown raw ids of each history)."""
    known, ignored = [], []
    for history in histories:
        raw = [str(h) for h in history]
        idx = index.lookup(raw)
        known.append(idx[idx >= 0])
        ignored.append([r for r, i in zip(raw, idx) if i < 0])
    return known, ignored


# ------------------------------------------------------------------------------------------ SEATER shards


def _tensor(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on ``device`` from an array that may be read-only (Ray hands out read-only arrays)."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return torch.from_numpy(np.array(x, copy=True)).to(device)


def root_children(tree: ItemTree) -> np.ndarray:
    """The root's (BOS's) children, in the tree's order. int64 [<= k]"""
    row = tree.children[0]
    return row[row >= 0].astype(np.int64)


def shard_roots(num_roots: int, num_shards: int) -> list[np.ndarray]:
    """Positions among the root's children owned by each shard: contiguous groups whose sizes differ by at
    most one (the tree is balanced, so the shards' item counts do too)."""
    if not 1 <= num_shards <= num_roots:
        raise ValueError(f"shards must be in 1..{num_roots} (the root has {num_roots} children), got {num_shards}")
    return [np.asarray(p, dtype=np.int64) for p in np.array_split(np.arange(num_roots), num_shards)]


def shard_tree(tree: ItemTree, own_roots: np.ndarray) -> tuple[ItemTree, np.ndarray]:
    """The tree a shard searches, renumbered locally -> (local tree, global token of each local token).

    Local tokens, in global order (so the ItemTree layout holds: items, then BOS, PAD, then internal nodes):
    the items under ``own_roots``, BOS, PAD, all of the root's children (the step-1 softmax runs over them)
    and the internal nodes under ``own_roots``. A root child of another shard has no children here.
    """
    n_all, depth = tree.num_items, tree.depth
    roots = root_children(tree)
    own_roots = np.asarray(own_roots, dtype=np.int64)
    if depth == 1:
        items, internal = roots, np.zeros(0, dtype=np.int64)  # the root's children are the items
    else:
        mine = np.isin(tree.codes[:, 0], own_roots)
        items = np.flatnonzero(mine).astype(np.int64)
        internal = np.union1d(roots, np.unique(tree.codes[mine, :-1])).astype(np.int64)
    global_of = np.concatenate([items, np.array([n_all, n_all + 1], dtype=np.int64), internal])
    n = items.size

    def local(g: np.ndarray) -> np.ndarray:
        g = np.asarray(g, dtype=np.int64)
        pos = np.searchsorted(global_of, g).clip(max=global_of.size - 1)
        return np.where((g >= 0) & (global_of[pos] == g), pos, -1)

    children = local(tree.children[global_of[n:] - n_all])
    parent = tree.parent[global_of]
    parent = np.where(parent >= 0, local(parent), -1)
    codes = local(tree.codes[items]) if depth > 1 else np.arange(n, dtype=np.int64)[:, None]
    local_tree = ItemTree(n, tree.k, depth, codes.astype(np.int32), children.astype(np.int32),
                          parent.astype(np.int32), tree.level[global_of].astype(np.int32),
                          manifest={"kind": "shard", "balanced": False})
    return local_tree, global_of


class BeamShardPart:
    """Shard ``shard`` of ``num_shards``: constrained beam search inside its subtrees (docs/method.md §5)."""

    def __init__(self, ckpt: Checkpoint, shard: int, num_shards: int, device: str | torch.device = "cpu") -> None:
        if ckpt.kind != "seater":
            raise CheckpointError(f"{ckpt.path}: a {ckpt.kind} checkpoint, expected seater")
        tree = ckpt.tree
        roots = root_children(tree)
        groups = shard_roots(roots.size, num_shards)
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in 0..{num_shards - 1}, got {shard}")
        self.shard, self.num_shards = shard, num_shards
        self.version = ckpt.model_version
        self.device = torch.device(device)
        self.own_cols = torch.from_numpy(groups[shard])
        local_tree, self.global_of = shard_tree(tree, roots[groups[shard]])
        self.num_local_items = local_tree.num_items
        self.parent_local = local_tree.parent.astype(np.int64)
        self.global_pad, self.depth = tree.pad, tree.depth
        self.raw = pa.array(np.asarray(ckpt.item_ids, dtype=object)[self.global_of[: self.num_local_items]],
                            type=pa.string())
        state = dict(ckpt.model.state_dict())
        if self.global_of.size < state["tok_emb.weight"].shape[0]:  # one shard: every row, no copy
            state["tok_emb.weight"] = state["tok_emb.weight"][torch.from_numpy(self.global_of)]  # a copy of ours
        with torch.device("meta"):
            model = SeaterModel(local_tree, ckpt.settings, trainable=False)
        model.load_state_dict(state, assign=True)
        self.model = model.to(self.device).eval()
        self.rows = int(self.global_of.size)

    # -------------------------------------------------------------- helpers
    def _to_global(self, local: torch.Tensor) -> np.ndarray:
        """Local tokens -> global ones; local PAD (no child) -> -1."""
        arr = local.cpu().numpy()
        out = self.global_of[np.clip(arr, 0, None)]
        return np.where(arr == self.model.pad, -1, out)

    def _leaf_raw(self, children_local: np.ndarray) -> dict[int, str]:
        """Raw ids of the items among local tokens (any shape)."""
        flat = children_local.ravel()
        items = np.unique(flat[(flat >= 0) & (flat < self.num_local_items)])
        if items.size == 0:
            return {}
        raw = self.raw.take(pa.array(items)).to_pylist()
        return dict(zip(self.global_of[items].tolist(), raw))

    # -------------------------------------------------------------- the search
    def search(self, memory: np.ndarray | torch.Tensor, pad_mask: np.ndarray | torch.Tensor,
               beam: int) -> list[ShardBeams]:
        """Encoder memories [B, t, d] (with pad masks [B, t]) -> each user's expanded nodes per level.

        The beam search of docs/method.md §5 with beam ``beam``, starting from this shard's root children,
        scored with the softmax over all of the root's children at step 1.
        """
        m = self.model
        memory, pad_mask = _tensor(memory, self.device), _tensor(pad_mask, self.device)
        B = memory.shape[0]
        levels: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with eval_mode(m):
            search_levels(m, memory, pad_mask, beam, first_columns=self.own_cols,
                          on_level=lambda *level: levels.append(level))
        out = [ShardBeams([], [], []) for _ in range(B)]
        for step, (parents, children, cumulative) in enumerate(levels):
            par_local = parents.cpu().numpy()
            par, kids = self._to_global(parents), self._to_global(children)
            ch_local, sc = children.cpu().numpy(), cumulative.float().cpu().numpy()
            for b in range(B):
                alive = par_local[b] != m.pad
                out[b].parents.append(par[b][alive])
                out[b].children.append(kids[b][alive])
                out[b].scores.append(sc[b][alive])
                if step == m.depth - 1:
                    out[b].leaf_raw = self._leaf_raw(np.where(sc[b][alive] > -np.inf, ch_local[b][alive], -1))
        return out

    def expand(self, memory: np.ndarray | torch.Tensor, pad_mask: np.ndarray | torch.Tensor, level: int,
               tokens: np.ndarray) -> Expansion:
        """Children log-probabilities of nodes (global tokens) at level ``level``-1 >= 1 of this shard, for
        one user (memory [t, d] or [1, t, d]): the decoder teacher-forced along each node's path."""
        m = self.model
        tokens = np.asarray(tokens, dtype=np.int64)
        pos = np.searchsorted(self.global_of, tokens).clip(max=self.global_of.size - 1)
        if not np.array_equal(self.global_of[pos], tokens) or not 2 <= level <= self.depth:
            raise ValueError(f"shard {self.shard}: cannot expand tokens {tokens.tolist()} at level {level}")
        paths = np.empty((tokens.size, level), dtype=np.int64)
        paths[:, 0] = m.bos
        node = pos
        for col in range(level - 1, 0, -1):  # [BOS, a_1, ..., a_{level-1}]
            paths[:, col] = node
            node = self.parent_local[node]
        memory = _tensor(memory, self.device).reshape(1, -1, memory.shape[-1])
        pad_mask = _tensor(pad_mask, self.device).reshape(1, -1)
        with eval_mode(m):
            inputs = torch.from_numpy(paths).to(self.device)[None]  # [1, M, level]
            states = m.decode(inputs, m.memory_kv(memory), pad_mask)[:, :, -1]  # [1, M, d]
            log_probs, children = m.constrained_log_probs(states, torch.from_numpy(pos).to(self.device)[None])
        ch_local = children[0].cpu().numpy()
        leaf = self._leaf_raw(ch_local) if level == self.depth else {}
        return Expansion(tokens, self._to_global(children[0]), log_probs[0].float().cpu().numpy(), leaf)


# ------------------------------------------------------------------------------------------ SASRec


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


# ------------------------------------------------------------------------------------------ in one process


def sharded_beam_search(shards: Sequence[BeamShardPart], memory: np.ndarray, pad_mask: np.ndarray, beam: int,
                        top_n: int) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """One user's sharded search in this process: every shard searches, :class:`BeamMerge` replays the global
    beam, asking shards for missing expansions. -> (item ids, scores, raw ids, nodes expanded on request)."""
    first = shards[0]
    answers = [s.search(memory[None], pad_mask[None], beam)[0] for s in shards]
    merge = BeamMerge(answers, depth=first.depth, beam=beam, bos=int(first.global_of[first.num_local_items]))
    while (need := merge.missing()) is not None:
        level, by_shard = need
        for s, tokens in by_shard.items():
            merge.add_expansion(level, s, shards[s].expand(memory, pad_mask, level, tokens))
    items, scores, raw = merge.top(top_n)
    return items, scores, raw, merge.expansions


class ShardedSeater:
    """The serving path of a SEATER checkpoint in one process (encoder part, S shard parts, the merge): what
    the Serve deployments compute, without Ray. ``recommend`` answers like ``SeaterRetriever.recommend``."""

    def __init__(self, checkpoint: str | os.PathLike | Checkpoint, num_shards: int = 1, beam_size: int | None = None,
                 popularity: str | None = None) -> None:
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.shards = [BeamShardPart(ckpt, s, num_shards) for s in range(num_shards)]
        self.encoder = SeaterEncoderPart(ckpt, beam_size=beam_size, popularity=popularity, num_shards=num_shards)
        self.beam = self.encoder.beam
        self.expansions = 0

    def recommend(self, histories: Sequence[Sequence[str]], top_n: int = 50) -> list[dict[str, Any]]:
        if not 1 <= top_n <= self.beam:
            raise ValueError(f"top_n must be in 1..{self.beam} (beam_size), got {top_n}")
        results = []
        for enc in self.encoder.encode(histories):
            if enc.state is None:
                raw, scores = enc.fallback
                results.append({"items": raw[:top_n], "scores": scores[:top_n], "ignored": enc.ignored,
                                "fallback": "popular"})
                continue
            _, scores, raw, expanded = sharded_beam_search(self.shards, enc.state, enc.pad_mask, self.beam, top_n)
            self.expansions += expanded
            results.append({"items": raw, "scores": scores.astype(float).tolist(), "ignored": enc.ignored})
        return results
