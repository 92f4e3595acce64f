"""The row-sparse table sync: averaged gradients equal dense DDP's, workers stay identical, and the
bytes sent scale with the rows touched, not with the table size. Two gloo processes, no Ray."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from seater_dist.train.sparse_table import SparseTableDDP


class Toy(nn.Module):
    """full_softmax: the table is also the output layer of a softmax over every row (SASRec with full
    cross-entropy), so its gradient arrives dense."""

    def __init__(self, n: int, d: int = 8, full_softmax: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(n, d, sparse=True)
        self.proj = nn.Linear(d, d)
        self.full_softmax = full_softmax

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.proj(self.emb(idx))
        if self.full_softmax:
            return {"loss": nn.functional.cross_entropy(x @ self.emb.weight.T, idx.flip(0))}
        return {"loss": (x * self.emb(idx.flip(0))).sum(-1).pow(2).mean()}


def _batch(rank: int, step: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, min(n, 40), (16,), generator=g)


def _worker(rank: int, world: int, port: int, n: int, steps: int, queue, full_softmax: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different init on purpose: the wrapper must broadcast rank 0's
    model = Toy(n, full_softmax=full_softmax)
    trainer = SparseTableDDP(model, "emb", lr=1e-2, weight_decay=1e-4)
    # Reference gradient of step 0: average of every rank's dense gradient, computed locally.
    ref = Toy(n, full_softmax=full_softmax)
    ref.load_state_dict(model.state_dict())
    ref.emb.sparse = False
    dense = torch.zeros_like(ref.emb.weight)
    for r in range(world):
        ref.zero_grad()
        ref(_batch(r, 0, n))["loss"].backward()
        dense += ref.emb.weight.grad / world
    byte_counts = []
    for step in range(steps):
        trainer.ddp(_batch(rank, step, n))["loss"].backward()
        table_bytes, _ = trainer.sync_table_grad()
        if step == 0:
            grad_error = float((model.emb.weight.grad.to_dense() - dense).abs().max())
        trainer.clip_and_update(grad_clip=1.0)
        byte_counts.append(table_bytes)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    queue.put((rank, grad_error, flat.tolist(), byte_counts))
    dist.destroy_process_group()


def _run(n: int, steps: int = 5, world: int = 2, full_softmax: bool = False):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, n, steps, queue, full_softmax)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results


@pytest.fixture(scope="module")
def small_and_large():
    return _run(n=1_000), _run(n=200_000)


def test_synced_table_gradient_equals_the_dense_average(small_and_large):
    for results in small_and_large:
        for _, grad_error, _, _ in results:
            assert grad_error < 1e-5


def test_workers_hold_identical_parameters_after_steps(small_and_large):
    for results in small_and_large:
        (_, _, a, _), (_, _, b, _) = results
        assert a == b


def test_bytes_sent_do_not_grow_with_table_size(small_and_large):
    small, large = small_and_large
    bytes_small, bytes_large = small[0][3], large[0][3]
    assert bytes_small == bytes_large  # same batches touch the same rows
    assert max(bytes_large) < 200_000 * 8 * 4 / 100  # far below a dense all-reduce of the table


def test_a_dense_table_gradient_is_averaged_once_and_kept_in_sync() -> None:
    """A loss that touches every row (full softmax) gives a dense gradient: it is all-reduced as is."""
    results = _run(n=300, full_softmax=True)
    (_, err_a, a, bytes_a), (_, err_b, b, _) = results
    assert err_a < 1e-5 and err_b < 1e-5
    assert a == b
    assert bytes_a[0] == 300 * 8 * 4  # one dense all-reduce of the table, no second (row) exchange


# ------------------------------------------------------------------ dense Adam semantics for the table

def _rare_batch(step: int, rank: int, n: int) -> torch.Tensor:
    """Rows touched rarely and irregularly: a few hot rows, a long tail touched now and then."""
    g = torch.Generator().manual_seed(7919 * step + rank)
    hot = torch.randint(0, 5, (6,), generator=g)
    tail = torch.randint(5, n, (2,), generator=g) if torch.rand((), generator=g) < 0.3 else torch.empty(0, dtype=torch.long)
    return torch.cat([hot, tail])


def _train_pair(world: int, rank: int, n: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The table after ``steps`` with SparseTableDDP(adam), and after torch.optim.Adam on a dense twin that
    sees every rank's batch (the gradient DDP averages)."""
    torch.manual_seed(0)
    model = Toy(n)
    twin = Toy(n)
    twin.load_state_dict(model.state_dict())
    twin.emb.sparse = False
    trainer = SparseTableDDP(model, "emb", lr=1e-2, weight_decay=1e-3, table_optimizer="adam")
    reference = torch.optim.Adam(twin.parameters(), lr=1e-2, weight_decay=1e-3)
    for step in range(steps):
        trainer.ddp(_rare_batch(step, rank, n))["loss"].backward()
        trainer.step(grad_clip=1.0)
        reference.zero_grad()
        loss = sum(twin(_rare_batch(step, r, n))["loss"] for r in range(world)) / world
        loss.backward()
        nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        reference.step()
    return model.emb.weight.detach().clone(), twin.emb.weight.detach().clone()


def _dense_adam_worker(rank: int, world: int, port: int, n: int, steps: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ours, reference = _train_pair(world, rank, n, steps)
    queue.put((rank, float((ours - reference).abs().max())))
    dist.destroy_process_group()


def test_table_adam_matches_torch_adam_on_a_dense_table_one_process() -> None:
    ours, reference = _train_pair(world=1, rank=0, n=60, steps=2000)
    assert float((ours - reference).abs().max()) < 1e-5


def test_table_adam_in_row_chunks_matches_torch_adam(monkeypatch) -> None:
    """The update written out 7 rows at a time (60 rows: 9 chunks, the last one short; touched rows on every
    chunk boundary) is torch.optim.Adam's."""
    from seater_dist.train import sparse_table

    monkeypatch.setattr(sparse_table, "TABLE_CHUNK_ROWS", 7)
    ours, reference = _train_pair(world=1, rank=0, n=60, steps=300)
    assert float((ours - reference).abs().max()) < 1e-6


def test_table_adam_matches_torch_adam_on_a_dense_table_two_workers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dense_adam_worker, args=(r, 2, port, 60, 2000, queue)) for r in range(2)]
    for p in procs:
        p.start()
    errors = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(err < 1e-5 for _, err in errors), errors


def test_lazy_adam_leaves_untouched_rows_where_dense_adam_moves_them() -> None:
    moved = {}
    for kind in ("adam", "lazy_adam"):
        torch.manual_seed(1)
        model = Toy(50)
        start = model.emb.weight.detach().clone()
        trainer = SparseTableDDP(model, "emb", lr=1e-2, weight_decay=0.0, table_optimizer=kind)
        for step in range(20):
            rows = torch.tensor([0, 1, 2]) if step == 0 else torch.tensor([0, 1])
            trainer.ddp(rows)["loss"].backward()
            trainer.step(grad_clip=None)
        moved[kind] = float((model.emb.weight.detach()[2] - start[2]).abs().max())  # row 2: touched at step 0 only
    assert moved["adam"] > 5 * moved["lazy_adam"] > 0
