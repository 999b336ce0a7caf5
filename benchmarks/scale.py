"""Many slides on a Dask LocalCluster: throughput of 1 against N worker processes.

    python benchmarks/scale.py [--workers 1 2] [--slides 3] [--size 2016] [--model nuclei]
                               [--device cpu] [--tile 512] [--block 1008] [--json OUT]

Measures, in one run, on this machine: the in-process path (``predict_slide``, one slide after
the other, torch on all cores: what ``genselfdiff predict`` does without a flag), then for each
worker count N a fresh LocalCluster of N processes (the cores divided among them), warmed up
(each worker has loaded the model) and timed on the same slides into fresh stores through
:class:`napari_genselfdiff.slide.distributed.ManySlides` (tissue, blocks and nuclei labels).
Reported: level megapixels per second of wall time, speed-up against 1 worker and efficiency
(speed-up / N). The slides are synthetic (``scripts/make_test_slide.py --source none``) and built
into benchmarks/_work/scale/ (git-ignored). The default run (3 slides of 2016 x 2016 px, 2 x 2
blocks each) takes about 2-3 minutes on 2 idle cores.

On a machine with several GPUs each LocalCluster worker takes its own GPU (worker i ->
cuda:i mod count), so the same command measures GPU scaling::

    python benchmarks/scale.py --device cuda --workers 1 2 4 8 --slides 16 --size 8064 --block 2016

Block tasks recompute the tiles a block shares with its neighbours (the in-process tiler computes
each tile once): with 512-px tiles at the nuclei model's 176-px overlap (a stride of 336 px), a
block of k strides touches (k + 1)^2 tiles where it owns k^2, so 1008-px blocks (k = 3) compute
1.8x the tiles and the default 2016-px blocks (k = 6) 1.4x. The 1-worker column against the
in-process one shows that cost; the efficiency column compares like with like.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work" / "scale"
sys.path.insert(0, str(ROOT / "src"))


def _make_slides(n: int, size: int) -> list[Path]:
    spec = importlib.util.spec_from_file_location("make_test_slide", ROOT / "scripts" / "make_test_slide.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    WORK.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = WORK / f"slide{i}_{size}.tif"
        if not path.exists():
            mod.make_test_slide(path, size, tile=512, mpp=0.5, source=None, compression="zlib", seed=i,
                                tissue_fraction=0.8)
        out.append(path)
    return out


def _settings(predictor, a):
    from napari_genselfdiff.slide.tiler import SlideSettings

    overlap, _ = predictor.overlap_for(a.tile, None)
    return SlideSettings(level=0, tile=a.tile, overlap=overlap, batch=a.batch, block=a.block,
                         class_names=tuple(predictor.class_names), postprocess=predictor.task,
                         postprocess_options=dict(predictor.postprocess_options))


def _pixels(slides: list[Path]) -> int:
    from napari_genselfdiff.slide.reader import open_slide

    total = 0
    for s in slides:
        with open_slide(s) as slide:
            total += int(slide.levels[0].shape[0]) * int(slide.levels[0].shape[1])
    return total


def in_process(predictor, slides: list[Path], a, out: Path) -> float:
    """Seconds for predict_slide over the slides, one after the other."""
    from napari_genselfdiff.core.progress import drain
    from napari_genselfdiff.slide.tiler import predict_slide

    cfg = _settings(predictor, a)
    kw = {k: getattr(cfg, k) for k in ("level", "tile", "overlap", "batch", "block", "postprocess")}
    start = time.perf_counter()
    for s in slides:
        drain(predict_slide(predictor, s, out / f"{s.stem}.zarr", class_names=cfg.class_names,
                            postprocess_options=dict(cfg.postprocess_options), **kw))
    return time.perf_counter() - start


def on_cluster(predictor, model: Path, slides: list[Path], a, workers: int, out: Path) -> tuple[float, float]:
    """(seconds to start and warm up the cluster, seconds of the run) with ``workers`` processes."""
    from napari_genselfdiff.core.progress import drain
    from napari_genselfdiff.slide import distributed as dx
    from napari_genselfdiff.slide.reader import open_slide

    spec = dx.ModelSpec(str(model.resolve()), a.device, a.batch, 1)
    start = time.perf_counter()
    with dx.connect(workers, dashboard_address=None) as client:
        client.run(dx.worker_predictor, spec)  # every worker loads the model before the clock starts
        ready = time.perf_counter()
        cfg = _settings(predictor, a)
        jobs = []
        for i, s in enumerate(slides):
            with open_slide(s) as slide:
                jobs.append(dx.plan_job(predictor, slide, out / f"{s.stem}.zarr", cfg, i))
        run = dx.ManySlides(client, spec, jobs, predictor.task, None, dict(predictor.postprocess_options))
        drain(run.events())
        end = time.perf_counter()
    return ready - start, end - ready


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--size", type=int, default=2016)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--block", type=int, default=1008)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--model", default="nuclei", help="checkpoint folder or a bundled model name")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-in-process", action="store_true", help="skip the in-process baseline")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import torch

    from napari_genselfdiff.bundled import resolve_model
    from napari_genselfdiff.core.inference import TorchPredictor

    model = Path(resolve_model(a.model))
    predictor = TorchPredictor.from_checkpoint(model, device=a.device, batch_size=a.batch)
    slides = _make_slides(a.slides, a.size)
    mpx = _pixels(slides) / 1e6
    rows: list[dict] = []
    runs = WORK / "runs"
    if not a.no_in_process:
        shutil.rmtree(runs, ignore_errors=True)
        runs.mkdir(parents=True)
        sec = in_process(predictor, slides, a, runs)
        rows.append({"run": f"in-process ({torch.get_num_threads()} torch threads)", "workers": 0,
                     "startup_s": 0.0, "seconds": sec, "mpx_per_s": mpx / sec})
    for n in a.workers:
        shutil.rmtree(runs, ignore_errors=True)
        runs.mkdir(parents=True)
        up, sec = on_cluster(predictor, model, slides, a, n, runs)
        rows.append({"run": f"LocalCluster, {n} worker{'s' * (n > 1)}", "workers": n, "startup_s": up,
                     "seconds": sec, "mpx_per_s": mpx / sec})
    base = next((r["mpx_per_s"] for r in rows if r["workers"] == 1), None)
    lines = [f"{len(slides)} slides of {a.size} x {a.size} px ({mpx:.1f} Mpx), tile {a.tile}, block {a.block}, "
             f"model {a.model}, device {a.device}, {os.cpu_count()} cores",
             "", "| run | start + warm-up s | run s | Mpx/s | speed-up vs 1 worker | efficiency |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        n = r["workers"]
        speed = r["mpx_per_s"] / base if base and n else None
        r["speedup"], r["efficiency"] = speed, (speed / n if speed else None)
        lines.append(f"| {r['run']} | {r['startup_s']:.1f} | {r['seconds']:.1f} | {r['mpx_per_s']:.3f} | "
                     f"{'-' if speed is None else f'{speed:.2f}x'} | "
                     f"{'-' if speed is None else f'{speed / n:.0%}'} |")
    text = "\n".join(lines)
    print(text)
    (WORK / "scale_results.md").write_text(text + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "mpx": mpx, "args": vars(a)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
