"""The process group of the Train workers, bound to the address Ray uses for each node.

torch's TCPStore listens on every interface whatever MASTER_ADDR says, and Ray Train 2.60's TorchConfig has
no setting for it: :func:`bound_torch_config` is Ray's TorchConfig with its backend's ``on_start`` replaced,
so that rank 0 binds the store's socket itself (127.0.0.1 on a command's private Ray, the node's cluster
address on a cluster) and every rank's gloo/NCCL sockets use the interface of its own node's Ray address.
"""

from __future__ import annotations

from typing import Any


def bound_torch_config() -> Any:
    """Ray Train's TorchConfig, except that the process group's rendezvous (the TCPStore on rank 0, and gloo's
    or NCCL's sockets) listens only on the address Ray uses for each node: 127.0.0.1 for the local Ray that
    ``init_ray`` starts, the node's cluster address on a cluster. (torch's TCPStore otherwise listens on every
    interface, whatever MASTER_ADDR says.)"""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    backend = type("BoundTorchBackend", (_TorchBackend,), {"on_start": _start_bound_process_group})
    config = type("BoundTorchConfig", (TorchConfig,), {"backend_cls": property(lambda self: backend)})
    return config()


def _start_bound_process_group(self: Any, worker_group: Any, backend_config: Any) -> None:
    """``on_start`` of the bound backend (runs in the Train controller): rank 0 binds the store's socket on
    its node address, every rank joins the process group through it."""
    import ray
    from ray.train.torch.config import _set_torch_distributed_env_vars

    gpus = worker_group.get_resources_per_worker().get("GPU", 0)
    backend = process_group_backend(backend_config.backend, gpus)
    address, port = worker_group.execute_single(0, _bind_store_socket)
    worker_group.execute(_set_torch_distributed_env_vars)
    world = len(worker_group)
    ray.get([worker_group.execute_single_async(rank, _join_process_group, backend=backend, address=address,
                                               port=port, world_rank=rank, world=world,
                                               timeout_s=backend_config.timeout_s)
             for rank in range(world)])


_store_socket: Any = None  # rank 0: the listening socket of the process group's store (open for the run)


def _bind_store_socket() -> tuple[str, int]:
    """Rank 0: listen on this node's Ray address, on a free port. -> (address, port)."""
    import socket

    import ray

    global _store_socket
    address = ray.util.get_node_ip_address()
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    sock.listen(socket.SOMAXCONN)
    _store_socket = sock
    return address, sock.getsockname()[1]


def _join_process_group(backend: str, address: str, port: int, world_rank: int, world: int, timeout_s: int) -> None:
    """Every rank: the process group over rank 0's store, its own sockets on its own node's Ray address."""
    import os
    from datetime import timedelta

    import ray
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    for name, value in process_group_env(backend, _interface_of(ray.util.get_node_ip_address())).items():
        os.environ.setdefault(name, value)  # the user's own choice, if any, wins
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world, world_rank == 0, timeout=timeout,
                          master_listen_fd=_store_socket.fileno() if world_rank == 0 else None)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world, timeout=timeout)


def process_group_backend(configured: str | None, gpus_per_worker: float) -> str:
    """The process group's backend: ``configured`` if set, else NCCL for CUDA tensors beside gloo for CPU
    tensors on GPU workers ("cpu:gloo,cuda:nccl": the loop's host-side bookkeeping, a flag or a count, needs no
    copy to the GPU and no device sync), gloo alone on CPU workers. Plain "nccl" serves CUDA tensors only."""
    if configured is not None:
        return configured
    return "cpu:gloo,cuda:nccl" if gpus_per_worker > 0 else "gloo"


def process_group_env(backend: str, interface: str | None) -> dict[str, str]:
    """Environment a rank sets (unless already set) before it joins a process group over ``backend``.

    Both socket-interface variables name ``interface`` (the one holding the node's Ray address), since a
    "cpu:gloo,cuda:nccl" group opens gloo's and NCCL's sockets. With NCCL, TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    (as Ray Train's own setup does) makes a timed-out or failed collective abort the worker, so that Ray Train
    restarts the group instead of waiting forever; not set when the user chose TORCH_NCCL_BLOCKING_WAIT."""
    import os

    env = {}
    if interface:
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = interface
    if "nccl" in backend and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    return env


def _interface_of(address: str) -> str | None:
    """The name of the network interface that holds ``address`` (``lo`` for 127.0.0.1), or None."""
    try:
        import psutil
    except ImportError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    return None

