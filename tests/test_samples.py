"""Sample expansion: every (history, target) pair of docs/method.md §4, and SASRec's shifted rows."""

import numpy as np
import pyarrow as pa

from seater_dist.data.samples import expand_next_item, left_pad, shifted_sequences


def _naive_pairs(seqs, t, pad):
    hist, tgt = [], []
    for s in seqs:
        for i in range(1, len(s)):
            h = s[max(0, i - t):i]
            hist.append([pad] * (t - len(h)) + list(h))
            tgt.append(s[i])
    return hist, tgt


def test_expansion_equals_naive_loop_on_random_sequences():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 50, size=rng.integers(1, 30))) for _ in range(40)]
    for t in (1, 3, 20):
        out = expand_next_item(pa.array(seqs), history_len=t, pad=99)
        hist, tgt = _naive_pairs(seqs, t, 99)
        assert out["history"].tolist() == hist
        assert out["target"].tolist() == tgt


def test_expansion_accepts_sliced_arrow_arrays_and_python_lists():
    seqs = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    sliced = pa.array(seqs).slice(1, 3)  # offsets do not start at zero
    out = expand_next_item(sliced, history_len=2, pad=0)
    assert out["target"].tolist() == [5, 8, 9, 10]
    assert out["history"].tolist() == [[0, 4], [0, 7], [7, 8], [8, 9]]
    assert expand_next_item(seqs[1:], 2, 0)["history"].tolist() == out["history"].tolist()


def test_left_pad_keeps_the_latest_items_rightmost():
    assert left_pad([[1, 2, 3, 4], [5]], 3, 0).tolist() == [[2, 3, 4], [0, 0, 5]]


def test_shifted_sequences_pairs_each_input_with_the_next_item():
    out = shifted_sequences([[1, 2, 3, 4, 5], [6, 7]], max_len=3, pad=0)
    assert out["seq"].tolist() == [[2, 3, 4], [0, 0, 6]]
    assert out["pos"].tolist() == [[3, 4, 5], [-1, -1, 7]]
