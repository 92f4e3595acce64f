"""``seater serve``: deploy the retrieval application on a local Ray (or a cluster) and block until Ctrl-C.

    run_service(ServeArgs(checkpoint="runs/demo/seater/best", shards=2), host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from typing import Any, Callable

from seater_dist.config import ServeArgs
from seater_dist.runtime.quiet import verbose
from seater_dist.runtime.ray_env import LOOPBACK_ADDRESSES, init_ray
from seater_dist.serve.app import build_app, deployment_names
from seater_dist.serve.replicas import serve_env

APP_NAME = "seater"
LOOPBACK_HOSTS = LOOPBACK_ADDRESSES | {"localhost"}


def exposure_warning(host: str, port: int, address: str | None) -> str:
    """The one line ``seater serve --host`` prints when it binds beyond loopback: what is now exposed."""
    ray_side = ("Ray itself stays on 127.0.0.1 with token authentication" if not address else
                "the cluster's own ports are as secure as you made them (docs/architecture.md, Security)")
    return (f"warning: HTTP on {host}:{port} answers anyone who can reach this machine: /recommend, /healthz and "
            f"/version, without authentication; {ray_side}")


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (a local check; a cluster's proxy nodes may differ)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", port))
        except OSError:
            return True
    return False


def serve_logging() -> dict[str, Any]:
    """Serve's own logs: warnings only and no access log, unless SEATER_VERBOSE is set."""
    if verbose():
        return {"log_level": "INFO", "enable_access_log": True}
    return {"log_level": "WARNING", "enable_access_log": False}


def get_json(url: str, timeout: float = 10.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - our own service
        return json.loads(r.read())


def direct_ingress_urls(app: str = APP_NAME) -> list[str]:
    """The HTTP addresses the Router replicas of ``app`` listen on themselves under Serve's direct ingress
    (ports from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT up). Local replicas only: it reads their sockets."""
    import psutil
    import ray
    from ray.util.state import list_actors

    low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    high = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "31000"))
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("state", "=", "ALIVE")], limit=10000)
    urls = []
    for actor in sorted(actors, key=lambda a: a.actor_id):
        if actor.class_name == f"ServeReplica:{app}:Router":
            urls += [f"http://{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process(actor.pid).net_connections()
                     if c.status == "LISTEN" and low <= c.laddr.port < high]
    return urls


def run_service(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                block: bool = True, out: Callable[[str], None] = print,
                direct_ingress: bool = False) -> dict[str, Any]:
    """Deploy ``build_app(args)`` as the application ``seater`` with HTTP on host:port; print the URL and a
    curl example; block until Ctrl-C (or SIGTERM) when ``block``. On a local Ray, Ctrl-C shuts Serve down; on a cluster
    (``address``) the application keeps running (``serve shutdown -a http://HEAD:8265`` removes it).

    ``direct_ingress`` (a local Ray only): every Router replica also answers HTTP on its own port, port + 1 and
    up, skipping the HTTP proxy's hop (serve_env); host:port stays the proxy, balancing over the replicas."""
    from ray import serve

    from seater_dist.model.checkpoint import read_checkpoint_manifest

    manifest = read_checkpoint_manifest(args.checkpoint)  # a bad path or URI fails before Ray starts
    address = address or os.environ.get("RAY_ADDRESS")
    if direct_ingress and address:
        raise ValueError("--direct-ingress configures the local Ray this command starts; on a cluster, start it "
                         "with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in its environment instead "
                         "(docs/architecture.md#serving)")
    if not address and port_in_use(host, port):
        raise ValueError(f"port {port} on {host} is in use; choose another with --port")
    t0 = time.time()
    if not address:  # a private Ray: its HTTP proxy takes the same throughput settings as the replicas
        for name, value in serve_env(direct_ingress).items():
            os.environ.setdefault(name, value)
        if direct_ingress:
            os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(port + 1))
            os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(port + 1 + 4 * args.max_replicas))
    if host not in LOOPBACK_HOSTS:
        out(exposure_warning(host, port, address))
    init_ray(address)
    if not verbose():
        import logging

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Started Serve", "Application ... is ready"
    logging_config = serve_logging()
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    app = build_app(args.model_dump())
    kind = manifest["model"]
    out(f"deploying {kind} with {args.shards} shard(s): {', '.join(deployment_names(kind, args.shards, args.layout))} "
        "(every replica loads the checkpoint) ...")
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logging_config)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    info = get_json(f"{url}/version")
    out(f"\nserving {info['model']} {info['model_version']} ({info['num_items']:,} items) at {url}  "
        f"[ready in {time.time() - t0:,.0f} s]")
    out(f"  curl -s {url}/recommend -H 'Content-Type: application/json' "
        f"-d '{json.dumps({'history': [], 'top_n': 10})}'")
    out(f"  curl -s {url}/version")
    summary = {"url": url, "model": info["model"], "model version": info["model_version"],
               "items": info["num_items"], "shards": args.shards}
    if direct_ingress:
        direct = direct_ingress_urls()
        out(f"  direct ingress (no proxy hop), one address per Router replica: {', '.join(direct) or 'none yet'}")
        summary["direct ingress"] = ", ".join(direct)
    if not block:
        return summary
    out("Ctrl-C stops" + (" this command; the application keeps running on the cluster" if address else ""))
    # SIGTERM (kill, a container stopping) and SIGINT stop it the same way, even when SIGINT was ignored at
    # start (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        out("\nstopped" if not address else "")  # a local Ray (and Serve with it) stops when this process exits
    return {**summary, "stopped": "yes" if not address else "no (still running on the cluster)"}
