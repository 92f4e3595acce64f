"""Ray Train's ``fit()`` adapted to the command line: input errors are not retried, Ctrl-C is a
KeyboardInterrupt, and the workers' duplicate reports stay off the console.

    with input_errors_fail_fast(), ctrl_c_as_keyboard_interrupt():
        result = trainer.fit()
"""

from __future__ import annotations

import logging
from typing import Any

from seater_dist.runtime.errors import is_input_error
from seater_dist.runtime.quiet import drop_messages


def quiet_train_worker(verbose_run: bool) -> None:
    """In a Train worker, unless the run is verbose (SEATER_VERBOSE on the driver): Ray Train's "Error in
    training function" report (a traceback per rank; the driver prints the error once) and its INFO line of
    every report's metrics (under a logger named by its file path, which LoggingConfig does not reach; rank 0
    prints one line per epoch instead) are dropped."""
    if verbose_run:
        return
    drop_messages("ray.train.v2._internal.util", ("Error in training function",))
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # a Ray without Train V2 internals: keep its logs
        pass


class InputErrorsFailFast:
    """Ray Train failure policy: Ray's default (a failed worker group is retried up to ``max_failures`` times
    from the last checkpoint), except that a failure in which a worker raised an input error and no worker
    died is raised at once: the retry would read the same input and fail the same way.

    Input errors: what :func:`seater_dist.runtime.errors.is_input_error` calls so (a ``ValueError`` such as
    DataError, TreeError, CheckpointError, SettingsError; the OSErrors of a missing or unreadable path). Ray
    Train 2.x has no public hook for this: :class:`input_errors_fail_fast` installs the policy for one
    ``fit()`` (and leaves Ray's default in place if its internals move).
    """

    def __init__(self, failure_config: Any) -> None:
        from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy

        self.failure_config = failure_config
        self._default = DefaultFailurePolicy(failure_config)

    def make_decision(self, training_failed_error: BaseException) -> Any:
        from ray.train.v2._internal.execution.failure_handling import FailureDecision

        if _is_input_failure(training_failed_error):
            return FailureDecision.RAISE
        return self._default.make_decision(training_failed_error)


def _is_input_failure(err: BaseException) -> bool:
    """A failed worker group in which no worker died and one raised an input error (errors.is_input_error,
    the rule the command line's exit code follows)."""
    from ray.exceptions import RayActorError

    failures = list(getattr(err, "worker_failures", {}).values())
    if not failures or any(isinstance(f, RayActorError) or type(f).__name__ == "WorkerHealthCheckFailedError"
                           for f in failures):
        return False
    return any(is_input_error(f) for f in failures)


class input_errors_fail_fast:  # noqa: N801 - used as a context manager
    """Install :class:`InputErrorsFailFast` as the failure policy of the ``fit()`` calls in the block."""

    def __enter__(self) -> None:
        try:
            from ray.train.v2.api import data_parallel_trainer
        except ImportError:
            self.module = None
            return
        self.module = data_parallel_trainer
        self.original = getattr(data_parallel_trainer, "create_failure_policy", None)
        if self.original is not None:
            data_parallel_trainer.create_failure_policy = InputErrorsFailFast

    def __exit__(self, *exc: Any) -> None:
        if self.module is not None and self.original is not None:
            self.module.create_failure_policy = self.original


class ctrl_c_as_keyboard_interrupt:  # noqa: N801 - used as a context manager
    """Ctrl-C during ``fit()`` ends as a KeyboardInterrupt, as everywhere else.

    Ray Train's ``fit()`` installs its own SIGINT handler (it aborts the run gracefully, then calls
    ``sys.exit(0)`` from inside the handler, which surfaced as exit code 1 and no message) and leaves it
    installed. This notes that the handler fired, turns what ``fit()`` then raises into a
    KeyboardInterrupt, and puts the previous handler back. The run keeps its finished epochs (resumable).
    """

    def __enter__(self) -> None:
        import signal

        self.fired = False
        self.previous = signal.getsignal(signal.SIGINT)
        self.install = signal.signal

        def install(signum: int, handler: Any) -> Any:
            if signum == signal.SIGINT and callable(handler):
                inner = handler

                def handler(sig: int, frame: Any) -> None:
                    self.fired = True
                    inner(sig, frame)
            return self.install(signum, handler)

        signal.signal = install

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        import signal
        import threading

        signal.signal = self.install
        if threading.current_thread() is threading.main_thread() and self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.fired and exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
