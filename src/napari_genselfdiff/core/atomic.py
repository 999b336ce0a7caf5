"""Atomic writes: write into a temporary file or folder next to the target, then move it into
place in one rename, so a crash or an exception mid-write leaves the previous target (or nothing),
never a truncated one. Used by the exporters, projects, settings and the CLI alike.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from .errors import DataError


def _read_umask() -> int:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read it by setting it (at import, before any thread starts)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def normal_permissions(path: str | os.PathLike, recursive: bool = True) -> None:
    """Give a freshly written file, or a folder (and, with ``recursive``, everything in it), the
    permissions a plain ``open``/``mkdir`` would have (0666/0777 less the umask). Temporary files
    and folders are created private (0600/0700), and safetensors writes 0600 files: left so, a
    model or an export on a shared lab drive could not be read by a colleague. Folders whose
    contents were written the ordinary way need only ``recursive=False``."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, 0o777 & ~_UMASK)
        if not recursive:
            return
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~_UMASK)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), 0o666 & ~_UMASK)
    elif path.is_file():
        os.chmod(path, 0o666 & ~_UMASK)


def _check_parent(target: Path) -> None:
    if not target.parent.is_dir():
        raise DataError(f"cannot write {target}: folder {target.parent} does not exist")


@contextlib.contextmanager
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
        normal_permissions(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
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
    # only the folder itself is private (mkdtemp); what the caller wrote into it has its own
    # permissions, and walking a whole-slide OME-Zarr's chunks here would cost an export dearly
    normal_permissions(tmp, recursive=False)
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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kw) -> Iterator[IO]:
    """Like ``open(path, mode)`` for writing (parent folders are created); the file appears at
    ``path``, flushed to disk, only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, mode, **kw) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def write_png_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
    import imageio.v3 as iio

    with atomic_open(path, "wb") as f:
        f.write(iio.imwrite("<bytes>", np.asarray(image), extension=".png"))
