"""Top-K items for a batch of histories, from a SEATER or a SASRec model: the one place both training
(validation) and offline evaluation rank items, so that both measure exactly the same thing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from seater_dist.data.samples import left_pad


@torch.no_grad()
def seater_topk(model, history_len: int, pad: int, beam_size: int, histories: Sequence[Sequence[int]], top_k: int) -> np.ndarray:
    """Beam search (SEATER_SPEC §5). histories: U item-index sequences -> int64 [U, top_k] (-1 padded)."""
    hist = torch.from_numpy(left_pad(histories, history_len, pad))
    items, _ = model.beam_search(hist, beam_size=max(beam_size, top_k), top_n=top_k)
    return items.cpu().numpy()


@torch.no_grad()
def sasrec_topk(model, max_len: int, num_items: int, histories: Sequence[Sequence[int]], top_k: int,
                item_embeddings: np.ndarray | None = None) -> np.ndarray:
    """Exact inner-product search over all items (faiss IndexFlatIP) -> int64 [U, top_k]."""
    from seater_dist.model.sasrec import topk_inner_product

    hist = torch.from_numpy(left_pad(histories, max_len, num_items))
    states = model.user_state(hist).float().cpu().numpy()
    table = model.item_embeddings() if item_embeddings is None else item_embeddings
    items, _ = topk_inner_product(states, table, top_k)
    return np.asarray(items, dtype=np.int64)


class Ranker:
    """A trained checkpoint (SEATER or SASRec) that ranks item indices for histories of item indices.

    >>> ranker = Ranker.from_checkpoint("runs/demo/seater/best")
    >>> ranker.topk([[3, 17, 5]], 50).shape
    (1, 50)
    """

    def __init__(self, kind: str, model, topk_fn) -> None:
        self.kind = kind
        self.model = model
        self._topk = topk_fn

    def topk(self, histories: Sequence[Sequence[int]], top_k: int) -> np.ndarray:
        return self._topk(histories, top_k)

    @classmethod
    def from_checkpoint(cls, path: str | Path, threads: int | None = None) -> "Ranker":
        path = Path(path)
        if threads:
            torch.set_num_threads(threads)
        if not (path / "manifest.json").exists():
            raise FileNotFoundError(f"{path}: not a checkpoint directory (no manifest.json)")
        if (path / "tree").exists():
            from seater_dist.model.checkpoint import load_checkpoint

            model, settings, tree, _, _ = load_checkpoint(path)

            def run(histories, k):
                return seater_topk(model, settings.history_len, tree.pad, settings.beam_size, histories, k)

            return cls("seater", model, run)
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("artifact") != "sasrec_checkpoint":
            raise ValueError(f"{path}: unknown checkpoint kind {manifest.get('artifact')!r}")
        from seater_dist.train.tasks import load_sasrec

        model, settings, _ = load_sasrec(path)
        table = model.item_embeddings()

        def run(histories, k):
            return sasrec_topk(model, settings.max_len, model.item_emb.num_embeddings - 1, histories, k, table)

        return cls("sasrec", model, run)
