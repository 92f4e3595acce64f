"""What every stage's artifact directory shares: atomic writes, a manifest written last, checksums.

An artifact is a directory holding ``manifest.json``: the artifact's kind, schema version, what made it,
and the sha256 of each of its files by path relative to the directory. A directory without a valid
manifest is not an artifact, so a reader never takes half of one for a whole.

    with atomic_dir("runs/b/tree", "tree") as tmp:  # a temp dir beside the destination
        np.save(tmp / "codes.npy", codes)
        write_manifest(tmp, {"artifact": "tree", "schema_version": 1})   # checksums every file, last
    manifest = read_manifest("runs/b/tree", "tree", 1)
    verify_files("runs/b/tree", manifest)           # every listed file present, inside, unchanged

One writer per output: :func:`output_lock` (taken by every stage for its ``--out``, and by ``atomic_dir``)
creates ``.NAME.lock`` beside the output, naming the holder's pid and host, and refuses a second writer
at start; it also refuses an output whose directory is read-only or whose disk is full, before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
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
    Holds ``dest``'s :func:`output_lock` throughout; temporary directories that an interrupted earlier
    writer of ``dest`` left beside it (``.NAME.tmp-*``, ``.NAME.old-*``) are removed first.
    On any exception (Ctrl-C included) the temporary directory is removed and ``dest`` is untouched.
    An existing ``dest`` is moved aside first and deleted only once the new one is in place.
    """
    dest = Path(dest)
    check_replaceable(dest, artifact)
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


# ------------------------------------------------------------------------------------------ one writer

MIN_FREE_BYTES = 16 << 20  # an output whose disk has less free space is refused up front as full
_held: dict[str, list[int]] = {}  # lock files this process holds -> [holding thread, nesting depth]
_held_guard = threading.Lock()


def lock_path(dest: str | os.PathLike) -> Path:
    """The lock file of output ``dest``: ``.NAME.lock`` beside it (so replacing ``dest`` keeps it)."""
    dest = Path(os.path.abspath(dest))
    return dest.parent / f".{dest.name}.lock"


@contextmanager
def output_lock(dest: str | os.PathLike, inside: bool = False) -> Iterator[Path]:
    """Hold the one-writer lock of output ``dest`` (a directory a stage writes) for the block.

    Refused at once, with an :class:`ArtifactError` naming the holder's pid, host and command, when
    another live process holds ``dest`` or a directory containing it. A lock left by a process that no
    longer runs on this host is taken over. Creating the lock file is also the up-front check that
    ``dest``'s directory is writable and its disk not full; ``inside``: the stage writes into ``dest``
    itself (created if absent), so check that it is writable too. Re-entrant within a thread (a stage
    that runs another stage into the same output); another thread of this process is refused like another
    process. When the block fails, the directories the lock created (``dest`` with ``inside``, missing
    parents) are removed again if they are still empty: a refused command leaves nothing behind.
    """
    dest = Path(os.path.abspath(dest))
    lock = lock_path(dest)
    key = str(lock)
    me = threading.get_ident()
    with _held_guard:
        entry = _held.get(key)
        if entry is not None and entry[0] != me:
            raise ArtifactError(f"{dest}: another thread of this process (pid {os.getpid()}) is writing it; wait for "
                                "it to finish or choose another output path")
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield dest
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    _refuse_if_an_ancestor_is_held(dest)
    created = _missing_dirs(dest if inside else dest.parent)
    _make_dir(dest.parent)
    _acquire(lock, dest)
    with _held_guard:
        _held[key] = [me, 1]
    failed = True
    try:
        _check_space(dest.parent)
        if inside:
            _make_dir(dest)
            _probe_write(dest)
        yield dest
        failed = False
    finally:
        with _held_guard:
            _held[key][1] -= 1
            last = _held[key][1] == 0
            if last:
                del _held[key]
        if last:
            try:
                lock.unlink()
            except OSError:
                pass
            if failed:
                _remove_empty(created)


def _holder_text(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
            + (f": {holder['command']}" if holder.get("command") else ""))


def _acquire(lock: Path, dest: Path) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300] if sys.argv else ""}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            if holder is None and _age(lock) < 10:  # being written by a writer that just created it
                holder = {"pid": "?", "host": "?", "since": "a moment ago"}
            if holder is not None and (holder["pid"] == "?" or _alive(holder)):
                raise ArtifactError(f"{dest}: another seater process is writing it ({_holder_text(holder)}); wait "
                                    f"for it to finish, or delete {lock} if that process is gone") from None
            try:  # its holder is gone (or the file is unreadable): take it over
                lock.unlink()
            except FileNotFoundError:
                pass
            continue
        except OSError as err:
            raise ArtifactError(f"{lock.parent}: cannot write here ({err.strerror}); choose another output "
                                "path") from None
        try:
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            lock.unlink(missing_ok=True)
            raise ArtifactError(f"{lock.parent}: cannot write here ({err.strerror}); free some space or choose "
                                "another output path") from None
        os.close(fd)
        return
    raise ArtifactError(f"{dest}: could not take its lock {lock} (another process keeps re-creating it)")


def _read_holder(lock: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder may still run: any holder on another host (we cannot tell), else its pid."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        pid = int(holder.get("pid"))
    except (TypeError, ValueError):
        return False
    if pid == os.getpid():
        return False  # this process, which does not hold it (see _held): left by an earlier writer
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse_if_an_ancestor_is_held(dest: Path) -> None:
    """Refuse ``dest`` when a directory containing it is another live process's output (e.g. a `seater run`)."""
    with _held_guard:
        held = {key: entry[0] for key, entry in _held.items()}
    for ancestor in dest.parents:
        if ancestor.parent == ancestor:
            break
        lock = lock_path(ancestor)
        if held.get(str(lock)) == threading.get_ident() or not lock.is_file():
            continue
        if str(lock) in held:
            raise ArtifactError(f"{dest}: inside {ancestor}, which another thread of this process (pid {os.getpid()}) "
                                "is writing; wait for it to finish or choose another output path")
        holder = _read_holder(lock)
        if holder is not None and _alive(holder) and holder.get("pid") != os.getpid():
            raise ArtifactError(f"{dest}: inside {ancestor}, which another seater process is writing "
                                f"({_holder_text(holder)}); wait for it to finish or choose another output path")


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (deepest first) while they are empty: what a failed writer created, nothing else."""
    for directory in directories:
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty: something was written there
            return


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ArtifactError(f"{path}: exists and is not a directory; choose another output path") from None
    except OSError as err:
        raise ArtifactError(f"{path}: cannot create this directory ({err.strerror}); choose another output "
                            "path") from None


def _probe_write(directory: Path) -> None:
    probe = directory / f".seater-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise ArtifactError(f"{directory}: cannot write here ({err.strerror}); choose another output path") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _check_space(directory: Path) -> None:
    free = _free_bytes(directory)
    if free < MIN_FREE_BYTES:
        raise ArtifactError(f"{directory}: the disk is full ({free:,} bytes free, at least {MIN_FREE_BYTES:,} "
                            "needed); free some space or choose another output path")


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
    """Checksum every regular file under ``directory`` (a nested artifact's manifest too) and write
    ``manifest.json`` (last). -> the manifest."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST)
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
