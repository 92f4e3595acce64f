"""Data-parallel training with one big embedding table whose gradient is never all-reduced densely.

The table (6.1M x 64 floats at Micro-Video scale) is kept out of DDP. Each step, every worker's
row-sparse gradient (the rows its batch touched) is all-gathered, summed per row and divided by the
world size — exactly the average DDP would compute, but the bytes on the wire scale with the rows
touched, not with N. The same code runs on gloo (CPU) and NCCL (GPU): it uses only all_gather.

The table is then updated by one of three optimisers (``table_optimizer``, docs/method.md §4):

* ``adam`` (the default): the update ``torch.optim.Adam`` makes on the whole table, exactly the authors'
  optimiser: an untouched row still moves by its momentum, its moments decay, and L2 weight decay pulls it as
  Adam's coupled L2 does. Without L2 on the table (``table_weight_decay=0``) a row's skipped steps are applied
  in closed form when it is next read or updated (adam_catch_up.py), so a step costs the rows it touches;
  ``catch_up()`` brings the whole table up to date before it is read whole (evaluation, saving). With L2 no
  closed form exists, and the update is one pass over the table per step, a chunk of rows at a time
  (table_adam.py).
* ``adamw``: the update ``torch.optim.AdamW`` makes on the whole table (decoupled weight decay: each step
  multiplies every row by ``1 - lr * table_weight_decay``, then Adam's step). Skipped steps have a closed form
  with the decay too, so a step costs the rows it touches, as adam without L2.
* ``lazy_adam``: a row-sparse Adam (``torch.optim.SparseAdam`` with L2 added to the touched rows as
  torch.optim.Adam does): touched rows get Adam's update, untouched rows stay exactly as they are and
  their moments do not decay. Cost proportional to the rows touched; a different optimiser, which moves
  rarely seen rows less.

Communication stays row-sparse with all three. Example (inside a Ray Train worker, after the process group
exists)::

    model = SeaterModel(tree, settings, sparse_embedding=True)
    trainer = SparseTableDDP(model, "tok_emb", lr=1e-3, weight_decay=1e-5)
    losses = trainer.ddp(history, target)
    losses["loss"].backward()
    stats = trainer.step(grad_clip=1.0)   # syncs both parts, clips, updates; returns bytes sent
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from seater_dist.train.adam_catch_up import AdamCatchUp
from seater_dist.train.table_adam import adam_state, rows_step, table_chunk_rows, whole_table_step


@dataclass
class StepStats:
    """What one step communicated (payload bytes each worker contributes) and the gradient norm (a float64
    0-dim tensor on the training device: reading it is a host-device sync, left to whoever needs it)."""

    dense_bytes: int
    table_bytes: int
    touched_rows: int
    grad_norm: torch.Tensor

    @property
    def total_bytes(self) -> int:
        return self.dense_bytes + self.table_bytes


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


TableOptimizer = Literal["adam", "adamw", "lazy_adam"]


class SparseTableDDP:
    """DDP over every parameter but one embedding table, plus a row-sparse sync and Adam for it.

    model: an nn.Module whose submodule ``table_name`` (dotted path) is an nn.Embedding (sparse or not).
    If the table's gradient arrives dense (e.g. a full-softmax loss uses the whole table), it is
    all-reduced densely. table_optimizer: "adam" (dense Adam semantics), "adamw" (dense AdamW semantics) or
    "lazy_adam" (module docstring); table_weight_decay: the table's (None: weight_decay), coupled L2 with adam
    and lazy_adam, AdamW's decoupled decay with adamw.
    """

    def __init__(self, model: nn.Module, table_name: str, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), device: torch.device | None = None,
                 find_unused_parameters: bool = True, table_optimizer: TableOptimizer = "adam",
                 table_weight_decay: float | None = None) -> None:
        if table_optimizer not in ("adam", "adamw", "lazy_adam"):
            raise ValueError(f"table_optimizer must be 'adam', 'adamw' or 'lazy_adam', got {table_optimizer!r}")
        self.model = model
        self.table: nn.Embedding = model.get_submodule(table_name)
        self.lazy = table_optimizer == "lazy_adam"
        self.kind = table_optimizer
        self.weight_decay = weight_decay if table_weight_decay is None else table_weight_decay  # the table's
        table_param = f"{table_name}.weight"
        if _distributed():
            broadcast_parameters(model)  # the ignored table must start equal everywhere too
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, [table_param, *_ignored_by_submodules(model)])
            device_ids = [device] if device is not None and device.type == "cuda" else None
            self.ddp: nn.Module = nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
        else:
            self.ddp = model
        self.dense_params = [p for n, p in model.named_parameters() if n != table_param and p.requires_grad]
        # On CUDA, torch's fused Adam: one kernel for all dense parameters instead of several per parameter.
        on_cuda = bool(self.dense_params) and self.dense_params[0].device.type == "cuda"
        self.dense_optimizer = torch.optim.Adam(self.dense_params, lr=lr, betas=betas, weight_decay=weight_decay,
                                                fused=True if on_cuda else None)
        if self.lazy:
            self.table_optimizer: torch.optim.Optimizer = torch.optim.SparseAdam([self.table.weight], lr=lr,
                                                                                 betas=betas)
        else:
            dense_kind = torch.optim.AdamW if table_optimizer == "adamw" else torch.optim.Adam
            self.table_optimizer = dense_kind([self.table.weight], lr=lr, betas=betas, weight_decay=self.weight_decay)
        # Dense Adam without L2, and dense AdamW, are caught up row by row (cost: the rows a step touches); Adam
        # with L2, one pass over the table per step. A lookup first brings the rows it reads up to date.
        self.catch: AdamCatchUp | None = None
        decoupled = self.weight_decay if table_optimizer == "adamw" else 0.0
        if (not self.lazy and self.weight_decay == decoupled and lr * decoupled < 1
                and betas[0] < betas[1] ** (AdamCatchUp.ORDERS / 2)):
            self.catch = AdamCatchUp(self.table.num_embeddings, *betas, self.table_optimizer.param_groups[0]["eps"],
                                     device=self.table.weight.device, weight_decay=decoupled,
                                     dtype=self.table.weight.dtype)
            self.table.register_forward_pre_hook(self._before_lookup)
        self.dense_bytes = sum(p.numel() * p.element_size() for p in self.dense_params) if _distributed() else 0

    @property
    def table_update(self) -> str:
        """How the table is updated: "lazy_adam", or "adam" / "adamw" followed by ", caught up per row" or
        ", one pass per step"."""
        if self.lazy:
            return "lazy_adam"
        return self.kind + (", caught up per row" if self.catch is not None else ", one pass per step")

    def zero_grad(self) -> None:
        self.dense_optimizer.zero_grad(set_to_none=True)
        self.table.weight.grad = None

    def step(self, grad_clip: float | None = None) -> StepStats:
        """Sync the table gradient (DDP already synced the dense ones in backward), clip, update."""
        table_bytes, rows = self.sync_table_grad()
        norm = self.clip_and_update(grad_clip)
        return StepStats(self.dense_bytes, table_bytes, rows, norm)

    def sync_table_grad(self) -> tuple[int, int]:
        """Replace the table's local gradient by the workers' average, row-sparse and coalesced.

        Returns (payload bytes this worker sent, rows in the averaged gradient).
        """
        weight = self.table.weight
        grad = weight.grad
        if grad is None:
            grad = torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.long, device=weight.device),
                                           torch.zeros((0, weight.shape[1]), dtype=weight.dtype, device=weight.device),
                                           weight.shape, check_invariants=False, device=weight.device)
        table_bytes = 0
        if not grad.is_sparse:  # a loss touched every row (e.g. SASRec's full softmax): all-reduce it densely
            if _distributed():
                dist.all_reduce(grad)
                grad /= dist.get_world_size()
                table_bytes = grad.numel() * grad.element_size()
            rows = torch.nonzero(grad.abs().sum(1)).flatten()
            if self.lazy:  # SparseAdam takes the non-zero rows
                weight.grad = torch.sparse_coo_tensor(rows[None], grad[rows], weight.shape,
                                                      device=grad.device).coalesce()
            return table_bytes, int(rows.numel())
        grad = grad.coalesce()
        if _distributed():
            grad, table_bytes = _all_gather_rows(grad)
        weight.grad = grad
        return table_bytes, int(grad._nnz())

    def clip_and_update(self, grad_clip: float | None = None) -> torch.Tensor:
        """Clip the global gradient norm (before weight decay, as clip_grad_norm_ then torch Adam), step.

        Returns the gradient norm before clipping (float64 0-dim, on the training device).
        """
        norm = self._clip(grad_clip)
        self.dense_optimizer.step()
        if self.lazy:
            self._lazy_step()
        elif self.catch is not None:
            self._catch_up_step()
        else:
            whole_table_step(self.table.weight, self.table.weight.grad, self.table_optimizer)
        self.zero_grad()
        return norm

    def catch_up(self) -> None:
        """Bring every row of the table up to date (before reading the table whole: evaluation, saving).

        A no-op unless the table is caught up per row; one pass over the table, TABLE_CHUNK_ROWS at a time.
        """
        if self.catch is None or self.catch.step == self.catch.origin:
            return
        weight = self.table.weight
        state = self._adam_state()
        chunk = table_chunk_rows(weight.device)
        with torch.no_grad():
            for start in range(0, weight.shape[0], chunk):
                rows = torch.arange(start, min(weight.shape[0], start + chunk), device=weight.device)
                self.catch.catch_up(rows, weight.detach(), state["exp_avg"], state["exp_avg_sq"])
        self.catch.reset(self.catch.step)

    def _before_lookup(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the table: the rows a lookup reads are caught up to the last step first."""
        if self.catch.step == self.catch.origin:  # every row is up to date
            return
        state = self._adam_state()
        with torch.no_grad():
            self.catch.catch_up(args[0].detach().flatten().unique(), self.table.weight.detach(),
                                state["exp_avg"], state["exp_avg_sq"])

    def _adam_state(self) -> dict:
        """The table's torch.optim.Adam/AdamW state, created as torch creates it on its first step."""
        return adam_state(self.table_optimizer, self.table.weight)

    def _catch_up_step(self) -> None:
        """The table optimiser's step (Adam without L2, or AdamW) on the rows in the averaged gradient, after
        catching them up to the previous step; every other row's share of this step is recorded for its
        catch-up."""
        weight = self.table.weight
        grad = weight.grad
        if grad is not None and not grad.is_sparse:  # every row touched: one pass
            self.catch_up()
            whole_table_step(weight, grad, self.table_optimizer)
            self.catch.reset(int(self._adam_state()["step"]))
            return
        state = self._adam_state()
        rows = torch.zeros(0, dtype=torch.long, device=weight.device)
        with torch.no_grad():
            if grad is not None and grad._nnz():
                rows, g = grad.indices()[0], grad.values()  # coalesced: each row once
                self.catch.catch_up(rows, weight.detach(), state["exp_avg"], state["exp_avg_sq"])
                rows_step(weight, rows, g, self.table_optimizer)
            else:  # no row touched: a zero gradient still advances the step
                state["step"] += 1
        self.catch.record_step(self.table_optimizer.param_groups[0]["lr"])
        self.catch.last[rows] = self.catch.step

    def _lazy_step(self) -> None:
        """SparseAdam on the touched rows, with L2 weight decay added to them as torch Adam adds it."""
        weight = self.table.weight
        grad = weight.grad
        if grad is None or grad._nnz() == 0:
            return
        if self.weight_decay:
            rows = grad.indices()[0]
            weight.grad = torch.sparse_coo_tensor(grad.indices(),
                                                  grad.values() + self.weight_decay * weight.detach()[rows],
                                                  weight.shape, check_invariants=False, device=weight.device).coalesce()
        self.table_optimizer.step()

    def _clip(self, max_norm: float | None) -> torch.Tensor:
        """Scale every gradient by max_norm / (norm + 1e-6) when the global norm exceeds max_norm.

        Computed on the training device without reading the norm on the host (no sync): the scale is 1 when
        the norm is within bounds, and multiplying by 1 changes no gradient. -> the norm, float64 0-dim."""
        g = self.table.weight.grad
        table_values = None if g is None else (g._values() if g.is_sparse else g)
        grads = [p.grad.detach() for p in self.dense_params if p.grad is not None]
        grads += [] if table_values is None else [table_values.detach()]
        sq = torch.zeros((), dtype=torch.float64, device=self.table.weight.device)
        for grad in grads:
            sq += grad.double().pow(2).sum()
        norm = sq.sqrt()
        if max_norm is not None:
            scale = torch.where(norm > max_norm, max_norm / (norm + 1e-6), torch.ones_like(norm))
            for grad in grads:
                grad.mul_(scale.to(grad.dtype))
        return norm

    def state_dict(self) -> dict:
        """Both optimisers' state, the table's in torch.optim.Adam's format (every row caught up first)."""
        self.catch_up()
        return {"dense": self.dense_optimizer.state_dict(), "table": self.table_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dense_optimizer.load_state_dict(state["dense"])
        self.table_optimizer.load_state_dict(state["table"])
        if self.catch is not None:
            self.catch.reset(int(self._adam_state()["step"]))


def _all_gather_rows(grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Average a coalesced row-sparse gradient over workers by all-gathering (rows, values).

    Returns (the averaged coalesced gradient, payload bytes this worker sent).
    """
    world = dist.get_world_size()
    idx = grad.indices()[0]
    val = grad.values()
    count = torch.tensor([idx.numel()], dtype=torch.long, device=idx.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    n = torch.cat(counts).tolist()  # the step's one read of device data: the padded size to allocate
    longest = max(n)
    idx_pad = torch.zeros(longest, dtype=torch.long, device=idx.device)
    val_pad = torch.zeros((longest, val.shape[1]), dtype=val.dtype, device=val.device)
    idx_pad[: idx.numel()] = idx
    val_pad[: idx.numel()] = val
    idx_all = [torch.empty_like(idx_pad) for _ in range(world)]
    val_all = [torch.empty_like(val_pad) for _ in range(world)]
    dist.all_gather(idx_all, idx_pad)
    dist.all_gather(val_all, val_pad)
    rows = torch.cat([i[:c] for i, c in zip(idx_all, n)])
    values = torch.cat([v[:c] for v, c in zip(val_all, n)]) / world
    summed = torch.sparse_coo_tensor(rows[None], values, grad.shape, check_invariants=False,
                                     device=values.device).coalesce()
    sent = count.element_size() + longest * (idx_pad.element_size() + val_pad.shape[1] * val_pad.element_size())
    return summed, sent


def _ignored_by_submodules(model: nn.Module) -> list[str]:
    """Names (from ``model``) that submodules ask DDP to skip; DDP itself reads only the root's list."""
    names = []
    for prefix, module in model.named_modules():
        if module is model:
            continue
        for name in getattr(module, "_ddp_params_and_buffers_to_ignore", ()):
            names.append(f"{prefix}.{name}")
    return names


def broadcast_parameters(model: nn.Module) -> None:
    """Copy rank 0's parameters to every worker (buffers here are derived from the tree: equal already)."""
    with torch.no_grad():
        for t in model.parameters():
            dist.broadcast(t.data, src=0)
