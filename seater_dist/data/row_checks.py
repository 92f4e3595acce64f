"""The checks every reader applies to parsed rows, and the rejected table that keeps each bad row with its
reason (data/readers.py parses, these decide).

* ids: a missing (null or blank) or negative user or item id rejects the row (``missing_user_id``,
  ``negative_item_id``, ...);
* timestamps: numbers (integer or float seconds, as numbers or text) or timestamp columns, which must be times
  from 1970 to 2100 in seconds, milliseconds or microseconds (:data:`TIME_RANGES`); anything else rejects
  the row (``unparsable_timestamp``, ``timestamp_out_of_range``);
* the rejected table (:data:`REJECTED_SCHEMA`): ``raw`` (the row as text), ``file``, ``row`` (1-based),
  ``reason`` (a code) and ``detail`` (one human line).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seater_dist.data.chunks import Chunk
from seater_dist.data.errors import DataError

REJECTED_SCHEMA = pa.schema([("raw", pa.string()), ("file", pa.string()), ("row", pa.int64()),
                             ("reason", pa.string()), ("detail", pa.string())])
_NUMBER = r"^\s*-?\d+(\.\d*)?([eE][+-]?\d+)?\s*$"
# Accepted timestamps: 1970-01-01 .. 2100-01-01 in seconds, milliseconds or microseconds.
_TIME_END_S = 4_102_444_800
TIME_RANGES = ((0, _TIME_END_S), (10**12, _TIME_END_S * 10**3), (10**15, _TIME_END_S * 10**6))


def rejected_rows(raw: list[str] | pa.Array, file: str, rows: np.ndarray, reason: str | list[str],
                  detail: str | list[str]) -> pa.Table:
    """The rejected table of ``rows`` (1-based row numbers) of ``file``: one reason and detail for all, or one
    each."""
    n = len(rows)
    reason_col = [reason] * n if isinstance(reason, str) else reason
    detail_col = [detail] * n if isinstance(detail, str) else detail
    return pa.table([pa.array(raw, pa.string()), pa.array([file] * n, pa.string()),
                     pa.array(rows, pa.int64()), pa.array(reason_col, pa.string()),
                     pa.array(detail_col, pa.string())], schema=REJECTED_SCHEMA)


def empty_rejected() -> pa.Table:
    """A rejected table without rows."""
    return REJECTED_SCHEMA.empty_table()


def validate_ids(table: pa.Table, raw: pa.Array, chunk: Chunk, rows: np.ndarray,
                 fields: tuple[str, str]) -> tuple[pa.Table, pa.Table]:
    """Reject rows whose user or item id is missing (null/blank) or a negative integer."""
    reasons = np.full(table.num_rows, None, dtype=object)
    for col, field in (("user", fields[0]), ("item", fields[1])):
        arr = table.column(col)
        if pa.types.is_integer(arr.type):
            missing = pc.is_null(arr)
            negative = pc.fill_null(pc.less(arr, 0), False)
        else:
            missing = pc.or_(pc.is_null(arr), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(arr)), 0))
            negative = pc.fill_null(pc.match_substring_regex(arr, r"^\s*-\d+\s*$"), False)
        missing = pc.fill_null(missing, True).to_numpy(zero_copy_only=False)
        negative = negative.to_numpy(zero_copy_only=False)
        reasons[missing & (reasons == None)] = f"missing_{field}"  # noqa: E711
        reasons[negative & (reasons == None)] = f"negative_{field}"  # noqa: E711
    bad = reasons != None  # noqa: E711
    if not bad.any():
        return table, empty_rejected()
    details = [f"{r.split('_', 1)[1]} is {'missing' if r.startswith('missing') else 'a negative id'}"
               for r in reasons[bad]]
    rej = rejected_rows(pc.filter(raw, pa.array(bad)), chunk.file, rows[bad], list(reasons[bad]), details)
    return table.filter(pa.array(~bad)), rej


def parse_timestamp(col: pa.Array, field: str) -> tuple[np.ndarray, np.ndarray]:
    """Numbers (int or float seconds, as text or numbers) or timestamps -> (int64 seconds, ok mask)."""
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        ts = pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
    elif pa.types.is_integer(t):  # a uint64 beyond int64 wraps to a negative time: rejected as out of range
        ts = pc.cast(col, pa.int64(), safe=False)
    elif pa.types.is_floating(t):
        ok = pc.and_(pc.is_finite(col), pc.is_valid(col))
        ts = pc.if_else(ok, _float_to_int64(pc.if_else(ok, pc.cast(col, pa.float64()), 0.0)), None)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        ok = pc.fill_null(pc.match_substring_regex(col, _NUMBER), False)
        num = pc.cast(pc.utf8_trim_whitespace(pc.if_else(ok, col, "0")), pa.float64())
        ts = pc.if_else(ok, _float_to_int64(num), None)
    else:
        raise DataError(f"{field}: timestamp column of type {t} is not supported")
    ok = pc.is_valid(ts).to_numpy(zero_copy_only=False)
    return pc.fill_null(ts, 0).to_numpy(zero_copy_only=False).astype(np.int64), ok


def _float_to_int64(num: pa.Array) -> pa.Array:
    """Finite float64 times -> int64 (floor). A number beyond every accepted range (1e19, 1e300: int64 cannot
    hold it) becomes -1, out of range like any negative time, so that its row is rejected rather than the cast
    failing the whole read."""
    fits = pc.and_(pc.greater_equal(num, -1.0), pc.less_equal(num, float(TIME_RANGES[-1][1])))
    return pc.cast(pc.floor(pc.if_else(fits, num, -1.0)), pa.int64())
