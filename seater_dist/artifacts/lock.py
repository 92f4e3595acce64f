"""One writer per local output: the lock file beside it, and the probes that refuse an unwritable or full disk.

Every stage takes :func:`output_lock` for its ``--out`` (``atomic_dir`` takes it for the artifact it writes):
``.NAME.lock`` is created beside the output, naming the holder's pid, host and command, and a second
writer is refused at start; an output whose directory is read-only or whose disk is full is refused
before any work. Object storage has no lock (no atomic create-if-absent that pyarrow exposes):
:func:`writer_lock` is the output lock for a local path and nothing for a URI, where one writer per
prefix is the user's to keep.

    with writer_lock(out, inside=True):   # out/ created, checked writable; refused if another process holds it
        ...
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from seater_dist.artifacts.fs import ArtifactError, is_remote, local_path

MIN_FREE_BYTES = 16 << 20  # an output whose disk has less free space is refused up front as full
_held: dict[str, list[int]] = {}  # lock files this process holds -> [holding thread, nesting depth]
_held_guard = threading.Lock()


@contextmanager
def writer_lock(out: str | os.PathLike, inside: bool = False) -> Iterator[Path | str]:
    """:func:`output_lock` of a local ``out`` for the block; for a URI, nothing (object storage has no lock).
    -> ``out`` as a Path, or the URI."""
    if is_remote(out):
        yield str(out)
        return
    with output_lock(local_path(out), inside) as held:
        yield held


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
