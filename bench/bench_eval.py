"""Offline evaluation at the paper's industrial scale: users per second with 1 and then 2 Ray Data actors.

    flock /tmp/seater-heavy.lock python -m bench.bench_eval          # N = 6.1M items, k = 16, 100,000 users
    python -m bench.bench_eval --items 3000 --users 2000              # a quick look

A synthetic SEATER checkpoint (random weights over a random balanced tree of N items, k = 16, d = 64, t = 20,
b = 50; the one bench_serve builds, shared through bench/synthetic.py) and a leave-one-out dataset of U
synthetic users over the same N items are built once and cached under --cache. Then
`seater_dist.eval.offline.evaluate` runs on a local 2-CPU Ray, the same users, with an actor pool of 1 and
then of 2 actors (each loading the checkpoint once, 1 torch thread, half a CPU reserved: the read tasks
keep the rest). Reported per pool size: users per second over the whole call, over its Ray Data part
(actors loading, ranking, the driver collecting), and once started (the difference to a short call over
the first 2 x actors x batch users, which pays the same start-up: the rate a bigger evaluation tends to),
and the ratios 2 actors / 1 actor; the two pools' metrics must be identical to the last digit (the run
fails otherwise).

Goal (offline evaluation a reader can trust): 2 actors >= 1.7x one.
Writes bench/results/bench_eval.json (bench_eval_<N>.json for other sizes, or --out).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_beam: busy-waiting OpenMP threads on a shared box

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from bench import synthetic
from seater_dist.config import EvalSettings
from seater_dist.eval.offline import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 1.7


def log(msg: str) -> None:
    print(f"[bench_eval {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(checkpoint: Path, dataset: Path, actors: int, batch_size: int, out: Path) -> dict[str, Any]:
    """One evaluation of every test user with a pool of ``actors`` actors -> its figures.

    A short evaluation of the first 2 x actors x batch_size users runs first: the difference between the two
    calls is the steady-state rate ("marginal"), without what every call pays once whatever its size (actors
    starting and loading the checkpoint, Ray Data starting, the driver's checks and writes)."""
    def timed(settings: EvalSettings, where: Path) -> tuple[Any, float]:
        t0 = time.perf_counter()
        result = evaluate(checkpoint, dataset, "test", settings, out=where)
        return result, time.perf_counter() - t0

    settings = EvalSettings(concurrency=actors, cpus_per_actor=0.5, batch_size=batch_size)
    short, short_wall = timed(settings.model_copy(update={"max_users": 2 * actors * batch_size}), out / "short")
    result, wall = timed(settings, out / "all")
    marginal = (result.users - short.users) / (wall - short_wall)
    figures = {"actors": actors, "users": result.users, "seconds": round(wall, 2),
               "rank_seconds": result.rank_seconds, "users_per_second": result.users / wall,
               "rank_users_per_second": result.users / result.rank_seconds,
               "short_users": short.users, "short_seconds": round(short_wall, 2),
               "marginal_users_per_second": marginal, "metrics": result.metrics, "ci95": result.ci95}
    log(f"{actors} actor(s): {result.users:,} users in {wall:,.1f} s ({figures['users_per_second']:,.0f} users/s; "
        f"Ray Data part {result.rank_seconds:,.1f} s); {short.users:,} users in {short_wall:,.1f} s, so "
        f"{marginal:,.0f} users/s once started; recall@50 {result.metrics['recall@50']:.4f}")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=6_100_000, help="N, items in the catalogue (default 6.1M)")
    ap.add_argument("--users", type=int, default=100_000, help="synthetic test users to evaluate (default 100,000)")
    ap.add_argument("--k", type=int, default=16, help="branching factor of the tree (default 16)")
    ap.add_argument("--beam", type=int, default=50, help="beam size b (default 50: Recall@50 needs 50)")
    ap.add_argument("--batch-size", type=int, default=256, help="users per actor batch (EvalSettings.batch_size)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("SEATER_BENCH_DATA", "/tmp/seater-bench")),
                    help="where the synthetic checkpoint and dataset are kept (default /tmp/seater-bench, shared "
                    "with bench_serve)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, tree and users")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/bench_eval.json; "
                    "bench_eval_<N>.json for other sizes)")
    args = ap.parse_args()

    out = args.out or RESULTS / ("bench_eval.json" if args.items == 6_100_000 else f"bench_eval_{args.items}.json")
    t_start = time.perf_counter()
    checkpoint = synthetic.seater_checkpoint(
        synthetic.checkpoint_dir(args.cache, args.items, args.k, args.beam, args.seed) / "seater",
        synthetic.item_ids(args.items), args.k, args.beam, args.seed, log)
    dataset = synthetic.loo_dataset(args.cache / f"eval-N{args.items}-U{args.users}-s{args.seed}", args.items,
                                    args.users, args.seed, log)

    from seater_dist.runtime.ray_env import init_ray

    if args.users <= 4 * args.batch_size:
        raise SystemExit(f"--users must exceed 4 x --batch-size ({4 * args.batch_size}): the short calls take "
                         f"2 x actors x batch users")
    init_ray(num_cpus=2)
    work = args.cache / f"eval-N{args.items}-U{args.users}-s{args.seed}-runs"
    # Untimed: the first evaluation of the process pays for imports, Ray Data's start and a cold page cache,
    # which would otherwise fall on the 1-actor short call only.
    evaluate(checkpoint, dataset, "test", EvalSettings(concurrency=1, cpus_per_actor=0.5, batch_size=args.batch_size,
                                                       max_users=args.batch_size), out=work / "warm_up")
    runs = [run(checkpoint, dataset, actors, args.batch_size, work / f"actors_{actors}") for actors in (1, 2)]
    identical = runs[0]["metrics"] == runs[1]["metrics"] and runs[0]["ci95"] == runs[1]["ci95"]
    ratio = runs[1]["users_per_second"] / runs[0]["users_per_second"]
    rank_ratio = runs[1]["rank_users_per_second"] / runs[0]["rank_users_per_second"]
    marginal_ratio = runs[1]["marginal_users_per_second"] / runs[0]["marginal_users_per_second"]
    print(f"\n{'actors':>6}  {'users':>9}  {'seconds':>8}  {'users/s':>8}  {'Ray Data part users/s':>22}  "
          f"{'once started users/s':>21}")
    for r in runs:
        print(f"{r['actors']:>6}  {r['users']:>9,}  {r['seconds']:>8,.1f}  {r['users_per_second']:>8,.0f}  "
              f"{r['rank_users_per_second']:>22,.0f}  {r['marginal_users_per_second']:>21,.0f}")
    print(f"\n2 actors / 1 actor: {ratio:.2f}x whole call, {marginal_ratio:.2f}x once started "
          f"(Ray Data part {rank_ratio:.2f}x; goal >= {GOAL}x)   metrics identical: {'yes' if identical else 'NO'}")
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "items": args.items, "users": args.users, "k": args.k, "beam": args.beam, "batch_size": args.batch_size,
        "runs": runs, "ratio": ratio, "rank_ratio": rank_ratio, "marginal_ratio": marginal_ratio, "goal": GOAL,
        "identical_metrics": identical,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }, indent=2))
    log(f"wrote {out}")
    if not identical:
        raise SystemExit("the metrics differ between 1 and 2 actors")


if __name__ == "__main__":
    main()
