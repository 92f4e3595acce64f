"""Every adaptation in seater_dist/runtime (its __init__ lists them) relies on Ray internals of the pinned Ray:
this file fails, in one place, when an upgrade moves one of them. On a new Ray, re-check each adaptation
against the new source, then update RAY_VERSION."""

from __future__ import annotations

import importlib
import inspect

import ray

from seater_dist.runtime import errors, quiet

RAY_VERSION = "2.60.0"


def test_ray_is_the_version_the_runtime_was_written_against():
    assert ray.__version__ == RAY_VERSION, (
        f"Ray {ray.__version__}: seater_dist/runtime adapts to Ray {RAY_VERSION}'s internals; re-check each "
        "adaptation listed in seater_dist/runtime/__init__.py, then update RAY_VERSION here")


def test_the_private_names_the_runtime_uses_exist():
    from ray._private import ray_constants
    from ray._raylet import Config
    from ray.serve._private import replica
    from ray.train.torch import config as torch_config
    from ray.train.v2._internal.execution import context, failure_handling
    from ray.train.v2.api import data_parallel_trainer

    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)  # ray_env._make_private
    assert callable(Config.initialize)
    assert callable(replica.add_port_to_grpc_server)  # ray_env.keep_serve_replica_on_loopback
    assert callable(data_parallel_trainer.create_failure_policy)  # train_fit.input_errors_fail_fast
    assert failure_handling.DefaultFailurePolicy and failure_handling.FailureDecision.RAISE
    assert torch_config._TorchBackend.on_start and callable(torch_config._set_torch_distributed_env_vars)
    assert context.__file__  # train_fit.quiet_train_worker: the logger named by this file
    from ray._private import state

    assert callable(state.state.get_max_resources_from_cluster_config)  # capacity.autoscaling_ceiling


def test_serve_replicas_still_bind_their_grpc_server_as_keep_serve_replica_on_loopback_expects():
    from ray.serve._private import replica

    assert 'add_port_to_grpc_server(self._server, "[::]:0")' in inspect.getsource(replica)


def test_the_loggers_the_runtime_quiets_still_exist():
    for name in [*errors._DUPLICATE_REPORTS, quiet.PROGRESS_LOGGER, "ray.train.v2._internal.util"]:
        importlib.import_module(name)  # a logger named after a module that moved would filter nothing


# ------------------------------------------------------------------------------------------ capacity

CPU_NODE = {"CPU": 1.0, "memory": 1e9}


def test_a_gpu_demand_on_cpu_nodes_without_an_autoscaler_names_the_setting_and_the_nodes():
    from seater_dist.runtime.capacity import Demand, shortfall

    gpu = Demand("train: workers 8, cpus_per_worker 8, use_gpu true", 8, 8.0, 1.0)
    problem = shortfall(gpu, [CPU_NODE, CPU_NODE], None)
    assert problem is not None and "\n" not in problem
    for says in ("train: workers 8, cpus_per_worker 8, use_gpu true", "8 x (8 CPU and 1 GPU)", "can hold 0",
                 "2 nodes: 1 CPU, 0 GPU; 1 CPU, 0 GPU", "no autoscaler"):
        assert says in problem, problem


def test_each_bundle_must_fit_on_one_node_and_fractional_cpus_pack():
    from seater_dist.runtime.capacity import Demand, shortfall

    assert shortfall(Demand("train", 4, 0.5, 0.0), [CPU_NODE, CPU_NODE], None) is None  # 2 per node
    assert "can hold 2" in shortfall(Demand("train", 4, 1.0, 0.0), [CPU_NODE, CPU_NODE], None)
    assert "can hold 0" in shortfall(Demand("train", 1, 2.0, 0.0), [CPU_NODE, CPU_NODE], None)  # 2 CPUs, no node
    assert shortfall(Demand("train", 2, 1.0, 1.0), [{"CPU": 4.0, "GPU": 2.0}], None) is None


def test_an_autoscaling_cluster_is_held_to_its_node_groups_ceiling_not_its_live_nodes():
    from seater_dist.runtime.capacity import Demand, shortfall

    ceiling = {"CPU": 64.0, "GPU": 8.0}
    assert shortfall(Demand("train", 8, 8.0, 1.0), [CPU_NODE], ceiling) is None  # the autoscaler adds the nodes
    problem = shortfall(Demand("train: workers 16", 16, 8.0, 1.0), [CPU_NODE], ceiling)
    assert "train: workers 16" in problem and "128 CPU" in problem and "at most 64 CPU" in problem
    assert "autoscaling" in problem
    assert "at most 0 GPU" in shortfall(Demand("eval", 1, 1.0, 1.0), [], {"CPU": 64.0})
