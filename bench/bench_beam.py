"""Constrained beam search vs exact inner-product search at the paper's industrial scale.

    flock /tmp/seater-heavy.lock python -m bench.bench_beam            # N = 6.1M, k = 16, D = 6, b = 50
    python -m bench.bench_beam --items 200000 --users 512               # a quick look

Both sides answer the same users with the same number of threads:
* SEATER: ``SeaterModel.beam_search`` (encoder once per user, D = 6 decoder steps with a key/value cache,
  b·k = 800 candidate scores per user and step), random balanced tree over N items, random weights;
* exact: faiss IndexFlatIP over the same N item embeddings (the item rows of SEATER's table), queried with a
  64-d user vector per user (the mean encoder state; the peer's encoder cost is left out, in its favour).

Reported: milliseconds per user, batched (256 users per call) and single requests (batch of 1), the ratio
exact / SEATER, and peak resident memory of each phase (sampled every 5 ms). Results go to
bench/results/bench_beam.json.
"""

from __future__ import annotations

import os

# Both torch and faiss use OpenMP. On a shared machine, the default busy-waiting of idle OpenMP threads
# costs ~40x on small ops (one SEATER request at 1M items: 313 ms CPU with 2 spinning threads, 9 ms with
# PASSIVE, 7.5 ms with 1 thread). Set before torch/faiss load; applies to both sides alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import torch

from bench.synthetic import random_balanced_tree
from seater_dist.config import SeaterSettings
from seater_dist.model.seater import SeaterModel

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3


class PeakRSS:
    """Peak resident set size of this process while the block runs (sampled by a thread)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process()

    @contextmanager
    def measure(self) -> Iterator["PeakRSS"]:
        self.peak = self._proc.memory_info().rss
        self._stop.clear()
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)


def log(msg: str) -> None:
    print(f"[bench_beam {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed_per_user(fn, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(wall, CPU) milliseconds per user of fn over the batches (one warm-up call first, not timed).

    CPU time (all threads of this process) is reported beside wall time because the machine is shared:
    when other work competes for the 2 cores, wall time inflates and CPU time much less.
    """
    fn(batches[0])
    users, start, cpu = 0, time.perf_counter(), time.process_time()
    for batch in batches:
        fn(batch)
        users += batch.shape[0]
    return (time.perf_counter() - start) * 1000 / users, (time.process_time() - cpu) * 1000 / users


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=6_100_000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--beam", type=int, default=50)
    ap.add_argument("--top-n", type=int, default=50)
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--users", type=int, default=1024, help="users in the batched runs")
    ap.add_argument("--single-users", type=int, default=64, help="users sent one at a time (SEATER)")
    ap.add_argument("--single-users-exact", type=int, default=16, help="users sent one at a time (exact)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_beam.json")
    args = ap.parse_args()

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    proc, mem = psutil.Process(), PeakRSS()
    rss0 = proc.memory_info().rss

    t0 = time.perf_counter()
    tree = random_balanced_tree(args.items, args.k, seed=args.seed)
    tree_s = time.perf_counter() - t0
    log(f"built a random balanced tree: {args.items:,} items, k={args.k}, depth {tree.depth}, "
        f"{tree.num_tokens:,} tokens in {tree_s:.1f} s")
    settings = SeaterSettings(history_len=args.history, beam_size=args.beam)
    t0 = time.perf_counter()
    model = SeaterModel(tree, settings, trainable=False).eval()
    model_s = time.perf_counter() - t0
    rss_model = proc.memory_info().rss
    log(f"model ready in {model_s:.1f} s: table {tree.num_tokens:,} x {settings.d_model}, "
        f"RSS {rss_model / GIB:.2f} GiB")

    g = torch.Generator().manual_seed(args.seed + 1)
    histories = torch.randint(0, args.items, (args.users, args.history), generator=g)
    batches = list(histories.split(args.batch))
    singles = [histories[i : i + 1] for i in range(args.single_users)]

    def seater(h: torch.Tensor) -> None:
        model.beam_search(h, args.beam, args.top_n)

    load_start = os.getloadavg()[0]
    with mem.measure():
        seater_batched, seater_batched_cpu = timed_per_user(seater, batches)
    seater_batched_peak = mem.peak
    log(f"SEATER batched ({args.batch}/call): {seater_batched:.3f} ms/user (CPU {seater_batched_cpu:.3f})")
    with mem.measure():
        seater_single, seater_single_cpu = timed_per_user(seater, singles)
    log(f"SEATER single requests: {seater_single:.3f} ms/user (CPU {seater_single_cpu:.3f})")

    with torch.no_grad():
        memory, pad_mask = model.encode(histories)
        user_vecs = SeaterModel._mean_memory(memory, pad_mask).numpy().astype(np.float32)
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(settings.d_model)
    index.add(np.ascontiguousarray(model.tok_emb.weight.detach()[: args.items].numpy()))
    index_s = time.perf_counter() - t0
    log(f"faiss IndexFlatIP over {args.items:,} items built in {index_s:.1f} s")
    user_batches = [torch.from_numpy(b) for b in np.array_split(user_vecs, len(batches))]

    def exact(u: torch.Tensor) -> None:
        index.search(u.numpy(), args.top_n)

    with mem.measure():
        exact_batched, exact_batched_cpu = timed_per_user(exact, user_batches)
    exact_batched_peak = mem.peak
    log(f"exact batched: {exact_batched:.3f} ms/user (CPU {exact_batched_cpu:.3f})")
    exact_singles = [torch.from_numpy(user_vecs[i : i + 1]) for i in range(args.single_users_exact)]
    exact_single, exact_single_cpu = timed_per_user(exact, exact_singles)
    log(f"exact single requests: {exact_single:.3f} ms/user (CPU {exact_single_cpu:.3f})")
    load_end = os.getloadavg()[0]

    # Agreement check (not a quality measure; weights are random): SEATER's items are real item ids.
    items, _ = model.beam_search(histories[:4], args.beam, args.top_n)
    assert ((items >= 0) & (items < args.items)).all()

    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "depth": tree.depth,
        "num_tokens": tree.num_tokens,
        "ms_per_user": {
            "seater_batched": seater_batched,
            "exact_batched": exact_batched,
            "seater_single": seater_single,
            "exact_single": exact_single,
        },
        "cpu_ms_per_user": {
            "seater_batched": seater_batched_cpu,
            "exact_batched": exact_batched_cpu,
            "seater_single": seater_single_cpu,
            "exact_single": exact_single_cpu,
        },
        "speedup_exact_over_seater": {
            "batched": exact_batched / seater_batched,
            "single": exact_single / seater_single,
            "batched_cpu": exact_batched_cpu / seater_batched_cpu,
            "single_cpu": exact_single_cpu / seater_single_cpu,
        },
        "load_average_1min": {"start": load_start, "end": load_end},
        "memory_gib": {
            "baseline_rss": rss0 / GIB,
            "after_tree_and_model": rss_model / GIB,
            "peak_seater_batched": seater_batched_peak / GIB,
            "peak_with_faiss_index_batched": exact_batched_peak / GIB,
            "faiss_index_bytes": args.items * settings.d_model * 4 / GIB,
            "seater_table_bytes": tree.num_tokens * settings.d_model * 4 / GIB,
        },
        "seconds": {"tree": tree_s, "model_init": model_s, "faiss_index": index_s},
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "python": platform.python_version(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "torch": torch.__version__, "faiss": faiss.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    log(f"wrote {args.out}")


def print_table(r: dict) -> None:
    ms, cpu, sp, mem = r["ms_per_user"], r["cpu_ms_per_user"], r["speedup_exact_over_seater"], r["memory_gib"]
    cfg = r["config"]
    print()
    print(f"N = {cfg['items']:,} items, k = {cfg['k']}, D = {r['depth']}, b = {cfg['beam']}, "
          f"t = {cfg['history']}, d = 64, {cfg['threads']} threads; load average "
          f"{r['load_average_1min']['start']:.1f} -> {r['load_average_1min']['end']:.1f}")
    print(f"{'mode':<26}{'SEATER ms/user':>16}{'exact ms/user':>16}{'exact / SEATER':>16}{'(CPU time ratio)':>18}")
    for mode, label in (("batched", f"batched ({cfg['batch']} users/call)"), ("single", "single request")):
        print(f"{label:<26}{ms['seater_' + mode]:>16.3f}{ms['exact_' + mode]:>16.3f}{sp[mode]:>15.1f}x"
              f"{sp[mode + '_cpu']:>17.1f}x")
    print(f"{'CPU ms/user (batched)':<26}{cpu['seater_batched']:>16.3f}{cpu['exact_batched']:>16.3f}")
    print(f"peak RSS: SEATER batched {mem['peak_seater_batched']:.2f} GiB (table {mem['seater_table_bytes']:.2f} GiB); "
          f"with the faiss index as well {mem['peak_with_faiss_index_batched']:.2f} GiB "
          f"(index {mem['faiss_index_bytes']:.2f} GiB)")
    goal = "met" if sp["batched"] >= 10 else "NOT met"
    print(f"goal: SEATER >= 10x less time per user than exact search, batched: {goal} ({sp['batched']:.1f}x)")


if __name__ == "__main__":
    main()
