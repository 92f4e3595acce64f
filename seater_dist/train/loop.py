"""The Ray Train worker loop shared by SEATER and SASRec.

Per epoch: stream this worker's shard of (history, target) batches, DDP step (dense parameters by
DDP's all-reduce, the big table by a row-sparse all-gather: sparse_table.py), then validate on this
worker's slice of the validation users, all-reduce the metric sums, keep the best by the chosen metric,
stop early after ``patience`` epochs without improvement, and report a self-contained checkpoint
(weights, settings, tree, item table + the optimiser/early-stopping state needed to resume).
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from seater_dist.files import load_tensors
from seater_dist.model.checkpoint import CheckpointError
from seater_dist.runtime.train_fit import quiet_train_worker
from seater_dist.train.sparse_table import SparseTableDDP
from seater_dist.train.tasks import LossModule, Task, WorkerSpec, make_task

# Tests only: "rank,epoch,step,marker" kills that Train worker once (trainer passes it from the driver's environment).
KILL_WORKER_ENV = "SEATER_TEST_KILL_WORKER"

TRAIN_STATE = "train_state.pt"


@dataclass
class EarlyStopping:
    """Best-so-far tracking; identical on every worker because it only sees all-reduced metrics."""

    patience: int
    epoch: int = 0  # next epoch to run
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def update(self, value: float) -> bool:
        """Record an epoch's validation value; returns True if it is a new best."""
        improved = value > self.best
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, self.epoch, 0
        else:
            self.bad_epochs += 1
        self.epoch += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point run by every Ray Train worker: ``config["spec"]`` is a :class:`WorkerSpec` as JSON."""
    import ray.train

    spec = WorkerSpec.model_validate(config["spec"])
    settings = spec.train
    quiet_train_worker(spec.verbose)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.threads_per_worker)
    torch.manual_seed(settings.seed)  # the initial weights (rank 0's are broadcast to every worker anyway)

    task = make_task(spec)
    model = task.build_model()
    step_module = LossModule(task, model)
    device = ray.train.torch.get_device() if settings.use_gpu else torch.device("cpu")
    step_module.to(device)
    state = EarlyStopping(settings.patience)
    trainer = SparseTableDDP(step_module, f"model.{task.table_name}", lr=settings.lr,
                             weight_decay=settings.weight_decay, device=device,
                             find_unused_parameters=task.has_unused_parameters,
                             table_optimizer=settings.table_optimizer,
                             table_weight_decay=settings.table_weight_decay)
    resumed_from = _restore(model, trainer, state)

    valid_histories, valid_truth = _validation_slice(spec, rank, world)
    shard = ray.train.get_dataset_shard("train")
    per_worker_batch = max(1, settings.batch_size // world)

    while state.epoch < settings.epochs and not state.should_stop:
        epoch = state.epoch
        _seed_epoch(settings.seed, epoch, rank)
        t0 = time.time()
        model.train()
        totals: dict[str, torch.Tensor] = {}  # float64 on the device: read once, at the end of the epoch
        steps = samples = 0
        bytes_sent = 0
        batches = iter(shard.iter_torch_batches(batch_size=per_worker_batch, device=device,
                                                pin_memory=device.type == "cuda",
                                                local_shuffle_buffer_size=settings.shuffle_buffer,
                                                local_shuffle_seed=settings.seed * 1009 + epoch * 17 + rank))
        while True:
            batch = next(batches, None)
            if not _everyone_has(batch is not None):
                for _ in batches:  # equal shards make this a no-op; never leave the stream half-read
                    pass
                break
            losses = trainer.ddp(batch)
            losses["loss"].backward()
            stats = trainer.step(settings.grad_clip)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach().double()
            steps += 1
            samples += len(next(iter(batch.values())))
            bytes_sent += stats.total_bytes
            _maybe_kill_for_a_test(rank, epoch, steps)
        trainer.catch_up()  # validation and the checkpoint read the whole table
        train_seconds = time.time() - t0

        model.eval()
        metrics = _validate(task, model, valid_histories, valid_truth, list(spec.ks), device)
        record = {"epoch": epoch, **{f"train_{k}": float(v) / max(steps, 1) for k, v in totals.items()},
                  **{f"valid_{k}": v for k, v in metrics.items()},
                  "train_seconds": train_seconds, "valid_seconds": time.time() - t0 - train_seconds,
                  "steps": steps, "samples_per_second": _sum_all(samples) / max(train_seconds, 1e-9),
                  "bytes_per_step": bytes_sent / max(steps, 1), "resumed_from_epoch": resumed_from,
                  "params_in_sync": int(_params_identical_across_workers(model)),
                  "gpu_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0}
        improved = state.update(metrics[settings.select_metric])
        state.history.append(record)
        if rank == 0:
            print(f"{task.name} epoch {epoch + 1}/{settings.epochs}: "
                  f"loss {record.get('train_loss', float('nan')):.4f}, "
                  f"valid {settings.select_metric} {metrics[settings.select_metric]:.4f}"
                  f"{' (best)' if improved else ''}, {train_seconds:.0f} s, "
                  f"{record['samples_per_second']:,.0f} samples/s", flush=True)
        _report(task, model, trainer, state, record, improved, rank)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed dropout and negative sampling from (seed, epoch, rank): workers draw different masks and
    negatives, and a resumed run draws what an uninterrupted one would have."""
    mixed = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    torch.manual_seed(int(mixed[0]))
    np.random.seed(int(mixed[1]))


def _everyone_has(flag: bool) -> bool:
    """True only if every worker still has a batch (keeps the DDP collectives in lockstep).

    Host data, so a CPU tensor (gloo's part of a GPU group, see runtime.rendezvous.process_group_backend): no copy to
    the GPU and no wait for the GPU's queued work."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device="cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _params_identical_across_workers(model: torch.nn.Module) -> bool:
    """Compare a fingerprint of every parameter (the sparse table included) across workers, bit for bit."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return True
    fp = torch.cat([fingerprint(p.detach()) for p in model.parameters()])  # int64 [2 P], on the training device
    gathered = [torch.empty_like(fp) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fp)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


# A Mersenne prime: fingerprint terms are reduced modulo it, so every sum stays exact in int64.
_PRIME = (1 << 31) - 1
FINGERPRINT_CHUNK = 1 << 20  # elements hashed at once (a few int64 temporaries of 8 MB)


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Two position-weighted sums of the bits of ``t``'s elements modulo 2**31 - 1: int64 [2], on ``t``'s device.

    Computed chunk by chunk (FINGERPRINT_CHUNK elements) without a float copy of ``t``; integer arithmetic, so
    the same bits give the same fingerprint on any device and in any summation order. Different bits give a
    different fingerprint except with probability about 2**-62."""
    flat = t.detach().reshape(-1)
    bits = flat.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    total = torch.zeros(2, dtype=torch.int64, device=t.device)
    for start in range(0, flat.numel(), FINGERPRINT_CHUNK):
        value = bits[start : start + FINGERPRINT_CHUNK].long().remainder(_PRIME)
        index = torch.arange(start, start + value.numel(), dtype=torch.int64, device=t.device)
        weights = torch.stack([(index + 1).remainder(_PRIME), (index * 48271 + 11).remainder(_PRIME)])  # [2, n]
        total = (total + (value * weights).remainder(_PRIME).sum(1)).remainder(_PRIME)
    return total


def _sum_all(value: float) -> float:
    """``value`` summed over workers (host data: a CPU tensor, as in :func:`_everyone_has`)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cpu")
    dist.all_reduce(t)
    return float(t.item())


def _validation_slice(spec: WorkerSpec, rank: int, world: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """This worker's share of the validation users: (histories, ground truths)."""
    from seater_dist.data.dataset import load_dataset

    table = load_dataset(spec.dataset_path).table("valid")
    order = np.arange(table.num_rows)
    limit = spec.train.max_valid_users
    if limit and limit < table.num_rows:
        rng = np.random.default_rng(spec.train.seed)
        order = np.sort(rng.choice(order, limit, replace=False))
    mine = order[rank::world]
    histories = table.column("history").take(mine).to_pylist()
    truth = table.column("ground_truth").take(mine).to_pylist()
    return [np.asarray(h, dtype=np.int64) for h in histories], [np.asarray(g, dtype=np.int64) for g in truth]


def _validate(task: Task, model: torch.nn.Module, histories: list[np.ndarray], truth: list[np.ndarray],
              ks: list[int], device: torch.device, batch_size: int = 256) -> dict[str, float]:
    """Metrics over all workers' validation users (sums all-reduced, then averaged)."""
    from seater_dist.eval.metrics import finalize, metric_sums

    sums: dict[str, float] = {}
    for start in range(0, len(histories), batch_size):
        topk = model.topk(histories[start : start + batch_size], max(ks))
        part = metric_sums(topk, truth[start : start + batch_size], ks=tuple(ks))
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    if not sums:
        empty = metric_sums(np.zeros((0, max(ks)), dtype=np.int64), [], ks=tuple(ks))
        sums = {key: 0.0 for key in empty}
    if dist.is_initialized() and dist.get_world_size() > 1:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device="cpu")  # host data
        dist.all_reduce(t)
        sums = dict(zip(keys, t.tolist()))
    return finalize(sums)


def _report(task: Task, model: torch.nn.Module, trainer: SparseTableDDP, state: EarlyStopping,
            record: dict[str, Any], improved: bool, rank: int) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the epoch's checkpoint."""
    import ray.train

    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
    metrics["best_epoch"] = state.best_epoch
    metrics["is_best"] = int(improved)
    metrics["stopped_early"] = int(state.should_stop)
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix=f"{task.name}-ckpt-") as tmp:
        path = Path(tmp) / "checkpoint"
        task.save(model, path, extra={"epoch": record["epoch"], "metrics": metrics, "task": task.name})
        torch.save({"optimizer": trainer.state_dict(), "early_stopping": asdict(state)}, path / TRAIN_STATE)
        (path / "history.json").write_text(json.dumps(state.history, indent=2))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                         checkpoint_dir_name=f"epoch_{record['epoch']:04d}")


def _restore(model: torch.nn.Module, trainer: SparseTableDDP, state: EarlyStopping) -> int:
    """Load the last reported checkpoint if Ray Train gives one (worker failure or --resume). -> epoch or -1."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return -1
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        model.load_state_dict(load_tensors(directory / "model.pt", CheckpointError, "a model's weights (a state_dict)"))
        saved = load_tensors(directory / TRAIN_STATE, CheckpointError, "a training state written by `seater train`")
    trainer.load_state_dict(saved["optimizer"])
    for key, value in saved["early_stopping"].items():
        if key != "patience":  # the run's current settings decide how long to wait
            setattr(state, key, value)
    return state.epoch - 1


def _maybe_kill_for_a_test(rank: int, epoch: int, step: int) -> None:
    """Tests only: with KILL_WORKER_ENV="rank,epoch,step,marker" in the run's environment, SIGKILL this worker
    once at (rank, epoch, step); the marker file makes it once."""
    fault = os.environ.get(KILL_WORKER_ENV)
    if not fault:
        return
    at, marker = fault.split(",", 3)[:3], Path(fault.split(",", 3)[3])
    if (rank, epoch, step) != tuple(int(x) for x in at) or marker.exists():
        return
    marker.write_text(f"killed rank {rank} at epoch {epoch} step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)
