"""Offline evaluation (seater_dist/eval/offline.py) and `seater compare` (seater_dist/eval/compare.py) on a
tiny prepared dataset with untrained checkpoints: the same figures whatever the number of actors, the
per-user table and its manifest, and a paired comparison that refuses evaluations of other users."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seater_dist.cli import main
from seater_dist.config import EvalSettings

SEATER = {"d_model": 16, "n_heads": 2, "ffn_dim": 32, "history_len": 5, "beam_size": 50}
SASREC = {"d_model": 16, "n_heads": 2, "num_blocks": 1, "max_len": 6, "num_negatives": 8}
EVAL = {"batch_size": 8, "cpus_per_actor": 0.5}  # 300 test users: ~38 batches, enough for both actors to get some


@pytest.fixture(scope="module")
def tiny(ray_session, tmp_path_factory):
    """A 3,000-user comirec dataset over 80 items (300 test users, in one shard), an untrained SEATER (k = 4)
    and an untrained SASRec, and SEATER's evaluation with one actor and with two."""
    import torch

    from bench.local_prepare import prepare_local
    from bench.synthetic import random_balanced_tree
    from seater_dist.config import PrepareSettings, SasrecSettings, SeaterSettings
    from seater_dist.data.dataset import load_dataset
    from seater_dist.eval.offline import evaluate
    from seater_dist.model.checkpoint import save_checkpoint
    from seater_dist.model.sasrec import SASRec
    from seater_dist.model.seater import SeaterModel

    root = tmp_path_factory.mktemp("evaluation")
    rng = np.random.default_rng(0)
    lines = [" ".join([f"u{u}"] + [f"i{x}" for x in rng.integers(0, 80, rng.integers(5, 12))]) for u in range(3000)]
    (root / "seqs.txt").write_text("\n".join(lines) + "\n")
    prepare_local(PrepareSettings.build(input=str(root / "seqs.txt"), format="sequences", protocol="comirec",
                                        out=str(root / "dataset"), min_user_count=2, min_item_count=2))
    ds = load_dataset(root / "dataset")
    torch.manual_seed(0)
    tree = random_balanced_tree(ds.num_items, 4, seed=0)
    seater_settings, sasrec_settings = SeaterSettings(**SEATER), SasrecSettings(**SASREC)
    seater = save_checkpoint(root / "seater" / "best", SeaterModel(tree, seater_settings), seater_settings,
                             ds.item_ids, tree=tree)
    sasrec = save_checkpoint(root / "sasrec" / "best", SASRec(ds.num_items, sasrec_settings), sasrec_settings,
                             ds.item_ids)
    one = evaluate(seater, root / "dataset", "test", EvalSettings(concurrency=1, **EVAL), out=root / "one")
    two = evaluate(seater, root / "dataset", "test", EvalSettings(concurrency=2, **EVAL))  # default: seater/eval_test
    return SimpleNamespace(root=root, dataset=root / "dataset", seater=seater, sasrec=sasrec, one=one, two=two,
                           item_ids=ds.item_ids, test_users=ds.table("test").num_rows)


def test_metrics_are_identical_with_one_and_two_actors(tiny):
    one, two = tiny.one, tiny.two
    assert one.users == two.users == tiny.test_users
    assert one.metrics == two.metrics and one.ci95 == two.ci95  # to the last digit
    assert pq.read_table(Path(one.out) / "per_user.parquet").equals(pq.read_table(Path(two.out) / "per_user.parquet"))
    saved = [json.loads((Path(r.out) / "metrics.json").read_text()) for r in (one, two)]
    timing = {"seconds", "rank_seconds", "out"}
    same = [{k: v for k, v in s.items() if k not in timing} for s in saved]
    assert same[0] == same[1]


def test_a_finished_evaluation_is_kept_only_for_the_same_weights_dataset_and_split(tiny, tmp_path):
    """What `seater run --resume` keeps: the evaluation as evaluate() returned it, and nothing that ranked other
    weights, another split, or a damaged artifact."""
    import shutil

    from seater_dist.eval.offline import finished_evaluation

    kept = finished_evaluation(tiny.seater, tiny.dataset, "test", tiny.one.out)
    assert kept == tiny.one
    assert finished_evaluation(tiny.sasrec, tiny.dataset, "test", tiny.one.out) is None  # other weights
    assert finished_evaluation(tiny.seater, tiny.dataset, "valid", tiny.one.out) is None  # another split
    assert finished_evaluation(tiny.seater, tiny.dataset, "test", tmp_path / "nothing") is None
    damaged = shutil.copytree(tiny.one.out, tmp_path / "damaged")
    (damaged / "per_user.parquet").write_bytes(b"not the ranked users")
    assert finished_evaluation(tiny.seater, tiny.dataset, "test", damaged) is None


def test_the_default_output_is_eval_split_beside_the_checkpoint(tiny):
    assert Path(tiny.two.out) == tiny.seater.parent / "eval_test"
    assert (tiny.seater.parent / "eval_test" / "metrics.json").is_file()


def test_metrics_json_holds_each_metric_its_interval_and_the_per_user_means(tiny):
    out = Path(tiny.one.out)
    saved = json.loads((out / "metrics.json").read_text())
    table = pq.read_table(out / "per_user.parquet")
    for k in (20, 50):
        for metric in ("recall", "hr", "ndcg"):
            name = f"{metric}@{k}"
            lo, hi = saved[f"{name}_ci95"]
            assert lo <= saved[name] <= hi and 0.0 <= lo and hi <= 1.0
            assert saved[name] == pytest.approx(table.column(name).to_numpy().mean(), abs=1e-15)
    assert saved["recall@50_ci95"][1] > saved["recall@50_ci95"][0]  # untrained, but not every user alike
    assert saved["users"] == tiny.test_users and saved["bootstrap"]["resamples"] == 1000


def test_per_user_table_has_raw_ids_top_k_and_one_column_per_metric(tiny):
    out = Path(tiny.one.out)
    table = pq.read_table(out / "per_user.parquet")
    assert table.column_names == ["user_index", "user_id", "items", "hr@20", "hr@50", "ndcg@20", "ndcg@50",
                                  "recall@20", "recall@50"]
    assert table.schema.field("items").type == pa.list_(pa.string())
    users = table.column("user_index").to_numpy()
    assert (np.diff(users) > 0).all()  # sorted by user
    assert all(u.startswith("u") for u in table.column("user_id").to_pylist())
    catalogue = set(tiny.item_ids.tolist())
    for items in table.column("items").to_pylist():
        assert 0 < len(items) <= 50 and len(set(items)) == len(items) and set(items) <= catalogue
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["checksums"]) == {"metrics.json", "per_user.parquet"}
    assert manifest["artifact"] == "evaluation" and manifest["split"] == "test" and manifest["model"] == "seater"


def test_evaluate_refuses_to_replace_a_directory_that_is_not_an_evaluation(capsys, tiny):
    code = main(["evaluate", "--checkpoint", str(tiny.seater), "--data", str(tiny.dataset),
                 "--out", str(tiny.seater.parent)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not a evaluation directory" in err[0]
    assert (tiny.seater / "manifest.json").is_file()


def test_sasrec_goes_through_the_same_evaluation_and_compare_prints_the_table(capsys, tiny):
    from seater_dist.eval.offline import evaluate

    sasrec = evaluate(tiny.sasrec, tiny.dataset, "test", EvalSettings(concurrency=1, **EVAL))
    assert sasrec.model == "sasrec" and sasrec.users == tiny.one.users
    capsys.readouterr()
    out = tiny.root / "comparison.json"
    assert main(["compare", str(tiny.sasrec.parent), str(tiny.seater.parent), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"A: {tiny.sasrec.parent / 'eval_test'} (sasrec)" in text and "(seater)" in text
    header = next(line for line in text.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "A", "B", "B-A", "95%", "CI", "of", "B-A", "p"]
    saved = json.loads(out.read_text())
    for row in saved["rows"]:
        line = next(line for line in text.splitlines() if line.startswith(row["metric"] + " "))
        assert f"{row['a']:.4f}" in line and f"{row['b']:.4f}" in line and f"{row['p']:.4f}" in line
        assert line.endswith("*") == (row["p"] < 0.05) == row["significant"]
        assert row["ci95"][0] <= row["diff"] <= row["ci95"][1]
    assert saved["users"] == tiny.test_users and saved["split"] == "test"


def test_an_evaluation_compared_with_itself_differs_by_zero_with_p_one(tiny):
    from seater_dist.eval.compare import compare

    result = compare(tiny.one.out, tiny.two.out)
    assert [r.metric for r in result.rows] == sorted(tiny.one.metrics)
    for row in result.rows:
        assert row.diff == 0.0 and row.ci95 == [0.0, 0.0] and row.p == 1.0 and row.a == tiny.one.metrics[row.metric]


def _altered(src: str, dest: Path, keep_users: int | None = None, **manifest_changes) -> Path:
    """A copy of evaluation ``src`` with fewer users or other manifest fields, checksummed again."""
    from seater_dist.artifacts import write_manifest

    shutil.copytree(src, dest)
    if keep_users is not None:
        table = pq.read_table(dest / "per_user.parquet")
        pq.write_table(table.slice(0, keep_users), dest / "per_user.parquet")
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.pop("checksums")
    (dest / "manifest.json").unlink()
    write_manifest(dest, {**manifest, **manifest_changes})
    return dest


@pytest.mark.parametrize("change, message", [
    ({"keep_users": 30}, "not the same users ({all} and 30 users, {rest} in only one"),
    ({"split": "valid"}, "not the same split (test and valid)"),
    ({"catalogue": "f" * 64}, "not the same catalogue"),
    ({"questions": "e" * 64}, "other histories or ground truth"),
], ids=["users", "split", "catalogue", "questions"])
def test_compare_refuses_evaluations_that_are_not_of_the_same_users(capsys, tiny, tmp_path, change, message):
    other = _altered(tiny.one.out, tmp_path / "other", **change)
    code = main(["compare", str(tiny.one.out), str(other)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1, captured
    message = message.format(all=f"{tiny.test_users:,}", rest=f"{tiny.test_users - 30:,}")
    assert err[0].startswith("seater compare: error: ") and message in err[0] and str(other) in err[0]
    assert "metric" not in captured.out  # no table


def test_compare_of_a_directory_without_an_evaluation_names_it(capsys, tmp_path):
    code = main(["compare", str(tmp_path), str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{tmp_path}: no evaluation there" in err[0]
