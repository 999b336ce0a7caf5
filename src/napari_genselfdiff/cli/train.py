"""``genselfdiff pretrain | finetune | evaluate | sample``: the training half of the command line.
Each command drives the core's generators with :func:`.console.progress_bar`. Every flag that
takes a model (``--init``, ``--model``) also takes a bundled model's name (``glands``, ``nuclei``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..bundled import resolve_model
from ..core.errors import GenSelfDiffError
from .console import progress_bar


def init_model(name_or_path: str) -> Path:
    """``finetune --init``: a checkpoint folder or a bundled name -> the folder, checked before
    any training starts: its weights fit the architecture in its config (one line, not the
    loader's traceback) and a segmentation model's config has its task."""
    from ..core.checkpoint import load_model
    from ..core.inference import checkpoint_task

    path = resolve_model(name_or_path)
    _, cfg = load_model(path)
    if cfg.get("kind") == "segmentation":
        checkpoint_task(cfg, path)
    return path


def cmd_pretrain(a: argparse.Namespace) -> int:
    from ..slide.sources import unlabeled_sources
    from ..core.diffusion import ScheduleConfig
    from ..core.training import PretrainConfig, pretrain

    cfg = PretrainConfig(preset=a.preset, steps=a.steps, patch=a.patch, batch=a.batch, lr=a.lr, seed=a.seed,
                         checkpoint_every=a.checkpoint_every, amp=not a.no_amp,
                         schedule=ScheduleConfig(kind=a.schedule))
    sources = unlabeled_sources(a.images)
    last = progress_bar(pretrain(sources, a.out, cfg, device=a.device, resume=a.resume, overwrite=a.force),
                        "pretrain")
    print(f"pretrained model: {last.checkpoint} ({last.step} steps)")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from ..core.data import TaskSpec, load_labeled_folder, split_items
    from ..core.training import FinetuneConfig, finetune

    if a.init is None and not a.scratch and not a.resume:
        raise GenSelfDiffError("give --init CKPT (a pretrained model) or --scratch")
    init = None if a.scratch or a.init is None else init_model(a.init)  # checked before the images load
    items = load_labeled_folder(a.images, a.masks, TaskSpec.make(a.task, a.boundary, a.num_classes))
    train, val = split_items(items, a.val_fraction, a.seed)
    cfg = FinetuneConfig(task=a.task, boundary=a.boundary, num_classes=a.num_classes, preset=a.preset,
                         steps=a.steps, patch=a.patch, batch=a.batch, lr=a.lr, loss=a.loss, seed=a.seed,
                         label_fraction=a.label_fraction, checkpoint_every=a.checkpoint_every,
                         val_every=a.val_every, val_crops=a.val_crops, amp=not a.no_amp, mpp=a.mpp)
    events = finetune(train, a.out, cfg, init=init, val_items=val, device=a.device,
                      resume=a.resume, overwrite=a.force)
    last = progress_bar(events, "finetune")
    print(f"segmentation model: {last.checkpoint} ({last.step} steps)")
    return 0


#: the marker kind of ``evaluate --json``'s metrics file (core.atomic.json_marker): what --force may replace
METRICS_KIND = "evaluation"


def cmd_evaluate(a: argparse.Namespace) -> int:
    from ..core.evaluation import evaluate_folder, format_report

    from ..slide.reader import file_mpp

    model = resolve_model(a.model)
    if a.json:  # checked before any work: an existing file is replaced only with --force and only if ours
        from ..core.atomic import check_target, is_our_json
        check_target(a.json, kind="metrics JSON", force=a.force, ours=lambda p: is_our_json(p, METRICS_KIND),
                     inputs=[model])
    result = evaluate_folder(model, a.images, a.masks, instances_dir=a.instances, device=a.device,
                             mpp=a.mpp, mpp_of=file_mpp, tta=getattr(a, "tta", 1))
    print(format_report(result))
    if a.json:
        from ..core.atomic import json_marker, write_json_atomic
        write_json_atomic(a.json, {**result, **json_marker(METRICS_KIND)})
        print(f"wrote {a.json}")
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    from ..core.atomic import check_target, is_our_png, write_png_atomic
    from ..core.sampling import generate_tiles, tile_grid

    model = resolve_model(a.model)
    # checked before any work: an existing file is replaced only with --force and only a PNG of ours
    check_target(a.out, kind="PNG", force=a.force, ours=is_our_png, inputs=[model])
    tiles = generate_tiles(model, a.n, size=a.size, steps=a.steps, sampler=a.sampler, seed=a.seed,
                           device=a.device)
    write_png_atomic(a.out, tile_grid(tiles))
    print(f"wrote {a.out} ({a.n} tiles of {tiles.shape[1]}x{tiles.shape[2]})")
    return 0
