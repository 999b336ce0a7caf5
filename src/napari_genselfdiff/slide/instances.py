"""Instances (glands, nuclei) from class probabilities, block by block.

The one-piece functions (a tile, a field of view held in memory) are in
:mod:`napari_genselfdiff.core.eval.postprocess`. The blockwise versions here
label arrays far larger than memory (zarr, dask, numpy: anything 2-D that can be sliced) into
an int32 output array, block by block, and stitch objects across block borders so that an
object crossing a border keeps ONE id and is never cut:

* glands (connected components, optional hole filling, size filter) are stitched exactly: each
  block is labelled with ids unique over the slide (foreground ids positive, background ids
  negative), the rows and columns on both sides of every block border give the equivalences
  (8-connected foreground, 4-connected background, 4-adjacent foreground/background), and a
  union-find (sparse connected components) resolves objects, holes (background components not
  reaching the image border) and global object sizes; a second pass rewrites every block
  through the resulting lookup table. The result equals the one-piece labelling up to a
  permutation of ids.
* nuclei (marker-controlled watershed) are computed per block on the block plus a ``halo``;
  only objects whose centroid lies in the block core are written, so none is duplicated, and
  none is cut as long as ``halo`` exceeds the size of a nucleus (or of a clump of touching
  nuclei). Objects that still touch the halo's edge are counted as ``truncated``.

Blockwise functions are generators yielding ``(blocks_done, blocks_total)`` after each step and
returning :class:`StitchStats`, so a progress bar (or ``predict_slide``) can drive them; the
``*_blockwise`` wrappers just run them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator, Mapping

import numpy as np
from scipy import ndimage as ndi

from napari_genselfdiff.core.allocator import large_arrays_mapped
from napari_genselfdiff.core.errors import GenSelfDiffError
# the one-piece rules each block is labelled by (glands_from_probabilities is the reference
# the blockwise result equals; benchmarks/tiler.py reads it from here)
from napari_genselfdiff.core.eval.postprocess import glands_from_probabilities  # noqa: F401
from napari_genselfdiff.core.eval.postprocess import (EIGHT, FOUR, GLAND_GROW, GLAND_MIN_SIZE, GLAND_PLAIN,
                                                      NUCLEUS_MIN_SIZE, as_float, grow_labels,
                                                      nuclei_from_probabilities)
from napari_genselfdiff.core.progress import relay, run_to_end
from napari_genselfdiff.slide.rescale import LevelScale

Steps = Generator[tuple[int, int], None, "StitchStats"]


#: The largest block a slide's instances are labelled in. A nuclei block's arrays peak at about 70
#: bytes a pixel with its halo, and the labelling runs beside the prediction (:mod:`.labeller`): on
#: the 16k slide's 2,336-px prediction blocks, labelling 2x2 blocks of them took 522 MB in 2,336-px
#: blocks, 378 MB in 1,168 and 272 MB in 779-px ones, for 13.0 / 12.7 / 13.7 s (benchmarks/RESULTS.md,
#: session 22).
LABEL_BLOCK_MAX = 1024


def label_block(store_block: int) -> int:
    """The block a store of ``store_block``-pixel blocks is labelled in: the store's block cut
    into equal parts of at most :data:`LABEL_BLOCK_MAX` pixels."""
    return -(-store_block // -(-store_block // LABEL_BLOCK_MAX))


@dataclass(frozen=True)
class StitchStats:
    """Result of a blockwise labelling: object ``count``; for nuclei, ``truncated`` objects
    touching the edge of their block's halo (halo too small) and ``conflicts`` (pixels two
    blocks claimed for different objects; the first one kept them)."""

    count: int
    truncated: int = 0
    conflicts: int = 0


# --------------------------------------------------------------------------------------------
# blockwise: glands, exact stitching


def _block_regions(h: int, w: int, block: int) -> list[tuple[int, int, int, int, int, int]]:
    """(row, col, y0, y1, x0, x1) of every block, raster order."""
    return [(r, c, y0, min(y0 + block, h), x0, min(x0 + block, w))
            for r, y0 in enumerate(range(0, h, block)) for c, x0 in enumerate(range(0, w, block))]


def _mixed_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(fg id, bg id) pairs of 4-adjacent pixels a/b where one is foreground (> 0) and the
    other background (< 0); bg ids returned positive."""
    m1 = (a > 0) & (b < 0)
    m2 = (a < 0) & (b > 0)
    return np.concatenate([np.stack([a[m1], -b[m1]], 1), np.stack([b[m2], -a[m2]], 1)])


def _line_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Equivalences across a border between the adjacent lines ``a`` and ``b`` (same length):
    fg-fg pairs (4- and diagonal neighbours) and bg-bg pairs (4-neighbours, ids positive)."""
    cand = [(a, b), (a[:-1], b[1:]), (a[1:], b[:-1])]
    ff = np.concatenate([np.stack([u[(u > 0) & (v > 0)], v[(u > 0) & (v > 0)]], 1) for u, v in cand])
    bb_m = (a < 0) & (b < 0)
    bb = np.stack([-a[bb_m], -b[bb_m]], 1)
    return ff, bb


def _components(n: int, pairs: list[np.ndarray]) -> np.ndarray:
    """Connected-component index of each of ``n`` nodes given edge arrays (k, 2)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def iter_glands_blockwise(prob_fg: Any, out: Any, *, block: int, threshold: float = 0.5,
                          min_size: int = GLAND_MIN_SIZE, fill_holes: bool = True) -> Steps:
    """Blockwise :func:`glands_from_probabilities` of ``prob_fg`` (2-D, sliceable) into ``out``
    (int32, same shape, e.g. a zarr array), exactly stitched. Memory: one block plus the
    border lines and per-object tables. Yields (steps done, steps total); two passes."""
    h, w = prob_fg.shape
    regions = _block_regions(h, w, block)
    total = 2 * len(regions)
    fg_counts, bg_counts, touch, mixed = [], [], [], []
    rows: dict[int, np.ndarray] = {}
    cols: dict[int, np.ndarray] = {}
    nf = nb = 0
    for step, (_, _, y0, y1, x0, x1) in enumerate(regions, 1):
        fg = as_float(prob_fg[y0:y1, x0:x1]) >= threshold
        flab, n = ndi.label(fg, structure=EIGHT)
        prov = np.where(fg, flab + nf, 0).astype(np.int32)
        fg_counts.append(np.bincount(flab.ravel(), minlength=n + 1)[1:])
        nf += n
        if fill_holes:
            blab, m = ndi.label(~fg, structure=FOUR)
            prov -= np.where(fg, 0, blab + nb).astype(np.int32)
            bg_counts.append(np.bincount(blab.ravel(), minlength=m + 1)[1:])
            edges = [e for e, at_border in ((prov[0], y0 == 0), (prov[-1], y1 == h),
                                            (prov[:, 0], x0 == 0), (prov[:, -1], x1 == w))
                     if at_border]
            if edges:
                e = np.concatenate(edges)
                touch.append(-e[e < 0])
            # fg/bg contacts from left-right neighbours suffice: the left neighbour of the
            # leftmost pixel of any fg component inside a hole, and of any hole, is the
            # enclosing bg / fg component, so every hole meets all it must be merged with
            mixed.append(_mixed_pairs(prov[:, :-1], prov[:, 1:]))
            nb += m
        out[y0:y1, x0:x1] = prov
        # keep the image rows / columns on both sides of every block border (full length)
        _put_line(rows, y0, prov[0], x0, x1, w)
        _put_line(rows, y1 - 1, prov[-1], x0, x1, w)
        _put_line(cols, x0, prov[:, 0], y0, y1, h)
        _put_line(cols, x1 - 1, prov[:, -1], y0, y1, h)
        yield step, total
    lut_fg, lut_bg, count = _resolve_glands(h, w, block, nf, nb, fg_counts, bg_counts, touch,
                                            mixed, rows, cols, min_size, fill_holes)
    for step, (_, _, y0, y1, x0, x1) in enumerate(regions, len(regions) + 1):
        prov = np.asarray(out[y0:y1, x0:x1])
        final = np.where(prov > 0, lut_fg[np.maximum(prov, 0)], lut_bg[np.maximum(-prov, 0)])
        out[y0:y1, x0:x1] = final.astype(np.int32)
        yield step, total
    return StitchStats(count)


def _put_line(store: dict[int, np.ndarray], index: int, values: np.ndarray, lo: int, hi: int,
              length: int) -> None:
    store.setdefault(index, np.zeros(length, np.int32))[lo:hi] = values


def _resolve_glands(h: int, w: int, block: int, nf: int, nb: int, fg_counts: list[np.ndarray],
                    bg_counts: list[np.ndarray], touch: list[np.ndarray],
                    mixed: list[np.ndarray], rows: dict[int, np.ndarray],
                    cols: dict[int, np.ndarray], min_size: int, fill_holes: bool
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """Union-find over provisional ids -> lookup tables (index = provisional id) and count.

    Nodes: fg id i -> i - 1, bg id j -> nf + j - 1.
    """
    if nf == 0:
        return np.zeros(1, np.int32), np.zeros(nb + 1, np.int32), 0
    ff, bb, fb = [], [], list(mixed)
    for border in range(block, h, block):
        f, b = _line_pairs(rows[border - 1], rows[border])
        ff.append(f), bb.append(b)
    for border in range(block, w, block):
        f, b = _line_pairs(cols[border - 1], cols[border])
        ff.append(f), bb.append(b)
        fb.append(_mixed_pairs(cols[border - 1], cols[border]))  # left-right contacts
    n = nf + nb
    base = [p - 1 for p in ff] + [p - 1 + nf for p in bb]
    sizes = np.concatenate(fg_counts + bg_counts).astype(np.int64) if n else np.zeros(0, np.int64)
    is_hole = np.zeros(nb, bool)
    if fill_holes and nb:
        comp1 = _components(n, base)
        outside = np.zeros(comp1.max() + 1, bool)
        if touch:
            outside[comp1[np.concatenate(touch).astype(np.int64) - 1 + nf]] = True
        is_hole = ~outside[comp1[nf:]]
        fb_all = np.concatenate(fb) if fb else np.zeros((0, 2), np.int64)
        fb_all = fb_all[is_hole[fb_all[:, 1] - 1]]
        base.append(np.stack([fb_all[:, 0] - 1, fb_all[:, 1] - 1 + nf], 1))
    comp = _components(n, base)
    ncomp = comp.max() + 1 if n else 0
    member = np.concatenate([np.ones(nf, bool), is_hole])
    comp_size = np.bincount(comp[member], weights=sizes[member], minlength=ncomp)
    has_fg = np.zeros(ncomp, bool)
    has_fg[comp[:nf]] = True
    keep = has_fg & (comp_size >= min_size)
    # number kept objects 1..N in order of their first provisional fg id (raster block order)
    first = np.full(ncomp, n, np.int64)
    np.minimum.at(first, comp[:nf], np.arange(nf))
    order = np.argsort(np.where(keep, first, n + 1), kind="stable")
    final = np.zeros(ncomp, np.int32)
    count = int(keep.sum())
    final[order[:count]] = np.arange(1, count + 1, dtype=np.int32)
    lut_fg = np.concatenate([[0], final[comp[:nf]]]).astype(np.int32)
    lut_bg = np.concatenate([[0], np.where(is_hole, final[comp[nf:]], 0)]).astype(np.int32)
    return lut_fg, lut_bg, count


def glands_blockwise(prob_fg: Any, out: Any, *, block: int, **kwargs: Any) -> StitchStats:
    """Run :func:`iter_glands_blockwise` (or, given ``prob_interior``,
    :func:`iter_contoured_glands_blockwise`) to the end."""
    interior = kwargs.pop("prob_interior", None)
    if interior is not None:
        return run_to_end(iter_contoured_glands_blockwise(prob_fg, interior, out, block=block, **kwargs))
    return run_to_end(iter_glands_blockwise(prob_fg, out, block=block, **kwargs))


class _Interior:
    """2-D view of the gland interiors' probability where the foreground is (0 elsewhere), the
    seeds of :func:`glands_from_probabilities` with a contour class."""

    def __init__(self, prob_fg: Any, prob_interior: Any, threshold: float) -> None:
        self.fg, self.interior, self.threshold = prob_fg, prob_interior, threshold
        self.shape = tuple(prob_fg.shape)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return np.where(as_float(self.fg[key]) >= self.threshold, as_float(self.interior[key]), 0.0)


def iter_contoured_glands_blockwise(prob_fg: Any, prob_interior: Any, out: Any, *, block: int,
                                    threshold: float = 0.5, min_size: int = GLAND_MIN_SIZE,
                                    fill_holes: bool = True, marker_threshold: float = 0.5,
                                    grow: int = GLAND_GROW) -> Steps:
    """Blockwise :func:`glands_from_probabilities` of a model with a contour class (``prob_fg``:
    gland + contour, ``prob_interior``: gland), exactly: the interiors are labelled and stitched
    like glands (:func:`iter_glands_blockwise`, two passes); a third pass grows them block by block
    with a halo of ``grow`` pixels (:func:`grow_labels` depends on nothing farther), writing the
    grown pixels negative so that a later block's halo sees only interiors, and counts each gland's
    size; a fourth drops the glands under ``min_size`` pixels and renumbers the rest 1..N."""
    h, w = prob_fg.shape
    regions = _block_regions(h, w, block)
    total = 4 * len(regions)
    seeds = iter_glands_blockwise(_Interior(prob_fg, prob_interior, threshold), out, block=block,
                                  threshold=marker_threshold, min_size=0, fill_holes=fill_holes)
    stats = yield from relay(seeds, lambda step: (step[0], total))
    sizes = np.zeros(stats.count + 1, np.int64)
    for step, (_, _, y0, y1, x0, x1) in enumerate(regions, 2 * len(regions) + 1):
        ry0, ry1, rx0, rx1 = max(y0 - grow, 0), min(y1 + grow, h), max(x0 - grow, 0), min(x1 + grow, w)
        window = np.maximum(np.asarray(out[ry0:ry1, rx0:rx1]), 0)  # grown pixels (< 0) are not seeds
        fg = as_float(prob_fg[ry0:ry1, rx0:rx1]) >= threshold
        grown = grow_labels(window, fg | (window > 0), grow)[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
        core = window[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
        sizes += np.bincount(grown.ravel(), minlength=stats.count + 1)
        out[y0:y1, x0:x1] = np.where(core > 0, core, -grown).astype(np.int32)
        yield step, total
    keep = sizes >= min_size
    keep[0] = False
    lut = np.zeros(stats.count + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    for step, (_, _, y0, y1, x0, x1) in enumerate(regions, 3 * len(regions) + 1):
        out[y0:y1, x0:x1] = lut[np.abs(np.asarray(out[y0:y1, x0:x1]))]
        yield step, total
    return StitchStats(int(keep.sum()))


# --------------------------------------------------------------------------------------------
# blockwise: nuclei, halo + centroid ownership


def iter_nuclei_blockwise(prob_fg: Any, out: Any, *, block: int, prob_boundary: Any | None = None,
                          distance: Any | None = None, halo: int = 64, threshold: float = 0.5,
                          min_size: int = NUCLEUS_MIN_SIZE, min_distance: int = 4,
                          marker_threshold: float = 0.5, split: float = 0.0, distance_h: float = 0.1) -> Steps:
    """Blockwise :func:`nuclei_from_probabilities` into ``out`` (int32, zero-initialised).

    Each block is segmented with ``halo`` pixels of context; objects whose centroid falls in
    the block core are written (into pixels still 0) with ids unique over the slide.
    Yields (blocks done, blocks total).
    """
    h, w = prob_fg.shape
    regions = _block_regions(h, w, block)
    next_id, truncated, conflicts = 0, 0, 0
    for step, (_, _, y0, y1, x0, x1) in enumerate(regions, 1):
        ry0, ry1 = max(y0 - halo, 0), min(y1 + halo, h)
        rx0, rx1 = max(x0 - halo, 0), min(x1 + halo, w)
        pb = None if prob_boundary is None else prob_boundary[ry0:ry1, rx0:rx1]
        pd = None if distance is None else distance[ry0:ry1, rx0:rx1]
        lab = nuclei_from_probabilities(prob_fg[ry0:ry1, rx0:rx1], pb, threshold=threshold,
                                        min_size=min_size, min_distance=min_distance,
                                        origin=(ry0, rx0), marker_threshold=marker_threshold, split=split,
                                        distance=pd, distance_h=distance_h)
        n = int(lab.max())
        if n:
            keep = _owned_by_core(lab, n, y0 - ry0, y1 - ry0, x0 - rx0, x1 - rx0)
            truncated += _count_truncated(lab, keep, (ry0 > 0, ry1 < h, rx0 > 0, rx1 < w))
            ids = np.zeros(n + 1, np.int32)
            ids[1:][keep] = np.arange(next_id + 1, next_id + 1 + int(keep.sum()), dtype=np.int32)
            next_id += int(keep.sum())
            new = ids[lab]
            existing = np.asarray(out[ry0:ry1, rx0:rx1])
            clash = (new > 0) & (existing > 0)
            conflicts += int(clash.sum())
            write = (new > 0) & ~clash
            if write.any():
                existing = existing.copy()
                existing[write] = new[write]
                out[ry0:ry1, rx0:rx1] = existing
        yield step, len(regions)
    return StitchStats(next_id, truncated, conflicts)


def _owned_by_core(lab: np.ndarray, n: int, cy0: int, cy1: int, cx0: int, cx1: int) -> np.ndarray:
    """Which of objects 1..n have their centroid (floored) inside the core rectangle."""
    yy, xx = np.nonzero(lab)
    ids = lab[yy, xx]
    cnt = np.bincount(ids, minlength=n + 1)[1:].astype(np.float64)
    cy = np.floor(np.bincount(ids, yy, minlength=n + 1)[1:] / np.maximum(cnt, 1))
    cx = np.floor(np.bincount(ids, xx, minlength=n + 1)[1:] / np.maximum(cnt, 1))
    return (cnt > 0) & (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)


def _count_truncated(lab: np.ndarray, keep: np.ndarray, inner: tuple[bool, bool, bool, bool]) -> int:
    """Kept objects touching an edge of the window that is not the image border."""
    edges = [e for e, is_inner in zip((lab[0], lab[-1], lab[:, 0], lab[:, -1]), inner) if is_inner]
    if not edges:
        return 0
    touching = np.unique(np.concatenate(edges))
    touching = touching[touching > 0]
    return int(keep[touching - 1].sum())


def nuclei_blockwise(prob_fg: Any, out: Any, *, block: int, **kwargs: Any) -> StitchStats:
    """Run :func:`iter_nuclei_blockwise` to the end."""
    return run_to_end(iter_nuclei_blockwise(prob_fg, out, block=block, **kwargs))


# --------------------------------------------------------------------------------------------
# pyramid and checks


def write_label_pyramid(group: Any, *, block: int, min_size: int = 256) -> int:
    """Add nearest-neighbour levels '1', '2', ... below the int32 array '0' of a zarr group
    (each level takes every second pixel of the one above), block by block, until the short
    side would fall under ``min_size``. Returns the number of levels including '0'."""
    k = 0
    src = group["0"]
    while min(src.shape) // 2 >= min_size:
        h, w = (-(-s // 2) for s in src.shape)
        dst = group.create_array(str(k + 1), shape=(h, w), chunks=(min(block, h), min(block, w)),
                                 dtype="int32", fill_value=0, dimension_names=("y", "x"),
                                 overwrite=True)
        for _, _, y0, y1, x0, x1 in _block_regions(h, w, block):
            dst[y0:y1, x0:x1] = np.asarray(src[2 * y0:2 * y1, 2 * x0:2 * x1])[::2, ::2]
        src, k = dst, k + 1
    return k + 1


@dataclass(frozen=True)
class PartitionReport:
    """How two label images differ as partitions: ``cut`` reference objects whose pixels got
    more than one label (background counts as a label), ``merged`` objects whose pixels span
    more than one reference label. Both 0 <=> same objects up to a permutation of ids."""

    n_reference: int
    n_labels: int
    cut: int
    merged: int

    @property
    def identical(self) -> bool:
        return self.cut == 0 and self.merged == 0


def compare_partitions(reference: np.ndarray, labels: np.ndarray) -> PartitionReport:
    """Compare two in-memory label images (same shape) object by object."""
    ref, lab = np.asarray(reference).ravel(), np.asarray(labels).ravel()
    sel = (ref > 0) | (lab > 0)
    pairs = np.unique(np.stack([ref[sel], lab[sel]], 1).astype(np.int64), axis=0)
    ref_ids, ref_n = np.unique(pairs[:, 0], return_counts=True)
    lab_ids, lab_n = np.unique(pairs[:, 1], return_counts=True)
    return PartitionReport(n_reference=int(len(np.unique(ref[ref > 0]))),
                           n_labels=int(len(np.unique(lab[lab > 0]))),
                           cut=int(((ref_n > 1) & (ref_ids > 0)).sum()),
                           merged=int(((lab_n > 1) & (lab_ids > 0)).sum()))


# --------------------------------------------------------------------------------------------
# a prediction store's probabilities -> its instance labels


class _ChannelView:
    """2-D view ``arr[channel]`` of a (C, H, W) uint8 zarr array, read region by region."""

    def __init__(self, arr: Any, channel: int) -> None:
        self.arr, self.channel = arr, channel
        self.shape = tuple(arr.shape[1:])
        self.dtype = arr.dtype

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return np.asarray(self.arr[(self.channel,) + tuple(key)])


class _ChannelSum(_ChannelView):
    """2-D view of the sum of some channels of a (C, H, W) uint8 zarr array, as floats (0..1)."""

    def __init__(self, arr: Any, channels: tuple[int, ...]) -> None:
        super().__init__(arr, channels[0])
        self.channels = channels

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return sum(as_float(self.arr[(c,) + tuple(key)]) for c in self.channels)


def label_store(store: Any, kind: str, *, block: int | None = None, min_size: int | None = None,
                options: Mapping[str, Any] | None = None,
                parent: str = "labels", probabilities: Any | None = None
                ) -> Generator[tuple[int, int], None, StitchStats | None]:
    """Label instances ('glands' or 'nuclei') of a
    :class:`~napari_genselfdiff.slide.store.PredictionStore` from its class-1 probabilities (and
    class 2 as the nucleus boundary or the gland contour of 3-class models, the channel after the
    classes as the nucleus distance map of models that have one) into ``labels/<kind>``, with a
    pyramid.
    Yields (steps done, steps total) like the blockwise functions; returns their stats, or None
    when the store already holds complete labels of ``kind``. ``block``: the labelling's blocks
    (and the labels' chunks); by default the store's prediction blocks cut by :func:`label_block`,
    whoever labels (the tiler, the labelling child, a Dask worker, a relabelling). ``parent``:
    another group to write them into (always written; :mod:`.relabel` swaps them in when
    complete). ``probabilities``:
    what to read them from instead of the store's own array, with its shape and slicing (the
    labelling alongside prediction reads through a view that waits for each block, :mod:`.labeller`)."""
    probs = store.probabilities if probabilities is None else probabilities
    if block is None:
        block = label_block(int(store.probabilities.chunks[-1]))  # the store's prediction blocks
    nc = int(probs.shape[0])
    if nc < 2:
        raise GenSelfDiffError(f"postprocess '{kind}' needs a model with >= 2 classes, got {nc}")
    if parent == "labels" and store.labels_complete(kind):
        return None
    lab_group, lab0 = store.create_labels(kind, block, parent)
    fg = _ChannelView(probs, 1)
    opts = dict(options or {})
    if min_size is not None:
        opts["min_size"] = min_size
    recorded = dict(opts)  # as given: in the model's pixels
    # a level predicted at another um/px than the model's (slide/rescale.py): its options in the level's pixels
    opts = LevelScale(float(store.settings.get("resample", 1.0))).level_options(opts)
    classes = len(store.class_names) or nc
    if kind == "glands" and classes == 3:  # background, gland, contour
        gen = iter_contoured_glands_blockwise(_ChannelSum(probs, (1, 2)), fg, lab0, block=block, **opts)
    elif kind == "glands":  # without a contour class: its options only (they are recorded with the labels)
        opts = {k: v for k, v in opts.items() if k in GLAND_PLAIN}
        recorded = {k: v for k, v in recorded.items() if k in GLAND_PLAIN}
        gen = iter_glands_blockwise(fg, lab0, block=block, **opts)
    else:
        boundary = _ChannelView(probs, 2) if classes >= 3 else None
        distance = _ChannelView(probs, classes) if nc > classes else None
        gen = iter_nuclei_blockwise(fg, lab0, prob_boundary=boundary, distance=distance, block=block, **opts)
    with large_arrays_mapped():  # a block's arrays go back when freed: no heap growth (core/allocator.py)
        stats = yield from gen
        n_levels = write_label_pyramid(lab_group, block=block)
    store.finish_labels(lab_group, kind, n_levels, count=stats.count, truncated=stats.truncated,
                        conflicts=stats.conflicts, options=recorded)
    return stats
