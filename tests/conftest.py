"""Shared fixtures (one local Ray per test session, started on first use; real data paths; a Ray head of a
test's own) and the test tiers.

Tiers follow from what a test uses, so they cannot drift from what it does:

* ``ray``: the test uses Ray (a fixture that starts or joins it, or ``@pytest.mark.ray`` on a test whose
  child process starts its own). ``-m "not ray"`` runs without Ray.
* ``slow``: the test uses a fixture that trains with Ray Train, serves with Ray Serve or starts another Ray
  head (:data:`SLOW_FIXTURES`), starts a Ray of its own, or is marked ``slow`` itself (a Train fit, a whole
  ``seater run``, a multi-process exactness check). ``make test-fast`` runs ``-m "not slow"``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from own_ray_head import ray_head  # noqa: F401 - a fixture: a Ray head of a test's own

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


RAY_FIXTURES = {"ray_session", "s3", "ray_head"}
# Fixtures that fit with Ray Train, run a Serve service or start another Ray head (tens of seconds each).
SLOW_FIXTURES = {"ray_head", "tiny_run", "training", "service"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        own_ray = item.get_closest_marker("ray") is not None
        if used & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
        if used & SLOW_FIXTURES or own_ray:
            item.add_marker(pytest.mark.slow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 API the object-storage tests talk to (the `s3` fixture starts it on this port): set before any Ray
# starts, so that every Ray worker of the session inherits it, as on a cluster whose nodes share a config.
S3_PORT = _free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "seater-test",
                   "AWS_SECRET_ACCESS_KEY": "seater-test", "AWS_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"})

def _shared_data() -> Path:
    """The project's shared data: $SEATER_DATA, else ../shared/data beside the clone, else /work/shared/data."""
    candidates = [os.environ.get("SEATER_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data",
                  "/work/shared/data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return Path("/work/shared/data")


SHARED_DATA = _shared_data()
BEAUTY = Path(os.environ.get("SEATER_BEAUTY", SHARED_DATA / "beauty" / "Beauty.txt"))
ML100K = Path(os.environ.get("SEATER_ML100K", SHARED_DATA / "ml-100k" / "ml-100k.inter"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: one torch thread avoids oversubscribing a 2-core machine (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """A local 2-CPU Ray, started once for the whole session and shut down at its end."""
    import ray

    from seater_dist.runtime.ray_env import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def beauty_path() -> Path:
    if not BEAUTY.exists():
        pytest.fail(f"Beauty data not found at {BEAUTY} (set SEATER_BEAUTY)")
    return BEAUTY


@pytest.fixture(scope="session")
def ml100k_path() -> Path:
    if not ML100K.exists():
        pytest.fail(f"ml-100k data not found at {ML100K} (set SEATER_ML100K)")
    return ML100K


@pytest.fixture(scope="session")
def s3():
    """A real S3 API on 127.0.0.1 (moto's standalone server) with an empty bucket -> "s3://seater-test"."""
    import boto3

    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", S3_PORT), 0.5).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"the S3 test server did not start on port {S3_PORT}")
                time.sleep(0.1)
        boto3.client("s3").create_bucket(Bucket="seater-test")
        yield "s3://seater-test"
    finally:
        server.terminate()
        server.wait(10)
