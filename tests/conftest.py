"""Shared fixtures: one local Ray per test session (started on first use), real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

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

    from seater_dist.ray_env import init_ray

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
