"""Where artifacts live: a local path, or a pyarrow.fs URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``).

Every stage reads and writes through this module, so every ``--input``, ``--out``, ``--data``, ``--tree``,
``--checkpoint`` and ``--embeddings`` may be either. Stages compute on local files; this module moves
whole artifacts between the local disk and object storage:

    path = local_copy("s3://bucket/run/tree")   # downloaded once into a node-local cache, checksums verified
    with staged_output("s3://bucket/run/tree") as tmp:   # a local directory for the stage to write ...
        tree.save(tmp)                                   # ... published when the block succeeds
    write_bytes("s3://bucket/run/report.json", data)     # one object, written whole
    join("s3://bucket/run", "tree")                      # "s3://bucket/run/tree" (Path() would break it)

Publishing never shows a reader half an artifact: an artifact is a directory whose ``manifest.json`` is
written last (:mod:`seater_dist.artifacts`). Publishing first deletes the destination's manifests (so
readers refuse the old version while it is replaced), uploads every other file, then the manifests,
deepest first, the top one last. A write interrupted half way leaves a prefix without a manifest, which
every reader refuses as "not a <kind> directory". Credentials and endpoints come from the environment as
pyarrow and boto read them (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ...).
Unlike a local output, a remote one has no one-writer lock: run one writer per prefix.

The cache (``$SEATER_CACHE``, default ``<tmp>/seater-<uid>/cache``, private to the user) holds one verified
copy per URI and manifest; a copy is complete once its own ``manifest.json`` is in place, so concurrent readers
on one node (the workers of a training run) each either reuse it or download their own and keep the first.
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

import pyarrow.fs as pafs

from seater_dist.artifacts import MANIFEST, ArtifactError

_BLOCK = 1 << 22


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI of a non-local file system (``s3://``, ``gs://``, ...); False for paths and ``file://``."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The file system and the path inside it, resolved once (pyarrow's ``FileSystem.from_uri``)."""
    text = str(path)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ArtifactError(f"{text}: not a usable location ({err})") from None
    return pafs.LocalFileSystem(), os.path.abspath(text)


def local_path(path: str | os.PathLike) -> Path:
    """A local path or ``file://`` URI as a Path (a remote URI is refused: use :func:`local_copy`)."""
    text = str(path)
    if is_remote(text):
        raise ValueError(f"{text}: a remote URI, not a local path")
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


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


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a path or a URI (``Path`` would fold ``s3://`` into ``s3:/``)."""
    text = str(base)
    if not is_remote(text):
        return str(local_path(text).joinpath(*parts))
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])


def name_of(path: str | os.PathLike) -> str:
    """The last component of a path or URI."""
    return PurePosixPath(str(path).rstrip("/")).name


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or directory (a non-empty prefix, on object storage) is at ``path``."""
    if not is_remote(path):
        return local_path(path).exists()
    fs, root = resolve(path)
    return fs.get_file_info(root).type != pafs.FileType.NotFound


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file at a path or URI."""
    if not is_remote(path):
        return local_path(path).read_bytes()
    fs, root = resolve(path)
    with fs.open_input_stream(root) as f:
        return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write one file whole: a local file by rename of a temporary beside it; an object by one upload."""
    if not is_remote(path):
        dest = local_path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        return
    fs, root = resolve(path)
    with fs.open_output_stream(root) as f:
        f.write(data)


# ------------------------------------------------------------------------------------------ reading


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


def local_copy(path: str | os.PathLike, error: type[ValueError] = ArtifactError,
               exclude: tuple[str, ...] = ()) -> Path:
    """A local path holding what is at ``path``: the path itself when local, else a verified cached copy.

    A remote directory with a ``manifest.json`` (an artifact) is copied file by file as its manifest lists
    them, each checked against its sha256; a directory without one is mirrored whole (top-level names in
    ``exclude`` skipped) and its nested artifacts are verified by their readers; a file is copied as is.
    Raises ``error`` naming the URI when nothing is there.
    """
    if not is_remote(path):
        return local_path(path)
    uri = str(path).rstrip("/")
    fs, root = resolve(uri)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        raise error(f"{uri}: not found")
    slot = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:24]
    if kind == pafs.FileType.File:
        return _cached(slot, name_of(uri), lambda tmp: _download(fs, root, tmp / name_of(uri)))
    manifest_path = f"{root}/{MANIFEST}"
    if fs.get_file_info(manifest_path).type != pafs.FileType.File:
        return _cached(slot, name_of(uri), lambda tmp: _mirror(fs, root, tmp / name_of(uri), exclude), reuse=False)
    text = _read_object(fs, manifest_path)
    version = hashlib.sha256(text).hexdigest()[:16]
    return _cached(slot / version, name_of(uri), lambda tmp: _download_artifact(fs, root, text, tmp / name_of(uri),
                                                                                uri, error))


def _cached(slot: Path, name: str, fill, reuse: bool = True) -> Path:
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


def _read_object(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _download(fs: pafs.FileSystem, src: str, dest: Path) -> str:
    """Copy one object to ``dest``; -> its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with fs.open_input_stream(src) as fin, open(dest, "wb") as fout:
        while chunk := fin.read(_BLOCK):
            h.update(chunk)
            fout.write(chunk)
    return h.hexdigest()


def _safe_relative(name: str, where: str, error: type[ValueError]) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in name:
        raise error(f"{where}/{MANIFEST}: names {name!r}, which is not a path inside the artifact")
    return rel


def _download_artifact(fs: pafs.FileSystem, root: str, manifest_text: bytes, dest: Path, uri: str,
                       error: type[ValueError]) -> None:
    """Every file the manifest lists, verified, then the manifest itself (last, as when it was written)."""
    try:
        checksums = json.loads(manifest_text)["checksums"]
        assert isinstance(checksums, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise error(f"{uri}/{MANIFEST}: not a valid manifest") from None
    dest.mkdir(parents=True)
    for name, digest in sorted(checksums.items()):
        rel = _safe_relative(name, uri, error)
        src = f"{root}/{rel.as_posix()}"
        if fs.get_file_info(src).type != pafs.FileType.File:
            raise error(f"{uri}/{rel.as_posix()}: missing from the artifact (listed in its {MANIFEST})")
        if _download(fs, src, dest.joinpath(*rel.parts)) != digest:
            raise error(f"{uri}/{rel.as_posix()}: checksum mismatch (the object changed after the artifact "
                        "was written)")
    (dest / MANIFEST).write_bytes(manifest_text)


def _mirror(fs: pafs.FileSystem, root: str, dest: Path, exclude: tuple[str, ...]) -> None:
    dest.mkdir(parents=True)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = PurePosixPath(info.path[len(root):].lstrip("/"))
        if rel.parts and rel.parts[0] in exclude:
            continue
        _download(fs, info.path, dest.joinpath(*_safe_relative(rel.as_posix(), root, ArtifactError).parts))


# ------------------------------------------------------------------------------------------ writing


@contextmanager
def staged_output(path: str | os.PathLike) -> Iterator[Path]:
    """A local path for a stage to write ``path``'s content to: ``path`` itself when local; for a URI,
    a path inside a temporary directory, published to the URI (:func:`publish`) when the block succeeds
    and removed either way."""
    if not is_remote(path):
        yield local_path(path)
        return
    staging = Path(tempfile.mkdtemp(prefix="seater-out-"))
    local = staging / (name_of(path) or "out")
    try:
        yield local
        if local.exists():
            publish(local, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(local: str | os.PathLike, path: str | os.PathLike) -> None:
    """Upload a local file or directory to ``path`` so that no reader ever takes part of it for the whole.

    A directory: the destination's manifests are deleted first, objects the new content does not have
    are deleted, every other file is uploaded, then every ``manifest.json`` deepest first (the top one
    last). Hidden files (locks, verification stamps) stay local. A destination holding anything but an
    artifact of the same kind (or an interrupted publish's remains) is refused before anything changes.
    """
    local = Path(local)
    fs, root = resolve(path)
    if local.is_file():
        _upload(fs, local, root)
        return
    files = sorted(p for p in local.rglob("*") if p.is_file() and not _hidden(p.relative_to(local)))
    manifests = sorted((p for p in files if p.name == MANIFEST), key=lambda p: -len(p.relative_to(local).parts))
    keep = {p.relative_to(local).as_posix() for p in files}
    old = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
           if i.type == pafs.FileType.File]
    _check_replaceable(fs, root, str(path), old, _kind(local / MANIFEST))
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


PUBLISHING = ".seater-publishing"  # present while a publish is under way (or was interrupted)


def _kind(manifest: Path) -> str | None:
    try:
        return json.loads(manifest.read_text()).get("artifact")
    except (OSError, ValueError, AttributeError):
        return None


def _check_replaceable(fs: pafs.FileSystem, root: str, uri: str, old: list[pafs.FileInfo], kind: str | None) -> None:
    """A publish replaces only what publishing made: nothing, an artifact of the same kind, or the remains
    of an interrupted publish. Anything else under the prefix is refused, and nothing is deleted."""
    if not old:
        return
    names = {i.path[len(root):].lstrip("/") for i in old}
    if PUBLISHING in names:
        return
    if kind is not None and MANIFEST in names:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            try:
                theirs = json.loads(f.read()).get("artifact")
            except (ValueError, AttributeError):
                theirs = None
        if theirs == kind:
            return
    raise ArtifactError(f"{uri}: holds {len(names)} object(s) that are not a {kind or 'published'} artifact; "
                        "refusing to replace them (choose another output path or remove them yourself)")


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _upload(fs: pafs.FileSystem, src: Path, dest: str) -> None:
    parent = str(PurePosixPath(dest).parent)
    if parent and parent != ".":
        fs.create_dir(parent, recursive=True)
    with open(src, "rb") as fin, fs.open_output_stream(dest) as fout:
        while chunk := fin.read(_BLOCK):
            fout.write(chunk)

