"""Fields of view gathered in one growing layer: each "Predict field of view" result is pasted
into a :class:`Canvas` covering every region predicted so far (the bounding box of them, at
the pyramid level the model runs on), so a user can move around and come back to what was
predicted. Pure numpy: the Predict widget shows a canvas's arrays as its layers.

A canvas is valid for one ``key`` (image, model, level); a result for another key starts a new
canvas. One that would grow past ``max_pixels`` (regions far apart) starts a new canvas too,
and the widget keeps the old one as its own layer. Object ids stay unique across regions (each
paste is numbered after the last); inside a new region the new result replaces the old.

An object the new region cuts (an earlier view's object reaching across the new region's border)
stays one object: the new object at that place, which touches the region's border and lies
mostly (:data:`CONTINUES`) on the earlier object, takes its id, as whole-slide blocks are joined
(:mod:`...slide.instances`). The probabilities are the same whatever the view (the tiles do not
depend on it), so the two parts are the same object seen twice.

A view comes with a margin (:func:`...slide.fov.with_margin`) where the objects its border cuts
are found whole; only the view and those objects are pasted as labels, so the margin never
erases what an earlier view found there, and an object found again keeps its id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np

from .geometry import MAX_VIEW_PIXELS, Bounds, box_overlap

#: Layer metadata key of a gathered layer: ``{"regions": [[y, x, h, w], ...]}`` in pixels of its array.
FOV_KEY = "genselfdiff_fov"
#: Largest canvas, in pixels of its level (two full views: a few hundred MB at most).
MAX_CANVAS_PIXELS = 2 * MAX_VIEW_PIXELS
#: The array holding instance labels (ids are renumbered when pasted); the others are pasted as they are.
LABELS = "labels"
#: A new object touching the region's border continues an earlier one cut there when at least this
#: fraction of its pixels lay on that object.
CONTINUES = 0.5


@dataclass
class Canvas:
    """Results of several regions of one level in one array each (``arrays``: name -> (H, W)
    array), whose pixel (0, 0) is pixel ``origin`` (y, x) of the level; ``regions`` are the
    predicted boxes in level pixels, ``count`` the largest object id used."""

    key: Hashable
    origin: tuple[int, int]
    arrays: dict[str, np.ndarray]
    regions: list[Bounds] = field(default_factory=list)
    count: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return next(iter(self.arrays.values())).shape[:2]

    @property
    def bounds(self) -> Bounds:
        return (*self.origin, *self.shape)

    def regions_in_array(self) -> list[list[int]]:
        """The predicted boxes in pixels of the canvas arrays (for the layer's metadata)."""
        oy, ox = self.origin
        return [[y - oy, x - ox, h, w] for y, x, h, w in self.regions]


def _union(a: Bounds, b: Bounds) -> Bounds:
    y0, x0 = min(a[0], b[0]), min(a[1], b[1])
    y1, x1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return y0, x0, y1 - y0, x1 - x0


def gather(canvas: Canvas | None, key: Hashable, bounds: Bounds, arrays: dict[str, np.ndarray],
           max_pixels: int | None = None, view: Bounds | None = None) -> tuple[Canvas, str]:
    """Paste the result of the region ``bounds`` (y, x, h, w in level pixels; ``arrays`` of
    shape (h, w)) into ``canvas``. Returns (canvas, what happened): 'grown' (the same canvas,
    possibly enlarged: its arrays may be new), 'new' (``canvas`` was None or for another key)
    or 'far' (the union would exceed ``max_pixels``, default ``MAX_CANVAS_PIXELS``: a new
    canvas; the old one is untouched).

    ``view`` (y, x, h, w in level pixels, inside ``bounds``): the view itself, ``bounds`` being it
    with a margin holding the whole of the objects its border cuts (:func:`...slide.fov.with_margin`).
    Then the labels claim only the view and their objects: the rest of the margin keeps what
    earlier views found there, and the view is the region recorded."""
    max_pixels = MAX_CANVAS_PIXELS if max_pixels is None else max_pixels
    y, x, h, w = (int(v) for v in bounds)
    for name, a in arrays.items():
        if a.shape[:2] != (h, w):
            raise ValueError(f"{name}: shape {a.shape[:2]} is not the region's {(h, w)}")
    if canvas is None or canvas.key != key or set(arrays) != set(canvas.arrays):
        outcome = "new"
    elif np.prod(_union(canvas.bounds, (y, x, h, w))[2:]) > max_pixels:
        outcome = "far"
    else:
        outcome = "grown"
    if outcome != "grown":
        canvas = Canvas(key, (y, x), {name: np.zeros_like(a) for name, a in arrays.items()})
    _grow(canvas, (y, x, h, w))
    oy, ox = y - canvas.origin[0], x - canvas.origin[1]
    claim = None
    if view is not None and LABELS in arrays:
        vy, vx, vh, vw = (int(v) for v in view)
        claim = arrays[LABELS] > 0
        claim[vy - y:vy - y + vh, vx - x:vx - x + vw] = True
    for name, a in arrays.items():
        part = a
        if name == LABELS:
            ids = np.arange(int(a.max(initial=0)) + 1, dtype=np.int64) + canvas.count
            ids[0] = 0
            for new_id, old_id in _continued(canvas.arrays[name], (oy, ox, h, w), a, claim).items():
                ids[new_id] = old_id
            part = ids[a].astype(canvas.arrays[name].dtype)
            canvas.count += int(a.max()) if a.size else 0
        if name == LABELS and claim is not None:
            canvas.arrays[name][oy:oy + h, ox:ox + w][claim] = part[claim]
        else:
            canvas.arrays[name][oy:oy + h, ox:ox + w] = part
    recorded = (y, x, h, w) if view is None else tuple(int(v) for v in view)
    inside = [r for r in canvas.regions if box_overlap(r, recorded) == r[2] * r[3]]
    canvas.regions = [r for r in canvas.regions if r not in inside] + [recorded]
    return canvas, outcome


def _continued(labels: np.ndarray, box: Bounds, new: np.ndarray, claim: np.ndarray | None = None) -> dict[int, int]:
    """{new id: earlier id} for the objects of ``new`` (the labels about to be pasted at ``box``,
    y, x, h, w in pixels of ``labels``) that continue an earlier object cut by the box's border:
    the new object touches the border, the earlier one reaches just outside it, and at least
    :data:`CONTINUES` of the new object's pixels lay on it. With ``claim`` (the pixels of the box
    the new labels cover, :func:`gather`'s ``view``: the new objects are whole) an earlier object
    under at least :data:`CONTINUES` of a new object's pixels, or whose part in the box lies that much
    under one (an object larger than both margins), is the same object found again. An
    earlier id goes to one new object at most (the one sharing the most pixels with it)."""
    y, x, h, w = box
    rows, cols = labels.shape[:2]
    old = labels[y:y + h, x:x + w].astype(np.int64)
    if not new.size:
        return {}
    if claim is None:
        ring = [labels[y - 1, x:x + w] if y > 0 else (), labels[y + h, x:x + w] if y + h < rows else (),
                labels[y:y + h, x - 1] if x > 0 else (), labels[y:y + h, x + w] if x + w < cols else ()]
        cut = np.unique(np.concatenate([np.asarray(r, np.int64) for r in ring]))
        edge = np.unique(np.concatenate([new[0], new[-1], new[:, 0], new[:, -1]]).astype(np.int64))
        both = np.isin(new, edge[edge > 0]) & np.isin(old, cut[cut > 0])
    else:
        both = (new > 0) & (old > 0)
    if not both.any():
        return {}
    pairs, counts = np.unique(np.stack([new[both].astype(np.int64), old[both]]), axis=1, return_counts=True)
    sizes = np.bincount(new.ravel().astype(np.int64))
    inside = np.bincount(old.ravel()) if claim is not None else None  # the earlier objects' pixels in the box
    best: dict[int, tuple[int, int]] = {}  # earlier id: (new id, pixels shared)
    for (n, o), c in zip(pairs.T.tolist(), counts.tolist()):
        # with a claim, also an earlier object whose part in the box lies mostly under a new one
        size = sizes[n] if inside is None else min(sizes[n], inside[o])
        if c >= CONTINUES * size and c > best.get(o, (0, 0))[1]:
            best[o] = (n, c)
    return {n: o for o, (n, _) in best.items()}


def _grow(canvas: Canvas, bounds: Bounds) -> None:
    """Enlarge ``canvas`` (new arrays, old content copied) to cover ``bounds`` too."""
    y0, x0, h, w = _union(canvas.bounds, bounds)
    if (y0, x0, h, w) == canvas.bounds:
        return
    dy, dx = canvas.origin[0] - y0, canvas.origin[1] - x0
    ch, cw = canvas.shape
    grown = {}
    for name, a in canvas.arrays.items():
        b = np.zeros((h, w) + a.shape[2:], a.dtype)
        b[dy:dy + ch, dx:dx + cw] = a
        grown[name] = b
    canvas.arrays, canvas.origin = grown, (y0, x0)


class GatheredViews:
    """The canvases of one Predict widget, by result layer name, and whether the layer showing
    each is still the one it was given (attribute reads on the viewer only, no napari import).

    :meth:`gather` pastes a view's arrays into the canvas of its layer name and returns it with
    a sentence for the status line; :meth:`shown` records the layer that now shows a canvas.
    """

    def __init__(self, viewer):
        self.viewer = viewer
        self._by_name: dict[str, tuple[Canvas, object]] = {}

    def current(self, name: str) -> Canvas | None:
        """The canvas of ``name`` while its layer still shows it (not removed, renamed or given
        other data by the user)."""
        canvas, layer = self._by_name.get(name, (None, None))
        if canvas is None or layer not in self.viewer.layers or layer.name != name \
                or layer.data is not canvas.arrays[LABELS]:
            return None
        return canvas

    def gather(self, name: str, key: Hashable, bounds: Bounds, arrays: dict[str, np.ndarray],
               companions: dict[str, str] | None = None, view: Bounds | None = None) -> tuple[Canvas, str, bool]:
        """Paste a view into the canvas of layer ``name``; returns (canvas, note, grown). A
        canvas far from the new view keeps its layers under new names (``name`` and the
        ``companions``: array name -> layer name, e.g. the probability layer) and the note says
        where."""
        old = self.current(name)
        canvas, outcome = gather(old, key, bounds, arrays, view=view)
        note = ""
        if outcome == "far":
            oy, ox = old.origin
            kept = f"{name} @ {oy},{ox}"
            for lname in [name] + list((companions or {}).values()):
                if lname in self.viewer.layers:
                    self.viewer.layers[lname].name = kept if lname == name else f"{lname} @ {oy},{ox}"
            note = f"; the earlier views, far from this one, are in layer '{kept}'"
        return canvas, note, outcome == "grown"

    def shown(self, name: str, canvas: Canvas, layer) -> None:
        self._by_name[name] = (canvas, layer)

    def forget(self, name: str) -> None:
        self._by_name.pop(name, None)
