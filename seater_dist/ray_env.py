"""One place that starts or joins Ray, with the settings this project needs on small machines."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

# Keep a local Ray on loopback and quiet (MACHINE_NOTES: otherwise it listens on eth0).
_LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0"),
}


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local Ray on 127.0.0.1.

    Ray's own INFO logs (every Ray Data plan, every Train report) are hidden unless SEATER_VERBOSE=1;
    our stages print their own progress. Does nothing if Ray is already initialised in this process
    (tests share one session).
    """
    for key, value in _LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("SEATER_VERBOSE"):
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("SEATER_VERBOSE"):
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="WARNING"))
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback cluster needs no token
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=True, **kwargs)
