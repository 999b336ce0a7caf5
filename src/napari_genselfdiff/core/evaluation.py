"""``genselfdiff evaluate``: score a segmentation model on labeled images."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .data import LabeledImage, TaskSpec, list_images, load_labeled_folder, read_mask
from .errors import DataError
from .inference import TorchPredictor, predict_image
from .postprocess import postprocess


def evaluate_items(predictor: TorchPredictor, items: Sequence[LabeledImage],
                   gt_instances: dict[str, np.ndarray] | None = None) -> dict:
    """Per-image and mean metrics of ``predictor`` on labeled images held in memory."""
    from .metrics import aggregate, segmentation_report

    spec = TaskSpec.from_dict(predictor.config["task"])
    binary = spec.task != "multiclass"
    per_image = {}
    for it in items:
        probs = predict_image(predictor, it.image)
        semantic, inst = postprocess(probs, spec.task)
        pred = (semantic > 0).astype(np.uint8) if binary else semantic
        gt = (it.target > 0).astype(np.uint8) if binary else it.target
        per_image[it.name] = segmentation_report(
            pred, gt, task=spec.task, num_classes=2 if binary else spec.num_classes,
            pred_instances=inst, gt_instances=(gt_instances or {}).get(it.name))
    if not per_image:
        raise DataError("no labeled images to evaluate")
    return {"task": spec.task, "n_images": len(per_image), "mean": aggregate(list(per_image.values())),
            "per_image": per_image}


def evaluate_folder(model: str | os.PathLike, images_dir, masks_dir, *, instances_dir=None,
                    device: str = "auto", predictor: TorchPredictor | None = None) -> dict:
    """Metrics of ``model`` on a folder of images with masks (and optional instance labels)."""
    predictor = predictor or TorchPredictor.from_checkpoint(model, device=device)
    spec = TaskSpec.from_dict(predictor.config["task"])
    items = load_labeled_folder(images_dir, masks_dir, spec)
    gt_inst = {}
    if instances_dir:
        files = {p.stem: p for p in list_images(instances_dir)}
        gt_inst = {it.name: read_mask(files[it.name]) for it in items if it.name in files}
    return {"model": str(model), **evaluate_items(predictor, items, gt_inst)}


def format_report(result: dict) -> str:
    lines = [f"{result['task']} model {result.get('model', '')} on {result['n_images']} image(s):"]
    for k, v in result["mean"].items():
        lines.append(f"  {k:<20} {v:.4f}" if isinstance(v, float) else f"  {k:<20} {v}")
    return "\n".join(lines)
