"""`seater prepare`: raw logs -> the `dataset/` directory (docs/architecture.md), on Ray Data.

    from seater_dist.config import PrepareSettings
    from seater_dist.data.prepare import prepare
    result = prepare(PrepareSettings(input="Beauty.txt", format="sequences", out="runs/beauty/dataset"))
    result.users, result.items, result.interactions, result.dropped     # also in dataset/manifest.json

The pipeline (every step but the small driver-side ones runs as Ray Data operators):

1. read: the input is cut into chunks (byte ranges of text files, parquet row groups); a map over the
   chunks parses and validates them (:mod:`readers`); bad rows go to ``rejected/`` with their reason.
2. per-user order: ``repartition(keys=["user"])`` hash-partitions the rows by user, then each block is
   sorted by (user, timestamp, input order) with arrow and the duplicate policy is applied
   (the fast way: ``map_groups`` costs a Python call per user).
3. filters: item counts by a Ray Data ``groupby``; items under ``min_item_count`` are dropped, then
   users with fewer than ``min_user_count`` remaining items (one pass, as ComiRec); with ``k_core`` the
   two filters repeat until both hold.
4. dense indices: items and users in natural id order (numeric ids numerically); the protocol split
   (comirec: 8:1:1 seeded user shuffle; loo: last two items held out) is written as parquet shards.

Counts add up: ``rows_read = rows_kept + sum(rows_dropped_by_reason)``. A row is one interaction (or one
line that yields none, such as a blank or malformed line). Rows dropped by the count filters are counted
by reason but not copied to ``rejected/`` (they are valid rows, reproducible from the input and the
settings); every other dropped row is in ``rejected/`` with its file, row number and reason.

The steps are :class:`Engine`'s; ``prepare`` runs them on Ray Data. bench/local_prepare.py runs the same
steps in one process with pyarrow alone (``prepare_with`` and an engine of its own): the benchmark's peer
and the tests' cross-check. The finish (index tables, manifest) is data/prepare_result.py.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seater_dist import artifacts
from seater_dist.artifacts import atomic_dir
from seater_dist.config import PrepareSettings
from seater_dist.data import ops
from seater_dist.data.chunks import Chunk, ReaderOptions, integer_ids, list_input_files, plan_chunks, reader_options
from seater_dist.data.errors import DataError
from seater_dist.data.prepare_result import EngineResult, PrepareResult, finish, read_rejected
from seater_dist.data.readers import read_chunk, unify

log = logging.getLogger(__name__)
_FILTER_REASONS = ("item_below_min_count", "user_below_min_count")
_INPUT_BYTES_PER_PARTITION = 16 << 20


def prepare(settings: PrepareSettings) -> PrepareResult:
    """Prepare ``settings.input`` into ``settings.out`` with Ray Data.

    Raises DataError (a ValueError) with a one-line message naming the file, row or field on bad input.
    """
    return prepare_with(settings, _RayRun)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def prepare_with(settings: PrepareSettings, engine: type[Engine]) -> PrepareResult:
    """The preparation with ``engine`` doing the work (an :class:`Engine`): ``prepare`` uses the Ray Data one;
    the benchmark's single-process peer (bench/local_prepare.py) is another."""
    t0 = time.time()
    _check_settings(settings)
    artifacts.check_apart(settings.input, settings.out, DataError)
    opts = reader_options(settings.format, settings.user_column, settings.item_column, settings.time_column)
    fs, files = list_input_files(settings.input, settings.format)
    opts = integer_ids(fs, files, opts)
    chunks = plan_chunks(fs, files, opts)
    # A URI output is made in a local staging directory and published (manifest last) at the end. The
    # driver writes every file of it; read tasks, on any node, put their rejected rows in `rejected`,
    # beside the output when it is remote (the driver collects them).
    with atomic_dir(settings.out, "dataset") as tmp:
        (tmp / "rejected").mkdir()
        with artifacts.task_output_dir(tmp / "rejected", beside=settings.out) as rejected:
            result = engine(settings, opts, files, chunks, tmp, rejected).run()
        return finish(settings, files, tmp, result, time.time() - t0)


def _check_settings(s: PrepareSettings) -> None:
    need = 3 if s.protocol == "loo" else 2
    if s.min_user_count < need:
        raise DataError(f"min_user_count: the {s.protocol} protocol needs at least {need} items per user "
                        f"(got {s.min_user_count})")


def _kept_from_counts(counts: pa.Table, min_count: int) -> pa.Array:
    ids = counts.column("item").filter(pc.greater_equal(counts.column("count"), min_count))
    return ops.natural_sort(ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids)


def _rows_with_items(counts: pa.Table, kept: pa.Array) -> int:
    idx = ops.lookup(counts.column("item"), kept)
    return int(ops._np(counts.column("count"))[idx >= 0].sum())


class Engine:
    """The steps of a preparation (``run``); an engine implements the four that touch the rows, its own way:
    ``read_and_order``, ``item_counts``, ``sequences`` and ``write_splits``."""

    def __init__(self, settings: PrepareSettings, opts: ReaderOptions, files: list[str], chunks: list[Chunk],
                 tmp: Path, rejected: str) -> None:
        self.s, self.opts, self.files, self.chunks, self.tmp = settings, opts, files, chunks, tmp
        self.rejected = rejected  # where read tasks write rejected rows (tmp/rejected, or a URI)
        self.r = EngineResult()

    def run(self) -> EngineResult:
        t = time.time()
        self.read_and_order()
        self.r.stage_seconds["read_and_order"] = round(time.time() - t, 2)
        log.info("read %s valid rows from %d file(s) in %d chunk(s), ordered by user and time in %.1f s",
                 f"{self.r.valid_rows:,}", len(self.files), len(self.chunks), time.time() - t)
        if self.r.after_dedupe == 0:
            raise DataError(self._nothing_valid())
        t = time.time()
        counts = self.item_counts()
        self.r.stage_seconds["item_counts"] = round(time.time() - t, 2)
        t = time.time()
        kept = _kept_from_counts(counts, self.s.min_item_count)
        while True:
            seq_users, hist = self.sequences(kept)
            if not self.s.k_core or bool((hist >= self.s.min_item_count).all()):
                break
            kept = kept.filter(pa.array(hist >= self.s.min_item_count))
            self.r.kcore_rounds += 1
        self.r.kept_items, self.r.item_counts = kept, hist
        self.r.rows_with_kept_items = _rows_with_items(counts, kept)
        self.r.rows_kept = int(hist.sum())
        self.r.stage_seconds["filters_and_sequences"] = round(time.time() - t, 2)
        log.info("filters kept %s users, %s items, %s interactions (%d round(s)) in %.1f s",
                 f"{len(seq_users):,}", f"{len(kept):,}", f"{self.r.rows_kept:,}", self.r.kcore_rounds,
                 time.time() - t)
        if self.r.rows_kept == 0:
            raise DataError(f"{self.s.input}: no interactions left after the filters (min_user_count="
                            f"{self.s.min_user_count}, min_item_count={self.s.min_item_count})")
        users = ops.natural_sort(seq_users)
        if len(users) != len(pc.unique(users)):
            raise RuntimeError("internal: a user's rows were split across blocks")
        self.r.users = users
        self.r.user_split = ops.assign_splits(len(users), self.s.protocol, self.s.seed, self.s.split_ratio)
        t = time.time()
        self.write_splits()
        self.r.stage_seconds["write_splits"] = round(time.time() - t, 2)
        log.info("wrote the %s splits in %.1f s", self.s.protocol, time.time() - t)
        return self.r

    def _nothing_valid(self) -> str:
        rej = read_rejected(self.tmp)
        first = rej.slice(0, 1).to_pylist()
        where = f"; first: {first[0]['file']} row {first[0]['row']}: {first[0]['detail']}" if first else ""
        return f"{self.s.input}: no valid rows ({rej.num_rows:,} rejected{where})"

    # Engines implement these.
    def read_and_order(self) -> None: ...
    def item_counts(self) -> pa.Table: ...
    def sequences(self, kept: pa.Array) -> tuple[pa.Array, np.ndarray]: ...
    def write_splits(self) -> None: ...


class _RayRun(Engine):
    """Ray Data: parallel chunk reads, a hash shuffle by user, per-block arrow kernels."""

    def run(self) -> EngineResult:
        from ray.data import DataContext
        from ray.data.context import ShuffleStrategy

        # The task-based hash shuffle: on 2 CPUs its fixed cost is 3-4 s against 14-16 s for the
        # default SHUFFLE_V2 (measured on 200k rows); both scale the same way on large inputs.
        ctx = DataContext.get_current()
        before = ctx.shuffle_strategy
        ctx.shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE
        try:
            return super().run()
        finally:
            ctx.shuffle_strategy = before

    def read_and_order(self) -> None:
        import ray

        n_parts = self.s.num_blocks or _auto_partitions(self.files)
        ctx = {"opts": self.opts, "files": self.files, "rejected_dir": self.rejected,
               "policy": self.s.duplicates}
        ds = ray.data.from_items([c.to_dict() for c in self.chunks], override_num_blocks=len(self.chunks))
        ds = ds.map_batches(_read_chunks, batch_size=1, batch_format="pyarrow", fn_kwargs={"ctx": ctx})
        ds = ds.repartition(n_parts, keys=["user"])
        ds = ds.map_batches(_sort_block, batch_size=None, batch_format="pyarrow", fn_kwargs={"ctx": ctx})
        self.sorted = ds.materialize()
        self.r.after_dedupe = self.sorted.count()
        artifacts.collect_task_outputs(self.rejected, self.tmp / "rejected")
        reasons = Counter(read_rejected(self.tmp, columns=["reason"]).column("reason").to_pylist())
        self.r.valid_rows = self.r.after_dedupe + reasons["duplicate"] + reasons["mind_history_repeat"]
        self.r.blocks = self.sorted.num_blocks()

    def item_counts(self) -> pa.Table:
        import ray

        # Partial counts per block (Ray Data), summed here: a Ray Data groupby would shuffle again and
        # costs 8 s of fixed overhead on small inputs.
        partial = self.sorted.map_batches(ops.count_items, batch_size=None, batch_format="pyarrow")
        # An empty hash partition (fewer users than partitions) can come back as a block without columns.
        tables = [t for t in ray.get(partial.to_arrow_refs()) if t.num_columns and t.num_rows]
        return pa.concat_tables(tables).group_by("item").aggregate([("count", "sum")]) \
            .rename_columns(["item", "count"])

    def sequences(self, kept: pa.Array) -> tuple[pa.Array, np.ndarray]:
        import ray

        kept_ref = ray.put(kept)
        seqs = self.sorted.map_batches(_sequence_block, batch_size=None, batch_format="pyarrow",
                                       fn_kwargs={"kept_ref": [kept_ref], "min_user": self.s.min_user_count})
        self.seqs = seqs.materialize()
        users, hist = [], np.zeros(len(kept), dtype=np.int64)
        for block in self.seqs.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not block.num_rows:
                continue
            users.append(block.column("user").combine_chunks())
            hist += ops.item_histogram(block, len(kept))
        users_arr = pa.concat_arrays(users) if users else pa.array([], kept.type)
        return users_arr, hist

    def write_splits(self) -> None:
        import ray

        users_ref = ray.put(self.r.users)
        split_ref = ray.put(self.r.user_split)
        for split in ops.SPLITS:
            (self.tmp / split).mkdir()
            kw = {"refs": [users_ref, split_ref], "split": split, "protocol": self.s.protocol,
                  "fraction": self.s.history_fraction}
            out = self.seqs.map_batches(_split_block, batch_size=None, batch_format="pyarrow", fn_kwargs=kw)
            # Written here, block by block in block order, so that the files are where the driver is.
            for i, ref in enumerate(out.to_arrow_refs()):
                block = ray.get(ref)
                if block.num_rows:
                    pq.write_table(block, self.tmp / split / f"part-{i:05d}.parquet")
                del block


def _auto_partitions(files: list[str]) -> int:
    import ray

    size = sum(os.path.getsize(f) for f in files if os.path.exists(f))
    cpus = int(ray.cluster_resources().get("CPU", 2))
    return max(2 * cpus, math.ceil(size / _INPUT_BYTES_PER_PARTITION))


# ------------------------------------------------------------------------------------------------
# Ray Data operators (top-level functions: shipped to workers by reference)
# ------------------------------------------------------------------------------------------------


def _read_chunks(batch: pa.Table, ctx: dict) -> pa.Table:
    goods = [_canonical_schema(ctx["opts"], as_read=True).empty_table()]
    for row in batch.to_pylist():
        chunk = Chunk(**{**row, "columns": tuple(row["columns"] or ())})
        good, rej = read_chunk(chunk, ctx["opts"])
        if rej.num_rows:
            _write_rejected(rej, ctx["rejected_dir"], f"read-{chunk.file_index:05d}-{chunk.first_row:012d}")
        goods.append(good)
    return unify(goods)


def _canonical_schema(opts: ReaderOptions, as_read: bool = False) -> pa.Schema:
    """Rows after the sort (as_read: as the reader returns them; MIND adds its ``history`` flag)."""
    ids = pa.string() if opts.string_ids else pa.int64()
    fields = [("user", ids), ("item", ids), ("ts", pa.int64()), ("ord", pa.int64())]
    return pa.schema(fields + ([("history", pa.bool_())] if as_read and opts.format == "mind" else []))


def _sort_block(block: pa.Table, ctx: dict) -> pa.Table:
    if block.num_rows == 0:  # an empty hash partition
        return _canonical_schema(ctx["opts"]).empty_table()
    out, rej = ops.sort_and_dedupe(block, ctx["policy"], ctx["files"])
    if rej.num_rows:
        first = int(pc.min(block.column("ord")).as_py())  # a name that is stable under task retries
        _write_rejected(rej, ctx["rejected_dir"], f"dedupe-{first:020d}")
    return out


def _sequence_block(block: pa.Table, kept_ref: list, min_user: int) -> pa.Table:
    import ray

    return ops.build_sequences(block, ray.get(kept_ref[0]), min_user)


def _split_block(seqs: pa.Table, refs: list, split: str, protocol: str, fraction: float) -> pa.Table:
    import ray

    users, user_split = ray.get(refs)
    user_index = ops.lookup(seqs.column("user"), users)
    return ops.emit_split(seqs, user_index, user_split, split, protocol, fraction)


def _write_rejected(rej: pa.Table, directory: str, name: str) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(rej, sink)
    artifacts.write_bytes(artifacts.join(directory, f"{name}.parquet"), sink.getvalue().to_pybytes())


