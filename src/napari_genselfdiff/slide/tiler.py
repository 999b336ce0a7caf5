"""Tiled, seamless, memory-bounded inference on whole slides.

The model is any :class:`Predictor` (a callable on uint8 RGB tile batches returning class
probabilities). A slide level is covered by a grid of overlapping tiles (``tile`` pixels,
neighbours overlapping by ``overlap``); each tile's prediction is multiplied by a smooth window
that is 1 in the middle, falls with a cosine ramp across the overlap and is a tiny ``eps`` (never
0) within ``overlap / 4`` of the tile edge; the blend divides by the accumulated weight. A model
whose receptive-field radius is at most ``overlap / 4`` therefore gives the same probabilities
tiled as untiled, up to ``eps``: the only pixels a tile gets wrong (those that see its border
padding) carry weight ``eps`` next to a neighbour's weight 1. Tile edges lying on the image
border see the same padding as an untiled run, so they need no taper.

:func:`predict_slide` walks the level in output blocks (``block`` pixels, a multiple of the tile
stride) in raster order. A tile belongs to the block containing its top-left corner and is
computed exactly once per run; the parts of it that fall into later blocks wait as small
"pending" patches, so memory holds one block plus one strip of block-row width, independent of
the slide's height. Finished blocks go to a :class:`~napari_genselfdiff.slide.store.PredictionStore`
and are marked in its ``done`` array, so an interrupted run resumes where it stopped (only the
few tiles of finished blocks that spill into unfinished ones are recomputed).

Tissue detection lives in :mod:`.tissue`, the store layout in :mod:`.store`, the instance labels
in :mod:`.instances` (made by a second process while the blocks are predicted on large slides,
:mod:`.labeller`), and the lazy viewer-side prediction (same grid, window and blending) in :mod:`.fov`.

Nothing here keeps global state: the functions take everything they need as arguments.
:func:`predict_block` is the pure "one output block of one slide" function: the task that
:mod:`.distributed` spreads over the blocks of many slides on a Dask cluster (it recomputes the
few tiles a block shares with its neighbours, which :func:`predict_slide` computes once).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from napari_genselfdiff.core.diskspace import check_free_space
from napari_genselfdiff.core.errors import DataError, GenSelfDiffError
from napari_genselfdiff.core.progress import Progress, relay
from napari_genselfdiff.core.stain import with_stain
from napari_genselfdiff.slide.batching import BatchSizer
from napari_genselfdiff.slide.labeller import ChildFailed, LabellingAlongside, start_alongside
from napari_genselfdiff.slide.levels import level_for_mpp
from napari_genselfdiff.slide.reader import Slide, open_slide
from napari_genselfdiff.slide.rescale import LevelScale
from napari_genselfdiff.slide.grid import (BlendWindows, Blocks, TileGrid, TileId, add_tile, blend_to_uint8,
                                          block_size_for)
from napari_genselfdiff.slide.store import PredictionStore
from napari_genselfdiff.slide.tissue import TissueMask, clear_background, detect_tissue



@runtime_checkable
class Predictor(Protocol):
    """What the tiler needs from a model.

    ``__call__`` maps a batch of RGB tiles ``(B, H, W, 3)`` uint8 to class probabilities
    ``(B, C, H, W)`` float32 with ``C == num_classes``, or ``C == channels`` when the predictor
    has that attribute (the classes, then maps such as a nucleus distance map, in [0, 1] too);
    class 0 is background (tiles without tissue are given probability 1 for class 0, and 0 in
    every other channel, without calling the model). H and W are
    multiples of ``tile_multiple``. ``mpp`` is the microns per pixel the model was trained at
    (``None`` when unknown), used by ``level='auto'``.
    """

    num_classes: int
    tile_multiple: int
    mpp: float | None

    def __call__(self, tiles: np.ndarray) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# tile computation


def resolve_level(slide: Slide, level: int | str, predictor: Predictor) -> int:
    """``level`` checked against the slide; 'auto' is the level closest to the model's mpp
    (:func:`~napari_genselfdiff.slide.levels.level_for_mpp`)."""
    if level == "auto":
        return level_for_mpp(slide.downsamples, slide.mpp, getattr(predictor, "mpp", None))
    if not isinstance(level, (int, np.integer)) or not 0 <= int(level) < len(slide.levels):
        raise DataError(f"{slide.path.name}: level {level!r} does not exist "
                        f"(levels 0..{len(slide.levels) - 1} or 'auto')")
    return int(level)


def check_tile(predictor: Predictor, tile: int) -> None:
    mult = int(getattr(predictor, "tile_multiple", 1) or 1)
    if tile % mult:
        raise GenSelfDiffError(f"tile size {tile} is not a multiple of {mult}, which the model "
                               "needs (choose e.g. tile={})".format(max(mult, tile // mult * mult)))


def channels_of(predictor: Predictor) -> int:
    """How many channels the predictor returns: its classes, plus any maps after them."""
    return int(getattr(predictor, "channels", predictor.num_classes))


def _call_predictor(predictor: Predictor, tiles: np.ndarray) -> np.ndarray:
    """Run the predictor on a batch and check the shape of what comes back."""
    out = np.asarray(predictor(tiles), dtype=np.float32)
    want = (tiles.shape[0], channels_of(predictor), tiles.shape[1], tiles.shape[2])
    if out.shape != want:
        raise GenSelfDiffError(f"predictor returned shape {out.shape}, expected {want} "
                               "(batch, classes, height, width)")
    return out


def _read_padded(slide: Slide, level: int, grid: TileGrid, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """Pixels [y0, y1) x [x0, x1) of the level; beyond the image, up to its length rounded to the
    grid's multiple, the image reflected at its edge (exactly what an untiled run pads with,
    ``core.inference.predict_padded_batch``), white further out."""
    h, w = grid.height, grid.width
    ry1, rx1 = min(y1, h), min(x1, w)
    pixels = slide.read_region(level, y0, x0, y1 - y0, x1 - x0)
    py = min(y1, -(-h // grid.multiple) * grid.multiple) - ry1
    px = min(x1, -(-w // grid.multiple) * grid.multiple) - rx1
    if (py > 0 or px > 0) and ry1 > y0 and rx1 > x0:
        inner = pixels[:ry1 - y0, :rx1 - x0]
        pad = np.pad(inner, ((0, max(py, 0)), (0, max(px, 0)), (0, 0)), mode="reflect")
        pixels[:pad.shape[0], :pad.shape[1]] = pad
    return pixels


def split_by_tissue(grid: TileGrid, tiles: Sequence[TileId], tissue: TissueMask | None,
                    downsample: float) -> tuple[list[TileId], list[TileId]]:
    """(tiles the model must see, tiles without tissue) of ``tiles``, each in the given order."""
    todo, skipped = [], []
    for tid in tiles:
        ty, tx = grid.origin(tid)
        (todo if tissue is None or tissue.any_in(ty, tx, grid.tile, grid.tile, downsample) else skipped).append(tid)
    return todo, skipped


class _Rows:
    """The pixels of columns [x0, x1) of a level, read in horizontal bands as the tiles (in raster
    order) need them: rows above the current tiles are dropped, each row is read once, and no read
    is larger than the band of the next batch."""

    def __init__(self, slide: Slide, level: int, grid: TileGrid, x0: int, x1: int) -> None:
        self.slide, self.level, self.grid, self.x0, self.x1 = slide, level, grid, x0, x1
        self.top, self.pixels = 0, np.zeros((0, x1 - x0, 3), np.uint8)

    def _read(self, y0: int, y1: int) -> np.ndarray:
        # a band reaching past the image's end starts high enough for its reflection (as
        # _read_padded does for the whole image) to see the same rows
        g = self.grid
        padded = -(-g.height // g.multiple) * g.multiple
        lo = y0 if y1 <= g.height else max(0, min(y0, 2 * g.height - padded - 1))
        return _read_padded(self.slide, self.level, g, lo, self.x0, y1, self.x1)[y0 - lo:]

    def cover(self, y0: int, y1: int) -> tuple[np.ndarray, int]:
        """(pixels, their first row) holding rows [y0, y1)."""
        end = self.top + len(self.pixels)
        if y0 < self.top or y0 >= end:
            self.pixels, self.top = self._read(y0, y1), y0
        else:
            kept = self.pixels[y0 - self.top:]
            self.pixels = np.concatenate([kept, self._read(end, y1)]) if y1 > end else kept
            self.top = y0
        return self.pixels, self.top


def iter_tile_predictions(predictor: Predictor, slide: Slide, level: int, grid: TileGrid,
                          tiles: Sequence[TileId], *, batch: int = 4,
                          tissue: TissueMask | None = None, sizer: BatchSizer | None = None
                          ) -> Iterator[list[tuple[TileId, np.ndarray, bool]]]:
    """Predict ``tiles`` of ``grid`` on ``slide`` level ``level``, one list per predictor call.

    Each item is (tile id, (C, tile, tile) probabilities, computed). Tiles without tissue are
    not given to the model: they come as background (class 0 = 1) with computed=False, in a
    list of their own, first. The others go in raster order, ``batch`` per call, or as many as
    ``sizer`` says (:class:`BatchSizer`); their pixels are read in bands, each row once (the
    columns of the computed tiles' bounding box), just before the call that needs them, so the
    work between two lists is one band read and one call.
    """
    t = grid.tile
    c = channels_of(predictor)
    todo, skipped = split_by_tissue(grid, tiles, tissue, slide.downsamples[level])
    if skipped:
        bg = np.zeros((c, t, t), np.float32)
        bg[0] = 1.0
        yield [(tid, bg, False) for tid in skipped]
    if not todo:
        return
    todo.sort(key=grid.origin)
    xs = [grid.origin(tid)[1] for tid in todo]
    scale = LevelScale.of(slide, level, predictor)  # a level at another um/px: resampled (.rescale)
    reach = scale.reach if scale.needed else (lambda o, n, axis: (o, o + n))
    rows = _Rows(slide, level, grid, max(0, min(reach(x, t, 1)[0] for x in xs)), max(reach(x, t, 1)[1] for x in xs))
    sizer = sizer or BatchSizer(batch, None)
    i = 0
    while i < len(todo):
        chunk = todo[i:i + sizer.size]
        i += len(chunk)
        origins = [grid.origin(tid) for tid in chunk]
        oys = [o[0] for o in origins]
        pixels, top = rows.cover(max(0, min(reach(y, t, 0)[0] for y in oys)), max(reach(y, t, 0)[1] for y in oys))
        start = sizer.clock()
        if scale.needed:
            windows = scale.to_model(pixels, top, rows.x0, origins, t)
            preds = scale.to_level(_call_predictor(predictor, windows), origins, t)
        else:
            preds = _call_predictor(predictor, np.stack([pixels[oy - top:oy - top + t, ox - rows.x0:ox - rows.x0 + t]
                                                         for oy, ox in origins]))
        sizer.record(len(chunk), sizer.clock() - start)
        yield [(tid, preds[k], True) for k, tid in enumerate(chunk)]


# --------------------------------------------------------------------------------------------
# whole-slide prediction into a prediction store


#: Tile size of a whole-slide prediction unless asked otherwise: 768 px, one tile per forward pass
#: on a CPU. With the models' 176-184 px overlap a 512-px tile computes 2.4x the slide's pixels and
#: a 768-px one 1.7x; with the tuned allocator (core/device.tune_allocator) the larger tile runs as
#: fast per pixel, so the 4096^2 nuclei slide takes 38 s instead of 51 s at a peak RSS of 1.3 GB
#: (1024-px tiles: 39 s, 1.7 GB; benchmarks/RESULTS.md, session 9).
DEFAULT_TILE = 768


@dataclass(frozen=True)
class SlideSettings:
    """What :func:`predict_slide` is asked to do (its keyword arguments, checked)."""

    level: int | str = 0
    tile: int = DEFAULT_TILE
    overlap: int = 64
    batch: int = 4
    tissue: bool = True
    class_names: tuple[str, ...] | None = None
    postprocess: str | None = None
    min_size: int | None = None
    progress_every: int = 1
    block: int = 2048
    postprocess_options: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    label_alongside: bool | None = None  # None: on slides of labeller.MIN_PIXELS and more
    stain: Mapping[str, Any] | None = None  # core.stain.StainNormalizer.to_dict(): tiles normalised first

    def __post_init__(self) -> None:
        if self.postprocess not in (None, "glands", "nuclei"):
            raise GenSelfDiffError(f"postprocess must be 'glands', 'nuclei' or None, not {self.postprocess!r}")
        if self.batch < 1 or self.progress_every < 1:
            raise GenSelfDiffError("batch and progress_every must be >= 1")


@dataclass
class _Run:
    """One predict_slide run: what it works on, and its counters (for progress events)."""

    predictor: Predictor
    slide: Slide
    level: int
    grid: TileGrid
    blocks: Blocks
    store: PredictionStore
    mask: TissueMask | None
    settings: SlideSettings
    out: str
    start: float = field(default_factory=time.perf_counter)
    computed: int = 0
    skipped: int = 0
    area_done: int = 0  # level pixels (tile cells, TileGrid.cell_area) predicted or skipped in this run
    work_left: int = 0  # tiles with tissue this run still has to give the model
    tiles_start: float = 0.0  # when the first tile was asked for

    def event(self, phase: str, done: int, total: int, blocks_done: int) -> Progress:
        """A progress event; during 'predict' the ETA is the tiles left to compute at this run's
        time per computed tile (so it is known from the first batch on), unknown while
        postprocessing."""
        now = time.perf_counter()
        rate = self.area_done / max(now - self.start, 1e-9)
        eta: float | None = None
        if phase == "done" or (phase == "predict" and self.work_left == 0):
            eta = 0.0
        elif phase == "predict" and self.computed:
            eta = (now - self.tiles_start) / self.computed * self.work_left
        return Progress(phase, done, total, eta_s=eta, done=phase == "done", blocks_done=blocks_done,
                        blocks_total=self.blocks.ny * self.blocks.nx, tiles_computed=self.computed,
                        tiles_skipped=self.skipped, megapixels_per_s=rate / 1e6, out_path=self.out)


def predict_slide(predictor: Predictor, slide_or_path: Slide | str | Path, out_path: str | Path,
                  *, level: int | str = 0, tile: int = DEFAULT_TILE, overlap: int = 64, batch: int = 4,
                  tissue: bool = True, class_names: Sequence[str] | None = None,
                  postprocess: str | None = None, min_size: int | None = None,
                  progress_every: int = 1, block: int = 2048,
                  postprocess_options: dict[str, Any] | None = None,
                  metadata: dict[str, Any] | None = None,
                  overwrite: bool = False, label_alongside: bool | None = None,
                  stain: Mapping[str, Any] | None = None) -> Iterator[Progress]:
    """Predict a whole slide level into a prediction store at ``out_path``; a generator of
    :class:`~napari_genselfdiff.core.progress.Progress` events (stages 'predict', then
    'postprocess', then one 'done'; ``step``/``total`` count tiles, then block passes).

    Drive it with ``for event in predict_slide(...)``; cancel by ``gen.close()``: the store
    stays consistent (only whole blocks are ever marked done) and calling again with the same
    arguments resumes. A store made with other settings raises DataError unless
    ``overwrite=True``.

    ``level`` is a pyramid level or 'auto' (the level closest to ``predictor.mpp``).
    ``tissue`` skips tiles without tissue (they get background probability).
    ``postprocess`` = 'glands' or 'nuclei' labels instances from class 1 (and class 2 as the
    nucleus boundary when the model has 3 classes), see :mod:`.instances`; ``min_size`` and
    ``postprocess_options`` (threshold, fill_holes, min_distance, halo) are passed on.
    ``batch`` is the most tiles per model call: fewer while one call would take longer than half
    a second (:class:`BatchSizer`), so a cancel waits at most about that long on any device.
    An event is yielded after every ``progress_every`` predictor calls (from the first one on,
    with the ETA and rate) and after each block. The store layout is described in :mod:`.store`.
    ``label_alongside``: label instances in a second process while the blocks are predicted
    (:mod:`.labeller`; the same labels); None: on slides of ``labeller.MIN_PIXELS`` and more
    (``labeller.by_default``). ``stain``: the tiles' stain normalisation (``slide.stain.slide_normalizer``),
    recorded in the store's settings.
    """
    settings = SlideSettings(level=level, tile=tile, overlap=overlap, batch=batch, tissue=tissue,
                             class_names=None if class_names is None else tuple(class_names),
                             postprocess=postprocess, min_size=min_size, progress_every=progress_every,
                             block=block, postprocess_options=dict(postprocess_options or {}),
                             metadata=dict(metadata or {}), overwrite=overwrite, label_alongside=label_alongside,
                             stain=stain)
    own = not isinstance(slide_or_path, Slide)
    slide = open_slide(slide_or_path) if own else slide_or_path
    try:
        yield from _predict_slide(predictor, slide, Path(out_path), settings)
    finally:
        if own:
            slide.close()


@dataclass(frozen=True)
class SlidePlan:
    """What a slide prediction works on: the level, its tile grid and output blocks, and the
    (created or resumed) store. :func:`plan_slide` makes it; :func:`predict_slide` and the
    cluster driver (:mod:`.distributed`) share it, so both write and resume the same stores."""

    level: int
    grid: TileGrid
    blocks: Blocks
    store: PredictionStore


# the stored probabilities of tissue, compressed, in bytes per pixel and channel: a lower bound
# (measured 0.28-0.44 for nuclei, 0.84 for glands on real slides; background compresses to ~0)
MIN_STORED_BYTES_PER_PX = 0.1


def plan_slide(predictor: Predictor, slide: Slide, out_path: Path, cfg: SlideSettings,
               tissue: TissueMask | None = None) -> SlidePlan:
    """The level, grid and blocks of ``slide`` under ``cfg``, and its store at ``out_path``
    (created, or reopened to resume when its settings match). A store whose blocks left to do
    cannot fit on the disk (:data:`MIN_STORED_BYTES_PER_PX` per pixel of ``tissue``, the whole
    level without it) is a DataError before anything is written."""
    lvl = resolve_level(slide, cfg.level, predictor)
    check_tile(predictor, cfg.tile)
    h, w = (int(s) for s in slide.levels[lvl].shape[:2])
    scale = LevelScale.of(slide, lvl, predictor)  # tile and overlap are in model pixels
    grid = TileGrid.make(h, w, scale.level_length(cfg.tile), scale.level_length(cfg.overlap), scale.multiple)
    blocks = Blocks(h, w, block_size_for(grid.tile, grid.overlap, cfg.block))
    nc = int(predictor.num_classes)
    names = list(cfg.class_names) if cfg.class_names is not None else (
        ["background"] + [f"class_{i}" for i in range(1, nc)])
    if len(names) != nc:
        raise GenSelfDiffError(f"{len(names)} class names given for a model with {nc} classes")
    channels = channels_of(predictor)
    settings = {"slide": str(Path(slide.path).resolve()), "level": lvl, "shape": [h, w],
                "tile": cfg.tile, "overlap": cfg.overlap, "block": blocks.size, "num_classes": nc,
                "tissue": bool(cfg.tissue)}
    if scale.needed:  # model pixels per level pixel: the labels' options are scaled by it (instances.label_store)
        settings["resample"] = round(scale.factor, 6)
    if cfg.stain:  # the tiles are stain-normalised: a resumed run must normalise alike
        settings["stain"] = dict(cfg.stain)
    if channels != nc:  # maps after the classes (a nucleus distance map): their names
        settings["maps"] = list(getattr(predictor, "channel_names", []))[nc:] or [f"map_{i}" for i in range(channels - nc)]
    info = {"downsample": slide.downsamples[lvl], "mpp": slide.level_mpp(lvl),
            "slide_mpp": slide.mpp, "class_names": names, "metadata": dict(cfg.metadata)}
    need = h * w * channels * MIN_STORED_BYTES_PER_PX * (float(tissue.mask.mean()) if tissue is not None else 1.0)
    fresh = not out_path.exists() or out_path.is_dir() and not any(out_path.iterdir())
    if fresh:
        check_free_space(out_path, need, f"the prediction of a {w}x{h} slide level")
    store = PredictionStore.create_or_resume(out_path, settings, channels, (h, w), blocks.size,
                                             (blocks.ny, blocks.nx), info, cfg.overwrite)
    if not fresh:  # resumed: what is left of it
        left = 1.0 - float(np.asarray(store.done[...]).astype(bool).mean())
        check_free_space(out_path, need * left, f"the rest of the prediction of a {w}x{h} slide level")
    return SlidePlan(lvl, grid, blocks, store)


def predict_block(predictor: Predictor, slide: Slide, level: int, grid: TileGrid, blocks: Blocks,
                  b: tuple[int, int], *, tissue: TissueMask | None = None, batch: int = 4) -> np.ndarray:
    """The stored (C, h, w) uint8 probabilities of output block ``b`` on its own: every tile
    touching it predicted (``batch`` per call) and blended, background outside the tissue. A pure
    function of its arguments (the task of the cluster driver); the same values
    :func:`predict_slide` stores for that block, which shares the tiles of neighbouring blocks
    instead of computing them again."""
    y0, y1, x0, x1 = blocks.region(b)
    windows = BlendWindows(grid)
    sums = np.zeros((channels_of(predictor), y1 - y0, x1 - x0), np.float64)
    wsum = np.zeros((y1 - y0, x1 - x0), np.float64)
    for results in iter_tile_predictions(predictor, slide, level, grid, grid.touching(y0, y1, x0, x1),
                                         batch=batch, tissue=tissue):
        for tid, pred, _ in results:
            add_tile(sums, wsum, y0, x0, pred, *grid.origin(tid), windows(tid))
    out = blend_to_uint8(sums, wsum)
    if tissue is not None:
        clear_background(out, tissue, slide.downsamples[level], y0, x0)
    return out


def _predict_slide(predictor: Predictor, slide: Slide, out_path: Path,
                   cfg: SlideSettings) -> Iterator[Progress]:
    start = time.perf_counter()  # the rate counts tissue detection too
    mask = detect_tissue(slide) if cfg.tissue else None
    plan = plan_slide(predictor, slide, out_path, cfg, mask)
    lvl, grid, blocks, store = plan.level, plan.grid, plan.blocks, plan.store
    if mask is not None:
        store.write_tissue(mask.mask, mask.downsample)
    run = _Run(with_stain(predictor, cfg.stain), slide, lvl, grid, blocks, store, mask, cfg, str(out_path), start)
    alongside = None if cfg.postprocess is None else start_alongside(
        store, cfg.postprocess, min_size=cfg.min_size, options=cfg.postprocess_options, wanted=cfg.label_alongside)
    try:
        yield from _predict_blocks(run, alongside)
        store.set_status(status="probabilities_done")
        labelled = alongside is not None and (yield from _finish_alongside(run, alongside))
        if cfg.postprocess is not None and not labelled:
            yield from _postprocess(run)
    finally:
        if alongside is not None:
            alongside.close()
    store.set_status(status="complete")
    yield run.event("done", grid.count, grid.count, blocks.ny * blocks.nx)


def _predict_blocks(run: _Run, alongside: LabellingAlongside | None = None) -> Iterator[Progress]:
    """The block loop of predict_slide (see the module docstring for the scheme)."""
    predictor, grid, blocks = run.predictor, run.grid, run.blocks
    windows = BlendWindows(grid)
    probs, done_arr = run.store.probabilities, run.store.done
    done = np.asarray(done_arr[...]).astype(bool)
    owned = np.zeros((blocks.ny, blocks.nx), np.int64)
    for tid in ((iy, ix) for iy in range(len(grid.ys)) for ix in range(len(grid.xs))):
        owned[blocks.of_point(*grid.origin(tid))] += 1
    tiles_done = int(owned[done].sum())
    needed = {t for b in zip(*np.nonzero(~done)) for t in grid.touching(*blocks.region(b))}
    run.work_left = len(split_by_tissue(grid, sorted(needed), run.mask, run.slide.downsamples[run.level])[0])
    sizer = BatchSizer(run.settings.batch)
    run.tiles_start = time.perf_counter()
    computed: set[TileId] = set()
    pending: dict[tuple[int, int], list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
    batches = 0
    for b in ((r, c) for r in range(blocks.ny) for c in range(blocks.nx)):
        if done[b]:
            continue
        y0, y1, x0, x1 = blocks.region(b)
        sums = np.zeros((channels_of(predictor), y1 - y0, x1 - x0), np.float64)
        wsum = np.zeros((y1 - y0, x1 - x0), np.float64)
        for py, px, psum, pw in pending.pop(b, []):
            sums[:, py - y0:py - y0 + pw.shape[0], px - x0:px - x0 + pw.shape[1]] += psum
            wsum[py - y0:py - y0 + pw.shape[0], px - x0:px - x0 + pw.shape[1]] += pw
        todo = [t for t in grid.touching(y0, y1, x0, x1) if t not in computed]
        in_block = 0
        for results in iter_tile_predictions(predictor, run.slide, run.level, grid, todo,
                                             tissue=run.mask, sizer=sizer):
            for tid, pred, was_computed in results:
                computed.add(tid)
                run.computed += was_computed
                run.work_left -= was_computed
                run.skipped += not was_computed
                run.area_done += grid.cell_area(tid)
                in_block += blocks.of_point(*grid.origin(tid)) == b
                _distribute(tid, pred, grid, blocks, b, done, windows(tid), sums, wsum, pending)
            if alongside is not None:
                alongside.pace(predictor)
            if results[0][2]:
                batches += 1
                if batches % run.settings.progress_every == 0:
                    yield run.event("predict", tiles_done + in_block, grid.count, int(done.sum()))
        block_probs = blend_to_uint8(sums, wsum)
        if run.mask is not None:
            clear_background(block_probs, run.mask, run.slide.downsamples[run.level], y0, x0)
        probs[:, y0:y1, x0:x1] = block_probs
        del sums, wsum, block_probs  # freed before the next block's are allocated: one block's in memory
        done[b] = True
        done_arr[b] = 1
        if alongside is not None:
            alongside.release(b)
        tiles_done += int(owned[b])
        yield run.event("predict", tiles_done, grid.count, int(done.sum()))


def _distribute(tid: TileId, pred: np.ndarray, grid: TileGrid, blocks: Blocks,
                current: tuple[int, int], done: np.ndarray, window: np.ndarray,
                sums: np.ndarray, wsum: np.ndarray,
                pending: dict[tuple[int, int], list[tuple[int, int, np.ndarray, np.ndarray]]]
                ) -> None:
    """Blend a tile into the current block and park its parts in later, unfinished blocks."""
    ty, tx = grid.origin(tid)
    t = grid.tile
    cy0, _, cx0, _ = blocks.region(current)
    for b in blocks.touched(ty, tx, t):
        if done[b]:
            continue
        if b == current:
            add_tile(sums, wsum, cy0, cx0, pred, ty, tx, window)
            continue
        y0, y1, x0, x1 = blocks.region(b)
        py0, py1 = max(ty, y0), min(ty + t, y1)
        px0, px1 = max(tx, x0), min(tx + t, x1)
        w = window[py0 - ty:py1 - ty, px0 - tx:px1 - tx]
        psum = pred[:, py0 - ty:py1 - ty, px0 - tx:px1 - tx] * w
        pending.setdefault(b, []).append((py0, px0, psum, w.copy()))


def _finish_alongside(run: _Run, alongside: LabellingAlongside) -> Iterator[Progress]:
    """The child's last blocks, as 'postprocess' events; returns whether it labelled the store
    (False: it failed, and the caller labels in-process)."""
    n_blocks = run.blocks.ny * run.blocks.nx
    try:
        yield from relay(alongside.finish(), lambda step: run.event("postprocess", step[0], step[1], n_blocks))
    except ChildFailed as e:
        yield replace(run.event("postprocess", 0, 1, n_blocks), message=f"{e}; labelling in this process instead")
        return False
    return True


def _postprocess(run: _Run) -> Iterator[Progress]:
    """Instance labels from the stored probabilities into the store (:mod:`.instances`)."""
    from napari_genselfdiff.slide.instances import label_store

    n_blocks = run.blocks.ny * run.blocks.nx
    gen = label_store(run.store, run.settings.postprocess,
                      min_size=run.settings.min_size, options=run.settings.postprocess_options)
    yield from relay(gen, lambda step: run.event("postprocess", step[0], step[1], n_blocks))
