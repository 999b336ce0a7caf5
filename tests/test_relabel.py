"""Issue 35 item 11: a whole slide's objects found again with other options (threshold, smallest
object) from its stored probabilities (slide/relabel.py): the result equals labelling the whole
probability map in one piece with those options, the old labels stay whole until the new ones are
complete (a stopped run changes nothing), and a swap a kill left half done is finished."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from napari_genselfdiff.core.atomic import foreign_files
from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.core.eval.postprocess import glands_from_probabilities
from napari_genselfdiff.core.progress import run_to_end
from napari_genselfdiff.slide.instances import compare_partitions, label_store
from napari_genselfdiff.slide.relabel import RELABEL, mend, relabel_store
from napari_genselfdiff.slide.store import PredictionStore, is_our_store

SIZE, BLOCK = 600, 128  # 5 x 5 blocks; the pyramid gets a level '1' (short side 300 >= 256)


def blobs() -> np.ndarray:
    """A foreground probability (uint8) with discs of several strengths and sizes, some crossing
    block borders, and a faint bridge joining two of them."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    p = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(40):
        cy, cx, r = rng.integers(0, SIZE), rng.integers(0, SIZE), rng.integers(6, 30)
        p = np.maximum(p, ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) * rng.uniform(0.3, 1.0))
    p[120:126, 100:260] = np.maximum(p[120:126, 100:260], 0.45)
    return (p * 255).round().astype(np.uint8)


def make_store(path: Path) -> PredictionStore:
    fg = blobs()
    store = PredictionStore.create_or_resume(
        path, {"slide": "s.png", "level": 0}, 2, (SIZE, SIZE), BLOCK, (5, 5),
        {"downsample": 1.0, "mpp": 1.24, "slide_mpp": 1.24, "class_names": ["background", "gland"]})
    store.probabilities[...] = np.stack([255 - fg, fg])
    store.done[...] = 1
    run_to_end(label_store(store, "glands", block=BLOCK))
    store.set_status(status="complete")
    return store


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def store(tmp_path) -> PredictionStore:
    return make_store(tmp_path / "slide.zarr")


@pytest.mark.parametrize("options", [{"threshold": 0.7, "min_size": 50}, {"threshold": 0.35, "min_size": 400}])
def test_relabel_equals_labelling_in_one_piece(store, options):
    before = np.asarray(store.labels("glands"))
    stats = run_to_end(relabel_store(store, "glands", {**options, "fill_holes": True}))
    after = np.asarray(store.labels("glands"))
    fg = np.asarray(store.probabilities[1])
    reference = glands_from_probabilities(fg, threshold=options["threshold"], min_size=options["min_size"])
    assert compare_partitions(reference, after).identical
    assert stats.count == len(np.unique(after)) - 1 == len(np.unique(reference)) - 1
    assert not compare_partitions(before, after).identical  # the options changed the objects
    meta = dict(store.group["labels"]["glands"].attrs)
    assert meta["complete"] and meta["count"] == stats.count
    assert store.label_options("glands") == {**options, "fill_holes": True}
    level1 = np.asarray(store.label_levels("glands")[1])
    assert np.array_equal(level1, after[::2, ::2])  # the pyramid is the new set's, not the old one's
    assert not (Path(store.path) / RELABEL).exists()
    assert is_our_store(store.path) and not foreign_files(store.path)
    assert store.unfinished("glands") is None
    reopened = PredictionStore.open(store.path)  # what another process (export, napari) reads
    assert np.array_equal(np.asarray(reopened.labels("glands")), after)


def test_a_stopped_relabel_changes_nothing_and_the_next_one_cleans_up(store):
    path = Path(store.path)
    before = files(path / "labels")
    gen = relabel_store(store, "glands", {"threshold": 0.7, "min_size": 50, "fill_holes": True})
    for _ in range(7):  # some blocks of the first pass written, then stopped (Cancel closes the generator)
        next(gen)
    gen.close()
    assert files(path / "labels") == before
    assert (path / RELABEL).exists()  # the half-written set is still there ...
    run_to_end(relabel_store(store, "glands", {"threshold": 0.7, "min_size": 50, "fill_holes": True}))
    assert not (path / RELABEL).exists()  # ... until the next run
    assert files(path / "labels") != before


def test_a_swap_left_half_done_is_finished(store):
    path = Path(store.path)
    old = files(path / "labels" / "glands")
    run_to_end(relabel_store(store, "glands", {"threshold": 0.7, "min_size": 50, "fill_holes": True}))
    expected = files(path / "labels" / "glands")
    # as a kill between the two renames leaves it: the old set moved aside, the new one not yet in
    store.group.require_group(RELABEL)  # the group label_store writes the new set into
    os.replace(path / "labels" / "glands", path / RELABEL / "glands")
    (path / RELABEL / "glands.old").mkdir()
    for name, data in old.items():
        (path / RELABEL / "glands.old" / name).parent.mkdir(parents=True, exist_ok=True)
        (path / RELABEL / "glands.old" / name).write_bytes(data)
    assert not store.labels_complete("glands")
    assert mend(store, "glands")
    assert files(path / "labels" / "glands") == expected
    assert store.labels_complete("glands") and not (path / RELABEL).exists()
    assert not mend(store, "glands")  # nothing left to mend


def test_unfinished_prediction_is_refused(tmp_path):
    store = make_store(tmp_path / "p.zarr")
    store.done[0, 0] = 0
    with pytest.raises(DataError, match="24 of 25 blocks predicted"):
        run_to_end(relabel_store(store, "glands", {"threshold": 0.6}))


def test_nuclei_relabel_follows_min_size(tmp_path):
    store = make_store(tmp_path / "n.zarr")
    run_to_end(label_store(store, "nuclei", block=BLOCK))
    sizes = np.bincount(np.asarray(store.labels("nuclei")).ravel())[1:]
    cut = int(np.median(sizes[sizes > 0]))
    stats = run_to_end(relabel_store(store, "nuclei", {"min_size": cut}))
    after = np.bincount(np.asarray(store.labels("nuclei")).ravel())[1:]
    assert after[after > 0].min() >= cut
    assert 0 < stats.count < int((sizes > 0).sum())


def test_labelling_blocks_are_capped_inside_label_store_for_every_caller(tmp_path, monkeypatch):
    """The labelling block cap lives in label_store: a store labelled in its whole prediction blocks
    (as stores were before the cap) is found again in the capped blocks, and the objects do not
    change with the blocks."""
    import napari_genselfdiff.slide.instances as ins

    store = make_store(tmp_path / "old.zarr")  # labelled in BLOCK-px chunks
    assert store.labels("glands").chunks == (BLOCK, BLOCK)
    before = np.asarray(store.labels("glands"))
    monkeypatch.setattr(ins, "LABEL_BLOCK_MAX", 100)  # 128-px prediction blocks -> two 64-px parts
    assert ins.label_block(BLOCK) == 64
    options = store.label_options("glands")
    run_to_end(relabel_store(store, "glands", options))
    assert store.labels("glands").chunks == (64, 64)
    assert compare_partitions(before, np.asarray(store.labels("glands"))).identical
    run_to_end(label_store(store, "nuclei"))  # no block given: the store's blocks, capped
    assert store.labels("nuclei").chunks == (64, 64)
