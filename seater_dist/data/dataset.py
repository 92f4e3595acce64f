"""Read a prepared `dataset/` directory (written by `seater prepare`): the training code's entry point.

    ds = load_dataset("runs/beauty/dataset")
    ds.num_items, ds.num_users, ds.protocol     # 12101, 22363, "comirec"
    ds.table("train")                            # pyarrow: user_index int64, items list<int32>
    ds.table("test")                             # user_index, history list<int32>, ground_truth list<int32>
    ds.ray_dataset("train")                      # the same rows as a ray.data.Dataset (streamed from parquet)
    ds.item_ids[ds.table("test")["ground_truth"][0].values]   # raw item ids of a user's ground truth

Opening a dataset verifies it (:func:`verify_dataset`): every file its manifest lists is inside the
directory, a regular file, and has its recorded sha256. The content is hashed in full (streaming) the
first time; the result is kept as a stamp, ``.verified.json`` in the directory (each file's size,
modification time, inode and status-change time, for this manifest), so later opens (every Train worker,
evaluate) re-hash only files whose stamp no longer matches. The status-change time (ctime) is what makes
the stamp hold: a user can set a file's mtime back (``touch -d``, ``os.utime``) but not its ctime, which
the kernel moves on every write, utime, chmod or rename. A read-only dataset keeps its stamp in the process instead.
Reads use exactly the files the manifest lists. A dataset at a URI (``s3://...``) is read from a
verified local copy (:func:`seater_dist.artifacts.local_copy`), except :meth:`Dataset.ray_dataset`, whose
read tasks, on whichever node they run, read the shards from the URI itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seater_dist import artifacts
from seater_dist.artifacts import member, read_manifest, sha256_file
from seater_dist.data.errors import DataError
from seater_dist.data.ops import EVAL_SCHEMA, SPLITS, TRAIN_SCHEMA

SCHEMA_VERSION = 1
STAMP = ".verified.json"
_REQUIRED = ("manifest.json", "items.parquet", "users.parquet", "train", "valid", "test")
_REMAKE = "re-create it with `seater prepare`"
_stamps: dict[str, dict[str, list[int]]] = {}  # in-process stamps (datasets whose directory is read-only)
_stamps_guard = threading.Lock()


@dataclass
class Dataset:
    """A prepared dataset directory. ``item_ids``: np.ndarray [num_items] of raw ids (str) by dense index.

    ``path`` is local; ``source`` is where it was opened from (the same path, or the URI it was copied from).
    """

    path: Path
    manifest: dict[str, Any]
    source: str = ""
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
        """The split's parquet shards the manifest lists (in name order = block order), never others."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
        names = sorted(n for n in self.manifest["checksums"] if n.startswith(f"{split}/") and n.endswith(".parquet"))
        return [str(member(self.path, n, DataError)) for n in names]

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
        # read where every node can: a URI's verified objects themselves, a local dataset's files
        fs, root = artifacts.resolve(artifacts.location(self.source))
        names = [Path(f).relative_to(self.path).as_posix() for f in files]
        return ray.data.read_parquet([f"{root}/{n}" for n in names], schema=schema, filesystem=fs)


def load_dataset(path: str | Path, verify: bool = True) -> Dataset:
    """Open a `dataset/` directory; DataError naming what is missing or altered if it is not a whole one.

    verify: check every file against the manifest (:func:`verify_dataset`; cheap after the first time).
    ``path``: a local path or a URI (copied once to a local cache, checked as it is copied).
    """
    source = str(path)
    path = artifacts.local_copy(path, DataError)
    if not path.is_dir():
        raise DataError(f"{path}: not a dataset directory (it does not exist or is a file); "
                        "make one with `seater prepare`")
    missing = [name for name in _REQUIRED if not (path / name).exists()]
    if missing:
        raise DataError(f"{path}: not a dataset directory (missing {', '.join(missing)}); "
                        "make one with `seater prepare`")
    manifest = read_manifest(path, "dataset", SCHEMA_VERSION, DataError)
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or not {"items", "users"} <= set(counts) or "protocol" not in manifest:
        raise DataError(f"{path / 'manifest.json'}: incomplete (no counts or protocol); {_REMAKE}")
    if verify:
        verify_dataset(path, manifest)
    return Dataset(path, manifest, source=source)


def verify_dataset(path: str | Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is inside ``path``, a regular file, with its recorded sha256.

    Files whose (size, mtime, inode, ctime) match the stamp of an earlier full check of this manifest are not
    re-hashed (see the module docstring); the stamp is refreshed after a check that hashed anything.
    """
    path = Path(path)
    key = hashlib.sha256(json.dumps(manifest["checksums"], sort_keys=True).encode()).hexdigest()
    stamp = _read_stamp(path, key)
    seen: dict[str, list[int]] = {}
    hashed = False
    for name, digest in sorted(manifest["checksums"].items()):
        file = member(path, name, DataError)
        st = file.stat()
        seen[name] = _file_stamp(st)
        if stamp.get(name) == seen[name]:
            continue
        hashed = True
        if sha256_file(file) != digest:
            raise DataError(f"{file}: checksum mismatch (changed after `seater prepare` wrote it); {_REMAKE}")
    if hashed or not stamp:
        _write_stamp(path, key, seen)


def _file_stamp(st: os.stat_result) -> list[int]:
    """What must be unchanged for a file not to be re-hashed: size, mtime, inode and ctime (ns). ctime
    cannot be set by a user: writing the file, or setting its mtime back, moves it."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _read_stamp(path: Path, key: str) -> dict[str, list[int]]:
    with _stamps_guard:
        cached = _stamps.get(f"{path.resolve()}:{key}")
    if cached is not None:
        return cached
    try:
        stamp = json.loads((path / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stamp, dict) or stamp.get("checksums") != key or not isinstance(stamp.get("files"), dict):
        return {}
    return stamp["files"]


def _write_stamp(path: Path, key: str, files: dict[str, list[int]]) -> None:
    with _stamps_guard:
        _stamps[f"{path.resolve()}:{key}"] = files
    tmp = path / f"{STAMP}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"checksums": key, "files": files}))
        os.replace(tmp, path / STAMP)
    except OSError:  # a read-only dataset: the in-process stamp above still saves re-hashing here
        try:
            tmp.unlink()
        except OSError:
            pass
