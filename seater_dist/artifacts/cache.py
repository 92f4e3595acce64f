"""Reading from object storage: a verified copy of a remote artifact in a node-local cache.

Stages compute on local files; :func:`local_copy` gives them one for any location:

    path = local_copy("s3://bucket/run/tree")   # downloaded once into this node's cache, checksums verified
    path = local_copy("runs/b/tree")            # a local path is returned as it is

The cache (``$SEATER_CACHE``, default ``<tmp>/seater-<uid>/cache``, private to the user) holds one verified
copy per URI and manifest; a copy is complete once its own ``.complete`` mark is in place, so concurrent
readers on one node (the workers of a training run) each either reuse it or download their own and keep
the first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from seater_dist.artifacts.fs import ArtifactError, is_remote, local_path, name_of, resolve
from seater_dist.artifacts.manifest import MANIFEST, listed_name, verify_files

_BLOCK = 1 << 22


def private_dir() -> Path:
    """``<tmp>/seater-<uid>``: this user's own directory on this machine (the cache, the serving load lock).

    Created with mode 0700; refused (ArtifactError) when the name is taken by something else: another
    user's directory, a symlink, or a directory others may write into. A fixed name in the shared temp
    directory would let any local user plant files in it, or hold its locks.
    """
    path = Path(tempfile.gettempdir()) / f"seater-{os.getuid()}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ArtifactError(f"{path}: not a private directory of this user (owner uid {st.st_uid}, mode "
                            f"{stat.filemode(st.st_mode)}); remove it, or set SEATER_CACHE to a directory of yours")
    return path


def cache_root() -> Path:
    """Where remote artifacts are copied: ``$SEATER_CACHE`` or ``<tmp>/seater-<uid>/cache``."""
    return Path(os.environ.get("SEATER_CACHE") or private_dir() / "cache")


def local_copy(path: str | os.PathLike, error: type[ValueError] = ArtifactError) -> Path:
    """A local path holding what is at ``path``: the path itself when local, else a verified cached copy.

    A remote directory with a ``manifest.json`` (an artifact) is copied file by file as its manifest lists
    them, then checked like a local artifact (:func:`verify_files`, messages naming the URI); a directory
    without one is mirrored whole and its nested artifacts are verified by their readers; a file is copied
    as is. Raises ``error`` naming the URI when nothing is there.
    """
    if not is_remote(path):
        return local_path(path)
    uri = str(path).rstrip("/")
    fs, root = resolve(uri)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        raise error(f"{uri}: not found")
    slot = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:24]
    name = name_of(uri)
    if kind == pafs.FileType.File:
        return _cached(slot, name, lambda tmp: _download(fs, root, tmp / name))
    manifest_path = f"{root}/{MANIFEST}"
    if fs.get_file_info(manifest_path).type != pafs.FileType.File:
        return _cached(slot, name, lambda tmp: _mirror(fs, root, tmp / name), reuse=False)
    with fs.open_input_stream(manifest_path) as f:
        text = f.read()
    version = hashlib.sha256(text).hexdigest()[:16]
    return _cached(slot / version, name, lambda tmp: _download_artifact(fs, root, text, tmp / name, uri, error))


def _cached(slot: Path, name: str, fill: Callable[[Path], None], reuse: bool = True) -> Path:
    """``slot/name``, filled by ``fill(tmp_dir)`` unless a complete copy is already there."""
    final = slot / name
    done = slot / ".complete"
    if reuse and done.is_file() and final.exists():
        return final
    slot.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fill-", dir=slot))
    try:
        fill(tmp)
        if final.exists():  # another reader finished first (reuse) or an older mirror (replace)
            if reuse and done.is_file():
                return final
            aside = slot / f".old-{uuid.uuid4().hex[:8]}"
            final.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        (tmp / name).rename(final)
        done.write_text("ok")
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download(fs: pafs.FileSystem, src: str, dest: Path) -> None:
    """Copy one object to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(src) as fin, open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout, _BLOCK)


def _download_artifact(fs: pafs.FileSystem, root: str, manifest_text: bytes, dest: Path, uri: str,
                       error: type[ValueError]) -> None:
    """Every file the manifest lists, then the copy checked against the manifest, then the manifest itself
    (last, as when it was written)."""
    try:
        manifest = json.loads(manifest_text)
        assert isinstance(manifest["checksums"], dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise error(f"{uri}/{MANIFEST}: not a valid manifest") from None
    dest.mkdir(parents=True)
    for name in sorted(manifest["checksums"]):
        rel = listed_name(name, uri, error).as_posix()
        if fs.get_file_info(f"{root}/{rel}").type == pafs.FileType.File:  # a missing one is named by the check
            _download(fs, f"{root}/{rel}", dest / rel)
    verify_files(dest, manifest, error=error, shown=uri)
    (dest / MANIFEST).write_bytes(manifest_text)


def _mirror(fs: pafs.FileSystem, root: str, dest: Path) -> None:
    dest.mkdir(parents=True)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            rel = listed_name(PurePosixPath(info.path[len(root):].lstrip("/")).as_posix(), root)
            _download(fs, info.path, dest / rel)
