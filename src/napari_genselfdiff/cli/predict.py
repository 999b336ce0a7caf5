"""``genselfdiff predict`` and ``genselfdiff export``: whole-slide prediction into a zarr store,
and exports of its instance labels (QuPath GeoJSON, OME-Zarr labels, label TIFF). The store is
read through :class:`~..slide.store.PredictionStore`; QuPath class names, object types and
colours come from :mod:`..formats.qupath`.

Nothing here overwrites what it did not write (:func:`~..core.atomic.check_target`): an output
that exists is refused unless ``--force``, which replaces only an export of ours of the same
kind, never the input slide or store. Every output is checked before any work starts, so a
refusal never comes after hours of prediction. An unfinished prediction is not exported unless
``--partial``, which says how much is missing."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..core.atomic import check_target, is_our_png
from ..core.errors import DataError
from ..formats import qupath
from ..slide.store import PredictionStore
from .console import progress_bar

#: One bar per stage of a slide prediction, counted in these units.
PREDICT_UNITS = {"predict": "tile", "postprocess": "block"}


@dataclass(frozen=True)
class Exported:
    """What :func:`export_store` wrote: the label set, and per format its path (None: not asked
    for); ``objects`` is the number of GeoJSON features (None without GeoJSON); ``missing`` is
    what an unfinished prediction lacked when it was exported with ``partial`` (None: finished);
    ``notes`` are what the user should read about the OME-Zarr (no image in it, pixel units) and the
    CSV (no optical densities); ``measured`` is the number of CSV rows (None without a CSV)."""

    name: str
    geojson: str | None = None
    objects: int | None = None
    tiff: str | None = None
    ome_zarr: str | None = None
    missing: str | None = None
    notes: tuple[str, ...] = ()
    csv: str | None = None
    measured: int | None = None


def check_exports(*, geojson: str | None = None, tiff: str | None = None, ome_zarr: str | None = None,
                  overlay: str | None = None, csv: str | None = None, force: bool = False, inputs: list = ()) -> None:
    """Refuse (DataError, one line) any output that may not be written: the rule of
    :func:`~..core.atomic.check_target` with each format's own test of "ours"."""
    from ..formats.geojson import is_our_geojson
    from ..formats.measurements import is_our_csv
    from ..formats.ome_zarr import is_our_ome_zarr
    from ..formats.tiff import is_our_tiff

    for path, kind, ours in ((geojson, "GeoJSON export", is_our_geojson), (tiff, "label TIFF", is_our_tiff),
                             (ome_zarr, "OME-Zarr labels export", is_our_ome_zarr),
                             (overlay, "overlay PNG", is_our_png), (csv, "measurements CSV", is_our_csv)):
        if path:
            check_target(path, kind=kind, force=force, ours=ours, inputs=inputs)
    outputs = [Path(p).absolute() for p in (geojson, tiff, ome_zarr, overlay, csv) if p]
    if len(set(outputs)) < len(outputs):
        raise DataError("two outputs have the same path; give each its own")


def _label_set(store: PredictionStore, name: str | None, partial: bool) -> tuple[str, str | None]:
    """The label set to export and what is missing (None: the prediction finished). An
    unfinished prediction is refused unless ``partial``."""
    names = store.label_names()
    missing = store.unfinished(name or (names[0] if names else None))
    if not names:
        if missing:
            raise DataError(f"prediction {store.path} is not finished ({missing}) and has no instance "
                            "labels yet (they are made after the last block): rerun predict to resume")
        raise DataError("the prediction store has no instance labels (predict with a glands/nuclei model)")
    name = name or names[0]
    if name not in names:
        raise DataError(f"no label set {name!r} in the store (has: {', '.join(names)})")
    if missing and not partial:
        raise DataError(f"prediction {store.path} is not finished ({missing}): rerun predict to resume, "
                        "or pass --partial to export what is there")
    return name, missing


def export_store(store: PredictionStore, *, name: str | None = None, geojson: str | None = None,
                 tiff: str | None = None, ome_zarr: str | None = None,
                 object_type: str | None = None, force: bool = False, partial: bool = False,
                 inputs: list = (), slide: str | None = None, image: bool = True, csv: str | None = None) -> Exported:
    """Write the chosen exports of a prediction store's instance labels; returns what was written.

    Every output is checked first (:func:`check_exports`; the store, the slide and ``inputs`` are
    never written, an existing output is replaced only with ``force`` and only when it is an
    export of ours). An unfinished prediction is refused unless ``partial``; then ``missing`` in
    the result says what was not there (missing blocks export as background). The OME-Zarr holds
    the slide's image at the predicted level (unless not ``image``), read from ``slide`` or else
    the slide the store records; its scales are in micrometres when the pixel size is known. The
    measurements ``csv`` has a row per object (:mod:`..formats.measurements`), with the mean
    haematoxylin and eosin optical densities when the slide's pixels are there (and ``image``)."""
    import contextlib

    name, missing = _label_set(store, name, partial)
    sources = [store.path, *inputs, *(p for p in (slide, store.slide_path) if p)]
    check_exports(geojson=geojson, tiff=tiff, ome_zarr=ome_zarr, csv=csv, force=force, inputs=sources)
    labels = store.labels(name)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        pixels = None
        if (ome_zarr or csv) and image:  # the slide is checked before anything is written
            pixels, where = _export_image(store, slide, tuple(labels.shape), stack)
            if where and ome_zarr:
                notes.append(f"{where}: the OME-Zarr holds the labels only (a viewer opening its root finds no "
                             "image); pass --slide to include the image")
            if where and csv:
                notes.append(f"{where}: the CSV has no haematoxylin and eosin optical densities; pass --slide to "
                             "measure them")
        _check_export_space(store, name, tiff, ome_zarr, pixels is not None)
        if ome_zarr and store.slide_mpp is None:
            notes.append("the slide states no pixel size: the OME-Zarr scales are in full-resolution pixels "
                         "(no unit); predict with --mpp to record one")
        image_name = Path(slide).name if slide else (store.slide_path.name if store.slide_path else "image")
        objects = _export_labels(store, name, labels, geojson, tiff, ome_zarr,
                                 (pixels if ome_zarr else None, image_name), object_type, force, sources)
        measured = _export_csv(store, labels, pixels, csv, force, sources) if csv else None
    return Exported(name, geojson or None, objects, tiff or None, ome_zarr or None, missing, tuple(notes),
                    csv or None, measured)


def _export_csv(store: PredictionStore, labels, pixels, path: str, force: bool, sources: list) -> int:
    """The per-object measurements of the store's labels as CSV (with a bar); the number of rows."""
    from ..core.progress import Progress, relay
    from ..formats.measurements import iter_measure_label_array, write_csv

    table: dict = {}

    def events():
        gen = iter_measure_label_array(labels, image=pixels, probability=store.foreground(), mpp=store.mpp)
        table.update((yield from relay(gen, lambda step: Progress("measure", step[0], step[1]))))

    progress_bar(events(), "measuring objects")
    return write_csv(path, table, force=force, inputs=sources)


def _check_export_space(store: PredictionStore, name: str, tiff: str | None, ome_zarr: str | None,
                        image: bool) -> None:
    """Refuse, before writing, an export its disk cannot hold: lower bounds of a quarter of the
    stored labels' bytes, and for the OME-Zarr's image 0.75 byte per pixel (3 raw; H&E compresses
    about 1.5-3x losslessly)."""
    from ..core.diskspace import check_free_space, tree_bytes

    stored = tree_bytes(store.path / "labels" / name / "0") / 4
    h, w = (int(n) for n in store.labels(name).shape[:2])
    image_need, with_image = (0.75 * h * w, "labels and image") if image else (0.0, "labels")
    for out, need, what in ((tiff, stored, "labels"), (ome_zarr, stored + image_need, with_image)):
        if out:
            check_free_space(out, need, f"the export of {h}x{w} {name} {what}")


def _export_image(store: PredictionStore, slide: str | None, shape: tuple[int, int],
                  stack) -> tuple[object | None, str | None]:
    """The slide's level the prediction ran on (the OME-Zarr's image, the CSV's optical densities;
    open until ``stack`` closes), and why there is none. A ``slide`` given that cannot be read, or
    whose level does not match the prediction, is a DataError; the recorded slide, when it has
    moved, a reason."""
    from ..slide.reader import open_slide

    path = Path(slide) if slide else store.slide_path
    if path is None or (not slide and not path.exists()):
        where = f"the slide {path} is not there" if path else "the store records no slide"
        return None, where
    opened = stack.enter_context(open_slide(path))
    level = store.level
    have = tuple(int(n) for n in opened.levels[level].shape[:2]) if level < len(opened.levels) else None
    if have != shape:
        raise DataError(f"{path}: level {level} is {'missing' if have is None else f'{have[0]}x{have[1]}'}, "
                        f"the prediction is {shape[0]}x{shape[1]}: not the slide it was made from "
                        "(pass the right --slide, or --no-image)")
    return opened.levels[level], None


def _export_labels(store: PredictionStore, name: str, labels, geojson, tiff, ome_zarr, image: tuple,
                   object_type, force: bool, sources: list) -> int | None:
    """Write the GeoJSON, label TIFF and OME-Zarr (with ``image`` = (pixels or None, name)) asked
    for; the number of GeoJSON objects."""
    downsample = store.downsample
    objects = None
    if geojson:
        from ..formats.geojson import export_label_array_chunked

        objects = export_label_array_chunked(
            labels, geojson, chunk=4096, probabilities=store.foreground(), downsample=downsample,
            object_type=object_type or qupath.object_type(name), class_name=qupath.class_name(name),
            color=qupath.colour(name), force=force, inputs=sources, mpp=store.slide_mpp)
    if tiff:
        from ..formats.tiff import write_label_tiff

        write_label_tiff(tiff, labels, mpp=store.mpp, force=force, inputs=sources)
    if ome_zarr:
        from ..formats.ome_zarr import write_ome_zarr_labels

        write_ome_zarr_labels(ome_zarr, labels, name=name, image=image[0], image_name=image[1],
                              downsample=downsample, mpp=store.slide_mpp, force=force, inputs=sources)
    return objects


def predict_cli(a: argparse.Namespace) -> int:
    from ..bundled import resolve_model
    from ..core.inference import TorchPredictor
    from ..slide.reader import open_slide
    from ..slide.tiler import predict_slide

    out = Path(a.out)
    many = len(a.input) > 1
    force = bool(getattr(a, "force", False))
    cluster = bool(getattr(a, "workers", None) or getattr(a, "scheduler", None))
    targets = {inp: out / f"{Path(inp).stem}.zarr" if many else out for inp in a.input}
    if len(set(targets.values())) < len(targets):
        raise DataError("two inputs have the same file name (their outputs would be the same "
                        f"{out}/<name>.zarr); rename one or predict them into different --out folders")
    model = resolve_model(a.model)
    for inp, target in targets.items():  # every output checked before any work starts
        check_exports(geojson=_per_input(a.geojson, inp, many), overlay=_per_input(a.overlay, inp, many),
                      force=force, inputs=[*a.input, target, model])
    from ..core.atomic import refuse_inputs

    for inp, target in targets.items():  # a store never lands in (or holds) the model or an input
        refuse_inputs(target, [model, *a.input])
    # on a cluster the workers run the model; here it only tells the store's settings
    precision = getattr(a, "precision", "auto")
    predictor = TorchPredictor.from_checkpoint(model, device="cpu" if cluster else a.device, batch_size=a.batch,
                                               tta=getattr(a, "tta", 1), precision=precision)
    if not cluster:  # which device and arithmetic run the model, and why (workers say their own)
        print(f"model: {predictor.device.type}, {predictor.precision.why}")
    stain = bool(getattr(a, "stain_normalize", False))
    if stain:  # a model that records no training stain is refused before any work
        from ..core.stain import model_targets

        model_targets(predictor.config, f"{model}/config.json")
    task = predictor.task
    post = task if task in ("glands", "nuclei") else None
    level = a.level if a.level == "auto" else int(a.level)
    overlap, note = predictor.overlap_for(a.tile, a.overlap)
    if note:
        print(note)
    kwargs = dict(level=level, tile=a.tile, overlap=overlap, batch=a.batch, tissue=not a.no_tissue,
                  class_names=predictor.class_names, postprocess=post,
                  postprocess_options=predictor.postprocess_options if post else None,
                  metadata={"model": str(a.model), "task": task})
    if cluster:
        _predict_on_cluster(a, predictor, Path(model), targets, kwargs)
    for inp, target in targets.items():
        if not cluster:
            with open_slide(inp) as slide:
                note = _resolution(slide, getattr(a, "mpp", None), predictor, level)
                if note:
                    print(note)
                norm = _stain(slide, predictor, level) if stain else None
                progress_bar(predict_slide(predictor, slide, target, **kwargs, stain=norm), Path(inp).name,
                             units=PREDICT_UNITS)
            print(f"{inp} -> {target}")
        if post == "glands":  # kept as asked for, with one line when it does not look like glands
            from ..slide.glands_check import no_glands_line

            line = no_glands_line(target, inp)
            if line:
                print(line)
        if a.geojson or a.overlay:
            store = PredictionStore.open(target)
            if a.geojson:
                gj = _per_input(a.geojson, inp, many)
                n = export_store(store, geojson=gj, object_type=a.object_type, force=force,
                                 inputs=a.input).objects
                print(f"  {n} objects -> {gj}")
            if a.overlay:
                ov = _per_input(a.overlay, inp, many)
                check_exports(overlay=ov, force=force, inputs=[*a.input, target])
                write_overlay(inp, store, Path(ov))
                print(f"  overlay -> {ov}")
    return 0


def _stain(slide, predictor, level) -> dict:
    """The stain normalisation of ``slide`` for ``predictor`` (core/stain.py), said in one line."""
    from ..slide.stain import slide_normalizer

    norm = slide_normalizer(slide, predictor, level)
    s, t = norm.source, norm.target
    print(f"stain: normalised to the model's {norm.target_name!r} stain (tissue Lab mean {s.mean[0]:.0f}/{s.mean[1]:.0f}/"
          f"{s.mean[2]:.0f} -> {t.mean[0]:.0f}/{t.mean[1]:.0f}/{t.mean[2]:.0f})")
    return norm.to_dict()


def _predict_on_cluster(a: argparse.Namespace, predictor, model: Path, targets: dict, kwargs: dict) -> None:
    """``--workers N`` / ``--scheduler ADDRESS``: the blocks of all inputs as one task graph on a
    Dask cluster (:mod:`..slide.distributed`), then the summary table. Every store is created (or
    reopened to resume) before the cluster starts, so a refusal comes first; a scheduler is asked
    who it is before that, so one that is not there leaves no empty store behind."""
    from ..slide.distributed import ManySlides, ModelSpec, check_scheduler, connect, plan_job, summary_table
    from ..slide.reader import open_slide
    from ..slide.tiler import SlideSettings

    opts = kwargs.pop("postprocess_options")
    names = kwargs.pop("class_names")
    settings = SlideSettings(**kwargs, class_names=tuple(names), postprocess_options=dict(opts or {}))
    if a.scheduler:
        check_scheduler(a.scheduler)
    jobs = []
    for i, (inp, target) in enumerate(targets.items()):
        with open_slide(inp) as slide:
            note = _resolution(slide, getattr(a, "mpp", None), predictor, kwargs["level"])
            if note:
                print(note)
            norm = _stain(slide, predictor, kwargs["level"]) if getattr(a, "stain_normalize", False) else None
            jobs.append(plan_job(predictor, slide, target, replace(settings, stain=norm), i, Path(inp).name))
    spec = ModelSpec(str(model.resolve()), a.device, a.batch, getattr(a, "tta", 1), getattr(a, "precision", "auto"))
    with connect(a.workers, a.scheduler) as client:
        print(f"dask: {len(client.nthreads())} workers at {client.scheduler.address}"
              + (f", dashboard {client.dashboard_link}" if client.dashboard_link else ""))
        print(f"model: precision {spec.precision}" + (" (each worker takes bf16 where its processor computes it "
                                                       "natively, fp32 elsewhere)" if spec.precision == "auto" else ""))
        run = ManySlides(client, spec, jobs, kwargs["postprocess"], None, dict(opts or {}))
        progress_bar(run.events(), f"{len(jobs)} slide{'s' * (len(jobs) > 1)}", units={"predict": "block"})
    print(summary_table(run.summary))


def _resolution(slide, mpp: float | None, predictor, level) -> str | None:
    """Apply ``--mpp`` to a slide whose file states no pixel size, and the one line the user should
    read about the resolution the model will run at (None when it simply matches)."""
    from ..core.resolution import TOLERANCE, resolution_note

    from ..slide.tiler import resolve_level

    name = slide.path.name
    if level != "auto":
        resolve_level(slide, level, predictor)  # a level the slide lacks: one line, before anything else
    if slide.mpp is None and mpp is not None:
        slide.mpp = mpp
    elif slide.mpp is not None and mpp is not None and abs(slide.mpp - mpp) > TOLERANCE * slide.mpp:
        return (f"{name}: the file says {slide.mpp:.3g} um/px; using it, not --mpp {mpp:.3g} "
                "(a file's own pixel size wins over the flag)")
    if slide.mpp is None or predictor.mpp is None:
        return resolution_note(slide.mpp, predictor.mpp, name)
    lv = slide.level_for_mpp(predictor.mpp) if level == "auto" else int(level)
    have = slide.level_mpp(lv)
    if abs(have - predictor.mpp) > TOLERANCE * predictor.mpp:
        return (f"{name}: the model learned {predictor.mpp:.3g} um/px; level {lv} ({have:.3g} um/px) is resampled "
                f"x{have / predictor.mpp:.3g} to it")
    return None


def _per_input(path: str | None, inp: str, many: bool) -> str | None:
    """An export path given once for several inputs: one file per input (``<stem>_<name>``)."""
    if not path or not many:
        return path
    p = Path(path)
    return str(p.with_name(f"{Path(inp).stem}_{p.name}"))


def write_overlay(image_path: str | Path, store: PredictionStore, path: Path, max_pixels: int = 64_000_000) -> None:
    """Object outlines over the full-resolution image, for images small enough to hold in memory."""
    from ..core.atomic import write_png_atomic
    from ..formats.overlay import overlay
    from ..slide.reader import open_slide

    with open_slide(image_path) as slide:
        img = slide.levels[0]
        if img.shape[0] * img.shape[1] > max_pixels:
            raise DataError(f"{image_path}: too large for an overlay PNG; view it in napari instead")
        image = np.asarray(img)
    labels = {n: store.labels_at_level0(n, image.shape[:2]) for n in store.label_names()}
    write_png_atomic(path, overlay(image, labels))


def export_cli(a: argparse.Namespace) -> int:
    csv = getattr(a, "csv", None)
    if not (a.geojson or a.tiff or a.ome_zarr or csv):
        print("genselfdiff export: nothing to do: give --geojson, --tiff, --ome-zarr and/or --csv", file=sys.stderr)
        return 2
    written = export_store(PredictionStore.open(a.labels), name=a.name, geojson=a.geojson, tiff=a.tiff,
                           ome_zarr=a.ome_zarr, object_type=a.object_type, force=bool(getattr(a, "force", False)),
                           partial=bool(getattr(a, "partial", False)), slide=getattr(a, "slide", None),
                           image=not getattr(a, "no_image", False), csv=csv)
    if written.missing:
        print(f"partial export of an unfinished prediction ({written.missing}); what is missing is "
              "background in the exports: rerun predict to finish it", file=sys.stderr)
    if written.geojson:
        print(f"geojson: {written.objects} objects -> {written.geojson}")
    if written.tiff:
        print(f"tiff: {written.tiff}")
    if written.ome_zarr:
        print(f"ome_zarr: {written.ome_zarr}")
    if written.csv:
        print(f"csv: {written.measured} objects measured -> {written.csv}")
    for note in written.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
