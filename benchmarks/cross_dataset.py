"""Models across data sets: each model on the validation and test splits of MoNuSeg and CoNSeP
(nuclei) or GlaS (glands) (split by image / by tile, benchmarks/common.split_by_image), in one run. A
model trained on one set and scored on the other is the proxy for a pathologist's own slides (leave
one data set out).

    python benchmarks/cross_dataset.py --model shipped=nuclei --model mixed=benchmarks/_work/mix/nuclei \
        [--splits val test] [--json OUT]
    python benchmarks/cross_dataset.py --datasets glas --model shipped=glands --model new=PATH

Dice on the binary mask; AJI and PQ over the images with true instance labels (all of both sets);
glands: object F1 and object Dice by the official gland ids. Decisions are taken on the validation
rows only; the test rows are printed for the record.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import DATASETS, data_dir, evaluate, load_dataset, machine
from napari_genselfdiff.bundled import resolve_model

KEYS = {"nuclei": ("dice", "aji", "pq"), "glands": ("dice", "object_f1", "object_dice")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                    help="a model to score (a checkpoint folder, 'nuclei' or 'glands'); repeat for several")
    ap.add_argument("--datasets", nargs="+", default=["monuseg", "consep"], choices=["monuseg", "consep", "glas"])
    ap.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    models = dict(m.split("=", 1) for m in a.model)
    root = data_dir()
    sets = {n: load_dataset(DATASETS[n], root) for n in a.datasets}
    rows = []
    for split in a.splits:
        for ds, (_train, val, test, inst) in sets.items():
            items = val if split == "val" else test
            for name, path in models.items():
                m = evaluate(resolve_model(path), items, inst)
                rows.append({"model": name, "dataset": ds, "split": split, "images": len(items),
                             **{k: round(float(m[k]), 4) for k in KEYS[DATASETS[ds].task]}})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nModels across data sets ({machine()}):\n")
    print("| split | data set | model | images | Dice | AJI / object F1 | PQ / object Dice |\n|---|---|---|---|---|---|---|")
    for r in rows:
        a_, b_ = KEYS[DATASETS[r["dataset"]].task][1:]
        print(f"| {r['split']} | {r['dataset']} | {r['model']} | {r['images']} | {r['dice']:.3f} | {r[a_]:.3f} | "
              f"{r[b_]:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "models": models, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
