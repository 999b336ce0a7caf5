"""Atomic writes: write into a temporary file or folder next to the target, then move it into
place in one rename, so a crash or an exception mid-write leaves the previous target (or nothing),
never a truncated one. Used by the exporters, projects, settings and the CLI alike.

Also the path rules every writer and reader shares:

* :func:`check_target`, the one "may we write here?" rule: a missing path may be written; an
  input is never overwritten; anything else only with ``force`` *and* when it is something of
  ours (each writer passes the test for its own kind, e.g. "a GeoJSON we exported");
* :func:`clean_stale_temps`: a kill mid-write leaves a hidden ``.NAME.<random>.tmp``; the next
  write to that place removes those of ours that nothing has touched for a while;
* :func:`inside`: a path read from a file (a project, a manifest) must stay inside its folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

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


# ---------------------------------------------------------------------------------------------
# what may be replaced

def _related(target: Path, source: Path) -> bool:
    """``target`` is ``source`` (same path after resolving links, or the same file), lies inside
    it, or contains it."""
    t, s = target.resolve(), source.resolve()
    if t == s or t.is_relative_to(s) or s.is_relative_to(t):
        return True
    try:
        return os.path.samefile(target, source)
    except OSError:
        return False


#: The files a zarr store of ours holds (a prediction store, an OME-Zarr export): zarr metadata
#: and chunks named by their indices.
_ZARR_FILE = re.compile(r"(\.zattrs|\.zgroup|\.zarray|\.zmetadata|zarr\.json|\d+(\.\d+)*)")


def foreign_files(path: str | os.PathLike) -> list[str]:
    """Files under a zarr folder of ours that we never write (a user's own, put inside it
    afterwards), or links: a folder holding them is not ours alone to replace."""
    root = Path(path)
    found = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or (p.is_file() and not _ZARR_FILE.fullmatch(p.name)):
            found.append(str(p.relative_to(root)))
    return found


def refuse_inputs(target: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                  error: type[DataError] = DataError) -> None:
    """``error`` (one line) when ``target`` is one of ``inputs``, holds one or lies inside one
    (the same file by another name or through a symbolic link included): an output never
    replaces or lands among what is being read."""
    for source in inputs:
        if source is not None and str(source) and _related(Path(target), Path(source)):
            raise error(f"{target}: is (or holds, or lies inside) the input {source}; "
                        "an input is never overwritten: choose another output path")


def check_target(target: str | os.PathLike, *, kind: str, force: bool = False,
                 ours: Callable[[Path], bool] | None = None,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The one rule for writing to ``target``; returns it as a Path or raises :class:`DataError`
    with one line naming it.

    * ``target`` is one of the ``inputs`` (the slide, image or store being read; the same file
      by another name, a folder holding one, or a path inside one) -> refused, ``force`` or not;
    * nothing at ``target`` -> allowed;
    * something there, without ``force`` -> refused;
    * with ``force`` -> allowed only when ``ours(target)`` says it is a ``kind`` we wrote (a
      symbolic link never is: the link and what it points to are the user's).
    """
    target = Path(target)
    refuse_inputs(target, inputs)
    if not os.path.lexists(target):
        return target
    if not force:
        raise DataError(f"{target}: already exists; choose another path, or pass --force to "
                        f"replace it (only a {kind} written by genselfdiff is ever replaced)")
    if target.is_symlink() or ours is None or not ours(target):
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise DataError(f"{target}: exists and is not {article} {kind} written by genselfdiff; it is "
                        "never replaced: choose another path")
    return target


# ---------------------------------------------------------------------------------------------
# leftovers of interrupted writes

#: Seconds without a change after which a temporary of ours is taken for a leftover. A live
#: writer keeps touching its temporary (every file it adds or grows), so it is never taken.
STALE_AFTER_S = 600.0
# tempfile's names: prefix + 8 characters of this alphabet + suffix
_RANDOM = r"[a-z0-9_]{8}"


def temp_name_pattern(name: str) -> re.Pattern:
    """Our temporary names for a target called ``name``: ``.NAME.<random>.tmp`` (a write in
    progress) and ``.NAME.<random>.old`` (a replaced folder waiting to be deleted)."""
    return re.compile(rf"\.{re.escape(name)}\.{_RANDOM}\.(tmp|old)")


def _touched_since(path: Path, cutoff: float) -> bool:
    """Whether ``path`` or anything in it was modified after ``cutoff`` (True when unsure)."""
    try:
        if path.lstat().st_mtime > cutoff:
            return True
        if path.is_symlink() or not path.is_dir():
            return False
        for root, dirs, files in os.walk(path):
            for entry in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(os.path.join(root, entry)).st_mtime > cutoff:
                        return True
    except OSError:
        return True
    return False


def clean_stale_temps(parent: str | os.PathLike, name: str,
                      max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporaries an interrupted write of ``parent/name`` left behind; returns them.

    Only names of exactly our pattern (:func:`temp_name_pattern`) are candidates, and only those
    nothing has modified for ``max_age_s`` seconds (a concurrent writer's live temporary is
    kept). A ``.old`` folder is removed only while ``name`` exists: without it, it is the last
    copy of the previous version, and is left for the user. Never raises: cleaning up is a
    courtesy, the write that calls it must not fail because of it."""
    parent = Path(parent)
    pattern = temp_name_pattern(name)
    cutoff = time.time() - max_age_s
    removed: list[Path] = []
    try:
        entries = [e.name for e in os.scandir(parent)]
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        path = parent / entry
        if match.group(1) == "old" and not os.path.lexists(parent / name):
            continue
        if _touched_since(path, cutoff):
            continue
        with contextlib.suppress(OSError):
            _remove(path)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------
# paths read from files

def inside(folder: str | os.PathLike, relative: str | os.PathLike, what: str = "path") -> Path:
    """``folder / relative`` when it stays inside ``folder`` (checked with symbolic links resolved
    on both sides; the path is returned as joined, so it stays relative-able to ``folder``);
    :class:`DataError` for an absolute ``relative`` or one that leads out (``..``, a link pointing
    elsewhere). ``what`` names the path in the message (e.g. "manifest line 3: mask")."""
    rel = str(relative) if isinstance(relative, (str, os.PathLike)) else None
    if not rel or "\x00" in rel:
        raise DataError(f"{what} {relative!r}: not a path inside {folder}")
    if Path(rel).is_absolute() or Path(rel).drive:
        raise DataError(f"{what} {rel!r}: an absolute path; it must be relative to {folder}")
    base = Path(folder).resolve()
    full = (base / rel).resolve()
    if not full.is_relative_to(base):
        raise DataError(f"{what} {rel!r}: leads outside {folder}; refused")
    return Path(folder) / rel


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; on success ``os.replace`` it onto ``target``,
    on any exception delete it and re-raise."""
    target = Path(target)
    _check_parent(target)
    clean_stale_temps(target.parent, target.name)
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


def _remove_settled(tmp: Path, settle_s: float = 0.2, limit_s: float = 5.0) -> None:
    """Delete a temporary folder that writers in other threads may still be filling: a Ctrl-C
    interrupts the main thread while zarr's event loop thread finishes the chunk writes it holds,
    recreating folders after one ``rmtree``. Delete until it has stayed gone for ``settle_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        shutil.rmtree(tmp, ignore_errors=True)
        gone_since = time.monotonic()
        while not tmp.exists() and time.monotonic() - gone_since < settle_s:
            time.sleep(0.02)
        if not tmp.exists() or time.monotonic() > deadline:
            return  # a folder still left is named as our temporary: the next run's clean-up takes it


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` (an existing
    target is moved aside first and deleted only after the new one is in place), on any exception
    the temporary folder is deleted and the old target is left untouched."""
    target = Path(target)
    _check_parent(target)
    clean_stale_temps(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        _remove_settled(tmp)
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


#: The PNG text chunk "Software" of every PNG written here: how :func:`is_our_png` knows one.
PNG_SOFTWARE = "napari-genselfdiff"


def write_png_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
    import imageio.v3 as iio
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    with atomic_open(path, "wb") as f:
        f.write(iio.imwrite("<bytes>", np.asarray(image), extension=".png", pnginfo=info))


def is_our_png(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a plain PNG file written by :func:`write_png_atomic`."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == PNG_SOFTWARE
    except Exception:  # anything unreadable is not ours
        return False


#: The key of the marker a JSON file of ours carries (``{"genselfdiff": {"kind": ...}}``): how
#: :func:`is_our_json` knows one, e.g. ``evaluate --json``'s metrics.
JSON_MARKER_KEY = "genselfdiff"
_JSON_MAX_BYTES = 1 << 26  # a larger file is not one of our small JSON reports


def json_marker(kind: str) -> dict:
    """The marker entry to add to a JSON object of ours of ``kind``."""
    return {JSON_MARKER_KEY: {"kind": kind, "version": 1}}


def is_our_json(path: str | os.PathLike, kind: str) -> bool:
    """Whether ``path`` is a plain JSON file holding an object with our marker of ``kind``
    (:func:`json_marker`)."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _JSON_MAX_BYTES:
            return False
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    marker = obj.get(JSON_MARKER_KEY) if isinstance(obj, dict) else None
    return isinstance(marker, dict) and marker.get("kind") == kind
