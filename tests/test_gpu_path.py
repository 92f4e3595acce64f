"""The GPU path, checked on a CPU: every collective of the training loop has a backend in the process group a
GPU worker group gets, the rendezvous sets what NCCL and gloo need, the device fingerprint is exact, SASRec's
top-k on a device equals faiss's, and `python -m bench.gpu_check` skips cleanly without a GPU.

A GPU worker's group maps each device type to a backend (torch's BackendConfig): a tensor on a device type
without one fails with "No backend type associated with device type ...". ``two_gpu_workers`` replays the
loop's collectives against that map for two identical workers, as a GPU worker would see their tensors: the
model is on the CPU here, standing for the worker's GPU, and torch's default device is set to "meta", standing
for the worker's CPU (where a tensor created without naming its device lands).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, BackendConfig
from torch.overrides import TorchFunctionMode

from bench.synthetic import random_balanced_tree
from seater_dist.config import SasrecSettings, SeaterSettings
from seater_dist.model.sasrec import SASRec, topk_inner_product, topk_on_device
from seater_dist.model.seater import SeaterModel
from seater_dist.runtime.rendezvous import process_group_backend, process_group_env
from seater_dist.train import loop
from seater_dist.train.sparse_table import SparseTableDDP

ROOT = Path(__file__).resolve().parents[1]


class TwoWorkerGroup:
    """torch.distributed's collectives for two identical workers, refusing (as a real group does) a tensor
    whose device type, as a GPU worker sees it (meta -> cpu, the CPU -> cuda), has no backend in ``backend``'s
    map. Records (collective, device type on the GPU worker) of every call."""

    def __init__(self, backend: str) -> None:
        self.devices = BackendConfig(Backend(backend)).get_device_backend_map()
        self.calls: list[tuple[str, str]] = []

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        on_gpu_worker = "cpu" if tensor.device.type == "meta" else "cuda"
        if on_gpu_worker not in self.devices:
            raise RuntimeError(f"{name}: No backend type associated with device type {on_gpu_worker}")
        self.calls.append((name, on_gpu_worker))

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, **_) -> None:
        self._check("all_reduce", tensor)
        if op == dist.ReduceOp.SUM:
            tensor.mul_(2)

    def all_gather(self, out: list[torch.Tensor], tensor: torch.Tensor, **_) -> None:
        self._check("all_gather", tensor)
        for target in out:
            target.copy_(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0, **_) -> None:
        self._check("broadcast", tensor)


@pytest.fixture
def two_gpu_workers(monkeypatch):
    """Enter a two-worker group with the backend the rendezvous picks for workers with one GPU each."""

    def enter(default_device: str = "meta") -> TwoWorkerGroup:
        group = TwoWorkerGroup(process_group_backend(None, gpus_per_worker=1))
        for name in ("all_reduce", "all_gather", "broadcast"):
            monkeypatch.setattr(dist, name, getattr(group, name))
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        torch.set_default_device(default_device)
        return group

    yield enter
    torch.set_default_device(None)


def _seater() -> tuple[SeaterModel, SparseTableDDP, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    tree = random_balanced_tree(40, 4, seed=0)
    model = SeaterModel(tree, SeaterSettings(d_model=16, n_heads=2, ffn_dim=32, history_len=5, beam_size=8),
                        sparse_embedding=True)
    trainer = SparseTableDDP(model, "tok_emb", lr=1e-3, weight_decay=1e-5, device=torch.device("cpu"))
    history = torch.tensor([[tree.pad, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    return model, trainer, {"history": history, "target": torch.tensor([10, 11])}


def test_a_gpu_worker_group_has_a_backend_for_every_collective_the_loop_makes(two_gpu_workers):
    model, trainer, batch = _seater()
    histories = [np.array([1, 2, 3]), np.array([7])]
    truth = [np.array([4]), np.array([8, 9])]
    group = two_gpu_workers()

    # In the loop's order: a step, then the epoch's bookkeeping.
    assert loop._everyone_has(True) is True
    model(batch["history"], batch["target"])["loss"].backward()
    trainer.step(grad_clip=1.0)  # the table's row all-gather
    assert loop._sum_all(3) == 6
    metrics = loop._validate(None, model, histories, truth, [5], torch.device("cpu"))
    assert loop._params_identical_across_workers(model)

    names = {name for name, _ in group.calls}
    assert names == {"all_reduce", "all_gather"} and len(group.calls) >= 5
    assert set(metrics) >= {"recall@5", "hr@5", "ndcg@5"}


class HostReads(TorchFunctionMode):
    """Records every read of a tensor's value by the host (on a GPU: a wait for the device), except reads of
    ``exempt`` (tensors that live on the host by design)."""

    READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"}

    def __init__(self, exempt: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.exempt = exempt
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS and not any(args[0] is t for t in self.exempt):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_two_device_values_whatever_the_number_of_workers(two_gpu_workers):
    """The row counts of the table's all-gather (sizes to allocate) and the chunk bounds of the whole-table
    Adam pass; the clipping norm and the per-worker counts stay on the device. Adam's step counts live on the
    host (torch's single-tensor Adam, as on a CPU; fused Adam on CUDA keeps them on the GPU): not device reads."""
    model, trainer, batch = _seater()
    two_gpu_workers(default_device="cpu")  # only the reads matter here
    for step in range(3):
        model(batch["history"], batch["target"])["loss"].backward()
        optimizers = (trainer.dense_optimizer, trainer.table_optimizer)
        steps = tuple(state["step"] for o in optimizers for state in o.state.values())
        with HostReads(exempt=steps) as host:
            stats = trainer.step(grad_clip=1e-3)  # clipping applies
        if step > 0:  # the first step creates the optimisers' state
            assert host.reads == ["tolist", "tolist"], step
    assert stats.grad_norm.dtype == torch.float64 and float(stats.grad_norm) > 1e-3


def test_input_checks_read_no_device_value():
    """On a device (meta stands for it) the model's and loss's id checks are skipped: each would be a sync."""
    from seater_dist.model import losses

    with torch.device("meta"):
        tree = random_balanced_tree(40, 4, seed=0)
        model = SeaterModel(tree, SeaterSettings(d_model=16, n_heads=2, ffn_dim=32, history_len=5), trainable=False)
        memory, _ = model.encode(torch.zeros(2, 5, dtype=torch.long))
        loss = losses.generation_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long),
                                      torch.zeros(2, 3, dtype=torch.long))
    assert memory.shape == (2, 5, 16) and loss.device.type == "meta"
    with pytest.raises(ValueError, match="history holds token"):  # on the host they still run
        SeaterModel(tree, SeaterSettings(d_model=16, n_heads=2, ffn_dim=32, history_len=5)).encode(
            torch.full((1, 5), -1))


def test_a_gpu_worker_group_serves_cpu_and_cuda_tensors_where_plain_nccl_serves_cuda_only():
    """The loop's host bookkeeping (a flag, a count, metric sums) is on the CPU: it needs gloo beside NCCL."""
    gpu_group = BackendConfig(Backend(process_group_backend(None, gpus_per_worker=1))).get_device_backend_map()
    assert {str(gpu_group["cpu"]), str(gpu_group["cuda"])} == {"gloo", "nccl"}
    assert "cpu" not in BackendConfig(Backend("nccl")).get_device_backend_map()
    with pytest.raises(RuntimeError, match="device type cpu"):
        TwoWorkerGroup("nccl").all_reduce(torch.ones(1, device="meta"))
    assert process_group_backend(None, gpus_per_worker=0) == "gloo"  # CPU runs unchanged
    assert process_group_backend("gloo", gpus_per_worker=1) == "gloo"  # an explicit choice wins


def test_rendezvous_sets_both_socket_interfaces_and_keeps_nccl_async_error_handling(monkeypatch):
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                 "TORCH_NCCL_BLOCKING_WAIT"):
        monkeypatch.delenv(name, raising=False)
    gpu = process_group_env("cpu:gloo,cuda:nccl", "eth1")
    assert gpu == {"GLOO_SOCKET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "eth1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in process_group_env("gloo", "lo")
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "1")  # the user's choice of error handling is kept
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in process_group_env("cpu:gloo,cuda:nccl", "eth1")


def test_a_rank_joins_with_both_interfaces_set_to_its_ray_address(monkeypatch):
    """A real one-rank gloo group through the bound rendezvous, on loopback."""
    import ray.util

    from seater_dist.runtime import rendezvous

    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    address, port = rendezvous._bind_store_socket()
    try:
        rendezvous._join_process_group("gloo", address, port, world_rank=0, world=1, timeout_s=30)
        assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"
        assert dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        rendezvous._store_socket.detach()  # the store owns (and closed) the listening socket


def test_fingerprint_is_exact_and_chunked(monkeypatch):
    monkeypatch.setattr(loop, "FINGERPRINT_CHUNK", 7)  # many chunks, the last one short
    t = torch.randn(10, 9)
    fp = loop.fingerprint(t)
    assert fp.dtype == torch.int64 and fp.shape == (2,)
    monkeypatch.setattr(loop, "FINGERPRINT_CHUNK", 1 << 20)
    assert torch.equal(loop.fingerprint(t), fp)  # chunking changes nothing
    nudged = t.clone()
    nudged[9, 8] = torch.nextafter(nudged[9, 8], torch.tensor(np.inf))  # one ulp of one element
    assert not torch.equal(loop.fingerprint(nudged), fp)
    swapped = t.clone()
    swapped[[0, 1]] = t[[1, 0]]  # the same values in other places
    assert not torch.equal(loop.fingerprint(swapped), fp)


@pytest.mark.parametrize("k", [5, 40])
def test_topk_on_device_in_item_chunks_equals_faiss(k):
    rng = np.random.default_rng(0)
    users = rng.normal(size=(6, 8)).astype(np.float32)
    items = rng.normal(size=(30, 8)).astype(np.float32)
    expected_ids, expected_scores = topk_inner_product(users, items, k)
    ids, scores = topk_on_device(torch.from_numpy(users), torch.from_numpy(items), k, chunk=7)
    np.testing.assert_array_equal(ids.numpy(), expected_ids)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5)  # -inf past N in both


def test_sasrec_builds_its_faiss_index_once_per_table(monkeypatch):
    from seater_dist.model import sasrec

    model = SASRec(50, SasrecSettings(max_len=5, d_model=8, n_heads=2, num_blocks=1))
    built, build = [], sasrec.flat_index
    monkeypatch.setattr(sasrec, "flat_index", lambda table: built.append(1) or build(table))
    histories = [np.array([1, 2]), np.array([3])]
    first = model.topk(histories, 10)
    model.topk(histories, 10)
    assert len(built) == 1  # reused while the table is unchanged
    with torch.no_grad():
        model.item_emb.weight[:50].mul_(-1)  # an optimiser step changes the table in place
    assert not np.array_equal(model.topk(histories, 10), first) and len(built) == 2


def test_gpu_check_says_it_skipped_and_succeeds_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run `make gpu-check` itself")
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no GPU: skipped"


def test_evaluation_actors_load_the_checkpoint_onto_the_gpu_ray_gave_them(monkeypatch):
    import ray

    from seater_dist.eval import offline

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # as Ray sets it for the actor: torch's cuda:0
    assert offline.actor_device() == torch.device("cuda", 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")  # every GPU of the node visible: torch's cuda:1
    assert offline.actor_device() == torch.device("cuda", 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    loaded = {}
    monkeypatch.setattr(offline, "load_checkpoint", lambda path, map_location: loaded.update(at=map_location))
    offline._BatchScorer("ckpt", (20,), threads=1)
    assert loaded["at"] == torch.device("cuda", 0)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])  # an actor without a GPU ranks on the CPU
    assert offline.actor_device() == torch.device("cpu")


def test_sasrec_index_shards_reserve_no_gpu(tmp_path):
    """They search a CPU faiss index; the encoder, which runs the model, keeps its share of a GPU."""
    from seater_dist.model.checkpoint import save_checkpoint
    from seater_dist.serve.app import build_app

    model = SASRec(10, SasrecSettings(max_len=5, d_model=8, n_heads=2, num_blocks=1))
    save_checkpoint(tmp_path / "ckpt", model, model.settings, np.array([str(i) for i in range(10)]))
    router = build_app({"checkpoint": str(tmp_path / "ckpt"), "shards": 2, "gpu": True})._bound_deployment
    encoder, shards = router.init_args[0]._bound_deployment, [s._bound_deployment for s in router.init_args[1]]
    assert [s.name for s in shards] == ["IndexShard0", "IndexShard1"]
    assert all("num_gpus" not in s.ray_actor_options for s in shards)
    assert encoder.ray_actor_options["num_gpus"] == 0.5 and "num_gpus" not in router.ray_actor_options


def test_gpu_check_fails_a_run_that_left_the_gpu_unused_or_drifted():
    from bench import gpu_check

    assert gpu_check.settings(use_gpu=True).train.use_gpu and gpu_check.settings(use_gpu=True).eval.use_gpu
    metrics = {m: 0.2 for m in gpu_check.METRICS}

    def run(peak: int, device: str, drift: float = 0.0) -> dict:
        return {model: {"metrics": {m: v + drift for m, v in metrics.items()}, "devices": [device],
                        "history": [{"gpu_peak_bytes": peak}]} for model in gpu_check.MODELS}

    rescored = {model: dict(metrics) for model in gpu_check.MODELS}
    assert gpu_check.checks(run(0, "cpu"), run(1 << 20, "cuda:0", drift=0.01), rescored) == []
    failed = gpu_check.checks(run(0, "cpu"), run(0, "cpu", drift=0.2), rescored)
    assert any("did not allocate GPU memory" in f for f in failed)
    assert any("ranked on ['cpu']" in f for f in failed)
    assert any("GPU-trained" in f for f in failed)


def test_the_microvideo_preset_trains_and_evaluates_on_gpus():
    from jobs.train_microvideo import run_settings

    settings = run_settings("microvideo")
    assert settings.train.use_gpu and settings.sasrec_train.use_gpu and settings.eval.use_gpu
