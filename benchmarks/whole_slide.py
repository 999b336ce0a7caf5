"""A full-tissue slide predicted end to end by the user's own command, for both default models.

    python benchmarks/whole_slide.py [--size 16384] [--tile 768] [--batch 4] [--models glands nuclei [NAME=PATH]]
                                     [--labelling alongside|after|both]

Builds (once, into ``--work``) a ``--size`` x ``--size`` pyramidal BigTIFF at 0.5 um/px covered
with tissue everywhere (``scripts/make_test_slide.py --tissue-fraction 1.0``: a mosaic of the real
GlaS / MoNuSeg tiles in ../shared/data, synthetic tissue where that is absent), then for each
bundled default model runs ``genselfdiff predict --model M --input SLIDE --out OUT.zarr`` in a
fresh subprocess (reading, tissue detection, tiling, blending, instance labels, zarr writes: all
of it) and records its wall time and peak RSS (that child's own VmHWM, reported as it exits, and
the sum over its process tree sampled every 0.2 s: the instance labels are made by a second
process alongside the prediction, slide/labeller.py; ``--labelling both`` runs each model labelling
after predicting too, GENSELFDIFF_LABEL_ALONGSIDE=0, for the ratio in one run). In the same
run, the raw forward pass of the same predictor (batched 512-px tiles of the slide, no tiling,
no post-processing) gives the limit the end-to-end figure is set against, over the pixels the
model sees (the slide resampled to the model's um/px) so that the tiles' overlap counts against
us. Projection: the same rate applied to a 100,000 x 80,000 slide scanned at 40x (0.25 um/px)
predicted at the um/px this run used, for full tissue and for a typical 30 % tissue
(tissue-free tiles are skipped).

Prints a Markdown table and writes ``--json`` (default ``WORK/whole_slide.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from napari_genselfdiff.slide.tiler import DEFAULT_TILE  # noqa: E402  (the CLI's default tile)

FORTY_X = (100_000, 80_000, 0.25)  # width, height, um/px of the projected slide
TYPICAL_TISSUE = 0.30


PEAK_REPORTING_CLI = """
import atexit, sys
def report():
    hwm = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')]
    sys.stdout.write('\\nVmHWM ' + (hwm[0] if hwm else 'nan') + '\\n')
    sys.stdout.flush()
atexit.register(report)
from napari_genselfdiff.cli import main
sys.argv = ['genselfdiff'] + sys.argv[1:]
sys.exit(main())
"""


def build_slide(path: Path, size: int, mpp: float) -> Path:
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_test_slide.py"), "--out", str(path),
                    "--size", str(size), "--mpp", str(mpp), "--tissue-fraction", "1.0"], check=True)
    return path


def _sample_tree_rss(pid: int, stop: threading.Event, peaks: list[int]) -> None:
    """The largest sum of the RSS of process ``pid`` and all its descendants (the labelling child
    of slide/labeller.py among them), sampled every 0.2 s until ``stop``."""
    import psutil

    peak = 0
    try:
        root = psutil.Process(pid)
        while not stop.is_set():
            total = 0
            for p in [root] + root.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:  # ended between the listing and the reading
                    pass
            peak = max(peak, total)
            stop.wait(0.2)
    except psutil.Error:  # the command ended
        pass
    peaks.append(peak)


def run_predict(model: str, slide: Path, out: Path, tile: int, batch: int, alongside: bool = True) -> dict:
    """``genselfdiff predict`` in a fresh process: wall seconds, that child's peak RSS, and the
    sampled peak of its whole process tree. ``alongside=False`` labels after predicting
    (GENSELFDIFF_LABEL_ALONGSIDE=0), as before session 22."""
    if out.exists():  # an earlier run's output: removed only when genselfdiff wrote it
        from napari_genselfdiff.core.errors import DataError
        from napari_genselfdiff.slide.store import PredictionStore

        try:
            PredictionStore.open(out)
        except DataError as e:
            print(f"whole_slide: {e}; choose another --work", file=sys.stderr)
            raise SystemExit(2)
        shutil.rmtree(out)
    # the user's command (genselfdiff = napari_genselfdiff.cli:main) in a child that reports its
    # own peak RSS (VmHWM) on exit: its ru_maxrss would include this process's, which Linux
    # carries over to children across fork and exec
    cmd = [sys.executable, "-c", PEAK_REPORTING_CLI, "predict", "--model", model, "--input", str(slide),
           "--out", str(out), "--tile", str(tile), "--batch", str(batch)]
    env = {**os.environ, "GENSELFDIFF_LABEL_ALONGSIDE": "1" if alongside else "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    stop, tree = threading.Event(), []
    sampler = threading.Thread(target=_sample_tree_rss, args=(proc.pid, stop, tree), daemon=True)
    sampler.start()
    output = proc.stdout.read()
    stop.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        print(f"whole_slide: {' '.join(cmd)} failed:\n{output}", file=sys.stderr)
        raise SystemExit(2)
    lines = output.strip().splitlines()
    peak = [float(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM ")]
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak[-1] if peak else usage.ru_maxrss / 1024, 1),
            "peak_tree_rss_mb": round(tree[-1] / 2**20, 1) if tree else None,
            "labelling": "alongside" if alongside else "after",
            "log": [line for line in lines if not line.startswith("VmHWM ")][-3:]}


def model_pixels(out: Path) -> tuple[int, int, float]:
    """(height, width) of the slide on the model's grid (the stored level, times the factor it was
    resampled by to the model's um/px, slide/rescale.py), and that factor."""
    from napari_genselfdiff.slide.store import PredictionStore

    store = PredictionStore.open(out)
    shape, f = store.probabilities.shape, float(store.settings.get("resample", 1.0))
    return int(round(shape[-2] * f)), int(round(shape[-1] * f)), f


def raw_forward_mpx_s(model: str, slide: Path, batch: int, repeats: int) -> float:
    """Mpx/s of the predictor's own batched forward pass (the CLI's: folded BatchNorm,
    channels_last) on 512-px tiles cut from the slide's tissue, read once before timing; the
    forward pass costs the same for any content, so the level does not matter here."""
    import numpy as np

    from common import time_per_call
    from napari_genselfdiff.bundled import resolve_model
    from napari_genselfdiff.core.inference import TorchPredictor
    from napari_genselfdiff.slide.reader import open_slide

    pred = TorchPredictor.from_checkpoint(resolve_model(model), device="cpu", batch_size=batch)
    with open_slide(str(slide)) as s:
        img = np.asarray(s.read_region(0, 0, 0, 1024, 1024))
    tiles = np.stack([img[(i % 2) * 256:(i % 2) * 256 + 512, (i // 2 % 2) * 256:(i // 2 % 2) * 256 + 512]
                      for i in range(batch)])
    t = time_per_call(lambda: pred(tiles), repeats)
    return batch * 512 * 512 / 1e6 / t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE, help="tile size (default: the CLI's, %(default)s)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["glands", "nuclei"], metavar="MODEL",
                    help="glands, nuclei (the bundled defaults) or NAME=PATH, a checkpoint folder (a candidate "
                         "default, e.g. another preset)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "whole_slide")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--labelling", choices=["alongside", "after", "both"], default="alongside",
                    help="instance labels made alongside the prediction (the default since session 22), after "
                         "it, or both, one after the other, for the ratio")
    a = ap.parse_args()
    for name, v in (("--size", a.size), ("--tile", a.tile), ("--batch", a.batch), ("--repeats", a.repeats)):
        if v < 1:
            print(f"whole_slide: {name} must be positive, got {v}", file=sys.stderr)
            return 2
    import torch

    from common import machine
    from napari_genselfdiff.bundled import resolve_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    slide = build_slide(a.work / f"full{a.size}_{a.mpp}.tif", a.size, a.mpp)
    rows = {}
    modes = {"alongside": [True], "after": [False], "both": [False, True]}[a.labelling]
    models = {}
    for m in a.models:
        name, _, path = m.partition("=")
        if not name or (not path and name not in ("glands", "nuclei")) or (path and not Path(path).is_dir()):
            print(f"whole_slide: --models {m}: give glands, nuclei or NAME=PATH to a checkpoint folder",
                  file=sys.stderr)
            return 2
        models[name] = path or name
    for (name, model), alongside in ((m, x) for m in models.items() for x in modes):
        out = a.work / f"{name}_{a.size}_{a.tile}.zarr"
        run = run_predict(model, slide, out, a.tile, a.batch, alongside)
        h, w, f = model_pixels(out)
        raw = raw_forward_mpx_s(model, slide, a.batch, a.repeats)
        key = name if a.labelling != "both" else f"{name}, labelled {run['labelling']}"
        cfg = json.loads((Path(resolve_model(model)) / "config.json").read_text())
        model_mpp = float(cfg.get("mpp") or a.mpp)
        seen_mpp = round(a.mpp * a.size / w, 3)  # the pyramid level and resampling the CLI chose
        level_mpp = round(seen_mpp * f, 3)  # the level it read
        mpx_model = h * w / 1e6
        e2e = mpx_model / run["seconds"]
        W, H, mpp40 = FORTY_X
        proj_mpx = W * H * (mpp40 / seen_mpp) ** 2 / 1e6
        rows[key] = {
            "slide_mpx": round(a.size * a.size / 1e6, 1), "model_mpp": model_mpp, "predicted_at_mpp": seen_mpp,
            "level_mpp": level_mpp, "resampled": round(f, 4),
            "model_pixels": [h, w], "model_mpx": round(mpx_model, 1), **run,
            "slide_mpx_s": round(a.size * a.size / 1e6 / run["seconds"], 3),
            "model_mpx_s": round(e2e, 3), "raw_forward_mpx_s": round(raw, 3),
            "fraction_of_raw": round(e2e / raw, 3),
            "projected_40x_hours_full_tissue": round(proj_mpx / e2e / 3600, 2),
            "projected_40x_hours_30pct_tissue": round(TYPICAL_TISSUE * proj_mpx / e2e / 3600, 2)}
        print(json.dumps({key: rows[key]}), flush=True)
    result = {"machine": machine(), "slide": f"{a.size}x{a.size} at {a.mpp} um/px, full tissue",
              "tile": a.tile, "batch": a.batch, "models": rows}
    path = a.json or a.work / "whole_slide.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\n{result['machine']}; {result['slide']}; tile {a.tile}, batch {a.batch}\n")
    print("| model | learned / predicted at um/px | pixels predicted | time | Mpx/s (model px) | raw forward Mpx/s | "
          "fraction of raw | peak RSS (predict / all processes) | 100k x 80k 40x slide: full tissue / 30 % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['model_mpp']} / {r['predicted_at_mpp']} | {r['model_pixels'][1]}x{r['model_pixels'][0]} ({r['model_mpx']} Mpx) | "
              f"{r['seconds']:.0f} s | {r['model_mpx_s']:.3f} | {r['raw_forward_mpx_s']:.3f} | {r['fraction_of_raw']:.2f} | "
              f"{r['peak_rss_mb']:.0f} / {r['peak_tree_rss_mb'] or float('nan'):.0f} MB | {r['projected_40x_hours_full_tissue']:.1f} h / "
              f"{r['projected_40x_hours_30pct_tissue']:.1f} h |")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
