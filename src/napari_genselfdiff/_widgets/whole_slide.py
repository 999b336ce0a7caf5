"""The Predict widget's whole-slide job, and where it runs.

"This process" is the tiler (:func:`~napari_genselfdiff.slide.tiler.predict_slide`): it shares
the tiles neighbouring output blocks need, so on one machine it is the fastest. "Local Dask
cluster" and "Dask cluster at" run the very block graph of ``genselfdiff predict --workers N |
--scheduler ADDRESS`` (:mod:`napari_genselfdiff.slide.distributed`): a block per task, the model
loaded once per worker, on that worker's GPU when it has one. Both write the same zarr store, so a
run stopped in one place resumes in the other, and the result is shown the same way. A cluster
reads the slide from its file (workers cannot see napari's memory), so it needs an image layer
opened from a file; on a cluster of several machines that file and the output folder must be on
a shared file system.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLineEdit, QWidget

from ..core.errors import DataError, GenSelfDiffError
from ..core.inference import PredictorCache, cached_predictor
from ..core.progress import Progress, relay
from .inputs import int_spin

#: What the "Run on" chooser offers, in order.
RUN_ON = ("this process", "local Dask cluster", "Dask cluster at")


@dataclass(frozen=True)
class RunOn:
    """Where a whole-slide prediction runs: ``where`` one of :data:`RUN_ON`; ``workers`` the
    processes of a local cluster; ``scheduler`` an existing cluster's address."""

    where: str = RUN_ON[0]
    workers: int = 2
    scheduler: str = ""

    def __post_init__(self) -> None:
        if self.where not in RUN_ON:
            raise GenSelfDiffError(f"run on must be one of {RUN_ON}, not {self.where!r}")
        if self.where == RUN_ON[2] and not self.scheduler.strip():
            raise DataError("give the Dask scheduler's address, e.g. tcp://host:8786")
        if self.where == RUN_ON[1] and self.workers < 1:
            raise DataError(f"a local cluster needs at least 1 worker, not {self.workers}")

    def check(self, slide) -> None:
        """A cluster reads the slide from its file: DataError when the layer has none."""
        if self.where != RUN_ON[0] and not Path(slide.path).exists():
            raise DataError(f"{slide.path}: this layer has no file, and a Dask cluster reads the slide from its "
                            "file; open the image from a file, or run in this process")


@dataclass
class SlideResult:
    """What :func:`slide_job` returns: the finished store and the name of its labels."""

    predictor: PredictorCache
    out: str
    kind: str | None  # the label set ("glands" / "nuclei"), None for other models
    no_glands: str | None = None  # why a glands result does not look like glands (then no labels layer)
    model_values: dict = dataclasses.field(default_factory=dict)  # the model's own post-processing options
    values: dict = dataclasses.field(default_factory=dict)  # those the slide's objects were found with
    mpp: float | None = None  # microns per pixel of the level the model ran on


def result_name(predictor) -> str:
    """The layer name for a model's objects: the task ("glands", "nuclei") or its first class."""
    return predictor.task if predictor.task in ("glands", "nuclei") else predictor.class_names[1]


def load_predictor(model: str, device: str, cache: PredictorCache | None, tile: int, overlap: int,
                   precision: str = "auto"):
    """Load (or reuse) the predictor; the overlap to use (-1: the model's default for ``tile``).
    Yields status lines (which device and precision run it, and why); returns (cache, overlap)."""
    yield "loading the model…"
    loaded = cache
    cache = cached_predictor(model, device, cache, precision=precision)
    how = getattr(cache.predictor, "precision", None)  # any tiler Predictor may stand in; ours say how they run
    if cache is not loaded and how is not None:  # a model loaded just now: say how it runs
        yield f"the model runs on {cache.predictor.device.type}, in {how.why}"
    if overlap < 0:  # only then is the model asked (any tiler Predictor may come with an overlap of the user's)
        overlap, note = cache.predictor.overlap_for(tile)
        if note:
            yield note
    return cache, overlap


def stain_normalizer(predictor, slide):
    """The normaliser of ``slide``'s stain (at the level the model reads) to the model's training
    stain (core/stain.py); yields status lines, returns the :class:`~..core.stain.StainNormalizer`."""
    from ..slide.stain import slide_normalizer

    yield "measuring the image's stain…"
    norm = slide_normalizer(slide, predictor)
    yield f"stain normalised to the model's {norm.target_name!r}"
    return norm


def slide_job(model: str, device: str, cache: PredictorCache | None, slide, out: str, tile: int, overlap: int,
              batch: int, run_on: RunOn = RunOn(), precision: str = "auto", stain: bool = False) -> Iterator[Any]:
    """Predict the whole slide into the zarr store ``out`` (resumes a run with the same settings),
    at the pyramid level closest to the model's training resolution when both are known, here or
    on a Dask cluster (``run_on``); returns a :class:`SlideResult`. ``stain``: the tiles' stain
    normalised to the model's training stain (core/stain.py), as the store records."""
    from ..slide.tiler import SlideSettings, predict_slide

    cache, overlap = yield from load_predictor(model, device, cache, tile, overlap, precision)
    predictor = cache.predictor
    kind = result_name(predictor) if predictor.task in ("glands", "nuclei") else None
    options = dict(getattr(predictor, "postprocess_options", None) or {})
    norm = (yield from stain_normalizer(predictor, slide)).to_dict() if stain else None
    settings = SlideSettings(level="auto", tile=tile, overlap=overlap, batch=batch, tissue=True,
                             class_names=tuple(predictor.class_names), postprocess=kind, postprocess_options=options,
                             stain=norm)
    if run_on.where == RUN_ON[0]:
        yield from predict_slide(predictor, slide, out, **{f.name: getattr(settings, f.name)
                                                           for f in dataclasses.fields(settings)})
    else:
        yield from on_cluster(model, device, predictor, slide, out, settings, run_on, precision)
    no_glands = None
    if kind == "glands":
        from ..core.eval.glandular import warn_no_glands
        from ..slide.glands_check import check_store_glands
        from ..slide.store import PredictionStore

        no_glands = warn_no_glands(check_store_glands(PredictionStore.open(out), slide))
    return with_values(SlideResult(cache, out, kind, no_glands))


def with_values(result: SlideResult) -> SlideResult:
    """``result`` with the model's post-processing values and those its store's objects were found
    with (the live Objects controls start at them)."""
    from ..core.eval.postprocess import options_for
    from ..slide.store import PredictionStore

    if result.kind is None:
        return result
    model = options_for(result.kind, getattr(result.predictor.predictor, "postprocess_options", None))
    store = PredictionStore.open(result.out)
    found = store.label_options(result.kind) if result.kind in store.label_names() else {}
    return dataclasses.replace(result, model_values=model, values={**model, **found}, mpp=store.mpp)


def relabel_job(cache: PredictorCache, out: str, kind: str, options: dict) -> Iterator[Any]:
    """Find the objects of the whole slide in ``out`` again with ``options`` (the Objects controls'
    values) from its stored probabilities (:mod:`..slide.relabel`), block by block; returns a
    :class:`SlideResult`. Cancelled, the slide keeps its objects as they were."""
    import time

    from ..slide.relabel import relabel_store
    from ..slide.store import PredictionStore

    store = PredictionStore.open(out, mode="r+")
    h, w = store.probabilities.shape[1:]
    start = time.perf_counter()

    def event(step: tuple[int, int]) -> Progress:
        done, total = step
        s = max(time.perf_counter() - start, 1e-9)
        return Progress("objects", done, total, eta_s=s / max(done, 1) * (total - done),
                        megapixels_per_s=done / total * h * w / s / 1e6)

    yield f"finding the {kind} of {Path(out).name} again, threshold {options.get('threshold', 0.5):.2f}…"
    yield from relay(relabel_store(store, kind, options), event)
    return with_values(SlideResult(cache, out, kind))


def kept_after_cancel(job, blocks: tuple[int, int]) -> str:
    """What a cancelled job keeps, for the status line: a whole slide keeps whole blocks only (a block
    is stored when all of it is predicted), so the tiles counted so far may all be redone."""
    if job is relabel_job:
        return ": the slide keeps its objects as they were"
    if job is not slide_job:
        return ""
    done, total = blocks
    if not done:
        return (": no block was finished, so nothing is kept (a whole block is stored at once); "
                "'Predict whole slide' again starts over")
    return f": {done} of {total} blocks are kept; 'Predict whole slide' again resumes from them"


def on_cluster(model: str, device: str, predictor, slide, out: str, settings, run_on: RunOn,
               precision: str = "auto") -> Iterator[Any]:
    """The slide's block graph on a Dask cluster; its events are relabelled 'cluster' (they count
    blocks, not tiles). Cancelling cancels the queued blocks; finished ones stay done."""
    from ..slide.distributed import ManySlides, ModelSpec, connect, plan_job

    run_on.check(slide)
    job = plan_job(predictor, slide, out, settings)
    local = run_on.where == RUN_ON[1]
    yield (f"starting a local Dask cluster of {run_on.workers} workers…" if local
           else f"connecting to the Dask scheduler at {run_on.scheduler}…")
    with connect(run_on.workers if local else None, None if local else run_on.scheduler.strip(),
                 dashboard_address=None) as client:
        spec = ModelSpec(str(Path(model).resolve()), device, settings.batch, precision=precision)
        run = ManySlides(client, spec, [job],
                         settings.postprocess, settings.min_size, dict(settings.postprocess_options))
        for ev in run.events():
            yield dataclasses.replace(ev, stage="cluster")
    row = run.summary[0]
    if row.status != "complete":
        raise GenSelfDiffError(f"{slide.path}: the cluster stopped with {row.computed} of {len(job.todo)} blocks done; "
                               "'Predict whole slide' again resumes")


class RunOnChooser(QWidget):
    """'Run on' for the whole slide: this process, a local cluster of N workers, or a cluster at
    an address (the workers or address field shows only when it applies)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.combo = QComboBox()
        self.combo.addItems(list(RUN_ON))
        self.combo.setToolTip("where 'Predict whole slide' runs: here (fastest on one machine), or on a Dask "
                              "cluster, block by block, as `genselfdiff predict --workers / --scheduler`")
        self.workers = int_spin(1, 256, 2, 1, "worker processes of the local cluster (each loads the model once)")
        self.workers.setSuffix(" workers")
        self.scheduler = QLineEdit()
        self.scheduler.setPlaceholderText("tcp://host:8786")
        self.scheduler.setToolTip("the address `dask scheduler` printed; workers need the slide and the output "
                                  "folder on a shared file system")
        for w in (self.combo, self.workers, self.scheduler):
            lay.addWidget(w)
        self.combo.currentTextChanged.connect(self._show)
        self._show(self.combo.currentText())

    def _show(self, where: str) -> None:
        self.workers.setVisible(where == RUN_ON[1])
        self.scheduler.setVisible(where == RUN_ON[2])

    def value(self) -> RunOn:
        """The choice, checked (:class:`RunOn` raises DataError on a missing address)."""
        return RunOn(self.combo.currentText(), self.workers.value(), self.scheduler.text())
