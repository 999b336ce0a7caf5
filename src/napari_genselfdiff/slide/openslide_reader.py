"""Slides tifffile cannot read, through OpenSlide (``openslide-python`` with ``openslide-bin``, the
wheel that ships the C library): 3DHISTECH MIRAX (.mrxs), Hamamatsu VMS / VMU, Ventana BIF and
Philips TIFF, whose tiles overlap, are spread over several files or are stored sparsely.

:class:`OpenSlideFile` has the reader's interface (``levels`` as lazy (H, W, 3) uint8 dask arrays,
``shapes``, ``downsamples``, ``mpp``, ``read_region(level, y, x, h, w)`` in that level's pixels,
``close`` and the context manager); :func:`~napari_genselfdiff.slide.reader.open_slide` wraps it
in the one :class:`~napari_genselfdiff.slide.reader.Slide` every caller gets, choosing OpenSlide
by itself (:func:`openslide_vendor`). OpenSlide's RGBA is composited on white: the parts a
scanner did not scan (alpha 0) and the parts outside the image are white, as in the tifffile
reader. This module imports nothing from ``reader`` (no import cycle).
"""
from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_genselfdiff.core.errors import DataError

#: Extensions only OpenSlide reads (MIRAX's index file, Hamamatsu VMS / VMU, Ventana BIF).
OPENSLIDE_SUFFIXES = {".mrxs", ".vms", ".vmu", ".bif"}
#: OpenSlide vendors of TIFF-based files that tifffile reads wrongly (Philips' sparse tiles,
#: Ventana's overlapping tiles): these go to OpenSlide even though they are TIFFs.
OPENSLIDE_TIFF_VENDORS = {"philips", "ventana"}
#: Dask chunk of an OpenSlide level, in pixels (a multiple of the usual 240 / 256 / 512 tiles
#: would be no better: OpenSlide stitches tiles whatever the region).
CHUNK = 1024


def _openslide() -> Any:
    try:
        import openslide
    except (ImportError, OSError) as exc:  # the wheel, or the library it ships, is missing
        raise DataError(f"OpenSlide is not available ({type(exc).__name__}: {exc}); install it with "
                        "'pip install openslide-bin openslide-python'") from None
    return openslide


def openslide_vendor(path: str | Path) -> str | None:
    """The OpenSlide vendor of ``path`` ('aperio', 'mirax', 'philips', ...), or None when OpenSlide
    cannot read it (or is not installed). Reads the file's header only."""
    try:
        return _openslide().OpenSlide.detect_format(str(path))
    except Exception:  # not installed, unreadable: OpenSlide cannot read it, which is the answer
        return None


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) uint8 RGBA (OpenSlide's, not premultiplied) -> (h, w, 3) RGB over white, exact
    where alpha is 255."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


class OpenSlideFile:
    """A slide opened with OpenSlide: its native levels, lazily (see the module docstring).

    ``read_region`` takes the level's own pixel coordinates (like the tifffile reader) and turns
    them into OpenSlide's level-0 location by multiplying by the level's downsample (rounded;
    exact for level 0 and for integer downsamples).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        openslide = _openslide()
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except Exception as exc:
            hint = (f"; a MIRAX .mrxs needs its data folder '{self.path.stem}' next to it"
                    if self.path.suffix.lower() == ".mrxs" else "")
            raise DataError(f"{self.path.name}: OpenSlide cannot open it ({type(exc).__name__}: "
                            f"{_one_line(exc)}){hint}") from None
        try:
            self.vendor: str | None = openslide.OpenSlide.detect_format(str(self.path))
            # (H, W) per level: OpenSlide gives (width, height)
            self.shapes = [(int(h), int(w)) for w, h in self._osr.level_dimensions]
            self.downsamples = [float(d) for d in self._osr.level_downsamples]
            self.downsamples[0] = 1.0
            self.mpp = _mpp(self._osr.properties)
            token = uuid.uuid4().hex
            self.levels = [da.from_array(_Level(self, k), chunks=(CHUNK, CHUNK, 3),
                                         name=f"openslide-{self.path.name}-{k}-{token}",
                                         meta=np.empty((0, 0, 3), np.uint8), asarray=False, fancy=False)
                           for k in range(len(self.shapes))]
        except Exception as exc:
            self.close()
            raise DataError(f"{self.path.name}: OpenSlide cannot read its levels ({type(exc).__name__}: "
                            f"{_one_line(exc)})") from None

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) of native ``level`` as (h, w, 3) uint8; white outside."""
        if not 0 <= level < len(self.shapes):
            raise DataError(f"{self.path.name}: level {level} does not exist "
                            f"(OpenSlide sees {len(self.shapes)} levels)")
        if h <= 0 or w <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        if self._osr is None:
            raise DataError(f"{self.path.name}: the slide is already closed")
        ds = self.downsamples[level]
        try:
            image = self._osr.read_region((int(round(x * ds)), int(round(y * ds))), level, (int(w), int(h)))
            return composite_on_white(np.asarray(image))
        except Exception as exc:  # a damaged tile, a missing MIRAX data file
            raise DataError(f"{self.path.name}: OpenSlide cannot read level {level} region "
                            f"y={y}:{y + h} x={x}:{x + w} ({type(exc).__name__}: {_one_line(exc)}); "
                            "the file may be truncated, corrupt or incomplete") from None

    def close(self) -> None:
        """Release the OpenSlide handle; reading afterwards raises DataError."""
        osr, self._osr = getattr(self, "_osr", None), None
        if osr is not None:
            osr.close()

    def __enter__(self) -> OpenSlideFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Level:
    """One native level as an array-like for ``dask.array.from_array`` (plain slices only)."""

    def __init__(self, slide: OpenSlideFile, level: int) -> None:
        self.slide, self.level = slide, level
        self.shape = (*slide.shapes[level], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        (y0, y1, ys), (x0, x1, xs) = (k.indices(n) for k, n in zip(key[:2], self.shape[:2]))
        out = self.slide.read_region(self.level, y0, x0, max(y1 - y0, 0), max(x1 - x0, 0))
        return out[::ys, ::xs][:, :, key[2]]


def _mpp(props: Any) -> float | None:
    """Microns per pixel at level 0 from OpenSlide's standard properties (x, else y)."""
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            value = float(props.get(key, "nan"))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value) and value > 0:
            return value
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
