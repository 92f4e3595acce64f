"""`seater synth`: exact sizes, identical output for a seed, planted structure a model can find."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.local_prepare import prepare_local
from seater_dist.config import PrepareSettings, SynthSettings
from seater_dist.data.dataset import load_dataset
from seater_dist.data.errors import DataError
from seater_dist.data.synth import PRESETS, generate_partition, make_world, sequence_lengths, spec_for, synthesize


@pytest.fixture(scope="module")
def tiny(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    summary = synthesize(SynthSettings(preset="tiny", out=str(out)))
    return out, summary


def test_tiny_has_the_preset_sizes_and_int64_columns(tiny):
    out, summary = tiny
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert table.schema == pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    assert table.num_rows == summary.interactions == 8_000
    assert len(set(table.column("user_id").to_pylist())) == 300
    assert table.column("item_id").to_numpy().max() < 400
    per_user = Counter(table.column("user_id").to_pylist())
    assert min(per_user.values()) >= 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"] == "tiny" and manifest["seed"] == 0 and manifest["counts"]["interactions"] == 8_000


def test_same_seed_same_files_other_seed_other_files(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    synthesize(SynthSettings(preset="tiny", out=str(again)))
    first = json.loads((out / "manifest.json").read_text())["checksums"]
    second = json.loads((again / "manifest.json").read_text())["checksums"]
    assert first == second and len(first) == 2
    for name in first:
        assert (out / name).read_bytes() == (again / name).read_bytes()
    other = tmp_path / "other"
    synthesize(SynthSettings(preset="tiny", out=str(other), seed=1))
    assert json.loads((other / "manifest.json").read_text())["checksums"] != first


def test_each_user_has_strictly_increasing_timestamps(tiny):
    out, _ = tiny
    t = pq.read_table(sorted(out.glob("part-*.parquet")))
    t = t.sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    users, ts = t.column("user_id").to_numpy(), t.column("timestamp").to_numpy()
    same_user = users[1:] == users[:-1]
    assert (ts[1:][same_user] > ts[:-1][same_user]).all()


def test_lengths_sum_exactly_and_popularity_is_a_power_law():
    spec = PRESETS["small"]
    lengths = sequence_lengths(spec, seed=3)
    assert lengths.sum() == spec.num_interactions and lengths.min() >= spec.min_length
    world = make_world(spec, seed=3)
    table = generate_partition(spec, world, lengths[:2000], 0, seed=3, part=0)
    counts = np.sort(np.bincount(table.column("item_id").to_numpy(), minlength=spec.num_items))[::-1]
    top, rest = counts[: spec.num_items // 100].sum(), counts.sum()
    assert top / rest > 0.08  # the top 1% of items draw well over 1% of the interactions


def test_planted_topics_predict_the_next_item_far_better_than_popularity(ray_session, tmp_path):
    """The planted structure is measurable: ranking the last item's leaf topic by popularity beats
    global popularity at Recall@50 on the test users of the `small` preset, by a wide margin."""
    synthesize(SynthSettings(preset="small", out=str(tmp_path / "syn")))
    prepare_local(PrepareSettings(input=str(tmp_path / "syn"), format="interactions", out=str(tmp_path / "ds")))
    ds = load_dataset(tmp_path / "ds")
    topics = pq.read_table(tmp_path / "syn" / "_item_topics.parquet")
    leaf_of_raw = dict(zip(topics.column("item_id").to_pylist(), topics.column("leaf_topic").to_pylist()))
    leaf = np.array([leaf_of_raw[int(i)] for i in ds.item_ids])
    counts = ds.items().column("count").to_numpy()
    popular = np.argsort(-counts, kind="stable")[:50]
    by_leaf = {t: idx[np.argsort(-counts[idx], kind="stable")][:50] for t in np.unique(leaf)
               for idx in [np.flatnonzero(leaf == t)]}
    pop_recall, topic_recall = [], []
    for row in ds.table("test").to_pylist():
        truth = set(row["ground_truth"])
        pop_recall.append(len(truth & set(popular.tolist())) / len(truth))
        topic_recall.append(len(truth & set(by_leaf[leaf[row["history"][-1]]].tolist())) / len(truth))
    assert np.mean(topic_recall) > 2 * np.mean(pop_recall)


def test_overrides_and_bad_sizes():
    spec = spec_for(SynthSettings(preset="tiny", out="x", num_users=10, num_interactions=100, num_partitions=1))
    assert (spec.num_users, spec.num_items, spec.num_interactions, spec.num_partitions) == (10, 400, 100, 1)
    with pytest.raises(DataError, match="num_interactions: 20 is below 5 per user"):
        spec_for(SynthSettings(preset="tiny", out="x", num_users=10, num_interactions=20))
