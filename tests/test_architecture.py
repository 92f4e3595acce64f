"""The package's import graph points one way: cli/jobs -> pipeline -> train, eval, serve -> model ->
tree, data -> config, settings, formats, files, artifacts. No two modules import each other, directly or
in a cycle. Only the artifact layer (seater_dist/artifacts/) tells a URI from a local path."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "seater_dist"
JOBS = Path(__file__).resolve().parents[1] / "jobs"

# Lower number = lower layer; a module may import only from its own layer or below.
LAYERS = {
    "seater_dist.config": 0, "seater_dist.settings": 0, "seater_dist.formats": 0, "seater_dist.artifacts": 0,
    "seater_dist.runtime": 0, "seater_dist.files": 0,
    "seater_dist.tree": 1, "seater_dist.data": 1,
    "seater_dist.model": 2,
    "seater_dist.train": 3, "seater_dist.eval": 3, "seater_dist.serve": 3,
    "seater_dist.pipeline": 4,
    "seater_dist.cli": 5, "seater_dist.cli_parser": 5, "seater_dist": 5,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every seater_dist module ``name`` imports, anywhere in the file (lazy imports count too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import module` imports that module; `from pkg import name` imports pkg itself
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {m for m in found if m in known and m != name and not m.startswith(name + ".")}


def _layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)  # raises ValueError (max of nothing) for a module outside every layer


def test_no_import_runs_up_the_layers():
    upward = sorted(f"{a} -> {b}" for a, deps in _graph().items() for b in deps
                    if _layer(b) > _layer(a) and not (a == "seater_dist" and b.startswith("seater_dist.")))
    assert upward == []


def test_no_lower_layer_imports_train_pipeline_or_cli():
    low = ("seater_dist.eval", "seater_dist.model", "seater_dist.tree", "seater_dist.data")
    high = ("seater_dist.train", "seater_dist.pipeline", "seater_dist.cli")
    bad = sorted(f"{a} -> {b}" for a, deps in _graph().items() for b in deps
                 if a.startswith(low) and b.startswith(high))
    assert bad == []


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ re-exporting its own modules is not a cycle between ideas
    cycles = [c for c in cycles if not all(p.startswith(c.split(" -> ")[0]) for p in c.split(" -> "))]
    assert cycles == []


def _private_ray_uses(path: Path) -> list[str]:
    """Imports of Ray's private modules or names (a path part or an imported name starting with "_": ray._private,
    ray.serve._private, ray.train.v2._internal, ray.train.torch.config._TorchBackend) and dotted strings naming
    them (a logger or module looked up by name) in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if node.value.startswith("ray.") and " " not in node.value else []
        found += [f"{path.name}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] == "ray" and any(part.startswith("_") for part in name.split(".")[1:])]
    return found


def test_only_the_runtime_package_touches_private_ray():
    outside = [use for name, path in _modules().items() if not name.startswith("seater_dist.runtime")
               for use in _private_ray_uses(path)]
    assert outside == []
    inside = [use for name, path in _modules().items() if name.startswith("seater_dist.runtime")
              for use in _private_ray_uses(path)]
    assert inside, "the check found nothing in the runtime package: it no longer sees private imports"


_URI_TEST = re.compile(r"""["'][^"'\n]*://["']\s*(not\s+)?in\b|(startswith|endswith)\(\s*["'][^"'\n]*://""")


def _uri_tests(path: Path) -> list[str]:
    """Lines of one file that tell a URI from a path by its "://" (``"://" in x``, ``x.startswith("s3://")``)."""
    return [f"{path.name}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if _URI_TEST.search(line)]


def test_only_the_artifact_layer_tells_a_uri_from_a_path():
    """Local or remote is decided in seater_dist/artifacts/ alone; everything else asks it (resolve, location,
    path_or_uri, writer_lock, atomic_dir, ...) instead of looking for "://" itself."""
    layer = PACKAGE / "artifacts"
    files = [*PACKAGE.rglob("*.py"), *JOBS.rglob("*.py")]
    outside = [use for path in files if layer not in path.parents for use in _uri_tests(path)]
    assert outside == []
    inside = [use for path in layer.rglob("*.py") for use in _uri_tests(path)]
    assert inside, "the check found nothing in the artifact layer: it no longer sees a URI test"
