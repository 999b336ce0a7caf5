"""The prediction store: the one place that knows the zarr layout whole-slide prediction writes.

Layout (zarr v3 group):

* ``probabilities`` (C, H, W) uint8 (p * 255) of the level the model ran on, chunks
  (1, block, block): one channel per class name, then the maps of models that predict one
  (a nucleus distance map, 0..1 as well), named in settings ``maps``;
* ``done`` (blocks_y, blocks_x) uint8: blocks already written (a run resumes after them);
* ``tissue`` (optional) uint8 tissue mask, attribute ``downsample`` (of level 0);
* ``labels/<name>/<k>`` int32 instance labels with a nearest-neighbour pyramid (k = 0, 1, ...),
  attributes ``complete``, ``count``, ``truncated``, ``conflicts`` and OME ``multiscales``;
* group attribute ``genselfdiff``: format, version, settings (what must match to resume),
  status ('predicting', 'probabilities_done', 'complete'), level downsample and mpp, slide mpp,
  class names and the caller's metadata.

The tiler writes it, ``genselfdiff predict``/``export``, the demo and the Predict widget read it;
all of them through :class:`PredictionStore`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_genselfdiff.core.atomic import foreign_files
from napari_genselfdiff.core.errors import DataError

STORE_FORMAT = "genselfdiff-prediction"
STORE_VERSION = 1
META = "genselfdiff"


def is_our_store(path: str | Path) -> bool:
    """Whether ``path`` is a prediction store genselfdiff wrote (a zarr group with our metadata, its
    probabilities and its done-map) and nothing but ours is in it (a user's file put inside makes it
    theirs too), which a rerun with ``overwrite`` may replace."""
    import zarr

    path = Path(path)
    if path.is_symlink() or not path.is_dir() or not ((path / "zarr.json").is_file() or (path / ".zgroup").is_file()):
        return False
    try:
        group = zarr.open_group(path, mode="r")
        ours = isinstance(dict(group.attrs).get(META), dict) and "probabilities" in group and "done" in group
    except Exception:  # noqa: BLE001  (unreadable: not provably ours)
        return False
    return ours and not foreign_files(path)


class PredictionStore:
    """A prediction zarr group (see the module docstring for its layout)."""

    def __init__(self, group: Any, path: str | Path | None = None) -> None:
        self.group = group
        self.path = Path(path) if path is not None else None

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> PredictionStore:
        """A finished (or partial) prediction, with a clear error when ``path`` is none."""
        import zarr

        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: no such prediction store")
        try:
            group = zarr.open_group(path, mode=mode)
        except Exception as e:
            raise DataError(f"{path}: not a zarr store ({type(e).__name__}: {e})") from None
        if META not in group.attrs:
            raise DataError(f"{path}: not a genselfdiff prediction store")
        return cls(group, path)

    @classmethod
    def create_or_resume(cls, path: str | Path, settings: dict[str, Any], num_classes: int,
                         shape: tuple[int, int], block: int, nblocks: tuple[int, int],
                         info: dict[str, Any], overwrite: bool = False) -> PredictionStore:
        """Create the store at ``path``, or reopen it for resuming when its ``settings`` match.
        Anything else at ``path`` (another zarr store, a file, a prediction made with other
        settings unless ``overwrite``) is a DataError: it is never overwritten silently."""
        import zarr

        path = Path(path)
        h, w = shape
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            if not ((path / "zarr.json").is_file() or (path / ".zgroup").is_file()):
                raise DataError(f"{path}: exists and is not a zarr store; choose another "
                                "output path (it is never overwritten)")
            try:
                group = zarr.open_group(path, mode="r+")
            except Exception as exc:
                raise DataError(f"{path}: unreadable zarr store ({type(exc).__name__}: "
                                f"{exc}); choose another output path") from exc
            meta = dict(group.attrs).get(META)
            if not isinstance(meta, dict) or "probabilities" not in group or "done" not in group:
                # someone else's zarr store: never wiped, overwrite or not
                raise DataError(f"{path}: is a zarr store that is not a genselfdiff "
                                "prediction; it is never overwritten: choose another output path")
            if not overwrite:
                if meta.get("settings") != settings:
                    raise DataError(f"{path}: holds a prediction made with other settings "
                                    f"({meta.get('settings')}); delete it, pass overwrite=True or "
                                    "choose another output path")
                return cls(group, path)
            foreign = foreign_files(path)
            if foreign:  # a user's file put inside our store makes it theirs too: never wiped
                raise DataError(f"{path}: holds files genselfdiff did not write ({', '.join(foreign[:3])}); it "
                                "is never overwritten: move them out or choose another output path")
        group = zarr.open_group(path, mode="w")
        group.create_array("probabilities", shape=(num_classes, h, w), chunks=(1, block, block),
                           dtype="uint8", fill_value=0, dimension_names=("c", "y", "x"))
        group.create_array("done", shape=nblocks, chunks=nblocks, dtype="uint8", fill_value=0)
        group.attrs[META] = {"format": STORE_FORMAT, "version": STORE_VERSION,
                             "settings": settings, "status": "predicting", **info}
        return cls(group, path)

    # -- metadata -----------------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """The ``genselfdiff`` group attribute (a copy)."""
        return dict(self.group.attrs[META])

    @property
    def status(self) -> str | None:
        return self.meta.get("status")

    def set_status(self, **changes: Any) -> None:
        """Update fields of the ``genselfdiff`` attribute (``status=...`` and the like)."""
        meta = self.meta
        meta.update(changes)
        self.group.attrs[META] = meta

    def unfinished(self, name: str | None = None) -> str | None:
        """None when the run finished (and the label set ``name``, when given, is complete);
        otherwise what is missing, for a message: "N of M blocks predicted" or "all M blocks
        predicted, instance labels unfinished"."""
        done = np.asarray(self.done[...]).astype(bool)
        n, m = int(done.sum()), int(done.size)
        if n < m:
            return f"{n} of {m} blocks predicted"
        if self.status != "complete" or (name is not None and not self.labels_complete(name)):
            return f"all {m} blocks predicted, instance labels unfinished"
        return None

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.meta.get("settings", {}))

    @property
    def level(self) -> int:
        """The slide level the model ran on."""
        return int(self.settings["level"])

    @property
    def downsample(self) -> float:
        """Level-0 pixels per stored pixel (1.0 when the store does not say)."""
        return float(self.meta.get("downsample", 1.0))

    @property
    def mpp(self) -> float | None:
        """Microns per stored pixel (of the level the model ran on); None when unknown."""
        return self.meta.get("mpp")

    @property
    def slide_mpp(self) -> float | None:
        """Microns per level-0 slide pixel; None when unknown."""
        mpp = self.meta.get("slide_mpp")
        if mpp is None and self.mpp is not None:
            mpp = self.mpp / self.downsample
        return mpp

    @property
    def slide_path(self) -> Path | None:
        """The slide the prediction was made from (as it was then: it may have moved since)."""
        slide = self.settings.get("slide")
        return Path(slide) if slide else None

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names", []))

    # -- arrays -------------------------------------------------------------------------------

    @property
    def probabilities(self) -> Any:
        """The (C, H, W) uint8 probability array (p * 255)."""
        return self.group["probabilities"]

    @property
    def done(self) -> Any:
        """The (blocks_y, blocks_x) uint8 array of finished blocks."""
        return self.group["done"]

    def foreground(self) -> ForegroundProbability:
        """1 - p(background) as a lazy float32 (H, W) view, read slice by slice."""
        return ForegroundProbability(self.probabilities)

    def foreground_dask(self) -> Any:
        """p(class 1) as a lazy (H, W) uint8 dask array (for a viewer layer)."""
        import dask.array as da

        return da.from_zarr(self.probabilities)[1]

    def write_tissue(self, mask: np.ndarray, downsample: float) -> None:
        """Record the tissue mask a run used (once: a resumed run keeps the first)."""
        if "tissue" not in self.group:
            self.group.create_array("tissue", data=np.asarray(mask).astype(np.uint8),
                                    attributes={"downsample": downsample})

    # -- instance labels ----------------------------------------------------------------------

    def label_names(self) -> list[str]:
        """Names of the instance label sets in the store ('glands', 'nuclei'), sorted."""
        return sorted(self.group["labels"].group_keys()) if "labels" in self.group else []

    def labels(self, name: str) -> Any:
        """Level 0 (the model's level) of the label set ``name``: an int32 zarr array."""
        return self.group["labels"][name]["0"]

    def label_levels(self, name: str) -> list[Any]:
        """The pyramid of the label set ``name``: its int32 zarr arrays, finest (level 0) first."""
        lab = self.group["labels"][name]
        return [lab[k] for k in sorted(lab.array_keys(), key=int)]

    def label_options(self, name: str) -> dict:
        """The post-processing options the label set ``name`` was found with, as far as it says
        (a store labelled before they were recorded says nothing: the model's own then)."""
        return dict(dict(self.group["labels"][name].attrs).get("options") or {})

    def labels_complete(self, name: str, parent: str = "labels") -> bool:
        """Whether the label set ``name`` of the group ``parent`` was written to its end."""
        labels = self.group[parent] if parent in self.group else None
        return labels is not None and name in labels and bool(dict(labels[name].attrs).get("complete"))

    def create_labels(self, name: str, block: int, parent: str = "labels") -> tuple[Any, Any]:
        """A fresh (overwritten) label set ``name`` in the group ``parent`` (``labels``; a label set
        being made again is written beside it first, :mod:`.relabel`): (its group, its level-0
        int32 array)."""
        labels = self.group.require_group(parent)
        h, w = self.probabilities.shape[1:]
        lab_group = labels.create_group(name, overwrite=True)
        lab0 = lab_group.create_array("0", shape=(h, w), chunks=(block, block), dtype="int32",
                                      fill_value=0, dimension_names=("y", "x"))
        return lab_group, lab0

    @staticmethod
    def finish_labels(lab_group: Any, name: str, n_levels: int, *, count: int, truncated: int = 0,
                      conflicts: int = 0, options: dict | None = None) -> None:
        """Mark a label set complete, with its object counts, the post-processing ``options`` it was
        found with (when given) and OME multiscales metadata."""
        lab_group.attrs.update({
            "complete": True, "count": count, "truncated": truncated, "conflicts": conflicts,
            **({"options": dict(options)} if options is not None else {}),
            "multiscales": [{"version": "0.4", "name": name,
                             "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                             "datasets": [{"path": str(k), "coordinateTransformations": [
                                 {"type": "scale", "scale": [2.0 ** k, 2.0 ** k]}]}
                                 for k in range(n_levels)]}]})

    def labels_at_level0(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """The label set ``name`` brought to level-0 pixels of ``shape`` (nearest neighbour), for
        small images."""
        lab = np.asarray(self.labels(name))
        f = self.downsample
        if f == 1.0 and lab.shape == tuple(shape):
            return lab
        rows = np.minimum((np.arange(shape[0]) / f).astype(int), lab.shape[0] - 1)
        cols = np.minimum((np.arange(shape[1]) / f).astype(int), lab.shape[1] - 1)
        return lab[rows[:, None], cols[None, :]]


class ForegroundProbability:
    """Lazy 1 - p(background) view of a (C, H, W) uint8 probability array, sliced on demand."""

    def __init__(self, probs: Any):
        self.probs = probs
        self.shape = tuple(probs.shape[1:])
        self.ndim = 2
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key):
        bg = np.asarray(self.probs[(0,) + tuple(key if isinstance(key, tuple) else (key,))], dtype=np.float32)
        return 1.0 - bg / 255.0

    def __array__(self, dtype=None, copy=None):
        return self[(slice(None), slice(None))].astype(dtype or np.float32)
