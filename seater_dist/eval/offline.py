"""Offline evaluation at cluster scale: Ray Data batch inference over the valid/test users.

Each actor of a Ray Data actor pool loads the checkpoint once, ranks a batch of users with the model's
``topk`` (beam search for SEATER, exact inner-product search for SASRec) and returns only the batch's
metric sums (one small row per batch), so the driver never holds per-user results.

    result = evaluate("runs/b/seater/best", "runs/b/dataset", split="test")
    result.metrics["recall@50"], result.users
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seater_dist.artifacts import output_lock
from seater_dist.config import EvalSettings, metric_cutoffs
from seater_dist.data.dataset import load_dataset
from seater_dist.eval.metrics import finalize, metric_sums
from seater_dist.model.checkpoint import check_same_catalogue, load_checkpoint, verify_checkpoint

SPLITS = ("valid", "test")


@dataclass
class EvalResult:
    """Means over users of every metric (``recall@K``, ``hr@K``, ``ndcg@K``), and what was evaluated."""

    metrics: dict[str, float]
    users: int
    seconds: float
    split: str
    checkpoint: str
    model: str

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.json`` layout: metric names at the top level, then the rest."""
        out = asdict(self)
        return {**out.pop("metrics"), **out}


class _BatchScorer:
    """Ray Data callable class: a batch of users -> one row of metric sums."""

    def __init__(self, checkpoint: str, ks: tuple[int, ...], threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.checkpoint = load_checkpoint(checkpoint)
        self.ks = ks

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        histories = [np.asarray(h, dtype=np.int64) for h in batch["history"]]
        truth = [np.asarray(g, dtype=np.int64) for g in batch["ground_truth"]]
        sums = metric_sums(self.checkpoint.topk(histories, max(self.ks)), truth, ks=self.ks)
        return {key: np.array([value], dtype=np.float64) for key, value in sums.items()}


def evaluate(checkpoint: str | Path, dataset_path: str | Path, split: str = "test",
             settings: EvalSettings | None = None, out: str | Path | None = None) -> EvalResult:
    """Metrics of a SEATER or SASRec checkpoint on a dataset split, at the dataset protocol's cut-offs.

    Writes ``metrics.json`` to ``out`` (default: beside the checkpoint). Before any work starts: the
    checkpoint's and the dataset's files are verified, a checkpoint trained on another catalogue than the
    dataset's is refused, and ``out`` must be writable and held by no other writer (its output lock).
    """
    settings = settings or EvalSettings()
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    t0 = time.time()
    dataset = load_dataset(dataset_path)
    manifest = verify_checkpoint(checkpoint)  # here, not first inside an actor
    check_same_catalogue(Path(checkpoint), manifest, dataset.path, dataset.item_ids)
    if int(dataset.manifest["counts"].get(f"{split}_users", 1)) == 0:
        raise ValueError(f"{dataset.path}: the {split} split holds no users to evaluate")
    target = Path(out) if out else Path(checkpoint).parent
    with output_lock(target, inside=True):
        return _evaluate(checkpoint, manifest, dataset, split, settings, target, t0)


def _evaluate(checkpoint: str | Path, manifest: dict[str, Any], dataset: Any, split: str, settings: EvalSettings,
              target: Path, t0: float) -> EvalResult:
    from ray.data import ActorPoolStrategy

    ks = metric_cutoffs(dataset.protocol)
    ds = dataset.ray_dataset(split).select_columns(["history", "ground_truth"])
    if settings.max_users:
        ds = ds.limit(settings.max_users)
    sums_ds = ds.map_batches(
        _BatchScorer,
        fn_constructor_kwargs={"checkpoint": str(Path(checkpoint).resolve()), "ks": ks,
                               "threads": max(1, round(settings.cpus_per_actor))},
        batch_size=settings.batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=settings.concurrency),
        num_cpus=settings.cpus_per_actor, num_gpus=1 if settings.use_gpu else 0,
    )
    totals: dict[str, float] = {}
    for row in sums_ds.iter_rows():
        for key, value in row.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    if not totals.get("users"):
        raise ValueError(f"{dataset.path}: the {split} split holds no users to evaluate")
    result = EvalResult(finalize(totals), int(totals.get("users", 0)), round(time.time() - t0, 2), split,
                        str(checkpoint), manifest["model"])
    tmp = target / f".metrics.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    os.replace(tmp, target / "metrics.json")
    return result
