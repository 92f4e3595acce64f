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

from seater_dist.artifacts import atomic_dir
from seater_dist.config import SasrecSettings, SeaterSettings, SettingsError, TrainSettings, metric_cutoffs, metric_k
from seater_dist.data.dataset import load_dataset
from seater_dist.model.checkpoint import CheckpointError, read_checkpoint_manifest
from seater_dist.train.loop import train_loop_per_worker


@dataclass
class TrainResult:
    """A finished run: its best checkpoint (``out/best``), every epoch's record, the best epoch's metrics."""

    best_checkpoint: Path
    history: list[dict[str, Any]]
    best_epoch: int
    best_metrics: dict[str, float]
    seconds: float

    @classmethod
    def load(cls, out: str | Path) -> "TrainResult | None":
        """The result of a run that finished under ``out`` (best/ and history.json written), else None."""
        out = Path(out)
        try:
            manifest = read_checkpoint_manifest(out / "best")
            history = json.loads((out / "history.json").read_text())
        except (CheckpointError, OSError, ValueError):
            return None
        metrics = manifest.get("extra", {}).get("metrics", {})
        return cls(out / "best", history, int(metrics.get("best_epoch", -1)), metrics, 0.0)


def train_seater(dataset_path: str | Path, tree_path: str | Path, out: str | Path,
                 train: TrainSettings | None = None, model: SeaterSettings | None = None,
                 resume: bool = False, inject_fault: dict[str, Any] | None = None,
                 embeddings: str | Path | None = None) -> TrainResult:
    """Train SEATER with Ray Train on a prepared dataset and a built tree (see module docstring).

    Validation reports the dataset protocol's metrics; ``resume`` continues the run under ``out``;
    ``embeddings`` (the .npy the tree was built from) is needed by ``token_init: embeddings``.
    """
    model = model or SeaterSettings()
    config = {"task": "seater", "tree_path": str(Path(tree_path).resolve()),
              "model_settings": model.model_dump(mode="json")}
    if model.token_init == "embeddings":
        config["embeddings_path"] = _checked_embeddings(embeddings, tree_path)
    return _fit(config, dataset_path, out, train or TrainSettings(), resume, inject_fault)


def _checked_embeddings(embeddings: str | Path | None, tree_path: str | Path) -> str:
    """The embeddings file for ``token_init: embeddings``, checked to be the one the tree was built from."""
    import numpy as np

    from seater_dist.tree.builder import embeddings_sha256
    from seater_dist.tree.item_tree import ItemTree

    if embeddings is None:
        raise SettingsError("seater.token_init: 'embeddings' needs the item embeddings the tree was built from "
                            "(seater train --embeddings FILE.npy)")
    want = ItemTree.load(tree_path, validate=False).manifest.get("embeddings_sha256")
    got = embeddings_sha256(np.ascontiguousarray(np.load(embeddings, allow_pickle=False), dtype=np.float32))
    if want != got:
        raise SettingsError(f"{embeddings}: not the embeddings the tree {tree_path} was built from "
                            f"(sha256 {got[:12]}, the tree's manifest says {str(want)[:12]})")
    return str(Path(embeddings).resolve())


def train_sasrec(dataset_path: str | Path, out: str | Path, train: TrainSettings | None = None,
                 model: SasrecSettings | None = None, resume: bool = False,
                 inject_fault: dict[str, Any] | None = None) -> TrainResult:
    """Train SASRec with Ray Train; writes ``out/item_embeddings.npy`` (the tree's input) from the best epoch."""
    model = model or SasrecSettings()
    config = {"task": "sasrec", "num_items": load_dataset(dataset_path).num_items,
              "model_settings": model.model_dump(mode="json")}
    result = _fit(config, dataset_path, out, train or TrainSettings(), resume, inject_fault)
    shutil.copyfile(result.best_checkpoint / "item_embeddings.npy", Path(out) / "item_embeddings.npy")
    return result


def _storage(out: Path, settings: TrainSettings) -> str:
    return settings.storage_path or str(Path(out).resolve() / "ray_results")


def resumable(out: str | Path, settings: TrainSettings, task: str) -> bool:
    """Whether an earlier run of ``task`` ("seater" or "sasrec") exists in this run's Ray Train storage."""
    import pyarrow.fs as pafs

    storage = _storage(Path(out), settings)
    fs, root = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
    return fs.get_file_info(f"{root.rstrip('/')}/{task}").type == pafs.FileType.Directory


def train_dataset(dataset_path: str | Path, batch_fn, seed: int):
    """Stored sequences -> streaming training samples (expanded per block, never materialised whole)."""
    from ray.data import RandomSeedConfig

    # A fresh global shuffle of the users every epoch (each epoch re-executes the plan with the next
    # seed of the sequence started by ``seed``); the workers' local buffers then mix their samples.
    ds = load_dataset(dataset_path).ray_dataset("train")
    shuffled = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return shuffled.map_batches(batch_fn, batch_format="pyarrow", batch_size=1024)


def _fit(config: dict[str, Any], dataset_path: str | Path, out: str | Path, settings: TrainSettings,
         resume: bool, inject_fault: dict[str, Any] | None) -> TrainResult:
    import os

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from seater_dist.train.loop import make_task

    ks = metric_cutoffs(load_dataset(dataset_path).protocol)
    if metric_k(settings.select_metric) not in ks:
        raise SettingsError(f"select_metric: {settings.select_metric} is not reported by this dataset's protocol "
                            f"(cut-offs {', '.join(map(str, ks))})")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = _storage(out, settings)
    name = config["task"]
    run_dir = Path(storage) / name
    if resume and not resumable(out, settings, name):
        raise FileNotFoundError(f"{storage}/{name}: nothing to resume (no earlier run); drop --resume to start one")
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
        datasets={"train": train_dataset(dataset_path, task.batch_fn(), settings.seed)},
    )
    t0 = time.time()
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{name} training failed: {result.error}")
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][metric])
    best = out / "best"
    with best_ckpt.as_directory() as src, atomic_dir(best, "checkpoint") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    with result.checkpoint.as_directory() as latest:
        history = json.loads((Path(latest) / "history.json").read_text())
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return TrainResult(best, history, int(best_metrics["best_epoch"]), best_metrics, time.time() - t0)

