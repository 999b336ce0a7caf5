"""GeoJSON export of instance labels (QuPath and other GIS-style viewers), and the geometry
helpers the import side (:mod:`.geojson`, which re-exports this module's public names) shares.

Each instance id > 0 of a label image becomes one GeoJSON Feature whose polygon follows the
**pixel edges** exactly: pixel ``(row, col)`` is the unit square ``[col, col+1] x [row, row+1]``,
so the polygon area equals the pixel count and rasterising the polygon by pixel centres gives
back the same pixels. How the rings are traced, and why that is exact and fast:

* each object is cut out on its bounding box (plus one pixel of padding) and traced with
  marching squares (``skimage.measure.find_contours`` at level 0.5). On a 0/1 mask every contour
  vertex is the midpoint of one pixel edge between an object and a background pixel, and two
  consecutive vertices lie in one 2x2 cell whose centre is the pixel corner they share; mapping
  each contour segment to that corner turns the contour into the exact pixel-edge ring.
  Collinear corners are dropped, so a rectangle has 4 vertices. Cost: O(crop area) in C plus
  O(perimeter) in Python per object.
* marching squares keeps object pixels 4-connected, so two pixels that touch only at a corner
  are separate parts (a MultiPolygon touching at a point, which is valid). A background pocket
  that reaches the outside only through such a corner makes one contour visit that corner
  twice; the ring is split there into an exterior and a hole touching it at one point, the valid
  OGC form (a self-touching ring would be invalid).
* rings winding like an exterior are shells, the others holes; each hole goes to the smallest
  shell that contains it (islands inside holes become separate parts).
* exteriors are counter-clockwise and holes clockwise in the coordinate numbers as written
  (RFC 7946 section 3.1.6, reading y as pointing up; QuPath accepts either).
* the result is checked with ``is_valid``; ``shapely.make_valid`` (polygonal part kept, logged)
  is only a last resort, e.g. after ``simplify_tolerance`` > 0. Exact tracing never needs it.

Coordinates are full-resolution pixels: ``x = (col + offset_x) * downsample``,
``y = (row + offset_y) * downsample``, where ``(row, col)`` index ``labels`` and ``offset``
is the position of ``labels[0, 0]`` in the grid of ``labels`` (a crop of a larger label image
at that same downsample). ``objectType`` is written inside ``properties``, where QuPath reads
it. Files are streamed feature by feature and written atomically.

Every file written here starts with ``{"type":"FeatureCollection","genselfdiff":{"kind":
"labels-export",...},"features":[`` (a foreign member RFC 7946 allows; QuPath ignores it):
:func:`is_our_geojson` reads that first line to recognise an export of ours, the only kind
``force`` replaces (:func:`~..core.atomic.check_target`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from skimage.measure import find_contours

from ..core.atomic import atomic_file, check_target
from .label_blocks import object_groups
from .measurements import shape_row, shape_table
from .qupath import OBJECT_KINDS

log = logging.getLogger(__name__)

DEFAULT_COLOR = (0, 200, 0)
#: What marks a GeoJSON export of ours (a member of the FeatureCollection, first line).
MARKER = {"kind": "labels-export", "version": 1}
_HEADER = ('{"type":"FeatureCollection","genselfdiff":'
           + json.dumps(MARKER, separators=(",", ":"), sort_keys=True) + ',"features":[\n')
_MARKED = '{"type":"FeatureCollection","genselfdiff":{"kind":"labels-export"'
_LEGACY_HEADER = '{"type":"FeatureCollection","features":[\n'   # before the marker

Geometry = Polygon | MultiPolygon


# --------------------------------------------------------------------------- ring tracing

def _next(ring: np.ndarray) -> np.ndarray:
    """The ring's vertices shifted by one (vertex i+1 at position i); cheaper than np.roll."""
    return np.concatenate((ring[1:], ring[:1]))


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Remove vertices that lie on a straight run of an axis-aligned ring."""
    prev, nxt = np.concatenate((ring[-1:], ring[:-1])), _next(ring)
    same_row = (prev[:, 0] == ring[:, 0]) & (ring[:, 0] == nxt[:, 0])
    same_col = (prev[:, 1] == ring[:, 1]) & (ring[:, 1] == nxt[:, 1])
    return ring[~(same_row | same_col)]


def _split_at_repeats(ring: np.ndarray) -> list[np.ndarray]:
    """Split a ring that passes through a vertex more than once into simple loops."""
    keys = ring[:, 0] * (int(ring[:, 1].max()) + 1) + ring[:, 1]
    ordered = np.sort(keys)
    if not (ordered[1:] == ordered[:-1]).any():
        return [ring]
    loops: list[np.ndarray] = []
    stack: list[int] = []          # indices into ring, the loop being walked
    where: dict[int, int] = {}     # key -> position in stack
    for i, key in enumerate(keys.tolist()):
        if key in where:
            start = where[key]
            loops.append(ring[stack[start:]])
            for j in stack[start + 1:]:
                del where[int(keys[j])]
            del stack[start + 1:]
        else:
            where[key] = len(stack)
            stack.append(i)
    loops.append(ring[stack])
    return loops


def _trace_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Exact pixel-edge rings of a boolean mask as open (n, 2) int arrays of (row, col) corners,
    in the mask's edge frame. Shells wind counter-clockwise in (x=col, y=row), holes clockwise."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.float32)
    padded[1:-1, 1:-1] = mask
    rings: list[np.ndarray] = []
    for contour in find_contours(padded, 0.5):
        mids = contour[:-1]
        # the corner shared by consecutive edge midpoints, padded edge frame = floor(mean) + 1,
        # minus the one pixel of padding
        corners = np.floor((mids + _next(mids)) * 0.5).astype(np.int64)
        rings.extend(_split_at_repeats(_drop_collinear(corners)))
    return rings


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of an open (row, col) ring, positive when counter-clockwise in (x, y)."""
    y, x = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, _next(y)) - np.dot(_next(x), y))


def _ring_length(ring: np.ndarray) -> float:
    return float(np.abs(_next(ring) - ring).sum())


def _assemble(rings: list[np.ndarray]) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Group rings into (shell, holes) pairs; a hole goes to the smallest shell containing it."""
    areas = np.array([_signed_area(r) for r in rings])
    shells = [r for r, a in zip(rings, areas) if a > 0]
    holes = [r for r, a in zip(rings, areas) if a < 0]
    parts: list[tuple[np.ndarray, list[np.ndarray]]] = [(s, []) for s in shells]
    if len(shells) == 1:
        parts[0][1].extend(holes)
        return parts
    order = np.argsort(areas[areas > 0])
    shell_polys = [Polygon(s[:, ::-1]) for s in shells]
    for hole in holes:
        # midpoint of the hole's first edge: on no other ring, so strictly inside or outside
        y, x = (hole[0] + hole[1]) / 2.0
        owner = next(i for i in order if shapely.contains_xy(shell_polys[i], x, y))
        parts[owner][1].append(hole)
    return parts


# --------------------------------------------------------------------------- geometry helpers

def _polygon_parts(geom: shapely.Geometry) -> list[Polygon]:
    """Non-empty polygons inside any geometry (collections flattened)."""
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygon_parts(g)]
    return []


def _as_polygonal(parts: Sequence[Polygon]) -> Geometry | None:
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else MultiPolygon(list(parts))


def _orient(geom: Geometry) -> Geometry:
    """Exterior counter-clockwise, holes clockwise (RFC 7946)."""
    return shapely.orient_polygons(geom, exterior_cw=False)


def _make_valid_polygonal(geom: shapely.Geometry) -> Geometry | None:
    """Last-resort repair keeping only the polygonal part of ``shapely.make_valid``."""
    fixed = _as_polygonal(_polygon_parts(shapely.make_valid(geom)))
    return None if fixed is None else _orient(fixed)


def _ring_json(coords: np.ndarray) -> list:
    """Closed ring as nested lists, integers when every coordinate is integral (smaller files)."""
    if np.array_equal(coords, np.floor(coords)):
        return coords.astype(np.int64).tolist()
    return coords.tolist()


def _geometry_json(geom: Geometry) -> dict[str, Any]:
    def poly(p: Polygon) -> list:
        rings = [p.exterior, *p.interiors]
        return [_ring_json(shapely.get_coordinates(r)) for r in rings]
    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": poly(geom)}
    return {"type": "MultiPolygon", "coordinates": [poly(p) for p in geom.geoms]}


# --------------------------------------------------------------------------- export

@dataclass(frozen=True)
class _ExportOptions:
    offset: tuple[float, float]
    downsample: float
    object_type: str
    class_name: str
    color: tuple[int, int, int]
    simplify_tolerance: float
    mpp: float | None = None  # microns per full-resolution pixel: measurements in µm too

    @classmethod
    def make(cls, offset: Sequence[float] = (0, 0), downsample: float = 1.0,
             object_type: str = "annotation", class_name: str = "Gland",
             color: Sequence[int] | None = None,
             simplify_tolerance: float = 0.0, mpp: float | None = None) -> _ExportOptions:
        if object_type not in OBJECT_KINDS:
            raise ValueError(f"object_type must be one of {OBJECT_KINDS}, got {object_type!r}")
        if not downsample > 0:
            raise ValueError(f"downsample must be > 0, got {downsample}")
        if simplify_tolerance < 0:
            raise ValueError(f"simplify_tolerance must be >= 0, got {simplify_tolerance}")
        if color is None:  # the class's own colour (Nucleus blue, Gland green), as napari draws it
            from .qupath import colour_of_class
            color = colour_of_class(str(class_name))
        rgb = tuple(int(c) for c in color)
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"color must be three integers 0..255, got {color!r}")
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be a finite number > 0, got {mpp}")
        oy, ox = offset
        return cls((float(oy), float(ox)), float(downsample), object_type, str(class_name),
                   rgb, float(simplify_tolerance), None if mpp is None else float(mpp))


def _object_geometry(mask: np.ndarray, origin: tuple[int, int], label: int,
                     opts: _ExportOptions) -> tuple[Geometry, float]:
    """Full-resolution geometry of one object's mask cut out at ``origin`` (row, col), and its
    exact perimeter in full-resolution pixels."""
    rings = _trace_rings(mask)
    perimeter = sum(_ring_length(r) for r in rings) * opts.downsample
    shift = np.array([origin[0] + opts.offset[0], origin[1] + opts.offset[1]])

    def to_xy(ring: np.ndarray) -> np.ndarray:
        return ((ring + shift) * opts.downsample)[:, ::-1]

    polys = [Polygon(to_xy(shell), [to_xy(h) for h in holes])
             for shell, holes in _assemble(rings)]
    geom = _as_polygonal(polys)
    if opts.simplify_tolerance > 0:
        geom = _orient(shapely.simplify(geom, opts.simplify_tolerance, preserve_topology=True))
    if not geom.is_valid:
        reason = shapely.is_valid_reason(geom)
        repaired = _make_valid_polygonal(geom)
        if repaired is None:
            raise RuntimeError(f"label {label}: could not build a valid polygon ({reason})")
        log.warning("label %d: polygon repaired with make_valid (%s)", label, reason)
        geom = repaired
    return geom, perimeter


def _mean_probability(probs: np.ndarray, mask: np.ndarray) -> float:
    values = probs[mask]
    scale = 255.0 if probs.dtype == np.uint8 else 1.0
    return float(values.mean(dtype=np.float64) / scale)


def _make_feature(mask: np.ndarray, origin: tuple[int, int], label: int, opts: _ExportOptions,
                  probs: np.ndarray | None, shape: dict[str, float]) -> dict[str, Any]:
    """``shape``: the object's row of the measurements table (.measurements.shape_row)."""
    geom, perimeter = _object_geometry(mask, origin, label, opts)
    measurements = {"area": float(np.count_nonzero(mask)) * opts.downsample ** 2,
                    "perimeter": perimeter}
    if opts.mpp is None:  # the pixel area and staircase perimeter above already say it in pixels
        shape = {k: v for k, v in shape.items() if not k.endswith("px") and not k.endswith("px^2")}
    measurements.update(shape)
    if probs is not None:
        measurements["mean_probability"] = _mean_probability(probs, mask)
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": _geometry_json(geom),
        "properties": {
            "objectType": opts.object_type,
            "classification": {"name": opts.class_name, "color": list(opts.color)},
            "measurements": measurements,
            "label_id": int(label),
        },
    }


def _check_label_array(labels: Any, probabilities: Any | None) -> None:
    if len(labels.shape) != 2:
        raise ValueError(f"labels must be 2-D, got shape {tuple(labels.shape)}")
    if not np.issubdtype(np.dtype(labels.dtype), np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if probabilities is not None and tuple(probabilities.shape) != tuple(labels.shape):
        raise ValueError(f"probabilities shape {tuple(probabilities.shape)} differs from "
                         f"labels shape {tuple(labels.shape)}")


def _iter_array_features(array: Any, chunk: int, probabilities: Any | None,
                         opts: _ExportOptions) -> Iterator[dict[str, Any]]:
    """Features of every object of a (possibly lazy) 2-D label array, each exactly once, read group
    by group (:func:`.label_blocks.object_groups`: memory bounded by a block plus the largest
    object, never the whole array)."""
    for group in object_groups(array, chunk):
        r0, c0, r1, c1 = group.window
        region = np.asarray(array[r0:r1, c0:c1])
        probs = None if probabilities is None else np.asarray(probabilities[r0:r1, c0:c1])
        # the group's shape measurements in one pass (objects of other groups left out: they may be cut)
        table = shape_table(np.where(np.isin(region, group.ids), region, 0))
        for label, (br0, bc0, br1, bc1) in zip(group.ids.tolist(), group.boxes.tolist()):
            window = (slice(br0 - r0, br1 - r0), slice(bc0 - c0, bc1 - c0))
            mask = region[window] == label
            row = shape_row(table, int(np.searchsorted(table["label"], label)), opts.mpp, opts.downsample)
            yield _make_feature(mask, (br0, bc0), label, opts, None if probs is None else probs[window], row)


def labels_to_features(labels: np.ndarray, *, offset: Sequence[float] = (0, 0),
                       downsample: float = 1.0, object_type: str = "annotation",
                       class_name: str = "Gland", color: Sequence[int] | None = None,
                       probabilities: np.ndarray | None = None,
                       simplify_tolerance: float = 0.0, mpp: float | None = None) -> Iterator[dict[str, Any]]:
    """One GeoJSON Feature per instance id > 0 of ``labels``, lazily, in increasing id order.

    Parameters
    ----------
    labels : 2-D integer array (ids >= 0; 0 is background).
    offset : (row, col) of ``labels[0, 0]`` in the label grid (same downsample as ``labels``);
        full-resolution ``x = (col + offset[1]) * downsample`` and
        ``y = (row + offset[0]) * downsample``.
    downsample : size of one label pixel in full-resolution pixels.
    object_type : ``"annotation"`` or ``"detection"`` (QuPath object types).
    class_name, color : QuPath classification name and RGB colour (default: the class's own,
        :func:`.qupath.colour_of_class`).
    probabilities : optional array of the shape of ``labels``, float in [0, 1] or uint8 0..255;
        adds ``measurements["mean_probability"]`` (mean over the object's pixels, in [0, 1]).
    simplify_tolerance : Douglas-Peucker tolerance in full-resolution pixels (0 = exact
        pixel-edge polygons). Measurements always come from the exact polygon.

    Each feature has a uuid4 ``id``, a Polygon (MultiPolygon for objects in several parts) with
    holes as interior rings, and ``properties`` = ``objectType``, ``classification``,
    ``measurements`` (``area`` = pixel count * downsample**2, ``perimeter`` = length of all rings
    of the exact polygon, both in full-resolution pixels; ``Circularity``, ``Eccentricity``,
    ``Solidity`` and, with ``mpp`` (microns per full-resolution pixel), ``Area µm^2`` and
    ``Perimeter µm``, the numbers of :mod:`.measurements`) and ``label_id``.
    """
    labels = np.asarray(labels)
    _check_label_array(labels, probabilities)
    opts = _ExportOptions.make(offset, downsample, object_type, class_name, color,
                               simplify_tolerance, mpp)
    probs = None if probabilities is None else np.asarray(probabilities)
    yield from _iter_array_features(labels, max(labels.shape), probs, opts)


def is_our_geojson(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a plain file holding a GeoJSON export of ours: its first line carries
    our marker, or (files written before the marker) it is our exact FeatureCollection layout
    whose first feature has our ``label_id`` and ``objectType`` properties."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.readline(1 << 16).decode("utf-8")
            if head.startswith(_MARKED):
                return True
            if head != _LEGACY_HEADER:
                return False
            first = fh.readline(1 << 26).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return False
    if first == "]}":
        return True  # an empty export
    try:
        props = json.loads(first.rstrip(",")).get("properties", {})
    except (ValueError, AttributeError, RecursionError):
        return False
    return isinstance(props, dict) and "label_id" in props and "objectType" in props


def write_geojson(path: str | os.PathLike, features: Iterable[dict[str, Any]], *,
                  force: bool = False, inputs: Sequence[str | os.PathLike | None] = ()) -> int:
    """Stream ``features`` into a GeoJSON FeatureCollection at ``path``; returns how many.

    Features are serialised one at a time as they are drawn from the iterable (a generator is
    never materialised). The file is written to a temporary file next to ``path`` and moved
    into place at the end, so a failure leaves no partial file. An existing ``path`` is refused
    unless ``force``, and even then replaced only when it is an export of ours
    (:func:`is_our_geojson`); ``inputs`` (the image or store the objects come from) are never
    written (:func:`~..core.atomic.check_target`).
    """
    check_target(path, kind="GeoJSON export", force=force, ours=is_our_geojson, inputs=inputs)
    count = 0
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(_HEADER)
        for feature in features:
            if count:
                fh.write(",\n")
            fh.write(json.dumps(feature, separators=(",", ":"), allow_nan=False))
            count += 1
        fh.write("\n]}\n")
    return count


def export_labels_geojson(labels: np.ndarray, path: str | os.PathLike, *, force: bool = False,
                          inputs: Sequence[str | os.PathLike | None] = (), **kwargs: Any) -> int:
    """Write :func:`labels_to_features` of ``labels`` to ``path`` (``force`` and ``inputs`` as
    for :func:`write_geojson`); returns the feature count."""
    return write_geojson(path, labels_to_features(labels, **kwargs), force=force, inputs=inputs)


def export_label_array_chunked(label_array: Any, path: str | os.PathLike, *, chunk: int = 4096,
                               probabilities: Any | None = None, force: bool = False,
                               inputs: Sequence[str | os.PathLike | None] = (), **kwargs: Any) -> int:
    """Export a large, possibly lazy (zarr / dask / memory-mapped) 2-D label array to GeoJSON.

    A first pass over ``chunk`` x ``chunk`` blocks finds every id's bounding box; objects are
    then cut out of the array (a block plus overhang at a time) and traced whole, so an object
    spanning several blocks is emitted exactly once and complete. Memory stays bounded by a block
    plus the largest object. Choose ``chunk`` as a multiple of the array's storage chunks.
    ``probabilities`` (same shape, may be lazy) and ``kwargs`` are as for
    :func:`labels_to_features`; features come out grouped by block; ``force`` and ``inputs``
    are as for :func:`write_geojson`. Returns the count.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _check_label_array(label_array, probabilities)
    opts = _ExportOptions.make(**kwargs)
    return write_geojson(path, _iter_array_features(label_array, int(chunk), probabilities, opts),
                         force=force, inputs=inputs)
