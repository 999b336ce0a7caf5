"""The validation split of a single labeled image (``core.data.quadrants`` /
``split_for_validation``, used by the Fine-tune widget): pure logic, no viewer."""
from __future__ import annotations

import numpy as np
import pytest

from napari_genselfdiff.core.data import LabeledImage, quadrants, split_for_validation
from napari_genselfdiff.core.errors import DataError


def test_quadrants_cover_the_image_once():
    item = LabeledImage("a", np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3), np.arange(35).reshape(5, 7))
    parts = quadrants(item)
    assert [p.name for p in parts] == ["a [top-left]", "a [top-right]", "a [bottom-left]", "a [bottom-right]"]
    assert [p.target.shape for p in parts] == [(2, 3), (2, 4), (3, 3), (3, 4)]
    assert sorted(np.concatenate([p.target.ravel() for p in parts]).tolist()) == list(range(35))


def test_one_image_is_split_by_quadrant_and_folders_by_image():
    target = np.ones((8, 8), np.uint8)
    item = LabeledImage("a", np.zeros((8, 8, 3), np.uint8), target)
    assert split_for_validation([item], 0.0, single_pair=True) == ([item], [])
    train, val = split_for_validation([item], 0.25, single_pair=True)
    assert len(train) == 3 and len(val) == 1 and all("[" in p.name for p in train + val)
    items = [LabeledImage(f"t{i}", item.image, target) for i in range(4)]
    train, val = split_for_validation(items, 0.5, single_pair=False)
    assert sorted(p.name for p in train + val) == ["t0", "t1", "t2", "t3"] and len(val) == 2


def test_labels_only_in_the_held_out_part_are_refused():
    target = np.zeros((8, 8), np.uint8)
    item = LabeledImage("a", np.zeros((8, 8, 3), np.uint8), target)
    with pytest.raises(DataError, match="held-out validation part"):
        split_for_validation([item], 0.25, single_pair=True)
