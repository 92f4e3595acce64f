"""The HTTP ingress: the ``Router`` deployment (FastAPI) in front of the encoder and the shards, with the
request contract (request.py), the exact merge of the shards (merge.py: ``sharded_search``, the driver the
in-process search uses too, awaited here over the shard deployments) and the retries of a rollout or a
replica that died (serve/app.py composes it)."""

import asyncio
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from seater_dist.serve import merge
from seater_dist.serve.merge import EncodeResult, Stale, merge_top
from seater_dist.serve.replicas import (
    COMMON_OPTIONS,
    BeamShard,
    Encoder,
    IndexShard,
    autoscaling,
    replica_args,
    single_parts,
    start_replica,
)
from seater_dist.serve.request import RequestError, check_size, parse_recommend

log = logging.getLogger("ray.serve")  # inside replicas: Serve's format, level and log files

ENDPOINTS = "POST /recommend, GET /healthz, GET /version"

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
                  ray_actor_options={"num_cpus": 0.05}, autoscaling_config=autoscaling(2, 32), **COMMON_OPTIONS)
@serve.ingress(api)
class Router:
    """HTTP in front of the encoder and the shards: deployment handles (``layout: split``; the Router holds no
    model state), or, with ``encoder=None`` (``layout: single``), the encoder and every shard built here."""

    def __init__(self, encoder: Any, shards: list[Any], kind: str, args: dict[str, Any]) -> None:
        a = replica_args(args)
        start_replica(a.threads)
        if encoder is None:
            encoder_part, shard_parts = single_parts(a)
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
            steps = merge.sharded_search(states, pad_mask, beam, [jobs[i][1] for i in rows],
                                         depth=int(info["depth"]), bos=int(info["num_items"]))
            merged = await merge.drive_async(steps, lambda request: self._ask_shards(version, request))
            for i, user in zip(rows, merged):
                out[i] = ({"items": user.raw, "scores": user.scores.astype(float).tolist(), "model_version": version,
                           "ignored": encoded[i].ignored}, {"X-Seater-Expanded": str(user.expansions)})
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

    async def _ask_shards(self, version: str, request: merge.ShardRequest) -> Any:
        """The answer to one request of ``merge.sharded_search`` from the beam shard deployments (all of them
        for a search, the shards named for an expansion, concurrently); _Retry when one holds another version."""
        if isinstance(request, merge.SearchShards):
            answers = await asyncio.gather(*(s.search.remote((version, request.memory, request.pad_mask,
                                                              request.beam)) for s in self.shards))
        else:
            answers = await asyncio.gather(*(self.shards[s].expand.remote(
                version, request.memory, request.pad_mask, request.level, tokens)
                for s, tokens in request.tokens.items()))
        if any(isinstance(a, Stale) for a in answers):
            raise _Retry()
        return answers if isinstance(request, merge.SearchShards) else dict(zip(request.tokens, answers))
