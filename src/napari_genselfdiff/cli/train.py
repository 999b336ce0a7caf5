"""``genselfdiff pretrain | finetune | evaluate | sample``: the training half of the command line.
Each command drives the core's generators with :func:`.console.progress_bar`."""
from __future__ import annotations

import argparse

from ..core.errors import GenSelfDiffError
from .console import progress_bar


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
    items = load_labeled_folder(a.images, a.masks, TaskSpec.make(a.task, a.boundary, a.num_classes))
    train, val = split_items(items, a.val_fraction, a.seed)
    cfg = FinetuneConfig(task=a.task, boundary=a.boundary, num_classes=a.num_classes, preset=a.preset,
                         steps=a.steps, patch=a.patch, batch=a.batch, lr=a.lr, loss=a.loss, seed=a.seed,
                         label_fraction=a.label_fraction, checkpoint_every=a.checkpoint_every,
                         val_every=a.val_every, amp=not a.no_amp, mpp=a.mpp)
    events = finetune(train, a.out, cfg, init=None if a.scratch else a.init, val_items=val, device=a.device,
                      resume=a.resume, overwrite=a.force)
    last = progress_bar(events, "finetune")
    print(f"segmentation model: {last.checkpoint} ({last.step} steps)")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from ..core.evaluation import evaluate_folder, format_report

    result = evaluate_folder(a.model, a.images, a.masks, instances_dir=a.instances, device=a.device)
    print(format_report(result))
    if a.json:
        from ..core.atomic import write_json_atomic
        write_json_atomic(a.json, result)
        print(f"wrote {a.json}")
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    from ..core.atomic import write_png_atomic
    from ..core.sampling import generate_tiles, tile_grid

    tiles = generate_tiles(a.model, a.n, size=a.size, steps=a.steps, sampler=a.sampler, seed=a.seed,
                           device=a.device)
    write_png_atomic(a.out, tile_grid(tiles))
    print(f"wrote {a.out} ({a.n} tiles of {tiles.shape[1]}x{tiles.shape[2]})")
    return 0
