"""The Ray Serve application: a FastAPI router, an encoder, S search shards (thin wrappers of parts.py).

    serve run seater_dist.serve.app:build_app checkpoint=runs/demo/seater/best shards=2
    serve deploy serve/seater.yaml            # the same, from a config file (README.md, Serve)
    seater serve --checkpoint runs/demo/seater/best --shards 2

Deployments (names used by the config files):

* ``Router`` (HTTP ingress): validates requests (request.py), calls ``Encoder`` once, fans out to the shards
  and merges (merge.py). It holds no model: it is the same for SEATER and SASRec and for any version. The
  requests that queue while a batch is under way are answered together (``@serve.batch``, no waiting): one
  encoder call and one call per shard for all of them, since every hop costs milliseconds of CPU.
* ``Encoder``: raw ids -> item indices (unknown ids ignored), SEATER's encoder memory or SASRec's user state;
  the popular items when no id is known. Calls from several routers are batched together too.
* ``BeamShard0..S-1`` (SEATER): beam search inside the shard's subtrees of the root. Batched.
* ``IndexShard0..S-1`` (SASRec): a faiss index (flat or HNSW) over a range of items. Batched.

That is the ``split`` layout. In the ``single`` layout (``layout: single``) the application is the Router
alone: each of its replicas loads the checkpoint once and holds the encoder's and every shard's part,
called in-process (no hops between deployments).

Every deployment autoscales (from ``min_replicas``, default 1, to ``max_replicas``), reserves a fraction of
a CPU (the whole app fits 2 CPUs), takes ``num_gpus`` when the cluster has GPUs, and is replaced replica by
replica on a new config with ``max_surge_percent=100``: new replicas start before old ones drain, so a rollout fails no
request. Every answer is computed by one model version: the encoder stamps its version on the request and
a shard of another version answers ``Stale``, upon which the router retries (bounded by
``retry_timeout_s``); the router also retries when a replica dies under a request.
"""

from typing import Any

from ray.serve import Application

from seater_dist import artifacts
from seater_dist.config import parse_serve_args
from seater_dist.serve.replicas import BeamShard, Encoder, IndexShard, autoscaling, serve_env
from seater_dist.serve.router import Router


def deployment_names(kind: str, shards: int, layout: str = "split") -> list[str]:
    """The deployments ``build_app`` creates, by name (what a config file's ``deployments:`` may list)."""
    if layout == "single":
        return ["Router"]
    shard = "BeamShard" if kind == "seater" else "IndexShard"
    return ["Router", "Encoder", *(f"{shard}{s}" for s in range(shards))]


def _manifest(checkpoint: str) -> dict[str, Any]:
    """The checkpoint's manifest (local path or pyarrow.fs URI), checked for kind and schema version."""
    from seater_dist.model.checkpoint import read_checkpoint_manifest

    return read_checkpoint_manifest(checkpoint)  # the manifest alone, not the whole checkpoint


def _cluster_has_gpu() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # noqa: BLE001 - no cluster to ask: CPU
        return False


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``args`` are :class:`ServeArgs` fields (``checkpoint`` required)."""
    a = parse_serve_args(args)
    a = a.model_copy(update={"checkpoint": artifacts.location(a.checkpoint)})  # replicas run in another directory
    manifest = _manifest(a.checkpoint)
    kind = manifest["model"]
    gpu = _cluster_has_gpu() if a.gpu is None else a.gpu
    plain = a.model_dump()
    plain["gpu"] = gpu

    def opts(target: float, cpus: float, uses_gpu: bool = True) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": cpus, "runtime_env": {"env_vars": serve_env()}}
        if gpu and uses_gpu:
            actor["num_gpus"] = 0.5
        return {"ray_actor_options": actor, "autoscaling_config": autoscaling(a.max_replicas, target, a.min_replicas)}

    if kind == "seater" and a.shards > (roots := min(int(manifest["k"]), int(manifest["num_items"]))):
        raise ValueError(f"serve args: shards: {a.shards} > {roots}, the children of the tree's root "
                         f"(each shard owns at least one top-level subtree)")
    if kind == "sasrec" and a.shards > int(manifest["num_items"]):
        raise ValueError(f"serve args: shards: {a.shards} > {manifest['num_items']} items")
    if a.layout == "single":  # the encoder's and the shards' reservations in one replica, scaled as the shards are
        return Router.options(**opts(8, 0.05 + 0.1 * (a.shards + 1))).bind(None, [], kind, plain)
    shard_class = BeamShard if kind == "seater" else IndexShard
    # A SASRec IndexShard searches a CPU faiss index: it never touches a GPU, so it reserves none.
    shards = [shard_class.options(name=f"{shard_class.name}{s}", **opts(8, 0.1, uses_gpu=kind == "seater"))
              .bind(plain, s) for s in range(a.shards)]
    encoder = Encoder.options(**opts(8, 0.1)).bind(plain)
    return Router.options(**opts(32, 0.05, uses_gpu=False)).bind(encoder, shards, kind, plain)
