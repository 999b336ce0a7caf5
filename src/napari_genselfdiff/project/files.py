"""The files of a project folder below the :class:`~.store.Project` class: names, JSON lines,
region checks and the checkpoint reference, and :class:`ProjectFolder`, what ``suggest`` and
``refine`` use of a project. ``store``, ``suggest`` and ``refine`` import this module, never each
other's internals (``store`` delegates to ``suggest`` and ``refine``, which do not import
``store``: they take a :class:`ProjectFolder`)."""
from __future__ import annotations

import json
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ..core.atomic import atomic_open, inside
from ..core.data import LabeledImage, TaskSpec
from ..core.errors import DataError, describe_json_error
from ..core.names import is_safe_name

FORMAT = "napari-genselfdiff-project"
FORMAT_VERSION = 1
PROJECT_FILE = "project.json"
MANIFEST = "regions/manifest.jsonl"
HISTORY = "models/history.jsonl"
REVIEWED = "reviewed.json"
STORE_CHUNK = 1024
SOURCES = ("correction", "import")


class ProjectFolder(Protocol):
    """What ``refine`` and ``suggest`` use of a project, no more: :class:`~.store.Project` is one.
    They are annotated with this instead of importing ``store``, which imports them (so there is
    no import circle, not even one for type checkers); ``tests/test_layout.py`` checks that they
    use nothing else and that ``Project`` defines all of it."""

    folder: Path

    @property
    def spec(self) -> TaskSpec: ...

    @property
    def current_model(self) -> Path | None: ...

    def set_current_model(self, model: str | os.PathLike | None) -> None: ...

    def relative(self, path: str | os.PathLike) -> str: ...

    def slide(self, slide_id: str) -> dict: ...

    def regions(self, slide_id: str | None = None) -> list[dict]: ...

    def region_mpp(self, region: dict) -> float | None: ...

    def reviewed(self, slide_id: str) -> list[list[int]]: ...

    def training_items(self, spec: TaskSpec | None = None) -> list[LabeledImage]: ...

    def history(self) -> list[dict]: ...


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


def rewrite_jsonl(path: Path, records: list[dict]) -> None:
    """Replace a JSON-lines file by ``records`` in one step (temporary file, fsync, rename):
    a reader sees the old lines or the new ones, never a mix."""
    with atomic_open(path, "wb") as f:
        for record in records:
            f.write((json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))


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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise DataError(f"{path}: line {i} is damaged ({describe_json_error(e)}); fix or remove that "
                            "line") from None
    if tail.strip():
        try:
            records.append(json.loads(tail))  # complete record whose newline was lost
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
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


# ---------------------------------------------------------------------------------------------
# what a project folder may say (a project is meant to be shared: its files are checked, never
# trusted; every name becomes a path only through a safe name, every path stays inside)

REGION_ID = re.compile(r"r\d{1,9}")


def _int_list(value: object, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value))


def check_meta(meta: dict, path: Path) -> None:
    """``project.json``'s slides, names and model reference, checked; :class:`DataError` naming
    ``path`` and the first problem otherwise (slide ids become file names: ``labels/<id>.zarr``)."""
    slides = meta.get("slides", [])
    if not isinstance(slides, list):
        raise DataError(f"{path}: 'slides' must be a list")
    seen: set[str] = set()
    for i, s in enumerate(slides):
        if not isinstance(s, dict):
            raise DataError(f"{path}: slide {i} is not a JSON object")
        sid = s.get("id")
        if not is_safe_name(sid):
            raise DataError(f"{path}: slide {i} has the id {sid!r}, which is not a safe name "
                            "(letters, digits, '.', '_', '-'; not hidden): refused")
        if sid in seen:
            raise DataError(f"{path}: slide id {sid!r} appears twice")
        seen.add(sid)
        if not isinstance(s.get("path"), str) or not s["path"]:
            raise DataError(f"{path}: slide {sid!r} has no file path")
        if not _int_list(s.get("shape"), 2) or min(s["shape"]) <= 0:
            raise DataError(f"{path}: slide {sid!r} has no valid shape ([height, width] > 0)")
    names = meta.get("class_names", [])
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise DataError(f"{path}: 'class_names' must be a list of names")
    model = meta.get("current_model")
    if model is not None and (not isinstance(model, str) or not model or "\x00" in model):
        raise DataError(f"{path}: 'current_model' must be a checkpoint path or null")
    if not isinstance(meta.get("settings", {}), dict):
        raise DataError(f"{path}: 'settings' must be a JSON object")


def check_regions(records: list, folder: Path, slide_ids: set[str], path: Path) -> list[dict]:
    """Manifest records, checked: a region id of our form, a known slide, integer bounds and
    level, and image / mask paths that stay inside ``folder``; :class:`DataError` naming the
    manifest line otherwise. Returns ``records``."""
    for line, rec in enumerate(records, 1):
        where = f"{path}: line {line}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: not a JSON object")
        rid = rec.get("id")
        if not isinstance(rid, str) or not REGION_ID.fullmatch(rid):
            raise DataError(f"{where}: region id {rid!r} is not of the form r00001: refused")
        if rec.get("slide") not in slide_ids:
            raise DataError(f"{where}: region {rid} names slide {rec.get('slide')!r}, which the project "
                            "does not have")
        if not _int_list(rec.get("bounds"), 4) or not isinstance(rec.get("level"), int) or rec["level"] < 0:
            raise DataError(f"{where}: region {rid} needs integer bounds [y, x, h, w] and a level >= 0")
        if "shape" in rec and (not _int_list(rec["shape"], 2) or min(rec["shape"]) <= 0):
            raise DataError(f"{where}: region {rid} has no valid shape ([height, width] > 0)")
        for key in ("image", "mask"):
            inside(folder, rec.get(key), f"{where}: region {rid} {key}")
    return records


def check_history(records: list, folder: Path, path: Path) -> list[dict]:
    """Refine history records, checked: each names its new model by a path inside ``folder``
    (``models/refine-<n>``); :class:`DataError` naming the line otherwise. Returns ``records``."""
    for line, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {line}: not a JSON object")
        if rec.get("new_model") is not None:
            inside(folder, rec["new_model"], f"{path}: line {line}: new_model")
    return records
