"""The errors every layer raises, and how a failure is written in one line."""

from __future__ import annotations


class UsageError(Exception):
    """A problem the user can fix (bad value, missing file); the CLI prints it as one line."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT stopped a run after writing a checkpoint. A BaseException, so that
    the handlers that record a run's failure (`except Exception`) let it through."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most `limit` characters: its type and its message with
    every run of white space (newlines too) made one space. Every log line and record of a
    failure cuts its error this way."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:limit].rstrip()


def require(ok: bool, message: str) -> None:
    """A UsageError with `message` unless `ok`."""
    if not ok:
        raise UsageError(message)
