"""Glands with a contour class (DCAN's lever for touching glands): targets, instances in one
piece and block by block, the tuning grid, and a slide store labelled by the same rules."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk

from napari_genselfdiff.core.data import TaskSpec, mask_to_target
from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.core.eval.postprocess import (glands_from_probabilities, grow_labels, options_for,
                                                      postprocess)
from napari_genselfdiff.core.eval.tuning import redundant, tune_postprocess
from napari_genselfdiff.slide import instances as ins


def _touching_glands() -> np.ndarray:
    """Instance ids of two discs that touch along a short chord, and a third apart."""
    inst = np.zeros((80, 120), np.int32)
    for i, (centre, r) in enumerate((((40, 30), 18), ((40, 64), 17), ((40, 100), 10)), 1):
        rr, cc = disk(centre, r, shape=inst.shape)
        inst[rr, cc] = np.where(inst[rr, cc] == 0, i, inst[rr, cc])
    return inst


def _probs(target: np.ndarray, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """(3, H, W) probabilities that favour ``target``'s classes, softly (Gaussian noise)."""
    rng = np.random.default_rng(seed)
    logits = np.stack([(target == k) * 4.0 for k in range(3)]) + rng.normal(0, noise, (3,) + target.shape)
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def test_task_spec_and_targets_of_glands_with_contours():
    spec = TaskSpec.make("glands", boundary=True, boundary_width=2)
    assert spec.num_classes == 3 and spec.class_names == ("background", "gland", "contour")
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(DataError, match="at least 1 pixel"):
        TaskSpec.make("glands", boundary=True, boundary_width=0)
    with pytest.raises(DataError, match="distance map"):
        TaskSpec.make("glands", boundary=True, distance=True)
    inst = _touching_glands()
    target = mask_to_target(inst, spec)
    assert set(np.unique(target)) == {0, 1, 2}
    # the two touching glands' interiors are kept apart by two pixels of contour each
    interiors, n = ndi.label(target == 1, structure=np.ones((3, 3), bool))
    assert n == 3
    # a binary mask: each connected component is a gland (touching ones cannot be told apart)
    binary = mask_to_target(np.where(inst > 0, 255, 0).astype(np.uint8), spec)
    assert ndi.label(binary == 1, structure=np.ones((3, 3), bool))[1] == 2
    # glands without a contour class: two classes, unchanged
    assert set(np.unique(mask_to_target(inst, TaskSpec.make("glands")))) == {0, 1}


def test_contour_class_separates_touching_glands():
    inst = _touching_glands()
    target = mask_to_target(inst, TaskSpec.make("glands", boundary=True, boundary_width=2))
    probs = _probs(target)
    _, labels = postprocess(probs, "glands", {"min_size": 20, "grow": 2})
    assert labels.max() == 3
    assert ins.compare_partitions(inst, labels).identical
    # the same probabilities without the contour class (a two-class model's view): merged
    two = np.stack([probs[0], probs[1] + probs[2]])
    _, merged = postprocess(two, "glands", {"min_size": 20})
    assert merged.max() == 2 and merged[40, 30] == merged[40, 64]


def test_grow_labels_is_local_and_ignores_ids():
    seeds = np.zeros((30, 30), np.int32)
    seeds[10, 10], seeds[10, 14] = 1, 2
    grown = grow_labels(seeds, np.ones_like(seeds, bool), 3)
    assert grown[10, 12] in (1, 2) and grown[10, 11] == 1 and grown[10, 13] == 2
    assert grown[10, 6] == 0 and grown[10, 7] == 1      # 3 steps along a row, not 4
    # the contested pixel goes to the same place whatever the ids are
    swapped = grow_labels(np.where(seeds == 1, 2, np.where(seeds == 2, 1, 0)), np.ones_like(seeds, bool), 3)
    assert (swapped == np.where(grown == 1, 2, np.where(grown == 2, 1, 0))).all()
    # never outside ``within``
    within = np.zeros_like(seeds, bool)
    within[:, :12] = True
    assert (grow_labels(seeds, within, 5)[:, 12:] == np.where(seeds[:, 12:] > 0, seeds[:, 12:], 0)).all()


def _noisy_slide(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fg, interior) float maps, 300 x 340, of many glands, some touching, with noise."""
    rng = np.random.default_rng(seed)
    inst = np.zeros((300, 340), np.int32)
    for i in range(1, 40):
        rr, cc = disk((int(rng.integers(0, 300)), int(rng.integers(0, 340))), int(rng.integers(6, 22)),
                      shape=inst.shape)
        inst[rr, cc] = i
    target = mask_to_target(inst, TaskSpec.make("glands", boundary=True, boundary_width=2))
    probs = np.rint(_probs(target, noise=1.5, seed=seed) * 255).astype(np.uint8)
    fi, fc = (probs[1].astype(np.float32) / 255, probs[2].astype(np.float32) / 255)
    return fi + fc, fi


@pytest.mark.parametrize("block", [64, 45, 128])
@pytest.mark.parametrize("fill_holes", [True, False])
def test_contoured_glands_blockwise_equal_one_piece(block, fill_holes):
    fg, interior = _noisy_slide(block)
    opts = dict(threshold=0.5, min_size=40, fill_holes=fill_holes, marker_threshold=0.6, grow=4)
    reference = glands_from_probabilities(fg, prob_interior=interior, **opts)
    assert reference.max() > 20
    out = np.zeros(fg.shape, np.int32)
    stats = ins.glands_blockwise(fg, out, block=block, prob_interior=interior, **opts)
    report = ins.compare_partitions(reference, out)
    assert report.identical and stats.count == reference.max()
    assert sorted(np.unique(out)) == list(range(stats.count + 1))


def test_contoured_glands_steps_and_zarr(tmp_path):
    import zarr

    fg, interior = _noisy_slide(7)
    out = zarr.open_group(tmp_path / "l.zarr", mode="w").create_array(
        "0", shape=fg.shape, chunks=(64, 64), dtype="int32", fill_value=0)
    steps = list(ins.iter_contoured_glands_blockwise(fg, interior, out, block=64, min_size=40))
    n = 5 * 6
    assert [s[1] for s in steps] == [4 * n] * (4 * n) and [s[0] for s in steps] == list(range(1, 4 * n + 1))
    reference = glands_from_probabilities(fg, prob_interior=interior, min_size=40)
    assert ins.compare_partitions(reference, np.asarray(out[...])).identical


def test_tuning_reads_contour_options_only_for_contour_models():
    grid = {"threshold": (0.5,), "min_size": (10,), "marker_threshold": (0.5, 0.7), "grow": (3, 6)}
    two = [np.zeros((2, 8, 8), np.float32)]
    three = [np.zeros((3, 8, 8), np.float32)]
    opts = {"threshold": 0.5, "min_size": 10, "marker_threshold": 0.7, "grow": 3}
    assert redundant(opts, grid, two) and not redundant(opts, grid, three)
    assert not redundant({**opts, "marker_threshold": 0.5}, grid, two)
    # a model's options carry them, rescaled to its pixel size like the other lengths
    assert options_for("glands", None, mpp=0.62)["grow"] == 2 * options_for("glands")["grow"]
    inst = _touching_glands()
    target = mask_to_target(inst, TaskSpec.make("glands", boundary=True, boundary_width=2))
    best, report = tune_postprocess("glands", [_probs(target, noise=1.0)], [inst], grid=grid)
    assert report["best"] >= report["default"] and set(best) >= {"marker_threshold", "grow"}


def test_slide_store_of_a_contour_model_is_labelled_by_the_same_rules(tmp_path):
    """label_store (a prediction's last step) and relabel_store (the Objects controls' "Apply to
    whole slide") read the gland + contour sum and the interiors from a 3-class store."""
    from napari_genselfdiff.core.progress import run_to_end
    from napari_genselfdiff.slide.relabel import relabel_store
    from napari_genselfdiff.slide.store import PredictionStore

    size, block = 300, 64
    rng = np.random.default_rng(5)
    inst = np.zeros((size, size), np.int32)
    for i in range(1, 30):
        rr, cc = disk((int(rng.integers(0, size)), int(rng.integers(0, size))), int(rng.integers(6, 20)),
                      shape=inst.shape)
        inst[rr, cc] = i
    target = mask_to_target(inst, TaskSpec.make("glands", boundary=True, boundary_width=2))
    probs = np.rint(_probs(target, noise=1.5, seed=5) * 255).astype(np.uint8)
    store = PredictionStore.create_or_resume(
        tmp_path / "s.zarr", {"slide": "s.png", "level": 0}, 3, (size, size), block, (5, 5),
        {"downsample": 1.0, "mpp": 1.24, "slide_mpp": 1.24, "class_names": ["background", "gland", "contour"]})
    store.probabilities[...] = probs
    store.done[...] = 1
    first = options_for("glands")
    run_to_end(ins.label_store(store, "glands", block=block, options=first))
    store.set_status(status="complete")
    _, reference = postprocess(probs, "glands", first)
    assert ins.compare_partitions(reference, np.asarray(store.labels("glands"))).identical
    other = {**first, "marker_threshold": 0.8, "grow": 1, "min_size": 150}
    run_to_end(relabel_store(store, "glands", other))
    _, again = postprocess(probs, "glands", other)
    after = np.asarray(store.labels("glands"))
    assert ins.compare_partitions(again, after).identical
    assert not ins.compare_partitions(reference, after).identical  # the options changed the objects
    assert store.label_options("glands") == other
