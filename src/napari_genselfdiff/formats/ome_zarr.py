"""OME-Zarr (OME-NGFF 0.4) export of label images, with the image they label, readable by
napari-ome-zarr, the ``ome-zarr`` reader, QuPath (via Bio-Formats / OME-Zarr readers), Fiji MoBIE
and vizarr.

Layout written (NGFF 0.4 "multiscales", "omero" and "labels")::

    target.zarr/                    .zattrs {"multiscales": [image], "omero": {...}}   (with an image)
      0/  1/  2/ ...                (3, H, W) uint8 RGB, axes c, y, x; level k = 2**k x 2**k means
      labels/                       .zattrs {"labels": [name]}
        <name>/                     .zattrs {"multiscales": [...], "image-label": {...}}
          0/  1/  2/ ...            (H, W) integer arrays, level k = level 0 strided by 2**k

The root image is the slide at the level the labels were computed at (so it stays as small as
the prediction, and a viewer opening the root finds the image and, through ``labels``, the
labels); without one the root holds only the ``labels`` group. ``image-label.source.image``
points at the root ("../../"), ``image-label.colors`` gives every object a colour (and the
background 0 a transparent one) unless there are more than :data:`MAX_COLORS` objects (then a
viewer picks its own: a partial list would hide the unlisted ones).

Scales are physical: with the slide's pixel size ``mpp`` known, the axes have
``"unit": "micrometer"`` and level k's scale is ``mpp * downsample * 2**k``; unknown, the axes
have no unit and the scales count full-resolution slide pixels (``downsample * 2**k``), and the
labels group's "napari-genselfdiff" attribute says ``"unit": "pixel"``. Translations put pixel
centres where they lie in the slide (a label pixel spans ``downsample`` slide pixels; a mean of
2**k pixels is centred between them), as the napari reader places prediction stores.

NGFF 0.4 is defined on the Zarr v2 format and requires "/" as the chunk dimension separator,
so the arrays are written with the installed zarr 3 API as ``zarr_format=2`` with a v2
"/"-separated chunk key encoding (Blosc-zstd compression, widely supported). Downsampled
label levels use nearest-neighbour striding (``level[k] = level[k-1][::2, ::2]``): label ids
are never blended. Everything is written chunk by chunk, so a lazy image and labels are never
in memory whole.

Writes are atomic: everything goes into a temporary folder next to the target, which is renamed
onto the target at the end (an existing target is replaced only after success). The root group's
attribute ``"genselfdiff": {"kind": "labels-export", ...}`` marks an export of ours
(:func:`is_our_ome_zarr`): an existing target is replaced only with ``force`` and only when it
is one (never a user's folder, a file, or the prediction store being exported).
"""
from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from ..core.errors import DataError
from ..core.atomic import atomic_directory, check_target, foreign_files

NGFF_VERSION = "0.4"
_COMPRESSOR = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
_CHUNK_KEYS = {"name": "v2", "separator": "/"}
_METADATA_KEY = "napari-genselfdiff"
#: The root attribute marking an OME-Zarr labels export of ours.
MARKER_KEY = "genselfdiff"
MARKER = {"kind": "labels-export", "version": 1}
#: Objects coloured in ``image-label.colors`` at most (about 60 bytes of JSON each).
MAX_COLORS = 20_000
_RGB = (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))


def is_our_ome_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding an OME-Zarr labels export this package wrote."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        attrs = json.loads((path / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    marker = attrs.get(MARKER_KEY) if isinstance(attrs, dict) else None
    return isinstance(marker, dict) and marker.get("kind") == MARKER["kind"] and not foreign_files(path)


def _level_shapes(shape: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Shapes of a ``levels``-deep pyramid made by striding by 2 (stops early at 1 x 1)."""
    shapes = [shape]
    while len(shapes) < levels and shapes[-1] != (1, 1):
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _check_image_shape(image_shape: Sequence[int], shape: tuple[int, int], downsample: float) -> None:
    """``image_shape`` (full-resolution pixels) must be covered by the labels to within one label pixel."""
    for axis, (full, n) in enumerate(zip(image_shape, shape)):
        if abs(n * downsample - full) >= downsample:
            raise ValueError(f"labels of shape {shape} at downsample {downsample} do not match image_shape "
                             f"{tuple(image_shape)} (axis {axis}: {n} x {downsample} != {full})")


def _create(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any,
            chunks: tuple[int, ...]) -> zarr.Array:
    chunks = tuple(min(c, n) for c, n in zip(chunks, shape))
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=_COMPRESSOR,
                              chunk_key_encoding=_CHUNK_KEYS, fill_value=0)


def _write_level(group: zarr.Group, name: str, source: Any, factor: int,
                 shape: tuple[int, int], chunks: tuple[int, int], ids: set | None = None) -> zarr.Array:
    """Write ``source[::factor, ::factor]`` (of ``shape``) chunk by chunk, so only one chunk of
    the output is in memory at a time (``source`` may be lazy). ``ids`` collects the values
    written (up to :data:`MAX_COLORS` + 1 of them)."""
    array = _create(group, name, shape, source.dtype, chunks)
    ch, cw = array.chunks
    for r in range(0, shape[0], ch):
        for c in range(0, shape[1], cw):
            block = np.asarray(source[r * factor:(r + ch) * factor:factor, c * factor:(c + cw) * factor:factor])
            array[r:r + block.shape[0], c:c + block.shape[1]] = block
            if ids is not None and len(ids) <= MAX_COLORS:
                ids.update(np.unique(block).tolist())
    return array


def _write_image_level0(group: zarr.Group, image: Any, shape: tuple[int, int], chunks: tuple[int, int]) -> zarr.Array:
    """The (H, W, 3) ``image`` as a (3, H, W) array, one block of it in memory at a time."""
    array = _create(group, "0", (3, *shape), np.uint8, (1, *chunks))
    _, ch, cw = array.chunks
    for r in range(0, shape[0], ch):
        for c in range(0, shape[1], cw):
            block = np.asarray(image[r:r + ch, c:c + cw])
            array[:, r:r + block.shape[0], c:c + block.shape[1]] = np.moveaxis(block[..., :3], -1, 0)
    return array


def _write_image_mean(group: zarr.Group, name: str, source: zarr.Array, shape: tuple[int, int]) -> zarr.Array:
    """Level ``name`` of the image: rounded 2 x 2 means of ``source`` (an odd edge row / column is
    repeated), written chunk by chunk."""
    array = _create(group, name, (3, *shape), np.uint8, source.chunks)
    _, ch, cw = array.chunks
    for r in range(0, shape[0], ch):
        for c in range(0, shape[1], cw):
            block = np.asarray(source[:, 2 * r:2 * (r + ch), 2 * c:2 * (c + cw)]).astype(np.float32)
            if block.shape[1] % 2:
                block = np.concatenate([block, block[:, -1:]], axis=1)
            if block.shape[2] % 2:
                block = np.concatenate([block, block[:, :, -1:]], axis=2)
            mean = (block[:, 0::2, 0::2] + block[:, 1::2, 0::2] + block[:, 0::2, 1::2] + block[:, 1::2, 1::2]) / 4
            array[:, r:r + mean.shape[1], c:c + mean.shape[2]] = np.rint(mean).astype(np.uint8)
    return array


def _axes(names: str, unit: str | None) -> list[dict[str, str]]:
    axes = []
    for n in names:
        axis = {"name": n, "type": "channel" if n == "c" else "space"}
        if unit and n != "c":
            axis["unit"] = unit
        axes.append(axis)
    return axes


def _multiscales(name: str, n_levels: int, pixel: float, offset: float, *, image: bool,
                 unit: str | None) -> list[dict[str, Any]]:
    """``pixel``: the size of one level-0 pixel in the axes' unit; ``offset``: where its centre
    lies. Image level k (2**k-pixel means) is centred (2**k - 1) / 2 level-0 pixels further in;
    strided label levels are not."""
    datasets = []
    for k in range(n_levels):
        size = pixel * 2 ** k
        shift = offset + ((2 ** k - 1) / 2 * pixel if image else 0.0)
        lead = [1.0] if image else []
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": lead + [size, size]}]
        if shift:
            transforms.append({"type": "translation", "translation": [0.0] * len(lead) + [shift, shift]})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    method = ({"method": "mean", "description": "level k pixel = mean of the 2**k x 2**k level-0 pixels"}
              if image else {"method": "stride", "description": "level k = level 0 [::2**k, ::2**k]"})
    return [{"version": NGFF_VERSION, "name": name, "axes": _axes("cyx" if image else "yx", unit),
             "datasets": datasets, "type": "mean" if image else "nearest", "metadata": method}]


def _omero(name: str) -> dict[str, Any]:
    """Render the three channels as one RGB image (napari-ome-zarr, vizarr, OMERO)."""
    return {"name": name, "version": NGFF_VERSION, "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0},
            "channels": [{"label": label, "color": color, "active": True, "coefficient": 1.0,
                          "family": "linear", "inverted": False,
                          "window": {"min": 0, "max": 255, "start": 0, "end": 255}}
                         for label, color in _RGB]}


def object_colors(ids: set | Sequence[int]) -> list[dict[str, Any]] | None:
    """``image-label.colors``: background 0 transparent and each object id a bright colour (hues
    a golden angle apart, so neighbouring ids differ); None for more than :data:`MAX_COLORS` ids."""
    objects = sorted(int(i) for i in ids if int(i) != 0)
    if len(objects) > MAX_COLORS:
        return None
    colors = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    for i in objects:
        r, g, b = colorsys.hsv_to_rgb((i * 0.6180339887498949) % 1.0, 0.85, 0.95)
        colors.append({"label-value": i, "rgba": [round(r * 255), round(g * 255), round(b * 255), 255]})
    return colors


def write_ome_zarr_labels(path: str | os.PathLike, labels: Any, *, name: str = "glands",
                          image: Any = None, image_name: str = "image", downsample: float = 1.0,
                          mpp: float | None = None, image_shape: Sequence[int] | None = None,
                          pyramid_levels: int = 4, chunks: Sequence[int] = (1024, 1024),
                          force: bool = False, inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """Write a 2-D integer label image (numpy, or lazy zarr / dask) as an OME-NGFF 0.4 labels
    pyramid at ``path/labels/<name>``, and ``image`` (when given) as the root's image; returns
    ``path``.

    ``image`` is the (H, W, 3) uint8 image the labels lie on, pixel for pixel (the slide at the
    level the labels were computed at; numpy, zarr or dask), named ``image_name``. ``downsample``
    is how many full-resolution slide pixels one label pixel spans, ``mpp`` the slide's
    micrometres per full-resolution pixel (None: unknown, the scales are then in full-resolution
    pixels; see the module docstring). ``image_shape`` (height, width) of the full-resolution
    slide, when given, is checked against ``labels.shape * downsample`` and stored under the
    labels group's "napari-genselfdiff" attribute. ``pyramid_levels`` counts level 0. An existing
    ``path`` is refused unless ``force``, and even then replaced only when it is an export of ours
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
    if image is not None and (tuple(int(n) for n in image.shape) != (*shape, 3) or np.dtype(image.dtype) != np.uint8):
        raise ValueError(f"image must be ({shape[0]}, {shape[1]}, 3) uint8 like the labels, got "
                         f"{tuple(image.shape)} {image.dtype}")
    downsample = float(downsample)
    if not downsample > 0 or (mpp is not None and not float(mpp) > 0):
        raise ValueError(f"downsample and mpp must be positive, got {downsample} and {mpp}")
    if image_shape is not None:
        _check_image_shape(image_shape, shape, downsample)
    unit = "micrometer" if mpp is not None else None
    pixel = downsample * (float(mpp) if mpp is not None else 1.0)   # one level-0 label pixel, in the unit
    offset = (downsample - 1.0) / 2.0 * (float(mpp) if mpp is not None else 1.0)
    chunks_yx = (int(chunks[0]), int(chunks[1]))
    shapes = _level_shapes(shape, pyramid_levels)
    target = check_target(path, kind="OME-Zarr labels export", force=force, ours=is_our_ome_zarr,
                          inputs=inputs)
    with atomic_directory(target) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        root.attrs[MARKER_KEY] = dict(MARKER)
        if image is not None:
            level = _write_image_level0(root, image, shape, chunks_yx)
            for k, level_shape in enumerate(shapes[1:], start=1):
                level = _write_image_mean(root, str(k), level, level_shape)
            root.attrs.update({"multiscales": _multiscales(image_name, len(shapes), pixel, offset,
                                                           image=True, unit=unit),
                               "omero": _omero(image_name)})
        labels_group = root.create_group("labels")
        group = labels_group.create_group(name)
        source, ids = labels, set()
        for level, level_shape in enumerate(shapes):
            source = _write_level(group, str(level), source, 1 if level == 0 else 2,
                                  level_shape, chunks_yx, ids if level == 0 else None)
        image_label: dict[str, Any] = {"version": NGFF_VERSION}
        colors = object_colors(ids)
        if colors is not None:
            image_label["colors"] = colors
        image_label["source"] = {"image": "../../"}
        group.attrs.update({"multiscales": _multiscales(name, len(shapes), pixel, offset, image=False, unit=unit),
                            "image-label": image_label})
        ours: dict[str, Any] = {"unit": unit or "pixel", "downsample": downsample}
        if image_shape is not None:
            ours["image_shape"] = [int(n) for n in image_shape]
        group.attrs[_METADATA_KEY] = ours
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
