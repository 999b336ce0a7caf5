"""napari reader: slides (SVS, pyramidal/OME-TIFF, OME-Zarr) as lazy multiscale RGB image layers."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".btf", ".scn", ".zarr")


def napari_get_reader(path: str | list[str]) -> Callable[[str], list[tuple]] | None:
    """The slide reader when ``path`` is one slide file or .zarr folder, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    name = str(path).lower().rstrip("/\\")
    return read_slide if name.endswith(SLIDE_SUFFIXES) else None


def read_slide(path: str | list[str]) -> list[tuple]:
    """One image layer: the slide's pyramid (lazy dask arrays), with its mpp in the metadata."""
    from .slide.reader import open_slide

    path = path[0] if isinstance(path, list) else path
    slide = open_slide(path)
    multiscale = len(slide.levels) > 1
    name = Path(str(path).rstrip("/\\")).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    meta = {"path": str(path), "mpp": slide.mpp, "downsamples": list(slide.downsamples), "notes": list(slide.notes)}
    data = slide.levels if multiscale else slide.levels[0]
    return [(data, {"name": name, "rgb": True, "multiscale": multiscale, "metadata": meta}, "image")]
