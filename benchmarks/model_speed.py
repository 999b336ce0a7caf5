"""What a model costs to run: seconds per tile of two or more checkpoints, as the tiler calls them
(one tile per forward pass on a CPU, the predictor's fused network, channels_last), interleaved
repetitions in one run, reported as ratios to the first model. Run it on an idle machine.

    python benchmarks/model_speed.py --model shipped=glands --model new=PATH [--tile 768] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from common import machine, time_per_call  # noqa: E402  (common puts src/ on the path)
from napari_genselfdiff.bundled import resolve_model  # noqa: E402
from napari_genselfdiff.core.inference import TorchPredictor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                    help="a checkpoint folder or 'glands' / 'nuclei'; repeat (the first is the reference)")
    ap.add_argument("--tile", type=int, default=768, help="tile side in pixels (the tiler's default, 768)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; each times 3 calls per model")
    a = ap.parse_args()
    models = dict(m.split("=", 1) for m in a.model)
    preds = {n: TorchPredictor.from_checkpoint(resolve_model(p), device="cpu") for n, p in models.items()}
    tile = np.random.default_rng(0).integers(0, 255, (1, a.tile, a.tile, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {n: [] for n in preds}
    for _ in range(a.repeats):
        for n, pred in preds.items():
            times[n].append(time_per_call(lambda: pred(tile), 3))
    first = next(iter(preds))
    ref = float(np.median(times[first]))
    print(f"{machine()}; {a.tile}-px tile, median of {a.repeats} interleaved rounds of 3 calls\n")
    print("| model | classes | preset | s / tile | ratio to " + first + " |\n|---|---|---|---|---|")
    rows = {}
    for n, pred in preds.items():
        s = float(np.median(times[n]))
        rows[n] = {"seconds": s, "ratio": s / ref}
        print(f"| {n} | {pred.config['task']['num_classes']} | {pred.config['model'].get('preset')} | {s:.3f} | "
              f"{s / ref:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
