"""Crash-safe file writes (a reader, or a resumed run, never sees a half-written file), the
lock that gives a run folder one writer, and code-free reads of the tensor files the tool is
handed."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import socket
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .config import UsageError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """Write through a temp file in the same folder, fsync, then rename over `path`.

    The rename is atomic on POSIX, so `path` holds either the old or the new content,
    whenever the process is killed; the old file survives a failed write (e.g. disk full).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a full disk: say where
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_rows(path: Path, rows: Iterable[Sequence[Any]], lineterminator: str = "\n") -> None:
    """CSV rows (the header among them). The report's tables keep the csv module's own "\r\n",
    which they have always had; the run files have "\n"."""
    text = io.StringIO()
    csv.writer(text, lineterminator=lineterminator).writerows(rows)
    write_text(path, text.getvalue())


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: list[str],
              lineterminator: str = "\n") -> None:
    """Dict rows under a header of `columns`: other keys left out, a missing key or None an
    empty cell."""
    write_rows(path, [columns, *([row.get(c) for c in columns] for row in rows)],
               lineterminator)


class FolderHeld(UsageError):
    """Another process holds the run folder's lock: it trains into that folder now."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(f"{folder} is in use by {holder}; wait for it to finish, or choose "
                         "another --out")
        self.holder = holder


@contextmanager
def hold(folder: Path) -> Iterator[None]:
    """The run folder's lock, for as long as the block runs: `flock` on `folder/.lock`, which
    the kernel releases when its process dies, however it dies. Its holder cleans the folder's
    temporary files, which no one else may, since another process's may be live. A folder this
    made and that holds nothing else afterwards is removed (a run refused before it started
    leaves nothing behind)."""
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise FolderHeld(folder, holder or "another process") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        for stale in folder.glob(".*.tmp"):  # left by a process killed inside a write
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            if made and os.listdir(folder) == [".lock"]:
                lock.unlink()
                folder.rmdir()
    finally:
        os.close(fd)


def load_tensors(path: Path) -> Any:
    """`torch.load` restricted to tensors and plain containers: a checkpoint or weights file is
    data, and loading one must never run code. Callers turn its errors into their own message;
    its warnings (unusual pickle protocols) would only be noise beside that message."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)
