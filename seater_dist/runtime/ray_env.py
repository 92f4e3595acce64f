"""One place that starts or joins Ray, with the settings this project needs on small machines."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from seater_dist.runtime.quiet import filter_stderr, quiet_process, quiet_worker, verbose

LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})

# Quiet on every Ray this process starts or joins.
_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0"),
}

# Runs in every worker of the job (Train controller and workers, Ray Data actors, tasks): setup_worker.
_SETUP_HOOK = "seater_dist.runtime.ray_env.setup_worker"


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local Ray on 127.0.0.1.

    Ray's own INFO logs (every Ray Data plan, every Train report) and known-harmless third-party chatter
    (seater_dist.runtime.quiet) are hidden unless SEATER_VERBOSE=1; our stages print their own progress. Does
    nothing if Ray is already initialised in this process (tests share one session).
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        _make_private()  # before `import ray` below, and refreshes Ray's caches if it was imported earlier
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    quiet = not verbose()
    if quiet:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    import ray

    if quiet:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        # Our evaluation actors each hold a whole model by design (EvalSettings sizes how many): Ray Data's
        # high-memory detector would print a multi-line "consider setting memory=" notice every 30 s.
        detectors = ray.data.DataContext.get_current().issue_detectors_config
        detectors.detectors = [d for d in detectors.detectors if d.__name__ != "HighMemoryIssueDetector"]
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="WARNING"))
        quiet_process()
        if not address:
            # Ray Train's preemption watcher (an actor per fit, polling for node drains) has nothing to watch on
            # a private one-node cluster, and its creation logs core_worker.cc's "constructor arguments in the
            # object store" error (it is passed the worker actors' handles). Clusters keep it.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs["runtime_env"] = _with_setup_hook(kwargs.get("runtime_env"))
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=True, **kwargs)
        _check_private()
    if quiet:
        filter_stderr()


def _make_private() -> None:
    """Settings for the private Ray a command starts: every Ray process on loopback, and Ray's token
    authentication with a fresh random token (kept in this process's environment, which Ray's processes
    inherit and other users cannot read; an explicit RAY_AUTH_TOKEN is kept), so that no other machine can
    reach it and no other local user can join it.

    Ray reads the first at import (``ray_constants.ENABLE_RAY_CLUSTER``: when true, a node takes the machine's
    address whatever ``_node_ip_address`` says, and its servers listen on every interface) and the second
    into a cached config. When ``ray`` was imported before this ran (``import ray.serve`` at the top of a
    module, a notebook), both caches are refreshed.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    if "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False
    if "ray._raylet" in sys.modules:
        sys.modules["ray._raylet"].Config.initialize("")


def _check_private() -> None:
    """Refuse to go on with a private Ray that took a network address (a Ray upgrade that moved the setting
    _make_private relies on): shut it down and say so."""
    import ray

    node_address = ray.util.get_node_ip_address()
    if node_address not in LOOPBACK_ADDRESSES:
        ray.shutdown()
        raise RuntimeError(f"the local Ray started on {node_address}, not on loopback: stopped it "
                           "(seater_dist/runtime/ray_env.py keeps a private Ray on 127.0.0.1; this Ray version moved a "
                           "setting it relies on)")


def keep_serve_replica_on_loopback() -> None:
    """Call in a Serve replica's constructor: on a node whose Ray address is loopback (a command's private
    Ray), the replica's inter-deployment gRPC server, which Serve 2.60 opens on every interface ("[::]:0" in
    ``ray/serve/_private/replica.py``) after the constructor returns, listens on 127.0.0.1 instead. On a
    cluster node it is left as Serve makes it (other nodes may dial it)."""
    import ray
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback_only", False) or ray.util.get_node_ip_address() not in LOOPBACK_ADDRESSES:
        return

    def bind_on_loopback(server: Any, address: str) -> int:
        host, _, port = address.rpartition(":")
        return bind(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    bind_on_loopback.loopback_only = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind_on_loopback


def setup_worker() -> None:
    """The runtime_env ``worker_process_setup_hook``, in every Ray worker of the job: :func:`address_own_cluster`,
    and seater_dist.runtime.quiet's filters (the faiss loader, Ray's exclude_resources deprecation, the progress-bar
    notice) unless SEATER_VERBOSE is set."""
    address_own_cluster()
    if not verbose():
        quiet_worker()


def address_own_cluster() -> None:
    """In a Ray worker: ``RAY_ADDRESS`` = this worker's own cluster (its GCS), unless already set.

    Ray Train's ``PlacementGroupCleaner`` (a detached actor per fit, ray/train/v2/_internal/execution/controller/
    placement_group_cleaner.py) asks the state API whether the controller lives with no address, which finds
    "the" cluster by its GCS processes and /tmp/ray/ray_current_cluster: with another Ray on the machine its
    thread died of "Found multiple active Ray instances" (a 25-line traceback on the driver's console), and
    with another cluster's ray_current_cluster it could ask that cluster and remove our run's placement group.
    """
    import ray

    if not os.environ.get("RAY_ADDRESS") and ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def _with_setup_hook(runtime_env: Any) -> Any:
    """``runtime_env`` plus our worker setup hook, unless it or the submitted job's runtime_env already has
    one (Ray refuses two)."""
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    for env in (runtime_env or {}, job_env):
        env_vars = env.get("env_vars") or {}
        if "worker_process_setup_hook" in env or "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR" in env_vars:
            return runtime_env
    return {**(runtime_env or {}), "worker_process_setup_hook": _SETUP_HOOK}
