"""Readers of raw interaction logs: one registry, one canonical table, every bad row kept with its reason.

A reader turns one *chunk* of one input file (a byte range of a text file, or a parquet row group) into

* a canonical table of good interactions: ``user`` and ``item`` (int64 when the source column is an
  integer column, else string), ``ts`` int64 (the time order), ``ord`` int64 (``file_index << 40 | row``:
  the tie-breaker that keeps equal timestamps in input order, and the way back to file and row);
* a rejected table: ``raw`` (the row as text), ``file``, ``row`` (1-based line or row number),
  ``reason`` (a code such as ``missing_user_id``) and ``detail`` (one human line).

Formats (registered in ``seater_dist.formats.FORMATS``; parsed by ``TEXT_PARSERS`` here):

========== =====================================================================================
sequences  one line per user: ``user item item ...`` in time order (the line order IS the time order)
interactions CSV / TSV (by extension; header row required) or parquet; columns user_id, item_id,
           timestamp unless renamed with ``user_column`` / ``item_column`` / ``time_column``
movielens  RecBole ``.inter`` (TSV, header ``user_id:token item_id:token rating:float timestamp:float``)
           or ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``, no header)
amazon     review JSON lines: reviewerID, asin, unixReviewTime
yelp       review JSON lines: user_id, business_id, date (``YYYY-MM-DD HH:MM:SS``)
mind       MIND ``behaviors.tsv``: impression id, user, time, history, impressions; the history items
           come first (timestamp 0, in their listed order), then every clicked impression (``N123-1``)
           at its impression time. A user's history is repeated on each of their impressions: only its
           first listing is kept; the repeats are counted as ``mind_history_repeat``, not rejected.
========== =====================================================================================

Inputs that are not data at all fail with a one-line :class:`DataError` naming the file (missing file,
empty file, missing column, a compressed, archived, UTF-16 or binary file, named by its magic bytes with
:func:`seater_dist.files.identify`, text that is not UTF-8, naming the row); a UTF-8 byte-order mark (Excel's
"CSV UTF-8") is read past in every text format. Data rows that cannot be used land in the rejected table
(data/row_checks.py holds that table and the checks of ids and timestamps).
Timestamps must be times from 1970 to 2100 in seconds, milliseconds or microseconds (other values, e.g.
negative ones, year 5138 in seconds or 1e300, are rejected rows: ``timestamp_out_of_range``); within a user
only their order matters.
"""

from __future__ import annotations

import io
import json
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from seater_dist import artifacts
from seater_dist.data.chunks import (
    ROW_BITS,
    Chunk,
    ReaderOptions,
    decode_utf8,
    delimiter_of,
    not_utf8_error,
)
from seater_dist.data.errors import DataError
from seater_dist.data.row_checks import TIME_RANGES, parse_timestamp, rejected_rows, validate_ids
from seater_dist.formats import FORMATS

SEQ_POS_BITS = 24  # sequences: ts = line << SEQ_POS_BITS | position in line


def read_chunk(chunk: Chunk, opts: ReaderOptions) -> tuple[pa.Table, pa.Table]:
    """Parse one chunk: (good interactions in the canonical schema, rejected rows)."""
    fs, path = artifacts.resolve(chunk.file)
    if chunk.kind == "parquet":
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read_row_group(chunk.start)
        return _from_table(table, chunk, opts, np.arange(table.num_rows, dtype=np.int64) + chunk.first_row)
    with fs.open_input_file(path) as f:
        f.seek(chunk.start)
        data = f.read(chunk.end - chunk.start)
    return TEXT_PARSERS[opts.format](data, chunk, opts)


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


def _ord(chunk: Chunk, rows: np.ndarray) -> np.ndarray:
    return (np.int64(chunk.file_index) << np.int64(ROW_BITS)) | rows.astype(np.int64)


def _parse_sequences(data: bytes, chunk: Chunk, opts: ReaderOptions) -> tuple[pa.Table, pa.Table]:
    """``user item item ...`` per line; time = (line, position). Lines without items are rejected."""
    lines = _lines(data)
    rows = np.arange(len(lines), dtype=np.int64) + chunk.first_row
    try:
        text = pa.array(lines, pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:
        raise not_utf8_error(data, chunk) from None
    tokens = pc.utf8_split_whitespace(text)
    ntok = pc.list_value_length(tokens).to_numpy(zero_copy_only=False)
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0).to_numpy(zero_copy_only=False)
    bad = (ntok < 2) | blank
    rej = [rejected_rows(pc.filter(text, pa.array(bad)), chunk.file, rows[bad],
                         ["blank_line" if b else "empty_sequence" for b in blank[bad]],
                         ["blank line" if b else "a user with no items" for b in blank[bad]])]
    good_lines = np.flatnonzero(~bad)
    tokens = pc.take(tokens, pa.array(good_lines))
    users = pc.list_element(tokens, 0)
    items_lists = pc.list_slice(tokens, 1)
    flat_items = pc.list_flatten(items_lists)
    parent = pc.list_parent_indices(items_lists).to_numpy()
    lengths = pc.list_value_length(items_lists).to_numpy()
    pos = np.arange(len(parent), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    line_rows = rows[good_lines][parent]
    if (lengths >= (1 << SEQ_POS_BITS)).any():
        row = int(rows[good_lines][int(np.flatnonzero(lengths >= (1 << SEQ_POS_BITS))[0])])
        raise DataError(f"{chunk.file}: row {row}: a line holds more than {(1 << SEQ_POS_BITS) - 1:,} items "
                        f"({int(lengths.max()):,}); split that user's sequence")
    table = pa.table({"user": pc.take(users, pa.array(parent)), "item": flat_items,
                      "ts": (line_rows << SEQ_POS_BITS) | pos, "ord": _ord(chunk, line_rows)})
    raw_line = pc.take(pc.take(text, pa.array(good_lines)), pa.array(parent))
    good, rej_ids = validate_ids(table, raw_line, chunk, line_rows, ("user", "item"))
    return good, pa.concat_tables(rej + [rej_ids])


def _from_table(table: pa.Table, chunk: Chunk, opts: ReaderOptions, rows: np.ndarray,
                raw: pa.Array | None = None, ts: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[pa.Table, pa.Table]:
    """Canonical table from a parsed table with the user/item/time columns of ``opts``."""
    if raw is None:
        raw = _raw_text(table, [opts.user_column, opts.item_column, opts.time_column])
    ts_values, ts_ok = ts if ts is not None else parse_timestamp(table.column(opts.time_column), opts.time_column)
    canon = pa.table({"user": _id_column(table.column(opts.user_column), opts.string_ids),
                      "item": _id_column(table.column(opts.item_column), opts.string_ids),
                      "ts": ts_values, "ord": _ord(chunk, rows)})
    in_range = np.zeros(len(ts_values), dtype=bool)
    for lo, hi in TIME_RANGES:
        in_range |= (ts_values >= lo) & (ts_values <= hi)
    out_of_range = ts_ok & ~in_range
    rej = []
    if not ts_ok.all():
        bad = ~ts_ok
        rej.append(rejected_rows(pc.filter(raw, pa.array(bad)), chunk.file, rows[bad], "unparsable_timestamp",
                                 f"{opts.time_column} is not a timestamp"))
    if out_of_range.any():
        given = pc.filter(pc.cast(table.column(opts.time_column), pa.string()), pa.array(out_of_range))
        rej.append(rejected_rows(pc.filter(raw, pa.array(out_of_range)), chunk.file, rows[out_of_range],
                                 "timestamp_out_of_range",
                                 [f"{opts.time_column} {str(t).strip()} is not a time from 1970 to 2100 (in seconds, "
                              "milliseconds or microseconds)" for t in given.to_pylist()]))
    keep = ts_ok & in_range
    if not keep.all():
        canon, raw, rows = canon.filter(pa.array(keep)), pc.filter(raw, pa.array(keep)), rows[keep]
    good, rej_ids = validate_ids(canon, raw, chunk, rows, (opts.user_column, opts.item_column))
    return good, pa.concat_tables(rej + [rej_ids])


def _id_column(col: pa.ChunkedArray | pa.Array, string_ids: bool) -> pa.Array:
    """Integer id columns stay int64 (fast, numeric order) unless ``string_ids``; others become string."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_integer(col.type) and not string_ids:
        return pc.cast(col, pa.int64())
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return pc.cast(col, pa.string())


def _raw_text(table: pa.Table, columns: list[str]) -> pa.Array:
    """A row's text for the rejected table: its values joined by tabs."""
    parts = [pc.fill_null(pc.cast(table.column(c), pa.string()), "") for c in columns]
    return pc.binary_join_element_wise(*parts, "\t")


def _read_csv(data: bytes, columns: tuple[str, ...], delim: str, on_invalid: Callable) -> pa.Table:
    return pcsv.read_csv(
        io.BytesIO(data),
        read_options=pcsv.ReadOptions(column_names=list(columns), use_threads=False, block_size=64 << 20),
        parse_options=pcsv.ParseOptions(delimiter=delim, invalid_row_handler=on_invalid,
                                        ignore_empty_lines=False),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                            strings_can_be_null=False),
    )


def _parse_delimited(data: bytes, chunk: Chunk, opts: ReaderOptions) -> tuple[pa.Table, pa.Table]:
    """CSV/TSV (interactions, movielens) with the header's columns; wrong field counts are rejected."""
    delim = delimiter_of(chunk.file, opts)
    if chunk.file.endswith(".dat"):
        data = data.replace(b"::", b"\t")
        columns = ("user_id", "item_id", "rating", "timestamp")
    else:
        columns = chunk.columns
    bad_rows: list[tuple[int, str, str]] = []

    def on_invalid(row: pcsv.InvalidRow) -> str:
        bad_rows.append((row.number, row.text,
                         f"expected {row.expected_columns} fields, got {row.actual_columns}"))
        return "skip"

    try:
        table = _read_csv(data, columns, delim, on_invalid)
    except pa.ArrowInvalid as err:
        if "UTF8" in str(err) or "UTF-8" in str(err):
            raise not_utf8_error(data, chunk) from None
        raise DataError(f"{chunk.file}: rows {chunk.first_row}..: cannot be parsed ({' '.join(str(err).split())})") \
            from None
    n_lines = table.num_rows + len(bad_rows)
    bad_idx = np.array([b[0] - 1 for b in bad_rows], dtype=np.int64)
    good_mask = np.ones(n_lines, dtype=bool)
    good_mask[bad_idx] = False
    rows = np.arange(n_lines, dtype=np.int64) + chunk.first_row
    rej = rejected_rows([b[1] for b in bad_rows], chunk.file, rows[bad_idx],
                        ["blank_line" if not b[1].strip() else "malformed_line" for b in bad_rows],
                        [b[2] for b in bad_rows])
    good, rej_rows = _from_table(table, chunk, opts, rows[good_mask])
    return good, pa.concat_tables([rej, rej_rows])


def _json_lines(data: bytes, chunk: Chunk, fields: list[str]) -> tuple[pa.Table, np.ndarray, pa.Array, pa.Table]:
    """JSON lines -> (table of ``fields`` as strings, row numbers, raw text, rejected invalid lines)."""
    lines = _lines(data)
    values: dict[str, list] = {f: [] for f in fields}
    ok_rows, raws, rej_raw, rej_rows, rej_detail, rej_reason = [], [], [], [], [], []
    for i, line in enumerate(lines):
        row = chunk.first_row + i
        text = decode_utf8(line, chunk, row)
        try:
            obj = json.loads(text) if line.strip() else None
        except ValueError as err:
            rej_raw.append(text), rej_rows.append(row), rej_reason.append("malformed_line")
            rej_detail.append(f"invalid JSON ({str(err).split(':')[0]})")
            continue
        if not isinstance(obj, dict):
            rej_raw.append(text), rej_rows.append(row)
            rej_reason.append("blank_line" if obj is None else "malformed_line")
            rej_detail.append("blank line" if obj is None else "not a JSON object")
            continue
        for f in fields:
            v = obj.get(f)
            values[f].append(None if v is None else str(v))
        ok_rows.append(row)
        raws.append(text)
    table = pa.table({f: pa.array(v, pa.string()) for f, v in values.items()})
    rej = rejected_rows(rej_raw, chunk.file, np.array(rej_rows, dtype=np.int64), rej_reason, rej_detail)
    return table, np.array(ok_rows, dtype=np.int64), pa.array(raws, pa.string()), rej


def _parse_amazon(data: bytes, chunk: Chunk, opts: ReaderOptions) -> tuple[pa.Table, pa.Table]:
    table, rows, raw, rej = _json_lines(data, chunk, [opts.user_column, opts.item_column, opts.time_column])
    good, rej2 = _from_table(table, chunk, opts, rows, raw)
    return good, pa.concat_tables([rej, rej2])


def _parse_yelp(data: bytes, chunk: Chunk, opts: ReaderOptions) -> tuple[pa.Table, pa.Table]:
    """Yelp reviews: ``date`` is ``YYYY-MM-DD HH:MM:SS`` (numbers are accepted too)."""
    table, rows, raw, rej = _json_lines(data, chunk, [opts.user_column, opts.item_column, opts.time_column])
    col = table.column(opts.time_column)
    parsed = pc.strptime(col, format="%Y-%m-%d %H:%M:%S", unit="s", error_is_null=True)
    ts_num, ok_num = parse_timestamp(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col,
                                     opts.time_column)
    ok_date = pc.is_valid(parsed).to_numpy(zero_copy_only=False)
    ts = np.where(ok_date, pc.fill_null(pc.cast(parsed, pa.int64()), 0).to_numpy(zero_copy_only=False), ts_num)
    good, rej2 = _from_table(table, chunk, opts, rows, raw, ts=(ts.astype(np.int64), ok_date | ok_num))
    return good, pa.concat_tables([rej, rej2])


_MIND_TIME = "%m/%d/%Y %I:%M:%S %p"
MIND_HISTORY_BASE = -(1 << 20)  # history items get ts = base + position: before every impression time


def _parse_mind(data: bytes, chunk: Chunk, opts: ReaderOptions) -> tuple[pa.Table, pa.Table]:
    """MIND behaviors: history items (ts = MIND_HISTORY_BASE + position) then clicked impressions.

    The output carries a boolean ``history`` column so that the sort kernel can keep only the first
    listing of a user's history (it is repeated on every impression of that user).
    """
    users, items, when, rows, hist_flag, positions = [], [], [], [], [], []
    rej_raw, rej_rows, rej_reason, rej_detail = [], [], [], []
    raws = []
    for i, line in enumerate(_lines(data)):
        row = chunk.first_row + i
        text = decode_utf8(line, chunk, row)
        fields = text.split("\t")
        if len(fields) != 5:
            rej_raw.append(text), rej_rows.append(row)
            rej_reason.append("blank_line" if not text.strip() else "malformed_line")
            rej_detail.append(f"expected 5 tab-separated fields, got {len(fields)}")
            continue
        _, user, t, history, impressions = fields
        clicks = [tok[:-2] for tok in impressions.split() if tok.endswith("-1")]
        hist = history.split()
        if not hist and not clicks:
            rej_raw.append(text), rej_rows.append(row), rej_reason.append("empty_sequence")
            rej_detail.append("no history and no clicked impression")
            continue
        n = len(hist) + len(clicks)
        users += [user] * n
        items += hist + clicks
        when += [t] * n
        rows += [row] * n
        raws += [text] * n
        hist_flag += [True] * len(hist) + [False] * len(clicks)
        positions += list(range(len(hist))) + [0] * len(clicks)
    rej = rejected_rows(rej_raw, chunk.file, np.array(rej_rows, dtype=np.int64), rej_reason, rej_detail)
    rows_np = np.array(rows, dtype=np.int64)
    is_hist = np.array(hist_flag, dtype=bool)
    parsed = pc.strptime(pa.array(when, pa.string()), format=_MIND_TIME, unit="s", error_is_null=True)
    ts_ok = is_hist | pc.is_valid(parsed).to_numpy(zero_copy_only=False)
    ts = np.where(is_hist, MIND_HISTORY_BASE + np.array(positions, dtype=np.int64),
                  pc.fill_null(pc.cast(parsed, pa.int64()), 0).to_numpy(zero_copy_only=False))
    raw = pa.array(raws, pa.string())
    canon = pa.table({"user": pa.array(users, pa.string()), "item": pa.array(items, pa.string()),
                      "ts": ts.astype(np.int64), "ord": _ord(chunk, rows_np), "history": is_hist})
    rejs = [rej]
    if not ts_ok.all():
        bad = ~ts_ok
        rejs.append(rejected_rows(pc.filter(raw, pa.array(bad)), chunk.file, rows_np[bad], "unparsable_timestamp",
                                  f"{opts.time_column} is not a time like 11/15/2019 8:55:22 AM"))
        canon, raw, rows_np = canon.filter(pa.array(ts_ok)), pc.filter(raw, pa.array(ts_ok)), rows_np[ts_ok]
    good, rej_ids = validate_ids(canon, raw, chunk, rows_np, (opts.user_column, "news_id"))
    return good, pa.concat_tables(rejs + [rej_ids])


TEXT_PARSERS: dict[str, Callable[[bytes, Chunk, ReaderOptions], tuple[pa.Table, pa.Table]]] = {
    "sequences": _parse_sequences,
    "interactions": _parse_delimited,
    "movielens": _parse_delimited,
    "amazon": _parse_amazon,
    "yelp": _parse_yelp,
    "mind": _parse_mind,
}
if set(TEXT_PARSERS) != set(FORMATS):  # the registry and the parsers must name the same formats
    raise RuntimeError(f"formats without a parser: {sorted(set(FORMATS) ^ set(TEXT_PARSERS))}")


def unify(tables: list[pa.Table]) -> pa.Table:
    """Concatenate canonical tables; if one chunk had int ids and another strings, all become strings."""
    tables = [t for t in tables if t is not None]
    if not tables:
        raise DataError("no rows")
    for col in ("user", "item"):
        types = {t.schema.field(col).type for t in tables}
        if len(types) > 1:
            tables = [t.set_column(t.schema.get_field_index(col), col, pc.cast(t.column(col), pa.string()))
                      for t in tables]
    return pa.concat_tables(tables)
