"""Segmentation metrics for gland (GlaS) and nucleus (MoNuSeg) evaluation, in numpy/scipy only.

Pixel metrics: :func:`dice`, :func:`iou`, :func:`hd95`, :func:`hausdorff`.
Object metrics: :func:`glas_object_metrics` (GlaS challenge F1 / object Dice / object Hausdorff,
Sirinukunwattana et al. 2017), :func:`aji` (Kumar et al. 2017) and :func:`panoptic_quality`
(Kirillov et al. 2019). :func:`segmentation_report` bundles them per image and :func:`aggregate`
averages the reports over a data set.

Conventions (chosen so that an image with nothing to find and nothing found is a perfect score,
and so that aggregation over images never silently averages an infinity):

* Masks are foreground where the value is non-zero; instance maps are integer arrays where 0 is
  background and every other value is one object (ids need not be consecutive).
* Both inputs empty: dice = iou = aji = pq = dq = sq = object F1 = object Dice = 1, and every
  distance (hd95, hausdorff, object Hausdorff) is 0.
* Exactly one input empty: overlap scores are 0 and distances are ``inf``. :func:`aggregate`
  leaves infinite distances out of the mean and reports how many there were as ``<key>_n_inf``.
* Ties when picking "the object with the largest overlap" go to the smallest label, as the
  challenge code's ``mode`` does.
* Distances are in pixels unless ``spacing`` (per-axis pixel size) is given.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

TASKS = ("glands", "nuclei")

# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: prediction {a.shape} vs ground truth {b.shape}")


def _binary_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays (non-zero = foreground), after checking their shapes agree."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_same_shape(pred, gt)
    return pred != 0, gt != 0


def _instance_map(inst, name: str) -> np.ndarray:
    """An integer instance map, checked: integer or bool dtype, no negative labels."""
    inst = np.asarray(inst)
    if inst.dtype == bool:
        return inst.astype(np.int32)
    if not np.issubdtype(inst.dtype, np.integer):
        raise ValueError(f"{name} must be an integer instance map, got dtype {inst.dtype}")
    if inst.size and inst.min() < 0:
        raise ValueError(f"{name} has negative labels (min {inst.min()}); 0 is background")
    return inst


def _relabel(inst: np.ndarray) -> tuple[np.ndarray, int]:
    """Map the labels of ``inst`` onto 1..n in increasing order of the original ids (0 stays 0).

    Keeping the order means "smallest index" is "smallest original label", which keeps the
    tie-breaking rule independent of how the ids were spelled.
    """
    flat = inst.ravel()
    if flat.size == 0:
        return np.zeros(inst.shape, np.int32), 0
    if int(flat.max()) < 2**24:
        present = np.bincount(flat.astype(np.int64, copy=False)) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int64).astype(np.int32)
        lut[~present] = 0
        return lut[flat].reshape(inst.shape), int(present.sum())
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] != 0:  # no background pixel: shift so that the first object becomes 1
        inverse = inverse + 1
    return inverse.astype(np.int32).reshape(inst.shape), int(np.count_nonzero(ids))


# --------------------------------------------------------------------------------------------
# pixel metrics
# --------------------------------------------------------------------------------------------


def dice(pred, gt) -> float:
    """Dice coefficient 2|P∩G| / (|P|+|G|) of two binary masks; 1.0 when both are empty."""
    p, g = _binary_pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / total


def iou(pred, gt) -> float:
    """Intersection over union |P∩G| / |P∪G| of two binary masks; 1.0 when both are empty."""
    p, g = _binary_pair(pred, gt)
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(p & g)) / union


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Surface pixels: the mask minus its erosion by the cross element (image edge counts)."""
    return mask & ~ndimage.binary_erosion(mask)


def _distance_to(mask: np.ndarray, spacing) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest pixel of ``mask`` (0 inside it)."""
    return ndimage.distance_transform_edt(~mask, sampling=spacing)


def hd95(pred, gt, spacing: float | Sequence[float] = 1.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the boundaries of two binary masks.

    For each boundary pixel of one mask, the distance to the nearest boundary pixel of the other
    is taken; the result is the larger of the two directed 95th percentiles (as MONAI does).
    Being a percentile, it ignores a few stray pixels that would dominate :func:`hausdorff`.
    Both empty -> 0.0; exactly one empty -> ``inf`` (use :func:`aggregate` to average these).
    """
    p, g = _binary_pair(pred, gt)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return float("inf")
    bp, bg = _boundary(p), _boundary(g)
    d_pg = _distance_to(bg, spacing)[bp]
    d_gp = _distance_to(bp, spacing)[bg]
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def _bbox_of(mask: np.ndarray) -> tuple[slice, ...]:
    """Smallest box holding all True pixels of a non-empty mask."""
    return tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(mask))


def hausdorff(pred, gt, spacing: float | Sequence[float] = 1.0) -> float:
    """Symmetric Hausdorff distance between the pixel sets of two binary masks.

    max( max_{p in P} d(p, G), max_{g in G} d(g, P) ), the definition used by the GlaS challenge
    (its evaluation code takes the distance transform of the whole object, not only its outline).
    Pixels shared by both masks contribute 0, so it differs from the largest outline-to-outline
    distance (the 100th percentile of what :func:`hd95` ranks) when one object lies inside the
    other. Used by the object Hausdorff of :func:`glas_object_metrics`. Both empty -> 0.0;
    exactly one empty -> ``inf``.
    """
    p, g = _binary_pair(pred, gt)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return float("inf")
    box = _bbox_of(p | g)  # all of both sets lies in the box, so distances inside it are exact
    p, g = p[box], g[box]
    return float(max(_distance_to(g, spacing)[p].max(), _distance_to(p, spacing)[g].max()))


# --------------------------------------------------------------------------------------------
# object overlap table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Overlap:
    """Sparse contingency table of two relabelled instance maps (objects indexed from 0).

    ``pair_*`` list every (gt object, pred object) pair that shares at least one pixel.
    """

    gt_lab: np.ndarray  # relabelled GT map, objects 1..n_gt
    pred_lab: np.ndarray  # relabelled prediction map, objects 1..n_pred
    gt_area: np.ndarray  # (n_gt,)
    pred_area: np.ndarray  # (n_pred,)
    pair_gt: np.ndarray  # (P,) 0-based GT index
    pair_pred: np.ndarray  # (P,) 0-based prediction index
    pair_inter: np.ndarray  # (P,) shared pixels

    @property
    def pair_iou(self) -> np.ndarray:
        union = self.gt_area[self.pair_gt] + self.pred_area[self.pair_pred] - self.pair_inter
        return self.pair_inter / union


def _overlap(pred_inst, gt_inst) -> _Overlap:
    """Areas and pairwise intersections of all objects, from one pass over the pixels."""
    pred_inst = _instance_map(pred_inst, "prediction instance map")
    gt_inst = _instance_map(gt_inst, "ground-truth instance map")
    _check_same_shape(pred_inst, gt_inst)
    gt_lab, n_gt = _relabel(gt_inst)
    pred_lab, n_pred = _relabel(pred_inst)
    gt_area = np.bincount(gt_lab.ravel(), minlength=n_gt + 1)[1:]
    pred_area = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)[1:]
    both = (gt_lab > 0) & (pred_lab > 0)
    codes = (gt_lab[both].astype(np.int64) - 1) * max(n_pred, 1) + (pred_lab[both] - 1)
    pairs, inter = np.unique(codes, return_counts=True)
    return _Overlap(gt_lab, pred_lab, gt_area, pred_area,
                    pairs // max(n_pred, 1), pairs % max(n_pred, 1), inter)


def _best_pair(n_keys: int, key: np.ndarray, partner: np.ndarray, score: np.ndarray) -> np.ndarray:
    """For each key object, the index of its pair with the highest score (-1 if it has none).

    Ties go to the smallest partner index, i.e. the smallest original label.
    """
    best = np.full(n_keys, -1, dtype=np.int64)
    if key.size == 0:
        return best
    order = np.lexsort((partner, -score, key))
    sorted_key = key[order]
    first = np.r_[True, sorted_key[1:] != sorted_key[:-1]]
    best[sorted_key[first]] = order[first]
    return best


# --------------------------------------------------------------------------------------------
# GlaS object metrics
# --------------------------------------------------------------------------------------------


def _glas_f1(ov: _Overlap) -> float:
    """Detection F1: a prediction is a TP when it covers > 50% of its most-overlapped GT gland."""
    n_gt, n_pred = ov.gt_area.size, ov.pred_area.size
    best = _best_pair(n_pred, ov.pair_pred, ov.pair_gt, ov.pair_inter)
    hit = best[best >= 0]
    tp = int(np.count_nonzero(ov.pair_inter[hit] > 0.5 * ov.gt_area[ov.pair_gt[hit]]))
    fp, fn = n_pred - tp, n_gt - tp
    return 2.0 * tp / (2 * tp + fp + fn)


def _weighted_dice(area: np.ndarray, other_area: np.ndarray, best: np.ndarray,
                   partner: np.ndarray, inter: np.ndarray) -> float:
    """sum_i |X_i|/sum|X| * Dice(X_i, best partner of X_i); no partner -> Dice 0."""
    has = best >= 0
    pair = best[has]
    d = 2.0 * inter[pair] / (area[has] + other_area[partner[pair]])
    return float((area[has] * d).sum() / area.sum())


def _glas_object_dice(ov: _Overlap) -> float:
    """Object Dice: mean of the GT-weighted and the prediction-weighted object Dice."""
    best_g = _best_pair(ov.gt_area.size, ov.pair_gt, ov.pair_pred, ov.pair_inter)
    best_p = _best_pair(ov.pred_area.size, ov.pair_pred, ov.pair_gt, ov.pair_inter)
    g_term = _weighted_dice(ov.gt_area, ov.pred_area, best_g, ov.pair_pred, ov.pair_inter)
    p_term = _weighted_dice(ov.pred_area, ov.gt_area, best_p, ov.pair_gt, ov.pair_inter)
    return 0.5 * (g_term + p_term)


_GT, _PRED = 0, 1  # the two sides of an _ObjectDistances


class _ObjectDistances:
    """Hausdorff distances between the objects of a relabelled GT map and prediction map.

    Pairs that overlap are measured exactly on the crop holding both. An object that overlaps
    nothing is paired, as in the challenge code, with the object of the other map nearest to it
    in Hausdorff distance; that search ranks every candidate by a cheap lower bound (KD-trees on
    point sets) and measures exactly only while a candidate could still beat the best so far.
    """

    def __init__(self, gt_lab: np.ndarray, pred_lab: np.ndarray):
        self.labs = (gt_lab, pred_lab)
        self.boxes = (ndimage.find_objects(gt_lab), ndimage.find_objects(pred_lab))
        self._exact: dict[tuple[int, int], float] = {}
        self._outline_trees: dict[tuple[int, int], cKDTree] = {}
        self._extremes: dict[tuple[int, int], np.ndarray] = {}
        dirs = np.array(list(itertools.product((-1, 0, 1), repeat=gt_lab.ndim)))
        self._dirs = dirs[np.any(dirs != 0, axis=1)]

    def pair(self, g: int, p: int) -> float:
        """Hausdorff(GT object g, prediction object p), 0-based indices; cached."""
        if (g, p) not in self._exact:
            box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop))
                        for a, b in zip(self.boxes[_GT][g], self.boxes[_PRED][p]))
            self._exact[g, p] = hausdorff(self.labs[_PRED][box] == p + 1,
                                          self.labs[_GT][box] == g + 1)
        return self._exact[g, p]

    def _mask(self, side: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Object i of a side as a mask on its bounding box, and the box's corner."""
        box = self.boxes[side][i]
        return self.labs[side][box] == i + 1, np.array([b.start for b in box])

    def _points(self, side: int, i: int) -> np.ndarray:
        mask, corner = self._mask(side, i)
        return np.argwhere(mask) + corner

    def _outline_tree(self, side: int, i: int) -> cKDTree:
        """KD-tree of the object's outline. Seen from outside the object, its nearest pixel is
        always an outline pixel, so this tree gives exact distances to the object there."""
        if (side, i) not in self._outline_trees:
            mask, corner = self._mask(side, i)
            self._outline_trees[side, i] = cKDTree(np.argwhere(_boundary(mask)) + corner)
        return self._outline_trees[side, i]

    def _extreme_points(self, side: int, i: int) -> np.ndarray:
        """The object's outermost pixels along the axes and diagonals (a sample of the object)."""
        if (side, i) not in self._extremes:
            pts = self._points(side, i)
            self._extremes[side, i] = pts[np.argmax(pts @ self._dirs.T, axis=0)]
        return self._extremes[side, i]

    def nearest(self, side: int, i: int) -> float:
        """min over objects Y of the other side of Hausdorff(X, Y), X = object i of ``side``.

        X must overlap no object of the other side. Then the distance from X's pixels to Y is the
        distance to Y's outline (the exact directed distance X -> Y), and the distance from a
        sample of Y's pixels to X bounds Y -> X from below: their max is a lower bound of H(X, Y).
        """
        other = 1 - side
        pts = self._points(side, i)
        tree = cKDTree(pts)
        bound = np.empty(len(self.boxes[other]))
        for k in range(bound.size):
            x_to_y = self._outline_tree(other, k).query(pts)[0].max()
            y_to_x = tree.query(self._extreme_points(other, k))[0].max()
            bound[k] = max(x_to_y, y_to_x)
        best = float("inf")
        for k in np.argsort(bound, kind="stable"):
            if bound[k] >= best:
                break
            best = min(best, self.pair(i, int(k)) if side == _GT else self.pair(int(k), i))
        return best


def _weighted_hausdorff(area: np.ndarray, best: np.ndarray, pair_dist: np.ndarray,
                        nearest_dist: list[float]) -> float:
    """sum_i |X_i|/sum|X| * H(X_i, partner), partner = best overlap or else nearest object."""
    dist = np.empty(area.size)
    has = best >= 0
    dist[has] = pair_dist[best[has]]
    dist[~has] = nearest_dist
    return float((area * dist).sum() / area.sum())


def _glas_object_hausdorff(ov: _Overlap) -> float:
    """Object Hausdorff: mean of the GT-weighted and prediction-weighted object Hausdorff."""
    best_g = _best_pair(ov.gt_area.size, ov.pair_gt, ov.pair_pred, ov.pair_inter)
    best_p = _best_pair(ov.pred_area.size, ov.pair_pred, ov.pair_gt, ov.pair_inter)
    od = _ObjectDistances(ov.gt_lab, ov.pred_lab)
    pair_dist = np.zeros(ov.pair_inter.size)
    for i in np.unique(np.r_[best_g[best_g >= 0], best_p[best_p >= 0]]):
        pair_dist[i] = od.pair(int(ov.pair_gt[i]), int(ov.pair_pred[i]))
    near_g = [od.nearest(_GT, int(i)) for i in np.flatnonzero(best_g < 0)]
    near_p = [od.nearest(_PRED, int(i)) for i in np.flatnonzero(best_p < 0)]
    g_term = _weighted_hausdorff(ov.gt_area, best_g, pair_dist, near_g)
    p_term = _weighted_hausdorff(ov.pred_area, best_p, pair_dist, near_p)
    return 0.5 * (g_term + p_term)


def glas_object_metrics(pred_inst, gt_inst) -> dict[str, float]:
    """GlaS challenge object-level metrics (Sirinukunwattana et al., MedIA 2017).

    * ``object_f1``: each predicted object is matched to the GT object it overlaps most; it is a
      true positive when the overlap exceeds 50% of that GT object's area (at most one prediction
      can do so per GT object). FP = predictions that are not TP, FN = GT objects without a TP.
    * ``object_dice``: 0.5 * [sum_i w_i Dice(G_i, S*(G_i)) + sum_j w~_j Dice(G*(S_j), S_j)],
      w_i = |G_i| / sum|G|, w~_j = |S_j| / sum|S|, S*(G_i) = prediction overlapping G_i most
      (none -> Dice 0), G*(S_j) likewise.
    * ``object_hausdorff``: the same weighting of :func:`hausdorff` distances, where an object
      that overlaps nothing is paired with the nearest (smallest Hausdorff) object of the other
      set, as the challenge code does. In pixels.

    Both maps empty: f1 = dice = 1, hausdorff = 0. One empty: f1 = dice = 0, hausdorff = inf.
    Instance ids are arbitrary non-negative integers; 0 is background.
    """
    ov = _overlap(pred_inst, gt_inst)
    n_gt, n_pred = ov.gt_area.size, ov.pred_area.size
    if n_gt == 0 and n_pred == 0:
        return {"object_f1": 1.0, "object_dice": 1.0, "object_hausdorff": 0.0}
    if n_gt == 0 or n_pred == 0:
        return {"object_f1": 0.0, "object_dice": 0.0, "object_hausdorff": float("inf")}
    return {"object_f1": _glas_f1(ov), "object_dice": _glas_object_dice(ov),
            "object_hausdorff": _glas_object_hausdorff(ov)}


# --------------------------------------------------------------------------------------------
# nucleus metrics
# --------------------------------------------------------------------------------------------


def aji(pred_inst, gt_inst) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017).

    Each GT object G_i is paired with the prediction S_j of highest IoU (a prediction may serve
    several GT objects); C += |G_i ∩ S_j|, U += |G_i ∪ S_j| (U += |G_i| when it overlaps none).
    The areas of predictions never picked are added to U. AJI = C / U. Both empty -> 1.0.
    """
    ov = _overlap(pred_inst, gt_inst)
    if ov.gt_area.size == 0 and ov.pred_area.size == 0:
        return 1.0
    best = _best_pair(ov.gt_area.size, ov.pair_gt, ov.pair_pred, ov.pair_iou)
    pair = best[best >= 0]
    inter = ov.pair_inter[pair]
    used = np.zeros(ov.pred_area.size, dtype=bool)
    used[ov.pair_pred[pair]] = True
    c = int(inter.sum())
    u = (int(ov.gt_area.sum()) + int(ov.pred_area[ov.pair_pred[pair]].sum()) - c
         + int(ov.pred_area[~used].sum()))
    return c / u


def panoptic_quality(pred_inst, gt_inst, iou_threshold: float = 0.5) -> dict[str, float]:
    """Panoptic quality PQ = DQ * SQ (Kirillov et al., CVPR 2019) for one class of objects.

    A (GT, prediction) pair matches when its IoU exceeds ``iou_threshold``; for thresholds of at
    least 0.5 each object has at most one match. DQ = TP / (TP + FP/2 + FN/2),
    SQ = mean IoU over matches (0 without matches). Returns ``pq``, ``dq``, ``sq`` and the counts
    ``tp``, ``fp``, ``fn``. Both maps empty -> pq = dq = sq = 1.
    """
    if not 0.5 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0.5, 1) for unique matches, "
                         f"got {iou_threshold}")
    ov = _overlap(pred_inst, gt_inst)
    n_gt, n_pred = ov.gt_area.size, ov.pred_area.size
    match_iou = ov.pair_iou[ov.pair_iou > iou_threshold]
    tp = int(match_iou.size)
    fp, fn = n_pred - tp, n_gt - tp
    if n_gt == 0 and n_pred == 0:
        dq = sq = 1.0
    else:
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(match_iou.mean()) if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


# --------------------------------------------------------------------------------------------
# instances, per-image report, aggregation
# --------------------------------------------------------------------------------------------


def instances_from_binary(mask, min_size: int = 0, *, connectivity: int = 1) -> np.ndarray:
    """Connected components of a binary mask as an int32 instance map (objects 1..n).

    ``connectivity=1`` (default) joins pixels that share an edge (4-neighbourhood in 2D), so two
    glands touching only at a corner stay separate; 2 also joins diagonal neighbours. Components
    with fewer than ``min_size`` pixels are dropped. Objects that really touch merge into one,
    which is why object metrics on binary GlaS masks differ somewhat from the challenge's.
    """
    mask = np.asarray(mask) != 0
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    lab, n = ndimage.label(mask, structure=structure)
    if min_size > 0 and n:
        small = np.bincount(lab.ravel(), minlength=n + 1) < min_size
        small[0] = False
        lab[small[lab]] = 0
        lab, _ = _relabel(lab)
    return lab.astype(np.int32, copy=False)


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} has values in [{labels.min()}, {labels.max()}], expected class "
                         f"indices 0..{num_classes - 1} (is it a 0/255 mask?)")


def segmentation_report(pred_labels, gt_labels, *, task: str, num_classes: int,
                        pred_instances=None, gt_instances=None) -> dict[str, float]:
    """All metrics of one image, as used by ``genselfdiff evaluate``.

    Pixel metrics on the foreground (class > 0): ``dice``, ``iou``, ``hd95``; with more than two
    classes also ``dice_class{k}`` for k = 1..num_classes-1. Object metrics: for ``glands`` the
    GlaS ``object_f1``, ``object_dice``, ``object_hausdorff``; for ``nuclei`` ``aji``, ``pq``,
    ``dq``, ``sq``. Instance maps that are not given are the connected components
    (:func:`instances_from_binary`) of the foreground.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    _check_same_shape(pred_labels, gt_labels)
    _check_labels(pred_labels, num_classes, "prediction")
    _check_labels(gt_labels, num_classes, "ground truth")
    pred_fg, gt_fg = pred_labels > 0, gt_labels > 0
    report = {"dice": dice(pred_fg, gt_fg), "iou": iou(pred_fg, gt_fg),
              "hd95": hd95(pred_fg, gt_fg)}
    if num_classes > 2:
        for k in range(1, num_classes):
            report[f"dice_class{k}"] = dice(pred_labels == k, gt_labels == k)
    pred_inst = instances_from_binary(pred_fg) if pred_instances is None else pred_instances
    gt_inst = instances_from_binary(gt_fg) if gt_instances is None else gt_instances
    if task == "glands":
        report.update(glas_object_metrics(pred_inst, gt_inst))
    else:
        pq = panoptic_quality(pred_inst, gt_inst)
        report.update(aji=aji(pred_inst, gt_inst), pq=pq["pq"], dq=pq["dq"], sq=pq["sq"])
    return report


def _is_distance_key(key: str) -> bool:
    return "hd95" in key or "hausdorff" in key


def aggregate(reports: list[dict]) -> dict[str, float]:
    """Mean of each metric over per-image reports (a key missing in a report is skipped there).

    Distance keys (names containing ``hd95`` or ``hausdorff``) average only their finite values,
    since one image with an empty prediction would otherwise make the mean infinite; the number
    of infinite values is reported as ``<key>_n_inf`` (the mean is nan if none is finite).
    ``n_images`` is the number of reports.
    """
    if not reports:
        raise ValueError("no reports to aggregate")
    keys = list(dict.fromkeys(k for r in reports for k in r))
    out: dict[str, float] = {"n_images": float(len(reports))}
    for key in keys:
        values = np.array([float(r[key]) for r in reports if key in r])
        if _is_distance_key(key):
            finite = values[np.isfinite(values)]
            out[key] = float(finite.mean()) if finite.size else float("nan")
            out[f"{key}_n_inf"] = float(np.count_nonzero(np.isinf(values)))
        else:
            out[key] = float(values.mean())
    return out
