"""Annotate-and-refine projects: a folder a pathologist can close, reopen and continue.

The loop: predict on a slide, correct a region by hand, *accept* it (it is stored as training
data and written back into the slide's label store), *refine* the model on every accepted
correction, see the before/after score, repeat on the region the model is least sure about
(:meth:`Project.suggest_regions`). The napari widget and the CLI both drive this module; nothing
here imports Qt or napari.

Layout of a project folder::

    project.json              format + version, task, class names, current model, settings,
                              slides (id, absolute path, mpp, level-0 shape), created/modified
    regions/manifest.jsonl    one JSON line per accepted region, in acceptance order (see below)
    regions/<rid>/image.png   the region's RGB image as accepted (uint8)
    regions/<rid>/mask.png    its labels: uint8 PNG when every id is < 256,
    regions/<rid>/mask.tif    otherwise a uint16 / uint32 TIFF (instance ids)
    labels/<slide id>.zarr    the slide's label store: int32, level-0 shape, 1024 x 1024 chunks
                              (zarr v3), created on the first accepted region of the slide;
                              accepted labels are written back at their bounds
    models/refine-<n>/        checkpoints written by :meth:`Project.refine`
    models/history.jsonl      one JSON line per refine (finished, cancelled or failed)
    reviewed.json             {slide id: [[y, x, h, w], ...]} regions the user has looked at

A manifest line holds ``id``, ``slide``, ``level``, ``bounds`` ([y, x, h, w] in level-0
pixels), ``shape`` ([h, w] of the stored image), ``time`` (UTC ISO 8601), ``author``,
``n_objects``, ``source`` (``"correction"`` or ``"import"``), ``model`` (the checkpoint whose
prediction was corrected, or null), ``image`` and ``mask`` (paths relative to the project).

Durability. The regions and their manifest are the source of truth; the label stores are
derived from them (:meth:`Project.rebuild_labels_store` regenerates one). Accepting a region
writes its files into a hidden temporary folder, renames it to ``regions/<rid>/`` and only then
appends the manifest line (flushed and fsynced): the line is the commit. A failure before it
removes the folder; a crash between the rename and the append leaves a folder no line names,
which readers ignore and whose id is never reused. A crash during the append leaves a truncated
last line: :meth:`Project.open` ignores it with a warning and the next append cuts it off.
``project.json``, ``reviewed.json`` and the mask/image files are written atomically (temporary
file, then rename).

Refining. :meth:`Project.refine` is a generator of :class:`~.core.training.Progress` events,
like the core training loops. It fine-tunes the current model (or ``base_model``) on the
accepted regions into a new ``models/refine-<n>/`` and scores the base and the new model on
held-out accepted regions (all of them, and said so, when fewer than two regions exist or
``val_fraction="all"``). The project's current model switches to the new checkpoint only when
the run finishes. Cancelling (closing the generator) saves the checkpoint reached so far under
``models/`` -- usable later as ``base_model`` -- records a ``"cancelled"`` history line and
leaves the current model unchanged.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .core.atomic import normal_permissions, write_json_atomic, write_png_atomic
from .core.data import LabeledImage, TaskSpec, downscale_item, mask_to_target, read_image, read_mask, split_items
from .core.errors import DataError, GenSelfDiffError
from .core.training import FinetuneConfig, Progress, finetune

FORMAT = "napari-genselfdiff-project"
FORMAT_VERSION = 1
PROJECT_FILE = "project.json"
MANIFEST = "regions/manifest.jsonl"
HISTORY = "models/history.jsonl"
REVIEWED = "reviewed.json"
STORE_CHUNK = 1024
SOURCES = ("correction", "import")
#: Regions whose mean grey value is above this, or whose mean saturation is below
#: ``BACKGROUND_SATURATION``, are glass, not tissue.
BACKGROUND_BRIGHTNESS = 220.0
BACKGROUND_SATURATION = 0.05
#: Fixed overrides refine() does not accept: they follow from the project.
_FIXED_FIELDS = {"task", "boundary", "num_classes", "steps"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# files

def _write_png(path: Path, array: np.ndarray) -> None:
    """Write an image or a uint8 mask as PNG (module-level so tests can make it fail)."""
    write_png_atomic(path, array)


def _write_tif(path: Path, array: np.ndarray) -> None:
    import io

    import tifffile

    from .core.atomic import atomic_open
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, compression="zlib")
    with atomic_open(path, "wb") as f:
        f.write(buffer.getvalue())


def _append_line(path: Path, record: dict) -> None:
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
# labels

def _check_region(image: np.ndarray, labels: np.ndarray, bounds: Sequence[int], level: int) -> tuple:
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


def _mask_dtype(labels: np.ndarray) -> np.dtype:
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


def _resize_nearest(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    rows = (np.arange(h) * labels.shape[0]) // h
    cols = (np.arange(w) * labels.shape[1]) // w
    return labels[rows[:, None], cols[None, :]]


# ---------------------------------------------------------------------------------------------
# the project

class Project:
    """An annotate-and-refine project folder. Create with :meth:`create`, reopen with :meth:`open`.

    Methods that change the project may be called from a worker thread (e.g. :meth:`refine`
    running while the user accepts another region): metadata updates are serialised by a lock.
    """

    def __init__(self, folder: Path, meta: dict, regions: list[dict]):
        self.folder = folder
        self._meta = meta
        self._regions = regions
        self._lock = threading.RLock()

    # -- creating and opening ---------------------------------------------------------------

    @classmethod
    def create(cls, folder: str | os.PathLike, *, task: str = "glands", class_names: Sequence[str] | None = None,
               model: str | os.PathLike | None = None, boundary: bool = False) -> "Project":
        """A new project in ``folder`` (created, or an existing empty folder).

        ``model`` is a segmentation (or pretrained) checkpoint folder or a bundled model name;
        it is referenced by absolute path, not copied. ``class_names`` (background first) defaults
        to the task's; for ``multiclass`` its length sets the number of classes.
        """
        folder = Path(folder).expanduser().absolute()
        if (folder / PROJECT_FILE).exists():
            raise DataError(f"{folder}: is already a project; open it instead")
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise DataError(f"{folder}: exists and is not an empty folder; choose a new or empty folder")
        spec = _make_spec(task, boundary, class_names)
        model_path = None if model is None else _model_path(model)
        folder.mkdir(parents=True, exist_ok=True)
        now = _now()
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": now, "modified": now,
                "task": spec.to_dict(), "class_names": list(spec.class_names), "current_model": model_path,
                "settings": {}, "slides": []}
        write_json_atomic(folder / PROJECT_FILE, meta)
        return cls(folder, meta, [])

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Project":
        """Reopen a project; :class:`DataError` if ``folder`` is not one or is from a newer version."""
        folder = Path(folder).expanduser().absolute()
        if not folder.is_dir():
            raise DataError(f"{folder}: no such project folder")
        path = folder / PROJECT_FILE
        if not path.is_file():
            raise DataError(f"{folder}: not a napari-genselfdiff project (no {PROJECT_FILE}); create one first")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: unreadable project file ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{path}: not a napari-genselfdiff project file")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise DataError(f"{path}: written by a newer napari-genselfdiff (project format "
                            f"{meta['format_version']}, this version reads up to {FORMAT_VERSION}); upgrade")
        return cls(folder, meta, read_jsonl(folder / MANIFEST))

    # -- metadata -----------------------------------------------------------------------------

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec.from_dict(self._meta["task"])

    @property
    def class_names(self) -> list[str]:
        return list(self._meta["class_names"])

    @property
    def current_model(self) -> Path | None:
        """The checkpoint folder predictions and the next refine start from (None: none yet)."""
        m = self._meta.get("current_model")
        return None if m is None else self._abs(m)

    def set_current_model(self, model: str | os.PathLike | None) -> None:
        with self._lock:
            self._meta["current_model"] = None if model is None else self._rel(_model_path(model))
            self._save()

    @property
    def settings(self) -> dict:
        """Free-form settings a front end wants to keep with the project (copy; see update_settings)."""
        return dict(self._meta["settings"])

    def update_settings(self, **values: Any) -> None:
        with self._lock:
            self._meta["settings"].update(values)
            self._save()

    def _save(self) -> None:
        self._meta["modified"] = _now()
        write_json_atomic(self.folder / PROJECT_FILE, self._meta)

    def _abs(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.folder / p

    def _rel(self, path: str | os.PathLike) -> str:
        """Paths inside the project are stored relative to it, so the folder can be moved."""
        p = Path(path).absolute()
        with contextlib.suppress(ValueError):
            return p.relative_to(self.folder).as_posix()
        return str(p)

    # -- slides -------------------------------------------------------------------------------

    def slides(self) -> list[dict]:
        return [dict(s) for s in self._meta["slides"]]

    def slide(self, slide_id: str) -> dict:
        for s in self._meta["slides"]:
            if s["id"] == slide_id:
                return dict(s)
        known = ", ".join(s["id"] for s in self._meta["slides"]) or "none yet; add_slide first"
        raise DataError(f"unknown slide id {slide_id!r} in project {self.folder} (slides: {known})")

    def add_slide(self, path: str | os.PathLike, *, mpp: float | None = None,
                  shape: Sequence[int] | None = None) -> str:
        """Register a slide (or image) file; returns its id, derived from the file name and made
        unique. Adding the same file again returns its existing id. Without ``shape`` the file is
        opened (``slide.reader``) to read its level-0 shape and, if not given, its mpp."""
        path = Path(path).expanduser().absolute()
        if not path.exists():
            raise DataError(f"{path}: no such slide file")
        with self._lock:
            for s in self._meta["slides"]:
                if s["path"] == str(path):
                    return s["id"]
            if shape is None:
                from .slide.reader import open_slide
                with open_slide(path) as sl:
                    shape, mpp = sl.shape[:2], (mpp if mpp is not None else sl.mpp)
            if len(shape) < 2 or min(int(shape[0]), int(shape[1])) <= 0:
                raise DataError(f"{path}: invalid slide shape {tuple(shape)}")
            if mpp is not None and not mpp > 0:
                raise DataError(f"{path}: microns per pixel must be > 0, got {mpp}")
            slide_id = _unique(_slug(path), {s["id"] for s in self._meta["slides"]})
            self._meta["slides"].append({"id": slide_id, "path": str(path), "mpp": mpp,
                                         "shape": [int(shape[0]), int(shape[1])], "added": _now()})
            self._save()
        return slide_id

    # -- regions ------------------------------------------------------------------------------

    def regions(self, slide_id: str | None = None) -> list[dict]:
        """Accepted regions (manifest records) in acceptance order, optionally of one slide."""
        return [dict(r) for r in self._regions if slide_id is None or r["slide"] == slide_id]

    def accept_region(self, slide_id: str, image: np.ndarray, labels: np.ndarray, bounds: Sequence[int], *,
                      level: int = 0, author: str = "", model: str | os.PathLike | None = None,
                      source: str = "correction") -> str:
        """Store a corrected region as training data and write its labels into the slide's store.

        ``image`` (h, w, 3) uint8 and ``labels`` (h, w) (class or instance ids, 0 = background)
        are the region at pyramid ``level``; ``bounds`` = (y, x, h, w) is where it lies in
        level-0 pixels (at level 0 it must match the labels' shape; at coarser levels the labels
        are scaled up by nearest neighbour for the store). Empty labels are a valid correction.
        Returns the new region's id. See the module docstring for the atomicity guarantees.
        """
        slide = self.slide(slide_id)
        image, labels, bounds = _check_region(image, labels, bounds, level)
        if source not in SOURCES:
            raise DataError(f"region source must be one of {', '.join(SOURCES)}, got {source!r}")
        if bounds[0] >= slide["shape"][0] or bounds[1] >= slide["shape"][1]:
            raise DataError(f"bounds {bounds} start outside slide {slide_id} ({slide['shape'][0]}x{slide['shape'][1]})")
        dtype = _mask_dtype(labels)
        with self._lock:
            rid = self._next_region_id()
            mask_name = "mask.png" if dtype == np.uint8 else "mask.tif"
            final = self.folder / "regions" / rid
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{rid}.", suffix=".tmp", dir=final.parent))
            try:
                _write_png(tmp / "image.png", image)
                (_write_png if mask_name == "mask.png" else _write_tif)(tmp / mask_name, labels.astype(dtype))
                normal_permissions(tmp, recursive=False)  # its files were written atomically: normal already
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            record = {"id": rid, "slide": slide_id, "level": int(level), "bounds": list(bounds),
                      "shape": [int(labels.shape[0]), int(labels.shape[1])], "time": _now(), "author": author,
                      "n_objects": count_objects(labels), "source": source,
                      "model": None if model is None else str(model),
                      "image": f"regions/{rid}/image.png", "mask": f"regions/{rid}/{mask_name}"}
            try:
                _append_line(self.folder / MANIFEST, record)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            self._regions.append(record)
        try:
            self._write_back(slide, labels, bounds)
        except Exception as e:  # the region itself is safely stored; the store can be rebuilt
            warnings.warn(f"region {rid} saved, but the label store of {slide_id} could not be updated "
                          f"({type(e).__name__}: {e}); Project.rebuild_labels_store({slide_id!r}) redoes it",
                          stacklevel=2)
        return rid

    def _next_region_id(self) -> str:
        """One past the highest id in the manifest or on disk (orphans of a crash included)."""
        used = [r["id"] for r in self._regions]
        regions_dir = self.folder / "regions"
        if regions_dir.is_dir():
            used += [p.name for p in regions_dir.iterdir() if p.is_dir()]
        numbers = [int(m.group(1)) for u in used if (m := re.fullmatch(r"r(\d+)", u))]
        return f"r{max(numbers, default=0) + 1:05d}"

    def region_arrays(self, region: dict | str) -> tuple[np.ndarray, np.ndarray]:
        """(image, labels) of an accepted region, as stored."""
        rec = region if isinstance(region, dict) else self._region(region)
        return read_image(self._abs(rec["image"])), read_mask(self._abs(rec["mask"]))

    def _region(self, rid: str) -> dict:
        for r in self._regions:
            if r["id"] == rid:
                return r
        raise DataError(f"no accepted region {rid!r} in project {self.folder}")

    def training_items(self, spec: TaskSpec | None = None) -> list[LabeledImage]:
        """Every accepted region as a training item (named by region id), in manifest order.
        Labels become class ids for ``spec`` (default: the project's task); instance ids of a
        binary task become foreground."""
        spec = spec or self.spec
        items = []
        for rec in self._regions:
            image, labels = self.region_arrays(rec)
            target = mask_to_target(labels, spec, self._abs(rec["mask"]))
            items.append(LabeledImage(rec["id"], image, target))
        return items

    # -- label stores -------------------------------------------------------------------------

    def _store_path(self, slide_id: str) -> Path:
        return self.folder / "labels" / f"{slide_id}.zarr"

    def labels_store(self, slide_id: str):
        """The slide's label store (a zarr v3 int32 array at level-0 shape), or None when nothing
        has been written back to it yet."""
        self.slide(slide_id)
        path = self._store_path(slide_id)
        if not path.exists():
            return None
        import zarr
        return zarr.open_array(str(path), mode="r+")

    def _create_store(self, slide: dict):
        import zarr
        path = self._store_path(slide["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = slide["shape"]
        return zarr.create_array(str(path), shape=(h, w), chunks=(STORE_CHUNK, STORE_CHUNK),
                                 dtype="int32", fill_value=0, zarr_format=3, overwrite=True,
                                 attributes={"slide": slide["id"], "source": str(slide["path"])})

    def _write_back(self, slide: dict, labels: np.ndarray, bounds: tuple[int, int, int, int]) -> None:
        """Put ``labels`` into the store at ``bounds`` (clipped to the slide)."""
        store = self.labels_store(slide["id"])
        if store is None:
            store = self._create_store(slide)
        y, x, h, w = bounds
        if labels.shape != (h, w):
            labels = _resize_nearest(labels, h, w)
        y1, x1 = min(y + h, store.shape[0]), min(x + w, store.shape[1])
        if y1 > y and x1 > x:
            store[y:y1, x:x1] = labels[:y1 - y, :x1 - x].astype(np.int32)

    def rebuild_labels_store(self, slide_id: str):
        """Recreate a slide's label store from its accepted regions (in order); returns it."""
        slide = self.slide(slide_id)
        with self._lock:
            store = self._create_store(slide)
            for rec in self.regions(slide_id):
                self._write_back(slide, self.region_arrays(rec)[1], tuple(rec["bounds"]))
        return store

    def export_geojson(self, slide_id: str, path: str | os.PathLike, **kwargs: Any) -> int:
        """The slide's corrected labels as QuPath GeoJSON (level-0 coordinates); returns the
        number of features. ``kwargs`` go to ``export.geojson.export_label_array_chunked``."""
        from .export.geojson import export_label_array_chunked
        store = self.labels_store(slide_id)
        if store is None:
            raise DataError(f"slide {slide_id}: no corrected labels to export yet")
        kwargs.setdefault("class_name", self.class_names[1] if len(self.class_names) > 1 else "Object")
        return export_label_array_chunked(store, path, chunk=4 * STORE_CHUNK, **kwargs)

    # -- reviewed regions ---------------------------------------------------------------------

    def reviewed(self, slide_id: str) -> list[list[int]]:
        """Bounds (y, x, h, w, level 0) the user has marked as reviewed on a slide."""
        self.slide(slide_id)
        return [list(b) for b in self._reviewed().get(slide_id, [])]

    def _reviewed(self) -> dict:
        path = self.folder / REVIEWED
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: unreadable ({e}); delete it to forget the reviewed regions") from None

    def mark_reviewed(self, slide_id: str, bounds: Sequence[int]) -> None:
        """Remember that the region at ``bounds`` (level-0 y, x, h, w) has been looked at, so
        :meth:`suggest_regions` does not offer it again."""
        self.slide(slide_id)
        if len(bounds) != 4 or int(bounds[2]) <= 0 or int(bounds[3]) <= 0:
            raise DataError(f"bounds must be (y, x, h, w) with h, w > 0, got {tuple(bounds)}")
        with self._lock:
            data = self._reviewed()
            data.setdefault(slide_id, []).append([int(v) for v in bounds])
            write_json_atomic(self.folder / REVIEWED, data)

    # -- suggesting regions -------------------------------------------------------------------

    def suggest_regions(self, predictor: Callable[[np.ndarray], np.ndarray], slide_or_image: Any,
                        **kwargs: Any) -> list[dict]:
        """Rank tissue regions by how unsure the model is about them (most unsure first); the
        blocking form of :meth:`iter_suggest_regions` (same arguments, same result)."""
        events = self.iter_suggest_regions(predictor, slide_or_image, **kwargs)
        while True:
            try:
                next(events)
            except StopIteration as stop:
                return stop.value

    def iter_suggest_regions(self, predictor: Callable[[np.ndarray], np.ndarray], slide_or_image: Any, *,
                             region_size: int = 512, level: int = 0, top_k: int = 5, exclude_reviewed: bool = True,
                             tissue_mask: np.ndarray | None = None, slide_id: str | None = None,
                             flips: bool = False, max_candidates: int = 64,
                             batch: int = 8) -> Iterator[Progress]:
        """Rank tissue regions by how unsure the model is about them (most unsure first), as a
        generator: it yields a ``Progress("suggest", scored, candidates)`` after each batch (so a
        GUI can show progress and cancel between batches: closing it stops the scoring) and
        *returns* the ranked list (``result = yield from ...``).

        ``predictor`` maps a (B, H, W, 3) uint8 batch to (B, C, H, W) softmax probabilities (a
        ``TorchPredictor`` or any function doing the same; objects with ``tile_multiple`` get
        reflect-padded input). ``slide_or_image`` is a slide id of this project, an (H, W, 3)
        array (level 0 only) or an object with ``read_region(level, y, x, h, w)`` and ``shape``
        (and optionally ``levels``/``downsamples``, like ``slide.reader.Slide``). For arrays and
        objects, give ``slide_id`` to skip that slide's reviewed and accepted regions.

        Candidates are a grid of ``region_size`` squares at ``level``; background (mean grey >
        220 or mean saturation < 0.05, or less than a quarter inside ``tissue_mask``, a boolean
        image covering the whole slide at any resolution) and regions at least half covered by a
        reviewed or accepted region are skipped; at most ``max_candidates`` are scored, a
        deterministic subsample. The score is the mean normalised entropy (0..1) of the class
        probabilities; with ``flips`` they are averaged over horizontal and vertical flips and
        ``disagreement`` (the entropy of the mean minus the mean entropy) is reported too.
        Returns up to ``top_k`` dicts: ``bounds`` (level-0 y, x, h, w), ``level``, ``score``,
        ``disagreement``.
        """
        if region_size < 1 or top_k < 1 or max_candidates < 1:
            raise DataError("region_size, top_k and max_candidates must be >= 1")
        opened = None
        if isinstance(slide_or_image, str):
            slide_id = slide_or_image
            from .slide.reader import open_slide
            opened = slide_or_image = open_slide(self.slide(slide_id)["path"])
        elif slide_id is not None:
            self.slide(slide_id)
        try:
            view = _LevelView(slide_or_image, level)
            cells = view.grid(region_size)
            if tissue_mask is not None:
                cells = [c for c in cells if _mask_fraction(tissue_mask, view, c) >= 0.25]
            else:
                thumb = view.thumbnail()
                if thumb is not None:
                    cells = [c for c in cells if not _is_background(_thumb_window(thumb, view, c))]
            if exclude_reviewed and slide_id is not None:
                done = self.reviewed(slide_id) + [r["bounds"] for r in self.regions(slide_id)]
                cells = [c for c in cells if not _mostly_covered(view.full_res(c), done)]
            if len(cells) > max_candidates:
                pick = np.sort(np.random.default_rng(0).choice(len(cells), max_candidates, replace=False))
                cells = [cells[i] for i in pick]
            scored = yield from _score_cells(predictor, view, cells, tissue_mask is None, flips, batch)
        finally:
            if opened is not None:
                opened.close()
        scored.sort(key=lambda s: (-s[1], s[0][0], s[0][1]))
        return [{"bounds": list(view.full_res(c)), "level": level, "score": score, "disagreement": dis}
                for c, score, dis in scored[:top_k]]

    # -- refining -----------------------------------------------------------------------------

    def history(self) -> list[dict]:
        """One record per refine (finished, cancelled or failed), oldest first."""
        return read_jsonl(self.folder / HISTORY)

    def refine(self, *, base_model: str | os.PathLike | None = None, steps: int = 200, device: str = "auto",
               val_fraction: float | str = 0.25, seed: int = 0, **overrides: Any) -> Iterator[Progress]:
        """Fine-tune the current model (or ``base_model``) on the accepted regions.

        Yields ``Progress`` events (stage ``"refine"`` for this method's own, ``"finetune"`` for
        the training steps); the last has ``done=True``, ``checkpoint`` = the new model and
        ``metrics = {"before": ..., "after": ...}``: the mean foreground Dice of the base and the
        new model on the validation regions (``before`` is None when the base cannot segment:
        no model, or a pretrained diffusion model). ``val_fraction`` holds out that fraction of
        regions for validation (they are not trained on); ``"all"`` trains and validates on every
        region, as does a project with fewer than two regions (the event message says so).
        ``overrides`` are :class:`FinetuneConfig` fields (``patch``, ``batch``, ``lr``,
        ``preset``, ...). Close the generator to cancel (see the module docstring).
        """
        cfg = self._refine_config(steps, seed, overrides, base_model)
        base = self.current_model if base_model is None else Path(_model_path(base_model))
        items = self.training_items()
        if not items:
            raise DataError(f"project {self.folder}: no accepted regions to refine on; accept a corrected region first")
        items = self._at_model_resolution(items, cfg.mpp)
        train, val, how = _split_for_refine(items, val_fraction, seed)
        out = self._next_model_dir()
        inner = finetune(train, out, cfg, init=base, device=device)
        before, after, status, step = None, None, "failed", 0
        try:
            first = next(inner)  # checks the data (e.g. every mask empty) before any scoring
            yield Progress("refine", 0, steps, message=f"scoring the base model on {how}")
            before = _score(base, val, device)
            yield replace(first, message=f"{first.message}; validating on {how}")
            for ev in inner:
                step = ev.step
                if ev.done:
                    break
                yield ev
            yield Progress("refine", step, steps, message="scoring the refined model")
            after = _score(out, val, device)
            status = "finished"
        except GeneratorExit:
            status = "cancelled"
            raise
        finally:
            inner.close()  # when stopped early this runs finetune's finally: the checkpoint is saved
            if out.exists():
                self._record_refine(status, base, out, step, train, val, how, before, after)
        yield Progress("refine", step, steps, metrics={"before": before, "after": after}, checkpoint=str(out),
                       done=True, message=f"refined model {out.name}: Dice {_fmt(before)} -> {_fmt(after)} on {how}")

    def _at_model_resolution(self, items: list[LabeledImage], model_mpp: float | None) -> list[LabeledImage]:
        """Regions are stored at the level they were accepted at; a model trained at another
        resolution (e.g. a half-resolution gland model) must be refined at its own, so rescale
        where both the model's and the region's microns per pixel are known."""
        if not model_mpp:
            return items
        regions = {r["id"]: r for r in self._regions}
        out = []
        for it in items:
            mpp = self._region_mpp(regions[it.name]) if it.name in regions else None
            factor = model_mpp / mpp if mpp else 1.0
            out.append(downscale_item(it, factor) if abs(factor - 1.0) > 0.1 else it)
        return out

    def _region_mpp(self, rec: dict) -> float | None:
        """Microns per pixel of a stored region (its manifest record): its slide's level-0 mpp times
        how much coarser the stored pixels are than level 0 (1 for level-0 regions); None when the
        slide's mpp is unknown."""
        slide_mpp = next((s.get("mpp") for s in self._meta["slides"] if s["id"] == rec["slide"]), None)
        stored_height = (rec.get("shape") or [rec["bounds"][2] if rec["level"] == 0 else 0])[0]
        if not slide_mpp or not stored_height:
            return None
        return float(slide_mpp) * rec["bounds"][2] / stored_height

    def _record_refine(self, status: str, base: Path | None, out: Path, step: int, train, val, how: str,
                       before: float | None, after: float | None) -> None:
        """One history line; a finished refine also becomes the current model."""
        record = {"time": _now(), "status": status, "base_model": None if base is None else self._rel(base),
                  "new_model": self._rel(out), "steps": step, "train_regions": [it.name for it in train],
                  "val_regions": [it.name for it in val], "validated_on": how, "n_regions": len(self._regions),
                  "before": before, "after": after}
        _append_line(self.folder / HISTORY, _finite(record))
        if status == "finished":
            self.set_current_model(out)

    def _refine_config(self, steps: int, seed: int, overrides: dict, base_model) -> FinetuneConfig:
        allowed = {f.name for f in fields(FinetuneConfig)} - _FIXED_FIELDS
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise DataError(f"unknown refine setting(s) {', '.join(unknown)}; choose from {', '.join(sorted(allowed))}")
        if steps < 1:
            raise DataError(f"steps must be >= 1, got {steps}")
        spec = self.spec
        cfg = FinetuneConfig(task=spec.task, boundary=spec.boundary,
                             num_classes=spec.num_classes if spec.task == "multiclass" else None,
                             steps=steps, seed=seed, val_every=0)
        if "mpp" not in overrides:
            cfg = replace(cfg, mpp=self._training_mpp(base_model))
        return replace(cfg, **overrides)

    def _training_mpp(self, base_model) -> float | None:
        """The base model's mpp, else the regions' when they all share one (within 10 %)."""
        base = self.current_model if base_model is None else Path(_model_path(base_model))
        if base is not None:
            from .core.checkpoint import load_config
            mpp = load_config(base).get("mpp")
            if mpp:
                return float(mpp)
        mpps = [self._region_mpp(r) for r in self._regions]
        if not mpps or any(m is None for m in mpps):
            return None
        return mpps[0] if max(mpps) / min(mpps) < 1.1 else None

    def _next_model_dir(self) -> Path:
        models = self.folder / "models"
        models.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for p in models.iterdir() if (m := re.fullmatch(r"refine-(\d+)", p.name))]
        return models / f"refine-{max(numbers, default=0) + 1}"


# ---------------------------------------------------------------------------------------------
# helpers

def _make_spec(task: str, boundary: bool, class_names: Sequence[str] | None) -> TaskSpec:
    n = len(class_names) if (class_names is not None and task == "multiclass") else None
    spec = TaskSpec.make(task, boundary, n)
    if class_names is None:
        return spec
    names = tuple(str(c) for c in class_names)
    if len(names) != spec.num_classes:
        raise DataError(f"task {task!r} has {spec.num_classes} classes ({', '.join(spec.class_names)}), "
                        f"but {len(names)} class names were given")
    return replace(spec, class_names=names)


def _model_path(model: str | os.PathLike) -> str:
    """A bundled model name or a checkpoint folder -> its absolute path (checked to be a checkpoint)."""
    from .core.checkpoint import load_config
    from .models import resolve_model
    path = Path(resolve_model(model)).absolute()
    load_config(path)
    return str(path)


def _slug(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem or name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "slide"


def _unique(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def _split_for_refine(items: list[LabeledImage], val_fraction: float | str, seed: int):
    """(train, val, description of the validation set)."""
    if val_fraction == "all" or len(items) < 2:
        why = "as asked" if val_fraction == "all" else "fewer than 2 regions"
        return items, items, f"all {len(items)} accepted region(s) ({why}; they are also trained on)"
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1) or 'all', got {val_fraction!r}")
    train, val = split_items(items, float(val_fraction), seed)
    return train, val, f"{len(val)} held-out accepted region(s)"


def _score(model: Path | None, items: Sequence[LabeledImage], device: str) -> float | None:
    """Mean foreground Dice of a segmentation checkpoint on ``items`` (None if it cannot segment)."""
    if model is None:
        return None
    from .core.checkpoint import load_config
    if load_config(model).get("kind") != "segmentation":
        return None
    from .core.evaluation import evaluate_items
    from .core.inference import TorchPredictor
    predictor = TorchPredictor.from_checkpoint(model, device=device)
    return float(evaluate_items(predictor, items)["mean"]["dice"])


def _finite(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


class _LevelView:
    """One pyramid level of an array or slide-like object, with level-0 coordinate mapping."""

    def __init__(self, source: Any, level: int):
        self.source, self.level = source, level
        if isinstance(source, np.ndarray):
            if source.ndim != 3 or source.shape[2] != 3:
                raise DataError(f"image must be (H, W, 3) RGB, got shape {source.shape}")
            if level != 0:
                raise DataError("an in-memory image has only level 0")
            self.height, self.width, self.downsample = source.shape[0], source.shape[1], 1.0
        elif hasattr(source, "read_region") and hasattr(source, "shape"):
            levels = getattr(source, "levels", None)
            if levels is not None:
                if not 0 <= level < len(levels):
                    raise DataError(f"level {level} does not exist (the slide has {len(levels)} levels)")
                self.height, self.width = (int(v) for v in levels[level].shape[:2])
                downs = getattr(source, "downsamples", None)
                self.downsample = float(downs[level]) if downs is not None else source.shape[0] / self.height
            elif level != 0:
                raise DataError("this slide object has no 'levels', so only level 0 can be used")
            else:
                self.height, self.width, self.downsample = int(source.shape[0]), int(source.shape[1]), 1.0
        else:
            raise DataError(f"cannot read regions from a {type(source).__name__}: give an (H, W, 3) array "
                            "or an object with read_region(level, y, x, h, w) and shape")

    def grid(self, size: int) -> list[tuple[int, int, int, int]]:
        """Non-overlapping squares covering the level (the last row/column shifted to fit)."""
        h, w = min(size, self.height), min(size, self.width)
        ys = list(range(0, self.height - h + 1, h))
        xs = list(range(0, self.width - w + 1, w))
        if ys[-1] + h < self.height:
            ys.append(self.height - h)
        if xs[-1] + w < self.width:
            xs.append(self.width - w)
        return [(y, x, h, w) for y in ys for x in xs]

    def read(self, cell: tuple[int, int, int, int]) -> np.ndarray:
        y, x, h, w = cell
        if isinstance(self.source, np.ndarray):
            return np.ascontiguousarray(self.source[y:y + h, x:x + w])
        return np.asarray(self.source.read_region(self.level, y, x, h, w))[..., :3]

    def thumbnail(self, max_side: int = 2048) -> np.ndarray | None:
        """A small image of the whole level for a cheap background pre-filter, when one is at hand
        (arrays: strided view; pyramids: their coarsest level, if small)."""
        if isinstance(self.source, np.ndarray):
            step = max(1, math.ceil(max(self.height, self.width) / max_side))
            return self.source[::step, ::step]
        levels = getattr(self.source, "levels", None)
        if levels is None or len(levels) < 2:
            return None
        last = len(levels) - 1
        h, w = (int(v) for v in levels[last].shape[:2])
        if max(h, w) > max_side:
            return None
        return np.asarray(self.source.read_region(last, 0, 0, h, w))

    def full_res(self, cell: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        d = self.downsample
        return tuple(int(round(v * d)) for v in cell)  # type: ignore[return-value]


def _is_background(rgb: np.ndarray) -> bool:
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.size == 0:
        return True
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = (hi - lo) / np.maximum(hi, 1.0)
    return bool(rgb.mean() > BACKGROUND_BRIGHTNESS or saturation.mean() < BACKGROUND_SATURATION)


def _window(shape: tuple[int, int], view: _LevelView, cell) -> tuple[slice, slice]:
    """The part of an image of ``shape`` (covering the whole level) under ``cell``."""
    sy, sx = shape[0] / view.height, shape[1] / view.width
    y, x, h, w = cell
    y0, x0 = int(y * sy), int(x * sx)
    return slice(y0, max(y0 + 1, int(math.ceil((y + h) * sy)))), slice(x0, max(x0 + 1, int(math.ceil((x + w) * sx))))


def _thumb_window(thumb: np.ndarray, view: _LevelView, cell) -> np.ndarray:
    return thumb[_window(thumb.shape[:2], view, cell)]


def _mask_fraction(mask: np.ndarray, view: _LevelView, cell) -> float:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"tissue_mask must be a 2-D boolean image, got shape {mask.shape}")
    return float(np.mean(mask[_window(mask.shape, view, cell)] > 0))


def _mostly_covered(box: Sequence[int], others: Sequence[Sequence[int]], fraction: float = 0.5) -> bool:
    y, x, h, w = box
    for oy, ox, oh, ow in others:
        iy = max(0, min(y + h, oy + oh) - max(y, oy))
        ix = max(0, min(x + w, ox + ow) - max(x, ox))
        if iy * ix >= fraction * h * w:
            return True
    return False


def _predict_batch(predictor, tiles: np.ndarray) -> np.ndarray:
    m = int(getattr(predictor, "tile_multiple", 1) or 1)
    h, w = tiles.shape[1:3]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        tiles = np.pad(tiles, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
    probs = np.asarray(predictor(tiles), dtype=np.float32)
    if probs.ndim != 4 or probs.shape[0] != len(tiles):
        raise DataError(f"the predictor returned shape {probs.shape}; expected (B, C, H, W) for {len(tiles)} tiles")
    return probs[:, :, :h, :w]


def _entropy(probs: np.ndarray) -> np.ndarray:
    """Per-image mean entropy over (B, C, H, W) probabilities, normalised by log C to [0, 1]."""
    c = probs.shape[1]
    p = np.clip(probs, 1e-8, 1.0)
    ent = -(p * np.log(p)).sum(axis=1) / math.log(c) if c > 1 else np.zeros(p.shape[:1] + p.shape[2:])
    return ent.reshape(len(probs), -1).mean(axis=1)


def _score_cells(predictor, view: _LevelView, cells, colour_test: bool, flips: bool, batch: int):
    """Yield a Progress per batch; return [(cell, score, disagreement)] for the tissue cells among ``cells``."""
    out = []
    for i in range(0, len(cells), batch):
        yield Progress("suggest", i, len(cells), message=f"scored {i} of {len(cells)} candidate regions")
        group, tiles = [], []
        for cell in cells[i:i + batch]:
            tile = view.read(cell)
            if colour_test and _is_background(tile):
                continue
            group.append(cell)
            tiles.append(tile)
        if not tiles:
            continue
        tiles = np.stack(tiles)
        views = [_predict_batch(predictor, tiles)]
        if flips:
            views.append(_predict_batch(predictor, np.ascontiguousarray(tiles[:, :, ::-1]))[..., ::-1])
            views.append(_predict_batch(predictor, np.ascontiguousarray(tiles[:, ::-1]))[:, :, ::-1])
        total = _entropy(np.mean(views, axis=0))
        expected = np.mean([_entropy(v) for v in views], axis=0)
        out += [(c, float(t), float(max(t - e, 0.0))) for c, t, e in zip(group, total, expected)]
    yield Progress("suggest", len(cells), len(cells), message=f"scored {len(cells)} candidate regions", done=True)
    return out


# ---------------------------------------------------------------------------------------------
# command-line entry points (wired into ``genselfdiff project ...`` by cli.py)

def project_cli_create(args) -> int:
    """Create a project. ``args``: ``folder``; optional ``task`` ('glands'), ``class_names``
    (list or None), ``model`` (checkpoint or bundled name), ``boundary`` (False), ``slides``
    (list of slide paths to add)."""
    project = Project.create(args.folder, task=getattr(args, "task", None) or "glands",
                             class_names=getattr(args, "class_names", None), model=getattr(args, "model", None),
                             boundary=bool(getattr(args, "boundary", False)))
    for path in getattr(args, "slides", None) or []:
        print(f"added slide {project.add_slide(path)} ({path})")
    print(f"created project {project.folder} (task {project.spec.task}, model {project.current_model or 'none'})")
    return 0


def project_cli_refine(args) -> int:
    """Refine the project's model with a progress bar. ``args``: ``folder``; optional ``steps``
    (200), ``device`` ('auto'), ``val_fraction`` (0.25, or 'all'), ``base_model``, ``seed`` (0),
    and FinetuneConfig overrides ``patch``, ``batch``, ``lr``, ``preset``, ``loss`` (None =
    default). Ctrl-C cancels, keeping the partial checkpoint under models/."""
    from tqdm import tqdm

    project = Project.open(args.folder)
    overrides = {k: getattr(args, k) for k in ("patch", "batch", "lr", "preset", "loss")
                 if getattr(args, k, None) is not None}
    val = getattr(args, "val_fraction", None)
    val = 0.25 if val is None else (val if val == "all" else float(val))
    events = project.refine(base_model=getattr(args, "base_model", None), steps=getattr(args, "steps", None) or 200,
                            device=getattr(args, "device", None) or "auto", val_fraction=val,
                            seed=getattr(args, "seed", None) or 0, **overrides)
    bar, last = None, None
    try:
        for last in events:
            if last.message:
                (bar.write if bar is not None else print)(last.message, file=sys.stderr)
            if bar is None:
                bar = tqdm(total=last.total, desc="refine", unit="step", dynamic_ncols=True, disable=None)
            bar.update(last.step - bar.n)
            if last.stage == "finetune" and last.step:
                bar.set_postfix(loss=f"{last.loss:.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        events.close()
    if last is None or not last.done:
        raise GenSelfDiffError("refine stopped before it finished")
    print(f"current model: {project.current_model}")
    return 0


def project_cli_status(args) -> int:
    """Print a project's slides, regions, current model and last refine. ``args``: ``folder``;
    optional ``json`` (True: print one JSON object instead)."""
    project = Project.open(args.folder)
    regions = project.regions()
    history = project.history()
    status = {"folder": str(project.folder), "task": project.spec.task, "class_names": project.class_names,
              "current_model": None if project.current_model is None else str(project.current_model),
              "slides": [{**s, "regions": sum(r["slide"] == s["id"] for r in regions)} for s in project.slides()],
              "regions": len(regions), "refines": len(history), "last_refine": history[-1] if history else None}
    if getattr(args, "json", False):
        print(json.dumps(status, indent=2))
        return 0
    print(f"project {status['folder']}: task {status['task']} ({', '.join(status['class_names'])})")
    print(f"current model: {status['current_model'] or 'none'}")
    for s in status["slides"]:
        shape = "x".join(map(str, s["shape"]))
        print(f"  slide {s['id']}: {s['regions']} region(s), {shape} px, mpp {s['mpp'] or '?'} ({s['path']})")
    print(f"{status['regions']} accepted region(s), {status['refines']} refine(s)")
    last = status["last_refine"]
    if last:
        print(f"last refine ({last['status']}, {last['time']}): {last['new_model']}, Dice "
              f"{_fmt(last.get('before'))} -> {_fmt(last.get('after'))} on {last['validated_on']}")
    return 0
