"""TIFF writing: the one atomic TIFF writer, and tiled pyramidal label export (QuPath, Fiji,
OpenSlide-style viewers).

:func:`write_tiff` writes one in-memory image (a project's mask or image, RGB or labels);
:func:`write_label_tiff` streams a label image of any size as a pyramid. Both go through
:func:`atomic_tiff`, so a failed write never leaves a truncated file.

The full-resolution labels are the first IFD; sub-resolution levels (nearest-neighbour
striding by 2, so ids are never blended) are written as SubIFDs of it with NewSubfileType
"reduced image", the layout tifffile, QuPath and Bio-Formats read as a pyramid. The file is
BigTIFF when the uncompressed pixels would come near the 4 GiB classic-TIFF limit. Tiles are
produced one at a time from the source, which may be lazy (zarr / dask), so memory stays at a
tile. ``mpp`` (micrometres per pixel) becomes X/YResolution in pixels per centimetre.
Writes are atomic (temporary file next to the target, flushed to disk, then ``os.replace``).
Every TIFF written here carries the Software tag ``napari-genselfdiff`` (:data:`SOFTWARE`): that
is how :func:`is_our_tiff` recognises a file of ours, the only kind a label export with
``force`` replaces (:func:`~..core.atomic.check_target`); anything else there is refused.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ..core.atomic import atomic_file, check_target
from ..core.errors import DataError

# Above this many uncompressed bytes (all levels) write BigTIFF; classic TIFF offsets stop at
# 4 GiB and compressed size cannot be known in advance, so keep a wide margin.
_BIGTIFF_BYTES = 2 ** 31
#: The Software tag of every TIFF written here (and the start of a label export's description).
SOFTWARE = "napari-genselfdiff"


def is_our_tiff(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a plain TIFF file this package wrote (Software tag, or the image
    description label exports had before the tag)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return page.software == SOFTWARE or (page.description or "").startswith(SOFTWARE)
    except Exception:  # anything unreadable is not ours
        return False


@contextlib.contextmanager
def atomic_tiff(path: str | os.PathLike, *, bigtiff: bool = False) -> Iterator[tifffile.TiffWriter]:
    """A ``tifffile.TiffWriter`` on a temporary file next to ``path`` (whose folder must exist),
    moved onto ``path`` only when the block ends without an exception (flushed to disk first)."""
    with atomic_file(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            with tifffile.TiffWriter(f, bigtiff=bigtiff) as tif:
                yield _Marked(tif)
            f.flush()
            os.fsync(f.fileno())


class _Marked:
    """A TiffWriter whose ``write`` adds our Software tag to every image."""

    def __init__(self, tif: tifffile.TiffWriter):
        self._tif = tif

    def write(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("software", SOFTWARE)
        return self._tif.write(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tif, name)


def _resolution(mpp: float | None, level: int = 0) -> dict[str, Any]:
    """tifffile's X/YResolution options for a pixel size of ``mpp * 2**level`` micrometres."""
    if mpp is None or not mpp:
        return {}
    per_cm = 1e4 / (mpp * 2 ** level)
    return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}


def write_tiff(path: str | os.PathLike, image: np.ndarray, *, photometric: str | None = None,
               tile: Sequence[int] | None = None, compression: str | None = "zlib",
               mpp: float | None = None) -> Path:
    """One in-memory image (a 2-D mask or label image, an (H, W, 3) RGB image) as a TIFF at
    ``path``, atomically; parent folders are created. ``photometric`` None lets tifffile choose
    (minisblack for 2-D); ``tile`` (multiples of 16) writes it tiled; ``mpp`` is recorded as the
    resolution. Returns ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    image = np.asarray(image)
    options: dict[str, Any] = {"compression": compression, **_resolution(mpp)}
    if photometric is not None:
        options["photometric"] = photometric
    if tile is not None:
        options["tile"] = (int(tile[0]), int(tile[1]))
    bigtiff = image.nbytes > _BIGTIFF_BYTES
    with atomic_tiff(target, bigtiff=bigtiff) as tif:
        tif.write(image, **options)
    return target


def _pyramid_shapes(shape: tuple[int, int], tile: tuple[int, int],
                    pyramid: bool) -> list[tuple[int, int]]:
    """Halve (rounding up) until a level fits in one tile."""
    shapes = [shape]
    while pyramid and (shapes[-1][0] > tile[0] or shapes[-1][1] > tile[1]):
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _tiles(source: Any, factor: int, shape: tuple[int, int],
           tile: tuple[int, int]) -> Iterator[np.ndarray]:
    """Tiles of ``source[::factor, ::factor]`` in row-major order (edge tiles smaller; tifffile
    pads them)."""
    th, tw = tile
    for r in range(0, shape[0], th):
        for c in range(0, shape[1], tw):
            yield np.asarray(source[r * factor:(r + th) * factor:factor,
                                    c * factor:(c + tw) * factor:factor])


def write_label_tiff(path: str | os.PathLike, labels: Any, *, pyramid: bool = True,
                     tile: Sequence[int] = (512, 512), compression: str | None = "zlib",
                     mpp: float | None = None, force: bool = False,
                     inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Write a 2-D integer label image (numpy, or lazy zarr / dask) as a tiled TIFF with
    optional sub-resolution pyramid (SubIFDs); returns ``path``.

    An existing ``path`` is refused unless ``force``, and even then replaced only when it is a
    TIFF of ours (:func:`is_our_tiff`); one of ``inputs`` (the slide or store the labels come
    from) is never written (:func:`~..core.atomic.check_target`).

    ``tile`` sides must be multiples of 16 (TIFF rule). ``compression`` is any tifffile codec
    name (lossless ones only make sense for labels: "zlib", "zstd", "lzw", None). ``mpp`` is the
    pixel size of ``labels`` in micrometres; level k gets ``mpp * 2**k``.
    """
    shape = tuple(int(n) for n in labels.shape)
    if len(shape) != 2:
        raise ValueError(f"labels must be 2-D, got shape {shape}")
    dtype = np.dtype(labels.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {dtype}")
    tile_yx = (int(tile[0]), int(tile[1]))
    if tile_yx[0] <= 0 or tile_yx[1] <= 0 or tile_yx[0] % 16 or tile_yx[1] % 16:
        raise ValueError(f"tile sides must be positive multiples of 16, got {tile_yx}")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    check_target(path, kind="label TIFF", force=force, ours=is_our_tiff, inputs=inputs)
    shapes = _pyramid_shapes(shape, tile_yx, pyramid)
    bigtiff = sum(h * w for h, w in shapes) * dtype.itemsize > _BIGTIFF_BYTES
    common = {"dtype": dtype, "tile": tile_yx, "compression": compression,
              "photometric": "minisblack", "metadata": None}
    target = Path(path)
    with atomic_tiff(target, bigtiff=bigtiff) as tif:
        for level, level_shape in enumerate(shapes):
            options = dict(common, **_resolution(mpp, level))
            if level == 0:
                options.update(subifds=len(shapes) - 1, description="napari-genselfdiff labels")
            else:
                options.update(subfiletype=1)
            tif.write(_tiles(labels, 2 ** level, level_shape, tile_yx), shape=level_shape,
                      **options)
    return target


def read_label_tiff(path: str | os.PathLike) -> np.ndarray:
    """Full-resolution label image of a TIFF (first series, level 0). Raises DataError naming
    the file when it is missing, unreadable, not 2-D or not integer."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: TIFF file not found")
    try:
        with tifffile.TiffFile(path) as tif:
            data = tif.series[0].levels[0].asarray()
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise DataError(f"{path}: cannot read TIFF ({exc})") from None
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
        raise DataError(f"{path}: not a 2-D integer label image "
                        f"(shape {data.shape}, dtype {data.dtype})")
    return data
