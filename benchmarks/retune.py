"""Choose a trained model's post-processing again on its VALIDATION split, with today's grid.

    python benchmarks/retune.py MODEL_DIR --dataset monuseg|glas [--write]

Fine-tuning tunes the instance thresholds once, at its end (core.eval.tuning); when the grid grows
(e.g. nuclei markers by h-maxima, ``split``), a model trained before can be re-tuned without
training it again. Predicts the dataset's validation images (the split of
common.split_by_image, never the test split), runs the grid search, prints the best and the
stored options' scores, and with ``--write`` replaces ``config.json``'s ``postprocess`` /
``postprocess_tuning`` of that checkpoint (atomically; only a checkpoint we wrote; the weights
and their SHA-256 are untouched).
"""
from __future__ import annotations

import argparse
import json

from common import DATASETS, data_dir, load_dataset

from napari_genselfdiff.core import checkpoint as ck  # noqa: E402  (after common puts src/ on the path)
from napari_genselfdiff.core.atomic import write_json_atomic  # noqa: E402
from napari_genselfdiff.core.inference import TorchPredictor, predict_image  # noqa: E402
from napari_genselfdiff.core.eval.tuning import instances_of_target, score, tune_postprocess  # noqa: E402
from napari_genselfdiff.core.eval.postprocess import postprocess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--dataset", choices=list(DATASETS), required=True)
    ap.add_argument("--write", action="store_true", help="store the chosen options in the model's config.json")
    a = ap.parse_args()
    ds = DATASETS[a.dataset]
    model = ck.resolve(a.model)
    pred = TorchPredictor.from_checkpoint(model, device="cpu")
    cfg = ck.load_config(model)
    ds = type(ds)(ds.name, ds.task, ds.folder, cfg["mpp"] / ds.mpp_native, ds.mpp_native)  # the model's own um/px
    _, val, _, inst = load_dataset(ds, data_dir(), boundary=cfg["task"].get("boundary", False))
    probs = [predict_image(pred, it.image) for it in val]
    gts = [inst.get(it.name) if it.name in inst else instances_of_target(it.target, ds.task) for it in val]
    stored = pred.postprocess_options
    before = sum(score(ds.task, postprocess(p, ds.task, stored)[1], g) for p, g in zip(probs, gts)) / len(val)
    options, report = tune_postprocess(ds.task, probs, gts, mpp=cfg.get("mpp"))
    print(json.dumps({"stored": stored, "stored_score": before, "best": options, "best_score": report["best"],
                      "n_images": len(val)}))
    if a.write:
        if not ck.is_our_checkpoint(model):
            raise SystemExit(f"{model}: not a checkpoint written by genselfdiff; not changing it")
        cfg.update(postprocess=options, postprocess_tuning=report)
        write_json_atomic(model / "config.json", cfg)
        print(f"{model}: post-processing options replaced")


if __name__ == "__main__":
    main()
