"""torch.optim.Adam's and AdamW's step written out on one big embedding table: over the whole table a chunk of
rows at a time, or on the rows a step touched (docs/method.md §4).

The arithmetic is torch's single-tensor Adam (no amsgrad) for the table's optimiser's param group: with
coupled L2 (Adam's ``weight_decay``) the decay is added to the gradient; with decoupled decay (AdamW, the
group's ``decoupled_weight_decay``) each row is first multiplied by ``1 - lr * weight_decay``. The moments
and the step count live in the torch optimiser's state, so its state_dict saves and resumes them. A chunked
pass keeps the temporaries a chunk's size, not the table's: at 6.1M items torch.optim.Adam's own step needs
~4 table-sized temporaries more.
"""

from __future__ import annotations

import torch

# Rows of the table updated at once by the dense Adam step: 64k x 64 floats (16 MB of temporaries) on a CPU,
# 1M x 64 (256 MB) on a GPU, where each chunk costs a few kernel launches and fewer chunks keep the GPU busy.
TABLE_CHUNK_ROWS = 1 << 16
TABLE_CHUNK_ROWS_CUDA = 1 << 20


def table_chunk_rows(device: torch.device) -> int:
    """Rows per chunk of a whole-table pass on ``device``."""
    return TABLE_CHUNK_ROWS_CUDA if device.type == "cuda" else TABLE_CHUNK_ROWS


def adam_state(optimizer: torch.optim.Optimizer, weight: torch.Tensor) -> dict:
    """The table's Adam/AdamW state in ``optimizer``, created as torch creates it on its first step."""
    state = optimizer.state[weight]
    if not state:
        state["step"] = torch.tensor(0.0, device="cpu")  # on the host, as torch.optim.Adam keeps it
        state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
    return state


def whole_table_step(weight: torch.Tensor, grad: torch.Tensor | None, optimizer: torch.optim.Optimizer) -> None:
    """One step of ``optimizer`` (torch.optim.Adam or AdamW over ``weight`` alone) on every row of ``weight``
    [N, d], TABLE_CHUNK_ROWS rows at a time.

    ``grad``: the averaged row gradient, sparse (coalesced) or dense [N, d]; None when no row was touched (a zero
    gradient, which still advances the step: every row's moments decay and every row moves).
    """
    group = optimizer.param_groups[0]
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    decoupled = group["decoupled_weight_decay"]
    state = adam_state(optimizer, weight)
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
            elif grad is None:
                g = torch.zeros_like(param)
            else:
                g = grad[start:end]
            if decay and decoupled:
                param.mul_(1 - lr * decay)
            elif decay:
                g = g.add(param, alpha=decay)
            exp_avg, exp_avg_sq = state["exp_avg"][start:end], state["exp_avg_sq"][start:end]
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)


def rows_step(weight: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """One step of ``optimizer`` (Adam without weight decay, or AdamW) on ``rows`` (int64 [R], unique) of
    ``weight`` [N, d] with their gradient ``grad`` [R, d], the other rows left to a catch-up; ``rows`` must be up
    to date with the previous step. Advances the step count."""
    group = optimizer.param_groups[0]
    lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if decay and not group["decoupled_weight_decay"]:
        raise ValueError("a row-wise Adam step needs no weight decay or decoupled weight decay (AdamW)")
    state = adam_state(optimizer, weight)
    step = float(state["step"]) + 1
    with torch.no_grad():
        m = state["exp_avg"][rows].lerp_(grad, 1 - beta1)
        v = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        param = weight[rows]
        if decay:
            param.mul_(1 - lr * decay)
        weight[rows] = param.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
    state["step"] += 1
