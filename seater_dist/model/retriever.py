"""SeaterRetriever: recommendations from a checkpoint, in raw item ids, in one process (no Ray).

    retriever = SeaterRetriever.from_checkpoint("runs/beauty/checkpoint")
    retriever.recommend([["B0001", "B0042"], ["B0007"]], top_n=10)
    # [{"items": ["B0311", ...], "scores": [-0.41, ...], "ignored": []}, ...]

Scores are sums of constrained log-probabilities (log of the paper's Eq. 1), best first. Unknown item ids in a
history are reported in ``ignored`` and left out; a history with no known item still gets recommendations
(the model's answer for an empty history).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from seater_dist.config import SeaterSettings
from seater_dist.model.checkpoint import CheckpointError, load_checkpoint
from seater_dist.model.seater import SeaterModel


class ItemIdIndex:
    """Raw item id (str) <-> item index, as one sorted array of the ids (compact at millions of ids, unlike a
    dict): ``_sorted`` [N] the ids in sorted order, ``_order`` [N] their item indices, ``_rank`` [N] the
    position of each item index in ``_sorted``. The ids are held once."""

    def __init__(self, item_ids: np.ndarray) -> None:
        ids = np.asarray(item_ids).astype(str)
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]
        del ids
        self._rank = np.empty_like(self._order)
        self._rank[self._order] = np.arange(self._order.size)
        if self._sorted.size > 1 and (self._sorted[1:] == self._sorted[:-1]).any():
            dup = str(self._sorted[1:][self._sorted[1:] == self._sorted[:-1]][0])
            raise ValueError(f"item id {dup!r} appears more than once in the item table")

    def __len__(self) -> int:
        return int(self._sorted.size)

    def raw(self, indices: np.ndarray) -> np.ndarray:
        """Item indices [n] -> their raw ids [n] (str)."""
        return self._sorted[self._rank[np.asarray(indices, dtype=np.int64)]]

    def lookup(self, raw: Sequence[str]) -> np.ndarray:
        """Raw ids -> item indices int64, -1 for unknown ids."""
        if len(raw) == 0 or self._sorted.size == 0:
            return np.full(len(raw), -1, dtype=np.int64)
        query = np.asarray([str(r) for r in raw])
        pos = np.searchsorted(self._sorted, query).clip(max=self._sorted.size - 1)
        found = self._sorted[pos] == query
        return np.where(found, self._order[pos], -1).astype(np.int64)


class SeaterRetriever:
    """Batched constrained beam search over raw-id histories."""

    def __init__(
        self,
        model: SeaterModel,
        item_ids: np.ndarray,
        settings: SeaterSettings,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        model_version: str = "",
    ) -> None:
        self.model = model.to(device).eval()
        self.settings = settings
        self.index = ItemIdIndex(item_ids)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model_version = model_version

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 256
    ) -> "SeaterRetriever":
        """Load a SEATER checkpoint written by :func:`seater_dist.model.checkpoint.save_checkpoint`."""
        ckpt = load_checkpoint(path, map_location=device)
        if ckpt.kind != "seater":
            raise CheckpointError(f"{path}: a {ckpt.kind} checkpoint; SeaterRetriever serves SEATER checkpoints")
        return cls(ckpt.model, ckpt.item_ids, ckpt.settings, batch_size=batch_size, device=device,
                   model_version=ckpt.model_version)

    def recommend(self, histories: Sequence[Sequence[str]], top_n: int = 50) -> list[dict[str, Any]]:
        """histories: raw item ids per user, oldest first -> per user {"items", "scores", "ignored"}.

        top_n must be <= the beam size of the settings (the final beams are the candidates). Users are
        processed in batches of ``batch_size``; fewer than top_n items come back only when the tree has
        fewer reachable leaves.
        """
        beam = self.settings.beam_size
        if not 1 <= top_n <= beam:
            raise ValueError(f"top_n must be in 1..{beam} (beam_size), got {top_n}")
        results: list[dict[str, Any]] = []
        for lo in range(0, len(histories), self.batch_size):
            chunk = histories[lo : lo + self.batch_size]
            batch, ignored = self._encode_histories(chunk)
            items, scores = self.model.beam_search(batch.to(self.device), beam, top_n)
            items, scores = items.cpu().numpy(), scores.cpu().numpy()
            for row in range(len(chunk)):
                keep = items[row] >= 0
                results.append(
                    {
                        "items": self.index.raw(items[row][keep]).tolist(),
                        "scores": scores[row][keep].astype(float).tolist(),
                        "ignored": ignored[row],
                    }
                )
        return results

    def _encode_histories(self, histories: Sequence[Sequence[str]]) -> tuple[torch.Tensor, list[list[str]]]:
        """Raw histories -> (int64 [B, t] left-padded with PAD, last t known items; unknown ids per user)."""
        t, pad = self.settings.history_len, self.model.pad
        batch = np.full((len(histories), t), pad, dtype=np.int64)
        ignored: list[list[str]] = []
        for row, history in enumerate(histories):
            if isinstance(history, (str, bytes)):
                raise TypeError(f"history {row} must be a list of item ids, got a single string")
            idx = self.index.lookup(list(history))
            ignored.append([str(h) for h, i in zip(history, idx) if i < 0])
            known = idx[idx >= 0][-t:]
            if known.size:
                batch[row, t - known.size :] = known
        return torch.from_numpy(batch), ignored
