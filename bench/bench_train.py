"""Distributed SEATER training step: time and bytes communicated per step as the catalogue grows, and
throughput with 1 worker against 2.

    python -m bench.bench_train                 # N = 61k and 6.1M items, 2 workers, every table update rule
    python -m bench.bench_train --quick         # N = 61k and 610k (a few minutes)
    python -m bench.bench_train --optimizers lazy_adam

The table's update rules are measured at both sizes (adam: dense Adam semantics, with the default L2 on
the table one pass over it per step; adam_table_l2_0: dense Adam without L2 on the table, untouched rows
caught up in closed form, cost per step the rows touched; adamw: dense AdamW semantics, decoupled decay
1e-2 on the table, caught up in closed form too; lazy_adam: row-sparse Adam); then 1 worker against 2 at
the small size.

The workers are real torch.distributed (gloo) processes running the production step
(seater_dist.train.sparse_table.SparseTableDDP around SeaterModel); Ray Train adds only orchestration.
Batches are identical across catalogue sizes (same seed, items drawn from a power law over the first
61k items), so only N changes. The tree is a balanced k = 16 tree built by ItemTree.from_paths.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"
# The table update rules measured: SparseTableDDP arguments.
UPDATE_RULES = {"adam": {"table_optimizer": "adam"},
                "adam_table_l2_0": {"table_optimizer": "adam", "table_weight_decay": 0.0},
                "adamw": {"table_optimizer": "adamw", "table_weight_decay": 1e-2},
                "lazy_adam": {"table_optimizer": "lazy_adam"}}


def balanced_tree(num_items: int, k: int):
    """A balanced k-ary tree whose leaves are the items in id order (structure is irrelevant to speed)."""
    from seater_dist.tree import ItemTree
    from seater_dist.tree.balance import balanced_paths

    return ItemTree.from_paths(balanced_paths(num_items, k), k)


def _batches(steps: int, batch: int, t: int, pad: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(1234 + rank)
    out = []
    for _ in range(steps):
        items = np.minimum(rng.zipf(1.2, size=(batch, t + 1)) - 1, 61_000 - 1)
        history = torch.from_numpy(items[:, :t])
        history[:, : rng.integers(0, t)] = pad
        out.append((history, torch.from_numpy(items[:, t])))
    return out


def _worker(rank: int, world: int, port: int, num_items: int, steps: int, global_batch: int, optimizer: str,
            queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from seater_dist.config import SeaterSettings
    from seater_dist.model.seater import SeaterModel
    from seater_dist.train.sparse_table import SparseTableDDP
    from seater_dist.train.tasks import LossModule

    tree = balanced_tree(num_items, 16)
    torch.manual_seed(0)
    model = SeaterModel(tree, SeaterSettings(), sparse_embedding=True)

    class _Task:
        def losses(self, m, batch):
            return m(batch["history"], batch["target"])

    module = LossModule(_Task(), model)
    trainer = SparseTableDDP(module, "model.tok_emb", lr=1e-3, weight_decay=1e-5, find_unused_parameters=False,
                             **UPDATE_RULES[optimizer])
    batches = _batches(steps, global_batch // world, 20, tree.pad, rank)
    times, sent, rows = [], [], []
    for i, (history, target) in enumerate(batches):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        trainer.ddp({"history": history, "target": target})["loss"].backward()
        stats = trainer.step(grad_clip=1.0)
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
            sent.append(stats.total_bytes)
            rows.append(stats.touched_rows)
    if rank == 0:
        queue.put({"num_items": num_items, "world": world, "optimizer": optimizer,
                   "table_update": trainer.table_update,
                   "step_ms": 1000 * statistics.median(times),
                   "bytes_per_step": statistics.mean(sent), "touched_rows": statistics.mean(rows),
                   "dense_bytes": trainer.dense_bytes, "samples_per_s": global_batch / statistics.median(times),
                   "table_mb": model.tok_emb.weight.numel() * 4 / 2**20})
    if world > 1:
        dist.destroy_process_group()


def measure(num_items: int, world: int, optimizer: str, steps: int = 15, global_batch: int = 256) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, num_items, steps, global_batch, optimizer, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
    print(f"  {optimizer:<15} N = {num_items:>9,}  workers {world}: {result['step_ms']:7.1f} ms/step, "
          f"{result['bytes_per_step'] / 1e6:6.2f} MB/step sent, {result['touched_rows']:,.0f} table rows, "
          f"{result['samples_per_s']:,.0f} samples/s", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="61k and 610k items instead of 61k and 6.1M")
    p.add_argument("--optimizers", nargs="+", default=list(UPDATE_RULES), choices=list(UPDATE_RULES),
                   help="table update rules to measure (default: all of them)")
    args = p.parse_args()
    small, large = 61_000, (610_000 if args.quick else 6_100_000)
    print(f"SEATER step, batch 256, k = 16, d = 64, t = 20, gloo on {os.cpu_count()} CPUs")
    runs, summary = [], {}
    lines = [f"| table update rule | how | step ms, N = {small:,} | step ms, N = {large:,} | ratio | MB sent per "
             f"step (N = {small:,} / {large:,}) | bytes ratio |", "|---|---|---|---|---|---|---|"]
    for opt in args.optimizers:
        a, b = measure(small, 2, opt), measure(large, 2, opt)
        runs += [a, b]
        summary[opt] = {"step_time_ratio_large_vs_small": b["step_ms"] / a["step_ms"],
                        "bytes_ratio_large_vs_small": b["bytes_per_step"] / a["bytes_per_step"]}
        lines.append(f"| {opt} | {b['table_update']} | {a['step_ms']:.1f} | {b['step_ms']:.1f} | "
                     f"{b['step_ms'] / a['step_ms']:.2f} | "
                     f"{a['bytes_per_step'] / 1e6:.3f} / {b['bytes_per_step'] / 1e6:.3f} | "
                     f"{b['bytes_per_step'] / a['bytes_per_step']:.2f} |")
    one = measure(small, 1, args.optimizers[0])
    two = next(r for r in runs if r["num_items"] == small and r["optimizer"] == args.optimizers[0])
    runs.append(one)
    summary["samples_per_s_2_vs_1_worker"] = two["samples_per_s"] / one["samples_per_s"]
    summary["dense_allreduce_of_table_mb"] = runs[1]["table_mb"] * 1.048576
    print("\n" + "\n".join(lines))
    print(f"\na dense all-reduce of the N = {large:,} table would send "
          f"{summary['dense_allreduce_of_table_mb']:,.0f} MB")
    print(f"throughput at N = {small:,} ({args.optimizers[0]}): 1 worker {one['samples_per_s']:,.0f} samples/s, "
          f"2 workers {two['samples_per_s']:,.0f} samples/s (x{summary['samples_per_s_2_vs_1_worker']:.2f})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_train.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
