"""Refuse, before any work starts, a stage the Ray cluster can never run.

Ray waits forever for a placement group or an actor that no node can hold ("No available node types can
fulfill resource request {'GPU': 1.0, 'CPU': 8.0}"), and a pipeline finds out only when it reaches the stage
that asks, after minutes of synth and prepare. Each stage's settings say what it asks for (:class:`Demand`);
:func:`require` compares that with what the cluster can ever provide, and fails with one line naming the
setting and the cluster's resources.

What "can ever provide" means depends on the cluster:

* an **autoscaling** cluster (KubeRay with ``enableInTreeAutoscaling``, the cluster launcher) publishes its
  node groups with their maximum counts to the GCS: the ceiling is the sum over groups of max count x each
  node's resources (the same figure Ray Train checks its worker group against); a demand above it is refused,
  one below it is left to the autoscaler;
* any other cluster (``ray start`` nodes, a laptop's local Ray) has no such record: it holds what its live
  nodes hold now, and each bundle must fit on one node.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class CapacityError(ValueError):
    """The cluster can never provide what a setting asks for (an input error: exit 2, not retried)."""


@dataclass(frozen=True)
class Demand:
    """``count`` Ray bundles (train workers, evaluation actors) of ``cpus`` CPUs and ``gpus`` GPUs each, asked
    for by the settings named ``what`` (e.g. "train: workers 8, cpus_per_worker 8, use_gpu true")."""

    what: str
    count: int
    cpus: float
    gpus: float


def require(demands: Sequence[Demand]) -> None:
    """Raise :class:`CapacityError` for the first demand the connected Ray cluster can never meet."""
    import ray

    if not ray.is_initialized():  # a stage run without a cluster starts a local Ray of this machine's size
        return
    ceiling = autoscaling_ceiling()
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for demand in demands:
        problem = shortfall(demand, nodes, ceiling)
        if problem:
            raise CapacityError(problem)


def autoscaling_ceiling() -> dict[str, float] | None:
    """The most of each resource an autoscaling cluster's node groups can ever add up to; None on a cluster
    without an autoscaler record (its live nodes are all it has)."""
    from ray._private import state  # Ray publishes the autoscaler's node groups only through its GCS state

    ceiling = state.state.get_max_resources_from_cluster_config()
    return {name: float(value) for name, value in ceiling.items()} if ceiling else None


def shortfall(demand: Demand, nodes: Sequence[Mapping[str, float]], ceiling: Mapping[str, float] | None) -> str | None:
    """Why ``demand`` can never be met by ``nodes`` (each live node's total resources) or, on an autoscaling
    cluster, by ``ceiling``; None when it can."""
    if ceiling is not None:
        for resource, each in (("CPU", demand.cpus), ("GPU", demand.gpus)):
            need, most = demand.count * each, ceiling.get(resource, 0.0)
            if need > most + 1e-9:
                return (f"{demand.what} asks for {_amount(need)} {resource} in all; this autoscaling cluster can "
                        f"grow to at most {_amount(most)} {resource} (its node groups' maximum counts)")
        return None
    fits = sum(_bundles_on(node, demand) for node in nodes)
    if fits >= demand.count:
        return None
    per = f"{_amount(demand.cpus)} CPU" + (f" and {_amount(demand.gpus)} GPU" if demand.gpus else "")
    return (f"{demand.what} asks for {demand.count} x ({per}); this cluster can hold {fits}: "
            f"{describe_nodes(nodes)}, no autoscaler")


def describe_nodes(nodes: Sequence[Mapping[str, float]]) -> str:
    """e.g. "2 nodes: 1 CPU, 0 GPU; 1 CPU, 0 GPU"."""
    shapes = "; ".join(f"{_amount(n.get('CPU', 0.0))} CPU, {_amount(n.get('GPU', 0.0))} GPU" for n in nodes)
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {shapes or 'none alive'}"


def _bundles_on(node: Mapping[str, float], demand: Demand) -> int:
    """How many of ``demand``'s bundles one node holds at once."""
    limits = [node.get(resource, 0.0) / each for resource, each in (("CPU", demand.cpus), ("GPU", demand.gpus))
              if each > 0]
    return min(math.floor(limit + 1e-9) for limit in limits) if limits else sys.maxsize


def _amount(x: float) -> str:
    return f"{x:g}"
