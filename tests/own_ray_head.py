"""A Ray head of a test's own (the ``ray_head`` fixture, shared through conftest.py): started with `ray start
--head --block` in a process group of its own, every port picked free at run time (outside Ray's defaults and
the kernel's ephemeral range), its own --temp-dir and a fresh token, so that it runs beside any other Ray on the
machine (the session's Ray, another user's training) without touching it. `ray stop` is never called (it
would stop every Ray on the machine), and /tmp/ray/ray_current_cluster is left as it was; at the end the
head's process group and every process it started are killed by pid.
"""

from __future__ import annotations

import contextlib
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

BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` a job runs with
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
