"""The few-label loop of the Annotate-and-refine widget, timed (issue 33 item 5): a project started
from a model (the pretrained backbone, or a bundled one), a few hand-labelled regions accepted (here
the true gland instances of GlaS training images stand in for the hand), one Refine, its time and
its Dice on the held-out region (the project's own validation: one region in four held out).

    python benchmarks/few_label_loop.py [--start backbone|glands] [--regions 3] [--size 384]
                                        [--steps 200] [--patch 128] [--batch 8]

Never the test split's images: the first ``--regions`` images of the GlaS training folder in name
order are what ``benchmarks/common.split_by_image`` also puts in training or validation.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import data_dir, machine, read_mask  # noqa: E402  (common puts src/ on the path)
from napari_genselfdiff.bundled import bundled_backbone, bundled_models  # noqa: E402
from napari_genselfdiff.core.data import read_image  # noqa: E402
from napari_genselfdiff.project import Project  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", choices=["backbone", "glands"], default="backbone")
    ap.add_argument("--regions", type=int, default=3)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    root = data_dir() / "glas" / "train"
    names = sorted(p.stem for p in (root / "images").iterdir())[:a.regions]
    start = str(bundled_backbone()) if a.start == "backbone" else str(bundled_models()["glands"])
    with tempfile.TemporaryDirectory() as tmp:
        project = Project.create(Path(tmp) / "project", task="glands", model=start)
        for name in names:
            path = next((root / "images").glob(name + ".*"))
            sid = project.add_slide(path, mpp=0.62)
            s = a.size
            image = read_image(path)[:s, :s]
            labels = read_mask(next((root / "instances").glob(name + ".*"))).astype(np.int32)[:s, :s]
            project.accept_region(sid, image, labels, (0, 0, s, s))
        t0 = time.perf_counter()
        last = None
        for last in project.refine(steps=a.steps, device="cpu", patch=a.patch, batch=a.batch):
            pass
        seconds = time.perf_counter() - t0
    m = last.metrics
    before = "n/a" if m["before"] is None else f"{m['before']:.3f}"
    print(f"{machine()}; start {a.start}, {a.regions} regions of {a.size} px, {a.steps} steps x {a.batch} patches of "
          f"{a.patch} px: {seconds:.0f} s, held-out Dice {before} -> {m['after']:.3f}, adopted {m['adopted']}")


if __name__ == "__main__":
    main()
