"""Data-parallel training with one big embedding table whose gradient is never all-reduced densely.

The table (6.1M x 64 floats at Micro-Video scale) is kept out of DDP. Each step, every worker's
row-sparse gradient (the rows its batch touched) is all-gathered, summed per row and divided by the
world size — exactly the average DDP would compute, but the bytes on the wire scale with the rows
touched, not with N. The same code runs on gloo (CPU) and NCCL (GPU): it uses only all_gather.

The table is then updated by one of two optimisers (``table_optimizer``):

* ``adam`` (the default): the update ``torch.optim.Adam`` makes on the whole table, exactly the authors'
  optimiser (docs/method.md §4): an untouched row still moves by its momentum, its moments decay, and L2
  weight decay pulls it as Adam's coupled L2 does. Communication stays row-sparse. Without L2 on the table
  (``table_weight_decay=0``) a row's skipped steps are applied in closed form when it is next read or
  updated (``AdamCatchUp``), so a step costs the rows it touches; ``catch_up()`` brings the whole table
  up to date before it is read whole (evaluation, saving). With L2 no closed form exists, and the update is
  one pass over the table per step, written out a chunk of rows at a time (the arithmetic of torch's
  single-tensor Adam, its state kept in the torch optimiser) so that its temporaries are a chunk's size,
  not the table's: at 6.1M items torch.optim.Adam's own step needs ~4 table-sized temporaries more.
* ``lazy_adam``: a row-sparse Adam (``torch.optim.SparseAdam`` with L2 added to the touched rows as
  torch.optim.Adam does): touched rows get Adam's update, untouched rows stay exactly as they are and
  their moments do not decay. Cost proportional to the rows touched; a different optimiser, which moves
  rarely seen rows less.

Example (inside a Ray Train worker, after the process group exists)::

    model = SeaterModel(tree, settings, sparse_embedding=True)
    trainer = SparseTableDDP(model, "tok_emb", lr=1e-3, weight_decay=1e-5)
    losses = trainer.ddp(history, target)
    losses["loss"].backward()
    stats = trainer.step(grad_clip=1.0)   # syncs both parts, clips, updates; returns bytes sent
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn


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


TableOptimizer = Literal["adam", "lazy_adam"]


# Rows of the table updated at once by the dense Adam step: 64k x 64 floats (16 MB of temporaries) on a CPU,
# 1M x 64 (256 MB) on a GPU, where each chunk costs a few kernel launches and fewer chunks keep the GPU busy.
TABLE_CHUNK_ROWS = 1 << 16
TABLE_CHUNK_ROWS_CUDA = 1 << 20


def table_chunk_rows(device: torch.device) -> int:
    """Rows per chunk of a whole-table pass on ``device``."""
    return TABLE_CHUNK_ROWS_CUDA if device.type == "cuda" else TABLE_CHUNK_ROWS


class AdamCatchUp:
    """torch.optim.Adam's steps on table rows that got no gradient, applied when a row is next read or
    updated, so that a step costs the rows it touches, not the table (no weight decay only).

    k steps of Adam on a row whose gradient is zero scale its moments by beta1**k and beta2**k, and move each
    element by ``-sum_u c_u * m / (C_u * x + eps)`` over the skipped steps u = s+1..t (s: the row's last
    update; m, x = sqrt(v): its moments then; ``c_u = lr_u beta1**(u-s) / (1 - beta1**u)``,
    ``C_u = beta2**((u-s)/2) / sqrt(1 - beta2**u)``). Expanded in powers of eps / (C_u x) this is
    ``sum_p (-eps)**(p-1) * F_p(s, t) * m / x**p`` with per-step scalars
    ``F_p(s, t) = sum_u lr_u (1 - beta2**u)**(p/2) / (1 - beta1**u) * rho_p**(u-s)``, ``rho_p = beta1 / beta2**(p/2)``,
    kept for every s since the last full catch-up in ``acc[p - 1, s - origin]``: each step adds its term to
    the last ``window`` entries (older ones no longer change: rho_p**window < 1e-20). ORDERS terms are
    used where eps / x <= SERIES_LIMIT; the few elements with a smaller x (a gradient near eps) get the sum
    itself over their first ``window`` skipped steps.

    With coupled L2 a skipped step's gradient is ``weight_decay * row``, which depends on the row itself:
    no closed form exists, so SparseTableDDP uses this only when the table's weight decay is 0.
    """

    ORDERS = 16
    SERIES_LIMIT = 1 / 4

    def __init__(self, num_rows: int, beta1: float, beta2: float, eps: float, device: torch.device) -> None:
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        rhos = [beta1 / beta2 ** (p / 2) for p in range(1, self.ORDERS + 1)]
        if not max(rhos) < 1:
            raise ValueError(f"closed-form catch-up needs beta1 < beta2**{self.ORDERS / 2}, got ({beta1}, {beta2})")
        self.window = math.ceil(-20 * math.log(10) / math.log(max(rhos)))
        # The per-step scalars live on the host (float64 [ORDERS, steps]); only the rows' state is on ``device``.
        steps_back = torch.arange(self.window, 0, -1, dtype=torch.float64, device="cpu")
        self.powers = torch.stack([rho**steps_back for rho in rhos])  # [ORDERS, window]: rho**window .. rho**1
        self.last = torch.zeros(num_rows, dtype=torch.long, device=device)  # step each row is up to date with
        self.step = 0
        self.origin = 0
        self.acc = torch.zeros(self.ORDERS, 1024, dtype=torch.float64, device="cpu")
        self.step_sizes = torch.zeros(1024, dtype=torch.float64, device="cpu")  # lr_u / (1 - beta1**u) at u - origin

    def reset(self, step: int) -> None:
        """Every row is up to date with ``step`` (after a full catch-up, a dense step, or a resume)."""
        self.step = self.origin = step
        self.last.fill_(step)
        self.acc.zero_()

    def record_step(self, lr: float) -> None:
        """Account for Adam step ``self.step + 1`` on every row not updated by it."""
        self.step += 1
        t = self.step
        if t - self.origin >= self.step_sizes.numel():
            self.acc = torch.cat([self.acc, torch.zeros_like(self.acc)], dim=1)
            self.step_sizes = torch.cat([self.step_sizes, torch.zeros_like(self.step_sizes)])
        self.step_sizes[t - self.origin] = lr / (1 - self.beta1**t)
        first = max(self.origin, t - self.window)
        orders = torch.arange(1, self.ORDERS + 1, dtype=torch.float64, device="cpu")
        per_order = self.step_sizes[t - self.origin] * (1 - self.beta2**t) ** (orders / 2)  # [ORDERS]
        self.acc[:, first - self.origin : t - self.origin] += (per_order[:, None]
                                                               * self.powers[:, self.window - (t - first):])

    def catch_up(self, rows: torch.Tensor, param: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor) -> None:
        """Bring ``rows`` (int64 [R], unique) of the table ``param`` [N, d] and its moments to ``self.step``."""
        rows = rows[self.last[rows] < self.step]
        if rows.numel() == 0:
            return
        last = self.last[rows]
        m, v = exp_avg[rows].double(), exp_avg_sq[rows].double()
        x = v.sqrt()
        ratio = self.eps / x.clamp_min(torch.finfo(torch.float64).tiny)  # [R, d]
        sums = self.acc[:, (last - self.origin).cpu()].to(param.device)[:, :, None]  # [ORDERS, R, 1]
        series = sums[-1].expand_as(m)  # Horner: sum_p F_p * (-ratio)**(p-1)
        for p in range(self.ORDERS - 2, -1, -1):
            series = series * -ratio + sums[p]
        move = series * m / x.clamp_min(torch.finfo(torch.float64).tiny)
        near_eps = (ratio > self.SERIES_LIMIT) & (m != 0)
        if near_eps.any():
            r, c = near_eps.nonzero(as_tuple=True)
            move[r, c] = self._summed_move(last[r], m[r, c], x[r, c])
        move[x == 0] = 0  # never had a gradient: Adam leaves it where it is
        param[rows] = (param[rows].double() - move).to(param.dtype)
        skipped = (self.step - last).to(torch.float64)[:, None]
        exp_avg[rows] = (m * self.beta1**skipped).to(exp_avg.dtype)
        exp_avg_sq[rows] = (v * self.beta2**skipped).to(exp_avg_sq.dtype)
        self.last[rows] = self.step

    def _summed_move(self, last: torch.Tensor, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The move itself, summed over the first ``window`` skipped steps, for elements (float64 [E]) whose
        x is too close to eps for the series: in order of their skipped steps, in chunks as wide as those."""
        out = torch.empty_like(m)
        skipped = (self.step - last).clamp(max=self.window)
        order = torch.argsort(skipped)
        for start in range(0, m.numel(), 4096):
            part = order[start : start + 4096]
            j = torch.arange(1, int(skipped[part].max()) + 1, device=m.device, dtype=torch.float64)
            u = last[part, None] + j.long()  # [E', columns] absolute steps
            valid = u <= self.step
            index = (u - self.origin).clamp(max=self.step - self.origin).cpu()
            c = self.step_sizes[index].to(m.device) * self.beta1**j
            big_c = self.beta2 ** (j / 2) / torch.sqrt(1 - self.beta2 ** u.double())
            terms = c * m[part, None] / (big_c * x[part, None] + self.eps)
            out[part] = torch.where(valid, terms, torch.zeros_like(terms)).sum(1)
        return out


class SparseTableDDP:
    """DDP over every parameter but one embedding table, plus a row-sparse sync and Adam for it.

    model: an nn.Module whose submodule ``table_name`` (dotted path) is an nn.Embedding (sparse or not).
    If the table's gradient arrives dense (e.g. a full-softmax loss uses the whole table), it is
    all-reduced densely. table_optimizer: "adam" (dense Adam semantics) or "lazy_adam" (module docstring).
    """

    def __init__(self, model: nn.Module, table_name: str, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), device: torch.device | None = None,
                 find_unused_parameters: bool = True, table_optimizer: TableOptimizer = "adam",
                 table_weight_decay: float | None = None) -> None:
        if table_optimizer not in ("adam", "lazy_adam"):
            raise ValueError(f"table_optimizer must be 'adam' or 'lazy_adam', got {table_optimizer!r}")
        self.model = model
        self.table: nn.Embedding = model.get_submodule(table_name)
        self.lazy = table_optimizer == "lazy_adam"
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
            self.table_optimizer = torch.optim.Adam([self.table.weight], lr=lr, betas=betas,
                                                    weight_decay=self.weight_decay)
        # Dense Adam without L2 is caught up row by row (cost: the rows a step touches); with L2, one pass
        # over the table per step. A lookup first brings the rows it reads up to date.
        self.catch: AdamCatchUp | None = None
        if not self.lazy and self.weight_decay == 0 and betas[0] < betas[1] ** (AdamCatchUp.ORDERS / 2):
            self.catch = AdamCatchUp(self.table.num_embeddings, *betas, self.table_optimizer.param_groups[0]["eps"],
                                     device=self.table.weight.device)
            self.table.register_forward_pre_hook(self._before_lookup)
        self.dense_bytes = sum(p.numel() * p.element_size() for p in self.dense_params) if _distributed() else 0

    @property
    def table_update(self) -> str:
        """How the table is updated: "lazy_adam", "adam, caught up per row" or "adam, one pass per step"."""
        if self.lazy:
            return "lazy_adam"
        return "adam, caught up per row" if self.catch is not None else "adam, one pass per step"

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
            self._dense_step()
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
        """The table's torch.optim.Adam state, created as torch creates it on its first step."""
        weight = self.table.weight
        state = self.table_optimizer.state[weight]
        if not state:
            state["step"] = torch.tensor(0.0, device="cpu")  # on the host, as torch.optim.Adam keeps it
            state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
        return state

    def _catch_up_step(self) -> None:
        """torch.optim.Adam's step (no L2) on the rows in the averaged gradient, after catching them up to
        the previous step; every other row's share of this step is recorded for its catch-up."""
        weight = self.table.weight
        grad = weight.grad
        if grad is not None and not grad.is_sparse:  # every row touched: one pass, as with L2
            self.catch_up()
            self._dense_step()
            self.catch.reset(int(self._adam_state()["step"]))
            return
        state = self._adam_state()
        group = self.table_optimizer.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        table, exp_avg, exp_avg_sq = weight.detach(), state["exp_avg"], state["exp_avg_sq"]
        with torch.no_grad():
            if grad is not None and grad._nnz():
                rows, g = grad.indices()[0], grad.values()  # coalesced: each row once
                self.catch.catch_up(rows, table, exp_avg, exp_avg_sq)
                step = float(state["step"]) + 1
                m = exp_avg[rows].lerp_(g, 1 - beta1)
                v = exp_avg_sq[rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
                table[rows] = table[rows].addcdiv_(m, denom, value=-lr / (1 - beta1**step))
                exp_avg[rows], exp_avg_sq[rows] = m, v
            else:
                rows = torch.zeros(0, dtype=torch.long, device=weight.device)
            state["step"] += 1
            self.catch.record_step(lr)
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

    def _dense_step(self) -> None:
        """torch.optim.Adam's step on the whole table (coupled L2, no amsgrad), TABLE_CHUNK_ROWS rows at a time.

        Every row's moments decay and every row moves, as in the authors' training. The averaged row gradient
        (sparse, or dense when a loss touched every row) is added chunk by chunk; the moments and the step
        count live in ``self.table_optimizer``'s state, so its state_dict saves and resumes them.
        """
        weight = self.table.weight
        grad = weight.grad
        group = self.table_optimizer.param_groups[0]
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self._adam_state()
        state["step"] += 1
        step = float(state["step"])
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        n = weight.shape[0]
        chunk = table_chunk_rows(weight.device)
        sparse = grad is not None and grad.is_sparse
        if sparse:
            rows, values = grad.indices()[0], grad.values()  # coalesced: rows sorted, each once
            bounds = torch.searchsorted(rows, torch.arange(0, n + chunk, chunk, device=rows.device)).tolist()
        with torch.no_grad():
            for i, start in enumerate(range(0, n, chunk)):
                end = min(n, start + chunk)
                param = weight[start:end]
                if sparse:
                    g = torch.zeros_like(param)
                    g.index_add_(0, rows[bounds[i] : bounds[i + 1]] - start, values[bounds[i] : bounds[i + 1]])
                elif grad is None:  # no row touched this step: a zero gradient still advances Adam's step
                    g = torch.zeros_like(param)
                else:
                    g = grad[start:end]
                if decay:
                    g = g.add(param, alpha=decay)
                exp_avg, exp_avg_sq = state["exp_avg"][start:end], state["exp_avg_sq"][start:end]
                exp_avg.lerp_(g, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)

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
