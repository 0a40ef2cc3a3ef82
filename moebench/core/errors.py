"""Errors that reach the user as one line, never as a traceback."""

from __future__ import annotations

import contextlib
import difflib
import signal
import threading


class MoebenchError(Exception):
    """Any error the CLI reports as a single line and exit code 2."""


class SuiteError(MoebenchError):
    """A suite file is malformed: names the file, the field path and what was expected.

    Rendered as ``FILE: FIELD: MESSAGE``.
    """

    def __init__(self, file: str, field: str, message: str):
        self.file = file
        self.field = field
        self.message = message
        super().__init__(f"{file}: {field or '<top level>'}: {message}")


class UnknownNameError(MoebenchError):
    """An unknown registry key (router, workload, drop policy); suggests the closest."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}{did_you_mean(name, known)}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI cancel, `kill`), raised in the main thread while
    `sigterm_as_interrupt` is active, so that it ends a run exactly as
    Ctrl-C does. Here, not in the session, so that whatever starts processes of its own (the
    parallel kind's launcher) can raise it without importing the run loop."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block SIGTERM raises :class:`Terminated` (main thread only; else a no-op), so a
    `run` or an `ab` ends on SIGTERM exactly as on Ctrl-C, with its clean-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class WorkloadMismatchError(MoebenchError):
    """A router asked for inputs (token ids, hidden states) that the workload does not make."""


def did_you_mean(name: str, known: list[str]) -> str:
    """'; did you mean X?' for the closest known name, else the list of known names."""
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of: {', '.join(sorted(known))}"
