"""The files a user applies to a cluster are valid for the tool that reads them, and name code that exists.

* cluster/kuberay-*.yaml: the KubeRay CRDs' openAPIV3Schema (jsonschema; the version the manifest's
  apiVersion names), no field the API server would prune, rayVersion the installed Ray; the RayService's
  serveConfigV2 is a valid Serve config.
* cluster/ray-cluster-aws.yaml: the schema Ray ships (ray/autoscaler/ray-schema.json), then Ray's own
  checks, as `ray up` runs them before it touches AWS.
* Entry points and import paths: every `python jobs/...` command in cluster/ and the README (and the RayJob's
  entrypoint) names an existing script whose own argparse accepts the flags and whose preset's settings
  validate; every Serve import_path imports and names an existing builder; the RayJob's runtime env is one
  Ray accepts.

Each check is also shown to reject a broken copy of a manifest, so that a check that passes is a check.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
from contextlib import redirect_stderr
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
# As conftest finds the shared data: $SEATER_KUBERAY_CRDS, else beside the clone, else /work/shared.
CRDS = next((Path(c) for c in (os.environ.get("SEATER_KUBERAY_CRDS"), ROOT.parent / "shared" / "kuberay-crds",
                                 "/work/shared/kuberay-crds") if c and Path(c).is_dir()),
            ROOT.parent / "shared" / "kuberay-crds")
KUBERAY = {"RayCluster": "kuberay-raycluster.yaml", "RayJob": "kuberay-rayjob.yaml",
           "RayService": "kuberay-rayservice.yaml"}
LAUNCHER = ROOT / "cluster" / "ray-cluster-aws.yaml"
SERVE_CONFIGS = [ROOT / "serve" / "seater.yaml", ROOT / "serve" / "sasrec.yaml", ROOT / "serve" / "seater-single.yaml"]
# Files whose comments or text show `python jobs/... ` commands a user copies.
COMMAND_FILES = [*(ROOT / "cluster" / f for f in KUBERAY.values()), LAUNCHER, ROOT / "README.md"]


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------------------ the checks


@cache
def _crds() -> tuple[dict[str, Any], ...]:
    """Every CRD in CRDS, parsed once (with libyaml when present: the files are large)."""
    if not CRDS.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRDS} (set SEATER_KUBERAY_CRDS)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(yaml.load(path.read_text(), Loader=loader) for path in sorted(CRDS.glob("*.yaml")))


def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    """The openAPIV3Schema of the KubeRay CRD that defines ``kind`` at ``api_version`` (e.g. ray.io/v1)."""
    group, _, version = api_version.rpartition("/")
    for crd in _crds():
        if crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == group:
            served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
            assert version in served, f"{crd['metadata']['name']}: {api_version} is not served ({sorted(served)})"
            return served[version]["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD in {CRDS} defines {kind} in group {group}")


def _pruned_fields(doc: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Fields the API server would silently prune: not in ``properties`` of a schema that allows no others."""
    found = []
    if isinstance(doc, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        if "additionalProperties" not in schema:
            found += [f"{where}.{k}: unknown field" for k in doc if k not in schema["properties"]]
        for key, value in doc.items():
            if key in schema["properties"]:
                found += _pruned_fields(value, schema["properties"][key], f"{where}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, value in enumerate(doc):
            found += _pruned_fields(value, schema["items"], f"{where}[{i}]")
    return found


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    """Why the API server (or the operator) would refuse or mangle this KubeRay manifest; [] if it would not."""
    schema = crd_schema(doc["kind"], doc["apiVersion"])
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    errors += _pruned_fields(doc, schema)
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    if cluster.get("rayVersion") != ray.__version__:
        errors.append(f"rayVersion: {cluster.get('rayVersion')!r}, but the code runs on Ray {ray.__version__}")
    return errors


def launcher_errors(config: dict[str, Any]) -> list[str]:
    """What `ray up` would refuse in a cluster launcher config before it calls the cloud: the schema Ray ships,
    then its own checks on the config with the provider's defaults filled in."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    if not errors:
        try:
            validate_config(prepare_config(copy.deepcopy(config)))
        except (ValueError, RuntimeError, jsonschema.ValidationError) as err:
            errors.append(str(err))
    return errors


def _job_module(script: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"job_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_command_errors(command: str) -> list[str]:
    """Why ``python jobs/<script>.py <flags>``, submitted as a Ray job, would fail before doing any work: no such
    script, flags its argparse refuses, a preset whose settings do not validate, an --out it refuses."""
    words = shlex.split(command)
    if len(words) < 2 or words[0] != "python":
        return [f"{command}: not a `python <script>` command"]
    script = ROOT / words[1]
    if not script.is_file():
        return [f"{words[1]}: no such file in the repository"]
    job = _job_module(script)
    stderr = io.StringIO()
    try:
        with redirect_stderr(stderr):
            args = job.build_parser().parse_args(words[2:])
    except SystemExit:
        return [f"{command}: {stderr.getvalue().strip().splitlines()[-1]}"]
    try:
        job.run_settings(args.preset, args.storage)
        job.check_out(args.out, submitted=True)
    except ValueError as err:
        return [f"{command}: {err}"]
    return []


def import_path_errors(import_path: str) -> list[str]:
    """Why Serve could not load ``module:attribute`` (or ``module.attribute``); [] if it imports."""
    module_name, sep, attribute = import_path.partition(":")
    if not sep:
        module_name, _, attribute = import_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        return [f"{import_path}: {err}"]
    if not callable(getattr(module, attribute, None)):
        return [f"{import_path}: {module_name} has no callable {attribute!r}"]
    return []


def job_commands(text: str) -> list[str]:
    """Every ``python jobs/...py ...`` command in ``text`` (up to a shell operator or a trailing comment), comment
    markers and line continuations joined."""
    joined = re.sub(r"[ \t]*\\\n[ \t]*#?[ \t]*", " ", text)
    return [m.group(0).strip() for m in re.finditer(r"python (jobs/\S+)[^\n`|;&#]*", joined)]


def _serve_apps() -> list[tuple[str, dict[str, Any]]]:
    """(where, application) for every Serve application in serve/ and in the RayService."""
    apps = [(path.name, app) for path in SERVE_CONFIGS for app in _load(path)["applications"]]
    service = _load(ROOT / "cluster" / KUBERAY["RayService"])
    apps += [("RayService", app) for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]]
    return apps


# ------------------------------------------------------------------------------------------ the manifests


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_manifest_is_valid_against_its_crd(kind):
    doc = _load(ROOT / "cluster" / KUBERAY[kind])
    assert doc["kind"] == kind and doc["apiVersion"] == "ray.io/v1"
    assert kuberay_errors(doc) == []


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_clusters_turn_on_ray_token_authentication(kind):
    doc = _load(ROOT / "cluster" / KUBERAY[kind])
    cluster = {"RayCluster": lambda spec: spec, "RayJob": lambda spec: spec["rayClusterSpec"],
               "RayService": lambda spec: spec["rayClusterConfig"]}[kind](doc["spec"])
    assert cluster["authOptions"] == {"mode": "token"}


def test_kuberay_rayservice_serve_config_is_a_valid_serve_config_with_every_deployment():
    from ray.serve.schema import ServeDeploySchema

    from seater_dist.config import ServeArgs
    from seater_dist.serve.app import deployment_names

    doc = _load(ROOT / "cluster" / KUBERAY["RayService"])
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    app = serve_config.applications[0]
    ServeArgs.model_validate(app.args)
    assert [d.name for d in app.deployments] == deployment_names("seater", app.args["shards"])
    assert all(d.autoscaling_config for d in app.deployments)


def test_cluster_launcher_config_is_valid_for_ray_up():
    assert launcher_errors(_load(LAUNCHER)) == []


def test_rayjob_runs_the_tested_job_with_valid_flags_and_a_runtime_env_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    spec = _load(ROOT / "cluster" / KUBERAY["RayJob"])["spec"]
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("python jobs/train_microvideo.py ")  # the script tests/test_ray_job_submit.py submits
    assert job_command_errors(entrypoint) == []
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    # working_dir is a directory of the submitter pod (the head's image, which holds the repository there):
    # Ray checks that it exists when the submitter runs, so only its form is checked here.
    assert Path(env.pop("working_dir")).is_absolute()
    RuntimeEnv(**env)


def test_every_job_command_shown_in_cluster_files_and_the_readme_is_valid():
    commands = {str(path.relative_to(ROOT)): job_commands(path.read_text()) for path in COMMAND_FILES}
    assert commands["README.md"] and commands["cluster/ray-cluster-aws.yaml"], commands
    assert {where: [e for c in cs for e in job_command_errors(c)] for where, cs in commands.items()} == \
        {where: [] for where in commands}


def test_every_serve_import_path_imports_and_its_args_validate():
    from seater_dist.config import ServeArgs

    apps = _serve_apps()
    assert len(apps) == 4
    for where, app in apps:
        assert import_path_errors(app["import_path"]) == [], where
        ServeArgs.model_validate(app["args"])


# ------------------------------------------------------------------------------------------ broken copies


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``doc`` with the dotted ``path`` (list indices as numbers) set to ``value``."""
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for p in parents:
        node = node[p]
    node[last] = value
    return doc


@pytest.mark.parametrize("kind, path", [
    ("RayCluster", "spec.workerGroupSpecs.0.replicas"),
    ("RayJob", "spec.rayClusterSpec.workerGroupSpecs.0.replicas"),
    ("RayService", "spec.rayClusterConfig.workerGroupSpecs.0.replicas"),
])
def test_kuberay_check_rejects_a_wrong_field_type(kind, path):
    doc = _set(_load(ROOT / "cluster" / KUBERAY[kind]), path, "two")
    assert any("'two' is not of type 'integer'" in e for e in kuberay_errors(doc))


def test_kuberay_check_rejects_a_misspelt_field_and_another_ray_version():
    doc = _load(ROOT / "cluster" / KUBERAY["RayJob"])
    errors = kuberay_errors(_set(doc, "spec.shutdownAfterJobFinish", True))
    assert errors == [".spec.shutdownAfterJobFinish: unknown field"]
    assert kuberay_errors(_set(doc, "spec.rayClusterSpec.rayVersion", "2.9.0"))


def test_launcher_check_rejects_a_wrong_field_type_and_a_missing_head_type():
    config = _load(LAUNCHER)
    assert any("is not of type 'integer'" in e for e in launcher_errors(_set(config, "max_workers", "twelve")))
    assert launcher_errors(_set(config, "head_node_type", "no_such_type"))


@pytest.mark.parametrize("command, problem", [
    ("python jobs/train_microvideo.py --preset nope --out /mnt/x", "invalid choice: 'nope'"),
    ("python jobs/train_microvideo.py --preset tiny --out /mnt/x --epochs 3", "unrecognized arguments"),
    ("python jobs/train_microvideo.py --preset tiny --out runs/x", "relative"),
    ("python jobs/no_such_job.py --preset tiny", "no such file"),
])
def test_job_command_check_rejects_a_broken_command(command, problem):
    errors = job_command_errors(command)
    assert len(errors) == 1 and problem in errors[0], errors


@pytest.mark.parametrize("import_path", ["seater_dist.serve.app:no_such_builder", "seater_dist.no_such:build_app"])
def test_import_path_check_rejects_a_missing_module_or_attribute(import_path):
    assert import_path_errors(import_path)


def test_commands_are_found_across_comment_continuation_lines():
    text = ("#   ray job submit --working-dir . -- python jobs/train_microvideo.py \\\n"
            "#       --preset microvideo --out /mnt/efs/seater\n")
    assert job_commands(text) == ["python jobs/train_microvideo.py --preset microvideo --out /mnt/efs/seater"]


def test_rayservice_serves_the_checkpoint_the_rayjob_writes():
    job = _load(ROOT / "cluster" / KUBERAY["RayJob"])
    args = _job_module(ROOT / "jobs" / "train_microvideo.py").build_parser().parse_args(
        shlex.split(job["spec"]["entrypoint"])[2:])
    service = _load(ROOT / "cluster" / KUBERAY["RayService"])
    checkpoint = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["checkpoint"]
    assert checkpoint == f"{args.out.rstrip('/')}/seater/best"
