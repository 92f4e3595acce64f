"""Readers and bad input: every format parses, every bad row is rejected with its reason, file and row,
every input that is not data fails with one line naming the file or column. No Ray needed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.local_prepare import prepare_local
from seater_dist.config import PrepareSettings
from seater_dist.data.chunks import integer_ids, list_input_files, plan_chunks, reader_options
from seater_dist.data.errors import DataError
from seater_dist.data.readers import read_chunk, unify
from seater_dist.data.row_checks import empty_rejected


def _read(path: Path, fmt: str, **cols) -> tuple[pa.Table, pa.Table]:
    """Every chunk of ``path`` read in this process, as prepare's read step plans and reads them -> (good rows,
    rejected rows)."""
    opts = reader_options(fmt, cols.get("user"), cols.get("item"), cols.get("time"))
    fs, files = list_input_files(str(path), opts.format)
    opts = integer_ids(fs, files, opts)
    goods, rejected = [], []
    for chunk in plan_chunks(fs, files, opts):
        good, rej = read_chunk(chunk, opts)
        goods.append(good)
        rejected.append(rej)
    return unify(goods), pa.concat_tables(rejected) if rejected else empty_rejected()


def _prep(tmp_path: Path, path: Path, fmt: str, **kw) -> dict:
    settings = PrepareSettings(input=str(path), format=fmt, out=str(tmp_path / "ds"), **kw)
    prepare_local(settings)
    return json.loads((tmp_path / "ds" / "manifest.json").read_text())


def test_sequences_line_order_is_time_order(tmp_path):
    p = tmp_path / "seq.txt"
    p.write_text("u1 b a c\nu2 x\n")
    good, rejected = _read(p, "sequences")
    rows = good.sort_by([("user", "ascending"), ("ts", "ascending")]).to_pydict()
    assert rows["user"] == ["u1", "u1", "u1", "u2"]
    assert rows["item"] == ["b", "a", "c", "x"]
    assert rejected.num_rows == 0


def test_movielens_recbole_inter_and_ratings_dat(tmp_path, ml100k_path):
    good, rejected = _read(ml100k_path, "movielens")
    assert good.num_rows == 100_000 and rejected.num_rows == 0
    first = good.slice(0, 1).to_pylist()[0]
    assert (first["user"], first["item"], first["ts"]) == ("196", "242", 881250949)
    dat = tmp_path / "ratings.dat"
    dat.write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    good, _ = _read(dat, "movielens")
    assert good.column("item").to_pylist() == ["1193", "661"]
    assert good.column("ts").to_pylist() == [978300760, 978302109]


def test_interactions_csv_tsv_parquet_with_renamed_columns(tmp_path):
    (tmp_path / "a.csv").write_text("uid,vid,ts\n7,70,100\n8,80,200\n")
    (tmp_path / "b.tsv").write_text("uid\tvid\tts\n9\t90\t300\n")
    pq.write_table(pa.table({"uid": [10], "vid": [100], "ts": [400]}), tmp_path / "c.parquet")
    for name, n in (("a.csv", 2), ("b.tsv", 1)):
        good, rej = _read(tmp_path / name, "interactions", user="uid", item="vid", time="ts")
        assert good.num_rows == n and rej.num_rows == 0
    good, _ = _read(tmp_path / "c.parquet", "interactions", user="uid", item="vid", time="ts")
    assert good.to_pylist()[0] | {"ord": 0} == {"user": 10, "item": 100, "ts": 400, "ord": 0}


def test_amazon_yelp_mind(tmp_path):
    amazon = tmp_path / "reviews.json"
    amazon.write_text(json.dumps({"reviewerID": "A1", "asin": "B9", "unixReviewTime": 1400000000}) + "\n")
    good, _ = _read(amazon, "amazon")
    assert good.to_pylist()[0]["item"] == "B9" and good.to_pylist()[0]["ts"] == 1400000000
    yelp = tmp_path / "review.json"
    yelp.write_text(json.dumps({"user_id": "u", "business_id": "b", "date": "2018-07-07 22:09:11"}) + "\n")
    good, _ = _read(yelp, "yelp")
    assert good.to_pylist()[0]["ts"] == 1531001351
    mind = tmp_path / "behaviors.tsv"
    mind.write_text("1\tU1\t11/15/2019 8:55:22 AM\tN1 N2\tN3-1 N4-0 N5-1\n"
                    "2\tU1\t11/15/2019 9:00:00 AM\tN1 N2\tN6-1\n")
    manifest = _prep(tmp_path, mind, "mind", min_user_count=2, min_item_count=1)
    from seater_dist.data.dataset import load_dataset

    ds = load_dataset(tmp_path / "ds")
    train = ds.table("train").to_pylist() + ds.table("valid").to_pylist() + ds.table("test").to_pylist()
    seq = train[0].get("items") or train[0]["history"] + train[0]["ground_truth"]
    assert list(ds.item_ids[seq]) == ["N1", "N2", "N3", "N5", "N6"]  # history first, then clicks in time
    assert manifest["counts"]["rows_dropped_by_reason"]["mind_history_repeat"] == 2


# ---------------------------------------------------------------------------------------------
# Bad input: rejected with reason, file and row; or a one-line error naming the file / column
# ---------------------------------------------------------------------------------------------

_BAD_CSV = (
    "user_id,item_id,timestamp\n"   # row 1
    "1,10,100\n"                     # 2 ok
    "1,11\n"                         # 3 malformed: 2 fields
    ",12,102\n"                      # 4 missing user id
    "1,-13,103\n"                    # 5 negative item id
    "1,14,yesterday\n"               # 6 unparsable timestamp
    "1,15,105\n"                     # 7 ok
    "1,15,105\n"                     # 8 exact duplicate of row 7
    "1,16,106,9\n"                   # 9 malformed: 4 fields
)


def test_each_bad_row_is_rejected_with_reason_file_and_row(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text(_BAD_CSV)
    manifest = _prep(tmp_path, p, "interactions", min_user_count=2, min_item_count=1, duplicates="drop_exact")
    rejected = pq.read_table(tmp_path / "ds" / "rejected").sort_by("row").to_pylist()
    assert [(r["row"], r["reason"]) for r in rejected] == [
        (3, "malformed_line"), (4, "missing_user_id"), (5, "negative_item_id"),
        (6, "unparsable_timestamp"), (8, "duplicate"), (9, "malformed_line")]
    assert all(r["file"] == str(p) for r in rejected)
    assert rejected[0]["raw"] == "1,11" and "expected 3 fields, got 2" in rejected[0]["detail"]
    counts = manifest["counts"]
    assert counts["rows_read"] == 8 == counts["rows_kept"] + sum(counts["rows_dropped_by_reason"].values())
    assert counts["rows_kept"] == 2 and counts["interactions"] == 2


def test_duplicates_are_kept_by_default_and_dropped_on_request(tmp_path):
    p = tmp_path / "dups.csv"
    p.write_text("user_id,item_id,timestamp\n1,5,1\n1,5,1\n1,6,2\n1,6,3\n1,5,4\n")
    kept = _prep(tmp_path, p, "interactions", min_user_count=2, min_item_count=1)
    assert kept["counts"]["rows_kept"] == 5
    exact = _prep(tmp_path, p, "interactions", min_user_count=2, min_item_count=1, duplicates="drop_exact")
    assert exact["counts"]["rows_kept"] == 4 and exact["counts"]["rows_dropped_by_reason"]["duplicate"] == 1
    consecutive = _prep(tmp_path, p, "interactions", min_user_count=2, min_item_count=1,
                        duplicates="drop_consecutive")
    assert consecutive["counts"]["rows_kept"] == 3  # 5 5 6 6 5 -> 5 6 5


def test_malformed_json_and_sequence_lines_are_rejected(tmp_path):
    p = tmp_path / "r.json"
    good = {"reviewerID": "A", "asin": "B", "unixReviewTime": 5}
    p.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({**good, "asin": None}) + "\n")
    _, rejected = _read(p, "amazon")
    assert [(r["row"], r["reason"]) for r in rejected.to_pylist()] == [(2, "malformed_line"), (3, "missing_asin")]
    s = tmp_path / "seq.txt"
    s.write_text("u1 a b\nlonely\n\nu2 -4 c\n")
    _, rejected = _read(s, "sequences")
    assert sorted((r["row"], r["reason"]) for r in rejected.to_pylist()) == [
        (2, "empty_sequence"), (3, "blank_line"), (4, "negative_item")]


@pytest.mark.parametrize("case, message", [
    ("missing", "input not found"),
    ("empty", "empty file (no rows)"),
    ("header_only", "a header and no rows"),
    ("wrong_columns", "no column 'user_id' (user column); columns are: uid, item_id, timestamp"),
    ("all_bad", "no valid rows (2 rejected; first:"),
])
def test_inputs_that_are_not_data_fail_with_one_line(tmp_path, case, message):
    p = tmp_path / "in.csv"
    content = {"empty": "", "header_only": "user_id,item_id,timestamp\n",
               "wrong_columns": "uid,item_id,timestamp\n1,2,3\n",
               "all_bad": "user_id,item_id,timestamp\n1\n2\n"}.get(case)
    if content is not None:
        p.write_text(content)
    with pytest.raises(DataError) as err:
        _prep(tmp_path, p, "interactions")
    text = str(err.value)
    assert message in text and "\n" not in text
    if case != "missing":
        assert str(p) in text
    assert not (tmp_path / "ds").exists()  # nothing half-written


def test_wrong_parquet_column_names_name_the_column(tmp_path):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"user": [1], "item_id": [2], "timestamp": [3]}), p)
    with pytest.raises(DataError, match=r"x.parquet: no column 'user_id' \(user column\); columns are: user,"):
        _prep(tmp_path, p, "interactions")


def test_loo_needs_three_items_per_user(tmp_path):
    with pytest.raises(DataError, match="min_user_count: the loo protocol needs at least 3"):
        _prep(tmp_path, tmp_path / "x.csv", "interactions", protocol="loo", min_user_count=2)
