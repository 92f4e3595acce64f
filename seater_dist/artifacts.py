"""What every stage's artifact directory needs: checksums, JSON of numpy values, atomic replacement."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np


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


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished directory ``tmp`` at ``dest`` by renames, so readers never see half of it.

    An existing ``dest`` is moved aside first and deleted only after the new one is in place.
    """
    tmp, dest = Path(tmp), Path(dest)
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)
