"""Driver side of training: Ray Data ingest + Ray Train TorchTrainer, for SEATER and SASRec.

    from seater_dist.train.trainer import train_seater, train_sasrec
    result = train_seater("runs/b/dataset", "runs/b/tree", "runs/b/seater", TrainSettings(workers=2))
    result.best_checkpoint   # runs/b/seater/best: self-contained (weights, settings, tree, items)

Output directory layout (``out``):
    best/           the best epoch's checkpoint by validation ``select_metric``
    history.json    one record per epoch (train losses, validation metrics, seconds, bytes per step)
    ray_results/    Ray Train's run (all reported checkpoints; resumable with resume=True)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seater_dist.artifacts import replace_dir
from seater_dist.config import SasrecSettings, SeaterSettings, TrainSettings
from seater_dist.train.loop import train_loop_per_worker


@dataclass
class TrainResult:
    best_checkpoint: Path
    history: list[dict[str, Any]]
    best_epoch: int
    best_metrics: dict[str, float]
    seconds: float


def train_seater(dataset_path: str | Path, tree_path: str | Path, out: str | Path,
                 train: TrainSettings | None = None, model: SeaterSettings | None = None,
                 ks: tuple[int, ...] = (20, 50), resume: bool = False,
                 inject_fault: dict[str, Any] | None = None) -> TrainResult:
    """Train SEATER with Ray Train on a prepared dataset and a built tree (see module docstring)."""
    model = model or SeaterSettings()
    config = {"task": "seater", "tree_path": str(Path(tree_path).resolve()),
              "model_settings": model.model_dump(mode="json")}
    return _fit(config, dataset_path, out, train or TrainSettings(), ks, resume, inject_fault)


def train_sasrec(dataset_path: str | Path, out: str | Path, train: TrainSettings | None = None,
                 model: SasrecSettings | None = None, ks: tuple[int, ...] = (20, 50), resume: bool = False,
                 inject_fault: dict[str, Any] | None = None) -> TrainResult:
    """Train SASRec with Ray Train; writes ``out/item_embeddings.npy`` (the tree's input) from the best epoch."""
    from seater_dist.data.dataset import load_dataset

    model = model or SasrecSettings()
    config = {"task": "sasrec", "num_items": load_dataset(dataset_path).num_items,
              "model_settings": model.model_dump(mode="json")}
    result = _fit(config, dataset_path, out, train or TrainSettings(), ks, resume, inject_fault)
    shutil.copyfile(result.best_checkpoint / "item_embeddings.npy", Path(out) / "item_embeddings.npy")
    return result


def _train_dataset(dataset_path: str | Path, batch_fn, seed: int):
    """Stored sequences -> streaming training samples (expanded per block, never materialised whole)."""
    from seater_dist.data.dataset import load_dataset

    ds = load_dataset(dataset_path).ray_dataset("train")
    return ds.randomize_block_order(seed=seed).map_batches(batch_fn, batch_format="pyarrow", batch_size=1024)


def _fit(config: dict[str, Any], dataset_path: str | Path, out: str | Path, settings: TrainSettings,
         ks: tuple[int, ...], resume: bool, inject_fault: dict[str, Any] | None) -> TrainResult:
    import os

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from seater_dist.train.loop import make_task

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = settings.storage_path or str(out / "ray_results")
    name = config["task"]
    run_dir = Path(storage) / name
    if not resume and "://" not in storage and run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run must not silently continue an old one
    config = {**config, "dataset_path": str(Path(dataset_path).resolve()), "train_settings": settings.model_dump(mode="json"),
              "ks": list(ks), "inject_fault": inject_fault,
              "threads_per_worker": max(1, round(settings.cpus_per_worker))}
    task = make_task(config)
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})}
    metric = f"valid_{settings.select_metric}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                               checkpoint_score_order="max"),
            logging_config=LoggingConfig(log_level="INFO" if os.environ.get("SEATER_VERBOSE") else "WARNING"),
            # Worker prints (one progress line per epoch) go straight to stdout, once.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets={"train": _train_dataset(dataset_path, task.batch_fn(), settings.seed)},
    )
    t0 = time.time()
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{name} training failed: {result.error}")
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][metric])
    best = out / "best"
    _copy_atomically(best_ckpt, best)
    with result.checkpoint.as_directory() as latest:
        history = json.loads((Path(latest) / "history.json").read_text())
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return TrainResult(best, history, int(best_metrics["best_epoch"]), best_metrics, time.time() - t0)


def _copy_atomically(checkpoint, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with checkpoint.as_directory() as src:
        shutil.copytree(src, tmp)
    replace_dir(tmp, dest)
