"""The files of a project folder below the :class:`~.store.Project` class: names, JSON lines,
region checks and the checkpoint reference. ``store``, ``suggest`` and ``refine`` import this
module, never each other's internals (``store`` delegates to ``suggest`` and ``refine``)."""
from __future__ import annotations

import json
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import DataError

FORMAT = "napari-genselfdiff-project"
FORMAT_VERSION = 1
PROJECT_FILE = "project.json"
MANIFEST = "regions/manifest.jsonl"
HISTORY = "models/history.jsonl"
REVIEWED = "reviewed.json"
STORE_CHUNK = 1024
SOURCES = ("correction", "import")


def now() -> str:
    """The current UTC time, ISO 8601 to the second (the project's timestamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# JSON lines (the manifest and the refine history)

def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line durably. A partial last line (a crash mid-append) is cut off first,
    so the new line never merges with it."""
    line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
        f.seek(0, os.SEEK_END)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a truncated last line is skipped with a warning, a damaged
    line anywhere else is an error (it cannot come from an interrupted append)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: text after the last newline
    records = []
    for i, raw in enumerate(complete, 1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: line {i} is damaged ({e}); fix or remove that line") from None
    if tail.strip():
        try:
            records.append(json.loads(tail))  # complete record whose newline was lost
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(f"{path}: ignoring a truncated last line (an interrupted write)", stacklevel=3)
    return records


# ---------------------------------------------------------------------------------------------
# regions

def check_region(image: np.ndarray, labels: np.ndarray, bounds: Sequence[int],
                 level: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """(image, labels, bounds) of a region to accept, checked; :class:`DataError` otherwise."""
    image, labels = np.asarray(image), np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"region image must be (h, w, 3) uint8 RGB, got shape {image.shape} {image.dtype}")
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise DataError(f"region labels must be a 2-D integer array, got shape {labels.shape} {labels.dtype}")
    if image.shape[:2] != labels.shape:
        raise DataError(f"region image is {image.shape[0]}x{image.shape[1]} (h x w) but its labels are "
                        f"{labels.shape[0]}x{labels.shape[1]}: they must cover the same pixels")
    if labels.size == 0:
        raise DataError("region is empty (0 pixels)")
    if labels.min() < 0:
        raise DataError(f"region labels must be >= 0, found {labels.min()}")
    if len(bounds) != 4:
        raise DataError(f"bounds must be (y, x, h, w), got {tuple(bounds)}")
    y, x, h, w = (int(v) for v in bounds)
    if y < 0 or x < 0 or h <= 0 or w <= 0:
        raise DataError(f"bounds (y={y}, x={x}, h={h}, w={w}) must have y, x >= 0 and h, w > 0")
    if level < 0:
        raise DataError(f"level must be >= 0, got {level}")
    if level == 0 and (h, w) != labels.shape:
        raise DataError(f"bounds say the level-0 region is {h}x{w} but the labels are "
                        f"{labels.shape[0]}x{labels.shape[1]}")
    return image, labels, (y, x, h, w)


def mask_dtype(labels: np.ndarray) -> np.dtype:
    """The smallest unsigned dtype holding every id of ``labels`` (uint8 masks are PNG files)."""
    top = int(labels.max())
    if top <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if top <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if top <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise DataError(f"label id {top} does not fit in 32 bits")


def count_objects(labels: np.ndarray) -> int:
    """Distinct ids > 0 for an instance map; connected components when one id is used (a binary
    mask, where touching objects cannot be told apart anyway)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) > 1:
        return int(len(ids))
    if len(ids) == 0:
        return 0
    from scipy import ndimage as ndi
    return int(ndi.label(labels > 0)[1])


def resize_nearest(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    """``labels`` scaled to (h, w) by nearest neighbour (coarse-level regions into the store)."""
    rows = (np.arange(h) * labels.shape[0]) // h
    cols = (np.arange(w) * labels.shape[1]) // w
    return labels[rows[:, None], cols[None, :]]


def region_mpp(rec: dict, slide_mpp: float | None) -> float | None:
    """Microns per pixel of a stored region (its manifest record): its slide's level-0 mpp times
    how much coarser the stored pixels are than level 0 (1 for level-0 regions); None when the
    slide's mpp is unknown."""
    stored_height = (rec.get("shape") or [rec["bounds"][2] if rec["level"] == 0 else 0])[0]
    if not slide_mpp or not stored_height:
        return None
    return float(slide_mpp) * rec["bounds"][2] / stored_height


# ---------------------------------------------------------------------------------------------
# models

def model_path(model: str | os.PathLike) -> str:
    """A bundled model name or a checkpoint folder -> its absolute path (checked to be a checkpoint)."""
    from ..bundled import resolve_model
    from ..core.checkpoint import load_config
    path = Path(resolve_model(model)).absolute()
    load_config(path)
    return str(path)
