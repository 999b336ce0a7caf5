"""A finished whole-slide prediction's objects found again with other post-processing options (the
probability threshold, the smallest object: the Predict widget's live Objects controls), from the
probabilities the store keeps: the network does not run again.

The new label set is written beside the old one (``relabel/<name>`` in the store), block by block
with its pyramid, and only when it is complete swapped in for ``labels/<name>`` (two renames of
folders the tiler wrote), so a run stopped on the way (cancelled, out of disk) leaves the slide's
objects as they were; the half-written set is removed by the next run. A stop between the two
renames (the process killed there) is mended the next time: the complete new set is moved in.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Generator, Mapping

from napari_genselfdiff.core.errors import DataError, GenSelfDiffError
from napari_genselfdiff.slide.instances import StitchStats, label_store

#: The store's group the new label sets are written into before they are swapped in.
RELABEL = "relabel"


def _folders(store: Any, name: str) -> tuple[Path, Path, Path]:
    """(the label set, its replacement being made, the old set on its way out) as folders."""
    if store.path is None:
        raise GenSelfDiffError("relabelling needs a prediction store on disk")
    root = Path(store.path)
    return root / "labels" / name, root / RELABEL / name, root / RELABEL / f"{name}.old"


def mend(store: Any, name: str) -> bool:
    """Finish a swap a killed process left half done (the label set gone, its complete
    replacement beside it) and remove what an unfinished run left; True when a swap was finished."""
    current, new, _ = _folders(store, name)
    finished = False
    if not current.exists() and store.labels_complete(name, parent=RELABEL):
        os.replace(new, current)
        finished = True
    if new.parent.exists():
        shutil.rmtree(new.parent)  # the relabel group: ours, only this module writes there
    return finished


def relabel_store(store: Any, name: str, options: Mapping[str, Any]
                  ) -> Generator[tuple[int, int], None, StitchStats]:
    """Find the objects of the label set ``name`` ('glands' or 'nuclei') of a finished
    :class:`~napari_genselfdiff.slide.store.PredictionStore` again with ``options`` (those of
    :func:`~napari_genselfdiff.core.eval.postprocess.options_for`), in the blocks a first labelling
    uses (:func:`~napari_genselfdiff.slide.instances.label_store`'s default: the prediction blocks
    cut to at most 1,024 px, also for a set labelled in larger blocks before that cap); yields
    (steps done, steps total), returns the new set's stats. The store's labels are replaced only
    when the new set is complete."""
    if name not in ("glands", "nuclei"):
        raise GenSelfDiffError(f"only glands and nuclei are found again, not {name!r}")
    mend(store, name)
    missing = store.unfinished(name)
    if missing:
        raise DataError(f"{store.path}: {missing}; finish the prediction first ('Predict whole slide' resumes it)")
    stats = yield from label_store(store, name, options=dict(options), parent=RELABEL)
    current, new, old = _folders(store, name)
    os.replace(current, old)
    os.replace(new, current)
    mend(store, name)  # the old set and the empty relabel group go
    return stats
