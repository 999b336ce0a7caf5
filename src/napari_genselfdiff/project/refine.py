"""Refining a project's model on its accepted corrections, with a before/after score.

:func:`refine` is a generator of :class:`~..core.progress.Progress` events, like the core
training loops. It fine-tunes the current model (or ``base_model``) on the accepted regions into
a new ``models/refine-<n>/`` and scores the base and the new model on held-out accepted regions
(all of them, and said so, when fewer than two regions exist or ``val_fraction="all"``). A refine
keeps its base model's head (its classes, boundary class and distance map). The project's current
model switches to the new checkpoint only when the run finishes and the new model scores at least
as well as the base on those regions; otherwise it is kept aside under ``models/`` and said so
(:func:`adopt` takes it anyway; :func:`roll_back` undoes the last change of model). One refine
writes to a project at a time (:mod:`.lock`). Cancelling
(closing the generator) saves the checkpoint reached so far under ``models/`` -- usable later as
``base_model`` -- records a ``"cancelled"`` history line and leaves the current model unchanged.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..core.atomic import inside
from ..core.data import LabeledImage, TaskSpec, downscale_item, split_items
from ..core.errors import DataError
from ..core.progress import Progress
from ..core.train.training import FinetuneConfig, finetune
from .files import HISTORY, ProjectFolder, append_jsonl, model_path, now
from .lock import writer_lock

#: Fixed overrides refine() does not accept: they follow from the project.
FIXED_FIELDS = {"task", "boundary", "num_classes", "steps"}


@dataclass(frozen=True)
class RefineSplit:
    """The accepted regions a refine trains on and validates on, and how that was decided
    (the text the events and the history line show)."""

    train: list[LabeledImage]
    val: list[LabeledImage]
    how: str


def refine(project: ProjectFolder, *, base_model: str | os.PathLike | None = None, steps: int = 200,
           device: str = "auto", val_fraction: float | str = 0.25, seed: int = 0,
           **overrides: Any) -> Iterator[Progress]:
    """Fine-tune the project's current model (or ``base_model``) on its accepted regions.

    Yields ``Progress`` events (stage ``"refine"`` for this function's own, ``"finetune"`` for
    the training steps); the last has ``done=True``, ``checkpoint`` = the new model and
    ``metrics = {"before": ..., "after": ...}``: the mean foreground Dice of the base and the
    new model on the validation regions (``before`` is None when the base cannot segment:
    no model, or a pretrained diffusion model). ``val_fraction`` holds out that fraction of
    regions for validation (they are not trained on); ``"all"`` trains and validates on every
    region, as does a project with fewer than two regions (the event message says so).
    ``overrides`` are :class:`FinetuneConfig` fields (``patch``, ``batch``, ``lr``,
    ``preset``, ...). Close the generator to cancel (see the module docstring).
    """
    with writer_lock(project.folder, "a refine"):
        yield from _refine(project, base_model, steps, device, val_fraction, seed, overrides)


def _refine(project: ProjectFolder, base_model, steps: int, device: str, val_fraction, seed: int,
            overrides: dict) -> Iterator[Progress]:
    spec = refine_spec(project, base_model)
    cfg = refine_config(project, steps, seed, overrides, base_model, spec)
    base = project.current_model if base_model is None else Path(model_path(base_model))
    items = project.training_items(spec)
    if not items:
        raise DataError(f"project {project.folder}: no accepted regions to refine on; accept a corrected region first")
    items = at_model_resolution(project, items, cfg.mpp)
    split = split_for_refine(items, val_fraction, seed)
    out = _next_model_dir(project.folder)
    inner = finetune(split.train, out, cfg, init=base, device=device)
    before, after, status, step = None, None, "failed", 0
    try:
        first = next(inner)  # checks the data (e.g. every mask empty) before any scoring
        yield Progress("refine", 0, steps, message=f"scoring the base model on {split.how}")
        before = score(base, split.val, device)
        yield replace(first, message=f"{first.message}; validating on {split.how}")
        for ev in inner:
            step = ev.step
            if ev.done:
                break
            yield ev
        else:  # it ended unfinished: Cancel stopped it inside a step (core.progress.stoppable)
            status = "cancelled"
            return
        yield Progress("refine", step, steps, message="scoring the refined model")
        after = score(out, split.val, device)
        status = "finished"
    except (GeneratorExit, KeyboardInterrupt):  # closed by a front end, or Ctrl-C while it ran
        status = "cancelled"
        raise
    finally:
        inner.close()  # when stopped early this runs finetune's finally: the checkpoint is saved
        adopted = False
        if out.exists():
            adopted = _record_refine(project, status, base, out, step, split, before, after)
    text = f"refined model {out.name}: Dice {fmt_score(before)} -> {fmt_score(after)} on {split.how}"
    if not adopted:
        text += (f"; kept aside, not adopted: it scores lower than {base.name if base else 'the base model'} "
                 "there (adopt it anyway: 'Adopt anyway' in napari, or genselfdiff project adopt FOLDER "
                 f"{out.name})")
    yield Progress("refine", step, steps, metrics={"before": before, "after": after, "adopted": adopted},
                   checkpoint=str(out), done=True, message=text)


def better_or_equal(before: float | None, after: float | None) -> bool:
    """Whether a refined model may replace its base: it scores at least as well on the held-out
    regions (a base that cannot segment, ``before`` None, is always replaced)."""
    if before is None:
        return True
    return after is not None and after >= before


def refine_spec(project: ProjectFolder, base_model) -> TaskSpec:
    """The task a refine trains: the base model's own head when it segments the project's task
    (its boundary class and width, distance map, classes), else the project's."""
    spec = project.spec
    task = (base_config(project, base_model) or {}).get("task") or {}
    try:
        base = TaskSpec.from_dict(task) if task else None
    except (KeyError, TypeError, ValueError):
        base = None
    return base if base is not None and base.task == spec.task else spec


def refine_config(project: ProjectFolder, steps: int, seed: int, overrides: dict, base_model,
                  spec: TaskSpec | None = None) -> FinetuneConfig:
    """The fine-tuning settings of a refine: its task (``spec``, default :func:`refine_spec`),
    ``steps``, ``seed``, the base model's (or the regions') resolution, and the allowed ``overrides``."""
    allowed = {f.name for f in fields(FinetuneConfig)} - FIXED_FIELDS
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise DataError(f"unknown refine setting(s) {', '.join(unknown)}; choose from {', '.join(sorted(allowed))}")
    if steps < 1:
        raise DataError(f"steps must be >= 1, got {steps}")
    spec = spec or refine_spec(project, base_model)  # the base model's head, kept
    cfg = FinetuneConfig(task=spec.task, boundary=spec.boundary, boundary_width=spec.boundary_width or 1,
                         distance=bool(spec.boundary and spec.distance),
                         num_classes=spec.num_classes if spec.task == "multiclass" else None,
                         steps=steps, seed=seed, val_every=0)
    if "mpp" not in overrides:
        cfg = replace(cfg, mpp=training_mpp(project, base_model))
    return replace(cfg, **overrides)


def base_config(project: ProjectFolder, base_model) -> dict | None:
    """The config.json of the model a refine starts from (the project's current model unless
    ``base_model`` is given), or None when there is none."""
    base = project.current_model if base_model is None else Path(model_path(base_model))
    if base is None:
        return None
    from ..core.checkpoint import load_config
    return load_config(base)


def training_mpp(project: ProjectFolder, base_model) -> float | None:
    """The base model's mpp, else the regions' when they all share one (within 10 %)."""
    cfg = base_config(project, base_model)
    if cfg is not None and cfg.get("mpp"):
        return float(cfg["mpp"])
    mpps = [project.region_mpp(r) for r in project.regions()]
    if not mpps or any(m is None for m in mpps):
        return None
    return mpps[0] if max(mpps) / min(mpps) < 1.1 else None


def at_model_resolution(project: ProjectFolder, items: list[LabeledImage],
                        model_mpp: float | None) -> list[LabeledImage]:
    """Regions are stored at the level they were accepted at; a model trained at another
    resolution (e.g. a half-resolution gland model) must be refined at its own, so rescale
    where both the model's and the region's microns per pixel are known."""
    if not model_mpp:
        return items
    regions = {r["id"]: r for r in project.regions()}
    out = []
    for it in items:
        mpp = project.region_mpp(regions[it.name]) if it.name in regions else None
        factor = model_mpp / mpp if mpp else 1.0
        out.append(downscale_item(it, factor) if abs(factor - 1.0) > 0.1 else it)
    return out


def split_for_refine(items: list[LabeledImage], val_fraction: float | str, seed: int) -> RefineSplit:
    """Which regions to train and to validate on (see :func:`refine`'s ``val_fraction``)."""
    if val_fraction == "all" or len(items) < 2:
        why = "as asked" if val_fraction == "all" else "fewer than 2 regions"
        return RefineSplit(items, items, f"all {len(items)} accepted region(s) ({why}; they are also trained on)")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1) or 'all', got {val_fraction!r}")
    train, val = split_items(items, float(val_fraction), seed)
    return RefineSplit(train, val, f"{len(val)} held-out accepted region(s)")


def score(model: Path | None, items: Sequence[LabeledImage], device: str) -> float | None:
    """Mean foreground Dice of a segmentation checkpoint on ``items`` (None if it cannot segment)."""
    if model is None:
        return None
    from ..core.checkpoint import load_config
    if load_config(model).get("kind") != "segmentation":
        return None
    from ..core.eval.evaluation import evaluate_items
    from ..core.inference import TorchPredictor
    predictor = TorchPredictor.from_checkpoint(model, device=device)
    return float(evaluate_items(predictor, items)["mean"]["dice"])


def fmt_score(v: float | None) -> str:
    """A Dice score for people: three decimals, or 'n/a'."""
    return "n/a" if v is None else f"{v:.3f}"


def _record_refine(project: ProjectFolder, status: str, base: Path | None, out: Path, step: int, split: RefineSplit,
                   before: float | None, after: float | None) -> bool:
    """One history line; a finished refine that scores at least as well as its base becomes the
    current model (returns whether it did)."""
    adopted = status == "finished" and better_or_equal(before, after)
    previous = project.current_model
    record = {"time": now(), "status": status, "base_model": None if base is None else project.relative(base),
              "new_model": project.relative(out), "steps": step, "train_regions": [it.name for it in split.train],
              "val_regions": [it.name for it in split.val], "validated_on": split.how,
              "n_regions": len(project.regions()), "before": before, "after": after, "adopted": adopted,
              "previous_model": None if previous is None else project.relative(previous)}
    append_jsonl(inside(project.folder, HISTORY, "refine history"), _finite(record))
    if adopted:
        project.set_current_model(out)
    return adopted


def adopt(project: ProjectFolder, model: str | os.PathLike) -> Path:
    """Make ``model`` (a refine kept aside: its folder under the project's ``models/``, or its
    name) the current model; one history line."""
    from ..core.checkpoint import load_config

    path = inside(project.folder, f"models/{model}" if os.sep not in str(model) and "/" not in str(model)
                  else project.relative(model), "the model to adopt")
    load_config(path)  # a checkpoint, or one CheckpointError
    with writer_lock(project.folder, "adopting a model"):
        previous = project.current_model
        append_jsonl(inside(project.folder, HISTORY, "refine history"),
                     {"time": now(), "status": "adopted", "new_model": project.relative(path),
                      "previous_model": None if previous is None else project.relative(previous)})
        project.set_current_model(path)
    return path


def roll_back(project: ProjectFolder) -> Path | None:
    """Undo the change that made the current model current (a refine adopted, or an adopt): the
    model before it becomes current again, one history line; again, and it steps further back.
    A DataError when no change made the current model current."""
    with writer_lock(project.folder, "rolling back"):
        current = project.current_model
        made = [h for h in project.history() if (h.get("adopted") or h.get("status") == "adopted")
                and current is not None and h.get("new_model") == project.relative(current)]
        if not made:
            raise DataError(f"project {project.folder}: the current model was not made current by a refine "
                            "or an adopt; there is nothing to roll back")
        previous = made[-1].get("previous_model")
        append_jsonl(inside(project.folder, HISTORY, "refine history"),
                     {"time": now(), "status": "rolled back", "restored_model": previous,
                      "previous_model": project.relative(current)})
        project.set_current_model(None if previous is None else project.folder / previous)
        return project.current_model


def _finite(record: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _next_model_dir(folder: Path) -> Path:
    models = inside(folder, "models", "models folder")  # a link out of the project is refused
    models.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in models.iterdir() if (m := re.fullmatch(r"refine-(\d+)", p.name))]
    return models / f"refine-{max(numbers, default=0) + 1}"
