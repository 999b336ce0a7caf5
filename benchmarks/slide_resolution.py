"""The bundled models on slide levels at another pixel size than they learned: the level as it is
(what the tiler did before session 25) against the level resampled to the model's um/px
(slide/rescale.py), through the code path the whole-slide tiler and the napari view share
(slide/fov.FieldOfViewPredictor, then the model's post-processing in the level's pixels).

    python benchmarks/slide_resolution.py [--splits val test] [--json OUT]

Levels: each validation / test image of GlaS (stored at 0.62 um/px), MoNuSeg and CoNSeP (0.25 um/px)
turned into a one-level slide at the pixel size a real pyramid would offer the model:
glands (1.24 um/px) on a 1 um/px level (the closest level of a 20x slide with 2x downsamples or of
a 40x slide with 4x: 0.806 model pixels per level pixel) and on a 2 um/px level (a 20x slide with
4x downsamples: 1.61); nuclei (0.5 um/px) on a 0.25 um/px level (a 40x slide with 4x downsamples,
whose tie goes to the finer level: 0.5). The image is resampled to the level (anti-aliased) and
its true objects with it (nearest neighbour); scores on the level's pixels. Glands: objects by the
official gland ids; nuclei: AJI / PQ over the images with true instances.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from common import DATASETS, data_dir, load_dataset, machine
from napari_genselfdiff.bundled import resolve_model
from napari_genselfdiff.core.eval.metrics import aggregate, segmentation_report
from napari_genselfdiff.core.eval.postprocess import postprocess
from napari_genselfdiff.core.inference import TorchPredictor
from napari_genselfdiff.core.resolution import resize_image, resize_labels
from napari_genselfdiff.slide import fov as fov_module
from napari_genselfdiff.slide import tiler as tiler_module
from napari_genselfdiff.slide.consistency import image_slide
from napari_genselfdiff.slide.fov import FieldOfViewPredictor
from napari_genselfdiff.slide.rescale import LevelScale

# (model, data set, the level's um/px)
CASES = [("glands", "glas", 1.0), ("glands", "glas", 2.0), ("nuclei", "monuseg", 0.25), ("nuclei", "consep", 0.25)]
KEYS = {"glands": ("dice", "object_f1", "object_dice"), "nuclei": ("dice", "aji", "pq")}


def score(predictor, items, instances, native_mpp: float, level_mpp: float, resample: bool) -> dict:
    """Mean metrics of ``predictor`` on ``items`` made into levels at ``level_mpp``."""
    as_is = (lambda slide, level, p: LevelScale(1.0, int(getattr(p, "tile_multiple", 1) or 1)))
    saved = LevelScale.__dict__["of"]  # the classmethod itself, put back as it was
    task = predictor.task
    reports = []
    try:
        if not resample:  # the tiler before session 25: the level as it is (the tiler and the view share it)
            assert fov_module.LevelScale is tiler_module.LevelScale is LevelScale
            LevelScale.of = staticmethod(as_is)
        for it in items:
            f = native_mpp / level_mpp
            shape = (max(1, round(it.image.shape[0] * f)), max(1, round(it.image.shape[1] * f)))
            img = resize_image(it.image, shape)
            slide = image_slide(img, mpp=level_mpp)
            fov = FieldOfViewPredictor(predictor, slide, 0, tile=512, overlap=predictor.overlap, tissue=False)
            probs = fov.predict_region(0, 0, 0, *shape)
            opts = fov.scale(0).level_options(predictor.postprocess_options)
            _, inst = postprocess(probs, task, opts)
            gt_inst = instances.get(it.name)
            gt = resize_labels((it.target > 0).astype(np.uint8), shape)
            reports.append(segmentation_report((inst > 0).astype(np.uint8), gt, task=task, num_classes=2,
                                               pred_instances=inst,
                                               gt_instances=None if gt_inst is None else resize_labels(gt_inst, shape)))
    finally:
        LevelScale.of = saved
    return aggregate(reports)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    root = data_dir()
    rows = []
    for model, ds_name, level_mpp in CASES:
        ds = replace(DATASETS[ds_name], downsample=1.0)  # the stored images: the levels are made from them
        _train, val, test, inst = load_dataset(ds, root)
        predictor = TorchPredictor.from_checkpoint(resolve_model(model), device="cpu")
        for split in a.splits:
            items = val if split == "val" else test
            for resample in (False, True):
                m = score(predictor, items, inst, ds.mpp_native, level_mpp, resample)
                rows.append({"model": model, "data": ds_name, "split": split, "level_mpp": level_mpp,
                             "factor": round(level_mpp / predictor.mpp, 3), "resampled": resample,
                             "images": len(items), **{k: round(float(m[k]), 4) for k in KEYS[model]}})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nThe bundled models on slide levels at another um/px ({machine()}):\n")
    print("| model | data | split | level um/px (model px per level px) | level as it is: Dice / F1 or AJI / "
          "object Dice or PQ | resampled to the model's um/px |\n|---|---|---|---|---|---|")
    for r0, r1 in zip(rows[::2], rows[1::2]):
        k = KEYS[r0["model"]]
        print(f"| {r0['model']} | {r0['data']} | {r0['split']} | {r0['level_mpp']} ({r0['factor']}) | "
              + " / ".join(f"{r0[x]:.3f}" for x in k) + " | **" + " / ".join(f"{r1[x]:.3f}" for x in k) + "** |")
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
