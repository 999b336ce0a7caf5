"""``genselfdiff demo``: the main job, end to end, with what ships in the package.

With the bundled default models it predicts glands and nuclei on the bundled sample image and
writes label TIFFs, QuPath GeoJSON and an overlay PNG a person can look at. Where a bundled model
is missing it trains one briefly instead (pretrain -> fine-tune -> evaluate on the shared GlaS
data), printing the metrics.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .core.atomic import write_png_atomic
from .core.data import read_image
from .core.errors import DataError

def overlay(image: np.ndarray, labels: dict[str, np.ndarray]) -> np.ndarray:
    """The image with each label set's object outlines drawn in its colour."""
    from skimage.segmentation import find_boundaries

    from .predict import COLOURS

    out = image.copy()
    for name, lab in labels.items():
        out[find_boundaries(lab, mode="inner")] = COLOURS.get(name, (255, 255, 0))
    return out


def predict_sample(models: dict[str, Path], image_path: Path, out: Path, device: str = "auto") -> dict:
    """Predict each model on one image at the model's resolution (the tiler picks the pyramid
    level), export label TIFF + GeoJSON per model and one overlay PNG. Returns a summary."""
    from .core.inference import TorchPredictor
    from .predict import _drive, export_store, labels_at_level0, open_prediction
    from .slide.tiler import predict_slide

    image = read_image(image_path)
    out.mkdir(parents=True, exist_ok=True)
    summary, labels = {}, {}
    for name, path in models.items():
        predictor = TorchPredictor.from_checkpoint(path, device=device)
        store = out / f"{name}.zarr"
        _drive(predict_slide(predictor, image_path, store, level="auto", tile=256, overlap=32,
                             class_names=predictor.class_names, postprocess=predictor.task, overwrite=True), name)
        group = open_prediction(store)
        written = export_store(group, geojson=str(out / f"{name}.geojson"), tiff=str(out / f"{name}_labels.tif"))
        labels[name] = labels_at_level0(group, name, image.shape[:2])
        summary[name] = {"objects": written["geojson"], "foreground_fraction": float((labels[name] > 0).mean()),
                         "level": int(group.attrs["genselfdiff"]["settings"]["level"]),
                         "geojson": str(out / f"{name}.geojson"), "labels": str(out / f"{name}_labels.tif")}
        print(f"{name}: {written['geojson']} objects, {100 * summary[name]['foreground_fraction']:.1f}% of the image "
              f"(pyramid level {summary[name]['level']})")
    write_png_atomic(out / "overlay.png", overlay(image, labels))
    summary["overlay"] = str(out / "overlay.png")
    print(f"overlay: {out / 'overlay.png'}")
    return summary


def train_briefly(data: Path, out: Path, quick: bool, device: str) -> dict:
    """Pretrain -> fine-tune -> evaluate a small model on GlaS (the job before bundled models)."""
    from .cli import _progress_bar
    from .core.data import TaskSpec, load_labeled_folder, split_items, unlabeled_sources
    from .core.evaluation import evaluate_items, format_report
    from .core.inference import TorchPredictor
    from .core.training import FinetuneConfig, PretrainConfig, finetune, pretrain

    glas = data / "glas" / "train"
    if not (glas / "images").is_dir():
        raise DataError(f"{glas}: GlaS training set not found (needed to train without bundled models)")
    steps = (20, 20) if quick else (600, 400)
    spec = TaskSpec.make("glands")
    items = load_labeled_folder(glas / "images", glas / "masks", spec)
    train, val = split_items(items, 0.2, seed=0)
    sources = unlabeled_sources([glas / "images"])
    _progress_bar(pretrain(sources, out / "pretrained", PretrainConfig(preset="tiny", steps=steps[0], patch=64,
                                                                     batch=8, lr=1e-3), device=device,
                           overwrite=True), "pretrain")
    _progress_bar(finetune(train, out / "glands", FinetuneConfig(preset="tiny", steps=steps[1], patch=128, batch=8,
                                                                lr=1e-3), init=out / "pretrained",
                           device=device, overwrite=True), "finetune")
    predictor = TorchPredictor.from_checkpoint(out / "glands", device=device)
    result = {"model": str(out / "glands"), **evaluate_items(predictor, val)}
    print(format_report(result))
    return result["mean"]


def run_demo(a: argparse.Namespace) -> int:
    from .models import bundled_models, sample_image_path

    out = Path(a.out)
    models = bundled_models()
    summary: dict = {}
    if not {"glands", "nuclei"} <= set(models):
        data = Path(a.data) if a.data else Path(__file__).resolve().parents[3].parent / "shared" / "data"
        print(f"bundled models missing ({', '.join(models) or 'none'}): training a small gland model on {data}")
        summary["trained"] = train_briefly(data, out, a.quick, a.device)
        models = {**models, "glands": out / "glands"}
    summary["predicted"] = predict_sample(models, sample_image_path(), out, a.device)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: results in {out}")
    return 0
