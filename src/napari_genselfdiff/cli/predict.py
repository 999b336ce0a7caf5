"""``genselfdiff predict`` and ``genselfdiff export``: whole-slide prediction into a zarr store,
and exports of its instance labels (QuPath GeoJSON, OME-Zarr labels, label TIFF). The store is
read through :class:`~..slide.store.PredictionStore`; QuPath class names, object types and
colours come from :mod:`..formats.qupath`."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import DataError
from ..formats import qupath
from ..slide.store import PredictionStore
from .console import progress_bar

#: One bar per stage of a slide prediction, counted in these units.
PREDICT_UNITS = {"predict": "tile", "postprocess": "block"}


@dataclass(frozen=True)
class Exported:
    """What :func:`export_store` wrote: the label set, and per format its path (None: not asked
    for); ``objects`` is the number of GeoJSON features (None without GeoJSON)."""

    name: str
    geojson: str | None = None
    objects: int | None = None
    tiff: str | None = None
    ome_zarr: str | None = None


def export_store(store: PredictionStore, *, name: str | None = None, geojson: str | None = None,
                 tiff: str | None = None, ome_zarr: str | None = None,
                 object_type: str | None = None) -> Exported:
    """Write the chosen exports of a prediction store's instance labels; returns what was written."""
    names = store.label_names()
    if not names:
        raise DataError("the prediction store has no instance labels (predict with a glands/nuclei model)")
    name = name or names[0]
    if name not in names:
        raise DataError(f"no label set {name!r} in the store (has: {', '.join(names)})")
    labels = store.labels(name)
    downsample = store.downsample
    objects = None
    if geojson:
        from ..formats.geojson import export_label_array_chunked

        objects = export_label_array_chunked(
            labels, geojson, chunk=4096, probabilities=store.foreground(), downsample=downsample,
            object_type=object_type or qupath.object_type(name), class_name=qupath.class_name(name),
            color=qupath.colour(name))
    if tiff:
        from ..formats.tiff import write_label_tiff

        write_label_tiff(tiff, labels, mpp=store.mpp)
    if ome_zarr:
        from ..formats.ome_zarr import write_ome_zarr_labels

        write_ome_zarr_labels(ome_zarr, labels, name=name, scale=(downsample, downsample))
    return Exported(name, geojson or None, objects, tiff or None, ome_zarr or None)


def predict_cli(a: argparse.Namespace) -> int:
    from ..bundled import resolve_model
    from ..core.inference import TorchPredictor
    from ..slide.tiler import predict_slide

    predictor = TorchPredictor.from_checkpoint(resolve_model(a.model), device=a.device, batch_size=a.batch)
    task = predictor.task
    post = task if task in ("glands", "nuclei") else None
    out = Path(a.out)
    many = len(a.input) > 1
    level = a.level if a.level == "auto" else int(a.level)
    for inp in a.input:
        target = out / f"{Path(inp).stem}.zarr" if many else out
        events = predict_slide(predictor, inp, target, level=level, tile=a.tile, overlap=a.overlap, batch=a.batch,
                               tissue=not a.no_tissue, class_names=predictor.class_names, postprocess=post,
                               metadata={"model": str(a.model), "task": task})
        progress_bar(events, Path(inp).name, units=PREDICT_UNITS)
        print(f"{inp} -> {target}")
        if a.geojson or a.overlay:
            store = PredictionStore.open(target)
            if a.geojson:
                gj = Path(a.geojson)
                gj = gj.with_name(f"{Path(inp).stem}_{gj.name}") if many else gj
                n = export_store(store, geojson=str(gj), object_type=a.object_type).objects
                print(f"  {n} objects -> {gj}")
            if a.overlay:
                write_overlay(inp, store, Path(a.overlay))
                print(f"  overlay -> {a.overlay}")
    return 0


def write_overlay(image_path: str | Path, store: PredictionStore, path: Path, max_pixels: int = 64_000_000) -> None:
    """Object outlines over the full-resolution image, for images small enough to hold in memory."""
    from ..core.atomic import write_png_atomic
    from ..formats.overlay import overlay
    from ..slide.reader import open_slide

    with open_slide(image_path) as slide:
        img = slide.levels[0]
        if img.shape[0] * img.shape[1] > max_pixels:
            raise DataError(f"{image_path}: too large for an overlay PNG; view it in napari instead")
        image = np.asarray(img)
    labels = {n: store.labels_at_level0(n, image.shape[:2]) for n in store.label_names()}
    write_png_atomic(path, overlay(image, labels))


def export_cli(a: argparse.Namespace) -> int:
    if not (a.geojson or a.tiff or a.ome_zarr):
        print("genselfdiff export: nothing to do: give --geojson, --tiff and/or --ome-zarr", file=sys.stderr)
        return 2
    written = export_store(PredictionStore.open(a.labels), name=a.name, geojson=a.geojson, tiff=a.tiff,
                           ome_zarr=a.ome_zarr, object_type=a.object_type)
    if written.geojson:
        print(f"geojson: {written.objects} objects -> {written.geojson}")
    if written.tiff:
        print(f"tiff: {written.tiff}")
    if written.ome_zarr:
        print(f"ome_zarr: {written.ome_zarr}")
    return 0
