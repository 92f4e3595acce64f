"""The item tree builders (seater_dist/tree/builder.py): docs/method.md §1 shape, ablations, manifest, Ray."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench.synthetic import skewed_clustered_embeddings
from seater_dist.config import TreeSettings
from seater_dist.tree import ItemTree, TreeError, depth_for
from seater_dist.tree.builder import build_tree

FAST = dict(quality_sample_nodes=0, kmeans_iters=3, balanced_iters=3, n_init=1)


def _emb(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    return skewed_clustered_embeddings(n, d, seed=seed)


def _check_structure(tree: ItemTree, n: int, k: int) -> None:
    """What every tree must satisfy, checked from first principles (not only through validate())."""
    assert tree.codes.shape[0] == n
    assert np.array_equal(tree.codes[:, -1], np.arange(n))
    assert np.unique(tree.codes, axis=0).shape[0] == n  # identifiers are unique
    for lvl in range(1, tree.depth + 1):  # parent/children consistency, level by level
        tokens = tree.codes[:, lvl - 1]
        parents = tree.codes[:, lvl - 2] if lvl > 1 else np.full(n, tree.bos)
        assert np.array_equal(tree.parent[tokens], parents)
        kids = tree.children_of(parents)
        assert np.all((kids == tokens[:, None]).sum(1) == 1)  # each token is among its parent's children
    assert np.array_equal(tree.ancestor(np.arange(n), 0), np.full(n, tree.bos))
    for token in np.unique(tree.codes[:, :-1])[:5]:
        lvl = tree.level[token]
        assert np.array_equal(tree.items_under(int(token)), np.flatnonzero(tree.codes[:, lvl - 1] == token))


def _subtree_sizes(tree: ItemTree, node: int) -> list[int]:
    return [tree.items_under(int(c)).size for c in tree.children_of(np.array([node]))[0] if c >= 0]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 300), k=st.sampled_from([2, 3, 5, 8, 32]))
@example(n=5, k=8)  # N < k
@example(n=8, k=8)  # N = k
@example(n=64, k=8)  # N = k^2
@example(n=65, k=8)  # N = k^2 + 1
@example(n=64, k=2)  # N = k^6
@example(n=65, k=2)  # N = k^6 + 1, D = 7
@example(n=1, k=2)
@example(n=1025, k=32)  # N = k^2 + 1 at k = 32
def test_balanced_tree_has_equal_depth_and_balanced_splits(n: int, k: int) -> None:
    tree = build_tree(_emb(n), TreeSettings(k=k, **FAST), use_ray=False)
    assert tree.depth == depth_for(n, k)
    assert tree.codes.shape == (n, depth_for(n, k))
    _check_structure(tree, n, k)
    tree.validate(balanced=True)
    # every split, BOS included: min(n, k) groups of floor(n/k) or floor(n/k)+1 items
    for node in [tree.bos, *range(n + 2, tree.num_tokens)]:
        total = tree.items_under(node).size
        sizes = _subtree_sizes(tree, node)
        assert len(sizes) == min(total, k)
        assert set(sizes) <= {total // k, total // k + 1} if total >= k else set(sizes) == {1}


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 200), k=st.sampled_from([2, 4, 16]))
@example(n=17, k=16)
def test_random_tree_is_balanced_and_seeded(n: int, k: int) -> None:
    s = TreeSettings(k=k, kind="random", seed=3)
    tree = build_tree(_emb(n), s, use_ray=False)
    assert tree.depth == depth_for(n, k)
    _check_structure(tree, n, k)
    tree.validate(balanced=True)
    again = build_tree(_emb(n), s, use_ray=False)
    assert np.array_equal(tree.codes, again.codes)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 400), k=st.sampled_from([2, 4, 8]))
@example(n=300, k=4)
def test_unbalanced_tree_pads_short_paths_with_single_child_nodes(n: int, k: int) -> None:
    tree = build_tree(_emb(n), TreeSettings(k=k, kind="unbalanced", kmeans_iters=5), use_ray=False)
    assert tree.manifest["balanced"] is False
    tree.validate(balanced=False)
    _check_structure(tree, n, k)
    # no group of more than k items is left unsplit; padded chains have exactly one child per node
    for node in range(n + 2, tree.num_tokens):
        kids = tree.children_of(np.array([node]))[0]
        assert (kids >= 0).sum() >= 1
    leaf_parents = tree.codes[:, -2] if tree.depth > 1 else np.full(n, tree.bos)
    assert np.bincount(leaf_parents - leaf_parents.min()).max() <= k


def test_unbalanced_tree_on_skewed_data_is_deeper_than_balanced() -> None:
    emb = _emb(3000, d=16)
    unb = build_tree(emb, TreeSettings(k=4, kind="unbalanced"), use_ray=False)
    bal = build_tree(emb, TreeSettings(k=4, **FAST), use_ray=False)
    assert unb.depth > bal.depth == depth_for(3000, 4)
    with pytest.raises(TreeError, match="not balanced|depth"):
        unb.validate(balanced=True)


def test_manifest_records_inputs_timings_and_quality(tmp_path) -> None:
    emb = _emb(3000, d=16)
    s = TreeSettings(k=8, quality_sample_nodes=1, quality_sample_max_items=400)
    tree = build_tree(emb, s, use_ray=False)
    m = tree.manifest
    assert (m["num_items"], m["k"], m["depth"], m["dim"], m["balanced"]) == (3000, 8, 4, 16, True)
    assert m["embeddings_sha256"] == hashlib.sha256(emb.tobytes()).hexdigest()
    assert m["settings"]["k"] == 8 and m["seconds_total"] > 0
    assert [lv["level"] for lv in m["levels"]] == [1, 2, 3]
    for lv in m["levels"]:
        assert lv["seconds"] >= 0 and lv["objective"] > 0
        # a balanced split is never better than unconstrained k-means on the same nodes (up to k-means noise)
        assert lv["ratio_vs_unconstrained"] > 0.9
    assert m["levels"][2]["exact_samples"][0]["ratio"] > 0
    tree.save(tmp_path / "tree")
    back = ItemTree.load(tmp_path / "tree")
    assert np.array_equal(back.codes, tree.codes)
    assert back.manifest["embeddings_sha256"] == m["embeddings_sha256"]
    assert back.manifest["levels"][0]["objective"] == pytest.approx(m["levels"][0]["objective"])


def test_same_seed_gives_the_same_tree_and_another_seed_another() -> None:
    emb = _emb(2000, d=8)
    a = build_tree(emb, TreeSettings(k=8, **FAST), use_ray=False)
    b = build_tree(emb, TreeSettings(k=8, **FAST), use_ray=False)
    c = build_tree(emb, TreeSettings(k=8, seed=1, **FAST), use_ray=False)
    assert np.array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, c.codes)


def test_exact_threshold_routes_small_nodes_to_the_reference_solver() -> None:
    emb = _emb(600, d=8)
    tree = build_tree(emb, TreeSettings(k=4, exact_threshold=40, quality_sample_nodes=0), use_ray=False)
    methods = {lvl["level"]: lvl["methods"] for lvl in tree.manifest["levels"]}
    assert methods[1] == {"batch": 1} and methods[3] == {"exact": 16}  # 600 -> 150 -> 37/38 items
    tree.validate(balanced=True)


def test_large_nodes_use_faiss_and_stay_balanced() -> None:
    emb = _emb(5000, d=8)
    tree = build_tree(emb, TreeSettings(k=16, large_node=1000, **FAST), use_ray=False)
    assert tree.manifest["levels"][0]["methods"] == {"large": 1}
    tree.validate(balanced=True)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(5, dtype=np.float32), "2-D"),
        (np.zeros((0, 4), dtype=np.float32), "non-empty"),
        (np.arange(8).reshape(4, 2), "floating point"),
    ],
)
def test_bad_embeddings_get_a_clear_error(bad: np.ndarray, message: str) -> None:
    with pytest.raises(TreeError, match=message):
        build_tree(bad, TreeSettings(k=2), use_ray=False)


def test_nan_embedding_error_names_the_row() -> None:
    emb = _emb(50)
    emb[37, 2] = np.nan
    with pytest.raises(TreeError, match="row 37"):
        build_tree(emb, TreeSettings(k=4), use_ray=False)


def test_memmap_input_gives_the_same_tree(tmp_path) -> None:
    emb = _emb(1500, d=8)
    np.save(tmp_path / "emb.npy", emb)
    mm = np.load(tmp_path / "emb.npy", mmap_mode="r")
    a = build_tree(emb, TreeSettings(k=8, **FAST), use_ray=False)
    b = build_tree(mm, TreeSettings(k=8, **FAST), use_ray=False)
    assert np.array_equal(a.codes, b.codes)
    assert a.manifest["embeddings_sha256"] == b.manifest["embeddings_sha256"]


def test_use_ray_true_without_ray_is_an_error(monkeypatch) -> None:
    import seater_dist.tree.executor as executor

    monkeypatch.setattr(executor, "_ray_ready", lambda: False)
    with pytest.raises(TreeError, match="Ray is not initialised"):
        build_tree(_emb(20), TreeSettings(k=4), use_ray=True)


def test_ray_path_puts_embeddings_once_and_builds_a_valid_tree(ray_session, monkeypatch) -> None:
    ray = ray_session
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, *a, **kw: puts.append(value) or real_put(value, *a, **kw))
    emb = _emb(3000, d=16)
    s = TreeSettings(k=8, task_items=500, large_node=2000, quality_sample_nodes=1, quality_sample_max_items=100,
                     **{k: v for k, v in FAST.items() if k != "quality_sample_nodes"})
    tree = build_tree(emb, s, use_ray=True)
    assert len(puts) == 1 and puts[0].shape == (3000, 16)  # the embeddings, once; tasks get index arrays
    assert tree.manifest["used_ray"] is True
    assert tree.manifest["levels"][0]["methods"] == {"large": 1}
    assert tree.manifest["levels"][1]["tasks"] == 4  # 8 nodes of 375 items, packed into tasks of ~500
    assert "exact_samples" in tree.manifest["levels"][2]  # measured by a Ray task too
    assert tree.depth == depth_for(3000, 8)
    _check_structure(tree, 3000, 8)
    tree.validate(balanced=True)


def test_exact_threshold_path_reproduces_the_reference_solver_groups() -> None:
    from seater_dist.tree.reference import split_reference

    emb = _emb(300, d=8, seed=4)
    tree = build_tree(emb, TreeSettings(k=4, exact_threshold=300, n_init=2, quality_sample_nodes=0), use_ray=False)
    labels, sse = split_reference(emb, 4, seed=0, n_init=2)
    assert tree.manifest["levels"][0]["objective"] == pytest.approx(sse / 300)
    top = tree.codes[:, 0]
    for token in np.unique(top):  # the level-1 nodes are exactly the reference solver's groups
        assert np.unique(labels[top == token]).size == 1


def test_a_tree_over_partly_identical_embeddings_is_built_and_balanced():
    """Nodes whose items are all identical have objective 0 for our solver and the reference alike."""
    emb = np.zeros((300, 8), dtype=np.float32)
    emb[150:] = np.random.default_rng(0).normal(size=(150, 8))
    tree = build_tree(emb, TreeSettings(k=4, quality_sample_nodes=8), use_ray=False)
    tree.validate()
    ratios = [s["ratio"] for lvl in tree.manifest["levels"] for s in lvl.get("exact_samples", [])]
    assert ratios and all(np.isfinite(r) for r in ratios)
