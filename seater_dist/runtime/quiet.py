"""Known-harmless third-party console chatter, silenced in the process that emits it.

``init_ray`` applies this in the driver and, through the runtime_env ``worker_process_setup_hook``
(:func:`quiet_worker`), in every Ray worker of the job. With ``SEATER_VERBOSE=1`` none of it is applied.

* faiss ``Loading faiss with AVX512 support.`` / ``Could not load library with AVX512 support due to:
  ModuleNotFoundError(...)`` (six lines per process): faiss/loader.py logs its CPU-feature probing at INFO
  on the ``faiss.loader`` logger, and Ray Train workers send root INFO to the console. That logger is set to
  WARNING (its failure to load any build is logged at ERROR and still shows).
* ``RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated``: Ray Train's own
  ``DataConfig.default_ingest_options`` (ray/train/_internal/data_config.py) passes that field on every fit,
  in the Train controller, whatever DataConfig we give. A warnings filter for that one message.
* Ray Data's ``Progress bars disabled. To enable, ...``: we turn them off ourselves (ray_env.init_ray). A
  filter for that one message on its logger.
* C++ ``core_worker.cc:NNNN: Actor with class name: 'MapWorker(...)' ... has constructor arguments in the
  object store and max_restarts > 0`` (and the same for Ray Train's ``'PreemptionWatcher'``): Ray's own
  actors get ObjectRefs / actor handles their owner keeps alive (ray-project/ray#53727). Logged once per
  process (RAY_LOG_ONCE_PER_PROCESS(ERROR)) by the one creating the actor, straight to fd 2, and Ray has no
  per-message level (RAY_BACKEND_LOG_LEVEL=fatal would hide every C++ error). :func:`filter_stderr` drops
  exactly these lines from the driver's fd 2 (also where worker output is printed) and passes all else.
* The raylet's ``WARNING: N PYTHON worker processes have been started on node ... which is Nx the maximum
  expected startup concurrency``: our stages start workers with fractional CPUs by design (two train
  workers of 0.5 CPU, Ray Data actors, evaluation), which is what the warning counts. Dropped the same way
  (:data:`DROPPED_LINES`).

"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import warnings

VERBOSE_ENV = "SEATER_VERBOSE"

FAISS_LOADER_LOGGER = "faiss.loader"
EXCLUDE_RESOURCES_WARNING = r"`ExecutionOptions\.exclude_resources` is deprecated"
# Ray Data's iter_torch_batches wraps its read-only numpy batches with torch.as_tensor; our steps only read them.
READ_ONLY_BATCH_WARNING = r"The given NumPy array is not writable"
PROGRESS_LOGGER = "ray.data._internal.progress"
PROGRESS_NOTICES = ("Progress bars disabled.", "Progress bars for operators disabled.")
# Only Ray's own actors: the same line for an actor of ours would be a real warning.
ACTOR_ARGS_LINE = (r"core_worker\.cc:\d+: Actor with class name: '(?:MapWorker\(.*\)|PreemptionWatcher)' "
                   r"and ID: '[0-9a-f]+' has constructor arguments in the object store and max_restarts > 0")
WORKER_STARTUP_LINE = r"WARNING: \d+ PYTHON worker processes have been started on node: [0-9a-f]+ with address"
# The lines filter_stderr drops (one regex).
DROPPED_LINES = f"(?:{ACTOR_ARGS_LINE})|(?:{WORKER_STARTUP_LINE})"


def verbose() -> bool:
    """SEATER_VERBOSE set (to anything): show every third-party message."""
    return bool(os.environ.get(VERBOSE_ENV))


class _DropMessages(logging.Filter):
    """Drop records whose message starts with one of ``prefixes``; everything else passes (drop_messages)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_process() -> None:
    """Silence the faiss loader, the exclude_resources deprecation, the read-only batch warning and the
    progress-bar notice in this process.

    Idempotent. Call it after ``import ray`` (Ray installs its own RayDeprecationWarning filter on import,
    in front of any earlier one).
    """
    logging.getLogger(FAISS_LOADER_LOGGER).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=EXCLUDE_RESOURCES_WARNING, category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=READ_ONLY_BATCH_WARNING, category=UserWarning)
    drop_messages(PROGRESS_LOGGER, PROGRESS_NOTICES)


def drop_messages(logger_name: str, prefixes: tuple[str, ...]) -> None:
    """Records of the logger ``logger_name`` whose message starts with one of ``prefixes`` are dropped
    (idempotent: a logger keeps one such filter)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages(prefixes))


def quiet_worker() -> None:
    """:func:`quiet_process` in a Ray worker (ray_env.setup_worker calls it unless SEATER_VERBOSE is set)."""
    try:
        quiet_process()
    except Exception:  # console noise must never stop a worker from starting
        pass


# The filter process: copies stdin to stdout line by line, dropping lines that match argv[1]. A partial
# line (a prompt) is passed on after 50 ms without more input. It ignores Ctrl-C and exits at end of input,
# i.e. when every writer (the driver, whatever it forked) is gone, so nothing written before a crash is lost.
_FILTER_SRC = r"""
import os, re, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
drop = re.compile(sys.argv[1].encode())
def out(data):
    while data:
        data = data[os.write(1, data):]
buf = b""
try:
    while True:
        if buf and not select.select([0], [], [], 0.05)[0]:
            out(buf)
            buf = b""
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            break
        *lines, buf = (buf + chunk).split(b"\n")
        out(b"".join(line + b"\n" for line in lines if not drop.search(line)))
    out(buf)
except OSError:
    pass
"""

_filter: subprocess.Popen | None = None


def filter_stderr() -> bool:
    """Drop :data:`DROPPED_LINES` from this process's fd 2 (Ray's C++ core worker writes them there,
    and the driver prints forwarded worker lines there); every other byte passes through unchanged.

    Only where the process owns its stderr (``sys.stderr is sys.__stderr__``: not under pytest's capture or
    in a notebook), once per process, never with SEATER_VERBOSE. Undone at exit. Returns whether it is active.
    """
    global _filter
    if _filter is not None:
        return True
    if verbose() or sys.stderr is not sys.__stderr__ or sys.stderr is None:
        return False
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError):  # no fd 2 to filter
        return False
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER_SRC, DROPPED_LINES],
                                stdin=read_end, stdout=original, stderr=original, start_new_session=True)
    except OSError:
        for fd in (read_end, write_end, original):
            os.close(fd)
        return False
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    _filter = proc
    atexit.register(_restore_stderr, original)
    return True


def _restore_stderr(original: int) -> None:
    """Give fd 2 back to the real stderr and let the filter write out what it still holds."""
    global _filter
    try:
        sys.stderr.flush()
    except Exception:
        pass
    os.dup2(original, 2)  # closes our write end: the filter sees end of input once forked children exit
    os.close(original)
    if _filter is not None:
        try:
            _filter.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        _filter = None
