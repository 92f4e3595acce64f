"""Training samples, expanded on the fly from stored sequences (never materialised for a whole dataset).

SEATER (docs/method.md §4): for every position i >= 1 of a user's time-ordered sequence, one sample
(history = the last t items before i, left-padded; target = item i).
SASRec (§6): one sample per user, the last ``max_len + 1`` items shifted by one (input, next-item targets).

Both work on a batch of sequences given as Arrow-style flat values + offsets, fully vectorised.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _flat(sequences: Any) -> tuple[np.ndarray, np.ndarray]:
    """A batch column of variable-length int sequences -> (values int64 [total], offsets int64 [B+1]).

    Accepts a pyarrow (Large)ListArray/ChunkedArray, or a numpy object array / list of arrays.
    """
    try:
        import pyarrow as pa

        if isinstance(sequences, pa.ChunkedArray):
            sequences = sequences.combine_chunks()
        if isinstance(sequences, (pa.ListArray, pa.LargeListArray)):
            offsets = np.asarray(sequences.offsets, dtype=np.int64)
            values = np.asarray(sequences.values, dtype=np.int64)
            return values[offsets[0] : offsets[-1]], offsets - offsets[0]
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = (np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(lengths)
              else np.zeros(0, np.int64))
    return values, offsets


def expand_next_item(sequences: Any, history_len: int, pad: int) -> dict[str, np.ndarray]:
    """Every (history, target) pair of a batch of sequences.

    sequences: B variable-length item sequences (time order), lengths L_b.
    Returns {"history": int64 [M, t] (oldest first, left-padded with ``pad``), "target": int64 [M]},
    M = sum_b max(L_b - 1, 0), samples in sequence order.

    >>> out = expand_next_item([[5, 6, 7]], history_len=2, pad=9)
    >>> out["history"].tolist(), out["target"].tolist()
    ([[9, 5], [5, 6]], [6, 7])
    """
    values, offsets = _flat(sequences)
    lengths = np.diff(offsets)
    seq_start = np.repeat(offsets[:-1], lengths)  # [total] start of each element's sequence
    target_pos = np.flatnonzero(np.arange(values.size) > seq_start)  # positions i >= 1 inside a sequence
    window = target_pos[:, None] + np.arange(-history_len, 0)[None, :]  # [M, t]
    valid = window >= seq_start[target_pos][:, None]
    history = np.where(valid, values[np.maximum(window, 0)], pad)
    return {"history": history.astype(np.int64), "target": values[target_pos].astype(np.int64)}


def left_pad(sequences: Any, length: int, pad: int) -> np.ndarray:
    """The last ``length`` items of each sequence, left-padded. -> int64 [B, length]."""
    values, offsets = _flat(sequences)
    ends = offsets[1:]
    window = ends[:, None] + np.arange(-length, 0)[None, :]
    valid = window >= offsets[:-1, None]
    return np.where(valid, values[np.maximum(window, 0)] if values.size else pad, pad).astype(np.int64)


def shifted_sequences(sequences: Any, max_len: int, pad: int) -> dict[str, np.ndarray]:
    """SASRec training rows: input = s[-(max_len+1):-1], targets = s[-max_len:], left-padded.

    Returns {"seq": int64 [B, max_len] (pad where empty), "pos": int64 [B, max_len] (-1 where no target)}.
    """
    values, offsets = _flat(sequences)
    last = offsets[1:] - 1  # index of each sequence's last item
    window = last[:, None] + np.arange(-max_len, 0)[None, :]  # inputs end one before the last
    valid = window >= offsets[:-1, None]
    seq = np.where(valid, values[np.maximum(window, 0)] if values.size else pad, pad)
    pos = np.where(valid, values[np.maximum(window + 1, 0)] if values.size else -1, -1)
    return {"seq": seq.astype(np.int64), "pos": pos.astype(np.int64)}
