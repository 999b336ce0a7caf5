"""Does bf16 change the answer? The bundled models in fp32 and in bf16 on the VALIDATION split
(benchmarks/common.split_by_image; never the test split), in one run: Dice, object F1 / object
Dice (glands), AJI / PQ (nuclei, on the tiles with true instances), the largest probability
difference, tiling seams in bf16 (256-px tiles at the model's overlap against one piece), and each
precision's forward speed on one 512-px tile.

    python benchmarks/precision.py [--json OUT] [--datasets glas monuseg] [--seam-tiles 3]

On a CPU without native bf16 (no avx512_bf16 / amx_bf16 / Arm bf16) oneDNN emulates it: the
numbers still answer "does the answer move", the speeds say why ``auto`` picks fp32 there.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import DATASETS, data_dir, evaluate_predictor, load_dataset, machine
from napari_genselfdiff.bundled import resolve_model
from napari_genselfdiff.core.inference import TorchPredictor, predict_image
from napari_genselfdiff.core.precision import cpu_bf16_native, resolve_precision
from napari_genselfdiff.slide.consistency import compare

KEYS = {"glands": ["dice", "object_f1", "object_dice"], "nuclei": ["dice", "aji", "pq"]}
MODEL = {"glands": "glands", "nuclei": "nuclei"}


def forward_mpx_s(pred: TorchPredictor, repeats: int = 3) -> float:
    tile = np.random.default_rng(0).integers(0, 255, (1, 512, 512, 3), dtype=np.uint8)
    pred(tile)
    t0 = time.perf_counter()
    for _ in range(repeats):
        pred(tile)
    return 512 * 512 / 1e6 / ((time.perf_counter() - t0) / repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--seam-tiles", type=int, default=3, help="validation images checked for tiling seams in bf16")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    root = data_dir()
    native, what = cpu_bf16_native()
    out = {"machine": machine(), "cpu_bf16_native": native, "cpu_bf16": what,
           "auto": resolve_precision("auto", "cpu").why, "rows": []}
    for name in a.datasets:
        ds = DATASETS[name]
        _train, val, _test, inst = load_dataset(ds, root)
        preds = {p: TorchPredictor.from_checkpoint(resolve_model(MODEL[ds.task]), device="cpu", precision=p)
                 for p in ("fp32", "bf16")}
        row = {"dataset": name, "model": MODEL[ds.task], "val_images": len(val)}
        for p, pred in preds.items():
            t0 = time.perf_counter()
            m = evaluate_predictor(pred, val, inst)
            row[p] = {k: round(float(m[k]), 4) for k in KEYS[ds.task]}
            row[p]["seconds"] = round(time.perf_counter() - t0, 1)
            row[p]["forward_mpx_s"] = round(forward_mpx_s(pred), 3)
            print(name, p, row[p], flush=True)
        row["delta"] = {k: round(row["bf16"][k] - row["fp32"][k], 4) for k in KEYS[ds.task]}
        diffs = [float(np.abs(predict_image(preds["fp32"], it.image) - predict_image(preds["bf16"], it.image)).max())
                 for it in val]
        row["max_abs_probability_difference"] = round(max(diffs), 4)
        seams = [compare(preds["bf16"], it.image, 256, preds["bf16"].overlap) for it in val[:a.seam_tiles]]
        row["bf16_seam_max_abs"] = round(max(s.max_abs for s in seams), 4)
        row["bf16_forward_ratio"] = round(row["bf16"]["forward_mpx_s"] / row["fp32"]["forward_mpx_s"], 3)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
