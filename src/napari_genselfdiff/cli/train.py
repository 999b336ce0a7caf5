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


def _drive(events, desc: str):
    """:func:`.console.progress_bar`; under torchrun (core/train/ddp.py) only rank 0 shows it and its
    messages, the other ranks run the same events silently (warnings too). Leaves the process
    group at the end; returns the last event."""
    import warnings

    from ..core.train import ddp

    if ddp.is_main_process():
        last = progress_bar(events, desc)
    else:
        last = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for last in events:
                    if last.done:
                        break
        finally:
            events.close()
    ddp.shutdown()
    return last


def _report(text: str) -> None:
    """Print ``text`` (under torchrun on rank 0 only)."""
    from ..core.train.ddp import is_main_process

    if is_main_process():
        print(text)


def cmd_pretrain(a: argparse.Namespace) -> int:
    from ..slide.sources import unlabeled_sources
    from ..core.pretext.diffusion import ScheduleConfig
    from ..core.train.training import PretrainConfig, pretrain

    if getattr(a, "pretext", "diffusion") == "nucleus":
        from ..core.train.ddp import launched
        from ..core.train.pretext_nucleus import NucleusPretrainConfig, pretrain_nucleus

        if launched():  # its GAN trainer has no process group: N copies would write one checkpoint
            raise GenSelfDiffError("pretrain --pretext nucleus runs in one process only; start it without torchrun")

        ncfg = NucleusPretrainConfig(preset=a.preset, steps=a.steps, patch=a.patch, batch=a.batch, lr=a.lr,
                                     seed=a.seed, checkpoint_every=a.checkpoint_every, amp=not a.no_amp,
                                     precision=a.precision)
        events = pretrain_nucleus(unlabeled_sources(a.images), a.out, ncfg, device=a.device, resume=a.resume,
                                  overwrite=a.force, inputs=a.images)
    else:
        cfg = PretrainConfig(preset=a.preset, steps=a.steps, patch=a.patch, batch=a.batch, lr=a.lr, seed=a.seed,
                             checkpoint_every=a.checkpoint_every, amp=not a.no_amp, precision=a.precision,
                             schedule=ScheduleConfig(kind=a.schedule))
        events = pretrain(unlabeled_sources(a.images), a.out, cfg, device=a.device, resume=a.resume,
                          overwrite=a.force, inputs=a.images)
    last = _drive(events, "pretrain")
    _report(f"pretrained model: {last.checkpoint} ({last.step} steps)")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from ..core.data import TaskSpec, load_labeled_folder, split_items
    from ..core.train.training import FinetuneConfig, finetune

    if a.init is None and not a.scratch and not a.resume:
        raise GenSelfDiffError("give --init pretrained (the shipped backbone), --init CKPT or --scratch")
    if a.freeze_backbone and a.init is None and not a.resume:
        raise GenSelfDiffError("--freeze-backbone needs --init: random features are not worth freezing")
    if a.distance and not (a.task == "nuclei" and a.boundary):
        raise GenSelfDiffError("--distance needs --task nuclei --boundary (its targets come from the separated nuclei)")
    init = None if a.scratch or a.init is None else init_model(a.init)  # checked before the images load
    spec = TaskSpec.make(a.task, a.boundary, a.num_classes)
    items = load_labeled_folder(a.images, a.masks, spec)
    train, val = split_items(items, a.val_fraction, a.seed)
    cfg = FinetuneConfig(task=a.task, boundary=a.boundary, boundary_width=spec.boundary_width, distance=a.distance,
                         num_classes=a.num_classes,
                         preset=a.preset, steps=a.steps, patch=a.patch, batch=a.batch, lr=a.lr, loss=a.loss, seed=a.seed,
                         label_fraction=a.label_fraction, checkpoint_every=a.checkpoint_every,
                         val_every=a.val_every, val_crops=a.val_crops, amp=not a.no_amp,
                         precision=a.precision, mpp=a.mpp, freeze_backbone=a.freeze_backbone)
    events = finetune(train, a.out, cfg, init=init, val_items=val, device=a.device,
                      resume=a.resume, overwrite=a.force, inputs=[a.images, a.masks])
    last = _drive(events, "finetune")
    _report(f"segmentation model: {last.checkpoint} ({last.step} steps)")
    return 0


#: the marker kind of ``evaluate --json``'s metrics file (core.atomic.json_marker): what --force may replace
METRICS_KIND = "evaluation"


def cmd_evaluate(a: argparse.Namespace) -> int:
    from ..core.eval.evaluation import evaluate_folder, format_report

    from ..slide.reader import file_mpp

    model = resolve_model(a.model)
    if a.json:  # checked before any work: an existing file is replaced only with --force and only if ours
        from ..core.atomic import check_target, is_our_json
        check_target(a.json, kind="metrics JSON", force=a.force, ours=lambda p: is_our_json(p, METRICS_KIND),
                     inputs=[model])
    result = evaluate_folder(model, a.images, a.masks, instances_dir=a.instances, device=a.device,
                             mpp=a.mpp, mpp_of=file_mpp, tta=getattr(a, "tta", 1),
                             precision=getattr(a, "precision", "auto"), stain=getattr(a, "stain_normalize", False))
    print(format_report(result))
    if a.json:
        from ..core.atomic import json_marker, write_json_atomic
        write_json_atomic(a.json, {**result, **json_marker(METRICS_KIND)})
        print(f"wrote {a.json}")
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    from ..core.atomic import check_target, is_our_png, write_png_atomic
    from ..core.pretext.sampling import generate_tiles, samples_note, tile_grid

    model = resolve_model(a.model)
    # checked before any work: an existing file is replaced only with --force and only a PNG of ours
    check_target(a.out, kind="PNG", force=a.force, ours=is_our_png, inputs=[model])
    from ..core.checkpoint import load_config
    from ..core.train.pretext_nucleus import pretext_of

    config = load_config(model)
    if config.get("kind") == "pretrain" and pretext_of(config) == "nucleus":
        return _sample_nucleus(a, model, config)
    tiles = generate_tiles(model, a.n, size=a.size, steps=a.steps, sampler=a.sampler, seed=a.seed,
                           device=a.device)
    write_png_atomic(a.out, tile_grid(tiles))
    steps = (config.get("training") or {}).get("steps")
    print(f"wrote {a.out} ({a.n} tiles of {tiles.shape[1]}x{tiles.shape[2]}): {samples_note(steps)}")
    return 0


def _sample_nucleus(a: argparse.Namespace, model: Path, config: dict) -> int:
    """``sample`` on a nucleus-aware checkpoint: pseudo masks -> generated H&E in three styles, and
    real tiles (from ``--images``) -> predicted masks."""
    import numpy as np

    from ..core.atomic import write_png_atomic
    from ..core.train.pretext_nucleus import nucleus_samples

    size = a.size or int(config.get("patch_size", 128))
    real = None
    if a.images:
        from ..slide.sources import unlabeled_sources

        sources = unlabeled_sources(a.images)
        rng = np.random.default_rng(a.seed)
        real = np.stack([sources[int(rng.integers(len(sources)))].sample(rng, size) for _ in range(a.n)])
    grid = nucleus_samples(model, a.n, size=size, real=real, seed=a.seed, device=a.device)
    write_png_atomic(a.out, grid)
    what = "pseudo masks, 3 generated stainings each" + (", real tiles and their predicted masks" if a.images else "")
    print(f"wrote {a.out} ({a.n} rows: {what})")
    return 0
