"""Reference arms the default models must beat, on the same split by image.

    python benchmarks/references.py [--plain-minutes 25] [--skip-plain]
    python benchmarks/references.py --nuclei-mixed-minutes 34   # the plain arm on MoNuSeg + CoNSeP

(a) ``classical``: no learning. Nuclei: colour deconvolution (haematoxylin channel, Ruifrok &
    Johnston), Otsu threshold, holes filled, small objects dropped, touching nuclei split by a
    marker-controlled watershed on the distance transform. Glands: the same idea on the
    complement of the haematoxylin + eosin background (Otsu on a smoothed eosin-free lumen /
    cytoplasm map), kept only as a floor.
    Its few knobs (smoothing, smallest object, marker height) are chosen on the VALIDATION split.
(b) ``plain``: a plain BatchNorm U-Net (tiny preset's widths, no attention, no pretraining, cross
    entropy, no stain augmentation) trained from scratch for a fixed wall time (default 25 min),
    evaluated with the default post-processing. ``--nuclei-mixed-minutes M``: the same arm trained
    once on the MoNuSeg + CoNSeP training splits together, each image weighted by its area (as the
    shipped nuclei model is, ``train_defaults.py``), for M minutes (the shipped model's fine-tuning
    time), scored on both sets' validation and test splits.

Results: benchmarks/_work/references/references.json and a Markdown table to copy into
benchmarks/RESULTS.md. Nuclei AJI / PQ are averaged over the test images with true instance
labels (see common.object_metrics_on_true_instances).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
from scipy import ndimage as ndi

from common import (DATASETS, REPO, FinetuneConfig, data_dir, drain, evaluate, finetune, load_dataset, machine,
                    object_metrics_on_true_instances)

from napari_genselfdiff.core.eval.metrics import aggregate, segmentation_report  # noqa: E402
from napari_genselfdiff.core.eval.postprocess import remove_small  # noqa: E402


def haematoxylin(image: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.color import rgb2hed

    h = rgb2hed(image)[..., 0]
    return ndi.gaussian_filter(h, sigma) if sigma else h


def classical_nuclei(image: np.ndarray, sigma: float = 1.0, min_size: int = 10, h: float = 1.0) -> np.ndarray:
    """Instances of nuclei without learning: haematoxylin, Otsu, fill, distance watershed."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    hem = haematoxylin(image, sigma)
    fg = hem > threshold_otsu(hem)
    fg = ndi.binary_fill_holes(fg)
    fg = remove_small(ndi.label(fg)[0], min_size) > 0
    dist = ndi.distance_transform_edt(fg)
    markers, _ = ndi.label(h_maxima(ndi.gaussian_filter(dist, 0.5), h) & fg)
    lab = watershed(-dist, markers, mask=fg)
    return lab.astype(np.int32)


def classical_glands(image: np.ndarray, sigma: float = 4.0, min_size: int = 200, h: float = 0.0) -> np.ndarray:
    """A floor for glands without learning: the epithelium (haematoxylin-rich) smoothed, Otsu,
    holes (lumina) filled, small objects dropped, connected components."""
    from skimage.filters import threshold_otsu
    hem = haematoxylin(image, sigma)
    fg = hem > threshold_otsu(hem)
    fg = ndi.binary_fill_holes(fg)
    fg = remove_small(ndi.label(fg)[0], min_size) > 0
    return ndi.label(fg)[0].astype(np.int32)


GRIDS = {"nuclei": dict(sigma=(0.5, 1.0, 1.5), min_size=(5, 10, 20), h=(0.5, 1.0, 2.0)),
         "glands": dict(sigma=(2.0, 4.0, 8.0), min_size=(100, 200, 400), h=(0.0,))}


def classical_metrics(task: str, items, instances, params: dict) -> dict:
    fn = classical_nuclei if task == "nuclei" else classical_glands
    per = {}
    for it in items:
        inst = fn(it.image, **params)
        per[it.name] = segmentation_report((inst > 0).astype(np.uint8), (it.target > 0).astype(np.uint8), task=task,
                                           num_classes=2, pred_instances=inst, gt_instances=instances.get(it.name))
    return object_metrics_on_true_instances({"task": task, "mean": aggregate(list(per.values())), "per_image": per},
                                            instances)


def tune_classical(task: str, val, instances) -> dict:
    keys = list(GRIDS[task])
    best, best_score = None, -1.0
    for values in itertools.product(*(GRIDS[task][k] for k in keys)):
        params = dict(zip(keys, values))
        m = classical_metrics(task, val, instances, params)
        s = m["aji"] + m["pq"] if task == "nuclei" else m["object_f1"] + m["object_dice"]
        if not np.isfinite(s):
            s = m["dice"]
        if s > best_score:
            best, best_score = params, s
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plain-minutes", type=float, default=25.0)
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--only", choices=list(DATASETS), default=None)
    ap.add_argument("--nuclei-mixed-minutes", type=float, default=None)
    a = ap.parse_args()
    if a.nuclei_mixed_minutes is not None:
        return plain_mixed_nuclei(a.nuclei_mixed_minutes)
    root = data_dir()
    work = REPO / "benchmarks" / "_work" / "references"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "references.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name, ds in DATASETS.items():
        if a.only and name != a.only:
            continue
        train, val, test, inst = load_dataset(ds, root)
        params = tune_classical(ds.task, val, inst)
        t = time.perf_counter()
        m = classical_metrics(ds.task, test, inst, params)
        results[f"{name}/classical"] = {"params": params, "seconds": time.perf_counter() - t, **m}
        print(name, "classical", params, json.dumps(m), flush=True)
        if not a.skip_plain:
            out = work / f"{name}_plain"
            steps, seconds = train_for(train, out, ds.task, ds.mpp, a.plain_minutes)
            m = evaluate(out, test, inst)
            results[f"{name}/plain"] = {"steps": steps, "seconds": seconds, **m}
            print(name, "plain", steps, json.dumps(m), flush=True)
        path.write_text(json.dumps({**results, "machine": machine()}, indent=2))
    print(table(results))


def plain_config(task: str, mpp: float, steps: int):
    """The plain arm's fine-tuning: tiny's widths, cross entropy, no augmentation of stain, colour
    or blur, no validation, the default post-processing."""
    from dataclasses import replace

    from napari_genselfdiff.core.data import AugmentConfig

    cfg = FinetuneConfig(task=task, preset="tiny", steps=steps, patch=128 if task == "nuclei" else 192,
                         batch=8, lr=1e-3, warmup=20, loss="ce", checkpoint_every=0, val_every=0,
                         mpp=mpp, tune_postprocess=False)
    return replace(cfg, augment=AugmentConfig(stain_p=0.0, color_jitter=0.0, blur_p=0.0))


def train_for(train: list, out, task: str, mpp: float, minutes: float) -> tuple[int, float]:
    """The plain arm trained for ``minutes`` of wall time (steps from the time of the first 20);
    returns (steps, seconds)."""
    t0, steps = time.perf_counter(), 20
    drain(finetune(train, out, plain_config(task, mpp, steps), device="cpu", overwrite=True))
    steps = max(20, int(minutes * 60 / ((time.perf_counter() - t0) / steps)))
    t0 = time.perf_counter()
    drain(finetune(train, out, plain_config(task, mpp, steps), device="cpu", overwrite=True))
    return steps, time.perf_counter() - t0


def plain_mixed_nuclei(minutes: float) -> None:
    """The plain arm on MoNuSeg + CoNSeP together (see the module docstring)."""
    from common import by_area

    root = data_dir()
    work = REPO / "benchmarks" / "_work" / "references"
    work.mkdir(parents=True, exist_ok=True)
    sets = {n: load_dataset(DATASETS[n], root) for n in ("monuseg", "consep")}
    train = [it for n in sets for it in by_area(sets[n][0], 128)]
    out = work / "mixed_nuclei_plain"
    steps, seconds = train_for(train, out, "nuclei", DATASETS["monuseg"].mpp, minutes)
    results = {"machine": machine(), "steps": steps, "seconds": seconds}
    for n, (_, val, test, inst) in sets.items():
        for split, items in (("val", val), ("test", test)):
            results[f"{n}/{split}"] = evaluate(out, items, inst)
            print(n, split, json.dumps(results[f"{n}/{split}"]), flush=True)
    (work / "mixed_nuclei_plain.json").write_text(json.dumps(results, indent=2))
    print(f"plain U-Net on MoNuSeg + CoNSeP: {steps} steps, {seconds / 60:.1f} min")
    print("| split | data set | Dice | AJI | PQ |\n|---|---|---|---|---|")
    for key, r in results.items():
        if "/" in key:
            n, split = key.split("/")
            print(f"| {split} | {n} | {r['dice']:.3f} | {r['aji']:.3f} | {r['pq']:.3f} |")


def table(results: dict) -> str:
    lines = ["| dataset | arm | Dice | object F1 / AJI | object Dice / PQ | note |", "|---|---|---|---|---|---|"]
    for key, r in results.items():
        if key == "machine":
            continue
        name, arm = key.split("/")
        a, b = ("object_f1", "object_dice") if DATASETS[name].task == "glands" else ("aji", "pq")
        note = f"params {r['params']}" if "params" in r else f"{r['steps']} steps, {r['seconds'] / 60:.0f} min"
        lines.append(f"| {name} | {arm} | {r['dice']:.3f} | {r[a]:.3f} | {r[b]:.3f} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
