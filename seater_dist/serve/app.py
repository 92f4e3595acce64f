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

import asyncio
import gc
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from seater_dist import storage
from seater_dist.serve.merge import BeamMerge, EncodeResult, Expansion, ShardBeams, Stale, merge_top
from seater_dist.serve.request import RequestError, check_size, parse_recommend

log = logging.getLogger("ray.serve")  # inside replicas: Serve's format, level and log files

ENDPOINTS = "POST /recommend, GET /healthz, GET /version"


class ServeArgs(BaseModel):
    """The application's arguments (``args:`` of a Serve config, ``key=value`` after ``serve run``)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="SEATER or SASRec checkpoint directory, or a pyarrow.fs URI (s3://...).")
    shards: int = Field(1, ge=1, description="Search shards: SEATER splits the root's children (at most k), "
                        "SASRec the items.")
    beam_size: int | None = Field(None, ge=1, description="SEATER: beam (default: the checkpoint's); SASRec: the "
                                  "largest top_n (default 50).")
    popularity: str | None = Field(None, description="Dataset directory or items.parquet with counts for the "
                                   "popular fallback (default: the run's dataset beside the checkpoint if its "
                                   "items match, else the model's answer to an empty history).")
    index: Literal["flat", "hnsw"] = Field("flat", description="SASRec: exact IndexFlatIP or HNSW.")
    hnsw_m: int = Field(16, ge=4, description="SASRec HNSW: links per node.")
    ef_construction: int = Field(40, ge=8, description="SASRec HNSW: candidates while building.")
    ef_search: int = Field(128, ge=1, description="SASRec HNSW: candidates per query (recall vs speed).")
    index_cache: str | None = Field(None, description="SASRec HNSW: directory where built indexes are kept and "
                                    "reused (keyed by model version, shard and parameters).")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Larger request bodies get 413.")
    threads: int = Field(1, ge=1, description="torch/faiss threads per replica.")
    gpu: bool | None = Field(None, description="Place encoder and shards on GPUs (default: if the cluster has any).")
    min_replicas: int = Field(1, ge=1, description="Replicas every deployment starts with and keeps (warm "
                              "capacity: a new replica takes as long as loading the checkpoint to start).")
    max_replicas: int = Field(2, ge=1, description="Autoscaling ceiling of every deployment.")
    retry_timeout_s: float = Field(30.0, gt=0, description="How long the router retries a request whose replica "
                                   "died or changed version before answering 503.")
    batch_size: int = Field(16, ge=1, description="Most requests one encoder/shard batch holds.")
    serial_load: bool = Field(True, description="Replicas on one machine load the checkpoint one at a time "
                              "(bounds the peak memory of a deployment; slower to start).")
    layout: Literal["split", "single"] = Field("split", description="split: a Router, an Encoder and S shard "
                                               "deployments, each scaled on its own; single: one deployment whose "
                                               "replicas hold the encoder and every shard (no calls between "
                                               "deployments: less CPU and latency per request; scales as a whole).")


    @model_validator(mode="after")
    def _replica_bounds(self) -> "ServeArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


def parse_serve_args(args: dict[str, Any]) -> ServeArgs:
    """``args`` checked -> ServeArgs; else a ValueError naming the first bad field in one line."""
    try:
        return ServeArgs.model_validate(args)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        message = first["msg"].removeprefix("Value error, ")  # a validator's own message names its fields
        raise ValueError(f"serve args: {field}: {message}" if field else f"serve args: {message}") from None


def _args(args: dict[str, Any] | ServeArgs) -> ServeArgs:
    return args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)


def _autoscaling(max_replicas: int, target: float, min_replicas: int = 1) -> dict[str, Any]:
    return {"min_replicas": min_replicas, "initial_replicas": min_replicas, "max_replicas": max_replicas,
            "target_ongoing_requests": target, "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}


# Options every deployment shares; the config files (serve/*.yaml) repeat them for operators to tune.
_COMMON: dict[str, Any] = {"max_surge_percent": 100, "graceful_shutdown_wait_loop_s": 1.0,
                           "graceful_shutdown_timeout_s": 30.0, "health_check_period_s": 2.0}


def _split(items: list[Any], sizes: list[int]) -> list[list[Any]]:
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


def _start_replica(threads: int) -> None:
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
        ckpt = load_checkpoint(a.checkpoint)  # a URI is copied once per node (seater_dist.storage)
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

    with open(storage.private_dir() / "serve-load.lock", "a") as lock:  # the user's own: no one else can hold it
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _encoder_part(a: ServeArgs, ckpt: Any, share_table: bool = False) -> Any:
    from seater_dist.serve.parts import SasrecEncoderPart, SeaterEncoderPart, choose_device

    device = choose_device(a.gpu)
    if ckpt.kind == "seater":
        return SeaterEncoderPart(ckpt, a.beam_size, a.popularity, device, a.shards, share_table)
    return SasrecEncoderPart(ckpt, a.beam_size, a.popularity, device, a.shards, a.index)


def _beam_shard_part(a: ServeArgs, ckpt: Any, shard: int) -> Any:
    from seater_dist.serve.parts import BeamShardPart, choose_device

    return BeamShardPart(ckpt, shard, a.shards, choose_device(a.gpu))


def _index_shard_part(a: ServeArgs, ckpt: Any, shard: int) -> Any:
    from seater_dist.serve.parts import IndexShardPart

    ckpt.model = None  # the index needs the item table only: free the model's copy before building
    gc.collect()
    return IndexShardPart(ckpt, shard, a.shards, a.index, a.hnsw_m, a.ef_construction, a.ef_search, a.threads,
                          a.index_cache)


def _single_parts(a: ServeArgs) -> tuple[Any, list[Any]]:
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


# ------------------------------------------------------------------------------------------ workers


class _Shard:
    """What both shard kinds share: ``search_now``, one router batch searched at once (``layout: single``
    calls it directly; ``search``, batched by Serve, goes through the same ``search_all``)."""

    async def search_all(self, requests: list[Any]) -> list[Any]:
        raise NotImplementedError

    async def search_now(self, request: Any) -> Any:
        return (await self.search_all([request]))[0]


@serve.deployment(name="Encoder", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config=_autoscaling(2, 8), **_COMMON)
class Encoder:
    """Raw ids -> encoder memory (SEATER) or user state (SASRec), or the popular items."""

    def __init__(self, args: dict[str, Any], part: Any = None) -> None:
        a = _args(args)
        _start_replica(a.threads)
        self.part: Any = part if part is not None else _build_part(a, lambda ckpt: _encoder_part(a, ckpt))
        self.encode.set_max_batch_size(a.batch_size)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def encode(self, batches: list[list[list[str]]]) -> list[list[EncodeResult]]:
        """Each call sends a router's batch of histories; concurrent calls are encoded together."""
        results = await self.encode_now([h for batch in batches for h in batch])
        return _split(results, [len(b) for b in batches])

    async def encode_now(self, histories: list[list[str]]) -> list[EncodeResult]:
        """One batch of histories, encoded at once (``layout: single`` calls this directly)."""
        results = await asyncio.to_thread(self.part.encode, histories)
        for r in results:
            r.info = self.part.info
        return results

    def info(self) -> dict[str, Any]:
        return self.part.info


@serve.deployment(name="BeamShard", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config=_autoscaling(2, 8), **_COMMON)
class BeamShard(_Shard):
    """SEATER shard ``shard`` of ``args.shards``: beam search inside its subtrees of the root."""

    def __init__(self, args: dict[str, Any], shard: int, part: Any = None) -> None:
        a = _args(args)
        _start_replica(a.threads)
        self.part = part if part is not None else _build_part(a, lambda ckpt: _beam_shard_part(a, ckpt, shard))
        self.version = self.part.version
        self.search.set_max_batch_size(a.batch_size)

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
            for i, part in zip(rows, _split(answers, [len(requests[i][1]) for i in rows])):
                out[i] = part
        return out

    async def expand(self, version: str, memory: np.ndarray, pad_mask: np.ndarray, level: int,
                     tokens: np.ndarray) -> Expansion | Stale:
        if version != self.version:
            return Stale(self.version)
        return await asyncio.to_thread(self.part.expand, memory, pad_mask, level, tokens)


@serve.deployment(name="IndexShard", max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config=_autoscaling(2, 8), **_COMMON)
class IndexShard(_Shard):
    """SASRec shard ``shard`` of ``args.shards``: a faiss index over a range of the items."""

    def __init__(self, args: dict[str, Any], shard: int, part: Any = None) -> None:
        a = _args(args)
        _start_replica(a.threads)
        self.part = part if part is not None else _build_part(a, lambda ckpt: _index_shard_part(a, ckpt, shard))
        self.version = self.part.version
        self.search.set_max_batch_size(a.batch_size)

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
            for i, part in zip(current, _split(answers, [len(requests[i][1]) for i in current])):
                n_i = requests[i][2]
                out[i] = [(ids[:n_i], scores[:n_i], raw[:n_i]) for ids, scores, raw in part]
        return out


# ------------------------------------------------------------------------------------------ the router

api = FastAPI(title="seater-dist retrieval",
              description="POST /recommend {history, top_n} -> {items, scores, model_version, ignored}")


class _Retry(Exception):
    """A replica of another model version answered (a rollout in progress): run the request again."""


class _Unavailable(Exception):
    """No replica answered within retry_timeout_s."""


_RETRY = (_Retry, RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class _Local:
    """An Encoder or shard object in this replica, called the way its deployment handle is:
    ``local.method.remote(*args)`` awaits ``method(*args)`` (``layout: single``). The batched methods map to
    their unbatched twins: the Router batches already, and a ``@serve.batch`` queue belongs to its replica's
    own deployment (Ray keeps one queue per method and process)."""

    UNBATCHED = {"encode": "encode_now", "search": "search_now"}

    def __init__(self, target: Any) -> None:
        self._target = target
        # One call at a time per part, as its deployment's @serve.batch would run them: the router keeps
        # several batches under way, and the encoder may work on one while a shard works on another.
        self._lock = asyncio.Lock()

    def __getattr__(self, name: str) -> "_LocalMethod":
        return _LocalMethod(getattr(self._target, self.UNBATCHED.get(name, name)), self._lock)


class _LocalMethod:
    def __init__(self, method: Any, lock: asyncio.Lock) -> None:
        self._method, self._lock = method, lock

    async def remote(self, *args: Any) -> Any:
        async with self._lock:
            result = self._method(*args)
            return await result if asyncio.iscoroutine(result) else result


def _error(status: int, error: str, field: str, problem: str) -> JSONResponse:
    return JSONResponse({"error": error, "field": field, "problem": problem}, status_code=status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    problem = f"{request.method} {request.url.path}: {exc.detail}; the endpoints are {ENDPOINTS}"
    return _error(exc.status_code, str(exc.detail).lower(), "path", problem)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:  # never a traceback to the client
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal error", "problem": "see the service's log"}, status_code=500)


@serve.deployment(name="Router", max_ongoing_requests=128, max_queued_requests=400,
                  ray_actor_options={"num_cpus": 0.05}, autoscaling_config=_autoscaling(2, 32), **_COMMON)
@serve.ingress(api)
class Router:
    """HTTP in front of the encoder and the shards: deployment handles (``layout: split``; the Router holds no
    model state), or, with ``encoder=None`` (``layout: single``), the encoder and every shard built here."""

    def __init__(self, encoder: Any, shards: list[Any], kind: str, args: dict[str, Any]) -> None:
        a = _args(args)
        _start_replica(a.threads)
        if encoder is None:
            encoder_part, shard_parts = _single_parts(a)
            shard_class = (BeamShard if kind == "seater" else IndexShard).func_or_class
            shards = [_Local(shard_class(args, s, part)) for s, part in enumerate(shard_parts)]
            encoder = _Local(Encoder.func_or_class(args, encoder_part))
        self.encoder, self.shards, self.kind = encoder, list(shards), kind
        self.max_body, self.retry_timeout = a.max_body_bytes, a.retry_timeout_s
        self._info: dict[str, Any] | None = None

    async def info(self, refresh: bool = False) -> dict[str, Any]:
        if self._info is None or refresh:
            self._info = await self.encoder.info.remote()
        return self._info

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.info(), timeout=5.0)
        except Exception:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok", "model_version": info["model_version"]})

    @api.get("/version")
    async def version(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.info(refresh=True), timeout=10.0)
        except Exception:  # noqa: BLE001
            return _error(503, "service unavailable", "encoder", "the encoder did not answer within 10 s")
        return JSONResponse(info)

    @api.post("/recommend")
    async def recommend(self, request: Request) -> JSONResponse:
        try:
            check_size(request.headers.get("content-length"), self.max_body)
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.max_body:
                    raise RequestError(413, "body", f"more than {self.max_body} bytes",
                                       error="request body too large")
            info = await self.info()
            req = parse_recommend(bytes(body), int(info["max_top_n"]), self.max_body)
            answer = await self._answer((req.history, req.top_n))
            if isinstance(answer, RequestError):
                raise answer
            body_out, headers = answer
            return JSONResponse(body_out, headers=headers)
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except BackPressureError:
            return _error(503, "service overloaded", "request", "too many queued requests; retry later")
        except _Unavailable as err:
            return _error(503, "service unavailable", "request", str(err))
        except Exception:  # noqa: BLE001 - logged in full here, never sent to the client
            log.exception("recommend failed")
            return JSONResponse({"error": "internal error", "problem": "see the service's log"}, status_code=500)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=4)
    async def _answer(self, jobs: list[tuple[list[str], int]]) -> list[Any]:
        """The requests queued in this router while earlier batches ran, answered together: one encoder call
        and one call per shard for all of them (each hop costs milliseconds of CPU). Up to 4 batches are under
        way at once, so the encoder works on one while the shards work on another. Retried as a whole when a
        replica died or another model version answered, for up to retry_timeout_s."""
        deadline = time.monotonic() + self.retry_timeout
        delay, attempt = 0.05, 0
        while True:
            attempt += 1
            try:
                return await self._answer_once(jobs)
            except _RETRY as err:
                if time.monotonic() + delay > deadline:
                    log.warning("giving up %d request(s) after %d attempts: %s", len(jobs), attempt,
                                type(err).__name__)
                    raise _Unavailable(f"no replica answered within {self.retry_timeout:g} s "
                                       f"({type(err).__name__})") from None
                log.info("retrying %d request(s) (attempt %d): %s", len(jobs), attempt, type(err).__name__)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    async def _answer_once(self, jobs: list[tuple[list[str], int]]) -> list[Any]:
        """-> per job (response body, headers), or the RequestError to answer."""
        encoded: list[EncodeResult] = await self.encoder.encode.remote([history for history, _ in jobs])
        out: list[Any] = [None] * len(jobs)
        rows = []
        for i, (enc, (_, top_n)) in enumerate(zip(encoded, jobs)):
            info = enc.info
            if self._info is None or self._info.get("model_version") != info["model_version"]:
                self._info = info
            if top_n > info["max_top_n"]:
                out[i] = RequestError(422, "top_n", f"must be an integer in 1..{info['max_top_n']}, got {top_n}")
            elif enc.state is None:
                raw, scores = enc.fallback
                out[i] = ({"items": raw[:top_n], "scores": [float(x) for x in scores[:top_n]],
                           "model_version": enc.version, "ignored": enc.ignored, "fallback": "popular"}, {})
            else:
                rows.append(i)
        if not rows:
            return out
        version, info = encoded[rows[0]].version, encoded[rows[0]].info  # one encoder call: one version
        states = np.stack([encoded[i].state for i in rows])
        if self.kind == "seater":
            beam = int(info["beam_size"])
            pad_mask = np.stack([encoded[i].pad_mask for i in rows])
            answers = await asyncio.gather(*(s.search.remote((version, states, pad_mask, beam)) for s in self.shards))
            if any(isinstance(a, Stale) for a in answers):
                raise _Retry()
            for j, i in enumerate(rows):
                merge = BeamMerge([a[j] for a in answers], depth=int(info["depth"]), beam=beam,
                                  bos=int(info["num_items"]))
                while (need := merge.missing()) is not None:
                    level, by_shard = need
                    shards = list(by_shard)
                    expansions = await asyncio.gather(*(self.shards[s].expand.remote(
                        version, states[j], pad_mask[j], level, by_shard[s]) for s in shards))
                    if any(isinstance(e, Stale) for e in expansions):
                        raise _Retry()
                    for s, e in zip(shards, expansions):
                        merge.add_expansion(level, s, e)
                _, scores, raw = merge.top(jobs[i][1])
                out[i] = ({"items": raw, "scores": scores.astype(float).tolist(), "model_version": version,
                           "ignored": encoded[i].ignored}, {"X-Seater-Expanded": str(merge.expansions)})
        else:
            n = max(jobs[i][1] for i in rows)
            answers = await asyncio.gather(*(s.search.remote((version, states, n)) for s in self.shards))
            if any(isinstance(a, Stale) for a in answers):
                raise _Retry()
            for j, i in enumerate(rows):
                _, scores, raw = merge_top([a[j] for a in answers], jobs[i][1])
                out[i] = ({"items": raw, "scores": scores.astype(float).tolist(), "model_version": version,
                           "ignored": encoded[i].ignored}, {})
        return out


# ------------------------------------------------------------------------------------------ the builder


def deployment_names(kind: str, shards: int, layout: str = "split") -> list[str]:
    """The deployments ``build_app`` creates, by name (what a config file's ``deployments:`` may list)."""
    if layout == "single":
        return ["Router"]
    shard = "BeamShard" if kind == "seater" else "IndexShard"
    return ["Router", "Encoder", *(f"{shard}{s}" for s in range(shards))]


def _manifest(checkpoint: str) -> dict[str, Any]:
    """The checkpoint's manifest (local path or pyarrow.fs URI), checked for kind and schema version."""
    from seater_dist.model.checkpoint import read_checkpoint_manifest

    if not storage.is_remote(checkpoint):
        return read_checkpoint_manifest(checkpoint)
    import json

    return json.loads(storage.read_bytes(storage.join(checkpoint, "manifest.json")))  # not the whole checkpoint


def _cluster_has_gpu() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # noqa: BLE001 - no cluster to ask: CPU
        return False


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``args`` are :class:`ServeArgs` fields (``checkpoint`` required)."""
    a = parse_serve_args(args)
    if "://" not in a.checkpoint:  # replicas may run in another directory: give them an absolute path
        a = a.model_copy(update={"checkpoint": str(Path(a.checkpoint).expanduser().resolve())})
    manifest = _manifest(a.checkpoint)
    kind = manifest["model"]
    gpu = _cluster_has_gpu() if a.gpu is None else a.gpu
    plain = a.model_dump()
    plain["gpu"] = gpu

    def opts(target: float, cpus: float, uses_gpu: bool = True) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": cpus, "runtime_env": {"env_vars": serve_env()}}
        if gpu and uses_gpu:
            actor["num_gpus"] = 0.5
        return {"ray_actor_options": actor, "autoscaling_config": _autoscaling(a.max_replicas, target, a.min_replicas)}

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
