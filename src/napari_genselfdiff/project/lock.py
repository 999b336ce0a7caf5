"""One writer per project: a refine (or an adopt / roll back) holds the project's writer lock, a
second one gets one line naming the holder.

The lock is an advisory ``flock`` on ``.genselfdiff-writer.lock`` in the project folder, which
holds the holder's pid, host, what it does and since when. The kernel releases it when the holder
dies however it dies, so a lock left by a dead process is simply taken over. Where ``fcntl`` is
missing (Windows) no lock is taken.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from ..core.errors import DataError
from .files import now

LOCK_FILE = ".genselfdiff-writer.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    return (f"{info.get('what', 'a writer')} (pid {info.get('pid')} on {info.get('host', '?')}, "
            f"since {info.get('since', '?')})")


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the project's writer lock while the block runs; a DataError naming the holder when
    another process (or another job of this one) holds it."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: proceed as before
        yield
        return
    path = Path(folder) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"project {folder}: {_holder(fd)} is writing to it; one writer at a time: "
                            "wait for it to finish, or stop it") from None
        locked = True
        record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        yield
    finally:
        if locked:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the flock
