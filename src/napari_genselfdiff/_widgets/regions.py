"""Counts per drawn region (issue 35 item 5): a pathologist draws rectangles, ellipses or polygons
on a Shapes layer over a result and asks how many objects lie in each, how dense they are (per mm^2
when the pixel size is known) and what fraction of the region they cover
(:func:`..formats.measurements.region_summary`, an object counted where its centroid is). The
numbers go onto the shapes themselves (the Shapes layer's ``features``, shown as text on each
shape) and into the status line; ``Save measurements`` saves the per-object table.

Shapes are placed on the labels' pixel grid through world coordinates, so a region drawn on the
slide's image counts a result predicted at another pyramid level correctly. A region whose
bounding box holds more than :data:`MAX_REGION_PIXELS` result pixels is refused in one line
(a whole slide's labels are read at full resolution for exact counts)."""
from __future__ import annotations

import numpy as np

from ..core.errors import DataError

#: The most result pixels a region's bounding box may hold (labels are read at full resolution).
MAX_REGION_PIXELS = 25_000_000
#: Shapes that enclose an area (paths and lines do not).
AREA_SHAPES = ("rectangle", "polygon", "ellipse")


def _in_labels(shapes, labels, vertices: np.ndarray) -> np.ndarray:
    """``vertices`` (N, 2) of ``shapes``' data as (row, col) pixels of ``labels``' data."""
    return np.array([labels.world_to_data(shapes.data_to_world(v))[-2:] for v in np.asarray(vertices)], float)


def region_mask(shapes, labels, index: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Shape ``index`` of ``shapes`` rasterised on ``labels``' pixel grid: (the bounding box's
    slices into the labels, the mask inside it). Pixel (r, c) is inside when its centre is."""
    from skimage.draw import ellipse, polygon

    kind = shapes.shape_type[index]
    if kind not in AREA_SHAPES:
        raise DataError(f"shape {index + 1} of '{shapes.name}' is a {kind}, not a region: draw a rectangle, "
                        "ellipse or polygon")
    pts = _in_labels(shapes, labels, shapes.data[index])
    h, w = (int(n) for n in labels.level_shapes[0][-2:]) if labels.multiscale else labels.data.shape[-2:]
    r0, c0 = (int(max(np.floor(v), 0)) for v in pts.min(axis=0))
    r1, c1 = int(min(np.ceil(pts[:, 0].max()) + 1, h)), int(min(np.ceil(pts[:, 1].max()) + 1, w))
    if r1 <= r0 or c1 <= c0:
        raise DataError(f"shape {index + 1} of '{shapes.name}' lies outside the result '{labels.name}'")
    if (r1 - r0) * (c1 - c0) > MAX_REGION_PIXELS:
        raise DataError(f"shape {index + 1} of '{shapes.name}' spans {(r1 - r0) * (c1 - c0) / 1e6:.0f} Mpx of the "
                        f"result (at most {MAX_REGION_PIXELS / 1e6:.0f}): draw smaller regions")
    mask = np.zeros((r1 - r0, c1 - c0), bool)
    local = pts - (r0, c0)
    if kind == "ellipse":  # its data: the four corners of its box
        centre, radius = local.mean(axis=0), (local.max(axis=0) - local.min(axis=0)) / 2
        rr, cc = ellipse(*centre, *np.maximum(radius, 0.5), shape=mask.shape)
    else:
        rr, cc = polygon(local[:, 0], local[:, 1], shape=mask.shape)
    mask[rr, cc] = True
    return (slice(r0, r1), slice(c0, c1)), mask


def labels_mpp(labels) -> float | None:
    """Microns per pixel of a result layer's grid: the slide's pixel size times the level's downsample
    (both in its metadata), None when the slide states none."""
    meta = (labels.metadata or {}).get("genselfdiff") or {}
    mpp = meta.get("mpp")
    return float(mpp) * float(meta.get("downsample", 1.0)) if mpp else None


def count_regions(shapes, labels) -> list[dict]:
    """One row per shape of ``shapes``: its number (1-based), the objects of ``labels`` whose centroid
    lies in it, their density and the area fraction (:func:`..formats.measurements.region_summary`)."""
    from ..formats.measurements import region_summary

    if len(shapes.data) == 0:
        raise DataError(f"'{shapes.name}' has no shapes: draw a region over the result first")
    mpp = labels_mpp(labels)
    rows = []
    for i in range(len(shapes.data)):
        (rs, cs), mask = region_mask(shapes, labels, i)
        data = labels.data[0] if labels.multiscale else labels.data
        part = np.asarray(data[..., rs, cs]).reshape(mask.shape)
        inside = np.where(mask, part, 0)  # objects cut by the region's edge: counted by their centroid there
        rows.append({"region": i + 1, **region_summary(inside, mask, mpp)})
    return rows


def describe(rows: list[dict]) -> str:
    """The rows in a short line: '#1 312 · 1,486/mm² · 34%  #2 …' (objects, density, area covered)."""
    parts = []
    for r in rows:
        per = (f"{r['objects per mm^2']:,.0f}/mm²" if "objects per mm^2" in r else f"{r['objects per Mpx']:,.0f}/Mpx")
        parts.append(f"#{r['region']} {r['objects']} · {per} · {100 * r['area fraction']:.0f}%")
    return "  ".join(parts)


def pick_layers(viewer, fallback_labels=None):
    """(the Shapes layer to count in, the Labels layer to count): the selected ones first; else the
    only Shapes layer of the viewer, and ``fallback_labels`` (the last result) or the topmost result
    layer of ours. A DataError saying what to do when either is missing."""
    from napari.layers import Labels, Shapes

    selected = list(viewer.layers.selection)
    shapes = [ly for ly in selected if isinstance(ly, Shapes)] or \
        [ly for ly in viewer.layers if isinstance(ly, Shapes) and ly.name != "suggested region"]
    ours = [ly for ly in reversed(viewer.layers) if isinstance(ly, Labels) and "genselfdiff" in (ly.metadata or {})]
    labels = [ly for ly in selected if isinstance(ly, Labels)] or \
        ([fallback_labels] if fallback_labels is not None and fallback_labels in viewer.layers else ours[:1])
    if not labels:
        raise DataError("no result to count: predict first (or select a Labels layer)")
    if len(shapes) != 1:
        raise DataError("draw the regions on a Shapes layer first (Layers > New Shapes layer, then a rectangle, "
                        "ellipse or polygon)" if not shapes else
                        f"{len(shapes)} Shapes layers: select the one holding the regions")
    return shapes[0], labels[0]


def show_counts(shapes, rows: list[dict]) -> None:
    """The counts as the shapes' features, written on each shape (number, objects, density)."""
    shapes.features = {k: [r.get(k) for r in rows] for k in rows[0]}
    per, unit = ("objects per mm^2", "/mm²") if "objects per mm^2" in rows[0] else ("objects per Mpx", "/Mpx")
    shapes.text = {"string": "#{region}: {objects} · {" + per + ":,.0f}" + unit, "size": 11, "color": "black",
                   "anchor": "upper_left", "translation": [-4, 0]}
