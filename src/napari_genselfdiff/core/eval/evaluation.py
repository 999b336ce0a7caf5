"""``genselfdiff evaluate``: score a segmentation model on labeled images.

Each image is predicted and post-processed at the model's microns per pixel
(:func:`core.resolution.segment_at_mpp`) and scored on its own masks at its own resolution. The
image's pixel size comes from ``mpp`` (one value for all, e.g. ``--mpp``), else from
``mpp_of(path)`` (the file's resolution tags, read by the caller), else it is unknown and the
model's own is assumed; ``result["resolution"]`` says which, in one line per case.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..data import LabeledImage, TaskSpec, list_images, load_labeled_folder, pair_images_and_masks, read_mask
from ..errors import DataError
from ..inference import TorchPredictor
from ..resolution import resolution_note, segment_at_mpp
from .postprocess import postprocess

if TYPE_CHECKING:
    from ..stain import LabStats


def evaluate_items(predictor: TorchPredictor, items: Sequence[LabeledImage],
                   gt_instances: dict[str, np.ndarray] | None = None, *, mpp: float | None = None,
                   mpps: dict[str, float | None] | None = None, stain: bool = False,
                   stain_of: Mapping[str, LabStats] | None = None) -> dict:
    """Per-image and mean metrics of ``predictor`` on labeled images held in memory, each run at
    the model's resolution: ``mpps[name]`` or else ``mpp`` is the image's pixel size (None:
    unknown, the model's own assumed). ``stain``: each image's stain normalised to the nearest the
    model records first (core/stain.py), from the image's own statistics or ``stain_of[name]`` (those
    of the slide or tile it was cut from, as a slide's run takes them once for the whole slide)."""
    from ..stain import lab_stats, model_targets, normalizer_for, with_stain
    from .metrics import aggregate, segmentation_report

    targets = model_targets(predictor.config, f"{getattr(predictor, 'source', 'the model')}/config.json") if stain else {}

    spec = TaskSpec.from_dict(predictor.config["task"])
    binary = spec.task != "multiclass"
    per_image = {}
    by_mpp: dict[float | None, int] = {}  # how many images at each pixel size
    for it in items:
        item_mpp = (mpps or {}).get(it.name, mpp)
        by_mpp[item_mpp] = by_mpp.get(item_mpp, 0) + 1
        source = (stain_of or {}).get(it.name) or lab_stats([it.image], it.name) if stain else None
        run = with_stain(predictor, normalizer_for(source, targets)) if stain else predictor
        _, semantic, inst, _ = segment_at_mpp(run, it.image, item_mpp, lambda p: postprocess(p, spec.task, getattr(predictor, "postprocess_options", None)))
        # glands / nuclei: the pixels of the objects the user gets (post-processing included)
        pred = (inst > 0).astype(np.uint8) if spec.task in ("glands", "nuclei") else \
            (semantic > 0).astype(np.uint8) if binary else semantic
        gt = (it.target > 0).astype(np.uint8) if binary else it.target
        per_image[it.name] = segmentation_report(
            pred, gt, task=spec.task, num_classes=2 if binary else spec.num_classes,
            pred_instances=inst, gt_instances=(gt_instances or {}).get(it.name))
    if not per_image:
        raise DataError("no labeled images to evaluate")
    return {"task": spec.task, "n_images": len(per_image), "mean": aggregate(list(per_image.values())),
            "per_image": per_image,
            "resolution": [note for m, n in by_mpp.items()
                           if (note := resolution_note(m, getattr(predictor, "mpp", None),
                                                       f"{n} image{'s' if n > 1 else ''}"))]}


def evaluate_folder(model: str | os.PathLike, images_dir, masks_dir, *, instances_dir=None,
                    device: str = "auto", predictor: TorchPredictor | None = None, mpp: float | None = None,
                    mpp_of=None, tta: int = 1, precision: str = "auto", stain: bool = False) -> dict:
    """Metrics of ``model`` on a folder of images with masks (and optional instance labels).
    ``mpp``: the images' pixel size (overrides the files); ``mpp_of(path) -> float | None`` reads
    it from a file (``slide.reader.file_mpp``) when ``mpp`` is not given. ``tta``: test-time
    augmentation views (core.inference.TTA_VIEWS); ``precision``: auto / fp32 / bf16 (core/precision.py);
    ``stain``: stain normalisation (core/stain.py)."""
    predictor = predictor or TorchPredictor.from_checkpoint(model, device=device, tta=tta, precision=precision)
    spec = TaskSpec.from_dict(predictor.config["task"])
    items = load_labeled_folder(images_dir, masks_dir, spec)
    mpps = None
    if mpp is None and mpp_of is not None:
        mpps = {img.stem: mpp_of(img) for img, _ in pair_images_and_masks(images_dir, masks_dir)}
    gt_inst = {}
    if instances_dir:
        files = {p.stem: p for p in list_images(instances_dir)}
        gt_inst = {it.name: read_mask(files[it.name]) for it in items if it.name in files}
    return {"model": str(model), "precision": predictor.precision.name,
            **({"stain": "normalised to the model's training stain"} if stain else {}),
            **evaluate_items(predictor, items, gt_inst, mpp=mpp, mpps=mpps, stain=stain)}


def format_report(result: dict) -> str:
    lines = [f"{result['task']} model {result.get('model', '')} on {result['n_images']} image(s)"
             + (f" in {result['precision']}" if result.get("precision") else "") + ":"]
    lines += [f"  resolution: {note}" for note in result.get("resolution", [])]
    lines += [f"  stain: {result['stain']}"] if result.get("stain") else []
    for k, v in result["mean"].items():
        lines.append(f"  {k:<20} {v:.4f}" if isinstance(v, float) else f"  {k:<20} {v}")
    return "\n".join(lines)
