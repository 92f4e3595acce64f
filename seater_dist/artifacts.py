"""What every stage's artifact directory shares: atomic writes, a manifest written last, checksums.

An artifact is a directory holding ``manifest.json``: the artifact's kind, schema version, what made it,
and the sha256 of each of its files by path relative to the directory. A directory without a valid
manifest is not an artifact, so a reader never takes half of one for a whole.

    with atomic_dir("runs/b/tree", "tree") as tmp:  # a temp dir beside the destination
        np.save(tmp / "codes.npy", codes)
        write_manifest(tmp, {"artifact": "tree", "schema_version": 1})   # checksums every file, last
    manifest = read_manifest("runs/b/tree", "tree", 1)
    verify_files("runs/b/tree", manifest)           # every listed file present, inside, unchanged
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact directory that is missing, incomplete, altered or of another kind; names the file."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def to_jsonable(x: Any) -> Any:
    """``json.dumps(default=...)`` hook: numpy scalars and arrays as Python values."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def check_replaceable(dest: str | os.PathLike, artifact: str) -> None:
    """Refuse to replace ``dest`` unless it is absent, an empty directory, or an ``artifact`` artifact:
    a stage never deletes what it did not write."""
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_dir() and not dest.is_symlink():
        if not any(dest.iterdir()):
            return
        try:
            if json.loads((dest / MANIFEST).read_text()).get("artifact") == artifact:
                return
        except (OSError, ValueError, AttributeError):
            pass
    raise ArtifactError(f"{dest}: exists and is not a {artifact} directory; refusing to replace it "
                        "(choose another output path or remove it yourself)")


@contextmanager
def atomic_dir(dest: str | os.PathLike, artifact: str) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dest``; on success it replaces ``dest`` by renames.

    ``dest`` may only be replaced if it is an ``artifact`` artifact already (:func:`check_replaceable`).
    On any exception (Ctrl-C included) the temporary directory is removed and ``dest`` is untouched.
    An existing ``dest`` is moved aside first and deleted only once the new one is in place.
    """
    dest = Path(dest)
    check_replaceable(dest, artifact)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished directory ``tmp`` at ``dest`` by renames (see :func:`atomic_dir`)."""
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every regular file under ``directory`` and write ``manifest.json`` (last). -> the manifest."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {**manifest, "checksums": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}}
    text = json.dumps(manifest, indent=2, sort_keys=True, default=to_jsonable)
    (directory / MANIFEST).write_text(text)
    return manifest


def read_manifest(directory: str | os.PathLike, artifact: str, schema_version: int,
                  error: type[ValueError] = ArtifactError) -> dict[str, Any]:
    """``directory/manifest.json``, checked for its kind and schema version; ``error`` names the file."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise error(f"{directory}: not a {artifact} directory (it does not exist or is a file)")
    if not path.is_file():
        raise error(f"{directory}: not a {artifact} directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise error(f"{path}: expected a JSON object")
    if manifest.get("artifact") != artifact:
        raise error(f"{path}: this is a {manifest.get('artifact')!r} artifact, expected {artifact!r}")
    if manifest.get("schema_version") != schema_version:
        raise error(f"{path}: schema_version {manifest.get('schema_version')!r}, this version of seater-dist "
                    f"reads {schema_version}; re-create it with this version")
    if not isinstance(manifest.get("checksums"), dict):
        raise error(f"{path}: no checksums")
    return manifest


def member(directory: str | os.PathLike, name: str, error: type[ValueError] = ArtifactError) -> Path:
    """The regular file ``name`` (relative, as a manifest lists it) inside ``directory``, safely.

    Refuses absolute names, ``..``, symlinks that leave the directory, and anything that is not a
    regular file (a FIFO would hang a reader).
    """
    directory = Path(directory)
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in name:
        raise error(f"{directory / MANIFEST}: names {name!r}, which is not a path inside the artifact")
    path = directory.joinpath(*rel.parts)
    root = directory.resolve()
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise error(f"{path}: missing from the artifact (listed in its {MANIFEST})") from None
    if root != resolved and root not in resolved.parents:
        raise error(f"{path}: leaves the artifact directory (a symlink to {resolved})")
    if not stat.S_ISREG(resolved.stat().st_mode):
        raise error(f"{path}: not a regular file")
    return path


def verify_files(directory: str | os.PathLike, manifest: dict[str, Any], names: list[str] | None = None,
                 error: type[ValueError] = ArtifactError) -> None:
    """Check that every file the manifest lists (or ``names`` of them) is inside and unchanged."""
    checksums = manifest["checksums"]
    for name in checksums if names is None else names:
        if name not in checksums:
            raise error(f"{Path(directory) / MANIFEST}: does not list {name}")
        path = member(directory, name, error)
        if sha256_file(path) != checksums[name]:
            raise error(f"{path}: checksum mismatch (the file changed after the artifact was written)")
