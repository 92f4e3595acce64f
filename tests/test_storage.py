"""Artifacts on object storage: a real S3 API on 127.0.0.1 (the `s3` fixture), read and written by every stage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pytest

from bench.synthetic import random_balanced_tree
from seater_dist import storage
from seater_dist.artifacts import ArtifactError
from seater_dist.cli import main
from seater_dist.tree.item_tree import ItemTree, TreeError

SEATER = {"d_model": 16, "n_heads": 2, "ffn_dim": 32, "history_len": 5, "beam_size": 12}
SASREC = {"d_model": 16, "n_heads": 2, "num_blocks": 1, "max_len": 6, "num_negatives": 8}


def objects(uri: str) -> set[str]:
    """Every object under ``uri``, by path relative to it."""
    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File}


def test_a_tree_round_trips_through_s3_and_every_file_is_verified(s3, tmp_path, monkeypatch):
    tree = random_balanced_tree(50, 4, seed=1)
    uri = f"{s3}/roundtrip/tree"
    tree.save(uri)
    assert objects(uri) >= {"manifest.json", "codes.npy", "children.npy"}
    back = ItemTree.load(uri)
    assert np.array_equal(back.codes, tree.codes) and back.manifest["checksums"] == tree.manifest["checksums"]
    assert not storage.local_path(storage.local_copy(uri)).is_relative_to(tmp_path)  # a cache copy, not the cwd
    fs, root = storage.resolve(uri)
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
    real_upload = storage._upload

    def dies_on_the_third_file(fs, src, dest):
        uploads.append(dest)
        if len(uploads) == 3:
            raise KeyboardInterrupt  # Ctrl-C or a killed process, half way through the upload
        real_upload(fs, src, dest)

    monkeypatch.setattr(storage, "_upload", dies_on_the_third_file)
    with pytest.raises(KeyboardInterrupt):
        random_balanced_tree(60, 4, seed=2).save(uri)
    assert "manifest.json" not in objects(uri) and len(objects(uri)) >= 2  # some files, no manifest
    with pytest.raises(TreeError, match="not a tree directory"):
        ItemTree.load(uri)
    monkeypatch.setattr(storage, "_upload", real_upload)
    random_balanced_tree(60, 4, seed=2).save(uri)  # writing it again makes it whole
    assert ItemTree.load(uri).num_items == 60


def test_publishing_never_replaces_what_it_did_not_write(s3):
    storage.write_bytes(f"{s3}/precious/notes.txt", b"keep me")
    with pytest.raises(ArtifactError, match="not a tree artifact; refusing to replace"):
        random_balanced_tree(50, 4, seed=1).save(f"{s3}/precious")
    assert objects(f"{s3}/precious") == {"notes.txt"}
    dataset_like = f"{s3}/other-kind"
    random_balanced_tree(50, 4, seed=1).save(dataset_like)
    fs, root = storage.resolve(dataset_like)
    with fs.open_output_stream(f"{root}/manifest.json") as f:
        f.write(json.dumps({"artifact": "dataset"}).encode())
    with pytest.raises(ArtifactError, match="refusing to replace"):
        random_balanced_tree(50, 4, seed=2).save(dataset_like)


@pytest.mark.slow
def test_seater_run_keeps_every_artifact_in_s3_and_reads_them_back(ray_session, s3, tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    lines = [" ".join([f"u{u}"] + [f"i{x}" for x in rng.integers(0, 30, rng.integers(6, 12))]) for u in range(60)]
    storage.write_bytes(f"{s3}/logs/seqs.txt", ("\n".join(lines) + "\n").encode())
    config = tmp_path / "run.yaml"
    config.write_text(f"seater: {json.dumps(SEATER)}\nsasrec: {json.dumps(SASREC)}\ntree: {{k: 4}}\n"
                      "prepare: {min_user_count: 2, min_item_count: 2}\n"
                      "train: {workers: 1, cpus_per_worker: 1, batch_size: 16, epochs: 1}\n"
                      "sasrec_train: {workers: 1, cpus_per_worker: 1, batch_size: 16, epochs: 1}\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = f"{s3}/runs/r1"

    assert main(["run", "--input", f"{s3}/logs/seqs.txt", "--format", "sequences", "--out", run,
                 "--config", str(config)]) == 0
    written = objects(run)
    for artifact in ("dataset/manifest.json", "dataset/items.parquet", "sasrec/best/manifest.json",
                     "sasrec/item_embeddings.npy", "sasrec/history.json", "tree/manifest.json",
                     "seater/best/manifest.json", "seater/best/tree/codes.npy", "seater/history.json",
                     "seater/eval_test/metrics.json", "sasrec/eval_test/per_user.parquet", "report.json", "report.md",
                     "training.png"):
        assert artifact in written, artifact
    assert any(name.startswith("seater/ray_results/") for name in written)  # Ray Train's own run, in the bucket
    report = json.loads(storage.read_bytes(f"{run}/report.json"))

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", f"{run}/seater/best", "--data", f"{run}/dataset",
                 "--out", f"{run}/eval-again"]) == 0
    again = json.loads(storage.read_bytes(f"{run}/eval-again/metrics.json"))
    assert again["recall@50"] == report["seater"]["recall@50"] and again["ndcg@20"] == report["seater"]["ndcg@20"]
    assert main(["recommend", "--checkpoint", f"{run}/seater/best", "--history", "i1", "i2", "--top-n", "3"]) == 0
    assert "  1. i" in capsys.readouterr().out

    assert main(["run", "--input", f"{s3}/logs/seqs.txt", "--format", "sequences", "--out", run,
                 "--config", str(config), "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("(--resume)") == 4, out  # dataset, SASRec, tree, SEATER: all kept from the bucket
    assert list(cwd.iterdir()) == []  # nothing but temporary files was written locally
