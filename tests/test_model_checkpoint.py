"""The one checkpoint format of both models (save/load, atomic, checksummed, files confined to their
directory) and SeaterRetriever on raw item ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.synthetic import random_balanced_tree
from seater_dist.artifacts import ArtifactError
from seater_dist.config import SasrecSettings, SeaterSettings
from seater_dist.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from seater_dist.model.retriever import ItemIdIndex, SeaterRetriever
from seater_dist.model.sasrec import SASRec
from seater_dist.model.seater import SeaterModel

N = 60


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    tree = random_balanced_tree(N, k=4, seed=0)
    settings = SeaterSettings(d_model=16, n_heads=2, ffn_dim=32, history_len=5, beam_size=12)
    model = SeaterModel(tree, settings)
    item_ids = np.array([f"sku-{i:03d}" for i in range(N)], dtype=object)
    path = save_checkpoint(tmp_path / "ckpt", model, settings, item_ids, tree=tree,
                           extra={"epoch": 3, "recall@50": 0.25})
    return path, model.eval(), settings, tree, item_ids


@pytest.fixture
def sasrec_checkpoint(tmp_path):
    torch.manual_seed(1)
    settings = SasrecSettings(d_model=16, n_heads=2, num_blocks=1, max_len=6, num_negatives=8)
    model = SASRec(N, settings)
    item_ids = np.array([f"sku-{i:03d}" for i in range(N)], dtype=object)
    return save_checkpoint(tmp_path / "sasrec", model, settings, item_ids, extra={"epoch": 1}), model.eval()


def test_round_trip_gives_the_same_model_tree_items_and_recommendations(trained):
    path, model, settings, tree, item_ids = trained
    assert sorted(p.name for p in path.iterdir()) == ["items.parquet", "manifest.json", "model.pt", "settings.json",
                                                      "tree"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"
    ckpt = load_checkpoint(path)
    loaded = ckpt.model
    assert ckpt.kind == "seater" and not loaded.training and ckpt.settings == settings
    assert np.array_equal(ckpt.tree.codes, tree.codes) and list(ckpt.item_ids) == list(item_ids)
    assert ckpt.manifest["extra"] == {"epoch": 3, "recall@50": 0.25} and ckpt.num_items == N
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    h = torch.randint(0, N, (4, 5))
    a, b = model.beam_search(h, 12, 10), loaded.beam_search(h, 12, 10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.array_equal(ckpt.topk(h.tolist(), 10), a[0].numpy())


def test_sasrec_checkpoint_loads_through_the_same_function(sasrec_checkpoint):
    path, model = sasrec_checkpoint
    assert sorted(p.name for p in path.iterdir()) == ["item_embeddings.npy", "items.parquet", "manifest.json",
                                                      "model.pt", "settings.json"]
    ckpt = load_checkpoint(path)
    assert ckpt.kind == "sasrec" and ckpt.tree is None and ckpt.num_items == N
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[key], value)
    histories = [[1, 2, 3], [], [59] * 9]
    expected = model.topk(histories, 10)
    assert np.array_equal(ckpt.topk(histories, 10), expected)
    assert expected.shape == (3, 10) and (expected >= 0).all()


@pytest.mark.parametrize("kind", ["seater", "sasrec"])
@pytest.mark.parametrize("name", ["model.pt", "settings.json", "items.parquet"])
def test_one_flipped_byte_in_either_kind_is_refused_naming_the_file(trained, sasrec_checkpoint, kind, name):
    path = trained[0] if kind == "seater" else sasrec_checkpoint[0]
    target = path / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name}: checksum mismatch"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "fifo"])
def test_manifest_naming_a_path_outside_or_a_non_file_is_refused(trained, name):
    import os

    path = trained[0]
    if name == "fifo":
        os.mkfifo(path / "fifo")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["checksums"][name] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a path inside the artifact|not a regular file"):
        load_checkpoint(path)


def test_symlink_leaving_the_checkpoint_is_refused(trained, tmp_path):
    path = trained[0]
    outside = tmp_path / "outside.json"
    outside.write_text((path / "settings.json").read_text())
    (path / "settings.json").unlink()
    (path / "settings.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="leaves the artifact directory"):
        load_checkpoint(path)


def test_saving_again_replaces_the_checkpoint(trained):
    path, model, settings, tree, item_ids = trained
    save_checkpoint(path, model, settings, item_ids, tree=tree, extra={"epoch": 4})
    assert load_checkpoint(path).manifest["extra"] == {"epoch": 4}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_saving_over_a_directory_that_is_not_a_checkpoint_is_refused(trained, tmp_path):
    _, model, settings, tree, item_ids = trained
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a checkpoint directory; refusing"):
        save_checkpoint(precious, model, settings, item_ids, tree=tree)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_altered_or_missing_files_are_named_in_the_error(trained, tmp_path):
    path = trained[0]
    settings_file = path / "settings.json"
    settings_file.write_text(settings_file.read_text().replace('"beam_size": 12', '"beam_size": 13'))
    with pytest.raises(CheckpointError, match="settings.json: checksum mismatch"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(tmp_path)
    (path / "items.parquet").unlink()
    with pytest.raises(CheckpointError, match="items.parquet: missing"):
        load_checkpoint(path)


def test_wrong_schema_version_is_refused(trained):
    path = trained[0]
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(CheckpointError, match="schema_version 99"):
        load_checkpoint(path)


def test_item_ids_must_match_the_tree(trained, tmp_path):
    _, model, settings, tree, item_ids = trained
    with pytest.raises(CheckpointError, match="item_ids has shape"):
        save_checkpoint(tmp_path / "bad", model, settings, item_ids[:-1], tree=tree)


def test_retriever_maps_raw_ids_and_matches_beam_search(trained):
    path, model, settings, tree, item_ids = trained
    retriever = SeaterRetriever.from_checkpoint(path, batch_size=2)  # several batches
    histories = [
        ["sku-001", "sku-007", "nope", "sku-042"],
        [],
        ["ghost"],
        [f"sku-{i:03d}" for i in range(20)],  # longer than t: the last 5 count
        ["sku-059"],
    ]
    out = retriever.recommend(histories, top_n=10)
    assert [r["ignored"] for r in out] == [["nope"], [], ["ghost"], [], []]
    pad = tree.pad
    expected_rows = [[pad, pad, 1, 7, 42], [pad] * 5, [pad] * 5, list(range(15, 20)), [pad] * 4 + [59]]
    items, scores = model.beam_search(torch.tensor(expected_rows), 12, 10)
    for row, rec in enumerate(out):
        assert rec["items"] == [item_ids[i] for i in items[row].tolist()]
        np.testing.assert_allclose(rec["scores"], scores[row].numpy(), rtol=1e-5, atol=1e-5)
        assert len(rec["items"]) == 10 and len(set(rec["items"])) == 10
    assert out[1] == out[2] | {"ignored": []}  # unknown-only history = empty history
    with pytest.raises(ValueError, match="top_n must be in 1..12"):
        retriever.recommend([["sku-001"]], top_n=13)
    with pytest.raises(TypeError, match="single string"):
        retriever.recommend(["sku-001"], top_n=5)


def test_item_id_index_lookup_and_duplicates():
    index = ItemIdIndex(np.array(["b", "a", "c"], dtype=object))
    assert index.lookup(["a", "zz", "c", "b"]).tolist() == [1, -1, 2, 0]
    assert index.lookup([]).tolist() == []
    with pytest.raises(ValueError, match="'a' appears more than once"):
        ItemIdIndex(np.array(["a", "b", "a"]))


def test_a_loaded_seater_ranks_but_refuses_to_train_and_reads_its_ids_on_first_use(trained):
    """load_checkpoint builds a ranking-only model (no L_rank sampler: seconds at millions of items) and reads
    items.parquet only when the raw ids are asked for."""
    path, model, settings, tree, item_ids = trained
    ckpt = load_checkpoint(path)
    assert ckpt.model.rank_sampler is None and ckpt._item_ids is None
    with pytest.raises(RuntimeError, match="trainable=False"):
        ckpt.model.train()(torch.randint(0, N, (2, 5)), torch.randint(0, N, (2,)))
    assert list(ckpt.item_ids) == list(item_ids) and ckpt._item_ids is not None
