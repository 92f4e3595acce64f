"""What both encoder parts do besides running their model: raw ids -> item indices (unknown ids set aside),
and the popular items a history with no known item gets.

Popular items: the training counts of the dataset the checkpoint was trained on when we can find it
(``popularity=`` a dataset directory or its items.parquet; otherwise ``<checkpoint>/../../dataset/items.parquet``,
the layout ``seater run`` writes, used only when its item ids are exactly the checkpoint's), else the model's
own answer to an empty history. The encoder parts' ``popularity_source`` says which.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seater_dist import artifacts
from seater_dist.model.checkpoint import catalogue_id
from seater_dist.model.retriever import ItemIdIndex


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

