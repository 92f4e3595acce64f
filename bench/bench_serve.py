"""The retrieval service under load: SEATER (S = 1, 2 beam shards) and SASRec (exact, HNSW) behind one API.

    flock /tmp/seater-heavy.lock python -m bench.bench_serve          # N = 6.1M items, k = 16, D = 6, b = 50
    python -m bench.bench_serve --items 20000 --duration 8            # a quick look

Synthetic checkpoints with random weights (speed does not depend on them), cached under --work: SEATER over a
random balanced tree of N items (k = 16, d = 64, t = 20, b = 50) and a SASRec (d = 64) over the same N items.
SEATER runs in both service layouts (ServeArgs.layout: "split" deployments, or a "single" deployment holding
the encoder and the shards). Each configuration is deployed on a local 2-CPU Ray with
`seater_dist.serve.app.build_app` (Serve on
127.0.0.1 only) and driven by an open-loop load generator in a second process (aiohttp): requests are
scheduled at a fixed rate (10, 25, 50 per second) whatever the answers, latency is measured from each
request's scheduled time (so a slow service cannot hide its queue), a request not answered within --timeout
counts as failed. Per configuration and rate: sustained throughput (answers 200 per second of the window),
p50 / p99 latency, failures; per replica, its peak memory (RSS and PSS, sampled every 0.5 s while loaded).
SASRec exact search is O(N) per request: once a rate saturates it, higher rates are skipped.

Goal: SEATER p99 <= 50 ms at a sustained 50 rps on 2 cores (100 ms is the floor).
Writes bench/results/bench_serve.json (or --out).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_beam: busy-waiting OpenMP threads on a shared box

import argparse
import asyncio
import json
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import synthetic

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3


def log(msg: str) -> None:
    print(f"[bench_serve {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ the load generator


async def _drive(url: str, rate: float, duration: float, histories: list[list[str]], top_n: int,
                 timeout: float, max_inflight: int) -> dict[str, Any]:
    import aiohttp

    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failures: dict[str, int] = {}
    expanded = 0
    done_at: list[float] = []
    sem = asyncio.Semaphore(max_inflight)
    connector = aiohttp.TCPConnector(limit=max_inflight, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    urls = url.split(",")  # several (direct-ingress replicas): round robin, as a load balancer in front would

    async def one(session: aiohttp.ClientSession, scheduled: float, history: list[str], target: str) -> None:
        nonlocal expanded
        async with sem:
            try:
                async with session.post(f"{target}/recommend", json={"history": history, "top_n": top_n}) as r:
                    await r.read()
                    status = r.status
                    if int(r.headers.get("X-Seater-Expanded", "0")):
                        expanded += 1
            except asyncio.TimeoutError:
                status = "timeout"
            except aiohttp.ClientError as err:
                status = type(err).__name__
        now = loop.time()
        if status == 200:
            latencies.append(now - scheduled)
            done_at.append(now)
        else:
            failures[str(status)] = failures.get(str(status), 0) + 1

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        start = loop.time()
        tasks = []
        total = int(rate * duration)
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, scheduled, histories[i % len(histories)],
                                                 urls[i % len(urls)])))
        await asyncio.gather(*tasks)
        end = loop.time()
    lat = np.array(latencies) * 1000
    ok_in_window = sum(1 for t in done_at if t <= start + duration + 1.0)
    return {
        "offered_rps": rate, "duration_s": duration, "sent": total, "ok": len(latencies),
        "sustained_rps": ok_in_window / duration, "failures": failures,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "max_ms": float(lat.max()) if lat.size else None,
        "expanded_share": expanded / max(1, len(latencies)), "wall_s": end - start,
    }


def load_worker(args: argparse.Namespace) -> None:
    """The second process: drive one rate, print the result as JSON on stdout."""
    histories = json.loads(Path(args.histories).read_text())
    result = asyncio.run(_drive(args.url, args.rate, args.duration, histories, args.top_n, args.timeout,
                                args.max_inflight))
    print(json.dumps(result))


def drive(url: str, rate: float, duration: float, histories_file: Path, top_n: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.bench_serve", "--load-worker", "--url", url, "--rate", str(rate),
           "--duration", str(duration), "--histories", str(histories_file), "--top-n", str(top_n),
           "--timeout", str(timeout)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(f"load generator failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoints(work: Path, items: int, k: int, beam: int, seed: int) -> tuple[Path, Path]:
    """Synthetic SEATER and SASRec checkpoints over the same N items (cached: reused when present)."""
    ids = synthetic.item_ids(items)
    return (synthetic.seater_checkpoint(work / "seater", ids, k, beam, seed, log),
            synthetic.sasrec_checkpoint(work / "sasrec", ids, seed, log))


# ------------------------------------------------------------------------------------------ memory


class ReplicaMemory:
    """Peak RSS and PSS of every Serve replica of an application, sampled in a thread."""

    def __init__(self, app: str, interval: float = 0.5) -> None:
        self.app, self.interval = app, interval
        self.peak: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pids: dict[str, int] = {}
        self.proxies: dict[str, int] = {}

    def find(self) -> dict[str, int]:
        import ray
        from ray.util.state import list_actors

        prefix = f"ServeReplica:{self.app}:"
        address = ray.get_runtime_context().gcs_address  # our Ray, whatever else runs on the machine
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10000)
        self.pids = {a.class_name.removeprefix(prefix) + f"#{a.actor_id[:6]}": a.pid
                     for a in actors if a.class_name.startswith(prefix)}
        self.proxies = {f"HTTP proxy#{a.actor_id[:6]}": a.pid for a in actors if a.class_name == "ProxyActor"}
        return self.pids

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of every replica and HTTP proxy process."""
        import psutil

        out = {}
        for name, pid in {**self.pids, **self.proxies}.items():
            try:
                t = psutil.Process(pid).cpu_times()
                out[name.split("#")[0]] = out.get(name.split("#")[0], 0.0) + t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def sample(self) -> None:
        import psutil

        for name, pid in self.pids.items():
            try:
                info = psutil.Process(pid).memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            entry = self.peak.setdefault(name, {"rss_gib": 0.0, "pss_gib": 0.0})
            entry["rss_gib"] = max(entry["rss_gib"], info.rss / GIB)
            entry["pss_gib"] = max(entry["pss_gib"], getattr(info, "pss", info.rss) / GIB)

    def __enter__(self) -> "ReplicaMemory":
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(self.interval):
                self.sample()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


# ------------------------------------------------------------------------------------------ the benchmark


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_idle(url: str, history: list[str], top_n: int, baseline_ms: float, limit_s: float = 90.0) -> None:
    """Wait until a probe answers within 3x the idle latency (a saturated level's backlog has drained)."""
    import requests

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            r = requests.post(f"{url}/recommend", json={"history": history, "top_n": top_n}, timeout=30)
            if r.status_code == 200 and (time.perf_counter() - t0) * 1000 <= 3 * baseline_ms + 20:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)


def run_config(name: str, app_args: dict[str, Any], url: str, rates: list[float], duration: float,
               histories_file: Path, histories: list[list[str]], top_n: int, timeout: float,
               direct: bool = False) -> dict[str, Any]:
    import requests
    from ray import serve

    from seater_dist.serve.app import build_app

    log(f"{name}: deploying {app_args}")
    t0 = time.perf_counter()
    memory = ReplicaMemory("bench")
    with memory:  # the load of the checkpoint counts for the peak too
        serve.run(build_app(app_args), name="bench", route_prefix="/",
                  logging_config={"log_level": "WARNING", "enable_access_log": False})
        ready_s = time.perf_counter() - t0
        memory.find()
        memory.sample()
        idle = {n: dict(v) for n, v in memory.peak.items()}
        log(f"{name}: ready in {ready_s:.0f} s; replicas {sorted(memory.pids)}")
        if direct:
            from seater_dist.serve.runner import direct_ingress_urls

            url = ",".join(direct_ingress_urls("bench"))
            if not url:
                raise RuntimeError("direct ingress: no Router replica listens on its own port")
            log(f"{name}: driving the Router replicas directly at {url}")
        first_url = url.split(",")[0]
        for h in histories[:20]:  # warm-up
            requests.post(f"{first_url}/recommend", json={"history": h, "top_n": top_n}, timeout=120)
        probe = []
        for h in histories[20:40]:
            t1 = time.perf_counter()
            requests.post(f"{first_url}/recommend", json={"history": h, "top_n": top_n}, timeout=120)
            probe.append((time.perf_counter() - t1) * 1000)
        single_ms = float(np.median(probe))
        log(f"{name}: one request at a time: median {single_ms:.1f} ms")
        levels = []
        for rate in rates:
            load0 = os.getloadavg()[0]
            cpu0 = memory.cpu_seconds()
            result = drive(url, rate, duration, histories_file, top_n, timeout)
            cpu1 = memory.cpu_seconds()
            result["load_average_1min"] = [load0, os.getloadavg()[0]]
            served = max(1, result["ok"])
            result["cpu_ms_per_request"] = {n: 1000 * (cpu1[n] - cpu0.get(n, 0.0)) / served for n in cpu1}
            levels.append(result)
            cpu = result["cpu_ms_per_request"]
            log(f"{name} @ {rate:g} rps: sustained {result['sustained_rps']:.1f} rps, p50 {_ms(result['p50_ms'])}, "
                f"p99 {_ms(result['p99_ms'])}, failed {sum(result['failures'].values())} "
                f"{result['failures'] or ''}; load average {load0:.1f}; CPU ms/request "
                + ", ".join(f"{n} {v:.1f}" for n, v in sorted(cpu.items())) + f" (total {sum(cpu.values()):.1f})")
            if result["sustained_rps"] < 0.5 * rate or sum(result["failures"].values()) > 0.5 * result["sent"]:
                log(f"{name}: saturated at {rate:g} rps; higher rates skipped")
                wait_idle(first_url, histories[0], top_n, single_ms)
                break
            wait_idle(first_url, histories[0], top_n, single_ms)
    info = requests.get(f"{first_url}/version", timeout=60).json()
    answers = [requests.post(f"{first_url}/recommend", json={"history": h, "top_n": top_n}, timeout=120).json()["items"]
               for h in histories[:20]]  # to compare retrievers (HNSW recall against exact)
    serve.delete("bench")
    return {"name": name, "args": app_args, "ready_s": ready_s, "single_request_ms": single_ms, "levels": levels,
            "memory_idle_gib": idle, "memory_peak_gib": memory.peak, "version": info, "answers": answers}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} ms"


def hnsw_recall(exact: list[list[str]], approximate: list[list[str]]) -> float:
    """Mean share of the exact answer's items that the approximate answer also returns."""
    hits = [len(set(a) & set(b)) / max(1, len(a)) for a, b in zip(exact, approximate)]
    return float(np.mean(hits)) if hits else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=6_100_000, help="catalogue size N (default 6.1M)")
    ap.add_argument("--k", type=int, default=16, help="branching factor (default 16: D = 6 at 6.1M)")
    ap.add_argument("--beam", type=int, default=50, help="beam size b (default 50)")
    ap.add_argument("--top-n", type=int, default=50, help="items per request (default 50)")
    ap.add_argument("--rates", type=float, nargs="+", default=[10, 25, 50], help="offered requests per second")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per rate (default 20)")
    ap.add_argument("--timeout", type=float, default=10.0, help="a request unanswered after this many seconds fails")
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="SEATER shard counts (default 1 2)")
    ap.add_argument("--layouts", choices=["split", "single"], nargs="+", default=["split", "single"],
                    help="SEATER service layouts (ServeArgs.layout; default both): split = router, encoder and "
                         "shard deployments; single = one deployment holding them all")
    ap.add_argument("--min-replicas", type=int, default=1,
                    help="SEATER: replicas every deployment starts with (ServeArgs.min_replicas; default 1)")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="Serve's direct ingress: the load goes to the Router replicas' own HTTP ports (round robin "
                         "over them), skipping the HTTP proxy (`seater serve --direct-ingress`)")
    ap.add_argument("--sasrec", choices=["flat", "hnsw"], nargs="*", default=["flat", "hnsw"],
                    help="SASRec indexes to serve (default both; none: --sasrec with no value)")
    ap.add_argument("--ef-search", type=int, default=128, help="SASRec HNSW efSearch (default 128)")
    ap.add_argument("--hnsw-m", type=int, default=16, help="SASRec HNSW links per node (default 16)")
    ap.add_argument("--ef-construction", type=int, default=40, help="SASRec HNSW efConstruction (default 40)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SEATER_BENCH_DATA", "/tmp/seater-bench")),
                    help="where the synthetic checkpoints and HNSW indexes are kept (default /tmp/seater-bench)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, tree and histories")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/bench_serve.json; "
                    "bench_serve_<N>.json for other sizes)")
    ap.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--histories", help=argparse.SUPPRESS)
    ap.add_argument("--max-inflight", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_worker:
        return load_worker(args)

    out = args.out or RESULTS / ("bench_serve.json" if args.items == 6_100_000 else f"bench_serve_{args.items}.json")
    work = synthetic.checkpoint_dir(args.work, args.items, args.k, args.beam, args.seed)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    seater_path, sasrec_path = checkpoints(work, args.items, args.k, args.beam, args.seed)

    rng = np.random.default_rng(args.seed + 1)
    histories = [[f"item-{j}" for j in rng.integers(0, args.items, rng.integers(1, 21))] for _ in range(2000)]
    histories_file = work / "histories.json"
    histories_file.write_text(json.dumps(histories))

    from ray import serve

    from seater_dist.runtime.ray_env import init_ray
    from seater_dist.serve.replicas import serve_env

    for name, value in serve_env(args.direct_ingress).items():  # as `seater serve` does: the HTTP proxy too
        os.environ.setdefault(name, value)
    init_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    url = f"http://127.0.0.1:{port}"
    configs = [(f"SEATER S={s}" + ("" if layout == "split" else " single")
                + ("" if args.min_replicas == 1 else f" x{args.min_replicas}")
                + (" direct" if args.direct_ingress else ""),
                {"checkpoint": str(seater_path), "shards": s, "layout": layout, "min_replicas": args.min_replicas,
                 "max_replicas": max(2, args.min_replicas)})
               for layout in args.layouts for s in args.shards]
    configs += [(f"SASRec {ix}" + (" direct" if args.direct_ingress else ""),
                 {"checkpoint": str(sasrec_path), "shards": 1, "index": ix, "ef_search": args.ef_search,
                  "hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction,
                  "index_cache": str(work / "faiss")}) for ix in args.sasrec]
    results = [run_config(name, app_args, url, args.rates, args.duration, histories_file, histories, args.top_n,
                          args.timeout, args.direct_ingress) for name, app_args in configs]
    by_name = {res["name"]: res for res in results}
    recall = None
    suffix = " direct" if args.direct_ingress else ""
    if f"SASRec flat{suffix}" in by_name and f"SASRec hnsw{suffix}" in by_name:
        recall = hnsw_recall(by_name[f"SASRec flat{suffix}"]["answers"], by_name[f"SASRec hnsw{suffix}"]["answers"])
        log(f"HNSW recall@{args.top_n} against exact search (20 users): {recall:.3f}")
    import torch

    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("load_worker", "url", "rate", "histories", "max_inflight")},
        "results": results, "hnsw_recall_at_top_n": recall, "seconds": time.perf_counter() - t_start,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_end": os.getloadavg(), "replica_threads": 1},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    log(f"wrote {out}")
    serve.shutdown()


def print_table(r: dict[str, Any]) -> None:
    cfg = r["config"]
    print()
    print(f"N = {cfg['items']:,} items, k = {cfg['k']}, b = {cfg['beam']}, top_n = {cfg['top_n']}, 2 CPUs, "
          f"{cfg['duration']:g} s per rate, open loop, timeout {cfg['timeout']:g} s")
    print(f"{'service':<16}{'offered':>8}{'sustained':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}"
          f"{'CPU ms/req':>11}{'load avg':>9}")
    for res in r["results"]:
        for lv in res["levels"]:
            p50 = "-" if lv["p50_ms"] is None else f"{lv['p50_ms']:.1f}"
            p99 = "-" if lv["p99_ms"] is None else f"{lv['p99_ms']:.1f}"
            print(f"{res['name']:<16}{lv['offered_rps']:>8g}{lv['sustained_rps']:>10.1f}{p50:>9}{p99:>9}"
                  f"{sum(lv['failures'].values()):>8}{sum(lv['cpu_ms_per_request'].values()):>11.1f}"
                  f"{lv['load_average_1min'][0]:>9.1f}")
    print("(CPU ms/req: CPU time of the HTTP proxy and every replica per answered request; it inflates far less "
          "than latency when other jobs share the cores)")
    print("\npeak memory per replica (PSS GiB; RSS in brackets), and time to deploy:")
    for res in r["results"]:
        mem = ", ".join(f"{n.split('#')[0]} {v['pss_gib']:.2f} ({v['rss_gib']:.2f})"
                        for n, v in sorted(res["memory_peak_gib"].items()))
        print(f"  {res['name']:<14} ready in {res['ready_s']:.0f} s: {mem}")
    if r.get("hnsw_recall_at_top_n") is not None:
        print(f"HNSW recall@{cfg['top_n']} against exact: {r['hnsw_recall_at_top_n']:.3f} "
              f"(M {cfg['hnsw_m']}, efConstruction {cfg['ef_construction']}, efSearch {cfg['ef_search']})")
    seater = [lv for res in r["results"] if res["name"].startswith("SEATER") for lv in res["levels"]
              if lv["offered_rps"] == 50]
    if seater:
        met = [lv["p99_ms"] is not None and lv["p99_ms"] <= 50 and lv["sustained_rps"] >= 47.5
               and not lv["failures"] for lv in seater]
        print(f"goal: SEATER p99 <= 50 ms at a sustained 50 rps: {'met' if any(met) else 'NOT met'} "
              f"(p99 {', '.join(_ms(lv['p99_ms']) for lv in seater)})")


if __name__ == "__main__":
    main()
