"""``genselfdiff project create | refine | status``: annotate-and-refine projects from the shell.
The napari widget opens the same folders (:class:`~..project.Project`)."""
from __future__ import annotations

import json

from ..core.errors import GenSelfDiffError
from .console import progress_bar


def project_cli_create(args) -> int:
    """Create a project. ``args``: ``folder``; optional ``task`` ('glands'), ``class_names``
    (list or None), ``model`` (checkpoint or bundled name), ``boundary`` (False), ``slides``
    (list of slide paths to add). Every slide is opened first: a bad one is refused before the
    project folder exists, so it never leaves a half-made project blocking the retry."""
    from ..project import Project
    from ..slide.reader import open_slide

    slides = []
    for path in getattr(args, "slides", None) or []:
        with open_slide(path) as slide:
            mpp = slide.mpp if slide.mpp is not None else getattr(args, "mpp", None)
            if mpp is None:
                print(f"{path}: pixel size unknown (no resolution in the file and no --mpp); the model's own "
                      "will be assumed")
            slides.append((path, slide.shape[:2], mpp))
    project = Project.create(args.folder, task=getattr(args, "task", None) or "glands",
                             class_names=getattr(args, "class_names", None), model=getattr(args, "model", None),
                             boundary=bool(getattr(args, "boundary", False)))
    for path, shape, mpp in slides:
        print(f"added slide {project.add_slide(path, mpp=mpp, shape=shape)} ({path})")
    print(f"created project {project.folder} (task {project.spec.task}, model {project.current_model or 'none'})")
    return 0


def project_cli_refine(args) -> int:
    """Refine the project's model with a progress bar. ``args``: ``folder``; optional ``steps``
    (200), ``device`` ('auto'), ``val_fraction`` (0.25, or 'all'), ``base_model``, ``seed`` (0),
    and FinetuneConfig overrides ``patch``, ``batch``, ``lr``, ``preset``, ``loss`` (None =
    default). Ctrl-C cancels, keeping the partial checkpoint under models/."""
    from ..project import Project

    project = Project.open(args.folder)
    overrides = {k: getattr(args, k) for k in ("patch", "batch", "lr", "preset", "loss")
                 if getattr(args, k, None) is not None}
    val = getattr(args, "val_fraction", None)
    val = 0.25 if val is None else (val if val == "all" else float(val))
    events = project.refine(base_model=getattr(args, "base_model", None), steps=getattr(args, "steps", None) or 200,
                            device=getattr(args, "device", None) or "auto", val_fraction=val,
                            seed=getattr(args, "seed", None) or 0, **overrides)
    last = progress_bar(events, "refine")
    if last is None or not last.done:
        raise GenSelfDiffError("refine stopped before it finished")
    print(last.message)
    print(f"current model: {project.current_model}")
    return 0


def project_cli_adopt(args) -> int:
    """Make a refined model that was kept aside (``args.model``: its name under models/) current."""
    from ..project import Project
    from ..project.refine import adopt

    project = Project.open(args.folder)
    print(f"current model: {adopt(project, args.model)}")
    return 0


def project_cli_rollback(args) -> int:
    """Make the model before the last refine / adopt current again."""
    from ..project import Project
    from ..project.refine import roll_back

    project = Project.open(args.folder)
    print(f"current model: {roll_back(project) or 'none'}")
    return 0


def project_cli_status(args) -> int:
    """Print a project's slides, regions, current model and last refine. ``args``: ``folder``;
    optional ``json`` (True: print one JSON object instead)."""
    from ..project import Project
    from ..project.refine import fmt_score

    project = Project.open(args.folder)
    regions = project.regions()
    history = [h for h in project.history() if "validated_on" in h]  # the refines (not adopt / roll back)
    status = {"folder": str(project.folder), "task": project.spec.task, "class_names": project.class_names,
              "current_model": None if project.current_model is None else str(project.current_model),
              "slides": [{**s, "regions": sum(r["slide"] == s["id"] for r in regions)} for s in project.slides()],
              "regions": len(regions), "refines": len(history), "last_refine": history[-1] if history else None}
    if getattr(args, "json", False):
        print(json.dumps(status, indent=2))
        return 0
    print(f"project {status['folder']}: task {status['task']} ({', '.join(status['class_names'])})")
    print(f"current model: {status['current_model'] or 'none'}")
    for s in status["slides"]:
        shape = "x".join(map(str, s["shape"]))
        print(f"  slide {s['id']}: {s['regions']} region(s), {shape} px, mpp {s['mpp'] or '?'} ({s['path']})")
    print(f"{status['regions']} accepted region(s), {status['refines']} refine(s)")
    last = status["last_refine"]
    if last:
        kept = ", kept aside" if last["status"] == "finished" and last.get("adopted") is False else ""
        print(f"last refine ({last['status']}{kept}, {last['time']}): {last['new_model']}, Dice "
              f"{fmt_score(last.get('before'))} -> {fmt_score(last.get('after'))} on {last['validated_on']}")
    return 0
