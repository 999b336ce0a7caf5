"""``genselfdiff``: the command-line face of the core (no Qt is imported here).

Every subcommand drives the same generators and functions as the napari widgets. User errors
(missing folders, unreadable files, mismatched masks, ...) are printed as one line, exit code 2;
Ctrl-C stops training cleanly, keeping a resumable checkpoint (exit code 130).

This module holds the argument parser and :func:`main` (the ``genselfdiff`` console entry
point); the commands live in ``train`` (pretrain, finetune, evaluate, sample), ``predict``
(predict, export), ``project`` and ``demo``, each imported only when its command runs, so
``--help`` stays fast. ``console`` has the one progress bar they share.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..core.errors import GenSelfDiffError


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


def cmd_project(a: argparse.Namespace) -> int:
    from .project import project_cli_create, project_cli_refine, project_cli_status
    return {"create": project_cli_create, "refine": project_cli_refine, "status": project_cli_status}[a.action](a)


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(a)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same run")


def _training(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--out", required=True, help="checkpoint folder to write (model.safetensors + config.json)")
    p.add_argument("--preset", default="small", choices=["tiny", "small", "paper"],
                   help="model size: tiny (tests), small (CPU-friendly), paper (the reference); default small")
    p.add_argument("--steps", type=int, default=steps, help=f"optimisation steps (default {steps})")
    p.add_argument("--patch", type=int, default=256, help="training patch size in pixels (default 256)")
    p.add_argument("--batch", type=int, default=8, help="patches per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="save a checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out instead of refusing")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="genselfdiff", description=(
        "GenSelfDiff-HIS for H&E: pretrain a U-Net as a diffusion model on unlabeled tiles, fine-tune it "
        "on a few labeled tiles, predict glands/nuclei on whole slides, export QuPath GeoJSON."))
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="self-supervised diffusion pretraining on unlabeled images/slides",
                       description="Train the U-Net to denoise unlabeled H&E tiles (DDPM, P2-weighted loss).")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="folders of images and/or slide files (.svs, pyramidal .tif) to draw unlabeled tiles from")
    p.add_argument("--schedule", default="quadratic", choices=["quadratic", "linear", "cosine"],
                   help="noise schedule (default quadratic, T=1000, as in the paper)")
    _training(p, 1000)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a segmentation model on labeled images",
                       description="Fine-tune for segmentation with focal + structural-similarity loss.")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of masks with the same file names (0/255, class or instance ids)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--init", help="pretrained checkpoint to start from (or a segmentation model to refine)")
    g.add_argument("--scratch", action="store_true", help="start from random weights (the baseline)")
    p.add_argument("--task", default="glands", choices=["glands", "nuclei", "multiclass"], help="what to segment")
    p.add_argument("--boundary", action="store_true", help="nuclei: add a boundary class to separate touching nuclei")
    p.add_argument("--num-classes", type=int, default=None, help="multiclass: number of classes incl. background")
    p.add_argument("--loss", default="focal+ssl", help="weighted sum of focal, ssl, dice, ce, tversky (default focal+ssl)")
    p.add_argument("--label-fraction", type=float, default=1.0, help="use only this fraction of the labeled images")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of images for validation Dice")
    p.add_argument("--val-every", type=int, default=100, help="validate every N steps")
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel of the training images, if known")
    _training(p, 500)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="score a segmentation model on labeled images",
                       description="Pixel Dice/IoU/HD95, GlaS object metrics (glands), AJI and PQ (nuclei).")
    p.add_argument("--model", required=True, help="segmentation checkpoint folder")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of ground-truth masks")
    p.add_argument("--instances", default=None, help="folder of ground-truth instance labels (nuclei AJI/PQ)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="generate tiles from a pretrained diffusion model (sanity check)")
    p.add_argument("--model", required=True, help="pretraining checkpoint folder")
    p.add_argument("--n", type=int, default=16, help="number of tiles (default 16)")
    p.add_argument("--out", required=True, help="PNG file for the grid of tiles")
    p.add_argument("--size", type=int, default=None, help="tile size (default: the training patch size)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="ddim (fast) or ddpm (all T steps)")
    _common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("predict", help="predict glands/nuclei over whole slides or images into a zarr store")
    p.add_argument("--model", required=True, help="segmentation checkpoint folder, or 'glands'/'nuclei' for the bundled defaults")
    p.add_argument("--input", nargs="+", required=True, metavar="SLIDE_OR_IMAGE", help="slides or images")
    p.add_argument("--out", required=True, help="output .zarr (one per input; with several inputs, a folder)")
    p.add_argument("--tile", type=int, default=512, help="tile size (default 512)")
    p.add_argument("--overlap", type=int, default=64, help="overlap between tiles (default 64)")
    p.add_argument("--batch", type=int, default=4, help="tiles per forward pass (default 4)")
    p.add_argument("--level", default="auto", help="pyramid level, or auto (match the model's microns per pixel)")
    p.add_argument("--no-tissue", action="store_true", help="predict background tiles too (no tissue detection)")
    p.add_argument("--geojson", default=None, help="also export the instances as QuPath GeoJSON")
    p.add_argument("--object-type", default=None, choices=["annotation", "detection"],
                   help="GeoJSON objectType (default: annotation for glands, detection for nuclei)")
    p.add_argument("--overlay", default=None, help="also write an overlay PNG (small images only)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export predicted instance labels (zarr) to GeoJSON / OME-Zarr / TIFF")
    p.add_argument("--labels", required=True, help="a prediction store written by 'predict' (OUT.zarr)")
    p.add_argument("--name", default=None, help="which label set in the store (default: the first)")
    p.add_argument("--geojson", default=None, help="QuPath GeoJSON output")
    p.add_argument("--object-type", default=None, choices=["annotation", "detection"],
                   help="GeoJSON objectType (default: annotation for glands, detection for nuclei)")
    p.add_argument("--tiff", default=None, help="label TIFF output (pyramidal, tiled)")
    p.add_argument("--ome-zarr", default=None, help="OME-Zarr labels output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("project", help="annotate-and-refine projects: create, refine the model on corrections, status",
                       description="A project folder holds slide references, accepted corrections, label stores, "
                                   "models and history; napari and the CLI open the same folder.")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = psub.add_parser("create", help="create a project folder")
    q.add_argument("folder")
    q.add_argument("--task", default="glands", choices=["glands", "nuclei", "multiclass"])
    q.add_argument("--model", default=None, help="starting model: checkpoint folder or 'glands'/'nuclei' (bundled)")
    q.add_argument("--slides", nargs="*", default=[], help="slide files to add")
    q.add_argument("--boundary", action="store_true", help="nuclei: boundary class")
    q = psub.add_parser("refine", help="fine-tune the current model on the accepted corrections")
    q.add_argument("folder")
    q.add_argument("--steps", type=int, default=200, help="fine-tuning steps (default 200)")
    q.add_argument("--val-fraction", default=None, help="held-out share of regions for before/after Dice, or 'all'")
    q.add_argument("--base-model", default=None, help="start from this checkpoint instead of the current model")
    q.add_argument("--patch", type=int, default=None)
    q.add_argument("--batch", type=int, default=None)
    q.add_argument("--lr", type=float, default=None)
    _common(q)
    q = psub.add_parser("status", help="slides, regions, current model, last refine")
    q.add_argument("folder")
    q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("demo", help="the main job on the bundled sample / shared data, end to end")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--data", default=None, help="data folder (default ../shared/data when present)")
    p.add_argument("--quick", action="store_true", help="a few seconds of training only (smoke test)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("GENSELFDIFF_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["GENSELFDIFF_THREADS"]))
    try:
        return args.func(args)
    except GenSelfDiffError as e:
        print(f"genselfdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genselfdiff {args.command}: interrupted; the last checkpoint is kept (use --resume)", file=sys.stderr)
        return 130
