"""Unlabeled pretraining sources read lazily from slides and pyramids, and the one function that
turns paths (image folders, images, slide files) into sources."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_genselfdiff.core.data import ImageSource, UnlabeledSource, list_images, read_image
from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.slide.reader import open_slide
from napari_genselfdiff.slide.tissue import detect_tissue

SLIDE_EXTS = {".svs", ".ndpi", ".scn", ".zarr", ".btf", ".mrxs", ".vms", ".vmu", ".bif"}


@dataclass
class LazyArraySource(UnlabeledSource):
    """Random crops of a lazy (dask/zarr) RGB array, read only where sampled."""

    array: Any
    name: str = "layer"

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        h, w = self.array.shape[:2]
        y = int(rng.integers(0, max(h - size, 0) + 1))
        x = int(rng.integers(0, max(w - size, 0) + 1))
        crop = np.asarray(self.array[y:y + size, x:x + size, :3])
        if crop.shape[:2] != (size, size):  # a level smaller than the patch
            crop = np.pad(crop, ((0, size - crop.shape[0]), (0, size - crop.shape[1]), (0, 0)), mode="reflect")
        return crop


@dataclass
class SlideSource(UnlabeledSource):
    """Random tissue tiles from a (lazy) slide at full resolution."""

    path: Path
    name: str = "slide"
    _slide: object = field(default=None, repr=False)
    _tissue: np.ndarray | None = field(default=None, repr=False)
    _scale: float = 1.0

    def _open(self):
        if self._slide is None:
            self._slide = open_slide(self.path)
            tissue = detect_tissue(self._slide)
            self._tissue, self._scale = tissue.mask, tissue.downsample
            if not self._tissue.any():
                raise DataError(f"{self.path}: no tissue found to sample unlabeled tiles from")
        return self._slide

    def sample(self, rng, size):
        slide = self._open()
        ys, xs = np.nonzero(self._tissue)
        i = rng.integers(len(ys))
        h, w = slide.shape[:2]
        cy = (ys[i] + rng.random()) * self._scale
        cx = (xs[i] + rng.random()) * self._scale
        y = int(np.clip(cy - size / 2, 0, max(h - size, 0)))
        x = int(np.clip(cx - size / 2, 0, max(w - size, 0)))
        return np.asarray(slide.read_region(0, y, x, size, size))


def unlabeled_sources(paths: Sequence[str | os.PathLike]) -> list[UnlabeledSource]:
    """Folders of images and slide files -> sources. Small images are loaded into memory."""
    sources: list[UnlabeledSource] = []
    for p in map(Path, paths):
        if p.is_dir() and p.suffix.lower() != ".zarr":
            files = list_images(p)
            if not files:
                raise DataError(f"{p}: folder has no images")
            sources += [ImageSource(read_image(f), f.name) for f in files]
        elif p.exists() and (p.suffix.lower() in SLIDE_EXTS or _is_large_tiff(p)):
            sources.append(SlideSource(p, p.name))
        elif p.is_file():
            sources.append(ImageSource(read_image(p), p.name))
        else:
            raise DataError(f"{p}: no such file or folder")
    if not sources:
        raise DataError("no unlabeled images given")
    return sources


def _is_large_tiff(p: Path, limit: int = 8192) -> bool:
    if p.suffix.lower() not in {".tif", ".tiff"}:
        return False
    import tifffile
    try:
        with tifffile.TiffFile(p) as tf:
            shape = tf.series[0].shape
            return len(tf.series[0].levels) > 1 or max(shape[:2]) > limit
    except Exception as e:
        raise DataError(f"{p}: cannot read TIFF ({type(e).__name__}: {e})") from None
