"""Bootstrap intervals and the paired sign-flip test (seater_dist/eval/stats.py) on samples whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from seater_dist.eval import stats


def test_users_all_equal_give_a_zero_width_interval():
    for value in (0.0, 0.3, 1.0):
        (lo, hi), = stats.bootstrap_ci(np.full(500, value))
        assert lo == hi == value


def test_bernoulli_interval_contains_p_with_the_normal_width():
    sample = np.random.default_rng(7).binomial(1, 0.3, size=10_000).astype(float)
    (lo, hi), = stats.bootstrap_ci(sample)
    assert lo < 0.3 < hi and lo < sample.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 10_000), rel=0.1)


def test_each_metric_column_gets_its_own_interval():
    rng = np.random.default_rng(1)
    values = np.stack([rng.binomial(1, 0.1, 4000), rng.binomial(1, 0.6, 4000)], axis=1).astype(float)
    bounds = stats.bootstrap_ci(values)
    assert bounds.shape == (2, 2)
    assert bounds[0, 0] < 0.1 < bounds[0, 1] and bounds[1, 0] < 0.6 < bounds[1, 1]


def test_same_seed_same_interval_other_seed_another():
    sample = np.random.default_rng(2).random(300)
    assert np.array_equal(stats.bootstrap_ci(sample, seed=0), stats.bootstrap_ci(sample, seed=0))
    assert not np.array_equal(stats.bootstrap_ci(sample, seed=0), stats.bootstrap_ci(sample, seed=1))


def test_chunking_does_not_change_the_answer(monkeypatch):
    """Resamples are drawn in chunks to bound memory; the draws, and so the results, do not depend on it."""
    values = np.random.default_rng(3).random((257, 3))
    whole_ci, whole_p = stats.bootstrap_ci(values), stats.sign_flip_pvalue(values - 0.5)
    monkeypatch.setattr(stats, "CHUNK_CELLS", 257 * 7 + 5)
    assert np.allclose(stats.bootstrap_ci(values), whole_ci, rtol=0, atol=1e-15)
    assert np.array_equal(stats.sign_flip_pvalue(values - 0.5), whole_p)


def test_identical_runs_have_p_one():
    assert stats.sign_flip_pvalue(np.zeros((200, 4))).tolist() == [1.0] * 4


def test_a_consistent_shift_has_p_below_one_percent():
    rng = np.random.default_rng(4)
    shift = 0.05 + 0.01 * rng.random(200)  # every user better by 0.05-0.06
    p, = stats.sign_flip_pvalue(shift)
    assert p < 0.01 and p == 1 / (1 + stats.PERMUTATIONS)


def test_noise_around_zero_is_not_significant():
    p, = stats.sign_flip_pvalue(np.random.default_rng(5).normal(0, 1, 400))
    assert p > 0.05


def test_empty_or_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="at least one user"):
        stats.bootstrap_ci(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="finite"):
        stats.sign_flip_pvalue(np.array([0.1, np.nan]))
