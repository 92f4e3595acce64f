"""Offline evaluation at cluster scale: Ray Data batch inference over the valid/test users.

Each actor of a Ray Data actor pool loads the checkpoint once and ranks batches of users with the model's
``topk`` (beam search for SEATER, exact inner-product search for SASRec), returning one row per user: its
top-K and its value of every metric. The driver sorts the rows by user before anything is added up, so
every figure is the same to the last digit whatever the number of actors, and writes one artifact:

    OUT/metrics.json       {"recall@50": 0.31, "recall@50_ci95": [0.30, 0.32], ..., "users": 2236, ...}
    OUT/per_user.parquet   user_index, user_id, items (top-K raw item ids, best first), one float64 column
                           per metric
    OUT/manifest.json      what was evaluated (model, split, catalogue, the users' questions) and checksums

The intervals are percentile-bootstrap intervals over users (:mod:`seater_dist.eval.stats`); two
evaluations of the same users are compared with :mod:`seater_dist.eval.compare`.

    result = evaluate("runs/b/seater/best", "runs/b/dataset", split="test")   # writes runs/b/seater/eval_test/
    result.metrics["recall@50"], result.ci95["recall@50"], result.users
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from seater_dist import artifacts
from seater_dist.artifacts import ArtifactError, atomic_dir, read_manifest, verify_files, write_manifest
from seater_dist.config import EvalSettings, metric_cutoffs
from seater_dist.data.dataset import Dataset, load_dataset
from seater_dist.eval import stats
from seater_dist.eval.metrics import per_user_metrics
from seater_dist.model.checkpoint import (
    catalogue_id,
    check_same_catalogue,
    load_checkpoint,
    read_checkpoint_manifest,
    verify_checkpoint,
)
from seater_dist.runtime import capacity

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SPLITS = ("valid", "test")
PROGRESS_SECONDS = 15.0
ARTIFACT = "evaluation"
SCHEMA_VERSION = 1
METRICS_FILE = "metrics.json"
PER_USER_FILE = "per_user.parquet"
BOOTSTRAP = {"method": "percentile bootstrap over users", "level": stats.LEVEL, "resamples": stats.RESAMPLES,
             "seed": stats.SEED}


@dataclass
class EvalResult:
    """Means over users of every metric (``recall@K``, ``hr@K``, ``ndcg@K``), their 95% intervals, and what
    was evaluated. ``seconds``: the whole call; ``rank_seconds``: the Ray Data part (load, rank, collect)."""

    metrics: dict[str, float]
    ci95: dict[str, list[float]]
    users: int
    seconds: float
    rank_seconds: float
    split: str
    checkpoint: str
    model: str
    out: str
    devices: list[str] = field(default_factory=list)  # where the users were ranked ("cpu", "cuda:0")

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.json`` layout: each metric and its ``<metric>_ci95`` at the top level, then the rest."""
        out = asdict(self)
        metrics, ci95 = out.pop("metrics"), out.pop("ci95")
        return {**metrics, **{f"{name}_ci95": ci95[name] for name in metrics}, **out, "bootstrap": BOOTSTRAP}

    @classmethod
    def from_dict(cls, saved: dict[str, Any], names: Sequence[str]) -> EvalResult:
        """The result whose :meth:`to_dict` is ``saved`` (``names``: its metrics, as the manifest lists them)."""
        rest = {k: v for k, v in saved.items() if k not in names and not k.endswith("_ci95") and k != "bootstrap"}
        return cls(metrics={name: saved[name] for name in names},
                   ci95={name: saved[f"{name}_ci95"] for name in names}, **rest)


def evaluation_dir(parent: str | Path, split: str) -> str:
    """Where an evaluation of ``split`` goes by default: ``parent/eval_<split>`` (beside the checkpoint)."""
    return artifacts.join(parent, f"eval_{split}")


def actor_device() -> "torch.device":
    """The device of this Ray actor: the first GPU Ray assigned it (``ray.get_gpu_ids()``), numbered as torch
    sees it, i.e. its place in CUDA_VISIBLE_DEVICES (Ray sets that to the assigned GPUs: cuda:0), as
    ray.train.torch.get_device does for training workers; the CPU when it has none."""
    import os

    import ray
    import torch

    if not (ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available()):
        return torch.device("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    gpu = str(ray.get_gpu_ids()[0])
    return torch.device("cuda", visible.index(gpu) if gpu in visible else 0)


class _BatchScorer:
    """Ray Data callable class: a batch of users -> one row per user (user_index, topk, each metric, and the
    device that ranked them). The model is loaded once, onto the actor's GPU when it has one."""

    def __init__(self, checkpoint: str, ks: tuple[int, ...], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # faiss follows torch's thread count (model/sasrec.py::search_index)
        self.device = actor_device()
        self.checkpoint = load_checkpoint(checkpoint, map_location=self.device)
        self.ks = ks

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        histories = [np.asarray(h, dtype=np.int64) for h in batch["history"]]
        truth = [np.asarray(g, dtype=np.int64) for g in batch["ground_truth"]]
        topk = self.checkpoint.topk(histories, max(self.ks))  # int64 [B, K_max], -1 padded
        values = per_user_metrics(topk, truth, ks=self.ks)
        return {"user_index": np.asarray(batch["user_index"], dtype=np.int64), "topk": topk, **values,
                "device": np.full(len(histories), str(self.device))}


def eval_demand(settings: EvalSettings) -> capacity.Demand:
    """What an evaluation asks Ray for at the least: one scoring actor (the pool grows to ``concurrency``)."""
    return capacity.Demand(f"eval: cpus_per_actor {settings.cpus_per_actor:g}, use_gpu {str(settings.use_gpu).lower()}",
                           1, settings.cpus_per_actor, 1.0 if settings.use_gpu else 0.0)


def evaluate(checkpoint: str | Path, dataset_path: str | Path, split: str = "test",
             settings: EvalSettings | None = None, out: str | Path | None = None) -> EvalResult:
    """Metrics of a SEATER or SASRec checkpoint on a dataset split, at the dataset protocol's cut-offs.

    Writes the evaluation artifact (module docstring) to ``out``, default ``eval_<split>/`` beside the
    checkpoint; an existing evaluation there is replaced, any other directory is refused. Before any work
    starts: the checkpoint's and the dataset's files are verified, a checkpoint trained on another
    catalogue than the dataset's is refused, and ``out`` must be writable and held by no other writer.
    """
    settings = settings or EvalSettings()
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    capacity.require([eval_demand(settings)])
    t0 = time.time()
    dataset = load_dataset(dataset_path)
    manifest = verify_checkpoint(checkpoint)  # here, not first inside an actor
    check_same_catalogue(str(checkpoint), manifest, dataset.path, dataset.item_ids)
    if int(dataset.manifest["counts"].get(f"{split}_users", 1)) == 0:
        raise ValueError(f"{dataset.path}: the {split} split holds no users to evaluate")
    target = str(out) if out else evaluation_dir(artifacts.parent(checkpoint), split)
    with atomic_dir(target, ARTIFACT) as tmp:
        return _evaluate(str(checkpoint), manifest, dataset, split, settings, target, tmp, t0)


def _evaluate(checkpoint: str, manifest: dict[str, Any], dataset: Dataset, split: str, settings: EvalSettings,
              target: str, tmp: Path, t0: float) -> EvalResult:
    ks = metric_cutoffs(dataset.protocol)
    t_rank = time.time()
    rows = _rank(checkpoint, dataset, split, settings, ks)
    rank_seconds = time.time() - t_rank
    names = sorted(name for name in rows if "@" in name)
    values = np.stack([rows[name] for name in names], axis=1)  # float64 [U, M], users in user_index order
    bounds = stats.bootstrap_ci(values)
    result = EvalResult(
        metrics={name: math.fsum(values[:, i]) / len(values) for i, name in enumerate(names)},
        ci95={name: [float(lo), float(hi)] for name, (lo, hi) in zip(names, bounds)},
        users=len(values), seconds=0.0, rank_seconds=round(rank_seconds, 2), split=split, checkpoint=checkpoint,
        model=manifest["model"], out=target, devices=sorted(set(rows["device"].tolist())))
    table = _per_user_table(dataset, rows, names)
    pq.write_table(table, tmp / PER_USER_FILE)
    result.seconds = round(time.time() - t0, 2)
    (tmp / METRICS_FILE).write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    write_manifest(tmp, {
        "artifact": ARTIFACT, "schema_version": SCHEMA_VERSION, "model": manifest["model"],
        "checkpoint": checkpoint, "model_version": manifest["checksums"]["model.pt"][:12],
        "dataset": dataset.source or str(dataset.path), "protocol": dataset.protocol, "split": split,
        "ks": list(ks), "metrics": names, "users": result.users,
        "catalogue": manifest.get("catalogue") or catalogue_id(dataset.item_ids),
        "questions": _questions_id(dataset, split, table.column("user_id"), rows["user_index"]),
        "bootstrap": BOOTSTRAP,
    })
    return result


def _rank(checkpoint: str, dataset: Dataset, split: str, settings: EvalSettings,
          ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Every user of ``split`` ranked by the actor pool -> columns sorted by user_index (see _collect)."""
    from ray.data import ActorPoolStrategy

    ds = dataset.ray_dataset(split).select_columns(["user_index", "history", "ground_truth"])
    if settings.max_users:
        ds = ds.limit(settings.max_users)
    # Blocks of at most one batch: the users of a single large shard still spread over every actor.
    ds = ds.repartition(target_num_rows_per_block=settings.batch_size)
    scored = ds.map_batches(
        _BatchScorer,
        fn_constructor_kwargs={"checkpoint": artifacts.location(checkpoint), "ks": ks,
                               "threads": max(1, round(settings.cpus_per_actor))},
        batch_size=settings.batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=settings.concurrency, initial_size=settings.concurrency),
        num_cpus=settings.cpus_per_actor, num_gpus=1 if settings.use_gpu else 0,
    )
    # Blocks in input order: the same users form the same batches whatever the number of actors, so even a
    # model whose floating-point result depends on its batch ranks every user identically.
    scored.context.execution_options.preserve_order = True
    expected = int(dataset.manifest["counts"].get(f"{split}_users", 0))  # 0: not recorded
    if settings.max_users:
        expected = min(expected, settings.max_users) if expected else settings.max_users
    rows = _collect(scored, expected)
    if not len(rows.get("user_index", ())):
        raise ValueError(f"{dataset.path}: the {split} split holds no users to evaluate")
    return rows


def _collect(scored: Any, expected: int) -> dict[str, np.ndarray]:
    """The actors' rows, concatenated and sorted by user_index (each user exactly once); logs progress
    about every PROGRESS_SECONDS against ``expected`` users (0: unknown)."""
    parts: dict[str, list[np.ndarray]] = {}
    done, t0, last = 0, time.time(), time.time()
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        for name, column in batch.items():
            parts.setdefault(name, []).append(np.asarray(column))
        done += len(batch["user_index"])
        if time.time() - last >= PROGRESS_SECONDS:
            last = time.time()
            of = f" of {expected:,}" if expected else ""
            log.info("evaluate: %s%s users ranked (%.0f users/s)", f"{done:,}", of, done / (last - t0))
    rows = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    if not rows:
        return rows
    order = np.argsort(rows["user_index"], kind="stable")
    rows = {name: column[order] for name, column in rows.items()}
    repeated = np.flatnonzero(np.diff(rows["user_index"]) == 0)
    if repeated.size:
        raise ValueError(f"user_index {int(rows['user_index'][repeated[0]])} was ranked twice (a bug upstream)")
    return rows


def _per_user_table(dataset: Dataset, rows: dict[str, np.ndarray], names: list[str]) -> pa.Table:
    """per_user.parquet: user_index, user_id (raw), items (the top-K raw item ids, best first), each metric."""
    users = dataset.users()
    where = pc.index_in(pa.array(rows["user_index"]), users.column("user_index"))
    if where.null_count:
        raise ValueError(f"{dataset.path}: users.parquet lacks users of the split (re-create the dataset)")
    topk = rows["topk"]
    ranked = topk >= 0
    items = pa.array(dataset.item_ids, pa.string()).take(pa.array(topk[ranked]))
    offsets = pa.array(np.concatenate([[0], np.cumsum(ranked.sum(1))]).astype(np.int32))
    return pa.table({
        "user_index": pa.array(rows["user_index"], pa.int64()),
        "user_id": users.column("user_id").take(where).cast(pa.string()),
        "items": pa.ListArray.from_arrays(offsets, items),
        **{name: pa.array(rows[name], pa.float64()) for name in names},
    })


def _questions_id(dataset: Dataset, split: str, user_ids: pa.ChunkedArray, user_index: np.ndarray) -> str:
    """sha256 of what the evaluated users were asked: each user's raw id, history and ground truth (item
    indices), in raw-id order. Two evaluations with the same id ranked for the same users the same histories
    against the same ground truth (with the same catalogue, compared apart)."""
    table = dataset.table(split)
    table = table.take(pc.index_in(pa.array(user_index), table.column("user_index")))
    order = pc.sort_indices(user_ids)
    digest = hashlib.sha256()
    for value in user_ids.take(order).to_pylist():
        digest.update(value.encode() + b"\n")
    for name in ("history", "ground_truth"):
        lists = table.column(name).take(order).combine_chunks()
        digest.update(pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        digest.update(pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ reading


@dataclass
class Evaluation:
    """An evaluation artifact as read back: its manifest, metrics.json and per-user table."""

    path: str
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    per_user: pa.Table


def read_evaluation(path: str | Path) -> Evaluation:
    """Read and verify an evaluation directory (a path or a URI); ArtifactError naming the file otherwise."""
    local = artifacts.local_copy(path)
    manifest = read_manifest(local, ARTIFACT, SCHEMA_VERSION)
    verify_files(local, manifest, [METRICS_FILE, PER_USER_FILE])
    try:
        metrics = json.loads((local / METRICS_FILE).read_text())
    except ValueError as err:
        raise ArtifactError(f"{Path(local) / METRICS_FILE}: not valid JSON ({err})") from None
    return Evaluation(str(path), manifest, metrics, pq.read_table(local / PER_USER_FILE))


def finished_evaluation(checkpoint: str | Path, dataset_path: str | Path, split: str,
                        out: str | Path) -> EvalResult | None:
    """The evaluation at ``out`` as :func:`evaluate` returned it, when it is whole (every file verified) and
    ranked these very weights (``model.pt``'s checksum) on this dataset's ``split``; else None. What
    ``seater run --resume`` keeps instead of ranking every user again."""
    if not artifacts.exists(artifacts.join(out, "manifest.json")):
        return None
    try:
        done = read_evaluation(out)
        weights = read_checkpoint_manifest(checkpoint)["checksums"]["model.pt"][:12]  # identity, not a re-hash
        dataset = load_dataset(dataset_path)
    except (ArtifactError, ValueError):  # a damaged or foreign artifact is evaluated again
        return None
    same = (done.manifest.get("model_version") == weights and done.manifest.get("split") == split
            and done.manifest.get("dataset") == (dataset.source or str(dataset.path))
            and done.manifest.get("users") == int(dataset.manifest["counts"].get(f"{split}_users", -1)))
    if not same:
        return None
    return EvalResult.from_dict(done.metrics, done.manifest["metrics"])
