"""One place that starts or joins Ray, with the settings this project needs on small machines."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from seater_dist.quiet import filter_stderr, quiet_process, verbose

# Keep a local Ray on loopback and quiet (MACHINE_NOTES: otherwise it listens on eth0).
_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0"),
}

# Runs seater_dist.quiet.quiet_process in every worker of the job (Train controller and workers, Ray Data
# actors, tasks): the faiss loader, Ray's exclude_resources deprecation and the progress-bar notice.
_SETUP_HOOK = "seater_dist.quiet.quiet_worker"


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local Ray on 127.0.0.1.

    Ray's own INFO logs (every Ray Data plan, every Train report) and known-harmless third-party chatter
    (seater_dist.quiet) are hidden unless SEATER_VERBOSE=1; our stages print their own progress. Does
    nothing if Ray is already initialised in this process (tests share one session).
    """
    for key, value in _LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    quiet = not verbose()
    if quiet:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
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
        kwargs["runtime_env"] = _with_setup_hook(kwargs.get("runtime_env"))
        if not address:
            # Ray Train's preemption watcher (an actor per fit, polling for node drains) has nothing to watch on
            # a private one-node cluster, and its creation logs core_worker.cc's "constructor arguments in the
            # object store" error (it is passed the worker actors' handles). Clusters keep it.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback cluster needs no token
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=True, **kwargs)
    if quiet:
        filter_stderr()


def _with_setup_hook(runtime_env: Any) -> Any:
    """``runtime_env`` plus our worker setup hook, unless it or the submitted job's runtime_env already has
    one (Ray refuses two)."""
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    for env in (runtime_env or {}, job_env):
        env_vars = env.get("env_vars") or {}
        if "worker_process_setup_hook" in env or "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR" in env_vars:
            return runtime_env
    return {**(runtime_env or {}), "worker_process_setup_hook": _SETUP_HOOK}
