"""What the tile-invariant segmentation network costs or gains in accuracy.

    python benchmarks/tile_invariance.py [--steps 300] [--pretrained benchmarks/_work/defaults/pretrained]

From the same diffusion pretraining, fine-tune each dataset's model twice with the same seed,
batches and schedule: once as the paper's network (GroupNorm + attention, whose answer depends on
the tile) and once as the tile-invariant one (BatchNorm with frozen statistics, no attention;
core/nets/unet.py). Both are scored on the VALIDATION split (benchmarks/common.split_by_image), never
on the test split. Writes benchmarks/_work/tile_invariance/rows.json and prints a Markdown table
for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from common import (DATASETS, REPO, FinetuneConfig, Timer, data_dir, drain, evaluate, finetune, load_dataset,
                    machine)

KEYS = {"glands": ["dice", "object_f1", "object_dice"], "nuclei": ["dice", "aji", "pq"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pretrained", default=str(REPO / "benchmarks" / "_work" / "defaults" / "pretrained"))
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "_work" / "tile_invariance"))
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    root, work = data_dir(), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows_file = work / "rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    done = {(r["dataset"], r["arch"], r["steps"]) for r in rows}
    for name in a.datasets:
        ds = DATASETS[name]
        train, val, _test, inst = load_dataset(ds, root)
        patch = 192 if ds.task == "glands" else 128
        base = FinetuneConfig(task=ds.task, steps=a.steps, patch=patch, batch=8, lr=1e-3, warmup=20,
                              checkpoint_every=100, val_every=10 ** 9, mpp=ds.mpp)
        for arch, invariant in (("groupnorm+attention", False), ("tile-invariant", True)):
            if (name, arch, a.steps) in done:
                continue
            out = work / f"{name}_{'inv' if invariant else 'gn'}_{a.steps}"
            cfg = replace(base, tile_invariant=invariant)
            with Timer() as t:
                drain(finetune(train, out, cfg, init=a.pretrained, device=a.device, resume=out.exists()),
                      lambda e: print(f"{name} {arch} {e.step}/{e.total} loss {e.loss:.4f}", flush=True)
                      if e.step % 50 == 0 else None)
            m = evaluate(out, val, inst)
            rows.append({"dataset": name, "arch": arch, "steps": a.steps, "seconds": round(t.s, 1),
                         **{k: m[k] for k in KEYS[ds.task]}})
            rows_file.write_text(json.dumps(rows, indent=2))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nValidation split, {a.steps} fine-tuning steps from the same pretraining, seed 0 ({machine()}):\n")
    print("| dataset | network | s | metrics |\n|---|---|---|---|")
    for r in rows:
        ms = ", ".join(f"{k} {r[k]:.3f}" for k in KEYS[DATASETS[r['dataset']].task])
        print(f"| {r['dataset']} | {r['arch']} | {r['seconds']:.0f} | {ms} |")


if __name__ == "__main__":
    main()
