"""Offline evaluation at cluster scale: Ray Data batch inference over the valid/test users.

Each Ray Data actor loads the checkpoint once, ranks a batch of users and returns only the batch's metric
sums (one small row per batch), so the driver never holds per-user results.

    metrics = evaluate("runs/b/seater/best", "runs/b/dataset", split="test")
    metrics["recall@50"]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from seater_dist.config import EvalSettings


class _BatchScorer:
    """Ray Data callable class: a batch of users -> one row of metric sums."""

    def __init__(self, checkpoint: str, ks: tuple[int, ...], threads: int) -> None:
        from seater_dist.eval.ranking import Ranker

        self.ranker = Ranker.from_checkpoint(checkpoint, threads=threads)
        self.ks = ks

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        from seater_dist.eval.metrics import metric_sums

        histories = [np.asarray(h, dtype=np.int64) for h in batch["history"]]
        truth = [np.asarray(g, dtype=np.int64) for g in batch["ground_truth"]]
        sums = metric_sums(self.ranker.topk(histories, max(self.ks)), truth, ks=self.ks)
        return {key: np.array([value], dtype=np.float64) for key, value in sums.items()}


def evaluate(checkpoint: str | Path, dataset_path: str | Path, split: str = "test",
             settings: EvalSettings | None = None, out: str | Path | None = None,
             concurrency: int = 2, cpus_per_actor: float = 0.5) -> dict[str, float]:
    """Metrics of a SEATER or SASRec checkpoint on a dataset split; writes ``metrics.json`` to ``out``
    (default: beside the checkpoint). Keys: ``recall@K``, ``hr@K``, ``ndcg@K``, ``users``, ``seconds``."""
    from ray.data import ActorPoolStrategy

    from seater_dist.data.dataset import load_dataset
    from seater_dist.eval.metrics import finalize

    settings = settings or EvalSettings()
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    t0 = time.time()
    ds = load_dataset(dataset_path).ray_dataset(split).select_columns(["history", "ground_truth"])
    if settings.max_users:
        ds = ds.limit(settings.max_users)
    sums_ds = ds.map_batches(
        _BatchScorer,
        fn_constructor_kwargs={"checkpoint": str(Path(checkpoint).resolve()), "ks": tuple(settings.ks),
                               "threads": max(1, round(cpus_per_actor))},
        batch_size=settings.batch_size, batch_format="numpy", compute=ActorPoolStrategy(min_size=1, max_size=concurrency),
        num_cpus=cpus_per_actor,
    )
    totals: dict[str, float] = {}
    for row in sums_ds.iter_rows():
        for key, value in row.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    metrics = {**finalize(totals), "users": int(totals.get("users", 0)), "seconds": round(time.time() - t0, 2),
               "split": split, "checkpoint": str(checkpoint)}
    target = Path(out) if out else Path(checkpoint).parent
    target.mkdir(parents=True, exist_ok=True)
    (target / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
