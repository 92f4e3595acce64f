"""Ray Train end to end on tiny synthetic data: the whole pipeline, DDP really syncing (sparse table
included), a killed worker resuming from its last checkpoint, --resume, and offline evaluation agreeing
exactly with in-training validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seater_dist.config import RunSettings, SynthSettings, TrainSettings

FAST_TRAIN = {"workers": 2, "cpus_per_worker": 0.5, "batch_size": 128, "patience": 5, "max_failures": 2}


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    """`seater run` on the tiny synthetic preset: every stage, 2 workers, 3 epochs each."""
    from seater_dist.data.synth import synthesize
    from seater_dist.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("tiny_run")
    synthesize(SynthSettings(preset="tiny", out=str(root / "synth"), seed=3))
    settings = RunSettings.model_validate({
        "tree": {"k": 8},
        "sasrec": {"num_blocks": 1, "num_negatives": 64},
        "train": {**FAST_TRAIN, "epochs": 3},
        "sasrec_train": {**FAST_TRAIN, "epochs": 3},
    })
    report = run_pipeline(str(root / "synth"), "interactions", "comirec", root / "run", settings)
    return root / "run", report


def test_run_writes_every_artifact_and_a_comparable_report(tiny_run):
    out, report = tiny_run
    for artifact in ("dataset/manifest.json", "sasrec/item_embeddings.npy", "tree/manifest.json",
                     "seater/best/model.pt", "seater/best/tree/manifest.json", "report.json", "training.png"):
        assert (out / artifact).exists(), artifact
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) >= {"seater", "sasrec", "settings", "seconds"}
    for model in ("seater", "sasrec"):
        for key in ("recall@20", "recall@50", "hr@20", "hr@50", "ndcg@20", "ndcg@50"):
            assert 0.0 <= saved[model][key] <= 1.0
        assert saved[model]["recall@50"] >= saved[model]["recall@20"]
    from seater_dist.data.dataset import load_dataset

    assert saved["test_users"] == load_dataset(out / "dataset").table("test").num_rows
    for model in ("seater", "sasrec"):  # each figure inside its own 95% interval
        for key, (lo, hi) in saved["ci95"][model].items():
            assert lo <= saved[model][key] <= hi, (model, key)
    for key, pair in saved["paired"].items():  # the paired difference is the difference of the two means
        assert pair["diff"] == pytest.approx(saved["seater"][key] - saved["sasrec"][key], abs=1e-12)
        assert pair["ci95"][0] <= pair["diff"] <= pair["ci95"][1] and 0.0 < pair["p"] <= 1.0
    assert "SEATER - SASRec on the same" in (out / "report.md").read_text()


def test_two_workers_hold_identical_parameters_every_epoch(tiny_run):
    out, _ = tiny_run
    history = json.loads((out / "seater" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert all(r["params_in_sync"] == 1 for r in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(r["bytes_per_step"] > 0 for r in history)  # two workers really communicated


def test_trained_models_beat_random_ranking(tiny_run):
    out, report = tiny_run
    num_items = json.loads((out / "tree" / "manifest.json").read_text())["num_items"]
    for metrics in (report.seater, report.sasrec):
        assert metrics["hr@50"] > 1.5 * 50 / num_items


def test_offline_evaluation_equals_in_training_validation(tiny_run):
    """Ray Data batch inference and the Train loop's validation rank identically."""
    from seater_dist.eval.offline import evaluate

    out, _ = tiny_run
    history = json.loads((out / "seater" / "history.json").read_text())
    best = max(history, key=lambda r: r["valid_recall@50"])
    metrics = evaluate(out / "seater" / "best", out / "dataset", split="valid", out=out / "valid_eval").metrics
    for key in ("recall@50", "ndcg@20", "hr@20"):
        assert metrics[key] == pytest.approx(best[f"valid_{key}"], abs=1e-9)


def test_a_killed_worker_resumes_from_the_last_checkpoint_and_resume_continues_the_run(tiny_run, tmp_path,
                                                                                      monkeypatch):
    """Ray Train restarts the group after a worker dies (from the last reported epoch, workers identical); then
    --resume with a larger epoch budget continues that finished run from its last epoch instead of starting over."""
    from seater_dist.train.loop import KILL_WORKER_ENV
    from seater_dist.train.trainer import train_seater

    out, _ = tiny_run
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_WORKER_ENV, f"1,1,2,{marker}")  # rank 1, epoch 1, step 2
    # No L2 on the table: its rows are caught up per row, which must keep the workers identical too.
    settings = {**FAST_TRAIN, "table_weight_decay": 0.0}
    first = train_seater(out / "dataset", out / "tree", tmp_path / "seater", TrainSettings(**settings, epochs=2))
    assert marker.exists(), "the fault was never injected"
    assert [r["epoch"] for r in first.history] == [0, 1]
    assert [r["resumed_from_epoch"] for r in first.history] == [-1, 0]
    assert all(r["params_in_sync"] == 1 for r in first.history)
    assert (first.best_checkpoint / "model.pt").exists()

    monkeypatch.delenv(KILL_WORKER_ENV)
    second = train_seater(out / "dataset", out / "tree", tmp_path / "seater", TrainSettings(**settings, epochs=3),
                          resume=True)
    assert [r["epoch"] for r in second.history] == [0, 1, 2]
    assert second.history[:2] == first.history
    assert second.history[2]["resumed_from_epoch"] == 1 and second.history[2]["params_in_sync"] == 1


def test_sasrec_embeddings_cover_every_item(tiny_run):
    out, _ = tiny_run
    emb = np.load(out / "sasrec" / "item_embeddings.npy")
    num_items = json.loads((out / "dataset" / "manifest.json").read_text())["counts"]["items"]
    assert emb.shape == (num_items, 64)
    assert np.isfinite(emb).all()


def test_the_default_start_reads_the_embeddings_the_tree_records(tiny_run, tmp_path):
    import shutil

    from seater_dist.config import SettingsError
    from seater_dist.train.trainer import _checked_embeddings, train_seater

    out, _ = tiny_run
    embeddings = (out / "sasrec" / "item_embeddings.npy").resolve()
    tree = json.loads((out / "tree" / "manifest.json").read_text())
    assert tree["embeddings"] == str(embeddings)
    assert _checked_embeddings(None, tree, out / "tree") == str(embeddings)

    def tree_recording(name: str, recorded: str | None):
        tree = shutil.copytree(out / "tree", tmp_path / name)
        manifest = json.loads((tree / "manifest.json").read_text())
        manifest.pop("embeddings")
        if recorded is not None:
            manifest["embeddings"] = recorded
        (tree / "manifest.json").write_text(json.dumps(manifest))
        return tree

    cases = {  # each refused before any worker starts, naming the way out
        "no record": (tree_recording("unrecorded", None), None, "token_init: random"),
        "record gone": (tree_recording("gone", str(tmp_path / "moved.npy")), None, "moved.npy, which is gone"),
        "other file": (out / "tree", tmp_path / "other.npy", "not the embeddings the tree"),
    }
    np.save(tmp_path / "other.npy", np.random.default_rng(0).normal(size=np.load(embeddings).shape).astype(np.float32))
    for case, (tree, given, says) in cases.items():
        with pytest.raises(SettingsError, match=says):
            train_seater(out / "dataset", tree, tmp_path / case, TrainSettings(**FAST_TRAIN), embeddings=given)
        assert not (tmp_path / case).exists() or not any((tmp_path / case).iterdir()), case
