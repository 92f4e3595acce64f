"""The row-sparse table sync: averaged gradients equal dense DDP's, workers stay identical, and the
bytes sent scale with the rows touched, not with the table size. Two gloo processes, no Ray."""

import copy
import os
import socket
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from seater_dist.train.sparse_table import SparseTableDDP


class Toy(nn.Module):
    """full_softmax: the table is also the output layer of a softmax over every row (SASRec with full
    cross-entropy), so its gradient arrives dense. linear: a loss whose gradient does not depend on the
    parameters (a fixed direction per batch, rows scaled from 1 down to 1e-8 so that some moments come near
    Adam's eps): two optimisers are then compared without training feeding their rounding back."""

    def __init__(self, n: int, d: int = 8, full_softmax: bool = False, linear: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(n, d, sparse=True)
        self.proj = nn.Linear(d, d)
        self.full_softmax = full_softmax
        self.linear = linear
        self.register_buffer("row_scale", 10.0 ** -(torch.arange(n) % 9).double(), persistent=False)

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.linear:
            g = torch.Generator().manual_seed(int(idx.sum()) * 31 + idx.numel())
            direction = torch.randn(idx.numel(), self.emb.embedding_dim, generator=g) * self.row_scale[idx, None]
            direction = direction.to(self.proj.weight.dtype)
            return {"loss": (self.emb(idx) * direction).sum() + self.proj(direction).pow(2).mean()}
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
    with_tail = torch.rand((), generator=g) < 0.3
    tail = torch.randint(5, n, (2,), generator=g) if with_tail else torch.empty(0, dtype=torch.long)
    return torch.cat([hot, tail])


def test_the_rare_batches_leave_tail_rows_untouched_for_hundreds_of_steps() -> None:
    """What the comparisons below rely on: over 2,000 steps some rows wait 300 steps or more between two
    touches, in one process and with two workers' batches together."""
    for ranks in ([0], [0, 1]):
        last_seen = torch.zeros(60, dtype=torch.long)
        longest = 0
        for step in range(2000):
            rows = torch.cat([_rare_batch(step, r, 60) for r in ranks]).unique()
            longest = max(longest, int((step - last_seen[rows]).max()))
            last_seen[rows] = step
        assert longest >= 300, (ranks, longest)


@dataclass(frozen=True)
class TableRule:
    """A table update rule under test, and what its torch reference is made of."""

    optimizer: str  # SparseTableDDP's table_optimizer; the reference's table optimiser is torch's Adam or AdamW
    weight_decay: float  # every parameter's (coupled L2 on the dense ones, as in the reference)
    table_weight_decay: float | None  # the table's (None: weight_decay)
    expected_update: str  # SparseTableDDP.table_update
    linear: bool  # the linear toy (Toy's docstring)


L2_ONE_PASS = TableRule("adam", 1e-3, None, "adam, one pass per step", False)


def _train_pair(world: int, rank: int, n: int, steps: int, rule: TableRule = L2_ONE_PASS,
                dense_every: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The table after ``steps`` with SparseTableDDP, and after torch.optim.Adam (dense parameters) and
    Adam or AdamW (the table) on a dense twin that sees every rank's batch (the gradient DDP averages).
    dense_every: every so many steps the loss is a full softmax, whose table gradient is dense."""
    torch.manual_seed(0)
    model = Toy(n, linear=rule.linear)
    lr = 1e-2
    if rule.linear:  # rows near 0.1 and small steps: float32 rounding of the rows stays far below the bound
        lr = 1e-3
        with torch.no_grad():
            model.emb.weight.mul_(0.1)
    twin = Toy(n, linear=rule.linear)
    twin.load_state_dict(model.state_dict())
    twin.emb.sparse = False
    trainer = SparseTableDDP(model, "emb", lr=lr, weight_decay=rule.weight_decay, table_optimizer=rule.optimizer,
                             table_weight_decay=rule.table_weight_decay)
    assert trainer.table_update == rule.expected_update
    table_decay = rule.weight_decay if rule.table_weight_decay is None else rule.table_weight_decay
    table_reference = torch.optim.AdamW if rule.optimizer == "adamw" else torch.optim.Adam
    references = [torch.optim.Adam([p for name, p in twin.named_parameters() if name != "emb.weight"], lr=lr,
                                   weight_decay=rule.weight_decay),
                  table_reference([twin.emb.weight], lr=lr, weight_decay=table_decay)]
    for step in range(steps):
        model.full_softmax = twin.full_softmax = bool(dense_every) and step % dense_every == 0
        if model.full_softmax:
            trainer.catch_up()  # the full softmax reads the whole table
        trainer.ddp(_rare_batch(step, rank, n))["loss"].backward()
        trainer.step(grad_clip=1.0)
        for reference in references:
            reference.zero_grad()
        loss = sum(twin(_rare_batch(step, r, n))["loss"] for r in range(world)) / world
        loss.backward()
        nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        for reference in references:
            reference.step()
    trainer.catch_up()
    return model.emb.weight.detach().clone(), twin.emb.weight.detach().clone()


# With L2 the table takes one pass per step: torch's arithmetic, compared on the training toy. Without L2, and
# with AdamW's decoupled decay (0.5 here: every row shrinks by 1 - 5e-4 a step, to 0.37 of itself over the run
# before Adam's moves), it is caught up per row in closed form, in float64: compared on the linear toy, since
# on the training toy float32 rounding alone, fed back by training, moves torch's own Adam 6e-5 from a float64
# run in 2,000 steps.
TABLE_RULES = [pytest.param(L2_ONE_PASS, id="l2-one-pass"),
               pytest.param(TableRule("adam", 0.0, None, "adam, caught up per row", True), id="no-l2-caught-up"),
               pytest.param(TableRule("adamw", 1e-3, 0.5, "adamw, caught up per row", True), id="adamw-caught-up")]


def _dense_adam_worker(rank: int, world: int, port: int, n: int, steps: int, queue, rule: TableRule) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ours, reference = _train_pair(world, rank, n, steps, rule)
    queue.put((rank, float((ours - reference).abs().max()), ours.flatten().tolist()))
    dist.destroy_process_group()


@pytest.mark.parametrize("rule", TABLE_RULES)
def test_table_adam_matches_torch_adam_on_a_dense_table_one_process(rule) -> None:
    ours, reference = _train_pair(1, 0, 60, 2000, rule)
    assert float((ours - reference).abs().max()) < 1e-5


def test_table_adam_in_row_chunks_matches_torch_adam(monkeypatch) -> None:
    """The update written out 7 rows at a time (60 rows: 9 chunks, the last one short; touched rows on every
    chunk boundary) is torch.optim.Adam's."""
    from seater_dist.train import table_adam

    monkeypatch.setattr(table_adam, "TABLE_CHUNK_ROWS", 7)
    ours, reference = _train_pair(world=1, rank=0, n=60, steps=300)
    assert float((ours - reference).abs().max()) < 1e-6


def test_table_adamw_between_dense_gradients_matches_torch_adamw(monkeypatch) -> None:
    """Every 5th step a full softmax makes the table's gradient dense: the rows are caught up, AdamW's step is
    one pass over the table (7 rows at a time) with the decoupled decay, and the per-row catch-up starts again.
    On the training toy: float32 rounding fed back by training bounds the match at 1e-5 here."""
    from seater_dist.train import table_adam

    monkeypatch.setattr(table_adam, "TABLE_CHUNK_ROWS", 7)
    rule = TableRule("adamw", 1e-3, 0.5, "adamw, caught up per row", False)
    ours, reference = _train_pair(world=1, rank=0, n=60, steps=300, rule=rule, dense_every=5)
    assert float((ours - reference).abs().max()) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("rule", TABLE_RULES)
def test_table_adam_matches_torch_adam_on_a_dense_table_two_workers(rule) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dense_adam_worker, args=(r, 2, port, 60, 2000, queue, rule)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(err < 1e-5 for _, err, _ in results), [err for _, err, _ in results]
    assert results[0][2] == results[1][2]  # the workers' tables are identical, bit for bit


@pytest.mark.parametrize("kind,table_decay", [("adam", 0.0), ("adamw", 0.5)])
def test_caught_up_adam_defers_untouched_rows_and_resumes_exactly(kind, table_decay) -> None:
    """A step writes only the rows it touches: an untouched row moves when it is next read (or at catch_up),
    to where dense Adam/AdamW puts it (a row never touched: AdamW shrinks it by its decay factor each step);
    a run saved mid-way and resumed ends where an uninterrupted one does."""
    def trainer_for(model):
        return SparseTableDDP(model, "emb", lr=1e-2, weight_decay=0.0, table_optimizer=kind,
                              table_weight_decay=table_decay)

    torch.manual_seed(3)
    model = Toy(50)
    start = model.emb.weight.detach().clone()
    twin = Toy(50)
    twin.load_state_dict(model.state_dict())
    trainer = trainer_for(model)
    assert trainer.table_update == f"{kind}, caught up per row"
    for step in range(30):
        rows = torch.tensor([0, 1, 2]) if step < 10 else torch.tensor([0, 1])
        trainer.ddp(rows)["loss"].backward()
        trainer.step(grad_clip=None)
        if step == 14:  # saving catches every row up
            saved = copy.deepcopy({"optim": trainer.state_dict(), "model": model.state_dict()})
            rows_saved = model.emb.weight.detach()[[2, 30]].clone()
    # row 2 (last touched at step 9) and row 30 (never touched) not written since
    assert torch.equal(model.emb.weight.detach()[[2, 30]], rows_saved)
    trainer.catch_up()
    assert float((model.emb.weight.detach()[2] - rows_saved[0]).abs().max()) > 1e-3  # ...but caught up, it moved
    factor = torch.tensor(1 - 1e-2 * table_decay, dtype=torch.float32).double()  # as torch's mul_ applies it
    assert torch.allclose(model.emb.weight.detach()[30].double(), start[30].double() * factor**30, rtol=1e-6)

    twin.load_state_dict(saved["model"])
    resumed = trainer_for(twin)
    resumed.load_state_dict(saved["optim"])
    for step in range(15, 30):
        resumed.ddp(torch.tensor([0, 1]))["loss"].backward()
        resumed.step(grad_clip=None)
    resumed.catch_up()
    assert float((twin.emb.weight - model.emb.weight).detach().abs().max()) < 1e-6


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
        trainer.catch_up()
        moved[kind] = float((model.emb.weight.detach()[2] - start[2]).abs().max())  # row 2: touched at step 0 only
    assert moved["adam"] > 5 * moved["lazy_adam"] > 0
