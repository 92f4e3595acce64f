"""Driver side of training: Ray Data ingest + Ray Train TorchTrainer, for SEATER and SASRec.

    from seater_dist.train.trainer import train_seater, train_sasrec
    result = train_seater("runs/b/dataset", "runs/b/tree", "runs/b/seater", TrainSettings(workers=2))
    result.best_checkpoint   # runs/b/seater/best: self-contained (weights, settings, tree, items)

Output directory layout (``out``):
    best/           the best epoch's checkpoint by validation ``select_metric``
    history.json    one record per epoch (train losses, validation metrics, seconds, bytes per step)
    ray_results/    Ray Train's run (all reported checkpoints; resumable with resume=True)

``out``, the dataset, the tree and the embeddings may be URIs (``s3://...``, see :mod:`seater_dist.artifacts`):
the workers then copy their inputs from there on whichever node they run, Ray Train keeps its run in
``out/ray_results`` (or ``storage_path``) itself, and best/ (manifest last), item_embeddings.npy and,
last, history.json are published to ``out`` when training ends. history.json marks a finished run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from seater_dist.artifacts import (
    MANIFEST,
    ArtifactError,
    atomic_dir,
    check_replaceable,
    exists,
    is_remote,
    join,
    local_copy,
    location,
    output_lock,
    path_or_uri,
    publish,
    read_bytes,
    resolve,
    write_bytes,
)
from seater_dist.config import SasrecSettings, SeaterSettings, SettingsError, TrainSettings, metric_cutoffs, metric_k
from seater_dist.data.dataset import load_dataset
from seater_dist.files import load_npy
from seater_dist.model.checkpoint import CheckpointError, read_checkpoint_manifest
from seater_dist.runtime import capacity
from seater_dist.runtime.quiet import verbose
from seater_dist.runtime.rendezvous import bound_torch_config
from seater_dist.runtime.train_fit import ctrl_c_as_keyboard_interrupt, input_errors_fail_fast
from seater_dist.train.loop import KILL_WORKER_ENV, train_loop_per_worker
from seater_dist.train.tasks import WorkerSpec, make_task


@dataclass
class TrainResult:
    """A finished run: its best checkpoint (``out/best``), every epoch's record, the best epoch's metrics."""

    best_checkpoint: Path | str  # a URI when the run's ``out`` is one
    history: list[dict[str, Any]]
    best_epoch: int
    best_metrics: dict[str, float]
    seconds: float

    @classmethod
    def load(cls, out: str | Path) -> "TrainResult | None":
        """The result of a run that finished under ``out`` (best/ and history.json written), else None."""
        best = join(out, "best")
        try:
            history = json.loads(read_bytes(join(out, "history.json")))
            manifest = read_checkpoint_manifest(best)
        except (CheckpointError, OSError, ValueError):
            return None
        metrics = manifest.get("extra", {}).get("metrics", {})
        return cls(path_or_uri(best), history, int(metrics.get("best_epoch", -1)), metrics, 0.0)


def train_seater(dataset_path: str | Path, tree_path: str | Path, out: str | Path,
                 train: TrainSettings | None = None, model: SeaterSettings | None = None,
                 resume: bool = False, embeddings: str | Path | None = None) -> TrainResult:
    """Train SEATER with Ray Train on a prepared dataset and a built tree (see module docstring).

    Validation reports the dataset protocol's metrics; ``resume`` continues the run under ``out``;
    ``embeddings`` (the .npy the tree was built from; default: the file the tree's manifest records) is read
    by ``token_init: embeddings``, the default.
    """
    # inputs as the workers get them: a URI as is (each worker copies it on its node), a path made absolute
    spec = WorkerSpec(task="seater", seater=model or SeaterSettings(), tree_path=location(tree_path),
                      embeddings_path=None if embeddings is None else location(embeddings))
    return _fit(spec, dataset_path, out, train or TrainSettings(), resume)


def _checked_embeddings(embeddings: str | Path | None, tree: dict[str, Any], tree_path: str | Path) -> str:
    """The embeddings file for ``token_init: embeddings`` (given, else the one ``tree``, the tree's manifest,
    records), checked to be the one the tree was built from."""
    import numpy as np

    from seater_dist.tree.builder import embeddings_sha256

    path = embeddings if embeddings is not None else tree.get("embeddings")
    if path is None or not exists(path):
        where = ("" if path is None else f" ({path} does not exist)" if embeddings is not None
                 else f" (the tree records {path}, which is gone)")
        raise SettingsError(f"seater.token_init: 'embeddings' (the default) needs the item embeddings the tree "
                            f"was built from{where}: pass seater train --embeddings FILE.npy, or set "
                            "`seater: {token_init: random}` to start from a random table")
    want = tree.get("embeddings_sha256")
    table = load_npy(local_copy(path), SettingsError, "a .npy array of item embeddings [N, d]", mmap=True)
    got = embeddings_sha256(np.ascontiguousarray(table, dtype=np.float32))
    if want != got:
        raise SettingsError(f"{path}: not the embeddings the tree {tree_path} was built from "
                            f"(sha256 {got[:12]}, the tree's manifest says {str(want)[:12]})")
    return location(path)


def train_sasrec(dataset_path: str | Path, out: str | Path, train: TrainSettings | None = None,
                 model: SasrecSettings | None = None, resume: bool = False) -> TrainResult:
    """Train SASRec with Ray Train; writes ``out/item_embeddings.npy`` (the tree's input) from the best epoch."""
    spec = WorkerSpec(task="sasrec", sasrec=model or SasrecSettings(), num_items=load_dataset(dataset_path).num_items)
    return _fit(spec, dataset_path, out, train or TrainSettings(), resume)


def _storage(out: str | Path, settings: TrainSettings) -> str:
    return settings.storage_path or join(location(out), "ray_results")


def resumable(out: str | Path, settings: TrainSettings, task: str) -> bool:
    """Whether an earlier run of ``task`` ("seater" or "sasrec") exists in this run's Ray Train storage."""
    fs, root = resolve(_storage(out, settings))
    return fs.get_file_info(f"{root.rstrip('/')}/{task}").type == pafs.FileType.Directory


def train_dataset(dataset_path: str | Path, batch_fn, seed: int):
    """Stored sequences -> streaming training samples (expanded per block, never materialised whole)."""
    from ray.data import RandomSeedConfig

    # A fresh global shuffle of the users every epoch (each epoch re-executes the plan with the next
    # seed of the sequence started by ``seed``); the workers' local buffers then mix their samples.
    ds = load_dataset(dataset_path).ray_dataset("train")
    shuffled = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return shuffled.map_batches(batch_fn, batch_format="pyarrow", batch_size=1024)


def train_demand(section: str, settings: TrainSettings) -> capacity.Demand:
    """What a training run asks Ray for: one bundle per worker (``section``: the settings' name in a config)."""
    return capacity.Demand(f"{section}: workers {settings.workers}, cpus_per_worker {settings.cpus_per_worker:g}, "
                           f"use_gpu {str(settings.use_gpu).lower()}", settings.workers, settings.cpus_per_worker,
                           1.0 if settings.use_gpu else 0.0)


def _fit(spec: WorkerSpec, dataset_path: str | Path, out: str | Path, settings: TrainSettings,
         resume: bool) -> TrainResult:
    """Check every input against the others, hold ``out``'s output lock, train, write best/ and history.json.

    Before any worker starts: the dataset's files are verified; the tree (SEATER) and, on resume, the
    checkpoint to resume from are checked against the dataset's catalogue; ``out`` must not be another
    artifact, be writable and have no other writer. A worker's input error (a ValueError: DataError,
    TreeError, ...) is not retried by the failure policy; a worker that dies is (``max_failures``).
    """
    dataset = load_dataset(dataset_path)
    ks = metric_cutoffs(dataset.protocol)
    if metric_k(settings.select_metric) not in ks:
        raise SettingsError(f"select_metric: {settings.select_metric} is not reported by this dataset's protocol "
                            f"(cut-offs {', '.join(map(str, ks))})")
    capacity.require([train_demand("train" if spec.task == "seater" else "sasrec_train", settings)])
    out = location(out)
    _check_train_out(out)
    if is_remote(out):  # trained into a local staging directory, then published
        return _fit_remote(spec, dataset, out, settings, ks, resume)
    with output_lock(out, inside=True):
        return _fit_locked(spec, dataset, Path(out), settings, ks, resume)


def _fit_remote(spec: WorkerSpec, dataset: Any, out: str, settings: TrainSettings, ks: tuple[int, ...],
                resume: bool) -> TrainResult:
    """Train into a local staging directory with Ray Train's run kept at ``out/ray_results``, then publish
    best/, item_embeddings.npy and, last, history.json (an earlier history.json is removed first, so an
    interrupted run is never taken for a finished one)."""
    fs, root = resolve(out)
    if fs.get_file_info(f"{root}/history.json").type == pafs.FileType.File:
        fs.delete_file(f"{root}/history.json")
    settings = settings.model_copy(update={"storage_path": _storage(out, settings)})
    staging = Path(tempfile.mkdtemp(prefix="seater-train-"))
    try:
        result = _fit_locked(spec, dataset, staging, settings, ks, resume)
        publish(staging / "best", join(out, "best"))
        if (staging / "item_embeddings.npy").is_file():
            publish(staging / "item_embeddings.npy", join(out, "item_embeddings.npy"))
        write_bytes(join(out, "history.json"), (staging / "history.json").read_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.best_checkpoint = join(out, "best")
    return result


def _check_train_out(out: str) -> None:
    """``out`` (a path or URI) collects best/, history.json and ray_results/: refuse an artifact directory (a
    dataset, a tree, a checkpoint) there, and a best/ that is not a checkpoint, before training rather than after."""
    if exists(join(out, MANIFEST)):
        raise ArtifactError(f"{out}: is an artifact directory ({MANIFEST} inside), not a training output; "
                            "choose another --out")
    check_replaceable(join(out, "best"), "checkpoint")


def _check_inputs(spec: WorkerSpec, dataset: Any, run_dir: Path | None, resume: bool) -> WorkerSpec:
    """The tree (SEATER) and the checkpoint a resumed run continues from (in ``run_dir``, Ray Train's run when
    it is on this machine's disk) must fit the dataset's catalogue.
    -> ``spec``, whose ``embeddings_path`` is, for ``token_init: embeddings``, the checked file the tree was
    built from."""
    from seater_dist.artifacts import read_manifest, verify_files
    from seater_dist.model.checkpoint import check_same_catalogue
    from seater_dist.tree.item_tree import SCHEMA_VERSION as TREE_SCHEMA_VERSION
    from seater_dist.tree.item_tree import TreeError

    tree = None
    if spec.task == "seater":
        tree_path = local_copy(spec.tree_path, TreeError)
        tree = read_manifest(tree_path, "tree", TREE_SCHEMA_VERSION, TreeError)
        verify_files(tree_path, tree, error=TreeError)
        check_same_catalogue(tree_path, tree, dataset.path, dataset.item_ids, error=TreeError)
        if spec.seater.token_init == "embeddings":  # resolved here, after the tree's own checks
            checked = _checked_embeddings(spec.embeddings_path, tree, spec.tree_path)
            spec = spec.model_copy(update={"embeddings_path": checked})
    if not resume or run_dir is None or not run_dir.is_dir():
        return spec
    saved = sorted(run_dir.glob(f"*/{MANIFEST}"))
    if not saved:
        return spec
    last = saved[-1].parent
    check_same_catalogue(last, read_checkpoint_manifest(last), dataset.path, dataset.item_ids)
    if tree is not None:
        theirs = read_manifest(last / "tree", "tree", TREE_SCHEMA_VERSION,
                               CheckpointError)["checksums"].get("codes.npy")
        if theirs != tree["checksums"].get("codes.npy"):
            raise CheckpointError(f"{last}: the run to resume was trained with another tree than {spec.tree_path} "
                                  f"(item paths {str(theirs)[:12]} vs {str(tree['checksums'].get('codes.npy'))[:12]}); "
                                  "resume with the tree it was trained with, or drop --resume to start again")
    return spec


def _fit_locked(spec: WorkerSpec, dataset: Any, out: Path, settings: TrainSettings, ks: tuple[int, ...],
                resume: bool) -> TrainResult:
    storage = _storage(out, settings)
    name = spec.task
    run = join(storage, name)
    if resume and not resumable(out, settings, name):
        raise FileNotFoundError(f"{run}: nothing to resume (no earlier run); drop --resume to start one")
    local_run = None if is_remote(run) else Path(run)  # Ray Train's run on this machine: checked, held, replaced
    spec = _check_inputs(spec, dataset, local_run, resume)
    with contextlib.ExitStack() as held:
        if local_run is not None and out not in local_run.parents:  # storage of its own: hold it too
            held.enter_context(output_lock(local_run))
        if not resume and local_run is not None and local_run.exists():
            _check_is_a_train_run(local_run)
            shutil.rmtree(local_run)  # a fresh run must not silently continue an old one
        return _run_trainer(spec, dataset, out, settings, ks, storage, name)


def _check_is_a_train_run(run_dir: Path) -> None:
    """A fresh run replaces an earlier run's Ray Train directory, never a directory Ray Train did not write."""
    if (not (run_dir / "checkpoint_manager_snapshot.json").exists()
            and not (run_dir / ".validate_storage_marker").exists()):
        raise ArtifactError(f"{run_dir}: exists and is not a Ray Train run directory; refusing to replace it "
                            "(choose another train.storage_path or --out)")


def _run_trainer(spec: WorkerSpec, dataset: Any, out: Path, settings: TrainSettings, ks: tuple[int, ...],
                 storage: str, name: str) -> TrainResult:

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    dataset_path = location(dataset.source)
    spec = spec.model_copy(update={"dataset_path": dataset_path, "train": settings, "ks": tuple(ks),
                                   "threads_per_worker": max(1, round(settings.cpus_per_worker)),
                                   "verbose": verbose()})
    task = make_task(spec)
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})}
    metric = f"valid_{settings.select_metric}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=resources),
        torch_config=bound_torch_config(),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                               checkpoint_score_order="max"),
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            # Worker prints (one progress line per epoch) go straight to stdout, once.
            # (and a test's fault injection, from the driver's environment, seater_dist.train.loop.KILL_WORKER_ENV)
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                             **{k: v for k, v in os.environ.items() if k == KILL_WORKER_ENV}}},
        ),
        datasets={"train": train_dataset(dataset_path, task.batch_fn(), settings.seed)},
    )
    t0 = time.time()
    with input_errors_fail_fast(), ctrl_c_as_keyboard_interrupt():
        result = trainer.fit()
    if result.error:
        raise RuntimeError(f"{name} training failed: {result.error}")
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][metric])
    best = out / "best"
    with best_ckpt.as_directory() as src, atomic_dir(best, "checkpoint") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    with result.checkpoint.as_directory() as latest:
        history = json.loads((Path(latest) / "history.json").read_text())
    _write_atomically(out / "history.json", json.dumps(history, indent=2).encode())
    if name == "sasrec":  # the tree's input, from the best epoch
        _write_atomically(out / "item_embeddings.npy", (best / "item_embeddings.npy").read_bytes())
    return TrainResult(best, history, int(best_metrics["best_epoch"]), best_metrics, time.time() - t0)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
