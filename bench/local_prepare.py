"""`seater prepare` in one process with pyarrow alone, no Ray: the benchmark's peer (bench_prepare.py) and the
tests' cross-check of the Ray Data pipeline, also how the benchmarks and the tests prepare small datasets fast.

    from bench.local_prepare import prepare_local
    result = prepare_local(PrepareSettings(input="Beauty.txt", format="sequences", out="/tmp/beauty"))

The same steps as :func:`seater_dist.data.prepare.prepare` (its :class:`Engine`), each on one table holding
everything, with the same block functions (seater_dist/data/ops.py): the same dataset, file for file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seater_dist.config import PrepareSettings
from seater_dist.data import ops
from seater_dist.data.prepare import Engine, PrepareResult, prepare_with
from seater_dist.data.readers import read_chunk, unify


def prepare_local(settings: PrepareSettings) -> PrepareResult:
    """The same preparation in this process with pyarrow only (no Ray): the benchmark's peer."""
    return prepare_with(settings, LocalEngine)


class LocalEngine(Engine):
    """Everything in this process on one table (pyarrow + numpy)."""

    def read_and_order(self) -> None:
        goods, rejs = [], []
        for c in self.chunks:
            g, rj = read_chunk(c, self.opts)
            goods.append(g)
            rejs.append(rj)
        table = unify(goods)
        self.r.valid_rows = table.num_rows
        self.table, rej = ops.sort_and_dedupe(table, self.s.duplicates, self.files)
        rejs.append(rej)
        rejected = pa.concat_tables(rejs)
        if rejected.num_rows:
            pq.write_table(rejected, self.tmp / "rejected" / "part-00000.parquet")
        self.r.after_dedupe = self.table.num_rows
        self.r.blocks = 1

    def item_counts(self) -> pa.Table:
        return ops.count_items(self.table)

    def sequences(self, kept: pa.Array) -> tuple[pa.Array, np.ndarray]:
        self.seqs = ops.build_sequences(self.table, kept, self.s.min_user_count)
        return self.seqs.column("user").combine_chunks(), ops.item_histogram(self.seqs, len(kept))

    def write_splits(self) -> None:
        user_index = ops.lookup(self.seqs.column("user"), self.r.users)
        for split in ops.SPLITS:
            (self.tmp / split).mkdir()
            part = ops.emit_split(self.seqs, user_index, self.r.user_split, split, self.s.protocol,
                                  self.s.history_fraction)
            pq.write_table(part, self.tmp / split / "part-00000.parquet")
