"""BLAS thread control for tree tasks.

The products of a split are small (k = 8..32 columns), and OpenBLAS threads spinning against other busy
processes slow them down badly on a shared machine, so every task runs with one BLAS thread per CPU it
was given.
"""

from __future__ import annotations

import functools
from typing import Any


def limit_blas_threads(threads: int) -> int | None:
    """Set numpy's OpenBLAS thread count; returns the previous count (None if OpenBLAS is not found)."""
    controls = _openblas_thread_controls()
    if controls is None:
        return None
    setter, getter = controls
    previous = int(getter())
    setter(int(max(1, threads)))
    return previous


@functools.cache
def _openblas_thread_controls() -> tuple[Any, Any] | None:
    """(set_num_threads, get_num_threads) of the OpenBLAS loaded in this process, looked up once
    (reading /proc/self/maps on every Ray task would cost more than a small node's split)."""
    import ctypes

    try:
        libs = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()}
    except OSError:
        return None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""),
                               ("openblas", "64_"), ("openblas", "")):
            setter, getter = f"{prefix}_set_num_threads{suffix}", f"{prefix}_get_num_threads{suffix}"
            if hasattr(lib, setter) and hasattr(lib, getter):
                return getattr(lib, setter), getattr(lib, getter)
    return None
