"""Run every benchmark's quick variant, one after another (`make bench`).

    python -m bench.run_all              # run them all (heavy: nothing else on the machine meanwhile)
    python -m bench.run_all --list       # the benchmarks and the command each one runs
    python -m bench.run_all --dry-run    # print the commands without running them
    python -m bench.run_all --only bench_tree bench_train

The full-size commands are in bench/README.md. Each benchmark writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> the arguments of its quick variant (python -m bench.<name> ARGS)
QUICK: dict[str, list[str]] = {
    "bench_prepare": ["--fraction", "0.05"],
    "bench_beam": ["--items", "200000", "--users", "512"],
    "bench_serve": ["--items", "20000", "--duration", "8"],
    "bench_eval": ["--items", "3000", "--users", "2000"],
    "latency_vs_n": ["--items", "10000", "100000", "--users", "64", "--plot", "runs/latency_vs_n.png"],
    "bench_train": ["--quick"],
    "bench_tree": ["--part", "a"],
    "beauty_quality": ["--data", str(ROOT.parent / "shared" / "data" / "beauty" / "Beauty.txt"), "--only", "comirec",
                       "--epochs", "2", "--out", "runs/beauty_quick"],
    # after beauty_quality: it sweeps the checkpoint that run trained
    "beam_sweep": ["--checkpoint", "runs/beauty_quick/comirec/seater/best",
                   "--data", "runs/beauty_quick/comirec/dataset",
                   "--users", "500", "--beams", "5", "50", "--plot", "runs/beauty_quick/beam_sweep.png"],
}


def commands(only: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """(name, argv) of every benchmark to run; each module must exist in bench/."""
    chosen = only or list(QUICK)
    unknown = [n for n in chosen if n not in QUICK]
    if unknown:
        raise SystemExit(f"run_all: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(QUICK)}")
    for name in chosen:
        if importlib.util.find_spec(f"bench.{name}") is None:
            raise SystemExit(f"run_all: bench/{name}.py does not exist")
    return [(name, [sys.executable, "-m", f"bench.{name}", *QUICK[name]]) for name in chosen]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the benchmarks and their quick commands")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these (of: {', '.join(QUICK)})")
    args = p.parse_args(argv)
    todo = commands(args.only)
    if args.list or args.dry_run:
        for name, cmd in todo:
            print(f"{name:<16} python -m bench.{name} {' '.join(cmd[3:])}")
        return 0
    failed = []
    for name, cmd in todo:
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        code = subprocess.call(cmd, cwd=ROOT)
        print(f"== {name}: exit {code} after {time.time() - t0:,.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
