"""GeoJSON import (QuPath and other tools) into napari layers and label images, and the one
public face of the GeoJSON format: the export names of :mod:`.geojson_export` (exact pixel-edge
polygons, streamed, atomic, recognised by their marker) are re-exported here, so
``formats.geojson`` reads and writes.

Import
------
:func:`read_geojson` accepts what QuPath and other tools write (FeatureCollection, a bare
Feature or geometry, a plain list of Features), keeps polygonal geometry as shapely objects
and reports every skipped or altered feature in ``warnings`` by index and id.
:func:`features_to_labels` rasterises them back (pixel-centre rule, holes honoured),
:class:`FeatureRaster` does the same lazily, window by window, for a label image of any size
(a whole slide's label TIFF), and :func:`features_to_shapes` turns them into napari Shapes data.
:func:`iter_read_geojson` and :func:`iter_features_to_labels` are the same work as generators
of :class:`~..core.progress.Progress` events, for a background job with a progress bar. Drawing
is vectorised over many objects at once (:func:`_paint`): 50 000 objects take about a second.

What a file cannot do to us: JSON nested deeper than :data:`MAX_DEPTH` is refused with one line
before it is parsed (the JSON parser and shapely recurse, and a worker thread's stack is
small); a feature with a coordinate beyond :data:`MAX_COORDINATE` pixels is skipped with a
warning; :func:`raster_window` refuses a raster of the objects' bounds over
:data:`MAX_RASTER_PIXELS` (the image size unknown) and says so when none of the objects lies
inside the image, instead of handing back an empty raster.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from ..core.errors import DataError
from ..core.progress import Progress, run_to_end
from .geojson_export import (DEFAULT_COLOR, MARKER, Geometry, _as_polygonal, _make_valid_polygonal, _orient,
                             _polygon_parts, export_label_array_chunked, export_labels_geojson, is_our_geojson,
                             labels_to_features, write_geojson)

__all__ = ["DEFAULT_COLOR", "MARKER", "MAX_COORDINATE", "MAX_DEPTH", "MAX_RASTER_PIXELS", "FeatureRaster",
           "ImportResult", "ImportedFeature", "export_label_array_chunked", "export_labels_geojson",
           "features_to_labels", "features_to_shapes", "is_our_geojson", "iter_features_to_labels",
           "iter_read_geojson", "labels_to_features", "raster_window", "read_geojson", "write_geojson"]

_GEOJSON_GEOMETRIES = ("Point", "MultiPoint", "LineString", "MultiLineString", "Polygon",
                       "MultiPolygon", "GeometryCollection")
#: Deepest JSON nesting accepted. QuPath's GeoJSON nests about 8 levels (a MultiPolygon's
#: coordinates in a Feature in a FeatureCollection, measurements in properties).
MAX_DEPTH = 64
#: Largest coordinate (in pixels) taken for real: whole slides are ~1e5 pixels across.
MAX_COORDINATE = 1e7
#: Largest label raster made of the objects' bounds when the image size is not known.
MAX_RASTER_PIXELS = 100_000_000
#: Progress events come every this many features.
PROGRESS_EVERY = 1000
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class ImportedFeature:
    """One polygonal feature read from GeoJSON (coordinates in full-resolution pixels)."""

    index: int                      # position in the source's feature list
    feature_id: str | None          # the Feature's "id", if any
    geometry: Geometry
    class_name: str | None          # properties.classification.name (None: unclassified)
    object_type: str | None         # properties.objectType (top-level objectType as fallback)
    properties: dict[str, Any]


@dataclass
class ImportResult:
    """Features read by :func:`read_geojson` and one warning per skipped or altered feature."""

    source: str
    features: list[ImportedFeature] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _nesting_depth(data: bytes) -> int:
    """The deepest ``[``/``{`` nesting of JSON text, brackets inside strings not counted;
    vectorised, so a large file costs a fraction of parsing it."""
    if b"\\" in data:  # escaped quotes: drop the strings' contents first (linear regex)
        data = _STRING.sub(b'""', data)
    arr = np.frombuffer(data, np.uint8)
    opens = (arr == ord("[")) | (arr == ord("{"))
    brackets = np.flatnonzero(opens | (arr == ord("]")) | (arr == ord("}")))
    if brackets.size == 0:
        return 0
    quotes = np.flatnonzero(arr == ord('"'))
    outside = np.searchsorted(quotes, brackets) % 2 == 0  # an even number of quotes before
    brackets = brackets[outside]
    steps = np.where(opens[brackets], 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max(initial=0))


def _load_json(path_or_data: Any) -> tuple[str, Any]:
    if not isinstance(path_or_data, (str, os.PathLike)):
        return "<in-memory GeoJSON>", path_or_data
    path = Path(path_or_data)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: GeoJSON file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a GeoJSON file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    depth = _nesting_depth(data)
    if depth > MAX_DEPTH:
        raise DataError(f"{path}: JSON nested {depth} levels deep (GeoJSON needs about 8; more "
                        f"than {MAX_DEPTH} is refused): not a GeoJSON file we can read")
    try:
        return str(path), json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:  # cannot happen below MAX_DEPTH; kept as the last line of defence
        raise DataError(f"{path}: JSON nested too deeply to read") from None


def _raw_features(data: Any, source: str) -> list[Any]:
    """The list of candidate features in any accepted top-level shape."""
    if isinstance(data, list):
        return data
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise DataError(f"{source}: FeatureCollection without a 'features' list")
        return features
    if kind == "Feature":
        return [data]
    if kind in _GEOJSON_GEOMETRIES:
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise DataError(f"{source}: not GeoJSON (expected a FeatureCollection, a Feature, a "
                    f"geometry or a list of Features; found {kind or type(data).__name__!r})")


def _parse_geometry(geometry: Any) -> tuple[Geometry | None, list[str]]:
    """Polygonal shapely geometry and notes; None (with the reason) when unusable."""
    if not isinstance(geometry, dict):
        return None, ["malformed: no geometry object"]
    kind = geometry.get("type")
    if kind not in ("Polygon", "MultiPolygon", "GeometryCollection"):
        known = kind in _GEOJSON_GEOMETRIES
        what = f"{kind} geometry is not polygonal" if known else f"unknown geometry type {kind!r}"
        return None, [f"{what}; skipped"]
    try:
        geom = shapely.geometry.shape(geometry)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError,
            shapely.errors.ShapelyError) as exc:
        return None, [f"malformed {kind} ({type(exc).__name__}: {exc}); skipped"]
    notes = []
    parts = _polygon_parts(geom)
    if kind == "GeometryCollection" and not all(isinstance(g, (Polygon, MultiPolygon))
                                                for g in geom.geoms):
        notes.append("non-polygonal members of the GeometryCollection dropped")
    polygonal = _as_polygonal(parts)
    if polygonal is None:
        return None, notes + ["empty geometry; skipped"]
    coords = shapely.get_coordinates(polygonal)
    if not np.isfinite(coords).all():
        return None, notes + ["non-finite coordinates; skipped"]
    if np.abs(coords).max() > MAX_COORDINATE:
        return None, notes + [f"coordinates beyond {MAX_COORDINATE:,.0f} pixels (up to "
                              f"{np.abs(coords).max():.3g}): no slide is that large; skipped"]
    if not polygonal.is_valid:
        reason = shapely.is_valid_reason(polygonal)
        polygonal = _make_valid_polygonal(polygonal)
        if polygonal is None:
            return None, notes + [f"invalid geometry ({reason}) with no area; skipped"]
        notes.append(f"invalid geometry ({reason}) repaired")
    return polygonal, notes


def _clip(geom: Geometry, image_shape: tuple[int, int]) -> tuple[Geometry | None, list[str]]:
    height, width = image_shape
    minx, miny, maxx, maxy = shapely.bounds(geom)
    if minx >= 0 and miny >= 0 and maxx <= width and maxy <= height:
        return geom, []
    where = f"outside the image (width {width}, height {height})"
    clipped = _as_polygonal(_polygon_parts(geom.intersection(shapely.box(0, 0, width, height))))
    if clipped is None:
        return None, [f"entirely {where}; skipped"]
    return _orient(clipped), [f"coordinates {where}; clipped to the image"]


def _class_name(props: dict[str, Any]) -> str | None:
    classification = props.get("classification")
    if isinstance(classification, dict):
        name = classification.get("name")
        return None if name is None else str(name)
    if isinstance(classification, str):
        return classification
    return None


def _parse_feature(index: int, item: Any, image_shape: tuple[int, int] | None
                   ) -> tuple[ImportedFeature | None, list[str]]:
    if not isinstance(item, dict):
        return None, [f"feature {index} (no id): malformed, not a JSON object; skipped"]
    fid = item.get("id")
    fid = None if fid is None else str(fid)
    name = f"feature {index} ({'id=' + repr(fid) if fid is not None else 'no id'})"
    geom, notes = _parse_geometry(item.get("geometry"))
    if geom is not None and image_shape is not None:
        geom, clip_notes = _clip(geom, image_shape)
        notes += clip_notes
    if geom is None:
        return None, [f"{name}: {n}" for n in notes]
    props = item.get("properties")
    if not isinstance(props, dict):
        props = {}
    class_name = _class_name(props)
    if class_name is None:
        notes.append("no classification (class name None)")
    object_type = props.get("objectType", item.get("objectType"))
    feature = ImportedFeature(index, fid, geom, class_name,
                              None if object_type is None else str(object_type), props)
    return feature, [f"{name}: {n}" for n in notes]


def iter_read_geojson(path_or_data: str | os.PathLike | dict | list, *,
                      image_shape: tuple[int, int] | None = None,
                      every: int = PROGRESS_EVERY) -> Generator[Progress, None, ImportResult]:
    """:func:`read_geojson` as a generator of ``Progress`` events (stage ``"read"``, ``step``
    features of ``total``, one every ``every`` features) that *returns* the
    :class:`ImportResult` (``result = yield from iter_read_geojson(...)``)."""
    name = Path(path_or_data).name if isinstance(path_or_data, (str, os.PathLike)) else "GeoJSON"
    yield Progress("read", 0, 0, message=f"reading {name}")
    source, data = _load_json(path_or_data)
    raw = _raw_features(data, source)
    result = ImportResult(source)
    shape = None if image_shape is None else (int(image_shape[0]), int(image_shape[1]))
    for index, item in enumerate(raw):
        feature, warnings = _parse_feature(index, item, shape)
        result.warnings.extend(warnings)
        if feature is not None:
            result.features.append(feature)
        if (index + 1) % every == 0:
            yield Progress("read", index + 1, len(raw), message=f"read {index + 1} of {len(raw)} features")
    yield Progress("read", len(raw), len(raw), message=f"read {len(result.features)} polygon object(s) "
                                                       f"of {len(raw)} feature(s)")
    return result


def read_geojson(path_or_data: str | os.PathLike | dict | list, *,
                 image_shape: tuple[int, int] | None = None) -> ImportResult:
    """Read polygonal features from a GeoJSON file or already-parsed GeoJSON data.

    Accepts a FeatureCollection, a bare Feature, a bare Polygon / MultiPolygon (any geometry) or
    a plain list of Features (as some QuPath exports write). Polygons and MultiPolygons are kept
    (the polygonal members of a GeometryCollection too); every other feature is skipped with a
    warning naming it by index and id: malformed features or geometries, non-polygonal or
    unknown geometry types, empty or non-finite geometry, coordinates beyond
    :data:`MAX_COORDINATE`. Invalid polygons are repaired with ``shapely.make_valid`` (warned).
    With ``image_shape`` = (height, width) in full-resolution pixels, geometry reaching outside
    the image is clipped to it and geometry entirely outside skipped (warned). Features without
    a classification get ``class_name`` None (warned).

    Raises DataError naming the file when it is missing, not valid JSON / GeoJSON as a whole,
    or nested deeper than :data:`MAX_DEPTH`.
    """
    return run_to_end(iter_read_geojson(path_or_data, image_shape=image_shape))


# --------------------------------------------------------------------------- rasterising

def _feature_list(result_or_features: ImportResult | Iterable[ImportedFeature]
                  ) -> list[ImportedFeature]:
    if isinstance(result_or_features, ImportResult):
        return result_or_features.features
    return list(result_or_features)


def _paint(labels: np.ndarray, shapes: Sequence[list[np.ndarray]], values: Sequence[int]) -> None:
    """Draw many shapes into ``labels`` at once: shape k (its closed (n, 2) rings of (x, y) in
    ``labels``' pixel units) gets ``values[k]`` on every pixel whose centre lies inside it
    (even-odd rule, so holes and the parts of a MultiPolygon need no special case); a later
    shape wins over an earlier one and over what ``labels`` held.

    Each non-horizontal edge crosses the scanlines ``y = row + 0.5`` in the half-open range
    ``[min y, max y)``, so every shape crosses each row an even number of times; the crossings,
    sorted by (shape, row, x), pair up into runs of pixels. Everything is vectorised over all
    shapes (no Python loop per shape): O(edges + crossings + covered pixels)."""
    height, width = labels.shape
    rings = [(k, r) for k, shape in enumerate(shapes) for r in shape if len(r) > 1]
    if not rings or height == 0 or width == 0:
        return
    owner = np.concatenate([np.full(len(r) - 1, k, np.int64) for k, r in rings])
    start = np.concatenate([r[:-1] for _, r in rings])
    end = np.concatenate([r[1:] for _, r in rings])
    keep = start[:, 1] != end[:, 1]
    owner, (x0, y0), (x1, y1) = owner[keep], start[keep].T, end[keep].T
    first = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, height).astype(np.int64)
    last = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, height).astype(np.int64)
    counts = last - first
    edge = np.repeat(np.arange(counts.size), counts)
    rows = first[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(counts) - counts, counts))
    xs = x0[edge] + (rows + 0.5 - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    order = np.lexsort((xs, rows, owner[edge]))
    rows, cols, who = rows[order], np.clip(np.ceil(xs[order] - 0.5), 0, width).astype(np.int64), owner[edge][order]
    run_row, run_start, run_end, run_who = rows[0::2], cols[0::2], cols[1::2], who[0::2]
    lengths = run_end - run_start
    keep = lengths > 0
    run_row, run_start, lengths, run_who = run_row[keep], run_start[keep], lengths[keep], run_who[keep]
    if lengths.size == 0:
        return
    pixels = (np.repeat(run_row * width + run_start, lengths)
              + (np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)))
    who = np.repeat(run_who, lengths)
    order = np.lexsort((who, pixels))  # per pixel, the last shape wins
    pixels, who = pixels[order], who[order]
    top = np.concatenate([pixels[1:] != pixels[:-1], [True]])
    labels.reshape(-1)[pixels[top]] = np.asarray(values, dtype=labels.dtype)[who[top]]


def _rings(feature: ImportedFeature) -> list[np.ndarray]:
    """The closed (n, 2) (x, y) rings of a feature's polygons, exteriors and holes."""
    return [shapely.get_coordinates(r) for p in _polygon_parts(feature.geometry)
            for r in (p.exterior, *p.interiors)]


def iter_features_to_labels(result_or_features: ImportResult | Iterable[ImportedFeature],
                            shape: tuple[int, int], *, downsample: float = 1.0,
                            class_map: Mapping[str, int] | None = None, every: int = PROGRESS_EVERY
                            ) -> Generator[Progress, None, tuple[np.ndarray, dict[int, str | None]]]:
    """:func:`features_to_labels` as a generator of ``Progress`` events (stage
    ``"rasterise"``, one every ``every`` features) returning ``(labels, classes)``."""
    if not downsample > 0:
        raise ValueError(f"downsample must be > 0, got {downsample}")
    if class_map is not None and any(int(v) <= 0 for v in class_map.values()):
        raise ValueError("class_map values must be positive integers")
    features = _feature_list(result_or_features)
    labels = np.zeros((int(shape[0]), int(shape[1])), dtype=np.int32)
    classes: dict[int, str | None] = {}
    for start in range(0, len(features), every):  # a batch at a time: later batches over earlier
        shapes, values = [], []
        for number, feature in enumerate(features[start:start + every], start=start + 1):
            if class_map is None:
                value = number
            elif feature.class_name in class_map:
                value = int(class_map[feature.class_name])
            else:
                continue
            classes[value] = feature.class_name
            shapes.append([r / downsample for r in _rings(feature)])
            values.append(value)
        _paint(labels, shapes, values)
        done = min(start + every, len(features))
        if done < len(features):
            yield Progress("rasterise", done, len(features), message=f"drew {done} of {len(features)} objects")
    yield Progress("rasterise", len(features), len(features), message=f"drew {len(features)} objects")
    return labels, classes


def features_to_labels(result_or_features: ImportResult | Iterable[ImportedFeature],
                       shape: tuple[int, int], *, downsample: float = 1.0,
                       class_map: Mapping[str, int] | None = None
                       ) -> tuple[np.ndarray, dict[int, str | None]]:
    """Rasterise imported polygons into an int32 label image of ``shape`` (the label grid at
    ``downsample``: full-resolution coordinates are divided by it).

    A pixel belongs to a polygon when its centre is inside (holes excluded), so exact pixel-edge
    polygons from :func:`labels_to_features` give back exactly their pixels. Later features
    overwrite earlier ones where they overlap.

    Without ``class_map`` every feature gets its own id 1..N in order (an instance image) and
    ``classes`` maps id -> class name. With ``class_map`` {class name: value > 0} the image is
    semantic: features are painted with their class's value, features of other classes are
    left out, and ``classes`` maps value -> class name.
    """
    return run_to_end(iter_features_to_labels(result_or_features, shape, downsample=downsample,
                                              class_map=class_map))


def _span(features: Sequence[ImportedFeature]) -> tuple[tuple[float, float, float, float], str]:
    minx, miny, maxx, maxy = (float(v) for v in shapely.total_bounds([f.geometry for f in features]))
    return (minx, miny, maxx, maxy), f"x {minx:.6g}..{maxx:.6g}, y {miny:.6g}..{maxy:.6g}"


def raster_window(features: Sequence[ImportedFeature], image_shape: tuple[int, int] | None = None,
                  max_pixels: int = MAX_RASTER_PIXELS) -> tuple[int, int, int, int]:
    """(y, x, h, w): the full-resolution pixels covering ``features`` (clipped to the image of
    ``image_shape`` when given, to x, y >= 0 otherwise), for a label raster of just the objects.
    :class:`DataError` when there are none, when none of them lies inside, or when the raster
    would exceed ``max_pixels``."""
    if not features:
        raise DataError("no polygon objects to draw")
    (minx, miny, maxx, maxy), span = _span(features)
    y0, x0 = max(0, math.floor(miny)), max(0, math.floor(minx))
    y1, x1 = math.ceil(maxy), math.ceil(maxx)
    where = "the image area (x, y >= 0)"
    if image_shape is not None:
        y1, x1 = min(y1, int(image_shape[0])), min(x1, int(image_shape[1]))
        where = f"the {int(image_shape[1])}x{int(image_shape[0])} image"
    h, w = y1 - y0, x1 - x0
    if h <= 0 or w <= 0:
        raise DataError(f"none of the {len(features)} objects lies inside {where}: they span {span}")
    if h * w > max_pixels:
        raise DataError(f"the {len(features)} objects span {w}x{h} pixels ({span}), more than the "
                        f"{max_pixels / 1e6:g} Mpx a label raster may have; import them as Shapes, "
                        "or check their coordinates")
    return y0, x0, h, w


class FeatureRaster:
    """A lazy (height, width) int32 label image of imported features (feature i gets id i + 1,
    later features over earlier ones, pixel-centre rule): any window, with any step, is drawn
    when it is read (``raster[r0:r1:step, c0:c1:step]``), only from the features that reach it.
    ``raster[::f, ::f]`` equals the full image strided by ``f`` without drawing it, so a label
    TIFF pyramid of a whole slide (:func:`~.tiff.write_label_tiff`) costs a tile of memory."""

    def __init__(self, result_or_features: ImportResult | Iterable[ImportedFeature], shape: tuple[int, int]):
        self.features = _feature_list(result_or_features)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(np.int32)
        self.ndim = 2
        self._tree = shapely.STRtree([f.geometry for f in self.features])
        self._rings: dict[int, list[np.ndarray]] = {}

    def _shape(self, i: int, r0: int, c0: int, sy: int, sx: int) -> list[np.ndarray]:
        """Feature ``i``'s rings in the pixel units of a window whose pixel (j, k) is image pixel
        (r0 + j*sy, c0 + k*sx): mapped so that pixel centres land on the window's centres."""
        if i not in self._rings:
            self._rings[i] = _rings(self.features[i])
        return [np.column_stack(((r[:, 0] - c0 - 0.5) / sx + 0.5, (r[:, 1] - r0 - 0.5) / sy + 0.5))
                for r in self._rings[i]]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            raise TypeError("FeatureRaster is read by two slices: raster[r0:r1:step, c0:c1:step]")
        rows, cols = (range(*k.indices(n)) for k, n in zip(key, self.shape))
        if rows.step <= 0 or cols.step <= 0:
            raise ValueError("FeatureRaster steps must be positive")
        out = np.zeros((len(rows), len(cols)), np.int32)
        if out.size == 0:
            return out
        box = shapely.box(cols.start, rows.start, cols[-1] + 1, rows[-1] + 1)
        hits = np.sort(self._tree.query(box))
        _paint(out, [self._shape(int(i), rows.start, cols.start, rows.step, cols.step) for i in hits], hits + 1)
        return out

    def __array__(self, dtype=None, copy=None):
        full = self[0:self.shape[0], 0:self.shape[1]]
        return full if dtype is None else full.astype(dtype)


# --------------------------------------------------------------------------- napari shapes

def features_to_shapes(result_or_features: ImportResult | Iterable[ImportedFeature]
                       ) -> tuple[list[np.ndarray], dict[str, list]]:
    """Polygon data for a napari Shapes layer: a list of (N, 2) arrays in napari's (row, col)
    = (y, x) order, full-resolution pixels, without the repeated closing vertex.

    Each part of a MultiPolygon becomes its own shape with the feature's properties repeated.
    Holes are dropped: napari polygons have no interior rings (use :func:`features_to_labels`
    for a faithful raster). ``properties`` holds per-shape lists ``class_name`` (``""`` when
    unclassified), ``object_type`` (``""`` when absent) and ``feature_id`` (``""`` when absent).
    """
    data: list[np.ndarray] = []
    props: dict[str, list] = {"class_name": [], "object_type": [], "feature_id": []}
    for feature in _feature_list(result_or_features):
        for part in _polygon_parts(feature.geometry):
            data.append(shapely.get_coordinates(part.exterior)[:-1, ::-1].copy())
            props["class_name"].append(feature.class_name or "")
            props["object_type"].append(feature.object_type or "")
            props["feature_id"].append(feature.feature_id or "")
    return data, props
