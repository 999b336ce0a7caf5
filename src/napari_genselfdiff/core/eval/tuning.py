"""Post-processing thresholds tuned on validation images, stored with the model.

The class probabilities a model outputs become objects through a few thresholds (foreground,
nucleus markers, smallest object; :data:`.postprocess.OPTIONS`). At the end of fine-tuning those
are chosen on the VALIDATION images by a small grid search for the task's object score, and
written into the checkpoint's ``config["postprocess"]``: the CLI, the napari widgets and
``evaluate`` all read them from there (:class:`..inference.TorchPredictor.postprocess_options`),
so every path applies the same rules. Test images are never seen here.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np

from ..progress import run_to_end
from .postprocess import GLAND_GROW, at_mpp, options_for, postprocess

#: The values tried, per task (every combination).
GRIDS = {"glands": {"threshold": (0.3, 0.4, 0.5, 0.6, 0.7), "min_size": (50, 100, 200, 400),
                    "marker_threshold": (0.5, 0.4, 0.6, 0.7), "grow": (3, 6)},
         "nuclei": {"threshold": (0.3, 0.4, 0.5, 0.6), "marker_threshold": (0.4, 0.5, 0.6, 0.7, 0.8),
                    "min_size": (5, 10, 20), "split": (0.0, 0.5, 1.0),
                    "distance_h": (0.05, 0.1, 0.2, 0.3)}}


def instances_of_target(target: np.ndarray, task: str) -> np.ndarray:
    """Ground-truth objects recovered from a class-id target: for 3-class targets the
    interiors (class 1) grown into their boundary pixels (class 2, nuclei boundary or gland
    contour); binary nuclei masks with touching nuclei split (:func:`..data.split_touching`);
    binary glands masks: connected components."""
    from ..data import objects_of_mask, target_instances

    target = np.asarray(target)
    if task in ("nuclei", "glands") and (target == 2).any():
        return target_instances(target, grow=GLAND_GROW if task == "glands" else 2).astype(np.int32)
    return objects_of_mask(target > 0, task)


def score(task: str, instances: np.ndarray, gt_instances: np.ndarray) -> float:
    """What the search maximises on one image: glands object F1 + object Dice (the GlaS ranking's
    first two criteria); nuclei AJI + PQ + pixel Dice."""
    from .metrics import aji, dice, glas_object_metrics, panoptic_quality

    if task == "nuclei":
        return (aji(instances, gt_instances) + panoptic_quality(instances, gt_instances)["pq"]
                + dice(instances > 0, gt_instances > 0))
    m = glas_object_metrics(instances, gt_instances)
    return m["object_f1"] + m["object_dice"]


def redundant(opts: dict, grid: dict, probabilities: Sequence[np.ndarray]) -> bool:
    """Combinations that repeat another: nuclei markers from a learned distance map (a 4th
    channel) read ``distance_h`` only, the others never read it; markers by h-maxima
    (``split`` > 0) do not read ``marker_threshold``, and models without a boundary class read
    neither; glands models without a contour class read neither ``marker_threshold`` nor
    ``grow``."""
    first = {k: v[0] for k, v in grid.items()}
    if "grow" in opts:  # glands
        two_class = all(p.shape[0] < 3 for p in probabilities)
        return two_class and any(opts.get(k) != first[k] for k in ("marker_threshold", "grow") if k in opts)
    if "distance_h" in opts:
        if all(p.shape[0] > 3 for p in probabilities):
            return any(opts.get(k) != first[k] for k in ("split", "marker_threshold") if k in opts)
        if opts["distance_h"] != first["distance_h"]:
            return True
    if opts.get("split", 0) > 0:
        two_class = all(p.shape[0] < 3 for p in probabilities)
        return two_class or opts.get("marker_threshold") != grid["marker_threshold"][0]
    return False


def grid_at(task: str, mpp: float | None) -> dict:
    """The task's grid with its areas and lengths in pixels rescaled to a model at ``mpp``
    (:func:`.postprocess.at_mpp`; the grids are written for the bundled models' um/px)."""
    return {k: tuple(at_mpp(task, {k: v}, mpp)[k] for v in values) for k, values in GRIDS[task].items()}


def tune_postprocess(task: str, probabilities: Sequence[np.ndarray], gt_instances: Sequence[np.ndarray],
                     grid: dict | None = None, mpp: float | None = None) -> tuple[dict, dict]:
    """The post-processing options of ``task`` that maximise the mean :func:`score` over the
    validation images (``probabilities[i]``: (C, H, W) of image i; ``gt_instances[i]``: its objects)
    of a model at ``mpp`` um/px (the grid and defaults in its pixels, :func:`grid_at`).
    Returns (every option of the task, the searched ones at their best; report) with the report
    holding the best and the default options' scores. :func:`iter_tune_postprocess` says how far."""
    return run_to_end(iter_tune_postprocess(task, probabilities, gt_instances, grid, mpp))


def iter_tune_postprocess(task: str, probabilities: Sequence[np.ndarray], gt_instances: Sequence[np.ndarray],
                          grid: dict | None = None, mpp: float | None = None) -> Iterator[tuple[int, int]]:
    """:func:`tune_postprocess`, yielding (settings tried, settings to try) after each."""
    if task not in GRIDS:
        return {}, {"note": f"no post-processing to tune for {task}"}
    grid = grid or grid_at(task, mpp)
    keys = list(grid)
    full = options_for(task, None, mpp)  # the options not searched keep their (rescaled) defaults
    defaults = {k: full[k] for k in keys}
    todo = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    todo = [opts for opts in todo if not redundant(opts, grid, probabilities)]
    results = []
    for opts in todo:
        s = [score(task, postprocess(p, task, {**full, **opts})[1], g) for p, g in zip(probabilities, gt_instances)]
        results.append((float(np.mean(s)), opts))
        yield len(results), len(todo)
    best_score, best = max(results, key=lambda r: r[0])
    default_score = next((s for s, o in results if o == defaults), None)
    if default_score is None:
        default_score = float(np.mean([score(task, postprocess(p, task, full)[1], g)
                                       for p, g in zip(probabilities, gt_instances)]))
    report = {"score": "object_f1 + object_dice" if task == "glands" else "aji + pq + dice",
              "best": best_score, "default": default_score, "n_images": len(probabilities),
              "grid": {k: list(v) for k, v in grid.items()}}
    return options_for(task, best, mpp), report
