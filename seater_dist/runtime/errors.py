"""The command line's one error path: any exception, wherever it was raised, as one line and an exit code.

An error raised in a Ray task, a Ray Data actor or a Ray Train worker reaches the driver wrapped
(``RayTaskError`` around ``UserCodeException`` around ours, ``ActorDiedError`` whose only trace of the
cause is its message, Ray Train's ``WorkerGroupError`` holding one exception per rank, ``ControllerError``).
:func:`root_cause` unwraps those to the exception a user can act on; :func:`describe` turns it into
``(message, exit code)``::

    try:
        run_the_command()
    except BaseException as err:            # KeyboardInterrupt and SystemExit included
        message, code = describe(err)       # "/data/x.csv: row 3: not UTF-8 text (...)", 2

Exit codes: 2 for input a user can fix (a ``ValueError`` such as DataError, TreeError, CheckpointError,
ArtifactError or SettingsError; a missing, unreadable or unwritable path; a full disk), 130 for Ctrl-C,
1 for anything else (a bug: the message names the exception type; ``SEATER_VERBOSE=1`` shows the traceback).
"""

from __future__ import annotations

import errno
import re

from seater_dist.runtime.quiet import drop_messages

EXIT_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

# Exception class names that mean "bad input": what a user fixes, not a bug. Matched by name for errors
# known only from a remote traceback's text (an actor that died in its constructor).
_INPUT_ERROR_NAMES = {"ValueError", "DataError", "TreeError", "CheckpointError", "ArtifactError", "SettingsError",
                      "CapacityError", "CliError", "FileNotFoundError", "NotADirectoryError", "IsADirectoryError",
                      "PermissionError", "FileExistsError", "UnicodeDecodeError", "ArrowInvalid"}  # ValueErrors, paths
_WRAPPERS = {"UserCodeException", "RayDataUserCodeException", "RayTaskError", "RaySystemError", "RayActorError",
             "ActorDiedError", "SystemException", "WorkerGroupError", "ControllerError", "TrainingFailedError"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LAST_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$", re.M)
# The OSError numbers that name a problem with the user's paths or disk (everything else: a bug or Ray).
_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG}


class RemoteError(Exception):
    """An exception known only by its traceback text (its type name and message), e.g. from an actor
    that died in its constructor: Ray keeps only the message of such an error."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


def root_cause(err: BaseException) -> BaseException:
    """The exception under Ray's wrappers (RayTaskError, UserCodeException, ActorDiedError, Ray Train's
    WorkerGroupError / ControllerError); ``err`` itself when it is not a wrapper."""
    for _ in range(20):  # wrappers nest a few levels; never loop forever on a cycle
        inner = _unwrap_once(err)
        if inner is None or inner is err:
            return err
        err = inner
    return err


def _unwrap_once(err: BaseException) -> BaseException | None:
    name = type(err).__name__
    try:
        from ray.exceptions import RayActorError, RayTaskError, UserCodeException
    except ImportError:  # pragma: no cover - Ray is a dependency
        return None
    if name in ("WorkerGroupError", "NCCLHangError") and hasattr(err, "worker_failures"):
        return _pick_worker_failure(list(err.worker_failures.values())) or None
    if name == "ControllerError" and hasattr(err, "controller_failure"):
        return err.controller_failure
    if name == "UserExceptionWithTraceback" and hasattr(err, "_base_exc"):
        return err._base_exc
    if name == "WorkerHealthCheckFailedError" and getattr(err, "health_check_failure", None) is not None:
        return err.health_check_failure
    if isinstance(err, RayTaskError):
        cause = getattr(err, "cause", None)
        if cause is not None and not isinstance(cause, UserCodeException) and type(cause).__name__ != "RayError":
            return cause  # the task's own exception, unpickled
        # Ray Data's UserCodeException arrives without its __cause__: the original is in the worker's traceback
        return _from_text(getattr(err, "traceback_str", None) or str(err))
    if isinstance(err, UserCodeException):
        return err.__cause__ or err.__context__ or _from_text(str(err))
    if isinstance(err, RayActorError) and err.actor_init_failed:
        return _from_text(str(err))
    return None


def _pick_worker_failure(failures: list[BaseException]) -> BaseException | None:
    """Of the ranks' exceptions, the one to show: an input error if any rank raised one (the others then
    usually fail in a collective, with a connection error), else the first."""
    causes = [root_cause(f) for f in failures]
    for cause in causes:
        if is_input_error(cause):
            return cause
    return causes[0] if causes else None


def _from_text(text: str) -> BaseException | None:
    """The last ``module.SomeError: message`` line of a remote traceback, as a :class:`RemoteError`."""
    for type_name, message in reversed(_LAST_ERROR_LINE.findall(_ANSI.sub("", text))):
        name = type_name.rsplit(".", 1)[-1]
        if name not in _WRAPPERS:
            return RemoteError(name, message.strip())
    return None


def is_input_error(err: BaseException) -> bool:
    """True for errors a user causes and fixes (bad input, paths, disk), False for bugs and Ray failures."""
    if isinstance(err, RemoteError):
        return err.type_name in _INPUT_ERROR_NAMES
    if isinstance(err, OSError):
        return err.errno in _PATH_ERRNOS or isinstance(err, (FileNotFoundError, PermissionError))
    return isinstance(err, ValueError)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space and Ray's colours removed."""
    return " ".join(_ANSI.sub("", text).split())


def describe(err: BaseException) -> tuple[str, int]:
    """-> (one-line message, exit code) for any exception (see the module docstring)."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    cause = root_cause(err)
    if isinstance(cause, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(cause, OSError) and is_input_error(cause):
        where = cause.filename if cause.filename is not None else ""
        text = cause.strerror or str(cause)
        return one_line(f"{where}: {text}" if where else text), EXIT_INPUT
    if is_input_error(cause):
        return one_line(str(cause)), EXIT_INPUT
    type_name = cause.type_name if isinstance(cause, RemoteError) else type(cause).__name__
    text = one_line(str(cause))[:500]
    return (f"internal error: {type_name}: {text} (a bug, not your input: rerun with SEATER_VERBOSE=1 for the "
            "traceback and report it)"), EXIT_INTERNAL


# Ray's own reports of an error it then raises to the driver: with the error printed once by the CLI,
# these would print it (and a traceback) a second time. They stay in Ray's log files.
_DUPLICATE_REPORTS = {
    "ray.data._internal.execution.streaming_executor_state": ("An exception was raised from a task of operator",),
    "ray.data.exceptions": ("Exception occurred in user code", "Full stack trace"),
    "ray._private.worker": ("Exception raised in creation task",),
    "ray.train.v2._internal.execution.failure_handling.default": ("[FailurePolicy]",),
    "ray.train.v2._internal.execution.controller.controller": ("Training failed", "[FailurePolicy]"),
}


def hide_duplicate_error_reports() -> None:
    """Keep Ray's own console reports of an error it raises to the driver off the console (idempotent);
    the CLI prints the error once, in one line. Not called with SEATER_VERBOSE=1."""
    for name, prefixes in _DUPLICATE_REPORTS.items():
        drop_messages(name, prefixes)
