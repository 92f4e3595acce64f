"""`ray job submit` end to end: the README's command runs jobs/train_microvideo.py on a Ray head of its own,
and a re-submission with --resume keeps every finished stage.

The head is started with `ray start --head --block` in a process group of its own, with every port picked
free at run time (outside Ray's defaults and the kernel's ephemeral range) and its own --temp-dir, so it runs
beside any other Ray on the machine (the session's Ray of tests/conftest.py, another user's training)
without touching it: `ray stop` is never called (it would stop every Ray on the machine), this process
never calls ray.init, and /tmp/ray/ray_current_cluster is left as it was. At the end the head's process
group and every process it started (Ray's workers run in groups of their own) are killed by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` the job runs with
JOB = "python jobs/train_microvideo.py --preset tiny"  # as in README "From laptop to cluster"
SUBMIT_TIMEOUT_S = 600  # per submission
# Ray's default worker ports are 10002-19999 and the kernel's ephemeral range starts at 32768: pick between.
PORT_LOW, PORT_HIGH = 20000, 32000
WORKER_PORTS = 200


@dataclass
class Head:
    """A running `ray start --head --block` of this test: its process, dashboard URL, temp dir and env."""

    proc: subprocess.Popen
    dashboard: str
    temp_dir: Path
    env: dict[str, str]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))  # every interface: some Ray servers listen on 0.0.0.0
        except OSError:
            return False
    return True


def _free_ports(count: int, run: int) -> tuple[list[int], int]:
    """``count`` free ports and the first of ``run`` consecutive free ones, all distinct."""
    rng = random.Random()
    while True:
        first = rng.randrange(PORT_LOW, PORT_HIGH - run)
        if all(_bindable(p) for p in range(first, first + run)):
            break
    singles: list[int] = []
    while len(singles) < count:
        port = rng.randrange(PORT_LOW, PORT_HIGH)
        if port not in singles and not first <= port < first + run and _bindable(port):
            singles.append(port)
    return singles, first


def _ray_env() -> dict[str, str]:
    """This environment without any RAY_* setting of the session's Ray, plus the head's own settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is the venv's
        "RAY_AUTH_MODE": "token",  # the head, `ray job submit` and the job's driver share a fresh token
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    })
    return env


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop(head: Head) -> None:
    """Kill the head's process group and every process it started, by pid (never `ray stop`)."""
    procs = [p for p in [_pid_process(head.proc.pid), *_descendants(head.proc.pid)] if p is not None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.proc.pid, sig)  # `ray start` and its daemons (started with start_new_session)
        except ProcessLookupError:
            pass
        for p in procs:  # workers, job drivers: children of the raylet, in process groups of their own
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(procs, timeout=5)
        if not procs:
            break
    head.proc.wait(timeout=15)


def _pid_process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _leftovers(temp_dir: Path) -> list[psutil.Process]:
    """Processes still naming this head's temp dir on their command line (gcs_server, raylet, agents)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in arg for arg in p.info["cmdline"] or []):
            found.append(p)
    return found


def _wait_for_dashboard(head: Head, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if head.proc.poll() is not None:
            log = (head.temp_dir / "ray-start.log").read_text()[-4000:]
            raise RuntimeError(f"ray start exited with {head.proc.returncode}: {log}")
        try:
            request = urllib.request.Request(f"{head.dashboard}/api/version",
                                             headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
            with urllib.request.urlopen(request, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the dashboard at {head.dashboard} did not answer in {timeout_s} s")


@pytest.fixture
def ray_head() -> Iterator[Head]:
    """A Ray head of this test alone: own ports, own temp dir (short: Ray's socket paths must stay under 107
    characters), 2 CPUs, the dashboard on (job submission needs it)."""
    (gcs, dash, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager, client), workers = \
        _free_ports(9, WORKER_PORTS)
    temp_dir = Path(tempfile.mkdtemp(prefix="sdray-", dir="/tmp"))
    env = _ray_env()
    # State API calls inside the job (Ray Train's placement-group cleaner) go to this head's dashboard instead of
    # looking for the cluster by its GCS processes, which fails with "multiple active Ray instances" beside
    # another Ray on this machine.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           "--object-store-memory=300000000", f"--temp-dir={temp_dir}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
           f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
           f"--ray-client-server-port={client}", f"--min-worker-port={workers}",
           f"--max-worker-port={workers + WORKER_PORTS - 1}", "--disable-usage-stats"]
    with open(temp_dir / "ray-start.log", "wb") as log:  # a file, not a pipe: --block keeps writing to it
        proc = subprocess.Popen(cmd, cwd=temp_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = Head(proc, f"http://127.0.0.1:{dash}", temp_dir, env)
    try:
        _wait_for_dashboard(head)
        yield head
    finally:
        _stop(head)
        for p in _leftovers(temp_dir):  # nothing of ours may outlive the test
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: Head, submission_id: str, args: str) -> subprocess.CompletedProcess:
    """The README's `ray job submit`, waited for (bounded); its output is the job's log."""
    cmd = (f"{BIN / 'ray'} job submit --address {head.dashboard} --submission-id {submission_id} "
           f"--working-dir . -- {JOB} {args}")
    return subprocess.run(cmd, shell=True, cwd=ROOT, env=head.env, capture_output=True, text=True,
                          timeout=SUBMIT_TIMEOUT_S)


def _succeeded(head: Head, submission_id: str) -> bool:
    """Whether `ray job status` reports the job as succeeded."""
    out = subprocess.run([str(BIN / "ray"), "job", "status", "--address", head.dashboard, submission_id],
                         env=head.env, capture_output=True, text=True, timeout=60).stdout
    return f"Job '{submission_id}' succeeded" in out


def _check_report(out: Path) -> dict:
    """report.json as run_pipeline writes it: both models' test metrics, in range and consistent."""
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().strip() and (out / "training.png").stat().st_size > 0
    assert report["test_users"] > 0 and report["counts"]["items"] > 0
    assert report["settings"]["train"]["epochs"] == 1 and report["settings"]["tree"]["k"] == 4
    for model in ("seater", "sasrec"):
        metrics = report[model]
        for k in (20, 50):
            assert 0 <= metrics[f"recall@{k}"] <= metrics[f"hr@{k}"] <= 1, (model, metrics)
            assert 0 <= metrics[f"ndcg@{k}"] <= 1, (model, metrics)
        assert metrics["recall@20"] <= metrics["recall@50"] and metrics["hr@50"] > 0, (model, metrics)
    return report


def _submit_and_succeed(head, name: str, args: str, record_property, timing: str):
    """Submit the job, record how long it took as ``timing``, and assert it SUCCEEDED (else show its log)."""
    t0 = time.time()
    done = _submit(head, name, args)
    record_property(timing, round(time.time() - t0, 1))
    print(f"{name}: {time.time() - t0:.1f} s")
    assert done.returncode == 0 and _succeeded(head, name), (done.stdout + done.stderr)[-6000:]
    return done


@pytest.mark.cluster
def test_ray_job_submit_runs_the_pipeline_and_a_resubmission_keeps_the_finished_stages(ray_head, tmp_path,
                                                                                          record_property):
    address_file = Path("/tmp/ray/ray_current_cluster")
    before = address_file.read_text() if address_file.exists() else None
    out = tmp_path / "job"

    first = _submit_and_succeed(ray_head, "seater-tiny-1", f"--out {out}", record_property, "first_submit_s")
    report = _check_report(out)
    assert "(--resume)" not in first.stdout
    best = out / "seater" / "best" / "manifest.json"
    best_bytes = best.read_bytes()

    # The upload left .venv, runs/ and .git behind (.gitignore, .rayignore): it stays far below Ray's 100 MiB.
    packages = [p for p in ray_head.temp_dir.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
    assert packages and all((p / "jobs" / "train_microvideo.py").is_file() for p in packages)
    for p in packages:
        assert not {".venv", ".git", "runs"} & {c.name for c in p.iterdir()}
        assert sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) < 20 * 2**20

    second = _submit_and_succeed(ray_head, "seater-tiny-2", f"--out {out} --resume", record_property,
                                 "resume_submit_s")
    for line in (f"synth: kept {out / 'synth'}", "kept the finished dataset", f"kept the finished run in {out / 'sasrec'}",
                 "kept the finished tree", f"kept the finished run in {out / 'seater'}"):
        assert line in second.stdout, second.stdout[-6000:]
    assert best.read_bytes() == best_bytes  # not trained again
    again = _check_report(out)
    for model in ("seater", "sasrec"):
        assert again[model] == pytest.approx(report[model], abs=1e-6)

    assert (address_file.read_text() if address_file.exists() else None) == before


def test_readme_shows_the_submitted_command():
    """README "From laptop to cluster" shows the command this module submits."""
    assert f"--working-dir . -- {JOB} --out" in (ROOT / "README.md").read_text()
