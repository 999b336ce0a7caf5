"""Models trained at different microns per pixel, scored on the same pixels.

    python benchmarks/compare_resolutions.py MODEL [MODEL ...] --dataset monuseg|glas [--split test|val]

Each model predicts the split's images at its own um/px (core.resolution.segment_at_mpp resamples
the image to it and brings the objects back) and is scored on the images' stored masks and
instances at their stored resolution (MoNuSeg 0.25, GlaS 0.62 um/px): the one fair comparison
between, e.g., a nuclei model at 0.5 and one at 0.25 um/px, since a model's own test table is
computed at its own resolution, on masks resampled to it. Nuclei AJI / PQ over the images with
true instances, as everywhere (common.object_metrics_on_true_instances).
"""
from __future__ import annotations

import argparse
import json

from common import DATASETS, data_dir, object_metrics_on_true_instances, split_by_image

from napari_genselfdiff.core.data import TaskSpec, load_labeled_folder, read_mask  # noqa: E402
from napari_genselfdiff.core.eval.evaluation import evaluate_items  # noqa: E402
from napari_genselfdiff.core.inference import TorchPredictor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--dataset", choices=list(DATASETS), required=True)
    ap.add_argument("--split", choices=["test", "val"], default="test")
    a = ap.parse_args()
    ds = DATASETS[a.dataset]
    folder = data_dir() / ds.folder
    items = load_labeled_folder(folder / "images", folder / "masks", TaskSpec.make(ds.task))
    _, val, test = split_by_image([it.name for it in items])
    names = set(test if a.split == "test" else val)
    chosen = [it for it in items if it.name in names]
    inst = {}
    if (folder / "instances").is_dir():
        inst = {p.stem: read_mask(p) for p in sorted((folder / "instances").iterdir()) if p.stem in names}
    keys = ["dice", "iou", "object_f1", "object_dice"] if ds.task == "glands" else ["dice", "iou", "aji", "pq", "dq", "sq"]
    print(f"| model | um/px | {' | '.join(keys)} |\n|---|---|{'---|' * len(keys)}")
    for m in a.models:
        pred = TorchPredictor.from_checkpoint(m, device="cpu")
        mean = object_metrics_on_true_instances(evaluate_items(pred, chosen, inst, mpp=ds.mpp_native), inst)
        print(f"| {m} | {pred.mpp:g} | " + " | ".join(f"{mean[k]:.3f}" for k in keys) + " |", flush=True)
        print(json.dumps({"model": m, **mean}), flush=True)


if __name__ == "__main__":
    main()
