"""``genselfdiff demo``: the main job, end to end, with what ships in the package.

With the bundled default models it predicts glands and nuclei on the bundled sample image and
writes label TIFFs, QuPath GeoJSON and an overlay PNG a person can look at. Where a bundled model
is missing it trains one briefly instead (pretrain -> fine-tune -> evaluate on the shared GlaS
data), printing the metrics.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..core.atomic import check_target, is_our_json, json_marker, write_json_atomic, write_png_atomic
from ..core.data import read_image
from ..core.errors import DataError
from .console import progress_bar
from .predict import PREDICT_UNITS, check_exports, export_store

#: the marker kind of the demo's summary.json (core.atomic.json_marker): the one summary a rerun replaces
SUMMARY_KIND = "demo summary"

#: A glands result covering more of the image than this is flagged: glandular epithelium rarely covers
#: more than half of a colon section's tissue, and the skin sample has none.
GLANDS_IMPLAUSIBLE = 0.4

#: The repository checkout this module runs from (src/napari_genselfdiff/cli/demo.py).
_REPO = Path(__file__).resolve().parents[3]


def predict_sample(models: dict[str, Path], image_path: Path, out: Path, device: str = "auto") -> dict:
    """Predict each model on one image at the model's resolution (the tiler picks the pyramid
    level), export label TIFF + GeoJSON per model and one overlay PNG. Returns a summary."""
    from ..core.inference import TorchPredictor
    from ..formats.overlay import overlay
    from ..slide.store import PredictionStore
    from ..slide.tiler import predict_slide

    image = read_image(image_path)
    out.mkdir(parents=True, exist_ok=True)
    summary, labels = {}, {}
    for name, path in models.items():
        predictor = TorchPredictor.from_checkpoint(path, device=device)
        target = out / f"{name}.zarr"
        progress_bar(predict_slide(predictor, image_path, target, level="auto", tile=256, overlap=32,
                                   class_names=predictor.class_names, postprocess=predictor.task, overwrite=True,
                                   postprocess_options=predictor.postprocess_options),
                     name, units=PREDICT_UNITS)
        store = PredictionStore.open(target)
        if name == "glands":
            from ..slide.glands_check import check_store_glands
            from ..slide.reader import open_slide

            with open_slide(image_path) as slide:
                check = check_store_glands(store, slide)
            if check is not None and check.no_glands:  # no exports, nothing drawn: one line saying why
                summary[name] = {"skipped": check.reason, "store": str(target)}
                print(f"glands: skipped, no glands here: {check.reason}")
                continue
        written = export_store(store, geojson=str(out / f"{name}.geojson"), tiff=str(out / f"{name}_labels.tif"),
                               csv=str(out / f"{name}_measurements.csv"),
                               force=True)  # ours only (check_demo_outputs ran first; export_store checks again)
        labels[name] = store.labels_at_level0(name, image.shape[:2])
        summary[name] = {"objects": written.objects, "foreground_fraction": float((labels[name] > 0).mean()),
                         "level": store.level, "geojson": written.geojson, "labels": written.tiff,
                         "measurements": written.csv}
        print(f"{name}: {written.objects} objects, {100 * summary[name]['foreground_fraction']:.1f}% of the image "
              f"(pyramid level {summary[name]['level']})")
        if name == "glands" and summary[name]["foreground_fraction"] > GLANDS_IMPLAUSIBLE:
            print(f"glands: note: {100 * summary[name]['foreground_fraction']:.0f}% of the image labelled as gland is "
                  "implausible: the glands model learned colon glands (GlaS); on tissue without glands (the bundled "
                  "sample is skin) its output is not meaningful. Use it on colorectal / glandular tissue.")
    write_png_atomic(out / "overlay.png", overlay(image, labels))
    summary["overlay"] = str(out / "overlay.png")
    print(f"overlay: {out / 'overlay.png'}")
    return summary


def train_briefly(data: Path, out: Path, quick: bool, device: str) -> dict:
    """Pretrain -> fine-tune -> evaluate a small model on GlaS (the job before bundled models)."""
    from ..core.data import TaskSpec, load_labeled_folder, split_items
    from ..slide.sources import unlabeled_sources
    from ..core.eval.evaluation import evaluate_items, format_report
    from ..core.inference import TorchPredictor
    from ..core.train.training import FinetuneConfig, PretrainConfig, finetune, pretrain

    glas = data / "glas" / "train"
    if not (glas / "images").is_dir():
        raise DataError(f"{glas}: GlaS training set not found (needed to train without bundled models)")
    steps = (20, 20) if quick else (600, 400)
    spec = TaskSpec.make("glands")
    items = load_labeled_folder(glas / "images", glas / "masks", spec)
    train, val = split_items(items, 0.2, seed=0)
    sources = unlabeled_sources([glas / "images"])
    progress_bar(pretrain(sources, out / "pretrained", PretrainConfig(preset="tiny", steps=steps[0], patch=64,
                                                                    batch=8, lr=1e-3), device=device,
                          overwrite=True), "pretrain")
    progress_bar(finetune(train, out / "glands", FinetuneConfig(preset="tiny", steps=steps[1], patch=128, batch=8,
                                                               lr=1e-3), init=out / "pretrained",
                          device=device, overwrite=True), "finetune")
    predictor = TorchPredictor.from_checkpoint(out / "glands", device=device)
    result = {"model": str(out / "glands"), **evaluate_items(predictor, val)}
    print(format_report(result))
    return result["mean"]


def check_demo_outputs(out: Path, names) -> None:
    """Every file the demo writes into ``out``, checked before any work: a rerun replaces the demo's
    own outputs, and a user's file of the same name is never replaced (one DataError naming it)."""
    from ..slide.store import is_our_store

    for name in names:
        check_exports(geojson=str(out / f"{name}.geojson"), tiff=str(out / f"{name}_labels.tif"),
                      csv=str(out / f"{name}_measurements.csv"), force=True)
        check_target(out / f"{name}.zarr", kind="prediction store", force=True, ours=is_our_store)
    check_exports(overlay=str(out / "overlay.png"), force=True)
    check_target(out / "summary.json", kind="demo summary", force=True, ours=lambda p: is_our_json(p, SUMMARY_KIND))


def run_demo(a: argparse.Namespace) -> int:
    from ..bundled import bundled_models, sample_image_path

    out = Path(a.out)
    models = bundled_models()
    check_demo_outputs(out, ["glands", "nuclei"])
    summary: dict = {}
    if not {"glands", "nuclei"} <= set(models):
        data = Path(a.data) if a.data else _REPO.parent / "shared" / "data"
        print(f"bundled models missing ({', '.join(models) or 'none'}): training a small gland model on {data}")
        summary["trained"] = train_briefly(data, out, a.quick, a.device)
        models = {**models, "glands": out / "glands"}
    summary["predicted"] = predict_sample(models, sample_image_path(), out, a.device)
    write_json_atomic(out / "summary.json", {**summary, **json_marker(SUMMARY_KIND)})
    print(f"done: results in {out}")
    return 0
