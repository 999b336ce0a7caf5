"""Pure geometry of layers on screen: where a layer's pixels lie in the world, which pixels the
camera shows, and how a result computed on a pyramid level is placed over its image.

Everything here takes plain values -- a layer's :class:`Grid` (scale and translate of its last
two axes), the camera's :class:`View`, shapes and arrays -- so it runs (and is tested) without a
viewer; the widgets read those values off their layers (``grid_of``, ``view_of``).

Conventions (napari's): world = translate + scale * data; pixel j of a layer covers data
coordinates [j - 0.5, j + 0.5]; a pixel of a level with downsample d covers level-0 pixels
d*j .. d*j + d - 1, so its centre sits at d*j + (d - 1)/2. Bounds are (y, x, h, w).

World units are microns when the slide's pixel size is known: its image layer has scale (mpp,
mpp) and units micrometre (:func:`slide_scale`, the one place that says so; napari's scale bar
then speaks microns), and every layer placed over it (:func:`placement`) carries the same units,
so they keep aligning. Without a known pixel size, world units are level-0 pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..core.errors import DataError
from ..slide.levels import region_at_mpp

Bounds = tuple[int, int, int, int]
#: (level, y, x, h, w): a region in pixels of one pyramid level.
Region = tuple[int, int, int, int, int]

#: Largest field of view (in pixels of the level shown) predicted in one go.
MAX_VIEW_PIXELS = 4096 * 4096


#: The unit of a slide's world coordinates when its pixel size is known (napari / pint spelling).
MICRONS = "um"
#: Microns per unit, for the length units a layer may come with (napari spells them in full).
_MICRONS_PER = {"micrometer": 1.0, "um": 1.0, "µm": 1.0, "micron": 1.0, "nanometer": 1e-3, "nm": 1e-3,
                "millimeter": 1e3, "mm": 1e3}


def slide_scale(mpp: float | None) -> dict:
    """The scale and units of a slide's level-0 image layer: (mpp, mpp) in micrometres when its
    pixel size is known, else nothing (napari's default: one world unit per pixel)."""
    if not mpp or mpp <= 0:
        return {}
    return {"scale": (float(mpp), float(mpp)), "units": (MICRONS, MICRONS)}


@dataclass(frozen=True)
class Grid:
    """Where a layer's pixel grid lies: world = translate + scale * data (last two axes), and the
    units of the world (None: napari's pixels)."""

    scale: tuple[float, float] = (1.0, 1.0)
    translate: tuple[float, float] = (0.0, 0.0)
    units: tuple[str, str] | None = None

    @property
    def s(self) -> np.ndarray:
        return np.asarray(self.scale, float)[-2:]

    @property
    def t(self) -> np.ndarray:
        return np.asarray(self.translate, float)[-2:]

    def to_data(self, world: Sequence[float]) -> np.ndarray:
        return (np.asarray(world, float)[-2:] - self.t) / self.s

    def to_world(self, data: Sequence[float]) -> np.ndarray:
        return self.t + self.s * np.asarray(data, float)[-2:]

    @property
    def mpp(self) -> float | None:
        """Microns per data pixel when the world is in a length unit (a slide in microns), else None."""
        per = _MICRONS_PER.get(str(self.units[-1])) if self.units else None
        return None if per is None else float(np.mean(np.abs(self.s))) * per


@dataclass(frozen=True)
class View:
    """What the camera shows: its centre (world y, x), zoom (screen pixels per world unit) and
    the canvas size (h, w) in screen pixels."""

    centre: tuple[float, float]
    zoom: float
    canvas: tuple[int, int]

    def data_extent(self, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi): the data coordinates of ``grid`` the canvas spans."""
        half = np.asarray(self.canvas, float)[-2:] / (2 * self.zoom)
        cy, cx = np.asarray(self.centre, float)[-2:]
        corners = [grid.to_data((cy + sy * half[0], cx + sx * half[1])) for sy in (-1, 1) for sx in (-1, 1)]
        return np.min(corners, axis=0), np.max(corners, axis=0)


def layer_downsamples(downsample_factors: Sequence[Sequence[float]] | None) -> list[float]:
    """How many level-0 pixels one pixel of each pyramid level spans, from napari's
    ``downsample_factors`` (None for a single-scale layer: ``[1.0]``)."""
    if downsample_factors is None:
        return [1.0]
    return [float(np.mean(f[-2:])) for f in np.asarray(downsample_factors)]


def visible_region(view: View, grid: Grid, level: int, downsample: float, level_shape: Sequence[int],
                   name: str = "image", max_pixels: int = MAX_VIEW_PIXELS) -> Region:
    """(level, y, x, h, w): the part of a layer on screen, in pixels of ``level`` (of
    ``downsample`` and ``level_shape``); a DataError when nothing, or too much, is in view."""
    lo, hi = view.data_extent(grid)
    d = float(downsample)
    y0, x0 = (max(0, math.floor(v / d)) for v in lo)
    y1, x1 = (min(int(s), math.ceil(v / d) + 1) for v, s in zip(hi, level_shape[:2], strict=True))
    if y1 <= y0 or x1 <= x0:
        raise DataError(f"layer {name!r} is not in view")
    if (y1 - y0) * (x1 - x0) > max_pixels:
        raise DataError(f"the view shows {(x1 - x0)}x{(y1 - y0)} pixels of {name!r}: zoom in, "
                        "or use 'Predict whole slide'")
    return level, y0, x0, y1 - y0, x1 - x0


def view_bounds(view: View, grid: Grid, shape: Sequence[int], cap: int, name: str = "image") -> Bounds:
    """(y, x, h, w) in level-0 pixels of an image of ``shape``: the pixels on screen, clamped to
    the image; a side longer than ``cap`` is cut to ``cap`` pixels centred on the camera.

    Pixel j covers data coordinates [j - 0.5, j + 0.5], so it is on screen when that interval
    meets the visible interval [lo, hi]: j from floor(lo + 0.5) to ceil(hi + 0.5) - 1.
    """
    lo, hi = view.data_extent(grid)
    centre = grid.to_data(view.centre)
    sides = []
    for a_data, b_data, c, size in zip(lo, hi, centre, shape[:2], strict=True):
        a, b = max(0, math.floor(a_data + 0.5)), min(int(size), math.ceil(b_data + 0.5))
        if b - a > cap:
            a = min(max(int(round(c - cap / 2)), 0), int(size) - cap)
            b = a + cap
        sides.append((a, b))
    (y0, y1), (x0, x1) = sides
    if y1 <= y0 or x1 <= x0:
        raise DataError(f"layer {name!r} is not in view: pan to the region to edit")
    return y0, x0, y1 - y0, x1 - x0


def at_model_level(region: Region, downsamples: Sequence[float], level_shapes: Sequence[Sequence[int]],
                   level0_mpp: float | None, model_mpp: float | None) -> Region:
    """The same view in pixels of the pyramid level closest to the model's microns per pixel
    (:func:`napari_genselfdiff.slide.levels.region_at_mpp`, the one rule)."""
    return region_at_mpp(region, downsamples, level_shapes, level0_mpp, model_mpp)


def placement(grid: Grid, downsample: float, y0: float = 0, x0: float = 0) -> dict:
    """scale/translate putting a result computed at ``downsample`` (offset y0, x0 in that level's
    pixels) over an image layer of ``grid``: a level pixel j covers level-0 pixels d*j .. d*j +
    d - 1, so its centre sits at d*j + (d - 1)/2. The image's units come along (microns stay
    microns), so napari keeps both layers in one world."""
    s, t, d = grid.s, grid.t, float(downsample)
    place = {"scale": tuple(s * d), "translate": tuple(t + s * (d * np.array([y0, x0]) + (d - 1) / 2))}
    return {**place, "units": tuple(grid.units)} if grid.units else place


def bounds_centre_world(grid: Grid, bounds: Bounds) -> tuple[float, float]:
    """World coordinates of the centre of a level-0 region of an image of ``grid``."""
    y, x, h, w = bounds
    return tuple(float(v) for v in grid.to_world((y + (h - 1) / 2, x + (w - 1) / 2)))


def world_in_bounds(grid: Grid, point: Sequence[float], bounds: Bounds) -> bool:
    """Whether the world ``point`` lies on a pixel of the level-0 region ``bounds``."""
    py, px = grid.to_data(point)
    y, x, h, w = bounds
    return y - 0.5 <= py < y + h - 0.5 and x - 0.5 <= px < x + w - 0.5


def zoom_to_fit(grid: Grid, bounds: Bounds, canvas: Sequence[int], margin: float = 0.9) -> float:
    """The camera zoom that shows the region ``bounds`` of an image of ``grid`` on ``canvas``
    (h, w), with a margin."""
    _, _, h, w = bounds
    sy, sx = np.abs(grid.s)
    ch, cw = canvas[-2:]
    return margin * min(ch / (h * sy), cw / (w * sx))


def sample_labels(labels: np.ndarray, labels_grid: Grid, image_grid: Grid, bounds: Bounds) -> np.ndarray | None:
    """The ids of the label array ``labels`` (placed by ``labels_grid``) under each level-0 pixel,
    in ``bounds``, of an image placed by ``image_grid`` (nearest label pixel; 0 where it has no
    data), or None when it does not reach the region. Works for any label grid, e.g. a
    prediction made on a coarser pyramid level (whose pixel centres sit at the centre of the
    level-0 pixels it spans). ``labels`` may be lazy: only the block needed is read."""
    y, x, h, w = bounds
    if labels.ndim != 2:
        return None
    idx, valid = _label_indices(labels.shape, labels_grid, image_grid, bounds)
    if not valid[0].any() or not valid[1].any():
        return None
    rows, cols = idx[0][valid[0]], idx[1][valid[1]]
    block = np.asarray(labels[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
    out = np.zeros((h, w), np.int32)
    out[np.ix_(valid[0], valid[1])] = block[np.ix_(rows - rows.min(), cols - cols.min())]
    return out


def covers(labels_shape: Sequence[int], labels_grid: Grid, image_grid: Grid, bounds: Bounds,
           regions: Sequence[Bounds] | None = None) -> bool:
    """Whether a 2-D label array of ``labels_shape`` (placed by ``labels_grid``) has a pixel under
    every level-0 pixel of ``bounds`` of an image placed by ``image_grid`` (the rule of
    :func:`sample_labels`). ``regions`` (boxes in pixels of the array), when given, are the parts
    of the array that hold a result (fields of view gathered in one layer): those pixels must
    also lie in one of them."""
    if len(labels_shape) != 2:
        return False
    idx, valid = _label_indices(labels_shape, labels_grid, image_grid, bounds)
    if not (valid[0].all() and valid[1].all()):
        return False
    if regions is None:
        return True
    rows, cols = np.unique(idx[0]), np.unique(idx[1])
    held = np.zeros((len(rows), len(cols)), bool)
    for ry, rx, rh, rw in regions:
        held[np.ix_((rows >= ry) & (rows < ry + rh), (cols >= rx) & (cols < rx + rw))] = True
    return bool(held.all())


def _label_indices(labels_shape: Sequence[int], labels_grid: Grid, image_grid: Grid,
                   bounds: Bounds) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per axis (rows, columns): the label pixel nearest each level-0 pixel of ``bounds``, and
    whether the label array has it."""
    y, x, h, w = bounds
    s_i, t_i, s_l, t_l = image_grid.s, image_grid.t, labels_grid.s, labels_grid.t
    idx = [np.floor((t_i[k] + s_i[k] * np.arange(start, start + n) - t_l[k]) / s_l[k] + 0.5).astype(np.int64)
           for k, (start, n) in enumerate(((y, h), (x, w)))]
    return idx, [(i >= 0) & (i < int(labels_shape[k])) for k, i in enumerate(idx)]


def label_grid_over(labels_grid: Grid, image_grid: Grid = Grid()) -> tuple[tuple[float, float], float]:
    """(offset, downsample) of a label layer's pixel grid in level-0 pixels of the image, for
    the GeoJSON export, from both layers' scale and translate: label pixel j is centred on image
    data coordinate c = (t_l - t_i)/s_i + d*j and spans the pixel edges c + 0.5 -/+ d/2. Without
    an image, world units are taken as level-0 pixels."""
    s_i, t_i, s_l, t_l = image_grid.s, image_grid.t, labels_grid.s, labels_grid.t
    d = float(np.mean(s_l / s_i))
    offset = ((t_l - t_i) / s_i + 0.5 - d / 2) / d
    return (float(offset[0]), float(offset[1])), d


def box_overlap(a: Sequence[int], b: Sequence[int]) -> int:
    """Pixels shared by two (y, x, h, w) boxes."""
    iy = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ix = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iy * ix


# ---------------------------------------------------------------------------------------------
# adapters: the plain values above, read off napari objects (attribute reads only, no napari import)

#: Layer metadata key of the pixel size a user gave for an image whose file does not say (µm/px, or
#: None: asked, not known); see :mod:`.pixelsize`.
GIVEN_MPP = "genselfdiff_mpp"


def stated_mpp(layer) -> float | None:
    """µm/px of an image layer as its file states it (``metadata["mpp"]``, or a layer in microns)."""
    return (layer.metadata or {}).get("mpp") or grid_of(layer).mpp or None


def known_mpp(layer) -> float | None:
    """µm/px of an image layer: its file's (:func:`stated_mpp`), else the one a user gave
    (:data:`GIVEN_MPP`), else None."""
    return stated_mpp(layer) or (layer.metadata or {}).get(GIVEN_MPP) or None


def grid_of(layer) -> Grid:
    """A layer's :class:`Grid` (its scale, translate and units; None for napari's pixels)."""
    units = tuple(str(u) for u in getattr(layer, "units", ())[-2:]) or None
    if units is not None and all(u == "pixel" for u in units):
        units = None
    return Grid(tuple(float(v) for v in layer.scale[-2:]), tuple(float(v) for v in layer.translate[-2:]), units)


def view_of(viewer) -> View:
    """The viewer's camera and canvas as a :class:`View`."""
    camera = camera_of(viewer)
    return View(tuple(float(v) for v in camera.center[-2:]), float(camera.zoom),
                tuple(int(v) for v in viewer.canvas.size))


def camera_of(viewer):
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera


def scale_bar_of(viewer):
    """The viewer's scale bar overlay (``viewer.canvas.overlays`` since napari 0.9)."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    return overlays.scale_bar if overlays is not None else viewer.scale_bar
