"""``genselfdiff``: the command-line face of the core (no Qt is imported here).

Every subcommand drives the same generators and functions as the napari widgets.

Errors. :func:`main` is the one error boundary: bad flag values are refused by the parser before
any work starts (the ``type=`` functions below), and our errors (:class:`GenSelfDiffError`) and
the environment's (``OSError``: permission denied, disk full, a folder where a file should be,
...; ``MemoryError``) become ONE line on stderr, ``genselfdiff <command>: error: ...``, naming
the file or flag, with exit code 2. Ctrl-C prints one ``cancelled`` line saying what was kept
and how to continue (exit code 2 too). Anything else is a bug and keeps its traceback.

This module holds the argument parser and :func:`main` (the ``genselfdiff`` console entry
point); the commands live in ``train`` (pretrain, finetune, evaluate, sample), ``predict``
(predict, export), ``imports`` (import), ``project`` and ``demo``, each imported only when its command runs, so
``--help`` stays fast. ``console`` has the one progress bar they share.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import signal
import threading
from pathlib import Path
from typing import Callable, Sequence

from ..core.errors import GenSelfDiffError
from .boundary import (after_cancel, command_name, describe_os_error, one_line, output_of, raised_in, say, set_threads,
                       smaller, store_of)


# ---------------------------------------------------------------------------------------------
# flag values, checked by the parser (argparse reports "argument --flag: <message>")

def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            within = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be a whole number {within}, got {text!r}")
        return value
    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)
#: a seed numpy and torch both take (torch's manual_seed stops at 2**64 - 1; numpy's streams mix it)
seed = _int_at_least(0, 2**32 - 1)
#: generated tiles: how many and how large (one grid PNG held in memory)
sample_count = _int_at_least(1, 1024)
tile_size = _int_at_least(8, 4096)
#: a label image's side: 2**18 px, beyond any scanner's slide (the largest are about 150,000 px)
image_side = _int_at_least(1, 2 ** 18)
#: patches or tiles per step / call, and a training patch or prediction tile's side
batch_size = _int_at_least(1, 1024)
patch_size = _int_at_least(8, 8192)
#: classes of a multiclass model (background included)
class_count = _int_at_least(2, 256)


def pixel_size(text: str) -> float:
    """Microns per pixel: from 0.01 (beyond any optical scanner) to 100 (a thumbnail)."""
    return _number(text, "microns per pixel from 0.01 to 100", lambda v: 0.01 <= v <= 100)


def learning_rate(text: str) -> float:
    """A learning rate above 0, at most 1 (beyond it AdamW diverges at once)."""
    return _number(text, "a learning rate in (0, 1]", lambda v: 0 < v <= 1)


def tta_views(text: str) -> int:
    """Test-time augmentation views: 1 (off), 2, 4 (flips) or 8 (flips and 90-degree turns)."""
    if text not in ("1", "2", "4", "8"):
        raise argparse.ArgumentTypeError(f"must be 1, 2, 4 or 8 views, got {text!r}")
    return int(text)


TTA_HELP = ("test-time augmentation: average 1 (off, default), 2, 4 (flips) or 8 (flips and turns) views; "
            "costs that many forward passes")


def _number(text: str, expected: str, ok: Callable[[float], bool] = lambda v: True) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _number(text, "a finite number > 0", lambda v: v > 0)


def fraction_0_1(text: str) -> float:
    """A held-out fraction: 0 (none) up to, not including, 1."""
    return _number(text, "a fraction in [0, 1)", lambda v: 0 <= v < 1)


def label_fraction(text: str) -> float:
    """A share of the labeled images to use: above 0, up to 1 (all)."""
    return _number(text, "a fraction in (0, 1]", lambda v: 0 < v <= 1)


def val_fraction_or_all(text: str) -> float | str:
    """``project refine --val-fraction``: a fraction in (0, 1), or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    return _number(text, "a fraction in (0, 1) or 'all'", lambda v: 0 < v < 1)


def level(text: str) -> int | str:
    """``auto`` (the model's resolution) or a pyramid level >= 0."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a pyramid level >= 0, got {text!r}")
    return value


def device(text: str) -> str:
    """auto, cpu, mps, cuda or cuda:N (whether it exists here is checked when it is used)."""
    if not re.fullmatch(r"(auto|cpu|mps|cuda(:\d+)?)", text.strip().lower()):
        raise argparse.ArgumentTypeError(f"must be auto, cuda, cuda:N, mps or cpu, got {text!r}")
    return text.strip().lower()


def loss(text: str) -> str:
    """A weighted sum of the losses in :mod:`..core.train.losses`, e.g. ``focal+ssl``."""
    from ..core.train.losses import parse_loss

    try:
        parse_loss(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def scheduler_address(text: str) -> str:
    """A Dask scheduler's address: ``tcp://HOST:PORT`` (or tls:// / ucx:// / ws(s)://, or
    ``HOST:PORT``); whether it answers is checked when connecting."""
    if not re.fullmatch(r"((tcp|tls|ucx|ws|wss)://)?(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}", text.strip()):
        raise argparse.ArgumentTypeError(f"must be a scheduler address like tcp://HOST:PORT, got {text!r}")
    return text.strip()


def output_file(text: str) -> str:
    """A file to write: refused at once when a folder stands there (not after the work)."""
    if Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    return text


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``genselfdiff <command>: error: ...``,
    exit code 2) instead of the usage plus the error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# the commands (each module imported only when its command runs)

def cmd_pretrain(a: argparse.Namespace) -> int:
    from .train import cmd_pretrain
    return cmd_pretrain(a)


def cmd_finetune(a: argparse.Namespace) -> int:
    from .train import cmd_finetune
    return cmd_finetune(a)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .train import cmd_evaluate
    return cmd_evaluate(a)


def cmd_sample(a: argparse.Namespace) -> int:
    from .train import cmd_sample
    return cmd_sample(a)


def cmd_predict(a: argparse.Namespace) -> int:
    from .predict import predict_cli
    return predict_cli(a)


def cmd_export(a: argparse.Namespace) -> int:
    from .predict import export_cli
    return export_cli(a)


def cmd_import(a: argparse.Namespace) -> int:
    from .imports import import_cli
    return import_cli(a)


def cmd_project(a: argparse.Namespace) -> int:
    from .project import (project_cli_adopt, project_cli_create, project_cli_refine, project_cli_rollback,
                          project_cli_status)
    return {"create": project_cli_create, "refine": project_cli_refine, "status": project_cli_status,
            "adopt": project_cli_adopt, "rollback": project_cli_rollback}[a.action](a)


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(a)


PRECISION_HELP = ("auto (bf16 where the processor computes it natively: avx512_bf16 / amx_bf16 / Arm bf16, or a "
                  "CUDA GPU; fp32 elsewhere), fp32, or bf16 (emulated, hence slower, on CPUs without it)")


#: the --stain-normalize help (core/stain.py)
STAIN_HELP = ("move each input's stain to the nearest stain of the model's training images first (Reinhard, in "
              "CIE Lab; statistics of the whole image, or of windows over a slide's tissue): for slides stained "
              "unlike the training sets (AJI +0.04 to +0.22 across MoNuSeg and CoNSeP); on images like them it "
              "costs 0.01-0.08 AJI, so it is off by default")


def _precision(p: argparse.ArgumentParser) -> None:
    # core.precision.CHOICES, written out: importing it would load torch for every --help (a test checks they agree)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help=PRECISION_HELP)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", type=device, help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--seed", type=seed, default=0, help="random seed: the same seed gives the same run")


def _training(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--out", required=True, help="checkpoint folder to write (model.safetensors + config.json)")
    # core.nets.unet.PRESETS, written out: importing it would load torch for every --help (a test checks they agree)
    p.add_argument("--preset", default="small", choices=["tiny", "wide", "small", "paper", "backbone", "s2d",
                                                           "s2d-backbone"],
                   help="model size: tiny (tests; the widths of the bundled backbone), wide (tiny at twice the width), small "
                        "(CPU-friendly), paper (the reference), backbone (tiny's widths, per-pixel LayerNorm, no "
                        "attention: the one network from pretext to segmentation, as the shipped backbone), s2d "
                        "(no layer at full resolution: space-to-depth stem, the bundled nuclei model; 1.7-2.3x tiny's "
                        "speed on a CPU), s2d-backbone (s2d with backbone's per-pixel LayerNorm: "
                        "the one network without a full-resolution level); "
                        "default small")
    p.add_argument("--steps", type=positive_int, default=steps, help=f"optimisation steps (default {steps})")
    p.add_argument("--patch", type=patch_size, default=256, help="training patch size in pixels (default 256)")
    p.add_argument("--batch", type=batch_size, default=8, help="patches per step (default 8)")
    p.add_argument("--lr", type=learning_rate, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--checkpoint-every", type=nonnegative_int, default=200,
                   help="save a checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out instead of refusing")
    p.add_argument("--no-amp", action="store_true", help="fp32 throughout: the same as --precision fp32")
    _precision(p)
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="genselfdiff", description=(
        "GenSelfDiff-HIS for H&E: pretrain a U-Net as a diffusion model on unlabeled tiles, fine-tune it "
        "on a few labeled tiles, predict glands/nuclei on whole slides, export QuPath GeoJSON."))
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="self-supervised diffusion pretraining on unlabeled images/slides",
                       description="Train the U-Net to denoise unlabeled H&E tiles (DDPM, P2-weighted loss).")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="folders of images and/or slide files (.svs, pyramidal .tif) to draw unlabeled tiles from")
    p.add_argument("--pretext", default="diffusion", choices=["diffusion", "nucleus"],
                   help="diffusion (GenSelfDiff-HIS, default) or nucleus: unpaired translation between the tiles "
                        "and synthetic nucleus masks (UNITPathSSL-like); at 64-128 px --patch on a CPU")
    p.add_argument("--schedule", default="quadratic", choices=["quadratic", "linear", "cosine"],
                   help="diffusion: noise schedule (default quadratic, T=1000, as in the paper)")
    _training(p, 1000)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a segmentation model on labeled images",
                       description="Fine-tune for segmentation with focal + structural-similarity loss.")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of masks with the same file names (0/255, class or instance ids)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--init", help="where to start: 'pretrained' (the shipped backbone), a pretraining checkpoint, "
                                  "or a segmentation model to refine")
    g.add_argument("--scratch", action="store_true", help="start from random weights (the baseline)")
    p.add_argument("--task", default="glands", choices=["glands", "nuclei", "multiclass"], help="what to segment")
    p.add_argument("--boundary", action="store_true",
                   help="add a boundary class to separate touching objects (nuclei: their inner boundary; "
                        "glands: a contour, as DCAN)")
    p.add_argument("--distance", action="store_true",
                   help="nuclei with --boundary: also learn each nucleus's distance map (the watershed's markers)")
    p.add_argument("--num-classes", type=class_count, default=None, help="multiclass: number of classes incl. background")
    p.add_argument("--loss", default="focal+ssl", type=loss, help="weighted sum of focal, ssl, dice, ce, tversky (default focal+ssl)")
    p.add_argument("--label-fraction", type=label_fraction, default=1.0, help="use only this fraction of the labeled images")
    p.add_argument("--val-fraction", type=fraction_0_1, default=0.0, help="hold out this fraction of images for validation Dice")
    p.add_argument("--val-every", type=nonnegative_int, default=100, help="validate every N steps (0: never)")
    p.add_argument("--val-crops", type=nonnegative_int, default=8,
                   help="validate on at most N fixed crops of up to 512 px of the validation images (0: whole images)")
    p.add_argument("--mpp", type=pixel_size, default=None, help="microns per pixel of the training images, if known")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="train only the head (last residual block and classifier) on the frozen features of --init")
    _training(p, 500)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="score a segmentation model on labeled images",
                       description="Pixel Dice/IoU/HD95, GlaS object metrics (glands), AJI and PQ (nuclei).")
    p.add_argument("--model", required=True, help="segmentation checkpoint folder, or 'glands'/'nuclei' for the bundled defaults")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of ground-truth masks")
    p.add_argument("--instances", default=None, help="folder of ground-truth instance labels (nuclei AJI/PQ)")
    p.add_argument("--mpp", type=pixel_size, default=None,
                   help="microns per pixel of the images (overrides their files); each image is predicted at the "
                        "model's own and scored on its masks at its own")
    p.add_argument("--json", default=None, type=output_file, help="also write the metrics to this JSON file")
    p.add_argument("--tta", type=tta_views, default=1, help=TTA_HELP)
    p.add_argument("--stain-normalize", action="store_true", help=STAIN_HELP)
    p.add_argument("--force", action="store_true",
                   help="replace an existing --json, but only a metrics file genselfdiff wrote")
    p.add_argument("--device", default="auto", type=device, help="auto, cuda, mps or cpu")
    _precision(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="generate tiles from a pretrained model (sanity check)",
                       description="Diffusion: a grid of generated tiles. Nucleus-aware: rows of a pseudo mask, "
                                   "H&E generated from it in three styles, and (with --images) a real tile and "
                                   "the mask predicted for it.")
    p.add_argument("--model", required=True, help="pretraining checkpoint folder")
    p.add_argument("--n", type=sample_count, default=16, help="number of tiles, or of rows for nucleus-aware (default 16)")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="nucleus-aware: folders / slides to draw real tiles from, to show the masks predicted for them")
    p.add_argument("--out", required=True, type=output_file, help="PNG file for the grid of tiles")
    p.add_argument("--force", action="store_true", help="replace an existing --out, but only a PNG genselfdiff wrote")
    p.add_argument("--size", type=tile_size, default=None, help="tile size (default: the training patch size)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="ddim (fast) or ddpm (all T steps)")
    _common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("predict", help="predict glands/nuclei over whole slides or images into a zarr store")
    p.add_argument("--model", required=True, help="segmentation checkpoint folder, or 'glands'/'nuclei' for the bundled defaults")
    p.add_argument("--input", nargs="+", required=True, metavar="SLIDE_OR_IMAGE", help="slides or images")
    p.add_argument("--out", required=True, help="output .zarr (one per input; with several inputs, a folder)")
    p.add_argument("--tile", type=patch_size, default=768,  # = slide.tiler.DEFAULT_TILE (a test checks)
                   help="tile size in pixels of the model's resolution (default 768)")
    p.add_argument("--overlap", type=nonnegative_int, default=None,
                   help="overlap between tiles (default: the model's, derived from its receptive field; 64 for older models)")
    p.add_argument("--mpp", type=pixel_size, default=None,
                   help="microns per pixel of the input when its file does not say (TIFF/OME/Aperio tags are read); "
                        "the pyramid level closest to the model's resolution is read and resampled to it")
    p.add_argument("--batch", type=batch_size, default=4, help="tiles per model call (default 4; on a CPU the network takes them one at a time, which is faster there)")
    p.add_argument("--tta", type=tta_views, default=1, help=TTA_HELP)
    p.add_argument("--stain-normalize", action="store_true", help=STAIN_HELP)
    p.add_argument("--level", default="auto", type=level, help="pyramid level, or auto (match the model's microns per pixel)")
    p.add_argument("--no-tissue", action="store_true", help="predict background tiles too (no tissue detection)")
    p.add_argument("--geojson", default=None, type=output_file, help="also export the instances as QuPath GeoJSON")
    p.add_argument("--object-type", default=None, choices=["annotation", "detection"],
                   help="GeoJSON objectType (default: annotation for glands, detection for nuclei)")
    p.add_argument("--overlay", default=None, type=output_file, help="also write an overlay PNG (small images only)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --geojson / --overlay, but only one genselfdiff wrote (never the input)")
    p.add_argument("--device", default="auto", type=device, help="auto, cuda, mps or cpu")
    _precision(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="predict the blocks of all inputs on a Dask LocalCluster of N worker processes here")
    g.add_argument("--scheduler", type=scheduler_address, default=None, metavar="ADDRESS",
                   help="predict on an existing Dask cluster (tcp://HOST:PORT; inputs, outputs and model on a "
                        "shared file system); see README 'Many slides'")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export predicted instance labels (zarr) to GeoJSON / OME-Zarr / TIFF, "
                                      "and their measurements to CSV")
    p.add_argument("--labels", required=True, help="a prediction store written by 'predict' (OUT.zarr)")
    p.add_argument("--name", default=None, help="which label set in the store (default: the first)")
    p.add_argument("--geojson", default=None, type=output_file, help="QuPath GeoJSON output")
    p.add_argument("--object-type", default=None, choices=["annotation", "detection"],
                   help="GeoJSON objectType (default: annotation for glands, detection for nuclei)")
    p.add_argument("--tiff", default=None, type=output_file, help="label TIFF output (pyramidal, tiled)")
    p.add_argument("--csv", default=None, type=output_file,
                   help="per-object measurements (area, perimeter, circularity, eccentricity, solidity in µm; mean "
                        "haematoxylin / eosin optical density when the slide is there; mean probability) as CSV")
    p.add_argument("--ome-zarr", default=None,
                   help="OME-Zarr output: the slide's image at the predicted level, the labels in labels/<name>, "
                        "scales in micrometres")
    p.add_argument("--slide", default=None,
                   help="the slide the prediction was made from, for the OME-Zarr's image and the CSV's optical "
                        "densities (default: the one the store records)")
    p.add_argument("--no-image", action="store_true",
                   help="without the slide's pixels: an OME-Zarr of the labels only, a CSV without optical densities")
    p.add_argument("--force", action="store_true",
                   help="replace existing outputs, but only exports genselfdiff wrote (never the store or a user's file)")
    p.add_argument("--partial", action="store_true",
                   help="export an unfinished prediction as it is (says how much is missing)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="QuPath GeoJSON objects -> a label TIFF (one id per object)",
                       description="Draw the polygons of a GeoJSON file (QuPath annotations or detections) into a "
                                   "label TIFF of an image's size, one id per object, for training masks or other tools.")
    p.add_argument("--geojson", required=True, help="GeoJSON file to read (FeatureCollection, Feature(s), geometry)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--like", default=None, metavar="IMAGE", help="the slide or image the objects were drawn on (its size, mpp)")
    g.add_argument("--shape", nargs=2, type=image_side, default=None, metavar=("H", "W"),
                   help="the label image's height and width in pixels")
    p.add_argument("--mpp", type=pixel_size, default=None, help="microns per pixel to record (default: --like's)")
    p.add_argument("--out", required=True, type=output_file, help="label TIFF to write (pyramidal, tiled)")
    p.add_argument("--force", action="store_true", help="replace --out, but only a label TIFF genselfdiff wrote")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("project", help="annotate-and-refine projects: create, refine the model on corrections, status",
                       description="A project folder holds slide references, accepted corrections, label stores, "
                                   "models and history; napari and the CLI open the same folder.")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = psub.add_parser("create", help="create a project folder")
    q.add_argument("folder")
    q.add_argument("--task", default="glands", choices=["glands", "nuclei", "multiclass"])
    q.add_argument("--model", default=None, help="starting model: checkpoint folder or 'glands'/'nuclei' (bundled)")
    q.add_argument("--slides", nargs="*", default=[], help="slide files to add")
    q.add_argument("--mpp", type=pixel_size, default=None,
                   help="microns per pixel of the slides when their files do not say")
    q.add_argument("--boundary", action="store_true", help="a boundary class (nuclei) or contour class (glands)")
    q = psub.add_parser("refine", help="fine-tune the current model on the accepted corrections")
    q.add_argument("folder")
    q.add_argument("--steps", type=positive_int, default=200, help="fine-tuning steps (default 200)")
    q.add_argument("--val-fraction", default=None, type=val_fraction_or_all, help="held-out share of regions for before/after Dice, or 'all'")
    q.add_argument("--base-model", default=None, help="start from this checkpoint instead of the current model")
    q.add_argument("--patch", type=patch_size, default=None, help="training patch size (default 256)")
    q.add_argument("--batch", type=batch_size, default=None, help="patches per step (default 8)")
    q.add_argument("--lr", type=learning_rate, default=None, help="peak learning rate (default 1e-4)")
    _common(q)
    q = psub.add_parser("adopt", help="make a refined model that was kept aside (it scored lower) the current model")
    q.add_argument("folder")
    q.add_argument("model", help="the refined model's name under the project's models/ (e.g. refine-2)")
    q = psub.add_parser("rollback", help="make the model before the last refine / adopt current again")
    q.add_argument("folder")
    q = psub.add_parser("status", help="slides, regions, current model, last refine")
    q.add_argument("folder")
    q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("demo", help="the main job on the bundled sample / shared data, end to end")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--data", default=None, help="data folder (default ../shared/data when present)")
    p.add_argument("--quick", action="store_true", help="a few seconds of training only (smoke test)")
    p.add_argument("--device", default="auto", type=device, help="auto, cuda, mps or cpu")
    p.set_defaults(func=cmd_demo)
    return ap


#: The flags that name files or folders (their argparse dests): an empty value there is a slip
#: ('--out ""' from an unset shell variable) that would otherwise mean the current folder.
PATH_FLAGS = ("out", "input", "images", "masks", "instances", "like", "labels", "geojson", "tiff", "ome_zarr",
              "overlay", "slide", "slides", "init", "base_model", "data", "folder")


def empty_path_flag(args: argparse.Namespace) -> str | None:
    """The first path flag given an empty value ('--out' or 'folder'), or None."""
    for dest in PATH_FLAGS:
        value = getattr(args, dest, None)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            return dest if dest == "folder" else "--" + dest.replace("_", "-")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``genselfdiff`` command; returns its exit code (0 done, 2 error or cancelled).

    Called as the program (``argv`` None: the console script, ``python -m``), a Ctrl-C that comes
    after the command has finished and said so is ignored: it would otherwise kill the interpreter
    while it shuts down, with no line, and turn a finished job into exit status -2."""
    code = _run(argv)
    if argv is None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a bad flag already reported in one line (2)
        return e.code if isinstance(e.code, int) else 2
    name = command_name(args)
    empty = empty_path_flag(args)
    if empty:
        say(f"genselfdiff {name}: error: argument {empty}: is empty; give a file or folder "
            f"(see genselfdiff {name} --help)")
        return 2
    try:
        set_threads()
        return args.func(args)
    except KeyboardInterrupt:
        # zarr's event loop thread still holds the interrupted writes; at exit asyncio would log
        # each as "Task was destroyed but it is pending!" after our line
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        kept = after_cancel(args)
        say(f"genselfdiff {name}: cancelled{'; ' + kept if kept else ''}")
        return 2
    except GenSelfDiffError as e:
        say(f"genselfdiff {name}: error: {e}")
    except MemoryError:
        say(f"genselfdiff {name}: error: out of memory; {smaller(args)}")
    except OSError as e:
        say(f"genselfdiff {name}: error: {describe_os_error(e, output_of(args))}")
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch's (a RuntimeError)
            say(f"genselfdiff {name}: error: out of GPU memory; {smaller(args)}")
        elif raised_in(e, ("zarr", "numcodecs")):  # a store someone damaged or edited; anything else is a bug
            say(f"genselfdiff {name}: error: {store_of(args)}: a damaged or edited zarr store "
                 f"({type(e).__name__}: {one_line(e) or 'no detail'}); predict again into a new folder")
        else:
            raise
    return 2
