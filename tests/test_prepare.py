"""`seater prepare`: Beauty's exact counts, the comirec and loo protocols, filters, Ray == single process."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.local_prepare import prepare_local
from seater_dist.config import PrepareSettings, SynthSettings
from seater_dist.data.dataset import load_dataset
from seater_dist.data.errors import DataError
from seater_dist.data.prepare import prepare


def _beauty_sequences(path: Path) -> dict[str, list[str]]:
    seqs = {}
    for line in path.read_text().splitlines():
        user, *items = line.split()
        seqs[user] = items
    return seqs


@pytest.fixture(scope="module")
def beauty_comirec(ray_session, beauty_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("beauty") / "dataset"
    summary = prepare(PrepareSettings(input=str(beauty_path), format="sequences", protocol="comirec", out=str(out)))
    return summary, load_dataset(out)


def test_beauty_min5_gives_the_published_counts(beauty_comirec):
    summary, ds = beauty_comirec
    assert (ds.num_users, ds.num_items, summary.interactions) == (22_363, 12_101, 198_502)
    counts = ds.manifest["counts"]
    assert counts["rows_read"] == 198_502 == counts["rows_kept"] + sum(counts["rows_dropped_by_reason"].values())
    assert list(ds.item_ids[:3]) == ["1", "2", "3"]  # numeric ids keep numeric order


def test_beauty_comirec_split_is_8_1_1_and_holds_out_the_last_20_percent(beauty_comirec, beauty_path):
    _, ds = beauty_comirec
    n = ds.num_users
    sizes = Counter(ds.users().column("split").to_pylist())
    for split, share in (("train", 0.8), ("valid", 0.1), ("test", 0.1)):
        assert abs(sizes[split] - share * n) <= 1
    raw = _beauty_sequences(beauty_path)
    users = ds.users().column("user_id").to_pylist()
    train = ds.table("train")
    assert train.num_rows == sizes["train"]
    for row in train.slice(0, 200).to_pylist():
        assert list(ds.item_ids[row["items"]]) == raw[users[row["user_index"]]]
    for split in ("valid", "test"):
        table = ds.table(split)
        assert table.num_rows == sizes[split]
        assert set(ds.users().column("split").to_numpy(zero_copy_only=False)[table.column("user_index").to_numpy()]) \
            == {split}
        for row in table.to_pylist():
            seq = raw[users[row["user_index"]]]
            assert len(row["history"]) == int(0.8 * len(seq))
            assert list(ds.item_ids[row["history"] + row["ground_truth"]]) == seq


def test_the_split_is_seeded(beauty_path, tmp_path):
    def test_users(seed: int) -> set:
        out = tmp_path / f"s{seed}"
        prepare_local(PrepareSettings(input=str(beauty_path), format="sequences", out=str(out), seed=seed))
        return set(load_dataset(out).table("test").column("user_index").to_pylist())

    assert test_users(0) == test_users(0) != test_users(1)


def test_beauty_loo_holds_out_the_last_two_items(beauty_path, tmp_path):
    prepare_local(PrepareSettings(input=str(beauty_path), format="sequences", protocol="loo", out=str(tmp_path / "d")))
    ds = load_dataset(tmp_path / "d")
    raw = _beauty_sequences(beauty_path)
    users = ds.users().column("user_id").to_pylist()
    assert set(ds.users().column("split").to_pylist()) == {"all"}
    train, valid, test = (ds.table(s).to_pylist() for s in ("train", "valid", "test"))
    assert len(train) == len(valid) == len(test) == 22_363
    for tr, va, te in zip(train, valid, test):
        seq = list(ds.item_ids[te["history"] + te["ground_truth"]])
        assert seq == raw[users[te["user_index"]]]
        assert tr["items"] == va["history"] == te["history"][:-1]
        assert va["ground_truth"] == [te["history"][-1]] and len(te["ground_truth"]) == 1


def test_ml100k_reads_and_prepares(ml100k_path, tmp_path):
    """Counts against an independent pure-Python count: items under 5 first, then users under 5."""
    summary = prepare_local(PrepareSettings(input=str(ml100k_path), format="movielens", out=str(tmp_path / "d")))
    rows = [line.split("\t") for line in ml100k_path.read_text().splitlines()[1:]]
    item_count = Counter(r[1] for r in rows)
    kept = [r for r in rows if item_count[r[1]] >= 5]
    user_count = Counter(r[0] for r in kept)
    kept = [r for r in kept if user_count[r[0]] >= 5]
    assert summary.interactions == len(kept)
    assert summary.users == len({r[0] for r in kept}) and summary.items == len({r[1] for r in kept})
    ds = load_dataset(tmp_path / "d")
    # time order within a user, ties broken by file order
    user0 = ds.users().column("user_id")[0].as_py()
    expected = sorted(((float(r[3]), i, r[1]) for i, r in enumerate(kept) if r[0] == user0))
    split = ds.users().column("split")[0].as_py()
    row = ds.table(split).filter(ds.table(split).column("user_index").to_numpy() == 0).to_pylist()[0]
    seq = row.get("items") or row["history"] + row["ground_truth"]
    assert list(ds.item_ids[seq]) == [e[2] for e in expected]
    items = ds.items()
    assert items.column("count").to_numpy().sum() == summary.interactions


def _write_rows(path: Path, rows: list[tuple[int, str]]) -> None:
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for t, (u, i) in enumerate(rows)))


def test_one_pass_filter_versus_iterated_k_core(tmp_path):
    """Counts a 5, b 4, c 3. min_item 4 / min_user 2, one pass (ComiRec): c goes, then users 4-6 (one
    item left each); a and b end with 3 each, under 4, and stay. The k-core iterates: a and b go too."""
    p = tmp_path / "k.csv"
    _write_rows(p, [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "a"), (3, "b"), (4, "b"), (4, "c"),
                    (5, "a"), (5, "c"), (6, "a"), (6, "c")])
    one = prepare_local(PrepareSettings(input=str(p), format="interactions", out=str(tmp_path / "one"),
                                        min_user_count=2, min_item_count=4))
    assert (one.users, one.items, one.interactions) == (3, 2, 6)
    assert load_dataset(tmp_path / "one").items().column("count").to_pylist() == [3, 3]
    dropped = load_dataset(tmp_path / "one").manifest["counts"]["rows_dropped_by_reason"]
    assert dropped == {"item_below_min_count": 3, "user_below_min_count": 3}
    with pytest.raises(DataError, match="no interactions left after the filters"):
        prepare_local(PrepareSettings(input=str(p), format="interactions", out=str(tmp_path / "core"),
                                      min_user_count=2, min_item_count=4, k_core=True))
    core = prepare_local(PrepareSettings(input=str(p), format="interactions", out=str(tmp_path / "core3"),
                                         min_user_count=2, min_item_count=3, k_core=True))
    assert (core.users, core.items, core.interactions) == (6, 3, 12)


def test_ray_and_single_process_write_the_same_dataset(ray_session, tmp_path):
    """Tiny synth plus bad rows and duplicates, k-core and drop_consecutive: both engines agree exactly."""
    from seater_dist.data.synth import synthesize

    synthesize(SynthSettings(preset="tiny", out=str(tmp_path / "syn")))
    (tmp_path / "syn" / "zz_bad.csv").write_text(
        "user_id,item_id,timestamp\n5,6\n-1,3,4\n7,8,never\n1,1,1\n1,1,1\n")
    results = {}
    for name, fn in (("ray", prepare), ("local", prepare_local)):
        for input_ in (tmp_path / "syn",):
            s = PrepareSettings(input=str(input_), format="interactions", out=str(tmp_path / name),
                                k_core=True, duplicates="drop_consecutive", num_blocks=3)
            results[name] = fn(s)
    a, b = load_dataset(tmp_path / "ray"), load_dataset(tmp_path / "local")
    for split in ("train", "valid", "test"):
        assert a.table(split).equals(b.table(split)), split
    assert a.items().equals(b.items()) and a.users().equals(b.users())
    assert a.manifest["counts"] == b.manifest["counts"]
    dropped = a.manifest["counts"]["rows_dropped_by_reason"]
    assert dropped["malformed_line"] == 1 and dropped["negative_user_id"] == 1
    assert dropped["unparsable_timestamp"] == 1 and dropped["duplicate"] >= 1
    rej = pq.read_table(tmp_path / "ray" / "rejected")
    assert rej.num_rows == sum(v for k, v in dropped.items() if not k.endswith("min_count"))


def test_load_dataset_refuses_other_directories(tmp_path):
    with pytest.raises(DataError, match="not a dataset directory"):
        load_dataset(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="not a dataset directory"):
        load_dataset(tmp_path / "f")


def test_the_cli_prints_one_line_and_exits_2(ray_session, tmp_path, capsys):
    from seater_dist.cli import main

    code = main(["prepare", "--input", str(tmp_path / "nope.csv"), "--format", "interactions",
                 "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"seater prepare: error: {tmp_path / 'nope.csv'}: input not found"


def test_manifest_checksums_match_the_files(beauty_comirec):
    import hashlib

    _, ds = beauty_comirec
    sums = ds.manifest["checksums"]
    assert {"items.parquet", "users.parquet"} <= set(sums)
    assert any(k.startswith("train/") for k in sums)
    for rel, digest in sums.items():
        assert hashlib.sha256((ds.path / rel).read_bytes()).hexdigest() == digest
    assert json.loads((ds.path / "manifest.json").read_text())["artifact"] == "dataset"
    assert np.all(ds.table("train").column("user_index").to_numpy() < ds.num_users)
