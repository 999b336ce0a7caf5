"""Every object of a 2-D label array larger than memory (zarr, dask, numpy), read in groups: one pass
over ``chunk`` x ``chunk`` blocks finds each id's bounding box over the whole array (boxes of an id
seen in several blocks merged), and objects are grouped by the block holding the top-left corner of
their box, so each group's joint window (at most a block plus the largest object) is read once.
The GeoJSON export (:mod:`.geojson_export`) and the whole-slide measurements
(:func:`.measurements.measure_label_array`) read objects this way."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

# Blocks whose largest id is at most this are indexed with ndimage.find_objects directly (a
# list as long as the largest id); above it ids are first compacted with np.unique (a sort).
_DIRECT_MAX_LABEL = 1 << 20


def _block_boxes(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids > 0 present in ``block`` and their boxes (k, 4) = (row0, col0, row1, col1)."""
    top = int(block.max(initial=0))
    if top == 0:
        return np.empty(0, np.int64), np.empty((0, 4), np.int64)
    if int(block.min()) < 0:
        raise ValueError("label images must not contain negative ids")
    if top <= _DIRECT_MAX_LABEL:
        found = ndimage.find_objects(block)
        pairs = [(i + 1, s) for i, s in enumerate(found) if s is not None]
        ids = np.array([p[0] for p in pairs], dtype=np.int64)
    else:
        uniq, inverse = np.unique(block, return_inverse=True)
        compact = inverse.reshape(block.shape)
        if uniq[0] != 0:
            compact = compact + 1
            uniq = np.concatenate([[0], uniq])
        pairs = list(enumerate(ndimage.find_objects(compact), start=1))
        ids = uniq[[p[0] for p in pairs]].astype(np.int64)
    boxes = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for _, s in pairs],
                     dtype=np.int64)
    return ids, boxes


def _label_boxes(array: Any, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """One pass over ``chunk`` x ``chunk`` blocks: every id and its bounding box in the whole
    array (boxes of an id seen in several blocks are merged)."""
    height, width = array.shape
    all_ids, all_boxes = [], []
    for r in range(0, height, chunk):
        for c in range(0, width, chunk):
            ids, boxes = _block_boxes(np.asarray(array[r:r + chunk, c:c + chunk]))
            all_ids.append(ids)
            all_boxes.append(boxes + np.array([r, c, r, c]))
    ids = np.concatenate(all_ids)
    boxes = np.concatenate(all_boxes)
    order = np.argsort(ids, kind="stable")
    ids, boxes = ids[order], boxes[order]
    if ids.size == 0:
        return ids, boxes
    starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
    merged = np.concatenate([np.minimum.reduceat(boxes[:, :2], starts, axis=0),
                             np.maximum.reduceat(boxes[:, 2:], starts, axis=0)], axis=1)
    return ids[starts], merged


@dataclass(frozen=True)
class ObjectGroup:
    """Objects ``ids`` (ascending) with their ``boxes`` (k, 4) = (row0, col0, row1, col1) in the
    whole array, and the ``window`` (row0, col0, row1, col1) holding all of them."""

    ids: np.ndarray
    boxes: np.ndarray
    window: tuple[int, int, int, int]


def object_groups(array: Any, chunk: int) -> list[ObjectGroup]:
    """The groups of objects of ``array`` (module docstring), every id > 0 in exactly one, in
    raster order of their blocks; reading a group's window is left to the caller."""
    ids, boxes = _label_boxes(array, chunk)
    if ids.size == 0:
        return []
    n_col_blocks = -(-array.shape[1] // chunk)
    owner = (boxes[:, 0] // chunk) * n_col_blocks + boxes[:, 1] // chunk
    order = np.lexsort((ids, owner))
    ids, boxes, owner = ids[order], boxes[order], owner[order]
    bounds = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1], [True]]))
    groups = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        g_ids, g_boxes = ids[start:stop], boxes[start:stop]
        r0, c0 = g_boxes[:, :2].min(axis=0)
        r1, c1 = g_boxes[:, 2:].max(axis=0)
        groups.append(ObjectGroup(g_ids, g_boxes, (int(r0), int(c0), int(r1), int(c1))))
    return groups
