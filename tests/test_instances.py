"""Instances from probabilities, and stitching across blocks without cutting objects."""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from skimage.draw import disk

from napari_genselfdiff.core.eval.postprocess import glands_from_probabilities, nuclei_from_probabilities
from napari_genselfdiff.slide import instances as ins


def _hand_glands() -> np.ndarray:
    """12 x 12 probability map drawn by hand (0.9 = foreground, 0.1 = background)."""
    rows = [
        "............",
        ".###........",
        ".#.#........",   # ring with a one-pixel hole at (2, 2)
        ".###........",
        "............",
        "......##....",
        "......##....",
        "........##..",   # touches the square above only diagonally: same gland (8-connected)
        "........##..",
        "............",
        ".##.........",   # two pixels: under min_size
        "............",
    ]
    return np.array([[0.9 if ch == "#" else 0.1 for ch in r] for r in rows], np.float32)


def test_glands_one_piece_hand_worked():
    labels = glands_from_probabilities(_hand_glands(), min_size=3)
    assert labels.dtype == np.int32 and labels.max() == 2
    assert labels[2, 2] == labels[1, 1] == 1            # hole filled into the ring
    assert labels[5, 6] == labels[8, 9] == 2            # diagonal contact joins
    assert labels[10, 1] == 0                           # removed (2 px < 3)
    assert (labels > 0).sum() == 9 + 8
    unfilled = glands_from_probabilities(_hand_glands(), min_size=3, fill_holes=False)
    assert unfilled[2, 2] == 0 and unfilled.max() == 2
    # uint8 input is read as p * 255 (stored probabilities)
    u8 = np.rint(_hand_glands() * 255).astype(np.uint8)
    np.testing.assert_array_equal(glands_from_probabilities(u8, min_size=3), labels)


def _gland_map(rng: np.random.Generator) -> np.ndarray:
    """300 x 300 map with objects straddling the borders of 64-pixel blocks."""
    h = w = 300
    fg = np.zeros((h, w), bool)
    xs = np.arange(5, 295)
    ys = (150 + 60 * np.sin(xs / 25.0)).astype(int)
    for dy in range(3):                                 # snake across many blocks
        fg[ys + dy, xs] = True
        fg[ys + dy, np.minimum(xs + 1, w - 1)] = True
    rr, cc = disk((64, 64), 25, shape=(h, w))          # ring whose hole straddles a block corner
    fg[rr, cc] = True
    rr, cc = disk((64, 64), 12, shape=(h, w))
    fg[rr, cc] = False
    fg[2:22, 50:140] = True                             # hole = exactly block column 1 (64..127):
    fg[7:17, 64:128] = False                            # its fg neighbours are in other blocks
    fg[230:290, 0:40] = True                            # U open to the image border: not a hole
    fg[240:280, 0:30] = False
    fg[100:128, 100:128] = True                         # diagonal contact at the corner (128, 128)
    fg[128:150, 128:150] = True
    fg[61:67, 200:206] = True                           # 36 px, 18 on each side of row 64: kept
    fg[62:66, 250:254] = True                           # 16 px straddling row 64: removed
    for _ in range(25):  # random discs, clear of the structures above
        centre = (int(rng.integers(200, 300)), int(rng.integers(60, 300)))
        rr, cc = disk(centre, int(rng.integers(2, 9)), shape=(h, w))
        fg[rr, cc] = True
    prob = np.where(fg, 0.8, 0.2) + rng.normal(0, 0.05, (h, w))
    return np.clip(prob, 0, 1).astype(np.float32)


@pytest.mark.parametrize("block", [64, 50, 97])
@pytest.mark.parametrize("fill_holes", [True, False])
def test_stitched_glands_equal_one_piece(block, fill_holes):
    prob = _gland_map(np.random.default_rng(3))
    reference = glands_from_probabilities(prob, min_size=30, fill_holes=fill_holes)
    out = np.zeros(prob.shape, np.int32)
    stats = ins.glands_blockwise(prob, out, block=block, min_size=30, fill_holes=fill_holes)
    report = ins.compare_partitions(reference, out)
    assert report.cut == 0 and report.merged == 0
    assert stats.count == report.n_labels == reference.max()
    assert sorted(np.unique(out)) == list(range(stats.count + 1))  # ids 1..N, no gaps
    snake = out[150 + int(60 * np.sin(5 / 25.0)), 5]
    assert snake > 0 and out[150 + int(60 * np.sin(290 / 25.0)), 290] == snake
    assert out[64, 200] == out[63, 200] > 0          # kept although each half has 18 px
    assert out[63, 251] == 0 and prob[63, 251] > 0.5  # removed although it spans two blocks
    assert (out[64, 64] > 0) == fill_holes           # hole across four blocks filled or not
    assert (out[12, 100] == out[2, 100] > 0) == fill_holes
    assert out[260, 10] == 0                         # background open to the border stays
    if block == 64:                                  # contact only across the corner (128, 128)
        assert out[127, 127] == out[128, 128] > 0
        assert prob[127, 128] < 0.5 and prob[128, 127] < 0.5


def test_stitched_glands_into_zarr(tmp_path):
    prob = _gland_map(np.random.default_rng(4))
    store = zarr.open_group(tmp_path / "l.zarr", mode="w")
    out = store.create_array("0", shape=prob.shape, chunks=(64, 64), dtype="int32", fill_value=0)
    steps = list(ins.iter_glands_blockwise(prob, out, block=64, min_size=30))
    assert steps[-1] == (2 * 25, 2 * 25) and len(steps) == 50
    reference = glands_from_probabilities(prob, min_size=30)
    assert ins.compare_partitions(reference, np.asarray(out[...])).identical


def test_nuclei_one_piece_splits_touching_nuclei():
    prob = np.zeros((40, 60), np.float32)
    for centre in ((20, 20), (20, 36)):                 # overlapping discs, radius 9
        rr, cc = disk(centre, 9, shape=prob.shape)
        prob[rr, cc] = 0.9
    labels = nuclei_from_probabilities(prob, min_size=10, min_distance=4)
    assert labels.max() == 2
    assert labels[20, 14] != labels[20, 42] and 0 not in (labels[20, 14], labels[20, 42])
    assert ((labels > 0) == (prob > 0.5)).all()
    # with a boundary class: interiors are markers, the boundary line is shared out
    fg = np.zeros((20, 30), np.float32)
    bnd = np.zeros((20, 30), np.float32)
    fg[5:15, 3:27] = 0.9
    fg[5:15, 14:16] = 0.0
    bnd[5:15, 14:16] = 0.9
    labels = nuclei_from_probabilities(fg, bnd, min_size=10)
    assert labels.max() == 2 and (labels[5:15, 3:27] > 0).all()
    assert labels[10, 5] != labels[10, 25]


def _nuclei_map(rng: np.random.Generator, n: int = 150) -> np.ndarray:
    prob = np.zeros((320, 280), np.float32)
    for _ in range(n):
        rr, cc = disk(tuple(rng.integers(0, (320, 280))), int(rng.integers(3, 9)), shape=prob.shape)
        prob[rr, cc] = 0.85
    return prob


@pytest.mark.parametrize("block", [64, 100])
def test_stitched_nuclei_equal_one_piece(block):
    prob = _nuclei_map(np.random.default_rng(1))
    reference = nuclei_from_probabilities(prob, min_size=5)
    out = np.zeros(prob.shape, np.int32)
    stats = ins.nuclei_blockwise(prob, out, block=block, halo=48, min_size=5)
    report = ins.compare_partitions(reference, out)
    assert report.identical, report
    assert stats.count == reference.max() > 80
    assert stats.truncated == 0 and stats.conflicts == 0
    # objects crossing block borders exist, and each has one id
    crossing = [i for i in range(1, reference.max() + 1)
                if len({(y // block, x // block) for y, x in zip(*np.nonzero(reference == i))}) > 1]
    assert len(crossing) > 10


def test_too_small_halo_is_reported_as_truncated():
    prob = _nuclei_map(np.random.default_rng(1))
    out = np.zeros(prob.shape, np.int32)
    stats = ins.nuclei_blockwise(prob, out, block=64, halo=2, min_size=5)
    assert stats.truncated > 0


def test_stitched_nuclei_with_boundary_class():
    rng = np.random.default_rng(2)
    fg = np.zeros((200, 200), np.float32)
    bnd = np.zeros_like(fg)
    for _ in range(60):
        centre, r = tuple(rng.integers(0, 200, 2)), int(rng.integers(4, 9))
        rr, cc = disk(centre, r, shape=fg.shape)
        bnd[rr, cc] = 0.9
        fg[rr, cc] = 0.0
        rr, cc = disk(centre, r - 2, shape=fg.shape)
        fg[rr, cc] = 0.9
        bnd[rr, cc] = 0.0
    reference = nuclei_from_probabilities(fg, bnd, min_size=5)
    out = np.zeros(fg.shape, np.int32)
    stats = ins.nuclei_blockwise(fg, out, block=64, prob_boundary=bnd, halo=40, min_size=5)
    assert ins.compare_partitions(reference, out).identical
    assert stats.count == reference.max() > 30


def test_label_pyramid_is_nearest_neighbour(tmp_path):
    labels = np.arange(600 * 520, dtype=np.int32).reshape(600, 520) % 97
    group = zarr.open_group(tmp_path / "p.zarr", mode="w")
    group.create_array("0", data=labels, chunks=(128, 128))
    n = ins.write_label_pyramid(group, block=128, min_size=128)
    assert n == 3  # 600x520 -> 300x260 -> 150x130 (next would be 75 < 128)
    np.testing.assert_array_equal(group["1"][...], labels[::2, ::2])
    np.testing.assert_array_equal(group["2"][...], labels[::4, ::4])


def test_compare_partitions_hand_worked():
    ref = np.array([[1, 1, 0, 2, 2],
                    [1, 1, 0, 2, 2]])
    same = np.array([[5, 5, 0, 7, 7],
                     [5, 5, 0, 7, 7]])
    cut = np.array([[5, 6, 0, 7, 7],
                    [5, 6, 0, 7, 7]])
    merged = np.array([[5, 5, 5, 5, 5],
                       [5, 5, 0, 5, 5]])
    assert ins.compare_partitions(ref, same).identical
    r = ins.compare_partitions(ref, cut)
    assert (r.cut, r.merged, r.n_reference, r.n_labels) == (1, 0, 2, 3)
    r = ins.compare_partitions(ref, merged)
    assert (r.cut, r.merged) == (0, 1)


def test_tie_breaker_is_the_position_hash_at_any_origin():
    """The hash of a pixel's global position, whatever block it is computed in (so blocks of a
    slide flood their ties alike), written out here from its definition."""
    from napari_genselfdiff.core.eval.postprocess import tie_breaker

    origin, shape = (123_456, 98_765), (37, 53)
    yy, xx = np.mgrid[origin[0]:origin[0] + shape[0], origin[1]:origin[1] + shape[1]]
    want = ((yy.astype(np.uint64) * np.uint64(73856093)) ^ (xx.astype(np.uint64) * np.uint64(19349663))) \
        % np.uint64(1000003) / 1000003.0
    got = tie_breaker(shape, origin)
    assert got.dtype == np.float64 and got.shape == shape
    assert np.array_equal(got, want)
    assert np.array_equal(tie_breaker((10, 20), (origin[0] + 5, origin[1] + 7)), want[5:15, 7:27])
    assert 0.0 <= got.min() and got.max() < 1.0 and len(np.unique(got)) > 0.9 * got.size
