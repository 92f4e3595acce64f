"""The end of `seater prepare` (data/prepare.py): what an engine found (:class:`EngineResult`), the files that
record it in the dataset directory being made (items.parquet, users.parquet, then manifest.json with the
counts and the checksum of every file: :func:`finish`), and what ``prepare`` returns (:class:`PrepareResult`).
:func:`read_rejected` reads back the rejected rows the engine wrote into ``rejected/``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seater_dist.artifacts import sha256_file
from seater_dist.config import PrepareSettings
from seater_dist.data import ops
from seater_dist.data.dataset import SCHEMA_VERSION
from seater_dist.data.row_checks import REJECTED_SCHEMA


@dataclass
class PrepareResult:
    """What `seater prepare` wrote: counts (``rows_read = rows_kept + sum(dropped.values())``)."""

    users: int
    items: int
    interactions: int
    train_users: int
    valid_users: int
    test_users: int
    rows_read: int
    rows_kept: int
    dropped: dict[str, int]
    out: str
    seconds: float


class EngineResult:
    """What an engine hands to the common finishing steps."""

    def __init__(self) -> None:
        self.valid_rows = 0  # rows that passed the readers' checks
        self.after_dedupe = 0
        self.rows_with_kept_items = 0  # before the user filter
        self.kept_items: pa.Array | None = None
        self.users: pa.Array | None = None  # raw ids of the kept users (natural order)
        self.user_split: np.ndarray | None = None
        self.item_counts: np.ndarray | None = None  # final counts by dense item index
        self.rows_kept = 0
        self.kcore_rounds = 1
        self.blocks = 0
        self.stage_seconds: dict[str, float] = {}


def read_rejected(tmp: Path, columns: list[str] | None = None) -> pa.Table:
    """The rejected rows in ``tmp/rejected/*.parquet`` (only ``columns`` when given), in file-name order."""
    files = sorted((tmp / "rejected").glob("*.parquet"))
    if not files:
        schema = REJECTED_SCHEMA if columns is None else pa.schema([REJECTED_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def finish(s: PrepareSettings, files: list[str], tmp: Path, r: EngineResult, seconds: float) -> PrepareResult:
    """Write items.parquet, users.parquet and manifest.json (counts by reason, checksums) into ``tmp``."""
    reasons = Counter(read_rejected(tmp, columns=["reason"]).column("reason").to_pylist())
    dropped = dict(sorted(reasons.items()))
    dropped["item_below_min_count"] = r.after_dedupe - r.rows_with_kept_items
    dropped["user_below_min_count"] = r.rows_with_kept_items - r.rows_kept
    rows_read = r.rows_kept + sum(dropped.values())
    split_names = ops.SPLIT_NAMES[r.user_split]
    pq.write_table(pa.table({"item_index": pa.array(np.arange(len(r.kept_items)), pa.int64()),
                             "item_id": pc.cast(r.kept_items, pa.string()),
                             "count": pa.array(r.item_counts, pa.int64())}), tmp / "items.parquet")
    pq.write_table(pa.table({"user_index": pa.array(np.arange(len(r.users)), pa.int64()),
                             "user_id": pc.cast(r.users, pa.string()),
                             "split": pa.array(split_names, pa.string())}), tmp / "users.parquet")
    n_split = {name: int((r.user_split == code).sum()) for code, name in enumerate(ops.SPLITS)}
    if s.protocol == "loo":
        n_split = {name: len(r.users) for name in ops.SPLITS}
    counts = {"users": len(r.users), "items": len(r.kept_items), "interactions": r.rows_kept,
              "train_users": n_split["train"], "valid_users": n_split["valid"], "test_users": n_split["test"],
              "rows_read": rows_read, "rows_kept": r.rows_kept, "rows_dropped_by_reason": dropped}
    manifest = {
        "schema_version": SCHEMA_VERSION, "artifact": "dataset",
        "input": {"path": s.input, "format": s.format, "files": files},
        "settings": s.model_dump(mode="json"), "protocol": s.protocol,
        "split_note": "comirec: users.split is train/valid/test (seeded user shuffle); loo: every user "
                      "is 'all' (train = s[:-2], valid = s[-2], test = s[-1])",
        "counts": counts, "kcore_rounds": r.kcore_rounds, "blocks": r.blocks,
        "checksums": _checksums(tmp), "stage_seconds": r.stage_seconds, "seconds": round(seconds, 2),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return PrepareResult(counts["users"], counts["items"], counts["interactions"], counts["train_users"],
                         counts["valid_users"], counts["test_users"], rows_read, r.rows_kept,
                         {k: v for k, v in dropped.items() if v}, s.out, round(seconds, 1))


def _checksums(root: Path) -> dict[str, str]:
    sums = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"):
        sums[str(path.relative_to(root))] = sha256_file(path)
    return sums
