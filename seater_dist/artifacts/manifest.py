"""What makes a directory an artifact: ``manifest.json``, written last, and the one verification on read.

An artifact is a directory holding ``manifest.json``: the artifact's kind, schema version, what made it,
and the sha256 of each of its files by path relative to the directory. A directory without a valid
manifest is not an artifact, so a reader never takes half of one for a whole.

    write_manifest(tmp, {"artifact": "tree", "schema_version": 1})   # checksums every file, last
    manifest = read_manifest("runs/b/tree", "tree", 1)               # a path or a URI: the manifest alone
    verify_files("runs/b/tree", manifest)     # every listed file present, inside, regular, unchanged
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from seater_dist.artifacts.fs import ArtifactError, join, path_or_uri, resolve

MANIFEST = "manifest.json"


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


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every regular file under ``directory`` (a nested artifact's manifest too) and write
    ``manifest.json`` (last). -> the manifest."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST)
    manifest = {**manifest, "checksums": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}}
    text = json.dumps(manifest, indent=2, sort_keys=True, default=to_jsonable)
    (directory / MANIFEST).write_text(text)
    return manifest


def manifest_kind(fs: pafs.FileSystem, root: str) -> str | None:
    """The ``artifact`` its manifest gives the directory ``root`` of ``fs``; None without a readable one."""
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            kind = json.loads(f.read()).get("artifact")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def read_manifest(directory: str | os.PathLike, artifact: str, schema_version: int,
                  error: type[ValueError] = ArtifactError) -> dict[str, Any]:
    """``directory/manifest.json`` (a local directory or a URI: only the manifest is read), checked for its kind
    and schema version; ``error`` names the file."""
    fs, root = resolve(directory)
    shown, path = path_or_uri(directory), join(directory, MANIFEST)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise error(f"{shown}: not a {artifact} directory (it does not exist or is a file)")
    if fs.get_file_info(f"{root}/{MANIFEST}").type != pafs.FileType.File:
        raise error(f"{shown}: not a {artifact} directory (no {MANIFEST})")
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except ValueError as err:  # UnicodeDecodeError is one
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


def listed_name(name: str, where: str, error: type[ValueError] = ArtifactError) -> PurePosixPath:
    """A file name from the manifest of the artifact at ``where``, refused unless it is a relative path inside
    it (no absolute path, ``..``, empty name or backslash): what every reader and copier of an artifact obeys."""
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in name:
        raise error(f"{where}/{MANIFEST}: names {name!r}, which is not a path inside the artifact")
    return rel


def member(directory: str | os.PathLike, name: str, error: type[ValueError] = ArtifactError,
           shown: str | None = None) -> Path:
    """The regular file ``name`` (relative, as a manifest lists it) inside the local ``directory``, safely.

    Refuses absolute names, ``..``, symlinks that leave the directory, and anything that is not a
    regular file (a FIFO would hang a reader). ``shown``: how messages name the directory (a copy's URI).
    """
    directory = Path(directory)
    where = shown or str(directory)
    rel = listed_name(name, where, error)
    path = directory.joinpath(*rel.parts)
    named = f"{where}/{rel.as_posix()}"
    root = directory.resolve()
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise error(f"{named}: missing from the artifact (listed in its {MANIFEST})") from None
    if root != resolved and root not in resolved.parents:
        raise error(f"{named}: leaves the artifact directory (a symlink to {resolved})")
    if not stat.S_ISREG(resolved.stat().st_mode):
        raise error(f"{named}: not a regular file")
    return path


def verify_files(directory: str | os.PathLike, manifest: dict[str, Any], names: list[str] | None = None,
                 error: type[ValueError] = ArtifactError, shown: str | None = None) -> None:
    """Check that every file the manifest lists (or ``names`` of them) is inside the local ``directory`` and
    unchanged. ``shown``: how messages name the directory (the URI a cached copy was made from)."""
    checksums = manifest["checksums"]
    where = shown or str(Path(directory))
    for name in checksums if names is None else names:
        if name not in checksums:
            raise error(f"{where}/{MANIFEST}: does not list {name}")
        path = member(directory, name, error, shown)
        if sha256_file(path) != checksums[name]:
            raise error(f"{where}/{PurePosixPath(name).as_posix()}: checksum mismatch (the file changed after the "
                        "artifact was written)")
