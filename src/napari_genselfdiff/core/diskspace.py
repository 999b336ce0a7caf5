"""Free disk space, checked before a long write starts.

A whole-slide prediction or an export that cannot fit on its disk is refused in one line before
any work, instead of failing on a full disk an hour later (that case is still caught: a store
resumes where it stopped, an export leaves the previous output as it was). The estimates the
callers pass are *lower bounds* (compressed sizes several times below what we measured on real
tissue), so a run that would fit is never refused; one that is refused could not have finished.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import DataError


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system that holds ``path`` (or would: its nearest
    existing parent); None when the system will not say."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def size_text(n: float) -> str:
    """``n`` bytes as a person reads them: '812 MB', '3.4 GB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 10 * size else f"{n / size:.0f} {unit}"
    return f"{int(n)} bytes"


def check_free_space(path: str | Path, need: float, what: str) -> None:
    """A DataError naming ``path`` when its disk has less than ``need`` bytes free for ``what``
    (a lower bound of what the write takes)."""
    free = free_bytes(path)
    if free is not None and free < need:
        raise DataError(f"{path}: {what} needs at least {size_text(need)} of disk and only {size_text(free)} is "
                        "free there; free some space or write it to another disk")


def tree_bytes(path: str | Path) -> int:
    """Bytes in the files under ``path`` (a file: its size), links not followed."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total
