"""Read a prepared `dataset/` directory (written by `seater prepare`): the training code's entry point.

    ds = load_dataset("runs/beauty/dataset")
    ds.num_items, ds.num_users, ds.protocol     # 12101, 22363, "comirec"
    ds.table("train")                            # pyarrow: user_index int64, items list<int32>
    ds.table("test")                             # user_index, history list<int32>, ground_truth list<int32>
    ds.ray_dataset("train")                      # the same rows as a ray.data.Dataset (streamed from parquet)
    ds.item_ids[ds.table("test")["ground_truth"][0].values]   # raw item ids of a user's ground truth
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seater_dist.data.errors import DataError
from seater_dist.data.ops import EVAL_SCHEMA, SPLITS, TRAIN_SCHEMA

_REQUIRED = ("manifest.json", "items.parquet", "users.parquet", "train", "valid", "test")


@dataclass
class Dataset:
    """A prepared dataset directory. ``item_ids``: np.ndarray [num_items] of raw ids (str) by dense index."""

    path: Path
    manifest: dict[str, Any]
    _item_ids: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_items(self) -> int:
        return int(self.manifest["counts"]["items"])

    @property
    def num_users(self) -> int:
        return int(self.manifest["counts"]["users"])

    @property
    def protocol(self) -> str:
        return str(self.manifest["protocol"])

    @property
    def item_ids(self) -> np.ndarray:
        if self._item_ids is None:
            self._item_ids = pq.read_table(self.path / "items.parquet", columns=["item_id"]) \
                .column("item_id").to_numpy(zero_copy_only=False)
        return self._item_ids

    def items(self) -> pa.Table:
        """items.parquet: item_index int64, item_id string, count int64."""
        return pq.read_table(self.path / "items.parquet")

    def users(self) -> pa.Table:
        """users.parquet: user_index int64, user_id string, split string (train/valid/test, or all for loo)."""
        return pq.read_table(self.path / "users.parquet")

    def _split_files(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
        return sorted(str(p) for p in (self.path / split).glob("*.parquet"))

    def table(self, split: str) -> pa.Table:
        """All rows of ``split`` sorted by user_index (train: items; valid/test: history, ground_truth)."""
        schema = TRAIN_SCHEMA if split == "train" else EVAL_SCHEMA
        files = self._split_files(split)
        if not files:
            return schema.empty_table()
        table = pa.concat_tables([pq.read_table(f, schema=schema) for f in files])
        return table.sort_by("user_index")

    def ray_dataset(self, split: str):
        """``split`` as a ray.data.Dataset read lazily from its parquet shards (block order = file order)."""
        import ray

        files = self._split_files(split)
        schema = TRAIN_SCHEMA if split == "train" else EVAL_SCHEMA
        if not files:
            return ray.data.from_arrow(schema.empty_table())
        return ray.data.read_parquet(files, schema=schema)


def load_dataset(path: str | Path) -> Dataset:
    """Open a `dataset/` directory; DataError naming what is missing if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a dataset directory (it does not exist or is a file); "
                        "make one with `seater prepare`")
    missing = [name for name in _REQUIRED if not (path / name).exists()]
    if missing:
        raise DataError(f"{path}: not a dataset directory (missing {', '.join(missing)}); "
                        "make one with `seater prepare`")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except ValueError as err:
        raise DataError(f"{path / 'manifest.json'}: not valid JSON ({err})") from None
    if manifest.get("artifact") != "dataset":
        raise DataError(f"{path / 'manifest.json'}: artifact is {manifest.get('artifact')!r}, not 'dataset'")
    return Dataset(path, manifest)
