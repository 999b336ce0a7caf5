"""Lazy whole-slide reading: every slide becomes a multiscale pyramid of dask arrays.

A pathologist's slide is 50k x 50k pixels or more, so nothing here ever loads a slide whole:
pyramidal / tiled TIFF, BigTIFF, OME-TIFF, Aperio SVS, Hamamatsu NDPI and Leica SCN files are read
tile by tile through tifffile's zarr store (``TiffPageSeries.aszarr``), OME-Zarr through zarr
itself, and what tifffile cannot read (MIRAX .mrxs, Hamamatsu VMS / VMU, Ventana BIF, Philips
TIFF, or a TIFF tifffile fails on that OpenSlide can read) through OpenSlide
(:mod:`~napari_genselfdiff.slide.openslide_reader`); :func:`open_slide` chooses by itself. Only
small plain images (PNG, JPEG) are decoded in one piece, then wrapped in dask.

Every level is normalised lazily to (H, W, 3) uint8 RGB: singleton axes are squeezed, grayscale
is repeated to three channels, alpha is composited on white and 16-bit images are rescaled (as
``core.data.to_rgb_uint8`` does for training and evaluation, so every command accepts the same
images). Whatever
cannot be converted safely raises :class:`~napari_genselfdiff.core.errors.DataError` naming the
file and the problem. A file with a single level gets lower levels built lazily by 2x2 mean
coarsening, so a viewer always gets a pyramid.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import dask.array as da
import numpy as np

from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.core.imagefile import decode_large, undecodable
from napari_genselfdiff.slide.levels import level_for_mpp, region_at_mpp

#: Lower levels are built by coarsening until the short side would drop below this many pixels.
MIN_LEVEL_SIZE = 256
#: Chunk size (pixels) used to wrap in-memory images in dask.
_MEMORY_CHUNK = 1024

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF8")
# micrometres per unit, for OME length units and TIFF resolution units
_UM_PER_UNIT = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "micrometer": 1.0,
                "micron": 1.0, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
                "m": 1e6, "meter": 1e6, "nanometer": 1e-3}


@dataclass
class Slide:
    """A lazily read slide: a pyramid of (H, W, 3) uint8 dask arrays, finest level first.

    ``downsamples[i]`` is how many level-0 pixels one level-``i`` pixel spans (level 0 = 1.0);
    ``mpp`` is microns per pixel at level 0 or ``None`` when the file does not say.
    ``notes`` records conversions applied on reading (e.g. "grayscale repeated to RGB");
    ``backend`` says what read the file ("tifffile", "openslide", "zarr" or "image").
    Close it (or use it as a context manager) to release the file handles.
    """

    path: Path
    levels: list[da.Array]
    downsamples: list[float]
    mpp: float | None = None
    notes: list[str] = field(default_factory=list)
    backend: str = "tifffile"
    _closers: list[Callable[[], Any]] = field(default_factory=list, repr=False)
    #: reads (level, y, x, h, w) of the first ``_region_levels`` levels directly (OpenSlide),
    #: instead of through the dask arrays
    _region: Callable[[int, int, int, int, int], np.ndarray] | None = field(default=None, repr=False)
    _region_levels: int = field(default=0, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape (H, W, 3) of level 0."""
        return tuple(int(s) for s in self.levels[0].shape)  # type: ignore[return-value]

    def level_mpp(self, level: int) -> float | None:
        """Microns per pixel at ``level`` (``None`` when the slide's mpp is unknown)."""
        return None if self.mpp is None else self.mpp * self.downsamples[level]

    def level_for_mpp(self, target_mpp: float | None) -> int:
        """The level whose mpp is closest to ``target_mpp`` (on a log scale, so 0.5 is as far
        from 1.0 as 2.0 is); 0 when either mpp is unknown. Ties go to the finer level."""
        return level_for_mpp(self.downsamples, self.mpp, target_mpp)

    def region_at_mpp(self, region: tuple[int, int, int, int, int],
                      target_mpp: float | None) -> tuple[int, int, int, int, int]:
        """The view ``region`` = (level, y, x, h, w) in pixels of the level closest to
        ``target_mpp`` (:func:`~napari_genselfdiff.slide.levels.region_at_mpp`)."""
        return region_at_mpp(region, self.downsamples, [lv.shape for lv in self.levels], self.mpp, target_mpp)

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) of ``level`` as an (h, w, 3) uint8 array.

        Parts outside the image are white (255), so tiles at the border have full size.
        """
        if not 0 <= level < len(self.levels):
            raise DataError(f"{self.path.name}: level {level} does not exist "
                            f"(the slide has {len(self.levels)} levels)")
        if self._region is not None and level < self._region_levels:
            return self._region(level, y, x, h, w)
        arr = self.levels[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, arr.shape[0]), min(x + w, arr.shape[1])
        if y1 > y0 and x1 > x0:
            try:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = arr[y0:y1, x0:x1].compute()
            except DataError:
                raise
            except Exception as exc:  # codec errors, truncated data, closed file handles
                raise DataError(f"{self.path.name}: cannot read level {level} region "
                                f"y={y0}:{y1} x={x0}:{x1} ({type(exc).__name__}: {exc}); the "
                                "file may be truncated, corrupt or already closed") from exc
        return out

    def close(self) -> None:
        """Release the file handles; reading afterwards raises DataError."""
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_slide(path: str | Path) -> Slide:
    """Open a slide or image lazily as a :class:`Slide`.

    Supported: pyramidal / tiled TIFF, BigTIFF, OME-TIFF, Aperio SVS, NDPI, SCN (only the main
    pyramid series; thumbnail, label and macro pages are ignored), OME-Zarr folders
    (multiscales metadata) and plain PNG / JPEG / BMP / TIFF images, read with tifffile / zarr;
    MIRAX (.mrxs), VMS, VMU, BIF and Philips TIFF read with OpenSlide, which is also tried when
    tifffile cannot read a file OpenSlide recognises. The reader is chosen from the file's content
    (and, for OpenSlide's own formats, its extension). Raises DataError for missing, corrupt or
    unsupported input.
    """
    from napari_genselfdiff.slide.openslide_reader import (OPENSLIDE_SUFFIXES, OPENSLIDE_TIFF_VENDORS,
                                                           openslide_vendor)

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        if not any((path / m).is_file() for m in ("zarr.json", ".zgroup", ".zattrs")):
            raise DataError(f"{path}: is a folder, not an image or slide (nor an OME-Zarr store): give an image "
                            "or slide file")
        return _open_ome_zarr(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc})") from exc
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        return _open_openslide(path)
    if magic.startswith(_TIFF_MAGIC):
        vendor = openslide_vendor(path)
        if vendor in OPENSLIDE_TIFF_VENDORS:
            return _open_openslide(path)
        try:
            return _open_tiff(path)
        except DataError as exc:
            if vendor is None:
                raise
            try:
                return _open_openslide(path)
            except DataError as other:
                raise DataError(f"{exc}; OpenSlide cannot read it either ({other})") from None
    if magic.startswith(_IMAGE_MAGIC):
        return _open_plain_image(path)
    if openslide_vendor(path) is not None:
        return _open_openslide(path)
    raise DataError(f"{path.name}: not a supported slide or image format (expected TIFF/SVS/NDPI/OME-TIFF, "
                    f"MRXS/VMS/VMU/BIF, OME-Zarr, PNG or JPEG; file starts with {magic!r})")


# --------------------------------------------------------------------------------------------
# format readers


def _open_tiff(path: Path) -> Slide:
    """TIFF family: tifffile's first series with all its pyramid levels, read through zarr."""
    import tifffile
    import zarr

    try:
        with _quiet_tifffile():
            tif = tifffile.TiffFile(path)
            series_list = tif.series
    except Exception as exc:
        raise DataError(f"{path.name}: not a readable TIFF, truncated or damaged "
                        f"({type(exc).__name__}: {exc})") from exc
    try:
        if not series_list:  # the header is there but no image is: the file was cut short or damaged
            raise DataError(f"{path.name}: no readable image in the TIFF; the file is truncated or damaged")
        series = series_list[0]
        store = series.aszarr()
        root = zarr.open(store, mode="r")
        if isinstance(root, zarr.Group):
            raw = [root[str(i)] for i in range(len(series.levels))]
        else:
            raw = [root]
        axes = series.axes
        notes: list[str] = []
        levels = [_normalise(da.from_zarr(a), axes, path.name, notes) for a in raw]
        mpp = _tiff_mpp(tif)
        slide = _finish(path, levels, mpp, notes)
        slide._closers.append(tif.close)
        return slide
    except DataError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise DataError(f"{path.name}: cannot read the TIFF ({type(exc).__name__}: {exc})") from exc


def _open_openslide(path: Path) -> Slide:
    """OpenSlide's formats: its native levels (read region by region), coarsened below a single one."""
    from napari_genselfdiff.slide.openslide_reader import OpenSlideFile

    osf = OpenSlideFile(path)
    try:
        slide = _finish(path, list(osf.levels), osf.mpp, [f"read with OpenSlide ({osf.vendor} format)"],
                        osf.downsamples)
    except BaseException:
        osf.close()
        raise
    slide.backend, slide._region, slide._region_levels = "openslide", osf.read_region, len(osf.levels)
    slide._closers.append(osf.close)
    return slide


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's logged complaints while parsing: a damaged file becomes one
    DataError instead of several log lines."""
    logger = logging.getLogger("tifffile")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def _open_plain_image(path: Path) -> Slide:
    """Small PNG / JPEG / BMP images: decoded in one piece, then wrapped in dask."""
    try:
        img = decode_large(path)
    except (MemoryError, DataError):
        raise
    except Exception:  # the decoders' own messages can span lines (imageio's plugin hints)
        with open(path, "rb") as fh:
            head = fh.read(8)
        raise DataError(f"{path.name}: {undecodable(path, head)}") from None
    axes = {2: "YX", 3: "YXS"}.get(img.ndim)
    if axes is None:
        raise DataError(f"{path.name}: unsupported image shape {img.shape}")
    notes: list[str] = []
    level0 = _normalise(da.from_array(img, chunks=_MEMORY_CHUNK), axes, path.name, notes)
    slide = _finish(path, [level0], None, notes)
    slide.backend = "image"
    return slide


def _open_ome_zarr(path: Path) -> Slide:
    """OME-Zarr (NGFF 0.1-0.5): the first multiscale image of the group at ``path``."""
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:
        raise DataError(f"{path.name}: not a readable zarr group ({type(exc).__name__}: {exc})") from exc
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise DataError(f"{path.name}: zarr group without OME-Zarr 'multiscales' metadata")
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        raise DataError(f"{path.name}: OME-Zarr multiscales lists no datasets")
    try:
        arrays = [group[d["path"]] for d in datasets]
    except Exception as exc:
        raise DataError(f"{path.name}: OME-Zarr dataset missing ({type(exc).__name__}: {exc})") from exc
    ndim = arrays[0].ndim
    axes_meta = ms.get("axes") or ["t", "c", "z", "y", "x"][-ndim:]
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
    if len(names) != ndim:
        raise DataError(f"{path.name}: OME-Zarr axes {names} do not match array shape {arrays[0].shape}")
    axes = "".join(n[0].upper() for n in names)
    notes: list[str] = []
    levels = [_normalise(da.from_zarr(a), axes, path.name, notes) for a in arrays]
    slide = _finish(path, levels, _ome_zarr_mpp(axes_meta, datasets[0]), notes)
    slide.backend = "zarr"
    return slide


# --------------------------------------------------------------------------------------------
# normalisation to (H, W, 3) uint8


def _normalise(arr: da.Array, axes: str, name: str, notes: list[str]) -> da.Array:
    """Squeeze singleton axes, move channels last and convert to 3-channel uint8, lazily.

    ``axes`` uses tifffile's letters (Y, X, S = samples, C = channel, Z, T, I, ...).
    ``notes`` collects a sentence for every conversion (once per kind, not per level).
    """
    if "Y" not in axes or "X" not in axes or len(axes) != arr.ndim:
        raise DataError(f"{name}: unsupported dimension order {axes!r} for shape {arr.shape} "
                        "(need Y and X axes)")
    extra = [i for i, a in enumerate(axes) if a not in "YX" and arr.shape[i] != 1]
    chan = [i for i in extra if axes[i] in "SC"]
    others = [i for i in extra if axes[i] not in "SC"]
    if others or len(chan) > 1:
        raise DataError(f"{name}: image of shape {tuple(arr.shape)} with axes {axes!r} is a "
                        "stack, not one RGB image (non-singleton extra dimensions)")
    order = [axes.index("Y"), axes.index("X")] + chan
    squeeze = [i for i in range(arr.ndim) if i not in order]
    arr = arr.squeeze(axis=tuple(squeeze)) if squeeze else arr
    kept = [i for i in range(len(axes)) if i not in squeeze]
    arr = arr.transpose([kept.index(i) for i in order])
    if arr.ndim == 2:
        arr = arr[:, :, None]
    nchan = arr.shape[2]
    if nchan > 4:
        raise DataError(f"{name}: {nchan} channels (shape {tuple(arr.shape)}, axes {axes!r}); "
                        "expected grayscale, RGB or RGBA")
    arr = _to_uint8(arr, name, notes)
    if nchan in (2, 4):
        arr = _composite_on_white(arr)
        _note(notes, "alpha channel composited on white")
    if nchan in (1, 2):
        arr = da.concatenate([arr[:, :, :1]] * 3, axis=2)
        _note(notes, "grayscale repeated to RGB")
    return arr[:, :, :3]


def _to_uint8(arr: da.Array, name: str, notes: list[str]) -> da.Array:
    """uint8 passes; 16-bit (grayscale or colour) is rescaled by 255/65535; else DataError."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        _note(notes, "16-bit pixels rescaled to 8 bits (x * 255 / 65535)")
        return da.map_blocks(_scale16, arr, dtype=np.uint8)
    raise DataError(f"{name}: pixel type {arr.dtype} with {arr.shape[2]} channel(s) is not "
                    "supported (need 8-bit or 16-bit, which is rescaled)")


def _scale16(block: np.ndarray) -> np.ndarray:
    return np.rint(block.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)


def _composite_on_white(arr: da.Array) -> da.Array:
    """(..., colour + alpha) uint8 -> colour composited over white, uint8."""
    return da.map_blocks(_composite_block, arr, dtype=np.uint8,
                         chunks=arr.chunks[:2] + ((arr.shape[2] - 1,),))


def _composite_block(block: np.ndarray) -> np.ndarray:
    alpha = block[:, :, -1:].astype(np.float32) / 255.0
    colour = block[:, :, :-1].astype(np.float32)
    return np.rint(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


# --------------------------------------------------------------------------------------------
# pyramid and validation


def _finish(path: Path, levels: list[da.Array], mpp: float | None, notes: list[str],
            downsamples: list[float] | None = None) -> Slide:
    """Validate the data can be decoded, add coarsened levels where needed, build the Slide
    (``downsamples`` of several levels: the file's own, else from the level shapes)."""
    _probe(path, levels[0])
    h0, w0 = levels[0].shape[:2]
    if len(levels) == 1:
        levels = levels + coarsened_levels(levels[0])
        downsamples = [float(2 ** i) for i in range(len(levels))]
        if len(levels) > 1:
            _note(notes, f"single-level image: {len(levels) - 1} lower levels built by 2x2 averaging")
    elif downsamples is None:
        downsamples = [1.0] + [(h0 / lv.shape[0] + w0 / lv.shape[1]) / 2.0 for lv in levels[1:]]
    return Slide(path=path, levels=levels, downsamples=downsamples, mpp=mpp, notes=notes)


def _probe(path: Path, level0: da.Array) -> None:
    """Decode the first and the last chunk: truncated files lose their tail, bad codecs fail."""
    h, w = level0.shape[:2]
    ch, cw = level0.chunks[0][-1], level0.chunks[1][-1]
    try:
        level0[:1, :1].compute()
        level0[h - ch:, w - cw:].compute()
    except Exception as exc:
        raise DataError(f"{path.name}: cannot decode the image data; the file is truncated or damaged "
                        f"({type(exc).__name__}: {exc})") from exc


def coarsened_levels(level0: da.Array, min_size: int = MIN_LEVEL_SIZE) -> list[da.Array]:
    """Lazy 2x2-mean pyramid below ``level0`` until the short side would fall under ``min_size``.

    Level ``k`` pixel (i, j) is the rounded mean of level-0 pixels [i*2^k, (i+1)*2^k) x ...
    (odd edges are trimmed), so its downsample is exactly 2^k. Chunks are merged back to
    ``_MEMORY_CHUNK`` so that coarse levels do not end up with thousands of tiny chunks.
    """
    out: list[da.Array] = []
    cur = level0
    while min(cur.shape[0], cur.shape[1]) // 2 >= min_size:
        cur = da.coarsen(np.mean, cur.astype(np.float32), {0: 2, 1: 2}, trim_excess=True)
        cur = da.map_blocks(_round_uint8, cur, dtype=np.uint8)
        if max(cur.chunksize[:2]) < _MEMORY_CHUNK // 2:
            cur = cur.rechunk((_MEMORY_CHUNK, _MEMORY_CHUNK, 3))
        out.append(cur)
    return out


def _round_uint8(block: np.ndarray) -> np.ndarray:
    return np.rint(block).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# physical pixel size


def _tiff_mpp(tif: Any) -> float | None:
    """Microns per pixel from Aperio's description, OME-XML or the resolution tags."""
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    desc = page.description or ""
    if tif.is_svs or desc.startswith("Aperio"):
        match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
        if match:
            return _positive(float(match.group(1)))
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_xml_mpp(tif.ome_metadata)
        if mpp is not None:
            return mpp
    return _resolution_mpp(page)


def _ome_xml_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for elem in root.iter():
        if elem.tag.endswith("Pixels") and "PhysicalSizeX" in elem.attrib:
            unit = elem.attrib.get("PhysicalSizeXUnit", "µm")
            factor = _UM_PER_UNIT.get(unit)
            if factor is None:
                return None
            return _positive(float(elem.attrib["PhysicalSizeX"]) * factor)
    return None


def _resolution_mpp(page: Any) -> float | None:
    """XResolution (pixels per unit) with ResolutionUnit centimetre (3), or tifffile's
    non-standard millimetre (4) / micrometre (5). Inch-based values are only trusted when they
    give a microscopic pixel size (< 10 µm), since plain images carry 72/96/300 dpi defaults."""
    xres = page.tags.get("XResolution")
    unit = page.tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None
    num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
    if not num or not den:
        return None
    per_unit = num / den
    um_per_unit = {3: 1e4, 4: 1e3, 5: 1.0, 2: 25400.0}.get(int(unit.value))
    if um_per_unit is None:
        return None
    mpp = um_per_unit / per_unit
    if int(unit.value) == 2 and mpp >= 10.0:
        return None
    return _positive(mpp)


def _ome_zarr_mpp(axes_meta: list[Any], dataset: dict[str, Any]) -> float | None:
    """Level-0 x pixel size from the dataset's scale transform, if the x axis has a length unit."""
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
    if "x" not in names:
        return None
    ix = names.index("x")
    unit = axes_meta[ix].get("unit") if isinstance(axes_meta[ix], dict) else None
    factor = _UM_PER_UNIT.get(unit or "")
    for tr in dataset.get("coordinateTransformations", []):
        if tr.get("type") == "scale" and factor is not None:
            return _positive(float(tr["scale"][ix]) * factor)
    return None


def _positive(value: float) -> float | None:
    return value if math.isfinite(value) and value > 0 else None


def file_mpp(path: str | Path) -> float | None:
    """Microns per pixel an image or slide file states, or None: TIFF (Aperio MPP, OME-XML,
    resolution tags), OME-Zarr scales, OpenSlide's formats (its mpp properties), and PNG pHYs /
    JPEG density when they give a microscopic pixel size (plain images carry 72/96/300 dpi
    defaults, which mean nothing here)."""
    from napari_genselfdiff.slide.openslide_reader import OPENSLIDE_SUFFIXES, OpenSlideFile

    path = Path(path)
    if path.suffix.lower() in OPENSLIDE_SUFFIXES and path.is_file():
        try:
            with OpenSlideFile(path) as osf:  # the properties only: no pixels decoded
                return osf.mpp
        except DataError:
            return None
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except OSError:
        magic = b""
    if path.is_dir():
        try:
            with open_slide(path) as slide:
                return slide.mpp
        except DataError:
            return None
    if magic.startswith(_TIFF_MAGIC):  # the tags only: no pixels decoded
        import tifffile
        try:
            with tifffile.TiffFile(path) as tif:
                return _tiff_mpp(tif)
        except Exception:  # a TIFF tifffile cannot parse states no pixel size we can trust
            return None
    try:
        from PIL import Image
        with Image.open(path) as im:
            dpi = im.info.get("dpi")
    except Exception:  # not an image PIL knows: no pixel size to read
        return None
    if not dpi or not dpi[0]:
        return None
    mpp = 25400.0 / float(dpi[0])
    return _positive(mpp) if mpp < 10.0 else None
