"""The Serve deployments that hold a model part: ``Encoder``, ``BeamShard`` (SEATER) and ``IndexShard``
(SASRec), thin wrappers of seater_parts.py and sasrec_parts.py, and how a replica loads its part (serve/app.py
composes them).

Every replica sets its torch threads and, on a private Ray, keeps Serve's gRPC port on loopback; replicas of one
machine load the checkpoint one at a time (``serial_load``) under a lock only this user can hold.
"""

import asyncio
import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from ray import serve

from seater_dist import artifacts
from seater_dist.config import ServeArgs
from seater_dist.serve.merge import EncodeResult, Expansion, ShardBeams, Stale


def replica_args(args: dict[str, Any] | ServeArgs) -> ServeArgs:
    return args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)


def autoscaling(max_replicas: int, target: float, min_replicas: int = 1) -> dict[str, Any]:
    return {"min_replicas": min_replicas, "initial_replicas": min_replicas, "max_replicas": max_replicas,
            "target_ongoing_requests": target, "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}


# Options every deployment shares; the config files (serve/*.yaml) repeat them for operators to tune.
COMMON_OPTIONS: dict[str, Any] = {"max_surge_percent": 100, "graceful_shutdown_wait_loop_s": 1.0,
                           "graceful_shutdown_timeout_s": 30.0, "health_check_period_s": 2.0}


def split_sizes(items: list[Any], sizes: list[int]) -> list[list[Any]]:
    """items cut into consecutive lists of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append(items[start : start + size])
        start += size
    return out


# Three of the settings of Ray Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED; Ray's docs:
# "Enable High Throughput on Ray Serve with KubeRay", and the Performance Tuning guide): user code and the
# handles' router run on the replica's own event loop instead of extra threads, and calls between deployments
# go over Serve's direct gRPC data plane instead of Ray actor tasks. Each hop then costs much less CPU (on 2
# cores, 50 rps went from saturated to sustained); our heavy work runs in worker threads (asyncio.to_thread),
# never on the loop. Not the whole mode: its direct ingress would replace the HTTP proxy and its host setting.
THROUGHPUT_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                  "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}


def serve_env(direct_ingress: bool = False) -> dict[str, str]:
    """Environment of a private Ray's Serve (set before Ray starts: the controller, the HTTP proxy and every
    replica read it): the throughput settings, unless this process's environment says otherwise. With
    ``direct_ingress``, Serve's direct ingress too: each Router replica also answers HTTP on its own port
    (from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, 30000 by default), so a request skips the HTTP proxy's hop;
    the proxy stays, on the head node, balancing over the replicas."""
    wanted = {**THROUGHPUT_ENV, **({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"} if direct_ingress else {})}
    return {name: os.environ.get(name, value) for name, value in wanted.items()}


def start_replica(threads: int) -> None:
    """What every replica does first: its torch threads, and its Serve gRPC port on loopback on a private Ray."""
    import torch

    from seater_dist.runtime.ray_env import keep_serve_replica_on_loopback

    torch.set_num_threads(threads)
    keep_serve_replica_on_loopback()


def _build_part(a: ServeArgs, make: Any) -> Any:
    """Load the checkpoint, keep ``make(ckpt)`` (this replica's part), free the rest. With ``serial_load``,
    the replicas of one machine do this one at a time: loading holds the whole checkpoint in memory for a
    moment (twice the token table at 6.1M items), and several replicas loading at once add up."""
    from seater_dist.model.checkpoint import load_checkpoint

    with _one_at_a_time(a.serial_load):
        ckpt = load_checkpoint(a.checkpoint)  # a URI is copied once per node (seater_dist.artifacts)
        part = make(ckpt)
        del ckpt
        gc.collect()
    return part


@contextmanager
def _one_at_a_time(enabled: bool) -> Iterator[None]:
    """Hold this user's checkpoint-load lock (``<tmp>/seater-<uid>/serve-load.lock``, in a directory only
    this user can write, so no other local user can take it and stall the replicas)."""
    if not enabled:
        yield
        return
    import fcntl

    with open(artifacts.private_dir() / "serve-load.lock", "a") as lock:  # the user's own: no one else can hold it
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def choose_device(gpu: bool | None) -> Any:
    """The torch device of a replica's part: cuda when asked (or, with None, when this process sees a GPU),
    else cpu."""
    import torch

    use = torch.cuda.is_available() if gpu is None else (gpu and torch.cuda.is_available())
    return torch.device("cuda" if use else "cpu")


def _encoder_part(a: ServeArgs, ckpt: Any, share_table: bool = False) -> Any:
    from seater_dist.serve.sasrec_parts import SasrecEncoderPart
    from seater_dist.serve.seater_parts import SeaterEncoderPart

    device = choose_device(a.gpu)
    if ckpt.kind == "seater":
        return SeaterEncoderPart(ckpt, a.beam_size, a.popularity, device, a.shards, share_table)
    return SasrecEncoderPart(ckpt, a.beam_size, a.popularity, device, a.shards, a.index)


def _beam_shard_part(a: ServeArgs, ckpt: Any, shard: int) -> Any:
    from seater_dist.serve.seater_parts import BeamShardPart

    return BeamShardPart(ckpt, shard, a.shards, choose_device(a.gpu))


def _index_shard_part(a: ServeArgs, ckpt: Any, shard: int) -> Any:
    from seater_dist.serve.sasrec_parts import IndexShardPart

    ckpt.model = None  # the index needs the item table only: free the model's copy before building
    gc.collect()
    return IndexShardPart(ckpt, shard, a.shards, a.index, a.hnsw_m, a.ef_construction, a.ef_search, a.threads,
                          a.index_cache)


def single_parts(a: ServeArgs) -> tuple[Any, list[Any]]:
    """The encoder's and every shard's parts from one load of the checkpoint (``layout: single``): one model
    version by construction, and one load instead of S + 1. The order matters: a SEATER encoder part strips
    the checkpoint's model of what it does not need, a SASRec index shard drops the model."""
    def make(ckpt: Any) -> tuple[Any, list[Any]]:
        if ckpt.kind == "seater":  # one shard holds the checkpoint's table itself: the encoder reads it too
            shards = [_beam_shard_part(a, ckpt, s) for s in range(a.shards)]
            return _encoder_part(a, ckpt, share_table=a.shards == 1), shards
        encoder = _encoder_part(a, ckpt)
        return encoder, [_index_shard_part(a, ckpt, s) for s in range(a.shards)]

    return _build_part(a, make)


class _Shard:
    """What both shard kinds share: ``search_now``, one router batch searched at once (``layout: single``
    calls it directly; ``search``, batched by Serve, goes through the same ``search_all``)."""

    async def search_all(self, requests: list[Any]) -> list[Any]:
        raise NotImplementedError

    async def search_now(self, request: Any) -> Any:
        return (await self.search_all([request]))[0]

    def _load(self, args: dict[str, Any], part: Any, make: Any) -> None:
        """What both shard kinds do at start: threads, this replica's part (``part``, or ``make(a, ckpt)``
        from the checkpoint), its model version, and the batch size of ``search``."""
        a = replica_args(args)
        start_replica(a.threads)
        self.part = part if part is not None else _build_part(a, lambda ckpt: make(a, ckpt))
        self.version = self.part.version
        self.search.set_max_batch_size(a.batch_size)


@serve.deployment(name="Encoder", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config=autoscaling(2, 8), **COMMON_OPTIONS)
class Encoder:
    """Raw ids -> encoder memory (SEATER) or user state (SASRec), or the popular items."""

    def __init__(self, args: dict[str, Any], part: Any = None) -> None:
        a = replica_args(args)
        start_replica(a.threads)
        self.part: Any = part if part is not None else _build_part(a, lambda ckpt: _encoder_part(a, ckpt))
        self.encode.set_max_batch_size(a.batch_size)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def encode(self, batches: list[list[list[str]]]) -> list[list[EncodeResult]]:
        """Each call sends a router's batch of histories; concurrent calls are encoded together."""
        results = await self.encode_now([h for batch in batches for h in batch])
        return split_sizes(results, [len(b) for b in batches])

    async def encode_now(self, histories: list[list[str]]) -> list[EncodeResult]:
        """One batch of histories, encoded at once (``layout: single`` calls this directly)."""
        results = await asyncio.to_thread(self.part.encode, histories)
        for r in results:
            r.info = self.part.info
        return results

    def info(self) -> dict[str, Any]:
        return self.part.info


@serve.deployment(name="BeamShard", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config=autoscaling(2, 8), **COMMON_OPTIONS)
class BeamShard(_Shard):
    """SEATER shard ``shard`` of ``args.shards``: beam search inside its subtrees of the root."""

    def __init__(self, args: dict[str, Any], shard: int, part: Any = None) -> None:
        self._load(args, part, lambda a, ckpt: _beam_shard_part(a, ckpt, shard))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def search(self, requests: list[tuple[str, np.ndarray, np.ndarray, int]]) -> list[list[ShardBeams] | Stale]:
        """(version, memories [B, t, d], pad masks [B, t], beam) per call (a router's batch) -> B ShardBeams,
        or Stale for another version. Concurrent calls are searched together."""
        return await self.search_all(requests)

    async def search_all(self,
                         requests: list[tuple[str, np.ndarray, np.ndarray, int]]) -> list[list[ShardBeams] | Stale]:
        out: list[list[ShardBeams] | Stale] = [Stale(self.version)] * len(requests)
        current = [i for i, r in enumerate(requests) if r[0] == self.version]
        for beam in sorted({requests[i][3] for i in current}):
            rows = [i for i in current if requests[i][3] == beam]
            memory = np.concatenate([requests[i][1] for i in rows])
            pad_mask = np.concatenate([requests[i][2] for i in rows])
            answers = await asyncio.to_thread(self.part.search, memory, pad_mask, beam)
            for i, part in zip(rows, split_sizes(answers, [len(requests[i][1]) for i in rows])):
                out[i] = part
        return out

    async def expand(self, version: str, memory: np.ndarray, pad_mask: np.ndarray, level: int,
                     tokens: np.ndarray) -> Expansion | Stale:
        if version != self.version:
            return Stale(self.version)
        return await asyncio.to_thread(self.part.expand, memory, pad_mask, level, tokens)


@serve.deployment(name="IndexShard", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config=autoscaling(2, 8), **COMMON_OPTIONS)
class IndexShard(_Shard):
    """SASRec shard ``shard`` of ``args.shards``: a faiss index over a range of the items."""

    def __init__(self, args: dict[str, Any], shard: int, part: Any = None) -> None:
        self._load(args, part, lambda a, ckpt: _index_shard_part(a, ckpt, shard))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def search(self, requests: list[tuple[str, np.ndarray, int]]) -> list[Any]:
        """(version, user states [B, d], n) per call -> B (item ids, scores, raw ids) of at most n, or Stale."""
        return await self.search_all(requests)

    async def search_all(self, requests: list[tuple[str, np.ndarray, int]]) -> list[Any]:
        out: list[Any] = [Stale(self.version)] * len(requests)
        current = [i for i, r in enumerate(requests) if r[0] == self.version]
        if current:
            n = max(requests[i][2] for i in current)
            answers = await asyncio.to_thread(self.part.search, np.concatenate([requests[i][1] for i in current]), n)
            for i, part in zip(current, split_sizes(answers, [len(requests[i][1]) for i in current])):
                n_i = requests[i][2]
                out[i] = [(ids[:n_i], scores[:n_i], raw[:n_i]) for ids, scores, raw in part]
        return out
