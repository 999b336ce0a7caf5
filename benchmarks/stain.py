"""Stain normalisation at inference (core/stain.py, `--stain-normalize`): does it pay on the leave-one-
data-set-out check, and what does it cost on images like the training ones? Each model is scored on
the validation and test splits with and without it, in one run (decisions on validation only). A
CoNSeP patch is normalised by the statistics of the tile it was cut from, as a slide is by its own.

    python benchmarks/stain.py --model mon=benchmarks/_work/lodo_monuseg8000/nuclei:monuseg \
        --model con=benchmarks/_work/s26_lodo_consep/nuclei:consep --model shipped=nuclei:monuseg+consep \
        [--datasets monuseg consep] [--splits val test] [--json OUT]
    python benchmarks/stain.py --write-targets    # the bundled models' stain targets into their config.json

``PATH:SETS`` names the training sets of a model whose config.json records no stain targets (models
fine-tuned before core/stain.py): their training splits' statistics are written into it (our own work
folders only; a bundled model's with --write-targets).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import DATASETS, REPO, data_dir, load_dataset, machine, object_metrics_on_true_instances, tile_of
from napari_genselfdiff.bundled import resolve_model
from napari_genselfdiff.core.atomic import write_json_atomic
from napari_genselfdiff.core.eval.evaluation import evaluate_items
from napari_genselfdiff.core.inference import TorchPredictor
from napari_genselfdiff.core.stain import lab_stats

KEYS = {"nuclei": ("dice", "aji", "pq"), "glands": ("dice", "object_f1", "object_dice")}
BUNDLED = {"glands": ["glas"], "nuclei": ["monuseg", "consep"]}


def add_targets(model: Path, sets: list[str], splits: dict, force: bool = False) -> None:
    """Record the training splits' stain of ``sets`` in ``model``'s config.json (when it has none, or ``force``)."""
    cfg_path = model / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("stain_targets") and not force:
        return
    cfg["stain_targets"] = {n: lab_stats([it.image for it in splits[n][0]], f"{n} training split").to_dict()
                            for n in sets}
    write_json_atomic(cfg_path, cfg)
    print(f"{cfg_path}: stain targets of {', '.join(sets)}")


def by_tile(items, ds: str) -> dict:
    """Each image's source statistics: those of its tile (CoNSeP's patches are cut from 27 + 14 tiles),
    as a slide's run takes them once for the whole slide; an image that is its own tile, its own."""
    if not DATASETS[ds].by_tile:
        return {}
    groups: dict[str, list] = {}
    for it in items:
        groups.setdefault(tile_of(it.name), []).append(it)
    stats = {t: lab_stats([it.image for it in its], t) for t, its in groups.items()}
    return {it.name: stats[tile_of(it.name)] for it in items}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=PATH[:SETS]")
    ap.add_argument("--datasets", nargs="+", default=["monuseg", "consep"], choices=list(DATASETS))
    ap.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    ap.add_argument("--write-targets", action="store_true",
                    help="write the bundled models' stain targets (their training splits') into their config.json")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    root = data_dir()
    need = set(a.datasets) | ({n for sets in BUNDLED.values() for n in sets} if a.write_targets else set())
    splits = {n: load_dataset(DATASETS[n], root) for n in sorted(need)}
    if a.write_targets:
        for task, sets in BUNDLED.items():
            add_targets(REPO / "resources" / "models" / task, sets, splits, force=True)
    rows = []
    models = {}
    for m in a.model:
        name, rest = m.split("=", 1)
        path, _, sets = rest.partition(":")
        models[name] = Path(resolve_model(path))
        if sets:
            add_targets(models[name], sets.split("+"), splits)
    for split in a.splits:
        for ds in a.datasets:
            _train, val, test, inst = splits[ds]
            items = val if split == "val" else test
            for name, path in models.items():
                pred = TorchPredictor.from_checkpoint(path, device="cpu")
                for stain in (False, True):
                    m = object_metrics_on_true_instances(evaluate_items(pred, items, inst, stain=stain,
                                                                        stain_of=by_tile(items, ds)), inst)
                    rows.append({"model": name, "dataset": ds, "split": split, "stain": stain,
                                 **{k: round(float(m[k]), 4) for k in KEYS[DATASETS[ds].task]}})
                    print(json.dumps(rows[-1]), flush=True)
    if not rows:
        return
    print(f"\nStain normalisation at inference ({machine()}):\n")
    print("| split | data set | model | Dice | AJI / object F1 | PQ / object Dice | normalised: Dice | AJI / F1 | PQ / "
          "object Dice |\n|---|---|---|---|---|---|---|---|---|")
    for r0, r1 in zip(rows[::2], rows[1::2]):
        k = KEYS[DATASETS[r0["dataset"]].task]
        print(f"| {r0['split']} | {r0['dataset']} | {r0['model']} | " + " | ".join(f"{r0[x]:.3f}" for x in k) + " | "
              + " | ".join(f"{r1[x]:.3f} ({r1[x] - r0[x]:+.3f})" for x in k) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
