"""Atomic writes for the exporters: write into a temporary file or folder next to the target,
then move it into place in one rename, so that a failed or interrupted export never leaves a
truncated target behind (and never destroys a previous good one)."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import DataError


def _check_parent(target: Path) -> None:
    if not target.parent.is_dir():
        raise DataError(f"cannot write {target}: folder {target.parent} does not exist")


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; on success ``os.replace`` it onto ``target``,
    on any exception delete it and re-raise."""
    target = Path(target)
    _check_parent(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` (an existing
    target is moved aside first and deleted only after the new one is in place), on any exception
    the temporary folder is deleted and the old target is left untouched."""
    target = Path(target)
    _check_parent(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        os.rename(tmp, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(backup)  # only the unique name is wanted
    os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(backup, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(backup)
