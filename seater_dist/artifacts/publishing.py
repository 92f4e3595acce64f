"""Writing an artifact so that no reader ever takes part of it for the whole, wherever it goes.

    with atomic_dir("s3://bucket/run/tree", "tree") as tmp:   # or a local path: the same call
        np.save(tmp / "codes.npy", codes)
        write_manifest(tmp, {"artifact": "tree", "schema_version": 1})

One rule says what may be replaced (:func:`check_replaceable`): nothing, an empty directory, an artifact
of the same kind, or the remains of an interrupted publish of ours. A stage never deletes what it did
not write, locally or in a bucket.

One atomic publish (:func:`atomic_dir`), as strong as the destination allows. A local destination is
replaced by renames of a finished directory beside it, under its one-writer lock. An object-storage
destination has neither renames nor locks: the artifact is made in a local staging directory, then
:func:`publish` deletes the destination's manifests first (readers refuse the old version while it is
replaced), uploads every other file, then the manifests, deepest first, the top one last. A publish
interrupted half way leaves a prefix without a manifest, which every reader refuses as "not a <kind>
directory", and which the next publish may replace.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from seater_dist.artifacts.fs import (
    ArtifactError,
    is_local,
    is_remote,
    local_path,
    name_of,
    path_or_uri,
    resolve,
)
from seater_dist.artifacts.lock import output_lock
from seater_dist.artifacts.manifest import MANIFEST, manifest_kind

PUBLISHING = ".seater-publishing"  # present while a publish is under way (or was interrupted)
_BLOCK = 1 << 22


# ------------------------------------------------------------------------------------------ the one rule


def check_replaceable(path: str | os.PathLike, kind: str | None) -> None:
    """Refuse (ArtifactError) to replace ``path`` unless it is missing, an empty directory, a ``kind`` artifact
    (its manifest says so) or the remains of an interrupted publish. A symlink is never replaced."""
    fs, root = resolve(path)
    _check_replaceable(fs, root, path, kind)


def _check_replaceable(fs: pafs.FileSystem, root: str, path: object, kind: str | None) -> None:
    if _replaceable(fs, root, kind):
        return
    if is_local(fs):
        raise ArtifactError(f"{path_or_uri(str(path))}: exists and is not a {kind} directory; refusing to replace it "
                            "(choose another output path or remove it yourself)")
    held = len(_files(fs, root))
    raise ArtifactError(f"{path}: holds {held} object(s) that are not a {kind or 'published'} artifact; refusing to "
                        "replace them (choose another output path or remove them yourself)")


def _replaceable(fs: pafs.FileSystem, root: str, kind: str | None) -> bool:
    if is_local(fs) and Path(root).is_symlink():  # what it points to is not ours to replace
        return False
    found = fs.get_file_info(root).type
    if found == pafs.FileType.NotFound:
        return True
    if found != pafs.FileType.Directory:
        return False
    names = {PurePosixPath(info.path).name for info in fs.get_file_info(pafs.FileSelector(root))}
    return not names or PUBLISHING in names or (kind is not None and manifest_kind(fs, root) == kind)


def _files(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """Every file under ``root``, at any depth (none when nothing is there)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return [info for info in infos if info.type == pafs.FileType.File]


# ------------------------------------------------------------------------------------------ the one publish


@contextmanager
def atomic_dir(dest: str | os.PathLike, artifact: str) -> Iterator[Path]:
    """Yield an empty local directory to write the ``artifact`` artifact in; when the block succeeds it
    becomes ``dest`` (a path or a URI), which is refused up front unless :func:`check_replaceable`.

    Local: the directory is made beside ``dest``, under ``dest``'s :func:`output_lock`, and replaces it by
    renames (an existing ``dest`` is moved aside and deleted only once the new one is in place); temporary
    directories an interrupted earlier writer left beside it (``.NAME.tmp-*``, ``.NAME.old-*``) are removed
    first. A URI: the directory is a local staging one, published to ``dest`` (:func:`publish`). On any
    exception (Ctrl-C included) the directory is removed and ``dest`` is untouched.
    """
    check_replaceable(dest, artifact)
    if is_remote(dest):
        with _staging() as tmp:
            yield tmp
            publish(tmp, dest)
        return
    dest = local_path(dest)
    with output_lock(dest):
        for stale in [*dest.parent.glob(f".{dest.name}.tmp-*"), *dest.parent.glob(f".{dest.name}.old-*")]:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)  # ours: only a writer of dest makes these names
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


@contextmanager
def _staging() -> Iterator[Path]:
    """A fresh local directory for the block, removed afterwards."""
    staging = Path(tempfile.mkdtemp(prefix="seater-out-"))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def staged_output(path: str | os.PathLike) -> Iterator[Path]:
    """A local path for a stage that writes ``path``'s content itself: ``path`` when local; for a URI, a path
    inside a staging directory, published to the URI (:func:`publish`) when the block succeeds."""
    if not is_remote(path):
        yield local_path(path)
        return
    with _staging() as staging:
        local = staging / (name_of(path) or "out")
        yield local
        if local.exists():
            publish(local, path)


def publish(local: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy a local file or directory to ``path`` so that no reader ever takes part of it for the whole.

    A directory: the destination's manifests are deleted first, files the new content does not have
    are deleted, every other file is uploaded, then every ``manifest.json`` deepest first (the top one
    last). Hidden files (locks, verification stamps) stay local. A destination :func:`check_replaceable`
    refuses is refused before anything changes.
    """
    local = Path(local)
    fs, root = resolve(path)
    if local.is_file():
        _upload(fs, local, root)
        return
    files = sorted(p for p in local.rglob("*") if p.is_file() and not _hidden(p.relative_to(local)))
    manifests = sorted((p for p in files if p.name == MANIFEST), key=lambda p: -len(p.relative_to(local).parts))
    keep = {p.relative_to(local).as_posix() for p in files}
    _check_replaceable(fs, root, path, manifest_kind(pafs.LocalFileSystem(), str(local)))
    old = _files(fs, root)
    marker = f"{root}/{PUBLISHING}"
    with fs.open_output_stream(marker) as f:  # "ours, being written": a later publish may replace it
        f.write(b"")
    for info in sorted(old, key=lambda i: PurePosixPath(i.path).name != MANIFEST):  # manifests first
        rel = info.path[len(root):].lstrip("/")
        if rel != PUBLISHING and (PurePosixPath(rel).name == MANIFEST or rel not in keep):
            fs.delete_file(info.path)
    for p in [p for p in files if p.name != MANIFEST] + manifests:
        _upload(fs, p, f"{root}/{p.relative_to(local).as_posix()}")
    fs.delete_file(marker)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _upload(fs: pafs.FileSystem, src: Path, dest: str) -> None:
    where = str(PurePosixPath(dest).parent)
    if where and where != ".":
        fs.create_dir(where, recursive=True)
    with open(src, "rb") as fin, fs.open_output_stream(dest) as fout:
        shutil.copyfileobj(fin, fout, _BLOCK)


# ------------------------------------------------------------------------------------------ task outputs


@contextmanager
def task_output_dir(local: Path, beside: str | os.PathLike) -> Iterator[str]:
    """Where Ray tasks on any node write files meant for the local directory ``local`` while the output
    ``beside`` is made: ``local`` itself when ``beside`` is a local path (a disk every task sees); for a URI,
    a fresh prefix beside it, collected into ``local`` (:func:`collect_task_outputs`) when the block ends."""
    if not is_remote(beside):
        yield str(local)
        return
    where = str(beside).rstrip("/") + f".tasks-{uuid.uuid4().hex[:8]}"
    try:
        yield where
    finally:
        collect_task_outputs(where, local)


def collect_task_outputs(where: str, local: Path) -> None:
    """Move the files tasks wrote at ``where`` (a :func:`task_output_dir`) into ``local``; nothing to do when
    ``where`` is ``local`` itself."""
    if not is_remote(where):
        return
    fs, root = resolve(where)
    found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    for info in found:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as fin, open(local / PurePosixPath(info.path).name, "wb") as fout:
                shutil.copyfileobj(fin, fout, _BLOCK)
    if found:
        fs.delete_dir(root)
