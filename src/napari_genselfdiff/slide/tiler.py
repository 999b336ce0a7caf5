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
the slide's height. Finished blocks go to a zarr store and are marked in its ``done`` array, so
an interrupted run resumes where it stopped (only the few tiles of finished blocks that spill
into unfinished ones are recomputed).

:class:`FieldOfViewPredictor` computes only what a viewer asks for, with an LRU tile cache, and
can wrap itself as a lazy dask array for napari.

Nothing here keeps global state: the functions take everything they need as arguments, so they
can later become tasks of a dask graph spread over several slides.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import dask.array as da
import numpy as np

from napari_genselfdiff.core.errors import DataError, GenSelfDiffError
from napari_genselfdiff.slide.reader import Slide, open_slide

#: Weight of a tile's pixels within overlap / 4 of its edge (strictly positive, so the blend
#: never divides by zero).
WINDOW_EPS = 1e-6
STORE_FORMAT = "genselfdiff-prediction"
STORE_VERSION = 1

TileId = tuple[int, int]


@runtime_checkable
class Predictor(Protocol):
    """What the tiler needs from a model.

    ``__call__`` maps a batch of RGB tiles ``(B, H, W, 3)`` uint8 to class probabilities
    ``(B, C, H, W)`` float32 with ``C == num_classes``; class 0 is background (tiles without
    tissue are given probability 1 for class 0 without calling the model). H and W are
    multiples of ``tile_multiple``. ``mpp`` is the microns per pixel the model was trained at
    (``None`` when unknown), used by ``level='auto'``.
    """

    num_classes: int
    tile_multiple: int
    mpp: float | None

    def __call__(self, tiles: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report of :func:`predict_slide`.

    ``phase`` is 'predict', 'postprocess' or 'done'. ``done``/``total`` count tiles during
    'predict' (tiles of finished blocks, including blocks finished by an earlier run, plus the
    tiles of the current block handled so far) and block passes during 'postprocess'.
    ``tiles_computed`` / ``tiles_skipped`` count this run's predictor tiles and tissue-free
    tiles. ``megapixels_per_s`` is level pixels of blocks finished in this run per second of
    this run; ``eta_s`` the predicted seconds left for prediction (None before a block is done
    and during postprocessing).
    """

    phase: str
    done: int
    total: int
    blocks_done: int
    blocks_total: int
    tiles_computed: int
    tiles_skipped: int
    megapixels_per_s: float
    eta_s: float | None
    out_path: str


# --------------------------------------------------------------------------------------------
# geometry


def tile_starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Start offsets of tiles of size ``tile`` covering [0, length) with step ``stride``.

    The last tile is shifted back to end exactly at ``length`` (so its edge lies on the image
    border); an axis shorter than a tile gets one tile at 0 (padded with white when read).
    """
    if length <= tile:
        return (0,)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return tuple(starts)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide level: tile (iy, ix) covers [ys[iy], ys[iy]+tile) x [xs[ix], ...)."""

    height: int
    width: int
    tile: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def make(cls, height: int, width: int, tile: int, overlap: int) -> TileGrid:
        if tile <= 0 or not 0 <= overlap < tile:
            raise GenSelfDiffError(f"invalid tiling: tile={tile}, overlap={overlap} "
                                   "(need tile > 0 and 0 <= overlap < tile)")
        stride = tile - overlap
        return cls(height, width, tile, overlap,
                   tile_starts(height, tile, stride), tile_starts(width, tile, stride))

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def origin(self, tid: TileId) -> tuple[int, int]:
        return self.ys[tid[0]], self.xs[tid[1]]

    def touching(self, y0: int, y1: int, x0: int, x1: int) -> list[TileId]:
        """Tiles overlapping the region [y0, y1) x [x0, x1), in raster order."""
        iys = [i for i, s in enumerate(self.ys) if s < y1 and s + self.tile > y0]
        ixs = [i for i, s in enumerate(self.xs) if s < x1 and s + self.tile > x0]
        return [(iy, ix) for iy in iys for ix in ixs]


def blend_window(tile: int, overlap: int, eps: float = WINDOW_EPS) -> np.ndarray:
    """Separable (tile, tile) float32 blending weight, strictly positive.

    Per axis, with d the distance of a pixel centre to the nearest tile edge: ``eps`` for
    d <= overlap/4, a raised-cosine ramp from ``eps`` to 1 for overlap/4 < d < 3*overlap/4,
    and 1 beyond. With overlap 0 it is constant 1 (tiles do not overlap).
    """
    if overlap <= 0:
        return np.ones((tile, tile), np.float32)
    i = np.arange(tile, dtype=np.float64)
    d = np.minimum(i, tile - 1 - i) + 0.5
    lo, width = overlap / 4.0, overlap / 2.0
    t = np.clip((d - lo) / width, 0.0, 1.0)
    w1 = eps + (1.0 - eps) * 0.5 * (1.0 - np.cos(np.pi * t))
    return np.outer(w1, w1).astype(np.float32)


def _add_tile(sums: np.ndarray, wsum: np.ndarray, oy: int, ox: int,
              pred: np.ndarray, ty: int, tx: int, window: np.ndarray) -> None:
    """Add window-weighted ``pred`` (tile at (ty, tx)) into the region at (oy, ox), in place.

    The accumulators are float64 so that the sum hardly depends on the order in which tiles
    arrive: a resumed run (which adds some tiles in another order) stores the same uint8
    probabilities as an uninterrupted one.
    """
    t = window.shape[0]
    y0, y1 = max(ty, oy), min(ty + t, oy + wsum.shape[0])
    x0, x1 = max(tx, ox), min(tx + t, ox + wsum.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    w = window[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
    sums[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox] += pred[:, y0 - ty:y1 - ty, x0 - tx:x1 - tx] * w
    wsum[y0 - oy:y1 - oy, x0 - ox:x1 - ox] += w


def _normalise_blend(sums: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    """Blended probabilities; pixels no tile covers (outside the image) become background."""
    covered = wsum > 0
    out = np.zeros_like(sums)
    np.divide(sums, wsum[None], out=out, where=covered[None])
    out[0][~covered] = 1.0
    return out


def _blend_to_uint8(sums: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    """Blended probabilities as uint8 0..255 (p * 255, rounded), as stored in the zarr output.

    Works one class at a time in place in ``sums`` (which it consumes), so a block needs no
    full-size float temporaries; pixels no tile covers become background.
    """
    covered = wsum > 0
    scale = np.divide(255.0, wsum, out=np.zeros_like(wsum), where=covered)
    out = np.empty(sums.shape, np.uint8)
    for c, channel in enumerate(sums):
        channel *= scale
        np.rint(channel, out=channel)
        np.clip(channel, 0, 255, out=channel)
        out[c] = channel
    out[0][~covered] = 255
    return out


# --------------------------------------------------------------------------------------------
# tissue detection


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask; mask pixel (i, j) covers level-0 pixels
    [i*downsample, (i+1)*downsample) x [j*downsample, (j+1)*downsample)."""

    mask: np.ndarray
    downsample: float

    def any_in(self, y: int, x: int, h: int, w: int, level_downsample: float = 1.0) -> bool:
        """True when the region (in pixels of a level with ``level_downsample``) has tissue."""
        f = level_downsample / self.downsample
        i0, i1 = max(int(math.floor(y * f)), 0), int(math.ceil((y + h) * f))
        j0, j1 = max(int(math.floor(x * f)), 0), int(math.ceil((x + w) * f))
        return bool(self.mask[i0:i1, j0:j1].any())

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def tissue_from_rgb(rgb: np.ndarray, *, min_saturation: float = 0.05,
                    max_saturation: float = 0.15, margin: int = 2) -> np.ndarray:
    """Tissue mask of a low-resolution RGB image (H, W, 3) uint8.

    Otsu's threshold on HSV saturation, clipped to [min_saturation, max_saturation] so that an
    all-white image finds nothing and an all-tissue image is not split in two; then opening to
    drop specks, hole filling (white gland lumens are inside tissue) and a dilation by
    ``margin`` pixels so tissue borders are never skipped.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    if sat.size == 0:
        return np.zeros(sat.shape, bool)
    thr = float(threshold_otsu(sat)) if np.ptp(sat) > 1e-3 else max_saturation
    thr = min(max(thr, min_saturation), max_saturation)
    mask = sat > thr
    mask = ndi.binary_opening(mask, structure=np.ones((2, 2), bool))
    mask = ndi.binary_fill_holes(mask)
    if margin > 0:
        mask = ndi.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=margin)
    return mask


def detect_tissue(slide: Slide, *, target_downsample: float = 32.0) -> TissueMask:
    """Tissue mask of ``slide`` at about ``target_downsample`` x level 0.

    Reads the coarsest pyramid level not coarser than the target and averages it down further
    with dask where needed, so even a slide without pyramid is only streamed, never held whole.
    """
    ok = [i for i, d in enumerate(slide.downsamples) if d <= target_downsample] or [0]
    level = max(ok, key=lambda i: slide.downsamples[i])
    arr = slide.levels[level]
    factor = max(int(round(target_downsample / slide.downsamples[level])), 1)
    factor = min(factor, max(min(arr.shape[0], arr.shape[1]), 1))
    if factor > 1:
        arr = da.coarsen(np.mean, arr.astype(np.float32), {0: factor, 1: factor}, trim_excess=True)
    try:
        small = np.asarray(arr.compute())
    except Exception as exc:
        raise DataError(f"{slide.path.name}: cannot read level {level} for tissue detection "
                        f"({type(exc).__name__}: {exc})") from exc
    return TissueMask(tissue_from_rgb(small), slide.downsamples[level] * factor)


# --------------------------------------------------------------------------------------------
# tile computation


def _resolve_level(slide: Slide, level: int | str, predictor: Predictor) -> int:
    if level == "auto":
        return slide.level_for_mpp(getattr(predictor, "mpp", None))
    if not isinstance(level, (int, np.integer)) or not 0 <= int(level) < len(slide.levels):
        raise DataError(f"{slide.path.name}: level {level!r} does not exist "
                        f"(levels 0..{len(slide.levels) - 1} or 'auto')")
    return int(level)


def _check_tile(predictor: Predictor, tile: int) -> None:
    mult = int(getattr(predictor, "tile_multiple", 1) or 1)
    if tile % mult:
        raise GenSelfDiffError(f"tile size {tile} is not a multiple of {mult}, which the model "
                               "needs (choose e.g. tile={})".format(max(mult, tile // mult * mult)))


def _call_predictor(predictor: Predictor, tiles: np.ndarray) -> np.ndarray:
    """Run the predictor on a batch and check the shape of what comes back."""
    out = np.asarray(predictor(tiles), dtype=np.float32)
    want = (tiles.shape[0], predictor.num_classes, tiles.shape[1], tiles.shape[2])
    if out.shape != want:
        raise GenSelfDiffError(f"predictor returned shape {out.shape}, expected {want} "
                               "(batch, classes, height, width)")
    return out


def iter_tile_predictions(predictor: Predictor, slide: Slide, level: int, grid: TileGrid,
                          tiles: Sequence[TileId], *, batch: int = 4,
                          tissue: TissueMask | None = None
                          ) -> Iterator[list[tuple[TileId, np.ndarray, bool]]]:
    """Predict ``tiles`` of ``grid`` on ``slide`` level ``level``, one list per predictor batch.

    Each item is (tile id, (C, tile, tile) probabilities, computed). Tiles without tissue are
    not given to the model: they come as background (class 0 = 1) with computed=False, in a
    list of their own. The pixels are read once for the bounding box of the computed tiles.
    """
    t = grid.tile
    c = predictor.num_classes
    ds = slide.downsamples[level]
    todo, skipped = [], []
    for tid in tiles:
        ty, tx = grid.origin(tid)
        (todo if tissue is None or tissue.any_in(ty, tx, t, t, ds) else skipped).append(tid)
    if skipped:
        bg = np.zeros((c, t, t), np.float32)
        bg[0] = 1.0
        yield [(tid, bg, False) for tid in skipped]
    if not todo:
        return
    origins = np.array([grid.origin(tid) for tid in todo])
    by, bx = origins.min(axis=0)
    ey, ex = origins.max(axis=0) + t
    pixels = slide.read_region(level, int(by), int(bx), int(ey - by), int(ex - bx))
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        stack = np.stack([pixels[oy - by:oy - by + t, ox - bx:ox - bx + t]
                          for oy, ox in (grid.origin(tid) for tid in chunk)])
        preds = _call_predictor(predictor, stack)
        yield [(tid, preds[k], True) for k, tid in enumerate(chunk)]


# --------------------------------------------------------------------------------------------
# whole-slide prediction to zarr


@dataclass
class _Blocks:
    """Output blocks of ``size`` pixels (a multiple of the tile stride) over an (h, w) level."""

    h: int
    w: int
    size: int

    @property
    def ny(self) -> int:
        return -(-self.h // self.size)

    @property
    def nx(self) -> int:
        return -(-self.w // self.size)

    def region(self, b: tuple[int, int]) -> tuple[int, int, int, int]:
        y0, x0 = b[0] * self.size, b[1] * self.size
        return y0, min(y0 + self.size, self.h), x0, min(x0 + self.size, self.w)

    def of_point(self, y: int, x: int) -> tuple[int, int]:
        return y // self.size, x // self.size

    def touched(self, ty: int, tx: int, t: int) -> list[tuple[int, int]]:
        r0, c0 = self.of_point(max(ty, 0), max(tx, 0))
        r1, c1 = self.of_point(min(ty + t, self.h) - 1, min(tx + t, self.w) - 1)
        return [(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]


def block_size_for(tile: int, overlap: int, block: int) -> int:
    """Output block size: the multiple of the tile stride closest to ``block``, at least one
    tile (so a tile touches at most two blocks per axis)."""
    stride = tile - overlap
    k = max(int(round(block / stride)), -(-tile // stride), 1)
    return k * stride


@dataclass
class _RunState:
    """Counters of one predict_slide run (for progress events)."""

    start: float = field(default_factory=time.perf_counter)
    computed: int = 0
    skipped: int = 0
    area_done: int = 0


def _open_store(out_path: Path, settings: dict[str, Any], num_classes: int, h: int, w: int,
                bsize: int, nblocks: tuple[int, int], info: dict[str, Any], overwrite: bool) -> Any:
    """Create the output group, or reopen it for resuming when its settings match."""
    import zarr

    if out_path.exists() and not (out_path.is_dir() and not any(out_path.iterdir())):
        if not ((out_path / "zarr.json").is_file() or (out_path / ".zgroup").is_file()):
            raise DataError(f"{out_path}: exists and is not a zarr store; choose another "
                            "output path (it is never overwritten)")
        if not overwrite:
            try:
                group = zarr.open_group(out_path, mode="r+")
            except Exception as exc:
                raise DataError(f"{out_path}: unreadable zarr store ({type(exc).__name__}: "
                                f"{exc}); choose another output path") from exc
            meta = dict(group.attrs).get("genselfdiff")
            if meta is None or "probabilities" not in group or "done" not in group:
                raise DataError(f"{out_path}: is a zarr store that is not a genselfdiff "
                                "prediction; choose another output path")
            if meta.get("settings") != settings:
                raise DataError(f"{out_path}: holds a prediction made with other settings "
                                f"({meta.get('settings')}); delete it, pass overwrite=True or "
                                "choose another output path")
            return group
    group = zarr.open_group(out_path, mode="w")
    group.create_array("probabilities", shape=(num_classes, h, w), chunks=(1, bsize, bsize),
                       dtype="uint8", fill_value=0, dimension_names=("c", "y", "x"))
    group.create_array("done", shape=nblocks, chunks=nblocks, dtype="uint8", fill_value=0)
    group.attrs["genselfdiff"] = {"format": STORE_FORMAT, "version": STORE_VERSION,
                                  "settings": settings, "status": "predicting", **info}
    return group


def _set_status(group: Any, **changes: Any) -> None:
    meta = dict(group.attrs["genselfdiff"])
    meta.update(changes)
    group.attrs["genselfdiff"] = meta


def predict_slide(predictor: Predictor, slide_or_path: Slide | str | Path, out_path: str | Path,
                  *, level: int | str = 0, tile: int = 512, overlap: int = 64, batch: int = 4,
                  tissue: bool = True, class_names: Sequence[str] | None = None,
                  postprocess: str | None = None, min_size: int | None = None,
                  progress_every: int = 1, block: int = 2048,
                  postprocess_options: dict[str, Any] | None = None,
                  metadata: dict[str, Any] | None = None,
                  overwrite: bool = False) -> Iterator[ProgressEvent]:
    """Predict a whole slide level into a zarr store at ``out_path``; a generator of progress.

    Drive it with ``for event in predict_slide(...)``; cancel by ``gen.close()``: the store
    stays consistent (only whole blocks are ever marked done) and calling again with the same
    arguments resumes. A store made with other settings raises DataError unless
    ``overwrite=True``.

    ``level`` is a pyramid level or 'auto' (the level closest to ``predictor.mpp``).
    ``tissue`` skips tiles without tissue (they get background probability).
    ``postprocess`` = 'glands' or 'nuclei' labels instances from class 1 (and class 2 as the
    nucleus boundary when the model has 3 classes), see :mod:`.instances`; ``min_size`` and
    ``postprocess_options`` (threshold, fill_holes, min_distance, halo) are passed on.
    An event is yielded after every ``progress_every`` predictor batches and after each block.

    Store layout (zarr v3 group): ``probabilities`` (C, H, W) uint8 (p * 255), chunks
    (1, block, block); ``done`` (blocks_y, blocks_x) uint8; ``labels/<name>/<k>`` int32
    instance labels with a nearest-neighbour pyramid (k = 0, 1, ...); group attribute
    ``genselfdiff`` with settings, level, downsample, mpp, class names, metadata, status.
    """
    if postprocess not in (None, "glands", "nuclei"):
        raise GenSelfDiffError(f"postprocess must be 'glands', 'nuclei' or None, not {postprocess!r}")
    if batch < 1 or progress_every < 1:
        raise GenSelfDiffError("batch and progress_every must be >= 1")
    own = not isinstance(slide_or_path, Slide)
    slide = open_slide(slide_or_path) if own else slide_or_path
    try:
        yield from _predict_slide(predictor, slide, Path(out_path), level, tile, overlap, batch,
                                  tissue, class_names, postprocess, min_size, progress_every,
                                  block, dict(postprocess_options or {}), dict(metadata or {}),
                                  overwrite)
    finally:
        if own:
            slide.close()


def _predict_slide(predictor: Predictor, slide: Slide, out_path: Path, level: int | str,
                   tile: int, overlap: int, batch: int, tissue: bool,
                   class_names: Sequence[str] | None, postprocess: str | None,
                   min_size: int | None, progress_every: int, block: int,
                   pp_options: dict[str, Any], metadata: dict[str, Any],
                   overwrite: bool) -> Iterator[ProgressEvent]:
    lvl = _resolve_level(slide, level, predictor)
    _check_tile(predictor, tile)
    h, w = (int(s) for s in slide.levels[lvl].shape[:2])
    grid = TileGrid.make(h, w, tile, overlap)
    blocks = _Blocks(h, w, block_size_for(tile, overlap, block))
    nc = int(predictor.num_classes)
    names = list(class_names) if class_names is not None else (
        ["background"] + [f"class_{i}" for i in range(1, nc)])
    if len(names) != nc:
        raise GenSelfDiffError(f"{len(names)} class names given for a model with {nc} classes")
    settings = {"slide": str(Path(slide.path).resolve()), "level": lvl, "shape": [h, w],
                "tile": tile, "overlap": overlap, "block": blocks.size, "num_classes": nc,
                "tissue": bool(tissue)}
    info = {"downsample": slide.downsamples[lvl], "mpp": slide.level_mpp(lvl),
            "slide_mpp": slide.mpp, "class_names": names, "metadata": metadata}
    group = _open_store(out_path, settings, nc, h, w, blocks.size, (blocks.ny, blocks.nx),
                        info, overwrite)
    state = _RunState()
    mask = detect_tissue(slide) if tissue else None
    if mask is not None and "tissue" not in group:
        group.create_array("tissue", data=mask.mask.astype(np.uint8),
                           attributes={"downsample": mask.downsample})
    yield from _predict_blocks(predictor, slide, lvl, grid, blocks, group, mask, batch,
                               progress_every, state, str(out_path))
    _set_status(group, status="probabilities_done")
    if postprocess is not None:
        yield from _postprocess(group, postprocess, nc, blocks, min_size, pp_options, state,
                                str(out_path))
    _set_status(group, status="complete")
    yield _event("done", grid.count, grid.count, blocks, blocks.ny * blocks.nx, state,
                 0.0, str(out_path))


def _event(phase: str, done: int, total: int, blocks: _Blocks, blocks_done: int,
           state: _RunState, remaining_area: float | None, out: str) -> ProgressEvent:
    elapsed = max(time.perf_counter() - state.start, 1e-9)
    rate = state.area_done / elapsed
    eta = remaining_area / rate if rate > 0 and remaining_area is not None else None
    return ProgressEvent(phase, done, total, blocks_done, blocks.ny * blocks.nx, state.computed,
                         state.skipped, rate / 1e6, eta, out)


def _predict_blocks(predictor: Predictor, slide: Slide, level: int, grid: TileGrid,
                    blocks: _Blocks, group: Any, mask: TissueMask | None, batch: int,
                    progress_every: int, state: _RunState, out: str) -> Iterator[ProgressEvent]:
    """The block loop of predict_slide (see the module docstring for the scheme)."""
    window = blend_window(grid.tile, grid.overlap)
    probs, done_arr = group["probabilities"], group["done"]
    done = np.asarray(done_arr[...]).astype(bool)
    owned = np.zeros((blocks.ny, blocks.nx), np.int64)
    for tid in ((iy, ix) for iy in range(len(grid.ys)) for ix in range(len(grid.xs))):
        owned[blocks.of_point(*grid.origin(tid))] += 1
    tiles_done = int(owned[done].sum())
    remaining_area = float(sum(_area(blocks.region(b)) for b in zip(*np.nonzero(~done))))
    computed: set[TileId] = set()
    pending: dict[tuple[int, int], list[tuple[int, int, np.ndarray, np.ndarray]]] = {}
    batches = 0
    for b in ((r, c) for r in range(blocks.ny) for c in range(blocks.nx)):
        if done[b]:
            continue
        y0, y1, x0, x1 = blocks.region(b)
        sums = np.zeros((predictor.num_classes, y1 - y0, x1 - x0), np.float64)
        wsum = np.zeros((y1 - y0, x1 - x0), np.float64)
        for py, px, psum, pw in pending.pop(b, []):
            sums[:, py - y0:py - y0 + pw.shape[0], px - x0:px - x0 + pw.shape[1]] += psum
            wsum[py - y0:py - y0 + pw.shape[0], px - x0:px - x0 + pw.shape[1]] += pw
        todo = [t for t in grid.touching(y0, y1, x0, x1) if t not in computed]
        in_block = 0
        for results in iter_tile_predictions(predictor, slide, level, grid, todo, batch=batch,
                                             tissue=mask):
            for tid, pred, was_computed in results:
                computed.add(tid)
                state.computed += was_computed
                state.skipped += not was_computed
                in_block += blocks.of_point(*grid.origin(tid)) == b
                _distribute(tid, pred, grid, blocks, b, done, window, sums, wsum, pending)
            if results[0][2]:
                batches += 1
                if batches % progress_every == 0:
                    yield _event("predict", tiles_done + in_block, grid.count, blocks,
                                 int(done.sum()), state, remaining_area, out)
        block_probs = _blend_to_uint8(sums, wsum)
        if mask is not None:
            _clear_background(block_probs, mask, slide.downsamples[level], y0, x0)
        probs[:, y0:y1, x0:x1] = block_probs
        done[b] = True
        done_arr[b] = 1
        tiles_done += int(owned[b])
        state.area_done += _area((y0, y1, x0, x1))
        remaining_area -= _area((y0, y1, x0, x1))
        yield _event("predict", tiles_done, grid.count, blocks, int(done.sum()), state,
                     remaining_area, out)


def _clear_background(block_probs: np.ndarray, mask: TissueMask, level_downsample: float, y0: int, x0: int,
                      certain: float = 255) -> None:
    """Pixels outside the (dilated) tissue mask become certain background (probability
    ``certain``: 255 in uint8 stores, 1.0 for floats), in place: a model trained on tissue has no
    business calling empty glass a gland."""
    h, w = block_probs.shape[1:]
    f = level_downsample / mask.downsample
    rows = np.minimum(((y0 + np.arange(h)) * f).astype(np.int64), mask.mask.shape[0] - 1)
    cols = np.minimum(((x0 + np.arange(w)) * f).astype(np.int64), mask.mask.shape[1] - 1)
    outside = ~mask.mask[rows[:, None], cols[None, :]]
    if outside.any():
        block_probs[:, outside] = 0
        block_probs[0, outside] = certain


def _area(region: tuple[int, int, int, int]) -> int:
    y0, y1, x0, x1 = region
    return (y1 - y0) * (x1 - x0)


def _distribute(tid: TileId, pred: np.ndarray, grid: TileGrid, blocks: _Blocks,
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
            _add_tile(sums, wsum, cy0, cx0, pred, ty, tx, window)
            continue
        y0, y1, x0, x1 = blocks.region(b)
        py0, py1 = max(ty, y0), min(ty + t, y1)
        px0, px1 = max(tx, x0), min(tx + t, x1)
        w = window[py0 - ty:py1 - ty, px0 - tx:px1 - tx]
        psum = pred[:, py0 - ty:py1 - ty, px0 - tx:px1 - tx] * w
        pending.setdefault(b, []).append((py0, px0, psum, w.copy()))


# --------------------------------------------------------------------------------------------
# instance post-processing into the store


class _ChannelView:
    """2-D view ``arr[channel]`` of a (C, H, W) uint8 zarr array, read region by region."""

    def __init__(self, arr: Any, channel: int) -> None:
        self.arr, self.channel = arr, channel
        self.shape = tuple(arr.shape[1:])
        self.dtype = arr.dtype

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return np.asarray(self.arr[(self.channel,) + tuple(key)])


def _postprocess(group: Any, kind: str, nc: int, blocks: _Blocks, min_size: int | None,
                 options: dict[str, Any], state: _RunState, out: str) -> Iterator[ProgressEvent]:
    """Instance labels from the stored probabilities into ``labels/<kind>`` with a pyramid."""
    from napari_genselfdiff.slide import instances

    if nc < 2:
        raise GenSelfDiffError(f"postprocess '{kind}' needs a model with >= 2 classes, got {nc}")
    labels = group.require_group("labels")
    if kind in labels and dict(labels[kind].attrs).get("complete"):
        return
    probs = group["probabilities"]
    h, w = probs.shape[1:]
    lab_group = labels.create_group(kind, overwrite=True)
    lab0 = lab_group.create_array("0", shape=(h, w), chunks=(blocks.size, blocks.size),
                                  dtype="int32", fill_value=0, dimension_names=("y", "x"))
    fg = _ChannelView(probs, 1)
    opts = dict(options)
    if min_size is not None:
        opts["min_size"] = min_size
    if kind == "glands":
        gen = instances.iter_glands_blockwise(fg, lab0, block=blocks.size, **opts)
    else:
        boundary = _ChannelView(probs, 2) if nc >= 3 else None
        gen = instances.iter_nuclei_blockwise(fg, lab0, prob_boundary=boundary,
                                              block=blocks.size, **opts)
    stats = yield from _relay(gen, blocks, state, out)
    n_levels = instances.write_label_pyramid(lab_group, block=blocks.size)
    lab_group.attrs.update({
        "complete": True, "count": stats.count, "truncated": stats.truncated,
        "conflicts": stats.conflicts,
        "multiscales": [{"version": "0.4", "name": kind,
                         "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                         "datasets": [{"path": str(k), "coordinateTransformations": [
                             {"type": "scale", "scale": [2.0 ** k, 2.0 ** k]}]}
                             for k in range(n_levels)]}]})


def _relay(gen: Iterator[tuple[int, int]], blocks: _Blocks, state: _RunState,
           out: str) -> Iterator[ProgressEvent]:
    """Turn an instances generator's (done, total) steps into events; return its result."""
    while True:
        try:
            done, total = next(gen)
        except StopIteration as stop:
            return stop.value
        yield _event("postprocess", done, total, blocks, blocks.ny * blocks.nx, state, None, out)


# --------------------------------------------------------------------------------------------
# lazy field-of-view prediction


class FieldOfViewPredictor:
    """On-demand prediction for a viewer: computes only the tiles a requested region needs.

    Tiles are computed on the pixels of the requested pyramid level with the same grid,
    window and blending as :func:`predict_slide`, and kept in an LRU cache keyed by
    (level, tile row, tile column) holding ``cache_tiles`` tiles (each C x tile x tile
    float32), so panning back costs nothing. ``level`` is the default for
    :meth:`as_lazy_dask` (an int or 'auto'). Thread-safe: requests are serialised.
    """

    def __init__(self, predictor: Predictor, slide: Slide, level: int | str = 0,
                 tile: int = 512, overlap: int = 64, cache_tiles: int = 256, *,
                 batch: int = 4, tissue: bool = True) -> None:
        _check_tile(predictor, tile)
        self.predictor, self.slide = predictor, slide
        self.level = _resolve_level(slide, level, predictor)
        self.tile, self.overlap, self.batch = tile, overlap, batch
        self.cache_tiles = cache_tiles
        self.use_tissue = tissue
        self.tiles_computed = 0
        self.cache_hits = 0
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._grids: dict[int, TileGrid] = {}
        self._mask: TissueMask | None = None
        self._window = blend_window(tile, overlap)
        self._lock = threading.RLock()

    def grid(self, level: int) -> TileGrid:
        """The tile grid of ``level``."""
        if level not in self._grids:
            h, w = self.slide.levels[level].shape[:2]
            self._grids[level] = TileGrid.make(int(h), int(w), self.tile, self.overlap)
        return self._grids[level]

    def _tissue(self) -> TissueMask | None:
        if self.use_tissue and self._mask is None:
            self._mask = detect_tissue(self.slide)
        return self._mask

    def predict_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Blended class probabilities (C, h, w) float32 of the region at ``level``; pixels
        outside the image are background."""
        level = _resolve_level(self.slide, level, self.predictor)
        with self._lock:
            grid = self.grid(level)
            tids = grid.touching(y, y + h, x, x + w)
            missing = [t for t in tids if (level,) + t not in self._cache]
            self.cache_hits += len(tids) - len(missing)
            fresh: dict[TileId, np.ndarray] = {}
            for results in iter_tile_predictions(self.predictor, self.slide, level, grid,
                                                 missing, batch=self.batch,
                                                 tissue=self._tissue()):
                for tid, pred, was_computed in results:
                    fresh[tid] = pred
                    self.tiles_computed += was_computed
            sums = np.zeros((self.predictor.num_classes, h, w), np.float64)
            wsum = np.zeros((h, w), np.float64)
            for tid in tids:
                pred = fresh.get(tid)
                if pred is None:
                    pred = self._cache[(level,) + tid]
                    self._cache.move_to_end((level,) + tid)
                ty, tx = grid.origin(tid)
                _add_tile(sums, wsum, y, x, pred, ty, tx, self._window)
            for tid, pred in fresh.items():
                self._cache[(level,) + tid] = pred
            while len(self._cache) > self.cache_tiles:
                self._cache.popitem(last=False)
            out = _normalise_blend(sums, wsum).astype(np.float32)
            mask = self._tissue()
            if mask is not None:
                _clear_background(out, mask, self.slide.downsamples[level], y, x, certain=1.0)
            return out

    def as_lazy_dask(self, level: int | None = None, chunk: int = 1024) -> da.Array:
        """Probabilities of ``level`` as a lazy (C, H, W) float32 dask array.

        Each chunk calls :meth:`predict_region` when computed, so nothing runs until asked:
        napari computes only the chunks in view (of the level it displays), which makes this
        a lazy overlay. For a multiscale overlay pass ``[fov.as_lazy_dask(k) for k in ...]``.
        """
        level = self.level if level is None else level
        h, w = (int(s) for s in self.slide.levels[level].shape[:2])
        nc = self.predictor.num_classes

        def chunks_of(n: int) -> tuple[int, ...]:
            return tuple(min(chunk, n - s) for s in range(0, n, chunk))

        def compute(block_info: dict[Any, Any] | None = None) -> np.ndarray:
            (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
            return self.predict_region(level, y0, x0, y1 - y0, x1 - x0)

        return da.map_blocks(compute, chunks=((nc,), chunks_of(h), chunks_of(w)),
                             dtype=np.float32, meta=np.empty((0, 0, 0), np.float32),
                             name=f"genselfdiff-fov-{id(self)}-{level}")
