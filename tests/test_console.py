"""The console shows our own lines and real errors, not known-harmless Ray / faiss chatter (seater_dist.runtime.quiet).

The check runs in a subprocess of its own: Ray writes some of that chatter from C++ straight to file
descriptor 2 and from worker processes, which pytest's capture of this process would not see as a user
does. The subprocess starts its own local Ray with its own temp dir (its session files, sockets and
``session_latest`` link stay out of /tmp/ray); every port it needs is picked free (GCS port 0, dashboard from
8265 upwards), so it runs beside the session's Ray of tests/conftest.py. It shuts its Ray down before
exiting. Meanwhile no Ray Train run of the session is in flight (pytest runs one test at a time), which
matters: Ray Train's placement-group cleaner finds its cluster by scanning for GCS processes and fails
with "multiple active Ray instances" while a second one exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

# A Ray Data actor pool whose actors log INFO to the console and import faiss (the loader's AVX512/AVX2
# probing), trigger Ray Train's exclude_resources deprecation the way its controller does, and are created
# by the driver with ObjectRef constructor arguments (core_worker.cc's "constructor arguments in the object
# store" error), and wrap read-only numpy arrays in tensors as iter_torch_batches does (torch's "not
# writable" warning). Then one batch raises: that real error must reach the console.
SCRIPT = textwrap.dedent(
    """
    import logging
    import sys

    import numpy as np

    from seater_dist.runtime.ray_env import init_ray


    class Scorer:
        def __init__(self):
            logging.basicConfig(level=logging.INFO, force=True)  # root INFO to the console, as in Train workers
            import faiss
            from ray.train import DataConfig

            DataConfig.default_ingest_options()
            self.index = faiss.IndexFlatIP(2)
            self.index.add(np.eye(2, dtype=np.float32))

        def __call__(self, batch):
            import torch

            torch.as_tensor(np.frombuffer(b"abcd", dtype=np.uint8))  # read-only, as Ray Data's torch batches
            if (batch["id"] == 33).any():
                raise ValueError("seater-test: a real error in a worker")
            _, ids = self.index.search(np.ones((len(batch["id"]), 2), dtype=np.float32), 1)
            return {"id": ids[:, 0]}


    init_ray(num_cpus=2, _temp_dir=sys.argv[1])
    import ray
    from ray.data import ActorPoolStrategy

    try:
        print("seater-test: start", flush=True)
        ds = ray.data.range(40, override_num_blocks=4).map_batches(
            Scorer, batch_size=10, compute=ActorPoolStrategy(min_size=1, max_size=2), num_cpus=0.5)
        for row in ds.iter_rows():
            pass
    finally:
        ray.shutdown()
    """
)

HARMLESS = ("core_worker.cc", "Could not load library", "Loading faiss", "DeprecationWarning",
            "Progress bars disabled", "is not writable")
REAL_ERROR = "ValueError: seater-test: a real error in a worker"


def _run(extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SEATER_VERBOSE")}
    env.update(extra_env)
    temp_dir = tempfile.mkdtemp(prefix="rayq", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        return subprocess.run([sys.executable, "-c", SCRIPT, temp_dir], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=180)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray  # its own Ray, in a child process
def test_console_hides_known_chatter_but_not_real_errors():
    proc = _run({})
    out = proc.stdout
    assert "seater-test: start" in out, out
    found = [text for text in HARMLESS if text in out]
    assert not found, f"known-harmless chatter on the console: {found}\n{out}"
    assert proc.returncode != 0, out
    assert REAL_ERROR in out, out


@pytest.mark.ray  # its own Ray, in a child process
def test_seater_verbose_shows_everything():
    proc = _run({"SEATER_VERBOSE": "1"})
    out = proc.stdout
    for text in ("core_worker.cc", "Loading faiss", "DeprecationWarning", "is not writable", REAL_ERROR):
        assert text in out, f"{text!r} missing with SEATER_VERBOSE=1\n{out}"


def test_the_stderr_filter_drops_the_known_lines_only():
    import re

    from seater_dist.runtime.quiet import DROPPED_LINES

    dropped = re.compile(DROPPED_LINES)
    raylet = ("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: 9c3a84bb8e with "
              "address: 127.0.0.1, which is 4x the maximum expected startup concurrency (2).")
    actor = ("core_worker.cc:512: Actor with class name: 'PreemptionWatcher' and ID: 'ab12' has constructor arguments "
             "in the object store and max_restarts > 0")
    assert dropped.search(raylet) and dropped.search(actor)
    for kept in ("\x1b[33m(raylet)\x1b[0m WARNING: the node is running low on memory", REAL_ERROR,
                 "core_worker.cc:512: Actor with class name: 'Scorer' and ID: 'ab12' has constructor arguments "
                 "in the object store and max_restarts > 0"):
        assert not dropped.search(kept), kept
