"""The one checkpoint format of both models, read by evaluate, recommend, serve and the retriever.

A checkpoint is a self-contained directory, written atomically (a temp directory beside it, then a
rename; ``manifest.json`` last)::

    checkpoint/
      manifest.json        artifact "checkpoint", schema_version, model ("seater" | "sasrec"), num_items,
                           catalogue (sha256 of the item ids), checksums of every file below, extra
      model.pt             the model's state_dict (tensors only: read with torch's weights_only=True)
      settings.json        SeaterSettings or SasrecSettings
      items.parquet        item_index (0..N-1), item_id (raw id string)
      tree/                SEATER: its ItemTree (arrays + their own manifest)
      item_embeddings.npy  SASRec: the item table float32 [N, d] (the tree's input, the retrieval index)

Every file is verified against the manifest when read; a checkpoint whose files changed is refused
with the name of the file.

Example::

    save_checkpoint("runs/x/checkpoint", model, settings, item_ids, tree=tree, extra={"epoch": 3})
    ckpt = load_checkpoint("runs/x/checkpoint")       # either kind
    ckpt.kind, ckpt.topk([[3, 17, 5]], top_k=50)       # "seater", int64 [1, 50]
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from seater_dist import artifacts
from seater_dist.artifacts import (
    ArtifactError,
    atomic_dir,
    member,
    read_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)
from seater_dist.config import SasrecSettings, SeaterSettings, Settings, SettingsError
from seater_dist.files import load_npy, load_tensors
from seater_dist.model.sasrec import SASRec
from seater_dist.model.seater import SeaterModel
from seater_dist.tree.item_tree import SCHEMA_VERSION as TREE_SCHEMA_VERSION
from seater_dist.tree.item_tree import ItemTree

SCHEMA_VERSION = 2
MODEL_KINDS = ("seater", "sasrec")


class CheckpointError(ArtifactError):
    """A checkpoint directory that is missing, incomplete, altered or of another kind; names the file."""


def catalogue_id(item_ids: Sequence[str] | np.ndarray) -> str:
    """sha256 of the raw item ids in index order: equal exactly when two artifacts share a catalogue."""
    h = hashlib.sha256()
    for start in range(0, len(item_ids), 1 << 16):
        h.update(("\n".join(str(x) for x in item_ids[start : start + (1 << 16)]) + "\n").encode())
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A loaded checkpoint of either model. ``topk`` ranks item indices for item-index histories."""

    path: Path
    kind: str
    model: nn.Module
    settings: SeaterSettings | SasrecSettings
    manifest: dict[str, Any]
    tree: ItemTree | None = None
    item_table: np.ndarray | None = None
    _item_ids: np.ndarray | None = field(default=None, repr=False)

    @property
    def item_ids(self) -> np.ndarray:
        """Raw id (str) of item index 0..N-1, read from items.parquet on first use (ranking by index, as an
        evaluation does, never needs them; at millions of items they take seconds to read)."""
        if self._item_ids is None:
            self._item_ids = read_item_ids(member(self.path, "items.parquet", CheckpointError), self.num_items)
        return self._item_ids

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def model_version(self) -> str:
        """A short id of these weights (the model file's checksum prefix)."""
        return str(self.manifest["checksums"]["model.pt"][:12])

    def topk(self, histories: Sequence[Sequence[int]], top_k: int) -> np.ndarray:
        """U item-index histories -> int64 [U, top_k] item indices, best first (-1 padded), on the model's
        device (a SASRec model ranks against its own item table, equal to ``item_table``)."""
        return self.model.topk(histories, top_k)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, settings: SeaterSettings | SasrecSettings,
                    item_ids: np.ndarray, *, tree: ItemTree | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory (local or URI) atomically (replacing an existing one). Returns the path.

    model: a SeaterModel (then ``tree`` is required) or a SASRec, possibly DDP-wrapped (``.module``);
    item_ids: raw id (str) of item index 0..N-1.
    """
    model = getattr(model, "module", model)
    kind = _kind_of(model)
    item_ids = np.asarray(item_ids)
    if item_ids.shape != (model.num_items,):
        raise CheckpointError(f"item_ids has shape {item_ids.shape}, expected ({model.num_items},) (one per item)")
    if kind == "seater":
        if tree is None:
            raise CheckpointError("a SEATER checkpoint needs its tree")
        if model.num_items != tree.num_items or model.tok_emb.num_embeddings != tree.num_tokens:
            raise CheckpointError("model and tree disagree on the number of items/tokens")
    with atomic_dir(path, "checkpoint") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
        (tmp / "settings.json").write_text(settings.to_json())
        pq.write_table(pa.table({"item_index": np.arange(model.num_items, dtype=np.int64),
                                 "item_id": item_ids.astype(str)}), tmp / "items.parquet")
        if kind == "seater":
            tree.save(tmp / "tree")
        else:
            np.save(tmp / "item_embeddings.npy", model.item_embeddings())
        write_manifest(tmp, {"artifact": "checkpoint", "schema_version": SCHEMA_VERSION, "model": kind,
                             "num_items": int(model.num_items), "catalogue": catalogue_id(item_ids),
                             **({"k": tree.k, "depth": tree.depth, "num_tokens": tree.num_tokens} if tree else {}),
                             "extra": extra or {}})
    return artifacts.path_or_uri(path)


def _kind_of(model: nn.Module) -> str:
    if isinstance(model, SeaterModel):
        return "seater"
    if isinstance(model, SASRec):
        return "sasrec"
    raise CheckpointError(f"cannot checkpoint a {type(model).__name__}: expected SeaterModel or SASRec")


def embeddings_provenance(embeddings: str | os.PathLike) -> dict[str, Any]:
    """Where a tree's item embeddings came from, recorded in its manifest: ``{"embeddings": path or URI}``
    (so that training can start the token table from them without being told again), plus the catalogue of
    the SASRec checkpoint that holds exactly this ``item_embeddings.npy`` (the checkpoint beside it,
    ``best/``, as `seater embed` writes them, or the one it sits in), so that training can check the tree
    against its dataset: ``{"catalogue": id, "embeddings_checkpoint": dir}``."""
    where = artifacts.location(embeddings)
    found = {"embeddings": where}
    parent = artifacts.parent(where)
    digest = None
    for candidate in (artifacts.join(parent, "best"), parent):
        try:
            manifest = read_checkpoint_manifest(candidate)
        except CheckpointError:
            continue
        if manifest["model"] != "sasrec" or "catalogue" not in manifest:
            continue
        digest = digest or sha256_file(artifacts.local_copy(embeddings))
        if manifest["checksums"].get("item_embeddings.npy") == digest:
            return {**found, "catalogue": manifest["catalogue"], "embeddings_checkpoint": candidate}
    return found


def check_same_catalogue(what: str | os.PathLike, manifest: dict[str, Any], dataset: str | os.PathLike,
                         item_ids: np.ndarray, error: type[ValueError] = CheckpointError) -> None:
    """Refuse an artifact (a checkpoint's or tree's ``manifest``) made for another catalogue than the dataset's,
    naming both item counts and both catalogue ids. An artifact that records no catalogue is checked by count."""
    theirs, ours = manifest.get("catalogue"), catalogue_id(item_ids)
    if int(manifest["num_items"]) != len(item_ids) or (theirs is not None and theirs != ours):
        their_id = f"catalogue {theirs[:12]}" if theirs else "no catalogue recorded"
        raise error(f"{what}: made for another catalogue ({int(manifest['num_items']):,} items, {their_id}) than the "
                    f"dataset {dataset} ({len(item_ids):,} items, catalogue {ours[:12]}); use the dataset it was "
                    "made from, or re-create it from this one")


def read_checkpoint_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """manifest.json of a checkpoint directory (a path or a URI: the manifest alone is read), checked for kind,
    schema version and model kind."""
    manifest = read_manifest(path, "checkpoint", SCHEMA_VERSION, CheckpointError)
    if manifest.get("model") not in MODEL_KINDS:
        raise CheckpointError(f"{artifacts.join(path, 'manifest.json')}: model {manifest.get('model')!r}, expected one "
                              f"of {', '.join(MODEL_KINDS)}")
    return manifest


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's manifest, after checking every file it lists (inside, regular, unchanged) and, for
    SEATER, the manifest of its tree: what :func:`load_checkpoint` checks before it reads anything, cheap
    enough for a driver to run before it starts actors or workers that load the checkpoint."""
    path = artifacts.local_copy(path, CheckpointError)
    manifest = read_checkpoint_manifest(path)
    verify_files(path, manifest, error=CheckpointError)
    if manifest["model"] == "seater":
        tree = read_manifest(Path(path) / "tree", "tree", TREE_SCHEMA_VERSION, CheckpointError)
        if int(tree.get("num_items", -1)) != int(manifest["num_items"]):
            raise CheckpointError(f"{Path(path) / 'tree'}: holds {tree.get('num_items')} items, the manifest says "
                                  f"{manifest['num_items']}")
    return manifest


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    validate_tree: bool = False) -> Checkpoint:
    """Read and verify a checkpoint of either model -> :class:`Checkpoint` (model in eval mode).

    Every file's checksum is verified first; ``validate_tree`` also re-checks the tree's invariants (slow at
    millions of items, and redundant when the checksums match). ``path``: local, or a URI (copied once to a
    local cache, every file checked as it is copied).
    """
    path = artifacts.local_copy(path, CheckpointError)
    manifest = verify_checkpoint(path)
    kind = manifest["model"]
    num_items = int(manifest["num_items"])
    settings_type: type[Settings] = SeaterSettings if kind == "seater" else SasrecSettings
    settings = _read_settings(member(path, "settings.json", CheckpointError), settings_type)
    tree, table = None, None
    with torch.device("meta"):  # parameters without memory or random init: the loaded tensors take their place
        if kind == "seater":
            tree = ItemTree.load(path / "tree", validate=validate_tree)
            if tree.num_items != num_items:
                raise CheckpointError(f"{path / 'tree'}: holds {tree.num_items} items, the manifest says {num_items}")
            model: nn.Module = SeaterModel(tree, settings, trainable=False)
        else:
            model = SASRec(num_items, settings)
    if kind == "sasrec":
        table = load_npy(member(path, "item_embeddings.npy", CheckpointError), CheckpointError,
                         "a .npy array of item embeddings")
    weights = member(path, "model.pt", CheckpointError)
    state = load_tensors(weights, CheckpointError, "a model's weights (a state_dict)")
    try:
        model.load_state_dict(state, assign=True)
    except Exception as err:  # noqa: BLE001 - a state_dict of other shapes or names
        raise CheckpointError(f"{weights}: does not fit the model described by settings.json "
                              f"({' '.join(str(err).split())[:300]})") from None
    return Checkpoint(path, kind, model.to(map_location).eval(), settings, manifest, tree, table)


def _read_settings(path: Path, settings_type: type[Settings]) -> Any:
    try:
        return settings_type.model_validate(json.loads(path.read_text()))
    except (ValueError, SettingsError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_item_ids(path: Path, num_items: int) -> np.ndarray:
    """items.parquet -> raw ids (object array of str) indexed by item_index 0..N-1."""
    try:
        table = pq.read_table(path, columns=["item_index", "item_id"])
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        raise CheckpointError(f"{path}: not a readable item table ({err})") from None
    index = table.column("item_index").to_numpy()
    if index.shape != (num_items,) or not np.array_equal(np.sort(index), np.arange(num_items)):
        raise CheckpointError(f"{path}: item_index must hold each of 0..{num_items - 1} exactly once")
    ids = np.empty(num_items, dtype=object)
    ids[index] = table.column("item_id").to_numpy(zero_copy_only=False)
    return ids
