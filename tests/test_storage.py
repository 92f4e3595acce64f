"""Artifacts on object storage: a real S3 API on 127.0.0.1 (the `s3` fixture). The whole pipeline against a bucket
is tests/test_ray_job_submit.py (the README's job with --out and --storage in it)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pytest

from bench.synthetic import random_balanced_tree
from seater_dist import artifacts
from seater_dist.artifacts import ArtifactError, publishing
from seater_dist.tree.item_tree import ItemTree, TreeError


def objects(uri: str) -> set[str]:
    """Every object under ``uri``, by path relative to it."""
    fs, root = artifacts.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File}


def test_a_tree_round_trips_through_s3_and_every_file_is_verified(s3, tmp_path, monkeypatch):
    tree = random_balanced_tree(50, 4, seed=1)
    uri = f"{s3}/roundtrip/tree"
    tree.save(uri)
    assert objects(uri) >= {"manifest.json", "codes.npy", "children.npy"}
    back = ItemTree.load(uri)
    assert np.array_equal(back.codes, tree.codes) and back.manifest["checksums"] == tree.manifest["checksums"]
    assert not artifacts.local_path(artifacts.local_copy(uri)).is_relative_to(tmp_path)  # a cache copy, not the cwd
    fs, root = artifacts.resolve(uri)
    with fs.open_output_stream(f"{root}/codes.npy") as f:  # altered after publishing
        f.write(b"not the same bytes")
    assert ItemTree.load(uri).num_items == 50  # this node's verified copy of that manifest is reused ...
    monkeypatch.setenv("SEATER_CACHE", str(tmp_path / "another-node"))
    with pytest.raises(TreeError, match="codes.npy: checksum mismatch"):  # ... a fresh copy is checked
        ItemTree.load(uri)


def test_a_write_interrupted_half_way_is_refused_by_the_reader(s3, monkeypatch):
    uri = f"{s3}/interrupted/tree"
    random_balanced_tree(50, 4, seed=1).save(uri)
    uploads = []
    real_upload = publishing._upload

    def dies_on_the_third_file(fs, src, dest):
        uploads.append(dest)
        if len(uploads) == 3:
            raise KeyboardInterrupt  # Ctrl-C or a killed process, half way through the upload
        real_upload(fs, src, dest)

    monkeypatch.setattr(publishing, "_upload", dies_on_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        random_balanced_tree(60, 4, seed=2).save(uri)
    assert "manifest.json" not in objects(uri) and len(objects(uri)) >= 2  # some files, no manifest
    with pytest.raises(TreeError, match="not a tree directory"):
        ItemTree.load(uri)
    monkeypatch.setattr(publishing, "_upload", real_upload)
    random_balanced_tree(60, 4, seed=2).save(uri)  # writing it again makes it whole
    assert ItemTree.load(uri).num_items == 60


def test_publishing_never_replaces_what_it_did_not_write(s3):
    artifacts.write_bytes(f"{s3}/precious/notes.txt", b"keep me")
    with pytest.raises(ArtifactError, match="not a tree artifact; refusing to replace"):
        random_balanced_tree(50, 4, seed=1).save(f"{s3}/precious")
    assert objects(f"{s3}/precious") == {"notes.txt"}
    dataset_like = f"{s3}/other-kind"
    random_balanced_tree(50, 4, seed=1).save(dataset_like)
    fs, root = artifacts.resolve(dataset_like)
    with fs.open_output_stream(f"{root}/manifest.json") as f:
        f.write(json.dumps({"artifact": "dataset"}).encode())
    with pytest.raises(ArtifactError, match="refusing to replace"):
        random_balanced_tree(50, 4, seed=2).save(dataset_like)



def _put(where: str, files: dict[str, bytes | None]) -> None:
    """Files (bytes) and empty directories (None) under ``where``, a path or URI."""
    for rel, data in files.items():
        if data is None:
            fs, root = artifacts.resolve(artifacts.join(where, rel))
            fs.create_dir(root)
        else:
            artifacts.write_bytes(artifacts.join(where, rel), data)


def _contents(where: str) -> dict[str, bytes]:
    """Every file under ``where``, by relative path, with its bytes."""
    fs, root = artifacts.resolve(where)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root):].lstrip("/"): artifacts.read_bytes(artifacts.uri(fs, i.path))
            for i in infos if i.type == pafs.FileType.File}


TREE_MANIFEST = json.dumps({"artifact": "tree"}).encode()
REPLACEABLE = {  # what is at the destination -> the files under it (None: an empty directory)
    "nothing": {},
    "an empty directory": {"out": None},
    "a tree": {"out/manifest.json": TREE_MANIFEST, "out/codes.npy": b"old", "out/stale.npy": b"old"},
    "an interrupted publish": {f"out/{publishing.PUBLISHING}": b"", "out/codes.npy": b"half"},
}
REFUSED = {
    "someone's notes": {"out/notes.txt": b"keep me"},
    "a dataset": {"out/manifest.json": json.dumps({"artifact": "dataset"}).encode(), "out/items.parquet": b"x"},
    "an unreadable manifest": {"out/manifest.json": b"{not json", "out/codes.npy": b"x"},
    "a file": {"out": b"a file, not a directory"},
}


def _write_tree(dest: str) -> None:
    with artifacts.atomic_dir(dest, "tree") as tmp:
        (tmp / "codes.npy").write_bytes(b"new")
        artifacts.write_manifest(tmp, {"artifact": "tree", "schema_version": 1})


@pytest.mark.parametrize("disk", ["local", "s3"])
def test_one_replace_rule_and_one_publish_on_a_local_disk_and_in_a_bucket(s3, tmp_path, disk):
    """The same destinations are replaced, and the same refused untouched, whether --out is a path or a URI."""
    base = str(tmp_path) if disk == "local" else f"{s3}/replace-rule/{tmp_path.name}"
    for n, (case, files) in enumerate(REPLACEABLE.items()):
        where = artifacts.join(base, f"replaceable-{n}")
        _put(where, files)
        _write_tree(artifacts.join(where, "out"))
        manifest = artifacts.read_manifest(artifacts.join(where, "out"), "tree", 1)
        written = _contents(artifacts.join(where, "out"))
        assert set(manifest["checksums"]) == {"codes.npy"} and written["codes.npy"] == b"new", case
        assert set(written) == {"codes.npy", "manifest.json"}, case  # nothing of the old content is left
    for n, (case, files) in enumerate(REFUSED.items()):
        where = artifacts.join(base, f"refused-{n}")
        _put(where, files)
        with pytest.raises(ArtifactError, match="refusing to replace"):
            artifacts.check_replaceable(artifacts.join(where, "out"), "tree")
        with pytest.raises(ArtifactError, match="refusing to replace"):
            _write_tree(artifacts.join(where, "out"))
        assert _contents(where) == files, case  # nothing deleted, nothing added
