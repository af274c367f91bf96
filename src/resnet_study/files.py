"""Crash-safe file writes (a reader, or a resumed run, never sees a half-written file), CSVs a
spreadsheet opens without running anything, the lock that gives a run folder one writer, and
guarded reads of the files the tool is handed: TOML text, and tensors read without code."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
import socket
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .errors import UsageError


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


# What a spreadsheet runs as a formula when a cell starts with it (OWASP, "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value: Any) -> Any:
    """`value` as a CSV cell that no spreadsheet runs: a run's labels, notes and settings come
    from the user's files and flags, and a cell like `=HYPERLINK(...)` would run when the table
    is opened. Such a string gets a leading `'`, as OWASP recommends; numbers, and strings that
    are plain numbers ("-0.93"), are data and stay as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not NUMBER.fullmatch(value):
        return "'" + value
    return value


def write_rows(path: Path, rows: Iterable[Sequence[Any]], lineterminator: str = "\n") -> None:
    """CSV rows (the header among them), every cell through `csv_cell`: every CSV the tool
    writes comes here, so none carries a formula. The report's tables keep the csv module's own
    "\r\n", which they have always had; the run files have "\n". Each row is written with "\r\n"
    and then given its own end, as the csv module quotes a cell holding a CR only when its line
    end has one: a bare CR would end the row for a reader."""
    lines = []
    for row in rows:
        text = io.StringIO()
        csv.writer(text, lineterminator="\r\n").writerow([csv_cell(cell) for cell in row])
        lines.append(text.getvalue().removesuffix("\r\n") + lineterminator)
    write_text(path, "".join(lines))


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: list[str],
              lineterminator: str = "\n") -> None:
    """Dict rows under a header of `columns`: other keys left out, a missing key or None an
    empty cell; cells neutralised as `write_rows` does."""
    write_rows(path, [columns, *([row.get(c) for c in columns] for row in rows)],
               lineterminator)


# The largest TOML file a user hands the tool: an experiments or space file is a few KiB, and a
# bigger one is the wrong file (a data set, a device), not worth reading whole into memory.
MAX_USER_FILE = 2**20
NOT_REGULAR = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
               (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
               (stat.S_ISSOCK, "socket"))


def read_user_text(path: Path, what: str, limit: int = MAX_USER_FILE) -> str:
    """The text of a file the user names (`what`: "experiments file", ...), or a `UsageError`
    naming the path and the fix: never a traceback, and never a hang, since a FIFO or device is
    refused on its `stat` before it is opened (opening a FIFO blocks until a writer comes), and
    checked again on the open file in case the path changed in between. At most `limit` bytes
    are read, as a file can grow after its `stat`. A UTF-8 byte-order mark, which Windows
    editors write, is dropped: TOML would take it for a stray character."""
    try:
        _require_regular(path, os.stat(path).st_mode, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            _require_regular(path, os.fstat(f.fileno()).st_mode, what)
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what}") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if len(data) > limit:
        size = f"{limit >> 20} MiB" if limit >= 2**20 else f"{limit} bytes"
        raise UsageError(f"{path}: larger than {size}, the limit for the {what}; is it the "
                         "right file?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a TOML file (not UTF-8 text); save it as UTF-8") from None


def _require_regular(path: Path, mode: int, what: str) -> None:
    if not stat.S_ISREG(mode):
        kind = next((kind for test, kind in NOT_REGULAR if test(mode)), "special file")
        raise UsageError(f"{path}: a {kind}, not a regular file; give the path of the {what}")


class FolderHeld(UsageError):
    """Another process holds the run folder's lock: it trains into that folder now."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(f"{folder} is in use by {holder}; wait for it to finish, or choose "
                         "another --out")
        self.folder, self.holder = folder, holder

    def __reduce__(self) -> tuple:  # whole across a worker pool's pipe
        return FolderHeld, (self.folder, self.holder)


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
