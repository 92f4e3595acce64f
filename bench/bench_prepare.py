"""Benchmark `seater prepare` on the `microvideo` synth preset (85M interactions) on this machine.

    flock /tmp/seater-heavy.lock .venv/bin/python -m bench.bench_prepare                 # full size
    .venv/bin/python -m bench.bench_prepare --fraction 0.05                              # 4.25M rows

Three measured steps, each in its own process tree (so that one step's memory never counts for another):

1. ``synth``: generating the preset (parallel Ray tasks writing parquet);
2. ``ray``: :func:`seater_dist.data.prepare.prepare` (Ray Data, local 2-CPU Ray);
3. ``peer``: :func:`bench.local_prepare.prepare_local`, the same work in one process with pyarrow.

For each: wall time and peak memory of the whole process tree (driver, raylet, GCS, Ray workers),
sampled every 0.5 s as the sum of PSS (proportional set size: shared pages such as the object store are
split among the processes mapping them, so nothing is counted twice) and, for reference, the sum of RSS.
Goal: the Ray prepare within 15 minutes and 12 GiB. Results: bench/results/bench_prepare.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_SECONDS, GOAL_GIB = 15 * 60, 12.0
GIB = 1 << 30


class TreeMemory:
    """Samples the summed PSS and RSS of a process and all its descendants, keeping the peaks."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self.peak_procs = 0
        self._cpu: dict[int, float] = {}  # pid -> last seen user+system seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        pss = rss = 0
        for p in procs:
            try:
                info = p.memory_full_info()
                pss += info.pss
                rss += info.rss
                cpu = p.cpu_times()
                self._cpu[p.pid] = cpu.user + cpu.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(procs))

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of the tree (as last sampled per process: a lower bound on a loaded machine)."""
        return sum(self._cpu.values())

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def measure(step: str, args: list[str]) -> dict:
    """Run ``python -m bench.bench_prepare --step ...`` as a child; wall time, peak memory, its JSON."""
    out_json = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_prepare_{step}_{os.getpid()}.json"
    cmd = [sys.executable, "-m", "bench.bench_prepare", "--step", step, "--result", str(out_json), *args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
    with TreeMemory(proc.pid) as mem:
        code = proc.wait()
    wall = time.time() - t0
    if code != 0:
        raise SystemExit(f"bench step {step} failed with exit code {code}")
    inner = json.loads(out_json.read_text())
    out_json.unlink()
    return {"step": step, "wall_s": round(wall, 1), "cpu_s": round(mem.cpu_seconds, 1),
            "peak_pss_gib": round(mem.peak_pss / GIB, 2),
            "peak_rss_sum_gib": round(mem.peak_rss / GIB, 2), "peak_processes": mem.peak_procs, **inner}


# ------------------------------------------------------------------------------------------------
# Steps (run in the child process)
# ------------------------------------------------------------------------------------------------


def _sizes(preset: str, fraction: float) -> dict:
    from seater_dist.data.synth import PRESETS

    spec = PRESETS[preset]
    if fraction >= 1:
        return {}
    return {"num_users": max(10, int(spec.num_users * fraction)), "num_items": max(50, int(spec.num_items * fraction)),
            "num_interactions": max(100, int(spec.num_interactions * fraction)),
            "num_partitions": max(2, round(spec.num_partitions * fraction))}


def run_step(a: argparse.Namespace) -> dict:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from seater_dist.config import PrepareSettings, SynthSettings

    t0 = time.time()
    if a.step == "synth":
        from seater_dist.data.synth import synthesize
        from seater_dist.runtime.ray_env import init_ray

        init_ray(num_cpus=2)
        summary = synthesize(SynthSettings(preset=a.preset, out=str(a.work / "synth"), seed=a.seed,
                                           **_sizes(a.preset, a.fraction)))
    else:
        settings = PrepareSettings(input=str(a.work / "synth"), format="interactions", protocol="comirec",
                                   out=str(a.work / f"dataset_{a.step}"))
        if a.step == "ray":
            from seater_dist.data.prepare import prepare
            from seater_dist.runtime.ray_env import init_ray

            init_ray(num_cpus=2)
            summary = prepare(settings)
        else:
            from bench.local_prepare import prepare_local

            summary = prepare_local(settings)
    return {"inner_s": round(time.time() - t0, 1), "summary": dataclasses.asdict(summary)}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> str:
    peer = next((r for r in rows if r["step"] == "peer"), None)
    lines = [f"{'step':<28} {'wall s':>9} {'CPU s':>9} {'peak PSS GiB':>13} {'sum RSS GiB':>12} {'time/peer':>10} "
             f"{'mem/peer':>9}"]
    names = {"synth": "synth (Ray tasks)", "ray": "prepare (Ray Data)", "peer": "prepare (1 process, pyarrow)"}
    for r in rows:
        tr = f"{r['wall_s'] / peer['wall_s']:.2f}x" if peer and r["step"] != "synth" else "-"
        mr = f"{r['peak_pss_gib'] / peer['peak_pss_gib']:.2f}x" if peer and r["step"] != "synth" else "-"
        lines.append(f"{names[r['step']]:<28} {r['wall_s']:>9,.1f} {r.get('cpu_s', 0):>9,.1f} "
                     f"{r['peak_pss_gib']:>13.2f} {r['peak_rss_sum_gib']:>12.2f} {tr:>10} {mr:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="microvideo", choices=["tiny", "small", "microvideo"])
    p.add_argument("--fraction", type=float, default=1.0, help="scale the preset's sizes (develop small first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/seater-bench-prepare"), help="scratch directory")
    p.add_argument("--reuse-synth", action="store_true", help="skip generating if --work holds the same synth")
    p.add_argument("--no-peer", action="store_true", help="skip the single-process peer")
    p.add_argument("--step", choices=["synth", "ray", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.step:
        a.result.write_text(json.dumps(run_step(a)))
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    common = ["--preset", a.preset, "--fraction", str(a.fraction), "--seed", str(a.seed), "--work", str(a.work)]
    rows = []
    manifest = a.work / "synth" / "manifest.json"
    if a.reuse_synth and manifest.exists():
        print(f"reusing {manifest.parent}")
    else:
        rows.append(measure("synth", common))
    for step in ("ray",) + (() if a.no_peer else ("peer",)):
        rows.append(measure(step, common))
    by_step = {r["step"]: r for r in rows}
    for step in ("ray", "peer"):
        if step in by_step:
            by_step[step]["stage_seconds"] = json.loads(
                (a.work / f"dataset_{step}" / "manifest.json").read_text()).get("stage_seconds")
    same = None
    if "ray" in by_step and "peer" in by_step:
        ray_counts = json.loads((a.work / "dataset_ray" / "manifest.json").read_text())["counts"]
        peer_counts = json.loads((a.work / "dataset_peer" / "manifest.json").read_text())["counts"]
        same = ray_counts == peer_counts
    synth = json.loads(manifest.read_text())
    result = {"preset": a.preset, "fraction": a.fraction, "synth_counts": synth["counts"],
              "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GIB, 1)},
              "goal": {"seconds": GOAL_SECONDS, "peak_gib": GOAL_GIB}, "steps": rows,
              "ray_meets_goal": ("ray" in by_step and by_step["ray"]["wall_s"] <= GOAL_SECONDS
                                 and by_step["ray"]["peak_pss_gib"] <= GOAL_GIB),
              "ray_and_peer_counts_equal": same}
    RESULTS.mkdir(exist_ok=True)
    name = "bench_prepare" if a.fraction >= 1 and a.preset == "microvideo" else f"bench_prepare_{a.preset}_{a.fraction}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(f"\nprepare on synth {a.preset} x{a.fraction}: {synth['counts']['interactions']:,} interactions, "
          f"{synth['counts']['users']:,} users, {synth['counts']['items']:,} items")
    print(_table(rows))
    print(f"goal: <= {GOAL_SECONDS / 60:.0f} min and <= {GOAL_GIB:.0f} GiB for the Ray prepare: "
          f"{'met' if result['ray_meets_goal'] else 'NOT met'}; Ray and peer counts equal: {same}")
    print(f"results: {RESULTS / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
