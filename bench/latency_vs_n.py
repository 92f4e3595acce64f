"""Latency against catalogue size: SEATER's beam search and exact inner-product search from 10k to 6.1M items.

    flock /tmp/seater-heavy.lock python -m bench.latency_vs_n            # N = 10k, 100k, 1M, 6.1M
    python -m bench.latency_vs_n --items 10000 100000 --users 64         # a quick look

Runs ``bench.bench_beam`` once per N, each in its own process (so one size's memory never counts for
another), with few users (the exact search at 6.1M costs about half a second per user), then plots
milliseconds per user against N for both sides, batched and single requests. Beam search walks D = log_k N
levels; exact search scores every item, so the gap should grow with N.

Writes bench/results/latency_vs_n.json and a PNG (default docs/img/latency_vs_n.png).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measure(items: int, users: int, threads: int) -> dict:
    """bench_beam at ``items`` -> its result JSON (batches of ``users``: one warm-up call, one timed)."""
    out = RESULTS / f"latency_vs_n_{items}.json"
    cmd = [sys.executable, "-m", "bench.bench_beam", "--items", str(items), "--users", str(users), "--batch",
           str(users), "--single-users", str(min(16, users)),
           "--single-users-exact", str(min(4, users)), "--threads", str(threads),
           "--out", str(out)]
    print(f"== N = {items:,}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def plot(rows: list[dict], path: Path, threads: int) -> None:
    from bench.plotting import pyplot, save

    plt = pyplot()

    n = [r["items"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (("seater_batched", "SEATER beam search, batched", "-o"),
                              ("seater_single", "SEATER beam search, one request", "--o"),
                              ("exact_batched", "exact inner product (faiss), batched", "-s"),
                              ("exact_single", "exact inner product (faiss), one request", "--s")):
        ax.plot(n, [r["ms_per_user"][key] for r in rows], style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="items N", ylabel="ms per user",
           title=f"Retrieval latency against catalogue size (k = 16, b = 50, {threads} threads)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 6_100_000])
    ap.add_argument("--users", type=int, default=64, help="users per batch (default 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", type=Path, default=Path("docs/img/latency_vs_n.png"))
    args = ap.parse_args()
    rows = []
    for items in args.items:
        r = measure(items, args.users, args.threads)
        rows.append({"items": items, "depth": r["depth"], "ms_per_user": r["ms_per_user"],
                     "load_average_1min": r["load_average_1min"]})
    print(f"\n{'N':>10} {'D':>3} {'SEATER batched':>15} {'SEATER single':>14} {'exact batched':>14} "
          f"{'exact single':>13} {'exact/SEATER batched':>21}  (ms per user)")
    for r in rows:
        ms = r["ms_per_user"]
        print(f"{r['items']:>10,} {r['depth']:>3} {ms['seater_batched']:>15.3f} {ms['seater_single']:>14.3f} "
              f"{ms['exact_batched']:>14.3f} {ms['exact_single']:>13.3f} "
              f"{ms['exact_batched'] / ms['seater_batched']:>20.1f}x")
    (RESULTS / "latency_vs_n.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.plot, args.threads)
    print(f"wrote {RESULTS / 'latency_vs_n.json'} and {args.plot}")


if __name__ == "__main__":
    main()
