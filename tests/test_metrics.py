"""Tests for core.eval.metrics: hand-worked cases (arithmetic in the comments), properties (identity,
relabelling, empty maps), a cross-check of the vectorised code against plain per-object loops,
and one check on a real GlaS mask."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from napari_genselfdiff.core.eval.metrics import (
    aggregate,
    aji,
    dice,
    glas_object_metrics,
    hausdorff,
    hd95,
    instances_from_binary,
    iou,
    panoptic_quality,
    segmentation_report,
)

INF = float("inf")


def box(shape, rows, cols, value=1, out=None):
    """Paint rows[0]..rows[1]-1 x cols[0]..cols[1]-1 with ``value`` (into ``out`` if given)."""
    out = np.zeros(shape, np.int32) if out is None else out
    out[rows[0]:rows[1], cols[0]:cols[1]] = value
    return out


def random_instances(rng, shape=(48, 48), n=8) -> np.ndarray:
    """Random overlapping rectangles; later ones overwrite earlier ones (ids may vanish)."""
    lab = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(3, 14, size=2)
        lab[r:r + h, c:c + w] = k
    return lab


def perturbed(lab, rng) -> np.ndarray:
    """A prediction-like copy: shifted by up to 1 px, one object dropped, one spurious added."""
    out = np.roll(lab, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
    ids = np.unique(out[out > 0])
    out[out == rng.choice(ids)] = 0
    r, c = rng.integers(0, lab.shape[0] - 6, size=2)
    out[r:r + 5, c:c + 5] = lab.max() + 1
    return out


def pred_gt_pairs(rng, n=6):
    """Half unrelated pairs (mostly misses), half perturbed copies (mostly matches)."""
    for k in range(n):
        gt = random_instances(rng)
        yield (random_instances(rng) if k % 2 else perturbed(gt, rng)), gt


def permute_ids(lab, rng) -> np.ndarray:
    """Same objects, new ids: a random permutation spread onto huge, non-consecutive values."""
    ids = np.unique(lab[lab > 0])
    new = rng.permutation(ids.size) * 7 + 2**40
    lut = np.zeros(lab.max() + 1, np.int64)
    lut[ids] = new
    return lut[lab]


# ---------------------------------------------------------------------------------------------
# pixel metrics
# ---------------------------------------------------------------------------------------------

def test_dice_iou_offset_squares():
    a = box((8, 8), (0, 4), (0, 4))
    b = box((8, 8), (0, 4), (1, 5))
    # overlap 4 rows x 3 cols = 12; dice = 2*12/(16+16) = 0.75; iou = 12/(16+16-12) = 0.6
    assert dice(a, b) == pytest.approx(0.75)
    assert iou(a, b) == pytest.approx(0.6)
    assert dice(a.astype(bool), b * 255) == pytest.approx(0.75)  # any non-zero is foreground


def test_dice_iou_empty_and_disjoint():
    z = np.zeros((5, 5), bool)
    a = box((5, 5), (0, 2), (0, 2))
    assert dice(z, z) == 1.0 and iou(z, z) == 1.0
    assert dice(a, z) == 0.0 and iou(z, a) == 0.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        dice(np.zeros((4, 5)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="shape"):
        hd95(np.zeros((4, 5)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="shape"):
        aji(np.zeros((4, 5), int), np.zeros((5, 4), int))


def test_hd95_single_pixels():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[1, 1] = True
    b[4, 5] = True
    # a single pixel is its own boundary: distance sqrt(3^2 + 4^2) = 5
    assert hd95(a, b) == pytest.approx(5.0)
    assert hausdorff(a, b) == pytest.approx(5.0)
    # anisotropic pixels (2 units per row, 1 per column): sqrt(6^2 + 4^2)
    assert hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(math.sqrt(52))


def test_hd95_offset_squares():
    a = box((8, 8), (0, 4), (0, 4))
    b = box((8, 8), (0, 4), (1, 5))
    # each 12-pixel ring: 6 points lie on the other ring (0), 6 are one step off (1);
    # the 95th percentile of [0]*6 + [1]*6 is 1 in both directions
    assert hd95(a, b) == pytest.approx(1.0)
    assert hd95(a, a) == 0.0


def test_hd95_ignores_a_stray_pixel_that_hausdorff_sees():
    gt = box((50, 50), (10, 20), (10, 20))
    pred = gt.copy()
    pred[14, 39] = 1
    # pred boundary: the 36-pixel ring (distance 0) plus the stray pixel, 20 from (14, 19):
    # 95th percentile of 36 zeros and one 20 -> position 0.95*36 = 34.2 -> 0
    assert hd95(pred, gt) == pytest.approx(0.0)
    assert hausdorff(pred, gt) == pytest.approx(20.0)


def test_hausdorff_uses_pixel_sets_not_outlines():
    outer = box((20, 20), (2, 12), (2, 12))  # 10x10 square
    inner = box((20, 20), (6, 8), (6, 8))  # 2x2 square in its middle
    # set distance: inner pixels lie in outer (0); farthest outer pixel (2, 2) -> (6, 6):
    # sqrt(4^2 + 4^2); the outline version would add the inner ring's own distance too
    assert hausdorff(inner, outer) == pytest.approx(math.sqrt(32))


def test_distances_empty():
    z = np.zeros((6, 6), bool)
    a = box((6, 6), (1, 3), (1, 3))
    assert hd95(z, z) == 0.0 and hausdorff(z, z) == 0.0
    assert hd95(a, z) == INF and hd95(z, a) == INF and hausdorff(z, a) == INF


# ---------------------------------------------------------------------------------------------
# GlaS object metrics: hand case
#   G1 rows 0-3 cols 0-3 (16 px)    S1 rows 0-3 cols 1-4 (16 px): overlap 12 > 8 -> TP
#   G2 rows 10-13 cols 1-4 (16 px)  no prediction overlaps it        -> FN
#   S2 rows 0-3 cols 10-11 (8 px)   overlaps no gland                -> FP
# ---------------------------------------------------------------------------------------------

def glas_case():
    gt = box((16, 16), (0, 4), (0, 4), 1)
    box((16, 16), (10, 14), (1, 5), 2, out=gt)
    pred = box((16, 16), (0, 4), (1, 5), 1)
    box((16, 16), (0, 4), (10, 12), 2, out=pred)
    return pred, gt


def test_glas_hand_case():
    pred, gt = glas_case()
    m = glas_object_metrics(pred, gt)
    # TP=1, FP=1, FN=1: F1 = 2*1 / (2*1 + 1 + 1) = 0.5
    assert m["object_f1"] == pytest.approx(0.5)
    # Dice(G1,S1) = 2*12/32 = 0.75.  GT term: 16/32*0.75 + 16/32*0 (G2 has no partner) = 0.375
    # pred term: 16/24*0.75 + 8/24*0 (S2 overlaps nothing) = 0.5;  object Dice = (0.375+0.5)/2
    assert m["object_dice"] == pytest.approx(0.4375)
    # H(G1,S1) = 1 (one-column shift). G2 overlaps nothing: nearest prediction is S1, a pure
    # 10-row translation (H = 10; S2 is sqrt(10^2+9^2) away). S2 overlaps nothing: nearest is G1,
    # H = max(10 (G1 col 0 -> S2 col 10), 8 (S2 col 11 -> G1 col 3)) = 10.
    # GT term 0.5*1 + 0.5*10 = 5.5; pred term 16/24*1 + 8/24*10 = 4; object H = (5.5+4)/2
    assert m["object_hausdorff"] == pytest.approx(4.75)


def test_glas_prediction_must_cover_more_than_half():
    gt = box((10, 10), (0, 4), (0, 4))
    half = box((10, 10), (0, 2), (0, 4))  # exactly 8 of 16 GT pixels: not > 50%
    more = box((10, 10), (0, 3), (0, 3))  # 9 of 16
    assert glas_object_metrics(half, gt)["object_f1"] == 0.0
    assert glas_object_metrics(more, gt)["object_f1"] == 1.0


def test_glas_merged_prediction_is_penalised():
    gt = box((10, 20), (0, 4), (0, 4), 1)
    box((10, 20), (0, 4), (6, 10), 2, out=gt)
    merged = box((10, 20), (0, 4), (0, 10), 1)
    # the merged object covers 100% of G1 (first max-overlap tie -> G1): TP=1, FP=0, FN=1
    # F1 = 2/(2+0+1) = 2/3
    assert glas_object_metrics(merged, gt)["object_f1"] == pytest.approx(2 / 3)


def test_glas_empty_cases():
    z = np.zeros((8, 8), np.int32)
    a = box((8, 8), (1, 4), (1, 4))
    assert glas_object_metrics(z, z) == {"object_f1": 1.0, "object_dice": 1.0,
                                         "object_hausdorff": 0.0}
    for pred, gt in ((a, z), (z, a)):
        m = glas_object_metrics(pred, gt)
        assert m["object_f1"] == 0.0 and m["object_dice"] == 0.0
        assert m["object_hausdorff"] == INF


# ---------------------------------------------------------------------------------------------
# AJI and PQ
# ---------------------------------------------------------------------------------------------

def test_aji_two_objects():
    gt = box((10, 12), (0, 4), (0, 4), 1)
    box((10, 12), (0, 4), (8, 12), 2, out=gt)
    pred = box((10, 12), (0, 4), (1, 5), 1)  # IoU with G1 = 12/20
    box((10, 12), (0, 2), (8, 12), 2, out=pred)  # top half of G2: IoU 8/16
    box((10, 12), (6, 8), (0, 2), 3, out=pred)  # 4 px touching no GT: never picked
    # C = 12 + 8 = 20; U = 20 + 16 + 4 (unused S3) = 40; AJI = 0.5
    assert aji(pred, gt) == pytest.approx(0.5)


def test_pq_one_tp_one_fp_one_fn():
    gt = box((12, 12), (0, 4), (0, 4), 1)
    box((12, 12), (8, 12), (8, 12), 2, out=gt)  # no prediction here -> FN
    pred = box((12, 12), (0, 4), (1, 5), 1)  # IoU 12/20 = 0.6 with G1 -> TP
    box((12, 12), (8, 10), (0, 2), 2, out=pred)  # no GT here -> FP
    r = panoptic_quality(pred, gt)
    # DQ = 1/(1 + 0.5 + 0.5) = 0.5; SQ = 0.6; PQ = 0.3
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 1)
    assert r["dq"] == pytest.approx(0.5)
    assert r["sq"] == pytest.approx(0.6)
    assert r["pq"] == pytest.approx(0.3)


def test_pq_iou_of_exactly_half_is_no_match():
    gt = box((6, 6), (0, 4), (0, 4))
    pred = box((6, 6), (0, 2), (0, 4))  # IoU 8/16 = 0.5, not > 0.5
    r = panoptic_quality(pred, gt)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1) and r["pq"] == 0.0
    with pytest.raises(ValueError, match="iou_threshold"):
        panoptic_quality(pred, gt, iou_threshold=0.3)


def test_aji_pq_empty_cases():
    z = np.zeros((8, 8), np.int32)
    a = box((8, 8), (1, 4), (1, 4))
    assert aji(z, z) == 1.0
    assert panoptic_quality(z, z)["pq"] == 1.0
    assert aji(a, z) == 0.0 and aji(z, a) == 0.0
    r = panoptic_quality(a, z)
    assert (r["pq"], r["tp"], r["fp"], r["fn"]) == (0.0, 0, 1, 0)


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------

def test_identical_maps_are_perfect(rng):
    lab = random_instances(rng)
    assert dice(lab, lab) == 1.0
    assert aji(lab, lab) == 1.0
    assert panoptic_quality(lab, lab)["pq"] == 1.0
    m = glas_object_metrics(lab, lab)
    assert (m["object_f1"], m["object_dice"], m["object_hausdorff"]) == (1.0, 1.0, 0.0)


def test_relabelling_changes_nothing(rng):
    for pred, gt in pred_gt_pairs(rng):
        pred2, gt2 = permute_ids(pred, rng), permute_ids(gt, rng)
        assert aji(pred2, gt2) == pytest.approx(aji(pred, gt))
        assert panoptic_quality(pred2, gt2) == pytest.approx(panoptic_quality(pred, gt))
        assert glas_object_metrics(pred2, gt2) == pytest.approx(glas_object_metrics(pred, gt))
    # a single object filling the whole image (no background), spelled with different ids
    assert aji(np.full((3, 3), 2**40), np.full((3, 3), 5)) == 1.0
    assert panoptic_quality(np.full((3, 3), 2**40), np.full((3, 3), 5))["tp"] == 1


def test_rejects_float_and_negative_instance_maps():
    with pytest.raises(ValueError, match="integer"):
        aji(np.zeros((3, 3), float), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="negative"):
        panoptic_quality(-np.ones((3, 3), int), np.zeros((3, 3), int))


# ---------------------------------------------------------------------------------------------
# cross-check against plain per-object loops (independent code paths: masks, cdist)
# ---------------------------------------------------------------------------------------------

def _objects(lab):
    return [lab == i for i in np.unique(lab) if i != 0]


def _ref_hausdorff(a, b):
    pa, pb = np.argwhere(a), np.argwhere(b)
    d = cdist(pa, pb)
    return max(d.min(axis=1).max(), d.min(axis=0).max())


def _ref_partner(x, others):
    """Object of ``others`` overlapping ``x`` most (first on ties), or None."""
    ov = [np.count_nonzero(x & o) for o in others]
    return others[int(np.argmax(ov))] if max(ov, default=0) > 0 else None


def _ref_glas(pred, gt):
    S, G = _objects(pred), _objects(gt)
    tp = 0
    for s in S:
        g = _ref_partner(s, G)
        tp += g is not None and np.count_nonzero(s & g) > 0.5 * g.sum()
    f1 = 2 * tp / (2 * tp + (len(S) - tp) + (len(G) - tp))

    def side(X, Y, fn, lonely):
        total = sum(x.sum() for x in X)
        acc = 0.0
        for x in X:
            y = _ref_partner(x, Y)
            acc += x.sum() / total * (fn(x, y) if y is not None else lonely(x, Y))
        return acc

    d = lambda a, b: 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())  # noqa: E731
    od = 0.5 * (side(G, S, d, lambda x, Y: 0.0) + side(S, G, d, lambda x, Y: 0.0))
    near = lambda x, Y: min(_ref_hausdorff(x, y) for y in Y)  # noqa: E731
    oh = 0.5 * (side(G, S, _ref_hausdorff, near) + side(S, G, _ref_hausdorff, near))
    return {"object_f1": f1, "object_dice": od, "object_hausdorff": oh}


def _ref_aji(pred, gt):
    S, G = _objects(pred), _objects(gt)
    c = u = 0
    used = set()
    for g in G:
        ious = [np.count_nonzero(g & s) / np.count_nonzero(g | s) for s in S]
        j = int(np.argmax(ious)) if ious and max(ious) > 0 else None
        if j is None:
            u += g.sum()
            continue
        used.add(j)
        c += np.count_nonzero(g & S[j])
        u += np.count_nonzero(g | S[j])
    u += sum(s.sum() for j, s in enumerate(S) if j not in used)
    return c / u


def _ref_pq(pred, gt):
    S, G = _objects(pred), _objects(gt)
    ious = [np.count_nonzero(g & s) / np.count_nonzero(g | s) for g in G for s in S]
    m = [v for v in ious if v > 0.5]
    dq = len(m) / (len(m) + 0.5 * (len(S) - len(m)) + 0.5 * (len(G) - len(m)))
    return dq * (np.mean(m) if m else 0.0)


def test_matches_per_object_reference(rng):
    for pred, gt in pred_gt_pairs(rng):
        assert glas_object_metrics(pred, gt) == pytest.approx(_ref_glas(pred, gt))
        assert aji(pred, gt) == pytest.approx(_ref_aji(pred, gt))
        assert panoptic_quality(pred, gt)["pq"] == pytest.approx(_ref_pq(pred, gt))


# ---------------------------------------------------------------------------------------------
# instances, report, aggregate
# ---------------------------------------------------------------------------------------------

def test_instances_from_binary_connectivity_and_min_size():
    m = np.zeros((6, 6), bool)
    m[0:2, 0:2] = True  # 4 px
    m[2, 2] = True  # touches the first only at a corner
    m[4:6, 3:6] = True  # 6 px
    lab = instances_from_binary(m)
    assert lab.dtype == np.int32 and lab.max() == 3  # corner contact does not join (1-connectivity)
    assert instances_from_binary(m, connectivity=2).max() == 2
    small_gone = instances_from_binary(m, min_size=2)
    assert small_gone.max() == 2 and not small_gone[2, 2]
    assert set(np.unique(small_gone)) == {0, 1, 2}  # consecutive after removal


def test_segmentation_report_glands_and_nuclei():
    pred, gt = glas_case()
    r = segmentation_report(pred > 0, gt > 0, task="glands", num_classes=2)
    # foreground: |P| = 24, |G| = 32, overlap 12 -> dice = 24/56
    assert r["dice"] == pytest.approx(24 / 56) and r["iou"] == pytest.approx(12 / 44)
    assert r["object_f1"] == pytest.approx(0.5) and r["object_dice"] == pytest.approx(0.4375)
    assert "aji" not in r and "dice_class1" not in r
    n = segmentation_report(pred > 0, gt > 0, task="nuclei", num_classes=2)
    # one pair, IoU 12/20 = 0.6 > 0.5, one FP, one FN: PQ = 0.5 * 0.6
    assert n["pq"] == pytest.approx(0.3)
    # AJI: C = 12, U = 20 (G1 u S1) + 16 (G2 alone) + 8 (S2 unused) = 44
    assert n["aji"] == pytest.approx(12 / 44)


def test_segmentation_report_given_instances_and_classes():
    gt = box((10, 10), (0, 4), (0, 8), 1)
    gt[0:4, 4:8] = 2  # class 2 on the right half
    pred = gt.copy()
    pred[0:4, 0:4] = 2  # class 1 predicted as class 2
    gt_inst = box((10, 10), (0, 4), (0, 4), 1)
    box((10, 10), (0, 4), (4, 8), 2, out=gt_inst)  # two touching objects
    r = segmentation_report(pred, gt, task="nuclei", num_classes=3,
                            pred_instances=gt_inst, gt_instances=gt_inst)
    assert r["dice"] == 1.0  # foreground agrees
    assert r["dice_class1"] == 0.0  # class 1 never predicted
    assert r["dice_class2"] == pytest.approx(2 * 16 / (32 + 16))
    assert r["aji"] == 1.0 and r["pq"] == 1.0  # given instances used, not merged components
    r2 = segmentation_report(pred, gt, task="nuclei", num_classes=3)
    assert r2["pq"] == 1.0 and r2["aji"] == 1.0  # both sides merge into one component
    with pytest.raises(ValueError, match="0/255"):
        segmentation_report(pred * 255, gt, task="glands", num_classes=2)
    with pytest.raises(ValueError, match="unknown task"):
        segmentation_report(pred, gt, task="cells", num_classes=3)


def test_aggregate_skips_infinite_distances():
    reports = [{"dice": 1.0, "hd95": 2.0, "object_hausdorff": 1.0},
               {"dice": 0.0, "hd95": INF, "object_hausdorff": 3.0},
               {"dice": 0.5, "hd95": 4.0, "object_hausdorff": INF}]
    a = aggregate(reports)
    assert a["dice"] == pytest.approx(0.5)
    assert a["hd95"] == pytest.approx(3.0) and a["hd95_n_inf"] == 1
    assert a["object_hausdorff"] == pytest.approx(2.0) and a["object_hausdorff_n_inf"] == 1
    assert a["n_images"] == 3
    assert math.isnan(aggregate([{"hd95": INF}])["hd95"])
    with pytest.raises(ValueError):
        aggregate([])


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------

def test_glas_mask_against_itself_and_eroded_copy(glas_dir):
    from skimage.io import imread

    name = sorted(p.name for p in (glas_dir / "masks").iterdir())[0]
    gt = imread(glas_dir / "masks" / name) > 0
    assert gt.any(), f"{name} has no gland pixels"
    same = segmentation_report(gt, gt, task="glands", num_classes=2)
    assert same["dice"] == 1.0 and same["iou"] == 1.0 and same["hd95"] == 0.0
    assert same["object_f1"] == 1.0 and same["object_dice"] == 1.0
    assert same["object_hausdorff"] == 0.0
    eroded = ndimage.binary_erosion(gt, iterations=3)
    r = segmentation_report(eroded, gt, task="glands", num_classes=2)
    assert 0.8 < r["dice"] < 1.0
    assert 0.0 < r["hd95"] <= 3.0 + 1e-9  # an outline moved inward by 3 steps
