"""``genselfdiff evaluate``: score a segmentation model on a folder of labeled images."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import write_json_atomic, write_png_atomic  # noqa: F401  (re-exported for the CLI)
from .data import TaskSpec, list_images, pair_images_and_masks, read_image, read_mask
from .errors import DataError
from .inference import TorchPredictor, predict_image


def postprocess(probs: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(semantic class map, instance labels) from class probabilities (C, H, W)."""
    from ..slide.instances import glands_from_probabilities, nuclei_from_probabilities

    semantic = probs.argmax(0).astype(np.uint8)
    if task == "nuclei":
        boundary = probs[2] if probs.shape[0] > 2 else None
        inst = nuclei_from_probabilities(probs[1], boundary)
    else:
        inst = glands_from_probabilities(1.0 - probs[0])
    return semantic, inst


def evaluate_folder(model: str | os.PathLike, images_dir, masks_dir, *, instances_dir=None,
                    device: str = "auto", predictor: TorchPredictor | None = None) -> dict:
    """Per-image and mean metrics of ``model`` on the labeled images of a folder."""
    from .metrics import aggregate, segmentation_report

    predictor = predictor or TorchPredictor.from_checkpoint(model, device=device)
    spec = TaskSpec.from_dict(predictor.config["task"])
    inst_files = {p.stem: p for p in list_images(instances_dir)} if instances_dir else {}
    per_image = {}
    for img_path, mask_path in pair_images_and_masks(images_dir, masks_dir):
        image, mask = read_image(img_path), read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DataError(f"{mask_path}: mask size {mask.shape} differs from image size {image.shape[:2]}")
        probs = predict_image(predictor, image)
        semantic, inst = postprocess(probs, spec.task)
        gt_inst = read_mask(inst_files[img_path.stem]) if img_path.stem in inst_files else None
        gt = (mask > 0).astype(np.uint8) if spec.task != "multiclass" else mask
        pred = (semantic > 0).astype(np.uint8) if spec.task != "multiclass" else semantic
        per_image[img_path.name] = segmentation_report(
            pred, gt, task=spec.task, num_classes=2 if spec.task != "multiclass" else spec.num_classes,
            pred_instances=inst, gt_instances=gt_inst)
    if not per_image:
        raise DataError(f"{images_dir}: no labeled images to evaluate")
    return {"model": str(model), "task": spec.task, "n_images": len(per_image),
            "mean": aggregate(list(per_image.values())), "per_image": per_image}


def format_report(result: dict) -> str:
    lines = [f"{result['task']} model {result['model']} on {result['n_images']} image(s):"]
    for k, v in result["mean"].items():
        lines.append(f"  {k:<20} {v:.4f}" if isinstance(v, float) else f"  {k:<20} {v}")
    return "\n".join(lines)
