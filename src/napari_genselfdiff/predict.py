"""``genselfdiff predict`` and ``genselfdiff export``: whole-slide prediction into a zarr store,
and exports of its instance labels (QuPath GeoJSON, OME-Zarr labels, label TIFF)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import DataError

CLASS_NAMES = {"glands": "Gland", "nuclei": "Nucleus"}
COLOURS = {"glands": (0, 200, 0), "nuclei": (30, 90, 255)}
OBJECT_TYPES = {"glands": "annotation", "nuclei": "detection"}


def _drive(events, desc: str):
    from tqdm import tqdm

    bar, last, phase = None, None, None
    try:
        for ev in events:
            last = ev
            if ev.phase != phase:
                phase = ev.phase
                if bar is not None:
                    bar.close()
                bar = tqdm(total=ev.total, desc=f"{desc} {ev.phase}", unit="tile" if ev.phase == "predict" else "block",
                           dynamic_ncols=True, disable=None)
            bar.update(ev.done - bar.n)
            bar.set_postfix({"MP/s": f"{ev.megapixels_per_s:.2f}", "skipped": ev.tiles_skipped}, refresh=False)
    finally:
        if bar is not None:
            bar.close()
        events.close()
    return last


def open_prediction(path: str | Path) -> Any:
    """The zarr group of a finished (or partial) prediction, with a clear error otherwise."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such prediction store")
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as e:
        raise DataError(f"{path}: not a zarr store ({type(e).__name__}: {e})") from None
    if "genselfdiff" not in group.attrs:
        raise DataError(f"{path}: not a genselfdiff prediction store")
    return group


def label_names(group: Any) -> list[str]:
    return sorted(group["labels"].group_keys()) if "labels" in group else []


def export_store(group: Any, *, name: str | None = None, geojson: str | None = None, tiff: str | None = None,
                 ome_zarr: str | None = None, object_type: str | None = None) -> dict:
    """Write the chosen exports of a prediction store's instance labels; returns what was written."""
    names = label_names(group)
    if not names:
        raise DataError("the prediction store has no instance labels (predict with a glands/nuclei model)")
    name = name or names[0]
    if name not in names:
        raise DataError(f"no label set {name!r} in the store (has: {', '.join(names)})")
    meta = dict(group.attrs["genselfdiff"])
    labels = group["labels"][name]["0"]
    downsample = float(meta.get("downsample", 1.0))
    written: dict[str, Any] = {}
    if geojson:
        from .export.geojson import export_label_array_chunked

        probs = group["probabilities"]
        fg = _ForegroundProbability(probs)
        written["geojson"] = export_label_array_chunked(
            labels, geojson, chunk=4096, probabilities=fg, downsample=downsample,
            object_type=object_type or OBJECT_TYPES.get(name, "annotation"),
            class_name=CLASS_NAMES.get(name, name), color=COLOURS.get(name, (255, 255, 0)))
    if tiff:
        from .export.tiff import write_label_tiff

        write_label_tiff(tiff, labels, mpp=meta.get("mpp"))
        written["tiff"] = tiff
    if ome_zarr:
        from .export.ome_zarr import write_ome_zarr_labels

        write_ome_zarr_labels(ome_zarr, labels, name=name, scale=(downsample, downsample))
        written["ome_zarr"] = ome_zarr
    return written


class _ForegroundProbability:
    """Lazy 1 - p(background) view of a (C, H, W) uint8 probability array, sliced on demand."""

    def __init__(self, probs: Any):
        self.probs = probs
        self.shape = tuple(probs.shape[1:])
        self.ndim = 2
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key):
        bg = np.asarray(self.probs[(0,) + tuple(key if isinstance(key, tuple) else (key,))], dtype=np.float32)
        return 1.0 - bg / 255.0

    def __array__(self, dtype=None, copy=None):
        return self[(slice(None), slice(None))].astype(dtype or np.float32)


def predict_cli(a: argparse.Namespace) -> int:
    from .core.inference import TorchPredictor
    from .models import resolve_model
    from .slide.tiler import predict_slide

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
        _drive(events, Path(inp).name)
        print(f"{inp} -> {target}")
        if a.geojson or a.overlay:
            group = open_prediction(target)
            if a.geojson:
                gj = Path(a.geojson)
                gj = gj.with_name(f"{Path(inp).stem}_{gj.name}") if many else gj
                n = export_store(group, geojson=str(gj), object_type=a.object_type)["geojson"]
                print(f"  {n} objects -> {gj}")
            if a.overlay:
                write_overlay(inp, group, Path(a.overlay))
                print(f"  overlay -> {a.overlay}")
    return 0


def labels_at_level0(group: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    """A store's instance labels brought to level-0 pixels (nearest neighbour), for small images."""
    lab = np.asarray(group["labels"][name]["0"])
    f = float(group.attrs["genselfdiff"].get("downsample", 1.0))
    if f == 1.0 and lab.shape == tuple(shape):
        return lab
    rows = np.minimum((np.arange(shape[0]) / f).astype(int), lab.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) / f).astype(int), lab.shape[1] - 1)
    return lab[rows[:, None], cols[None, :]]


def write_overlay(image_path: str | Path, group: Any, path: Path, max_pixels: int = 64_000_000) -> None:
    """Object outlines over the full-resolution image, for images small enough to hold in memory."""
    from .core.atomic import write_png_atomic
    from .demo import overlay
    from .slide.reader import open_slide

    with open_slide(image_path) as slide:
        img = slide.levels[0]
        if img.shape[0] * img.shape[1] > max_pixels:
            raise DataError(f"{image_path}: too large for an overlay PNG; view it in napari instead")
        image = np.asarray(img)
    labels = {n: labels_at_level0(group, n, image.shape[:2]) for n in label_names(group)}
    write_png_atomic(path, overlay(image, labels))


def export_cli(a: argparse.Namespace) -> int:
    if not (a.geojson or a.tiff or a.ome_zarr):
        print("genselfdiff export: nothing to do: give --geojson, --tiff and/or --ome-zarr", file=sys.stderr)
        return 2
    written = export_store(open_prediction(a.labels), name=a.name, geojson=a.geojson, tiff=a.tiff,
                           ome_zarr=a.ome_zarr, object_type=a.object_type)
    for kind, what in written.items():
        print(f"{kind}: {what}" if kind != "geojson" else f"geojson: {what} objects -> {a.geojson}")
    return 0
