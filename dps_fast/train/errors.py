"""The trainer's error types. ``dps-train`` prints each as one line (``--debug`` shows the traceback)."""
from __future__ import annotations


class UsageError(ValueError):
    """A user error: a bad argument, input file or run folder. The message says what and how
    to fix it; ``dps-train`` prints ``dps-train: error: <message>`` and exits 2."""


class MissingDataError(UsageError, FileNotFoundError):
    """A data file that is not there (also a FileNotFoundError, for library callers)."""


class RunError(RuntimeError):
    """A run that failed on its own (e.g. diverged); printed as one line, exit 1."""


class Interrupted(Exception):
    """Ctrl-C: the run stopped; ``message`` says what was saved (exit 130)."""
