"""The block-level work of `seater prepare`, as pure pyarrow/numpy functions on tables.

The Ray Data pipeline (:mod:`seater_dist.data.prepare`) runs them on user-partitioned blocks; the
single-process peer runs them on one table holding everything. Same functions, same results.

Canonical rows (from :mod:`seater_dist.data.readers`): ``user``, ``item`` (int64 or string), ``ts``
int64, ``ord`` int64 (``file_index << 40 | row``), and for MIND a boolean ``history``.

Natural id order (used for the dense indices): int64 ids in numeric order; string ids by
(length, text), which puts decimal ids such as Beauty's ``1, 2, ..., 12101`` in numeric order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seater_dist.data.chunks import ROW_BITS
from seater_dist.data.row_checks import REJECTED_SCHEMA

SPLITS = ("train", "valid", "test")
TRAIN_SCHEMA = pa.schema([("user_index", pa.int64()), ("items", pa.list_(pa.int32()))])
EVAL_SCHEMA = pa.schema([("user_index", pa.int64()), ("history", pa.list_(pa.int32())),
                         ("ground_truth", pa.list_(pa.int32()))])


def _np(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.to_numpy(zero_copy_only=False)


def _same_as_previous(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """bool [n]: value i equals value i-1 (False at 0)."""
    n = len(arr)
    out = np.zeros(n, dtype=bool)
    if n > 1:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if pa.types.is_integer(arr.type):
            values = _np(arr)
            out[1:] = values[1:] == values[:-1]
        else:
            out[1:] = _np(pc.fill_null(pc.equal(arr.slice(1), arr.slice(0, n - 1)), False))
    return out


# ------------------------------------------------------------------------------------------------
# 1. Time order and duplicates (per user-partitioned block)
# ------------------------------------------------------------------------------------------------


def sort_and_dedupe(block: pa.Table, policy: str, files: list[str]) -> tuple[pa.Table, pa.Table]:
    """Sort rows by (user, ts, ord) and apply the duplicate policy.

    policy: ``keep``; ``drop_exact`` (a repeated (user, item, ts) after its first occurrence);
    ``drop_consecutive`` (an event repeating the user's previous item). MIND history items repeated on
    every impression of a user are always reduced to their first listing (reason ``mind_history_repeat``).
    Returns (sorted kept rows with columns user, item, ts, ord; rejected rows with their reason).
    """
    rejected = []
    if "history" in block.column_names:
        block, rej = _drop_history_repeats(block, files)
        rejected.append(rej)
    if policy == "drop_exact":
        block, rej = _drop_marked(block, _exact_duplicates(block), "duplicate",
                                  "repeats an earlier (user, item, timestamp)", files)
        rejected.append(rej)
    block = block.take(pc.sort_indices(block, [("user", "ascending"), ("ts", "ascending"), ("ord", "ascending")]))
    if policy == "drop_consecutive":
        repeat = _same_as_previous(block.column("user")) & _same_as_previous(block.column("item"))
        block, rej = _drop_marked(block, repeat, "duplicate", "repeats the user's previous item", files)
        rejected.append(rej)
    return block, pa.concat_tables(rejected) if rejected else REJECTED_SCHEMA.empty_table()


def _exact_duplicates(block: pa.Table) -> np.ndarray:
    """bool [n]: row repeats an earlier row's (user, item, ts) (earlier = smaller ord)."""
    order = _np(pc.sort_indices(block, [("user", "ascending"), ("item", "ascending"),
                                        ("ts", "ascending"), ("ord", "ascending")]))
    s = block.take(pa.array(order))
    dup_sorted = (_same_as_previous(s.column("user")) & _same_as_previous(s.column("item"))
                  & _same_as_previous(s.column("ts")))
    dup = np.zeros(block.num_rows, dtype=bool)
    dup[order] = dup_sorted
    return dup


def _drop_history_repeats(block: pa.Table, files: list[str]) -> tuple[pa.Table, pa.Table]:
    """MIND: keep the first listing of each (user, history item); later listings are repeats."""
    order = _np(pc.sort_indices(block, [("history", "descending"), ("user", "ascending"),
                                        ("item", "ascending"), ("ord", "ascending")]))
    s = block.take(pa.array(order))
    hist = _np(s.column("history"))
    repeat_sorted = hist & _same_as_previous(s.column("user")) & _same_as_previous(s.column("item"))
    repeat = np.zeros(block.num_rows, dtype=bool)
    repeat[order] = repeat_sorted
    block = block.drop_columns(["history"])
    return _drop_marked(block, repeat, "mind_history_repeat", "history item listed again on a later impression",
                        files)


def _drop_marked(block: pa.Table, marked: np.ndarray, reason: str, detail: str,
                 files: list[str]) -> tuple[pa.Table, pa.Table]:
    if not marked.any():
        return block, REJECTED_SCHEMA.empty_table()
    gone = block.filter(pa.array(marked))
    ords = _np(gone.column("ord"))
    raw = pc.binary_join_element_wise(pc.cast(gone.column("user"), pa.string()),
                                      pc.cast(gone.column("item"), pa.string()),
                                      pc.cast(gone.column("ts"), pa.string()), "\t")
    rej = pa.table([raw, pa.array([files[i] for i in (ords >> ROW_BITS)], pa.string()),
                    pa.array(ords & ((1 << ROW_BITS) - 1), pa.int64()),
                    pa.array([reason] * len(ords), pa.string()), pa.array([detail] * len(ords), pa.string())],
                   schema=REJECTED_SCHEMA)
    return block.filter(pa.array(~marked)), rej


# ------------------------------------------------------------------------------------------------
# 2. Item counts, the kept item set, dense item indices
# ------------------------------------------------------------------------------------------------


def count_items(block: pa.Table) -> pa.Table:
    """(item, count) of one table."""
    return block.group_by("item").aggregate([("item", "count")]).rename_columns(["item", "count"])


def natural_sort(ids: pa.Array) -> pa.Array:
    """Ids in natural order: numeric for int64, (length, text) for strings."""
    if pa.types.is_integer(ids.type):
        return pa.array(np.sort(_np(ids)))
    t = pa.table({"len": pc.utf8_length(ids), "id": ids}).sort_by([("len", "ascending"), ("id", "ascending")])
    return t.column("id").combine_chunks()


def lookup(values: pa.Array | pa.ChunkedArray, sorted_ids: pa.Array) -> np.ndarray:
    """int64 [n]: the index of each value in ``sorted_ids`` (natural order), -1 if absent."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_integer(sorted_ids.type):
        keys = _np(sorted_ids)
        v = _np(values)
        pos = np.searchsorted(keys, v)
        pos_c = np.minimum(pos, max(len(keys) - 1, 0))
        found = (pos < len(keys)) & (keys[pos_c] == v) if len(keys) else np.zeros(len(v), dtype=bool)
        return np.where(found, pos_c, -1).astype(np.int64)
    if not pa.types.is_string(values.type):
        values = pc.cast(values, pa.string())
    return _np(pc.fill_null(pc.index_in(values, value_set=sorted_ids), -1)).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# 3. Per-user sequences
# ------------------------------------------------------------------------------------------------


def build_sequences(block: pa.Table, kept_items: pa.Array, min_user_count: int) -> pa.Table:
    """Sorted rows -> one row per kept user: ``user`` (raw id), ``items`` list<int32> (dense, time order).

    Rows whose item is not in ``kept_items`` are dropped first; then users with fewer than
    ``min_user_count`` remaining rows. ``block`` must hold all rows of its users, sorted by time.
    """
    index = lookup(block.column("item"), kept_items)
    keep = index >= 0
    users = block.column("user").filter(pa.array(keep)) if not keep.all() else block.column("user")
    index = index[keep].astype(np.int32)
    if isinstance(users, pa.ChunkedArray):
        users = users.combine_chunks()
    starts = np.flatnonzero(~_same_as_previous(users))
    lengths = np.diff(np.append(starts, len(index)))
    long_enough = lengths >= min_user_count
    flat = index[np.repeat(long_enough, lengths)]
    starts, lengths = starts[long_enough], lengths[long_enough]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.table({"user": users.take(pa.array(starts)) if len(starts) else users.slice(0, 0),
                     "items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))})


def item_histogram(seqs: pa.Table, num_items: int) -> np.ndarray:
    """int64 [num_items]: how often each dense item index occurs in the ``items`` lists."""
    flat = _np(pc.list_flatten(seqs.column("items")))
    return np.bincount(flat, minlength=num_items).astype(np.int64)


# ------------------------------------------------------------------------------------------------
# 4. Protocol splits
# ------------------------------------------------------------------------------------------------


def split_sizes(num_users: int, ratio: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, valid, test) user counts: valid and test rounded, train the rest (within one user)."""
    total = sum(ratio)
    n_valid = int(round(num_users * ratio[1] / total))
    n_test = int(round(num_users * ratio[2] / total))
    return num_users - n_valid - n_test, n_valid, n_test


def assign_splits(num_users: int, protocol: str, seed: int,
                  ratio: tuple[float, float, float]) -> np.ndarray:
    """int8 [num_users]: 0 train, 1 valid, 2 test (comirec: seeded user shuffle); loo: all 3 (= "all")."""
    if protocol == "loo":
        return np.full(num_users, 3, dtype=np.int8)
    n_train, n_valid, _ = split_sizes(num_users, ratio)
    perm = np.random.default_rng(seed).permutation(num_users)
    split = np.full(num_users, 2, dtype=np.int8)
    split[perm[:n_train]] = 0
    split[perm[n_train:n_train + n_valid]] = 1
    return split


SPLIT_NAMES = np.array(["train", "valid", "test", "all"])


def emit_split(seqs: pa.Table, user_index: np.ndarray, user_split: np.ndarray, split: str, protocol: str,
               history_fraction: float) -> pa.Table:
    """Rows of ``split`` for the sequences of one block (user_index [n] aligned with ``seqs``).

    comirec: train = the train users' full sequences; valid/test users: history = s[:int(f*len(s))],
    ground_truth = the rest. loo: train = s[:-2] of every user; valid = (s[:-2], [s[-2]]);
    test = (s[:-1], [s[-1]]). Rows are ordered by user_index.
    """
    items = seqs.column("items").combine_chunks() if isinstance(seqs.column("items"), pa.ChunkedArray) \
        else seqs.column("items")
    lengths = _np(pc.list_value_length(items)).astype(np.int64)
    if protocol == "comirec":
        mask = user_split[user_index] == {"train": 0, "valid": 1, "test": 2}[split]
        # float64 products, floored: the same value as Python's int(f * len(s)) for every length
        cut = lengths if split == "train" else np.floor(lengths * history_fraction).astype(np.int64)
        end = lengths
    else:
        mask = np.ones(len(lengths), dtype=bool)
        cut = lengths - (1 if split == "test" else 2)
        end = lengths - 1 if split == "valid" else lengths
    sel = np.flatnonzero(mask)
    sel = sel[np.argsort(user_index[sel], kind="stable")]
    items, cut, end = items.take(pa.array(sel)), cut[sel], end[sel]
    head = _slice_lists(items, np.zeros_like(cut), cut)
    users = pa.array(user_index[sel], pa.int64())
    if split == "train":
        return pa.table({"user_index": users, "items": head}, schema=TRAIN_SCHEMA)
    return pa.table({"user_index": users, "history": head, "ground_truth": _slice_lists(items, cut, end)},
                    schema=EVAL_SCHEMA)


def _slice_lists(lists: pa.ListArray, start: np.ndarray, stop: np.ndarray) -> pa.ListArray:
    """lists[i][start[i]:stop[i]] for every i, as list<int32> (vectorised, no Python loop)."""
    offsets = _np(lists.offsets).astype(np.int64)[:-1]  # honours a sliced array's offset
    values = _np(lists.values)
    count = np.maximum(stop - start, 0)
    out_offsets = np.zeros(len(count) + 1, dtype=np.int32)
    np.cumsum(count, out=out_offsets[1:])
    idx = np.repeat(offsets + start - out_offsets[:-1], count) + np.arange(out_offsets[-1], dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(out_offsets), pa.array(values[idx], pa.int32()))
