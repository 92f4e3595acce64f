"""Where artifacts live: a local path or a pyarrow.fs URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``).

This is the one module that tells a URI from a path. Everything else asks it for what it needs:

    resolve("s3://bucket/run/tree")   # (S3FileSystem, "bucket/run/tree"); a path -> (LocalFileSystem, path)
    location("runs/b/tree")           # "/home/me/runs/b/tree": what another process or node is handed
    path_or_uri("runs/b/tree")        # Path("runs/b/tree"); a URI stays a str
    join("s3://bucket/run", "tree")   # "s3://bucket/run/tree" (Path() would fold it into "s3:/bucket/...")
    parent("s3://bucket/run/tree")    # "s3://bucket/run"
    write_bytes("s3://bucket/run/report.json", data)   # one file, written whole, local or remote

Credentials and endpoints come from the environment as pyarrow and boto read them (``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

_URI_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}  # pyarrow type_name -> URI scheme


class ArtifactError(ValueError):
    """An artifact directory that is missing, incomplete, altered or of another kind; names the file."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI of a non-local file system (``s3://``, ``gs://``, ...); False for paths and ``file://``."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The file system and the path inside it, resolved once: pyarrow's ``FileSystem.from_uri`` for a URI,
    a ``LocalFileSystem`` and the path as given (relative or not) for a local path."""
    text = str(path)
    if "://" in text:
        try:
            fs, root = pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ArtifactError(f"{text}: not a usable location ({err})") from None
        return fs, root.rstrip("/") or "/"
    return pafs.LocalFileSystem(), text.rstrip("/") or "/"


def is_local(fs: pafs.FileSystem) -> bool:
    """Whether ``fs`` is this machine's disk (where renames are atomic and a lock file can be created)."""
    return fs.type_name == "local"


def uri(fs: pafs.FileSystem, path: str) -> str:
    """The location that names ``path`` on ``fs`` wherever it is resolved again: a URI for a remote file system
    (``s3://bucket/key``, so that a task on another node opens it from there), the path itself for a local one."""
    scheme = _URI_SCHEMES.get(fs.type_name)
    return f"{scheme}://{path}" if scheme else path


def local_path(path: str | os.PathLike) -> Path:
    """A local path or ``file://`` URI as a Path (a remote URI is refused: use :func:`local_copy`)."""
    text = str(path)
    if is_remote(text):
        raise ValueError(f"{text}: a remote URI, not a local path")
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def path_or_uri(path: str | os.PathLike) -> Path | str:
    """A local location as a Path, a URI as the string it is (what a caller may join with ``/`` or not)."""
    return str(path) if is_remote(path) else local_path(path)


def location(path: str | os.PathLike) -> str:
    """``path`` as another process or node is handed it: a URI as is; a local path absolute, ``~`` expanded
    and symlinks resolved (a Ray worker or Serve replica may run in another directory)."""
    return str(path) if is_remote(path) else str(local_path(path).expanduser().resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a path or a URI (``Path`` would fold ``s3://`` into ``s3:/``)."""
    text = str(base)
    if not is_remote(text):
        return str(local_path(text).joinpath(*parts))
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])


def parent(path: str | os.PathLike) -> str:
    """The directory holding ``path`` (a path or a URI)."""
    text = str(path).rstrip("/")
    return text.rsplit("/", 1)[0] if is_remote(text) else str(local_path(text).parent)


def name_of(path: str | os.PathLike) -> str:
    """The last component of a path or URI."""
    return PurePosixPath(str(path).rstrip("/")).name


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or directory (a non-empty prefix, on object storage) is at ``path``."""
    fs, root = resolve(path)
    return fs.get_file_info(root).type != pafs.FileType.NotFound


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file at a path or URI (OSError when there is none)."""
    fs, root = resolve(path)
    with fs.open_input_stream(root) as f:
        return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write one file whole: on a local disk by rename of a temporary beside it; an object by one upload."""
    fs, root = resolve(path)
    if not is_local(fs):
        with fs.open_output_stream(root) as f:
            f.write(data)
        return
    where = str(PurePosixPath(root).parent)
    fs.create_dir(where, recursive=True)
    tmp = f"{where}/.{PurePosixPath(root).name}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, root)


def check_apart(input_path: str | os.PathLike, out: str | os.PathLike, error: type[ValueError] = ArtifactError,
                out_flag: str = "--out") -> None:
    """Refuse an output that is the input, lies inside it, or holds it (local paths, symlinks resolved):
    a second run would read its own output as input, or replacing the output would delete the input."""
    if is_remote(input_path) or is_remote(out):
        return
    source, dest = local_path(input_path).resolve(), local_path(out).resolve()
    if dest == source:
        problem = "is the input"
    elif source in dest.parents:
        problem = "is inside the input: a later run would read its own output as input"
    elif dest in source.parents:
        problem = "holds the input: writing it would replace the input"
    else:
        return
    raise error(f"{out_flag} {out} {problem} (--input {input_path}); choose an output outside the input")
