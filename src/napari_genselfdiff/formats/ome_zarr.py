"""OME-Zarr (OME-NGFF 0.4) export of label images, readable by napari-ome-zarr, QuPath (via
Bio-Formats / OME-Zarr readers), Fiji MoBIE and vizarr.

Layout written (NGFF 0.4 "labels" spec)::

    target.zarr/                    zarr group (.zgroup)
      labels/                       .zattrs {"labels": [name]}
        <name>/                     .zattrs {"multiscales": [...], "image-label": {...}}
          0/  1/  2/ ...            integer arrays, level k = level 0 strided by 2**k

NGFF 0.4 is defined on the Zarr v2 format and requires "/" as the chunk dimension separator,
so the arrays are written with the installed zarr 3 API as ``zarr_format=2`` with a v2
"/"-separated chunk key encoding (Blosc-zstd compression, widely supported). Downsampled
levels use nearest-neighbour striding (``level[k] = level[k-1][::2, ::2]``): label ids are
never blended. The root group holds no image; ``image-label.source.image`` points at it
("../../") as the spec suggests, so an image can be added next to the labels later.

Writes are atomic: everything goes into a temporary folder next to the target, which is renamed
onto the target at the end (an existing target is replaced only after success). The root group's
attribute ``"genselfdiff": {"kind": "labels-export", ...}`` marks an export of ours
(:func:`is_our_ome_zarr`): an existing target is replaced only with ``force`` and only when it
is one (never a user's folder, a file, or the prediction store being exported).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from ..core.errors import DataError
from ..core.atomic import atomic_directory, check_target

NGFF_VERSION = "0.4"
_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
_CHUNK_KEYS = {"name": "v2", "separator": "/"}
_METADATA_KEY = "napari-genselfdiff"
#: The root attribute marking an OME-Zarr labels export of ours.
MARKER_KEY = "genselfdiff"
MARKER = {"kind": "labels-export", "version": 1}


def is_our_ome_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding an OME-Zarr labels export this package wrote."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        attrs = json.loads((path / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    marker = attrs.get(MARKER_KEY) if isinstance(attrs, dict) else None
    return isinstance(marker, dict) and marker.get("kind") == MARKER["kind"]


def _level_shapes(shape: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Shapes of a ``levels``-deep pyramid made by striding by 2 (stops early at 1 x 1)."""
    shapes = [shape]
    while len(shapes) < levels and shapes[-1] != (1, 1):
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _check_image_shape(image_shape: Sequence[int], shape: tuple[int, int],
                       scale: tuple[float, float]) -> None:
    """``image_shape`` must be covered by the labels at ``scale`` to within one label pixel."""
    for axis, (full, n, s) in enumerate(zip(image_shape, shape, scale)):
        if abs(n * s - full) >= s:
            raise ValueError(f"labels of shape {shape} at scale {scale} do not match image_shape "
                             f"{tuple(image_shape)} (axis {axis}: {n} x {s} != {full})")


def _write_level(group: zarr.Group, name: str, source: Any, factor: int,
                 shape: tuple[int, int], chunks: tuple[int, int]) -> zarr.Array:
    """Write ``source[::factor, ::factor]`` (of ``shape``) chunk by chunk, so only one chunk of
    the output is in memory at a time (``source`` may be lazy)."""
    chunks = (min(chunks[0], shape[0]), min(chunks[1], shape[1]))
    array = group.create_array(name, shape=shape, dtype=source.dtype, chunks=chunks,
                               compressors=_COMPRESSOR, chunk_key_encoding=_CHUNK_KEYS,
                               fill_value=0)
    for r in range(0, shape[0], chunks[0]):
        for c in range(0, shape[1], chunks[1]):
            block = np.asarray(source[r * factor:(r + chunks[0]) * factor:factor,
                                      c * factor:(c + chunks[1]) * factor:factor])
            array[r:r + block.shape[0], c:c + block.shape[1]] = block
    return array


def _multiscales(name: str, n_levels: int, scale: tuple[float, float]) -> list[dict[str, Any]]:
    datasets = [{"path": str(k),
                 "coordinateTransformations": [{"type": "scale",
                                                "scale": [scale[0] * 2 ** k, scale[1] * 2 ** k]}]}
                for k in range(n_levels)]
    return [{"version": NGFF_VERSION, "name": name,
             "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
             "datasets": datasets,
             "type": "nearest",
             "metadata": {"method": "stride", "description": "level k = level 0 [::2**k, ::2**k]"}}]


def write_ome_zarr_labels(path: str | os.PathLike, labels: Any, *, name: str = "glands",
                          image_shape: Sequence[int] | None = None,
                          scale: Sequence[float] = (1.0, 1.0), pyramid_levels: int = 4,
                          chunks: Sequence[int] = (1024, 1024), force: bool = False,
                          inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Write a 2-D integer label image (numpy, or lazy zarr / dask) as an OME-NGFF 0.4 labels
    pyramid at ``path/labels/<name>``; returns ``path``.

    ``scale`` is the (y, x) size of one level-0 label pixel in the image's units (full-resolution
    pixels by default: use the downsample for labels computed at a lower level); level k has
    ``scale * 2**k``. ``image_shape`` (height, width) of the annotated image, when given, is
    checked against ``labels.shape * scale`` and stored under the group's "napari-genselfdiff"
    attribute. ``pyramid_levels`` counts level 0. An existing ``path`` is refused unless
    ``force``, and even then replaced only when it is an export of ours
    (:func:`is_our_ome_zarr`); ``inputs`` (the store the labels come from) are never written.
    """
    shape = tuple(int(n) for n in labels.shape)
    if len(shape) != 2:
        raise ValueError(f"labels must be 2-D, got shape {shape}")
    if not np.issubdtype(np.dtype(labels.dtype), np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if not name or "/" in name:
        raise ValueError(f"invalid labels name {name!r}")
    if pyramid_levels < 1:
        raise ValueError(f"pyramid_levels must be >= 1, got {pyramid_levels}")
    scale_yx = (float(scale[0]), float(scale[1]))
    if image_shape is not None:
        _check_image_shape(image_shape, shape, scale_yx)
    chunks_yx = (int(chunks[0]), int(chunks[1]))
    shapes = _level_shapes(shape, pyramid_levels)
    target = check_target(path, kind="OME-Zarr labels export", force=force, ours=is_our_ome_zarr,
                          inputs=inputs)
    with atomic_directory(target) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        root.attrs[MARKER_KEY] = dict(MARKER)
        labels_group = root.create_group("labels")
        group = labels_group.create_group(name)
        source = labels
        for level, level_shape in enumerate(shapes):
            source = _write_level(group, str(level), source, 1 if level == 0 else 2,
                                  level_shape, chunks_yx)
        group.attrs.update({"multiscales": _multiscales(name, len(shapes), scale_yx),
                            "image-label": {"version": NGFF_VERSION,
                                            "source": {"image": "../../"}}})
        if image_shape is not None:
            group.attrs[_METADATA_KEY] = {"image_shape": [int(n) for n in image_shape]}
        labels_group.attrs["labels"] = [name]
    return target


def read_ome_zarr_labels(path: str | os.PathLike, name: str | None = None) -> list[zarr.Array]:
    """The pyramid of labels ``name`` (default: the first listed) of an OME-Zarr, full
    resolution first, as lazy read-only zarr arrays (``np.asarray`` loads one; napari takes
    the list as multiscale data). Raises DataError naming the path when it is not readable."""
    root_path = Path(path)
    if not root_path.exists():
        raise DataError(f"{root_path}: OME-Zarr not found")
    try:
        root = zarr.open_group(str(root_path), mode="r")
        names = list(root["labels"].attrs["labels"])
    except (KeyError, FileNotFoundError, ValueError, TypeError, zarr.errors.BaseZarrError) as exc:
        raise DataError(f"{root_path}: not an OME-Zarr with labels ({exc!r})") from None
    chosen = names[0] if name is None and names else name
    if chosen not in names:
        raise DataError(f"{root_path}: no labels named {name!r} (available: {names})")
    try:
        group = root["labels"][chosen]
        datasets = group.attrs["multiscales"][0]["datasets"]
        return [group[d["path"]] for d in datasets]
    except (KeyError, IndexError, TypeError, zarr.errors.BaseZarrError) as exc:
        raise DataError(f"{root_path}: labels {chosen!r} have no readable multiscales "
                        f"({exc!r})") from None
