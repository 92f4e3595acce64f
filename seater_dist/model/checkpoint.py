"""The one SEATER checkpoint format, read by evaluate, serve and :class:`SeaterRetriever`.

A checkpoint is a directory, written atomically (a temp directory beside it, then a rename)::

    checkpoint/
      model.pt          state_dict of SeaterModel (tree arrays are not in it: they are rebuilt from tree/)
      settings.json     SeaterSettings
      tree/             ItemTree.save (arrays + its own manifest and checksums)
      items.parquet     item_index (0..N-1), item_id (raw id string)
      manifest.json     schema_version, num_items, checksums of the files above, extra (epoch, metrics, ...)

Example::

    save_checkpoint("runs/x/checkpoint", model, settings, tree, item_ids, extra={"epoch": 3})
    model, settings, tree, item_ids, manifest = load_checkpoint("runs/x/checkpoint")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from seater_dist.artifacts import replace_dir, sha256_file, to_jsonable
from seater_dist.config import SeaterSettings
from seater_dist.model.seater import SeaterModel
from seater_dist.tree.item_tree import ItemTree

SCHEMA_VERSION = 1
_FILES = ("model.pt", "settings.json", "items.parquet", "tree/manifest.json")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or altered; the message names the file."""


def save_checkpoint(
    path: str | os.PathLike,
    model: SeaterModel,
    settings: SeaterSettings,
    tree: ItemTree,
    item_ids: np.ndarray,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically; replaces an existing one. Returns the path.

    model may be wrapped (DDP's ``.module`` is unwrapped); item_ids: raw id (str) of item index 0..N-1.
    """
    path = Path(path)
    model = getattr(model, "module", model)
    item_ids = np.asarray(item_ids)
    if item_ids.shape != (tree.num_items,):
        raise CheckpointError(f"item_ids has shape {item_ids.shape}, expected ({tree.num_items},) (one per item)")
    if model.num_items != tree.num_items or model.tok_emb.num_embeddings != tree.num_tokens:
        raise CheckpointError("model and tree disagree on the number of items/tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
        (tmp / "settings.json").write_text(settings.to_json())
        tree.save(tmp / "tree")
        table = pa.table({"item_index": np.arange(tree.num_items, dtype=np.int64), "item_id": item_ids.astype(str)})
        pq.write_table(table, tmp / "items.parquet")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "artifact": "checkpoint",
            "model": "seater",
            "num_items": tree.num_items,
            "num_tokens": tree.num_tokens,
            "k": tree.k,
            "depth": tree.depth,
            "checksums": {name: sha256_file(tmp / name) for name in _FILES},
            "extra": extra or {},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=to_jsonable))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", validate_tree: bool = False
) -> tuple[SeaterModel, SeaterSettings, ItemTree, np.ndarray, dict[str, Any]]:
    """Read a checkpoint -> (model in eval mode, settings, tree, item_ids str [N], manifest).

    Checksums of every file are verified; ``validate_tree`` also re-checks the tree's invariants (slow at
    millions of items, and redundant when the checksums match).
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name, want in manifest["checksums"].items():
        if not (path / name).exists():
            raise CheckpointError(f"{path / name}: missing from the checkpoint")
        if sha256_file(path / name) != want:
            raise CheckpointError(f"{path / name}: checksum mismatch (file changed since the checkpoint was written)")
    settings = SeaterSettings.model_validate(json.loads((path / "settings.json").read_text()))
    tree = ItemTree.load(path / "tree", validate=validate_tree)
    item_ids = read_item_ids(path / "items.parquet", tree.num_items)
    with torch.device("meta"):  # parameters without memory or random init: the loaded tensors take their place
        model = SeaterModel(tree, settings)
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path / 'model.pt'}: does not fit the model described by settings.json ({err})") from None
    return model.to(map_location).eval(), settings, tree, item_ids, manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """manifest.json of a checkpoint directory, checked for the schema version."""
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.exists():
        raise CheckpointError(f"{path}: not a checkpoint directory (no manifest.json)")
    manifest = json.loads(mf.read_text())
    if manifest.get("artifact") != "checkpoint" or manifest.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{mf}: artifact={manifest.get('artifact')!r} schema_version={manifest.get('schema_version')!r}, "
            f"expected 'checkpoint' version {SCHEMA_VERSION}"
        )
    return manifest


def read_item_ids(path: Path, num_items: int) -> np.ndarray:
    """items.parquet -> raw ids (object array of str) indexed by item_index 0..N-1."""
    table = pq.read_table(path, columns=["item_index", "item_id"])
    index = table.column("item_index").to_numpy()
    if index.shape != (num_items,) or not np.array_equal(np.sort(index), np.arange(num_items)):
        raise CheckpointError(f"{path}: item_index must hold each of 0..{num_items - 1} exactly once")
    ids = np.empty(num_items, dtype=object)
    ids[index] = table.column("item_id").to_numpy(zero_copy_only=False)
    return ids

