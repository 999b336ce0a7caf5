"""Many slides on a Dask cluster (``dask.distributed``): the tiler's work as one task graph.

The graph, over all slides of a run::

    tissue(slide) --> block(slide, b) for every unfinished output block b --> labels(slide)

* ``tissue`` detects the slide's tissue (:func:`~.tissue.detect_tissue`), once per slide;
* ``block`` is :func:`~.tiler.predict_block`, the pure "one output block of one slide" function
  of the tiler, wrapped to open the slide lazily on the worker, run the worker's cached
  predictor (loaded once per worker process, on that worker's GPU when it has several) and write
  the block's probabilities into the slide's :class:`~.store.PredictionStore`;
* ``labels`` is :func:`~.instances.label_store` on the finished probabilities (objects stitched
  across blocks, exactly as :func:`~.tiler.predict_slide` does).

So the cluster balances blocks, not whole slides. The stores are the tiler's (made by
:func:`~.tiler.plan_slide`, same layout and settings), so a run started in-process resumes on a
cluster and back. Safety: a block's chunks belong to that block alone and zarr writes each chunk
file atomically (temp + rename), so a chunk is never half-written; only this process (the
client) writes the ``done`` array, and only after a block's task returned, i.e. after its data
is on disk. A killed run resumes from its done blocks; a lost worker's tasks run again
elsewhere (the scheduler's rule), a failing task up to ``retries`` more times.

``distributed`` is imported only here and only when a cluster is asked for; the in-process
path never needs it. Every path given to a task is absolute: on a cluster of several machines
slides, stores and the model must be on a shared file system.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from napari_genselfdiff.core.errors import DataError, GenSelfDiffError
from napari_genselfdiff.core.progress import Progress, run_to_end
from napari_genselfdiff.slide.grid import TileGrid
from napari_genselfdiff.slide.reader import Slide, open_slide
from napari_genselfdiff.slide.store import PredictionStore
from napari_genselfdiff.slide.tiler import Predictor, SlideSettings, plan_slide, predict_block, split_by_tissue
from napari_genselfdiff.slide.tissue import TissueMask, detect_tissue


@dataclass(frozen=True)
class ModelSpec:
    """What a worker loads: a segmentation checkpoint folder, the device ('auto': the worker's own
    GPU when there is one), tiles per forward pass, test-time augmentation views and the
    precision (auto / fp32 / bf16: 'auto' is resolved on each worker, for its own processor)."""

    path: str
    device: str = "auto"
    batch: int = 4
    tta: int = 1
    precision: str = "auto"


@dataclass(frozen=True)
class SlideJob:
    """One slide's part of the graph: what every task of that slide needs (small, picklable)."""

    index: int
    name: str
    slide: str
    store: str
    level: int
    grid: TileGrid
    blocks: Any  # the tiler's output blocks (h, w, size; region(b))
    tissue: bool
    todo: tuple[tuple[int, int], ...]  # blocks not yet done, raster order
    mpp: float | None  # microns per level-0 pixel (for the tissue area)
    stain: Any = None  # the tiles' stain normalisation (core.stain.StainNormalizer.to_dict()), or None


@dataclass(frozen=True)
class BlockDone:
    """What a block task returns: where, its tiles, its worker seconds."""

    index: int
    block: tuple[int, int]
    tiles: int
    skipped: int
    pixels: int
    seconds: float


@dataclass
class SlideSummary:
    """A row of the summary table."""

    name: str
    store: str
    objects: int | None = None
    tissue_px: int | None = None  # level-0 pixels
    tissue_mm2: float | None = None
    blocks: int = 0
    computed: int = 0  # blocks this run computed (the rest were done before)
    seconds: float = 0.0  # worker seconds spent on this slide in this run
    status: str = "pending"


# --------------------------------------------------------------------------------------------
# worker side: the predictor cache and the tasks (pure functions of their arguments)

_PREDICTORS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def _worker_device(device: str) -> str:
    """'auto' / 'cuda' on a worker of a machine with several GPUs: one GPU per worker (by the
    worker's name, 0..N-1 on a LocalCluster). One GPU, or a worker started with
    CUDA_VISIBLE_DEVICES (dask-cuda), keeps the device as given."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n <= 1:
        return device
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):
        return device
    k = int(name) if name.isdigit() else zlib.crc32(name.encode())
    return f"cuda:{k % n}"


def worker_predictor(model: ModelSpec) -> Predictor:
    """This process's predictor for ``model``: loaded once, reused by every task (and reloaded
    when the weights change), via :func:`~..core.inference.cached_predictor`."""
    from napari_genselfdiff.core.inference import cached_predictor

    from napari_genselfdiff.core.device import threads_from_env

    threads = threads_from_env(os.environ.get("GENSELFDIFF_THREADS"))
    device = _worker_device(model.device)
    key = (model.path, device, model.batch, model.tta, model.precision)
    with _LOCK:
        if threads is not None and not _PREDICTORS:
            import torch

            torch.set_num_threads(threads)
        cache = cached_predictor(model.path, device, _PREDICTORS.get(key), batch_size=model.batch, tta=model.tta,
                                 precision=model.precision)
        _PREDICTORS[key] = cache
        return cache.predictor


def _local_dask() -> contextlib.AbstractContextManager:
    """The dask arrays a task reads (slide levels) are computed in the task itself, never sent
    back to the cluster as tasks of their own (a worker's default would be the cluster, and
    lazy slide arrays hold open files). Set for the whole worker process, not in a context: a
    context would be undone by one thread while another is still inside it."""
    import dask

    if dask.config.get("scheduler", None) != "synchronous":
        dask.config.set(scheduler="synchronous")
    return contextlib.nullcontext()


def tissue_task(job: SlideJob) -> TissueMask | None:
    """The slide's tissue mask (None when the run predicts everything)."""
    if not job.tissue:
        return None
    with _local_dask(), open_slide(job.slide) as slide:
        return detect_tissue(slide)


def block_task(job: SlideJob, model: ModelSpec, b: tuple[int, int], mask: TissueMask | None) -> BlockDone:
    """Predict output block ``b`` of the slide and write it into the slide's store (only whole
    chunks, each atomically); the caller marks it done once this returns."""
    start = time.perf_counter()
    from napari_genselfdiff.core.stain import with_stain

    predictor = with_stain(worker_predictor(model), job.stain)  # a wrapper per task: slides differ
    with _local_dask(), open_slide(job.slide) as slide:
        data = predict_block(predictor, slide, job.level, job.grid, job.blocks, b, tissue=mask, batch=model.batch)
        downsample = slide.downsamples[job.level]
    y0, y1, x0, x1 = job.blocks.region(b)
    PredictionStore.open(job.store, mode="r+").probabilities[:, y0:y1, x0:x1] = data
    todo, skipped = split_by_tissue(job.grid, job.grid.touching(y0, y1, x0, x1), mask, downsample)
    return BlockDone(job.index, tuple(b), len(todo), len(skipped), (y1 - y0) * (x1 - x0),
                     time.perf_counter() - start)


def labels_task(job: SlideJob, kind: str, min_size: int | None, options: Mapping[str, Any]) -> tuple[int, float]:
    """Instance labels of a slide whose probabilities are all written: (objects, worker seconds)."""
    from napari_genselfdiff.slide.instances import label_store

    start = time.perf_counter()
    store = PredictionStore.open(job.store, mode="r+")
    with _local_dask():
        stats = run_to_end(label_store(store, kind, min_size=min_size, options=options))
    count = stats.count if stats is not None else _label_count(store, kind)
    return count, time.perf_counter() - start


def _label_count(store: PredictionStore, kind: str) -> int | None:
    labels = store.group["labels"] if "labels" in store.group else None
    return dict(labels[kind].attrs).get("count") if labels is not None and kind in labels else None


# --------------------------------------------------------------------------------------------
# client side


def connect(workers: int | None = None, scheduler: str | None = None, *,
            dashboard_address: str | None = ":8787", timeout: str = "10s") -> contextlib.AbstractContextManager:
    """A ``distributed.Client``: of ``scheduler`` (an existing cluster, ``tcp://HOST:PORT``), or of
    a new LocalCluster of ``workers`` processes on this machine (one thread each; torch gets this
    machine's cores divided among them). Use as a context manager; a scheduler that cannot be
    reached is a DataError naming it."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        # installed but not importable is the registry's mismatched pair (an old distributed
        # beside a new dask): say so rather than asking for what is already there
        import importlib.metadata as md
        try:
            have = f"distributed {md.version('distributed')} is installed but does not import ({e})"
        except md.PackageNotFoundError:
            have = "distributed is not installed"
        raise GenSelfDiffError(f"--workers / --scheduler need dask.distributed: {have}; "
                               "install dask and distributed together: pip install \"dask[distributed]\"") from None
    stack = contextlib.ExitStack()
    if scheduler:
        check_scheduler(scheduler)  # before a Client exists: a failed one hangs 20 s and prints a traceback
        try:
            client = Client(scheduler, timeout=timeout, set_as_default=False)
        except (OSError, ValueError, TypeError) as e:
            raise DataError(f"--scheduler {scheduler}: cannot connect ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no answer'})") from None
        stack.callback(client.close)
        stack.__enter__()
        return _Entered(stack, client)
    if workers is None or workers < 1:
        raise GenSelfDiffError(f"--workers must be >= 1, got {workers}")
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=dashboard_address,
                           env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                                "GENSELFDIFF_THREADS": threads})
    stack.callback(cluster.close)
    client = Client(cluster, set_as_default=False)
    stack.callback(client.close)
    return _Entered(stack, client)


def check_scheduler(address: str, timeout_s: float = 10.0) -> None:
    """Ask ``address`` who it is over distributed's own protocol, without a Client: a DataError in
    one line unless a Dask scheduler answers (nothing listening, another kind of server, a tls://
    address without TLS settings, no answer within ``timeout_s``)."""
    import asyncio

    from distributed.comm import connect as comm_connect

    async def identity():
        comm = await comm_connect(address, timeout=timeout_s)
        try:
            await comm.write({"op": "identity"})
            return await asyncio.wait_for(comm.read(), timeout_s)
        finally:
            comm.abort()

    import logging

    quiet = logging.getLogger("distributed")  # its retry warnings would be lines beside ours
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        reply = asyncio.run(asyncio.wait_for(identity(), 2 * timeout_s + 1))
    except Exception as e:  # noqa: BLE001 -- whatever went wrong on the wire, the answer is "not a scheduler here"
        what = str(e).splitlines()[0] if str(e) else "no answer"
        hint = ("; a tls:// scheduler needs distributed's TLS settings (dask config)" if "TLS" in str(e) else
                "; is a Dask scheduler listening there?" if isinstance(e, TimeoutError) else "")
        raise DataError(f"--scheduler {address}: cannot connect to a Dask scheduler ({type(e).__name__}: "
                        f"{what}){hint}") from None
    finally:
        quiet.setLevel(level)
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind != "Scheduler":
        raise DataError(f"--scheduler {address}: something answers there, but not a Dask scheduler "
                        f"(it says it is {kind or 'nothing dask knows'})")


class _Entered(contextlib.AbstractContextManager):
    def __init__(self, stack: contextlib.ExitStack, client: Any) -> None:
        self.stack, self.client = stack, client

    def __enter__(self) -> Any:
        return self.client

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()


def plan_job(predictor: Predictor, slide: Slide, out_path: str | Path, settings: SlideSettings,
             index: int = 0, name: str | None = None) -> SlideJob:
    """Create (or reopen, to resume) the slide's store, as the tiler does, and the slide's part of
    the graph: its blocks not yet done. ``slide`` is opened by the caller (its ``mpp`` may come
    from a flag); the tasks open it again by path."""
    out_path = Path(out_path).absolute()
    # the tissue is detected here too (a thumbnail: about a second), only for the disk check
    plan = plan_slide(predictor, slide, out_path, settings, detect_tissue(slide) if settings.tissue else None)
    done = np.asarray(plan.store.done[...]).astype(bool)
    todo = tuple((int(r), int(c)) for r in range(done.shape[0]) for c in range(done.shape[1]) if not done[r, c])
    return SlideJob(index, name or Path(slide.path).name, str(Path(slide.path).resolve()), str(out_path),
                    plan.level, plan.grid, plan.blocks, bool(settings.tissue), todo, slide.mpp,
                    dict(settings.stain) if settings.stain else None)


@dataclass
class ManySlides:
    """One run over the ``jobs`` on ``client``; iterate :meth:`events` to drive it (a generator of
    :class:`~..core.progress.Progress`: stage 'predict', ``step`` of ``total`` counting blocks
    over all slides, a message as each slide finishes, one ``done`` event at the end).
    ``summary`` holds a row per slide, filled as they finish. Closing the generator (Ctrl-C)
    cancels what is still queued; what is done stays done."""

    client: Any
    model: ModelSpec
    jobs: Sequence[SlideJob]
    postprocess: str | None = None
    min_size: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    retries: int = 2
    summary: list[SlideSummary] = field(default_factory=list)

    def events(self) -> Iterator[Progress]:
        from distributed import as_completed

        start = time.perf_counter()
        self._stores = {j.index: PredictionStore.open(j.store, mode="r+") for j in self.jobs}
        self._rows = {j.index: SlideSummary(j.name, j.store, blocks=int(j.blocks.ny * j.blocks.nx))
                      for j in self.jobs}
        self.summary[:] = list(self._rows.values())
        left = {j.index: len(j.todo) for j in self.jobs}
        total = sum(r.blocks for r in self.summary)
        done, pixels = total - sum(left.values()), 0
        self._futures, self._kinds, self._ac = [], {}, as_completed(loop=self.client.loop)
        try:
            for job in self.jobs:  # earlier slides first, so that their labels can start early
                mask = self._submit("tissue", job, tissue_task, priority=10 - job.index)
                for b in job.todo:
                    self._submit("block", job, block_task, self.model, b, mask, priority=-job.index)
            messages = [self._probabilities_done(job) for job in self.jobs if not job.todo]
            yield self._event(done, total, start, pixels, "; ".join(messages))
            for fut in self._ac:
                kind, job = self._kinds.pop(fut.key)
                value, row, store = self._result(fut, kind, job), self._rows[job.index], self._stores[job.index]
                message = ""
                if kind == "tissue":
                    self._record_tissue(job, store, value, row)
                    continue
                if kind == "labels":
                    row.objects, seconds = value
                    row.seconds += seconds
                    store.set_status(status="complete")
                    row.status = "complete"
                    message = f"{job.name}: {row.objects} {self.postprocess} -> {job.store}"
                else:
                    store.done[value.block] = 1  # its data is on disk: only now is it done
                    done, pixels = done + 1, pixels + value.pixels
                    row.computed += 1
                    row.seconds += value.seconds
                    left[job.index] -= 1
                    if left[job.index] == 0:
                        message = self._probabilities_done(job)
                yield self._event(done, total, start, pixels, message)
            yield Progress("predict", total, total, eta_s=0.0, done=True, blocks_done=done, blocks_total=total,
                           megapixels_per_s=pixels / 1e6 / max(time.perf_counter() - start, 1e-9))
        finally:
            self.client.cancel([f for f in self._futures if not f.done()])

    def _submit(self, kind: str, job: SlideJob, fn, *args: Any, priority: int = 0) -> Any:
        fut = self.client.submit(fn, job, *args, pure=False, retries=self.retries, priority=priority,
                                 key=f"genselfdiff-{kind}-{job.index}-{os.urandom(6).hex()}")
        self._kinds[fut.key] = (kind, job)
        self._futures.append(fut)
        self._ac.add(fut)
        return fut

    def _probabilities_done(self, job: SlideJob) -> str:
        """All blocks of ``job`` are written: label it (a task), or it is complete."""
        self._stores[job.index].set_status(status="probabilities_done")
        if self.postprocess is None:
            self._stores[job.index].set_status(status="complete")
            self._rows[job.index].status = "complete"
            return f"{job.name}: probabilities -> {job.store}"
        self._submit("labels", job, labels_task, self.postprocess, self.min_size, dict(self.options), priority=100)
        return f"{job.name}: all blocks predicted, labelling {self.postprocess}"

    @staticmethod
    def _record_tissue(job: SlideJob, store: PredictionStore, mask: TissueMask | None, row: SlideSummary) -> None:
        """Keep the mask in the store (as the tiler does) and the tissue area in the summary (the
        whole level when the run predicts everything), in level-0 pixels and mm2 when known."""
        if mask is None:
            row.tissue_px = int(round(job.grid.height * job.grid.width * store.downsample ** 2))
        else:
            store.write_tissue(mask.mask, mask.downsample)
            row.tissue_px = int(round(int(mask.mask.sum()) * mask.downsample ** 2))
        if job.mpp:
            row.tissue_mm2 = row.tissue_px * job.mpp ** 2 / 1e6

    @staticmethod
    def _result(fut: Any, kind: str, job: SlideJob) -> Any:
        try:
            return fut.result()
        except Exception as e:
            if type(e).__name__ == "KilledWorker":
                raise GenSelfDiffError(f"{job.slide}: a {kind} task took its worker down again and again "
                                       f"(out of memory?); finished blocks are kept in {job.store}") from None
            raise

    @staticmethod
    def _event(done: int, total: int, start: float, pixels: int, message: str = "") -> Progress:
        rate = pixels / 1e6 / max(time.perf_counter() - start, 1e-9)
        return Progress("predict", done, total, eta_s=None, message=message, blocks_done=done,
                        blocks_total=total, megapixels_per_s=rate)


def summary_table(rows: Sequence[SlideSummary]) -> str:
    """The summary table, one line per slide: slide, objects, tissue area, blocks computed, worker
    seconds."""
    head = ("slide", "objects", "tissue", "blocks", "worker s")
    body = []
    for r in rows:
        area = (f"{r.tissue_mm2:.2f} mm2" if r.tissue_mm2 is not None
                else f"{r.tissue_px / 1e6:.1f} Mpx" if r.tissue_px is not None else "-")
        body.append((r.name, "-" if r.objects is None else str(r.objects), area,
                     f"{r.computed}/{r.blocks}", f"{r.seconds:.1f}"))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(head), *map(fmt, body)])
