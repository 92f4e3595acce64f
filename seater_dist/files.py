"""What a file is, by its first bytes, and the two loaders of binary files that never unpickle.

Every reader of a user's file says what the file is when it is not what was expected, naming it::

    identify(head).description     # "a .npy array", "a gzip-compressed file", "text beginning 'user_id,...'"
    load_npy(path, TreeError, "a .npy array of item embeddings [N, d]")
        # TreeError("/x/emb.npy: text beginning 'u1,0.5,0.3', not a .npy array of item embeddings [N, d]")
    load_tensors(path, CheckpointError, "a training state written by seater train")
        # CheckpointError("/x/train_state.pt: holds Python objects besides tensors ...; it is not loaded")

Kinds are told apart by their magic bytes: npy ``\\x93NUMPY``; zip ``PK\\x03\\x04`` (a torch file when its first
member is ``<name>/data.pkl``, an .npz when it is ``<name>.npy``); a pickle ``\\x80`` + protocol (torch's
legacy format when it starts with torch's magic number); parquet ``PAR1``; gzip, bzip2, xz, zstd; UTF-16 by
its byte-order mark; then text (no NUL byte in the head) or binary. No message suggests loading a file
unsafely: the loaders read tensors and numeric arrays only (``weights_only=True``, ``allow_pickle=False``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

HEAD_BYTES = 1 << 16  # how much of a file identify_file reads
UTF8_BOM = b"\xef\xbb\xbf"
_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # a pickle of torch's legacy magic number
_MAGIC = ((b"\x93NUMPY", "npy", "a .npy array"),
          (b"PAR1", "parquet", "a parquet file"),
          (b"\x1f\x8b", "gzip", "a gzip-compressed file"),
          (b"BZh", "bzip2", "a bzip2-compressed file"),
          (b"\xfd7zXZ\x00", "xz", "an xz-compressed file"),
          (b"\x28\xb5\x2f\xfd", "zstd", "a zstd-compressed file"),
          (b"\xff\xfe", "utf16", "UTF-16 text"),
          (b"\xfe\xff", "utf16", "UTF-16 text"))


class FileKind(NamedTuple):
    """What a file is: ``name`` (npy, npz, torch, zip, pickle, parquet, gzip, bzip2, xz, zstd, utf16, empty,
    text or binary) and ``description``, the words for a message ("a gzip-compressed file")."""

    name: str
    description: str


def identify(head: bytes) -> FileKind:
    """The kind of a file from its first bytes (:data:`HEAD_BYTES` of them tell text from binary)."""
    if not head:
        return FileKind("empty", "an empty file (0 bytes)")
    if head.startswith(_TORCH_LEGACY):
        return FileKind("torch", "a torch file (legacy format)")
    for magic, name, description in _MAGIC:
        if head.startswith(magic):
            return FileKind(name, description)
    if head.startswith(b"PK\x03\x04"):
        first = head[30 : 30 + int.from_bytes(head[26:28], "little")]  # the first member's name
        if first.endswith(b"/data.pkl"):
            return FileKind("torch", "a torch file")
        if first.endswith(b".npy"):
            return FileKind("npz", "an .npz archive of arrays")
        return FileKind("zip", "a zip archive")
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return FileKind("pickle", "a Python pickle")
    if b"\x00" in head:
        return FileKind("binary", "a binary file (it holds NUL bytes)")
    first_line = head.removeprefix(UTF8_BOM).split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")
    shown = first_line if len(first_line) <= 40 else first_line[:40] + "..."
    return FileKind("text", f"text beginning {shown!r}")


def identify_file(path: str | Path) -> FileKind:
    """:func:`identify` of a local file's first bytes."""
    with open(path, "rb") as f:
        return identify(f.read(HEAD_BYTES))


def load_npy(path: Path, error: type[ValueError], expected: str, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` array of numbers (memory-mapped with ``mmap``); ``error`` naming the file, what it is and
    ``expected`` for anything else, an array of Python objects included (it is never unpickled)."""
    kind = identify_file(path)
    if kind.name != "npy":
        raise error(f"{path}: {kind.description}, not {expected}")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            _, _, dtype = read_header(f)
        if dtype.hasobject:
            raise error(f"{path}: a .npy array of Python objects (pickled), not {expected}; it is not loaded")
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        if isinstance(err, error):
            raise
        raise error(f"{path}: a damaged .npy array ({' '.join(str(err).split())[:200]}), not {expected}") from None


def load_tensors(path: Path, error: type[ValueError], expected: str) -> Any:
    """``torch.load`` of tensors and plain containers only (``weights_only=True``), on the CPU; ``error``
    naming the file, what it is and ``expected`` when it is not a torch file or holds anything else."""
    import torch

    kind = identify_file(path)
    if kind.name != "torch":
        raise error(f"{path}: {kind.description}, not {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types; none of its advice is repeated
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
            raise error(f"{path}: holds Python objects besides tensors (a pickle that could run code), not "
                        f"{expected}; it is not loaded") from None
        raise error(f"{path}: a damaged torch file ({type(err).__name__}), not {expected}") from None
