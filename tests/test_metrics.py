"""HR / Recall / NDCG@K against hand-computed values (docs/method.md §7, official IDCG)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from seater_dist.config import metric_cutoffs
from seater_dist.eval.metrics import add_sums, compute_metrics, finalize, metric_sums

L2 = lambda r: 1.0 / math.log2(r + 2)  # noqa: E731  discount at 0-based rank r


def test_hand_computed_values_with_idcg_over_all_positives():
    # user 0: GT {1, 2, 3, 4}; ranked [1, 9, 2, 8] -> hits at ranks 0 and 2
    # user 1: GT {5}; ranked [7, 6, 5, 0]          -> hit at rank 2
    # user 2: GT {3}; ranked [0, 1, 2, 4]          -> no hit
    topk = np.array([[1, 9, 2, 8], [7, 6, 5, 0], [0, 1, 2, 4]])
    gt = [np.array([1, 2, 3, 4]), np.array([5]), np.array([3])]
    m = compute_metrics(topk, gt, ks=(2, 4))

    assert m["hr@2"] == pytest.approx(1 / 3)
    assert m["hr@4"] == pytest.approx(2 / 3)
    assert m["recall@2"] == pytest.approx((1 / 4) / 3)
    assert m["recall@4"] == pytest.approx((2 / 4 + 1) / 3)
    ndcg0_at2 = L2(0) / (L2(0) + L2(1))  # IDCG over min(|GT|, K) = 2 positions
    ndcg0_at4 = (L2(0) + L2(2)) / (L2(0) + L2(1) + L2(2) + L2(3))  # IDCG over 4 positives, not over the 2 hits
    ndcg1_at4 = L2(2) / L2(0)
    assert m["ndcg@2"] == pytest.approx(ndcg0_at2 / 3)
    assert m["ndcg@4"] == pytest.approx((ndcg0_at4 + ndcg1_at4) / 3)
    # the inflated variant (ideal of the hits only) would give user 0 at K=4 (L2(0)+L2(2))/(L2(0)+L2(1)):
    assert m["ndcg@4"] != pytest.approx((((L2(0) + L2(2)) / (L2(0) + L2(1))) + ndcg1_at4) / 3)
    assert set(m) == {"hr@2", "hr@4", "recall@2", "recall@4", "ndcg@2", "ndcg@4"}


def test_ground_truth_is_a_set_and_repeated_or_padded_ranks_count_once():
    topk = np.array([[4, 4, -1, 2]])
    gt = [np.array([4, 4, 2, 7])]  # set {2, 4, 7}
    m = compute_metrics(topk, gt, ks=(4,))
    assert m["recall@4"] == pytest.approx(2 / 3)
    assert m["ndcg@4"] == pytest.approx((L2(0) + L2(3)) / (L2(0) + L2(1) + L2(2)))
    assert m["hr@4"] == 1.0


def test_perfect_ranking_scores_one():
    topk = np.array([[3, 1, 2, 0, 5]])
    m = compute_metrics(topk, [np.array([1, 3])], ks=(2, 5))
    assert m["ndcg@2"] == pytest.approx(1.0) and m["ndcg@5"] == pytest.approx(1.0)
    assert m["recall@2"] == 1.0 and m["hr@2"] == 1.0


def test_loo_single_target_recall_equals_hr():
    rng = np.random.default_rng(0)
    topk = np.stack([rng.permutation(80)[:50] for _ in range(50)])
    gt = [np.array([rng.integers(0, 80)]) for _ in range(50)]
    m = compute_metrics(topk, gt, ks=metric_cutoffs("loo"))
    for k in metric_cutoffs("loo"):
        assert m[f"recall@{k}"] == pytest.approx(m[f"hr@{k}"])


def test_sums_of_shards_add_up_to_the_whole():
    rng = np.random.default_rng(1)
    topk = np.stack([rng.permutation(100)[:20] for _ in range(40)])
    gt = [rng.choice(100, size=rng.integers(1, 8), replace=False) for _ in range(40)]
    whole = metric_sums(topk, gt, ks=(5, 20))
    shards = add_sums(metric_sums(topk[:13], gt[:13], ks=(5, 20)), metric_sums(topk[13:], gt[13:], ks=(5, 20)))
    assert shards["users"] == 40
    for key, value in whole.items():
        assert shards[key] == pytest.approx(value)
    assert finalize(shards) == pytest.approx(compute_metrics(topk, gt, ks=(5, 20)))


def test_bad_inputs_fail_with_clear_errors():
    with pytest.raises(ValueError, match="user 1 has empty ground truth"):
        metric_sums(np.array([[1, 2], [3, 4]]), [np.array([1]), np.array([], dtype=int)], ks=(2,))
    with pytest.raises(ValueError, match="K=5 exceeds the 2 ranked items"):
        metric_sums(np.array([[1, 2]]), [np.array([1])], ks=(5,))
    with pytest.raises(ValueError, match="len\\(ground_truth\\) = 2"):
        metric_sums(np.array([[1, 2]]), [np.array([1]), np.array([2])], ks=(2,))
    with pytest.raises(ValueError, match="no users"):
        finalize(metric_sums(np.zeros((0, 3), dtype=int), [], ks=(2,)))
