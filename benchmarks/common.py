"""Shared pieces of the benchmarks: data splits by image, the two datasets' settings, one
pretrain/fine-tune/evaluate run. Splits are by IMAGE (never by patch), deterministic."""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from napari_genselfdiff.core.data import (ImageSource, LabeledImage, TaskSpec, downscale_item,  # noqa: E402
                                          load_labeled_folder, mask_to_target, objects_of_mask, read_mask)
from napari_genselfdiff.core.eval.evaluation import evaluate_items  # noqa: E402
from napari_genselfdiff.core.inference import TorchPredictor  # noqa: E402
from napari_genselfdiff.core.progress import drain  # noqa: E402,F401  (re-exported for the benchmark scripts)
from napari_genselfdiff.core.train.training import FinetuneConfig, PretrainConfig, finetune, pretrain  # noqa: E402,F401  (re-exported)


def data_dir() -> Path:
    d = Path(os.environ.get("GENSELFDIFF_DATA", REPO.parent / "shared" / "data"))
    if not d.is_dir():
        sys.exit(f"benchmark needs the real data at {d} (set GENSELFDIFF_DATA); see ../shared/data/README.md")
    return d


@dataclass(frozen=True)
class Dataset:
    name: str  # glas | monuseg
    task: str  # glands | nuclei
    folder: str
    downsample: float  # models run at 1/downsample of the stored resolution
    mpp_native: float  # microns per pixel of the stored images
    by_tile: bool = False  # patches of one tile (the name before its last "_") stay on one side of a split

    @property
    def mpp(self) -> float:
        return self.mpp_native * self.downsample


# GlaS: 20x, 0.62 um/px (Sirinukunwattana et al. 2017); glands are large: train at half resolution.
# MoNuSeg: 40x, 0.25 um/px (Kumar et al. 2017); nuclei at 20x-equivalent (0.5 um/px) matches most slides.
# CoNSeP: 40x, 0.25 um/px (Graham et al. 2019), 27 colorectal tiles stored as 16 patches each.
DATASETS = {"glas": Dataset("glas", "glands", "glas/train", 2.0, 0.62),
            "monuseg": Dataset("monuseg", "nuclei", "monuseg/train", 2.0, 0.25),
            "consep": Dataset("consep", "nuclei", "consep/train", 2.0, 0.25, by_tile=True)}


def tile_of(name: str) -> str:
    """The tile a CoNSeP patch comes from: its name before the last underscore."""
    return name.rsplit("_", 1)[0]


def split_by_image(names: list[str], seed: int = 2024, test: float = 0.2, val: float = 0.1,
                   group=None):
    """Deterministic (train, val, test) name lists; the same on every machine. ``group(name)``:
    names of one group (the patches of one tile) are split together, the groups drawn as images are."""
    if group is not None:
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(group(n), []).append(n)
        parts = split_by_image(list(groups), seed, test, val)
        return tuple(sorted(n for g in part for n in groups[g]) for part in parts)
    names = sorted(names)
    perm = np.random.default_rng(seed).permutation(len(names))
    n_test, n_val = int(round(test * len(names))), int(round(val * len(names)))
    test_names = sorted(names[i] for i in perm[:n_test])
    val_names = sorted(names[i] for i in perm[n_test:n_test + n_val])
    train_names = sorted(names[i] for i in perm[n_test + n_val:])
    return train_names, val_names, test_names


def load_dataset(ds: Dataset, root: Path, boundary: bool = False, boundary_width: int = 1):
    """(train, val, test) LabeledImage lists at the model resolution, and GT instances by name
    (only the images that have true instance labels). ``boundary``: targets with a third
    class on each object's inner boundary (a nucleus's boundary, a gland's contour), drawn at the
    model resolution from the true instances where there are some, else from the binary mask
    (nuclei: touching ones split, core.data.split_touching; glands: its connected components);
    ``boundary_width`` pixels deep."""
    spec = TaskSpec.make(ds.task, boundary, boundary_width=boundary_width)
    folder = root / ds.folder
    items = [downscale_item(it, ds.downsample) for it in load_labeled_folder(folder / "images", folder / "masks",
                                                                             TaskSpec.make(ds.task))]
    by_name = {it.name: it for it in items}
    train, val, test = split_by_image(list(by_name), group=tile_of if ds.by_tile else None)
    inst = {}
    step = int(ds.downsample)
    if (folder / "instances").is_dir():
        for p in sorted((folder / "instances").iterdir()):
            if p.stem in by_name:
                lab = read_mask(p)
                inst[p.stem] = lab[::step, ::step][: by_name[p.stem].target.shape[0], : by_name[p.stem].target.shape[1]]
    if boundary:
        for name, it in list(by_name.items()):
            objects = inst[name] if name in inst else objects_of_mask(it.target > 0, ds.task)
            by_name[name] = LabeledImage(name, it.image, mask_to_target(objects.astype(np.int32), spec))
    return [by_name[n] for n in train], [by_name[n] for n in val], [by_name[n] for n in test], inst


def by_area(items: list[LabeledImage], size: int) -> list[LabeledImage]:
    """``items`` with each image repeated by how many ``size``-px patches its area holds (at least
    once): fine-tuning draws an image uniformly per patch, so without this 300 CoNSeP patches of
    128 px would outweigh 21 MoNuSeg tiles of 500 px 15 to 1 although their pixels are even."""
    out = []
    for it in items:
        out += [it] * max(1, int(round(it.image.shape[0] * it.image.shape[1] / size ** 2)))
    return out


OBJECT_KEYS = ("aji", "pq", "dq", "sq")


def object_metrics_on_true_instances(result: dict, instances: dict) -> dict:
    """The mean metrics of an ``evaluate_items`` result with the nuclei object metrics (AJI, PQ)
    averaged over the images that have true instance labels only: on the others the ground
    truth's "instances" would be the binary mask's connected components, which merge 15-45 % of
    MoNuSeg's nuclei and would punish a model for separating them."""
    from napari_genselfdiff.core.eval.metrics import aggregate

    mean = dict(result["mean"])
    if result["task"] != "nuclei":
        return mean
    with_inst = [r for n, r in result["per_image"].items() if n in instances]
    for k in OBJECT_KEYS:
        mean.pop(k, None)
    if with_inst:
        objects = aggregate([{k: r[k] for k in OBJECT_KEYS} for r in with_inst])
        mean.update({k: objects[k] for k in OBJECT_KEYS})
    mean["n_images_with_instances"] = float(len(with_inst))
    return mean


def unlabeled_pool(root: Path, train_items: dict[str, list[LabeledImage]]) -> list:
    """Unlabeled sources: the training images of every dataset (labels dropped) plus the slides."""
    from napari_genselfdiff.slide.sources import unlabeled_sources

    sources = [ImageSource(it.image, f"{ds}/{it.name}") for ds, items in train_items.items() for it in items]
    slides = [p for p in sorted((root / "slides").glob("*")) if p.suffix in (".tif", ".svs")]
    return sources + unlabeled_sources(slides)


def pretrained_enough(path: Path, steps: int, preset: str | None = None) -> bool:
    """True when ``path`` holds a pretraining checkpoint of at least ``steps`` steps (a periodic
    checkpoint of an interrupted run is resumed instead). Exits with a message when the checkpoint
    there has another architecture than ``preset`` (e.g. left by a run before the preset changed):
    resuming it would silently benchmark the old network."""
    import json

    from napari_genselfdiff.core.nets.unet import UNetConfig

    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    saved = json.loads(cfg.read_text())
    if preset is not None and UNetConfig.from_dict(saved["model"]) != UNetConfig.from_preset(preset):
        sys.exit(f"{path} holds a pretraining of another architecture than preset {preset!r} "
                 f"(mults {saved['model']['mults']}): move it away or pass another --work folder")
    return saved["training"]["steps"] >= steps


def evaluate(model_dir: Path, items, instances, device: str = "cpu", tta: int = 1) -> dict:
    """Mean test metrics of a checkpoint (nuclei AJI / PQ over the images with true instances)."""
    pred = TorchPredictor.from_checkpoint(model_dir, device=device, tta=tta)
    return evaluate_predictor(pred, items, instances)


def evaluate_predictor(pred, items, instances) -> dict:
    return object_metrics_on_true_instances(evaluate_items(pred, items, instances), instances)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{datetime.now(timezone.utc).date().isoformat()}")


def time_per_call(fn, repeats: int, sync=lambda: None) -> float:
    """Seconds per call of ``fn`` over ``repeats`` calls after one warm-up call; ``sync`` waits
    for queued device work (``torch.cuda.synchronize`` on CUDA)."""
    fn()  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t) / repeats


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t
