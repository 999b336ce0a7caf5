"""A slide's label store (``labels/<slide id>.zarr``) and how accepted regions are written into it.

Object ids are unique per store. Each accepted region's objects are renumbered past every id the
store has handed out so far (its ``max_id`` attribute, reserved *before* the pixels are written,
so a crash in between leaves an unused gap, never a shared id): two regions never share an id,
and an export of the store gives one object per accepted object. A region's objects are its
distinct ids > 0; a region painted with a single id (a binary mask) counts its connected
components, the same rule as :func:`~.files.count_objects`. A region written over an area replaces
what was there (the old objects' pixels inside its bounds are overwritten; parts of them outside
keep their own ids). In a multiclass project the labels are class ids and are written unchanged.

The store is derived data: :meth:`~.store.Project.rebuild_labels_store` regenerates it from the
accepted regions in manifest order, with the same objects (ids may be numbered differently when
regions were replaced). A store written before ids were kept unique has no ``max_id``; it is
rebuilt on the next write-back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import DataError
from .files import STORE_CHUNK, resize_nearest

#: Store attribute: the highest object id handed out in this store.
MAX_ID = "max_id"
_INT32_MAX = int(np.iinfo(np.int32).max)


def create_store(path: Path, slide: dict):
    """A new, empty label store for ``slide`` at ``path`` (int32, level-0 shape, zarr v3),
    replacing one that is there (the store is derived from the accepted regions)."""
    import zarr
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = slide["shape"]
    return zarr.create_array(str(path), shape=(h, w), chunks=(STORE_CHUNK, STORE_CHUNK),
                             dtype="int32", fill_value=0, zarr_format=3, overwrite=True,
                             attributes={"slide": slide["id"], "source": str(slide["path"]), MAX_ID: 0})


def has_unique_ids(store) -> bool:
    """Whether ``store`` keeps object ids unique (written by this version)."""
    return MAX_ID in store.attrs


def renumber(labels: np.ndarray, offset: int) -> tuple[np.ndarray, int]:
    """(int32 labels whose objects are numbered ``offset + 1 .. offset + n``, n). Objects are
    distinct ids > 0, or connected components when a single id is used (a binary mask)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 1:
        from scipy import ndimage as ndi
        ranks, n = ndi.label(labels > 0)
    else:
        ranks, n = np.where(labels > 0, np.searchsorted(ids, labels) + 1, 0), len(ids)
    if offset + n > _INT32_MAX:
        raise DataError(f"the label store has run out of object ids ({offset} used, {n} more needed)")
    out = np.where(ranks > 0, ranks + offset, 0).astype(np.int32)
    return out, int(n)


def write_region(store, labels: np.ndarray, bounds: tuple[int, int, int, int], *, instances: bool) -> int:
    """Write ``labels`` into ``store`` at level-0 ``bounds`` (scaled up by nearest neighbour when
    coarser, clipped to the slide). With ``instances`` their objects get new ids unique in the
    store (see the module docstring); returns how many objects were written."""
    y, x, h, w = bounds
    if labels.shape != (h, w):
        labels = resize_nearest(labels, h, w)
    y1, x1 = min(y + h, store.shape[0]), min(x + w, store.shape[1])
    if y1 <= y or x1 <= x:
        return 0
    part = labels[:y1 - y, :x1 - x]
    if not instances:
        store[y:y1, x:x1] = part.astype(np.int32)
        return int(np.count_nonzero(np.unique(part)))
    offset = int(store.attrs.get(MAX_ID, 0))
    part, n = renumber(part, offset)
    if n:
        store.update_attributes({MAX_ID: offset + n})  # reserved first: a crash leaves a gap, not a clash
    store[y:y1, x:x1] = part
    return n
