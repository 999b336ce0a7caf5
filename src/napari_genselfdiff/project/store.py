"""The project folder: create/open, slides, accepted regions and their manifest, label stores,
reviewed regions, the current model and the refine history (:class:`Project`). Suggesting
regions (``suggest``) and refining the model (``refine``) live in their own modules; the thin
methods here delegate to them. Nothing here imports Qt or napari.

Layout of a project folder::

    project.json              format + version, task, class names, current model, settings,
                              slides (id, absolute path, mpp, level-0 shape), created/modified
    regions/manifest.jsonl    one JSON line per accepted region, in acceptance order (see below)
    regions/<rid>/image.png   the region's RGB image as accepted (uint8)
    regions/<rid>/mask.png    its labels: uint8 PNG when every id is < 256,
    regions/<rid>/mask.tif    otherwise a uint16 / uint32 TIFF (instance ids)
    labels/<slide id>.zarr    the slide's label store: int32, level-0 shape, 1024 x 1024 chunks
                              (zarr v3), created on the first accepted region of the slide;
                              accepted labels are written back at their bounds, their object
                              ids unique in the store (see ``labels``)
    models/refine-<n>/        checkpoints written by :meth:`Project.refine`
    models/history.jsonl      one JSON line per refine (finished, cancelled or failed)
    reviewed.json             {slide id: [[y, x, h, w], ...]} regions the user has looked at

A manifest line holds ``id``, ``slide``, ``level``, ``bounds`` ([y, x, h, w] in level-0
pixels), ``shape`` ([h, w] of the stored image), ``time`` (UTC ISO 8601), ``author``,
``n_objects``, ``source`` (``"correction"`` or ``"import"``), ``model`` (the checkpoint whose
prediction was corrected, or null), ``image`` and ``mask`` (paths relative to the project),
and ``replaces`` (the ids of earlier regions with the same slide, level and bounds that this one
replaced; only when there were any).

Durability. The regions and their manifest are the source of truth; the label stores are
derived from them (:meth:`Project.rebuild_labels_store` regenerates one). Accepting a region
writes its files into a hidden temporary folder, renames it to ``regions/<rid>/`` and only then
appends the manifest line (flushed and fsynced): the line is the commit. A failure before it
removes the folder; a crash between the rename and the append leaves a folder no line names,
which readers ignore and whose id is never reused. A crash during the append leaves a truncated
last line: :meth:`Project.open` ignores it with a warning and the next append cuts it off.
A region that replaces another (same slide, level and bounds) commits by an atomic rewrite of
the whole manifest instead (temporary file, then rename): the old line and the new one are
swapped in one step. ``project.json``, ``reviewed.json`` and the mask/image files are written
atomically (temporary file, then rename).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..core.atomic import clean_stale_temps, inside, normal_permissions, write_json_atomic, write_png_atomic
from ..core.data import LabeledImage, TaskSpec, mask_to_target, read_image, read_mask
from ..core.errors import DataError, GenSelfDiffWarning, describe_json_error
from ..core.names import is_safe_name, safe_name
from ..core.progress import Progress
from ..formats.tiff import write_tiff
from . import labels as _labels
from . import refine as _refine
from . import suggest as _suggest
from .files import (FORMAT, FORMAT_VERSION, HISTORY, MANIFEST, PROJECT_FILE, REVIEWED, SOURCES, STORE_CHUNK,
                    REGION_ID, append_jsonl, check_history, check_meta, check_region, check_regions, count_objects,
                    mask_dtype, model_path, now, read_jsonl, region_mpp, rewrite_jsonl)


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write an image or a uint8 mask as PNG (module-level so tests can make it fail)."""
    write_png_atomic(path, array)


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
        model_ref = None if model is None else model_path(model)
        folder.mkdir(parents=True, exist_ok=True)
        created = now()
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": created, "modified": created,
                "task": spec.to_dict(), "class_names": list(spec.class_names), "current_model": model_ref,
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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise DataError(f"{path}: unreadable project file ({describe_json_error(e)})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{path}: not a napari-genselfdiff project file")
        version = meta.get("format_version")
        if type(version) is not int or version < 1:
            raise DataError(f"{path}: 'format_version' must be a whole number >= 1, got {version!r} "
                            "(the file was edited)")
        if version > FORMAT_VERSION:
            raise DataError(f"{path}: written by a newer napari-genselfdiff (project format "
                            f"{meta['format_version']}, this version reads up to {FORMAT_VERSION}); upgrade")
        check_meta(meta, path)  # a shared project is checked, never trusted (files.check_*)
        regions = check_regions(read_jsonl(folder / MANIFEST), folder, {s["id"] for s in meta.get("slides", [])},
                                folder / MANIFEST)
        return cls(folder, meta, regions)

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
            self._meta["current_model"] = None if model is None else self.relative(model_path(model))
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
        self._meta["modified"] = now()
        write_json_atomic(self.folder / PROJECT_FILE, self._meta)

    def _abs(self, path: str) -> Path:
        """A path the project refers to (a model: inside the project, or anywhere by absolute path)."""
        p = Path(path)
        return p if p.is_absolute() else self.folder / p

    def _inside(self, relative: str, what: str) -> Path:
        """A file of the project itself (a region's image or mask): it must stay inside the folder."""
        return inside(self.folder, relative, f"{self.folder / MANIFEST}: {what}")

    def relative(self, path: str | os.PathLike) -> str:
        """How a path is stored: relative to the project when inside it, so the folder can be moved."""
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
                from ..slide.reader import open_slide
                with open_slide(path) as sl:
                    shape, mpp = sl.shape[:2], (mpp if mpp is not None else sl.mpp)
            if len(shape) < 2 or min(int(shape[0]), int(shape[1])) <= 0:
                raise DataError(f"{path}: invalid slide shape {tuple(shape)}")
            if mpp is not None and not mpp > 0:
                raise DataError(f"{path}: microns per pixel must be > 0, got {mpp}")
            slide_id = _unique(_slide_name(path), {s["id"] for s in self._meta["slides"]})
            self._meta["slides"].append({"id": slide_id, "path": str(path), "mpp": mpp,
                                         "shape": [int(shape[0]), int(shape[1])], "added": now()})
            self._save()
        return slide_id

    # -- regions ------------------------------------------------------------------------------

    def regions(self, slide_id: str | None = None) -> list[dict]:
        """Accepted regions (manifest records) in acceptance order, optionally of one slide."""
        return [dict(r) for r in self._regions if slide_id is None or r["slide"] == slide_id]

    def region_mpp(self, region: dict) -> float | None:
        """Microns per pixel of an accepted region's stored pixels (None: its slide's mpp is unknown)."""
        slide_mpp = next((s.get("mpp") for s in self._meta["slides"] if s["id"] == region["slide"]), None)
        return region_mpp(region, slide_mpp)

    def accept_region(self, slide_id: str, image: np.ndarray, labels: np.ndarray, bounds: Sequence[int], *,
                      level: int = 0, author: str = "", model: str | os.PathLike | None = None,
                      source: str = "correction") -> str:
        """Store a corrected region as training data and write its labels into the slide's store.

        ``image`` (h, w, 3) uint8 and ``labels`` (h, w) (class or instance ids, 0 = background)
        are the region at pyramid ``level``; ``bounds`` = (y, x, h, w) is where it lies in
        level-0 pixels (at level 0 it must match the labels' shape; at coarser levels the labels
        are scaled up by nearest neighbour for the store). Empty labels are a valid correction.
        Returns the new region's id. See the module docstring for the atomicity guarantees.

        Accepting the same ``bounds`` of the same slide at the same ``level`` again *replaces* the
        earlier region: the new record (``replaces`` lists the old id) takes its place at the end
        of the manifest, which is rewritten atomically, so no reader (refine's split included)
        ever sees both. The old region's files stay on disk, named by no line, and its id is
        never reused.
        """
        slide = self.slide(slide_id)
        image, labels, bounds = check_region(image, labels, bounds, level)
        if source not in SOURCES:
            raise DataError(f"region source must be one of {', '.join(SOURCES)}, got {source!r}")
        if bounds[0] >= slide["shape"][0] or bounds[1] >= slide["shape"][1]:
            raise DataError(f"bounds {bounds} start outside slide {slide_id} ({slide['shape'][0]}x{slide['shape'][1]})")
        dtype = mask_dtype(labels)
        with self._lock:
            rid = self._next_region_id()
            mask_name = "mask.png" if dtype == np.uint8 else "mask.tif"
            final = inside(self.folder, f"regions/{rid}", f"{self.folder}: regions folder")
            manifest = inside(self.folder, MANIFEST, f"{self.folder}: manifest")
            final.parent.mkdir(parents=True, exist_ok=True)
            _clean_region_temps(final.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".{rid}.", suffix=".tmp", dir=final.parent))
            try:
                _write_png(tmp / "image.png", image)
                (_write_png if mask_name == "mask.png" else write_tiff)(tmp / mask_name, labels.astype(dtype))
                normal_permissions(tmp, recursive=False)  # its files were written atomically: normal already
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            record = {"id": rid, "slide": slide_id, "level": int(level), "bounds": list(bounds),
                      "shape": [int(labels.shape[0]), int(labels.shape[1])], "time": now(), "author": author,
                      "n_objects": count_objects(labels), "source": source,
                      "model": None if model is None else str(model),
                      "image": f"regions/{rid}/image.png", "mask": f"regions/{rid}/{mask_name}"}
            old = [r for r in self._regions if r["slide"] == slide_id and int(r["level"]) == int(level)
                   and [int(v) for v in r["bounds"]] == list(bounds)]
            if old:
                record["replaces"] = [r["id"] for r in old]
            kept = [r for r in self._regions if not any(r is o for o in old)]
            try:
                if old:
                    rewrite_jsonl(manifest, [*kept, record])
                else:
                    append_jsonl(manifest, record)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
            self._regions[:] = [*kept, record]
            try:
                self._write_back(slide, labels, bounds)
            except Exception as e:  # the region itself is safely stored; the store can be rebuilt
                warnings.warn(f"region {rid} saved, but the label store of {slide_id} could not be updated "
                              f"({type(e).__name__}: {e}); Project.rebuild_labels_store({slide_id!r}) redoes it",
                              GenSelfDiffWarning, stacklevel=2)
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
        image_path = self._inside(rec["image"], f"region {rec['id']} image")
        mask_path = self._inside(rec["mask"], f"region {rec['id']} mask")
        image, labels = read_image(image_path), read_mask(mask_path)
        recorded = rec.get("shape")  # [h, w] as accepted (older manifests may lack it)
        if image.shape[:2] != labels.shape[:2] or (recorded is not None and list(labels.shape[:2]) != recorded):
            said = "" if recorded is None else f" and the manifest says {recorded[0]}x{recorded[1]}"
            raise DataError(f"{mask_path}: region {rec['id']}'s mask is {labels.shape[0]}x{labels.shape[1]} "
                            f"but its image is {image.shape[0]}x{image.shape[1]}{said} (a file was edited or "
                            "replaced); accept the region again")
        return image, labels

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
            target = mask_to_target(labels, spec, self.folder / rec["mask"])
            items.append(LabeledImage(rec["id"], image, target))
        return items

    # -- label stores -------------------------------------------------------------------------

    def _store_path(self, slide_id: str) -> Path:
        """``labels/<slide id>.zarr``, only for a safe slide id and only inside the project."""
        if not is_safe_name(slide_id):
            raise DataError(f"slide id {slide_id!r} is not a safe name; refused")
        return inside(self.folder, f"labels/{slide_id}.zarr", f"{self.folder / PROJECT_FILE}: label store")

    def labels_store(self, slide_id: str):
        """The slide's label store (a zarr v3 int32 array at level-0 shape), or None when nothing
        has been written back to it yet."""
        self.slide(slide_id)
        path = self._store_path(slide_id)
        if not path.exists():
            return None
        import zarr
        return zarr.open_array(str(path), mode="r+")

    def _write_back(self, slide: dict, labels: np.ndarray, bounds: tuple[int, int, int, int]) -> None:
        """Put ``labels`` into the store at ``bounds`` (clipped to the slide), with object ids
        unique in the store (:mod:`.labels`). A missing store, or one written before ids were
        kept unique, is rebuilt from every accepted region instead (this one included)."""
        store = self.labels_store(slide["id"])
        if store is None or not _labels.has_unique_ids(store):
            self.rebuild_labels_store(slide["id"])
            return
        _labels.write_region(store, labels, bounds, instances=self.spec.task != "multiclass")

    def rebuild_labels_store(self, slide_id: str):
        """Recreate a slide's label store from its accepted regions (in order); returns it."""
        slide = self.slide(slide_id)
        instances = self.spec.task != "multiclass"
        with self._lock:
            store = _labels.create_store(self._store_path(slide_id), slide)
            for rec in self.regions(slide_id):
                _labels.write_region(store, self.region_arrays(rec)[1], tuple(rec["bounds"]), instances=instances)
        return store

    def export_geojson(self, slide_id: str, path: str | os.PathLike, **kwargs: Any) -> int:
        """The slide's corrected labels as QuPath GeoJSON (level-0 coordinates); returns the
        number of features. ``kwargs`` go to ``formats.geojson.export_label_array_chunked``."""
        from ..formats.geojson import export_label_array_chunked
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
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise DataError(f"{path}: unreadable ({describe_json_error(e)}); delete it to forget the reviewed "
                            "regions") from None
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise DataError(f"{path}: not a {{slide id: [[y, x, h, w], ...]}} object; delete it to forget "
                            "the reviewed regions")
        return data

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

    # -- suggesting regions and refining (see suggest.py and refine.py) -----------------------

    def suggest_regions(self, predictor: Callable[[np.ndarray], np.ndarray], slide_or_image: Any,
                        **kwargs: Any) -> list[dict]:
        """Rank tissue regions by how unsure the model is about them (most unsure first); the
        blocking form of :meth:`iter_suggest_regions` (same arguments, same result)."""
        return _suggest.suggest_regions(self, predictor, slide_or_image, **kwargs)

    def iter_suggest_regions(self, predictor: Callable[[np.ndarray], np.ndarray], slide_or_image: Any,
                             **kwargs: Any) -> Iterator[Progress]:
        """:func:`.suggest.iter_suggest_regions` on this project: a generator of progress events
        that *returns* the ranked suggestions (``result = yield from ...``)."""
        return _suggest.iter_suggest_regions(self, predictor, slide_or_image, **kwargs)

    def history(self) -> list[dict]:
        """One record per refine (finished, cancelled or failed), oldest first."""
        return check_history(read_jsonl(self.folder / HISTORY), self.folder, self.folder / HISTORY)

    def refine(self, *, base_model: str | os.PathLike | None = None, steps: int = 200, device: str = "auto",
               val_fraction: float | str = 0.25, seed: int = 0, **overrides: Any) -> Iterator[Progress]:
        """:func:`.refine.refine` on this project: fine-tune the current model (or ``base_model``)
        on the accepted regions, as a generator of progress events (close it to cancel)."""
        return _refine.refine(self, base_model=base_model, steps=steps, device=device, val_fraction=val_fraction,
                              seed=seed, **overrides)


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


def _clean_region_temps(regions: Path) -> None:
    """Remove what killed accepts left in ``regions/`` (``.r00007.<random>.tmp`` folders nothing
    has touched for a while: core.atomic.clean_stale_temps, one region id at a time)."""
    try:
        names = {m.group(1) for p in regions.iterdir()
                 if (m := re.fullmatch(r"\.(r\d+)\.[a-z0-9_]{8}\.tmp", p.name)) and REGION_ID.fullmatch(m.group(1))}
    except OSError:
        return
    for rid in names:
        clean_stale_temps(regions, rid)


def _slide_name(path: Path) -> str:
    """A slide id from its file name: without the (OME) extension, made safe."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem or name
    return safe_name(name, fallback="slide")


def _unique(base: str, taken: set[str]) -> str:
    if base not in taken:
        return base
    n = 2
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"
