"""Long jobs say what they are doing and stop when asked (issue #15, items 4-6): the slide tiler
and the field-of-view predictor yield after every model call (with tiles, rate and ETA before the
first output block is written) and stop within one call; model calls shrink to what fits in half
a second whatever the batch setting; fine-tuning validates on a capped, fixed set of crops,
reporting each one, counting it in the ETA, and can be cancelled between crops.

Slow predictors here are fakes that sleep or advance a fake clock; every assertion counts work
(calls, tiles, events), never elapsed time."""
from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_genselfdiff.core.train import validation
from napari_genselfdiff.core.data import LabeledImage
from napari_genselfdiff.core.progress import Progress, drain, in_background, run_to_end
from napari_genselfdiff.core.train.training import BN_CALIBRATION_BATCHES, FinetuneConfig, finetune
from napari_genselfdiff.core.train.validation import validation_crops, validations_left
from napari_genselfdiff.slide.fov import FieldOfViewPredictor
from napari_genselfdiff.slide.grid import TileGrid
from napari_genselfdiff.slide.reader import open_slide
from napari_genselfdiff.slide.batching import BatchSizer
from napari_genselfdiff.slide.tiler import predict_slide

REPO = Path(__file__).resolve().parents[1]
TILE, OVERLAP, BLOCK = 128, 32, 256  # stride 96, output blocks of 288 px: 4 x 4 blocks on 1024 px


class CountingPredictor:
    """Foreground = dark pixels; records the size of every call, and can be slow."""

    num_classes = 2
    tile_multiple = 1
    mpp = None

    def __init__(self, seconds_per_tile: float = 0.0, clock: "FakeClock | None" = None) -> None:
        self.seconds_per_tile, self.clock = seconds_per_tile, clock
        self.sizes: list[int] = []

    @property
    def calls(self) -> int:
        return len(self.sizes)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        self.sizes.append(len(tiles))
        if self.clock is not None:
            self.clock.now += self.seconds_per_tile * len(tiles)
        elif self.seconds_per_tile:
            time.sleep(self.seconds_per_tile * len(tiles))
        fg = np.clip(1.0 - tiles.astype(np.float32).mean(axis=-1) / 255.0, 0.0, 1.0)
        return np.stack([1.0 - fg, fg], axis=1).astype(np.float32)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("make_test_slide", REPO / "scripts" / "make_test_slide.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("jobs") / "slide.tif"
    return mod.make_test_slide(out, 1024, tile=256, mpp=0.5, source=None, compression="zlib")


# ------------------------------------------------------------------------- batch sizing


def test_batch_sizer_keeps_one_tile_per_call_on_a_slow_device_and_grows_on_a_fast_one():
    slow = BatchSizer(8, target_s=0.5)
    assert slow.size == 1  # the first call takes one tile: its time is not known yet
    slow.record(1, 2.0)
    assert slow.size == 1
    fast = BatchSizer(8, target_s=0.5)
    sizes = []
    for _ in range(5):
        sizes.append(fast.size)
        fast.record(fast.size, 0.01 * fast.size)  # 10 ms a tile: 50 would fit, the batch caps at 8
    assert sizes == [1, 2, 4, 8, 8]
    fast.record(8, 8 * 0.2)  # the device got slow: 2 tiles fit in half a second
    assert fast.size == 2
    fixed = BatchSizer(4, target_s=None)
    fixed.record(4, 100.0)
    assert fixed.size == 4


def test_fov_calls_shrink_to_one_tile_when_tiles_are_slow(slide_path):
    clock = FakeClock()
    slow = CountingPredictor(seconds_per_tile=2.0, clock=clock)
    with open_slide(slide_path) as slide:
        fov = FieldOfViewPredictor(slow, slide, 0, tile=TILE, overlap=OVERLAP, batch=4, tissue=False)
        fov._sizer = BatchSizer(4, 0.5, clock=clock)
        fov.predict_region(0, 0, 0, 400, 400)
    assert slow.calls == len(TileGrid.make(1024, 1024, TILE, OVERLAP).touching(0, 400, 0, 400))
    assert set(slow.sizes) == {1}


def test_slide_calls_grow_to_the_batch_when_tiles_are_quick(slide_path, tmp_path):
    quick = CountingPredictor()
    drain(predict_slide(quick, slide_path, tmp_path / "q.zarr", tile=TILE, overlap=OVERLAP, block=BLOCK,
                        tissue=False, batch=4))
    assert quick.sizes[:3] == [1, 2, 4] and max(quick.sizes) == 4
    assert sum(quick.sizes) == TileGrid.make(1024, 1024, TILE, OVERLAP).count


# ------------------------------------------------------------------------- whole slide


def test_slide_progress_has_tiles_rate_and_eta_before_the_first_block(slide_path, tmp_path):
    counting = CountingPredictor()
    events = []
    for ev in predict_slide(counting, slide_path, tmp_path / "p.zarr", tile=TILE, overlap=OVERLAP,
                            block=BLOCK, tissue=False, batch=1):
        events.append(ev)
    before = [e for e in events if e.phase == "predict" and e.blocks_done == 0]
    assert len(before) >= 9  # the first block owns 3 x 3 tiles: one event per model call
    assert [e.step for e in before] == sorted(e.step for e in before) and before[0].step >= 1
    assert all(e.eta_s is not None and e.eta_s > 0 for e in before)
    assert all(e.megapixels_per_s > 0 for e in before)
    n_predict = sum(e.phase == "predict" for e in events)
    assert n_predict == counting.calls + events[-1].blocks_total  # one per call, one per block
    assert events[-1].phase == "done" and events[-1].eta_s == 0.0


def test_cancelling_a_slide_run_stops_within_one_model_call(slide_path, tmp_path):
    """A slow device at the default batch of 4: each call takes one tile, and closing the job at
    its first event leaves the predictor untouched afterwards (the call in flight was the last)."""
    slow = CountingPredictor(seconds_per_tile=0.6)
    gen = predict_slide(slow, slide_path, tmp_path / "c.zarr", tile=TILE, overlap=OVERLAP, block=BLOCK,
                        tissue=False, batch=4)
    first = next(e for e in gen if e.phase == "predict")
    calls = slow.calls
    gen.close()
    assert calls == 1 and slow.sizes == [1]
    assert first.blocks_done == 0 and first.step == 1 and first.tiles_computed == 1
    assert first.eta_s is not None and first.eta_s > 0  # known from the very first tile
    assert slow.calls == calls


# ------------------------------------------------------------------------- field of view


def test_fov_job_yields_per_call_and_returns_what_predict_region_gives(slide_path):
    with open_slide(slide_path) as slide:
        counting = CountingPredictor()
        fov = FieldOfViewPredictor(counting, slide, 0, tile=TILE, overlap=OVERLAP, tissue=False)
        gen = fov.iter_region(0, 100, 50, 500, 600)
        events = []
        while True:
            try:
                events.append(next(gen))
            except StopIteration as stop:
                probs = stop.value
                break
        reference = FieldOfViewPredictor(CountingPredictor(), slide, 0, tile=TILE, overlap=OVERLAP,
                                         tissue=False).predict_region(0, 100, 50, 500, 600)
    n = len(TileGrid.make(1024, 1024, TILE, OVERLAP).touching(100, 600, 50, 650))
    assert len(events) == counting.calls and all(isinstance(e, Progress) and e.stage == "predict" for e in events)
    assert events[-1].step == events[-1].total == n and events[-1].tiles_computed == n
    assert [e.step for e in events] == sorted(e.step for e in events)
    assert all(e.eta_s is not None for e in events) and events[-1].eta_s == 0.0
    np.testing.assert_array_equal(probs, reference)


def test_cancelled_fov_keeps_its_tiles_and_stops_calling(slide_path):
    with open_slide(slide_path) as slide:
        counting = CountingPredictor()
        fov = FieldOfViewPredictor(counting, slide, 0, tile=TILE, overlap=OVERLAP, tissue=False)
        n = fov.uncached(0, 0, 0, 700, 700)
        gen = fov.iter_region(0, 0, 0, 700, 700)
        for _ in range(3):
            next(gen)
        done = sum(counting.sizes)
        gen.close()
        assert sum(counting.sizes) == done and 0 < done < n
        assert fov.uncached(0, 0, 0, 700, 700) == n - done  # the finished tiles are cached
        fov.predict_region(0, 0, 0, 700, 700)
        assert sum(counting.sizes) == n  # the rest, once each


# ------------------------------------------------------------------------- in_background


def test_in_background_returns_raises_and_stops_waiting_when_closed():
    assert run_to_end(in_background(lambda a, b: a + b, 2, 3, status="adding")) == 5

    def fails():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_to_end(in_background(fails))

    release, finished = threading.Event(), threading.Event()

    def blocked():
        release.wait(30)
        finished.set()
        return "late"

    gen = in_background(blocked, status="waiting", every_s=0.01)
    assert next(gen) == "waiting"  # still running: the job can yield (and be cancelled)
    gen.close()
    assert not finished.is_set()  # closing did not wait for the call
    release.set()
    assert finished.wait(30)


# ------------------------------------------------------------------------- validation


def _val_images(n: int, h: int = 300, w: int = 400) -> list[LabeledImage]:
    rng = np.random.default_rng(3)
    out = []
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        tgt = (((yy - h * 0.6) ** 2 + (xx - w * 0.3) ** 2) < (h / 4) ** 2).astype(np.uint8)
        out.append(LabeledImage(f"v{i}", img, tgt))
    return out


def test_validation_crops_are_capped_fixed_and_mostly_informative():
    items = _val_images(17)
    crops = validation_crops(items, 8, 128, seed=0)
    assert len(crops) == 8
    assert all(c.image.shape[:2] == c.target.shape == (128, 128) for c in crops)
    assert len({c.name.split("@")[0] for c in crops}) == 8  # spread over 8 different images
    again = validation_crops(items, 8, 128, seed=0)
    assert [c.name for c in crops] == [c.name for c in again]
    for c in crops:  # the crop is the image's pixels at the position its name gives
        src = next(it for it in items if it.name == c.name.split("@")[0])
        y, x = (int(v) for v in c.name.split("@")[1].split(","))
        np.testing.assert_array_equal(c.image, src.image[y:y + 128, x:x + 128])
    fg = [float((c.target > 0).mean()) for c in crops]
    assert sum(0.0 < f < 1.0 for f in fg) >= 6  # chosen to hold both classes
    # fewer images than crops: several crops of each; small images whole, once
    assert len(validation_crops(items[:3], 8, 128)) == 8
    small = _val_images(2, 64, 64)
    assert [c.name for c in validation_crops(small, 8, 128)] == ["v0", "v1"]
    assert validation_crops(items, 0, 128) == items  # 0: the whole images


def test_validations_left_counts_the_passes_still_to_come():
    assert [validations_left(s, 30, 6) for s in (0, 5, 6, 29, 30)] == [5, 5, 4, 1, 0]
    assert [validations_left(s, 10, 4) for s in (0, 8, 9)] == [3, 1, 1]
    assert validations_left(3, 10, 0) == 0


FT = FinetuneConfig(preset="tiny", steps=4, patch=32, batch=2, lr=1e-3, warmup=1, checkpoint_every=0,
                    val_every=2, val_crops=3, val_crop=64, tune_postprocess=False)


@pytest.mark.usefixtures("one_torch_thread")
def test_finetune_reports_validation_progress_and_counts_it_in_the_eta(tmp_path):
    train, val = _val_images(2, 96, 96), _val_images(5, 150, 200)
    events = list(finetune(train, tmp_path / "m", FT, val_items=val, device="cpu"))
    assert "3 crop(s) of up to 64 px from 5 image(s)" in events[0].message
    acts = [e for e in events if e.activity]
    validating = [e.activity for e in acts if e.activity.startswith("validating")]
    assert validating == ["validating 1/3", "validating 2/3", "validating 3/3"] * 2  # at steps 2 and 4
    bn = [e.activity for e in acts if e.activity.startswith("BatchNorm")]
    n_bn = BN_CALIBRATION_BATCHES
    assert bn == [f"BatchNorm statistics {k}/{n_bn}" for k in range(1, n_bn + 1)] * 2
    assert all(np.isnan(e.loss) and not e.message for e in acts)  # a passing status, not a log line
    assert all(e.eta_s is not None and np.isfinite(e.eta_s) for e in acts)
    scored = [e for e in events if e.metrics]
    assert [e.step for e in scored] == [2, 4] and all(e.metrics["n_val"] == 3 for e in scored)
    assert scored[0].metrics["val_crop"] == 64
    # the step-2 events count the pass at step 4 still to come: more than the one step left
    step2 = next(e for e in events if e.step == 2 and e.metrics)
    step3 = next(e for e in events if e.step == 3 and not e.activity)
    assert step2.eta_s > 0 and step3.eta_s > 0


@pytest.mark.usefixtures("one_torch_thread")
def test_whole_image_validation_remains_an_option(tmp_path):
    cfg = FinetuneConfig(**{**FT.__dict__, "val_crops": 0, "val_every": 4})
    events = list(finetune(_val_images(2, 96, 96), tmp_path / "w", cfg, val_items=_val_images(2, 100, 120),
                           device="cpu"))
    assert [e.activity for e in events if e.activity.startswith("validating")] == ["validating 1/2", "validating 2/2"]
    assert next(e for e in events if e.metrics).metrics["val_crop"] == 0


@pytest.mark.usefixtures("one_torch_thread")
def test_cancel_during_validation_stops_between_crops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from napari_genselfdiff.core import checkpoint as ck

    predicted = []
    original = validation.predict_image
    monkeypatch.setattr(validation, "predict_image", lambda p, img: (predicted.append(img.shape), original(p, img))[1])
    gen = finetune(_val_images(2, 96, 96), tmp_path / "c", FT, val_items=_val_images(5, 150, 200), device="cpu")
    for ev in gen:
        if ev.activity == "validating 1/3":
            break
    gen.close()
    assert len(predicted) == 1  # not a crop more after the cancel
    assert ck.load_training_state(tmp_path / "c")["step"] == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_batchnorm_statistics_before_a_checkpoint_are_reported_and_cancellable(tmp_path):
    """A checkpoint first fixes the BatchNorm statistics (16 forward batches, the longest part of
    a save): they come as events too, and the validation of the same step reuses them."""
    cfg = FinetuneConfig(**{**FT.__dict__, "checkpoint_every": 2})
    events = list(finetune(_val_images(2, 96, 96), tmp_path / "k", cfg, val_items=_val_images(5, 150, 200),
                           device="cpu"))
    acts = [e.activity for e in events if e.activity]
    n_bn = BN_CALIBRATION_BATCHES
    first_val = acts.index("validating 1/3")
    assert acts[:first_val] == [f"BatchNorm statistics {k}/{n_bn}" for k in range(1, n_bn + 1)]  # once, at step 2
    assert next(e for e in events if e.checkpoint and not e.done).step == 2
    gen = finetune(_val_images(2, 96, 96), tmp_path / "c", cfg, val_items=_val_images(5, 150, 200), device="cpu")
    for ev in gen:
        if ev.activity == f"BatchNorm statistics 3/{n_bn}":
            break
    gen.close()  # the save after the cancel recalibrates fully
    from napari_genselfdiff.core import checkpoint as ck
    assert ck.load_training_state(tmp_path / "c")["step"] == 2


@pytest.mark.usefixtures("one_torch_thread")
def test_the_stages_after_the_last_step_say_what_they_do_and_stop_on_cancel(tmp_path, monkeypatch):
    """Issue 35 item 8: fine-tuning sat at "step 20/20, ETA 0:00" with no status while it chose the
    object thresholds and saved. Each is now a stage with its own text; a cancel during the choice
    keeps the model (with the default thresholds)."""
    from dataclasses import replace

    from napari_genselfdiff.core import checkpoint as ck
    from napari_genselfdiff.core.train import training

    calibrations = []
    real = training.iter_recalibrate_batchnorm
    monkeypatch.setattr(training, "iter_recalibrate_batchnorm",
                        lambda *a, **k: (calibrations.append(1), real(*a, **k))[1])
    cfg = replace(FT, tune_postprocess=True, val_every=0, ema=0.9)
    events = list(finetune(_val_images(2, 96, 96), tmp_path / "a", cfg, val_items=_val_images(2, 96, 96),
                           device="cpu"))
    assert len(calibrations) == 1  # the statistics of the averaged weights, made once for the choice and the save
    after = [ev.activity for ev in events if ev.step == cfg.steps and ev.activity]
    predicting = [a for a in after if a.startswith("predicting the validation images")]
    choosing = [a for a in after if a.startswith("choosing object thresholds")]
    assert predicting == ["predicting the validation images 1/2", "predicting the validation images 2/2"]
    assert len(choosing) >= 2 and choosing[-1].split()[-1].split("/")[0] == choosing[-1].split("/")[-1]
    assert after[-1] == "saving the checkpoint" and events[-1].done
    assert "postprocess_tuning" in ck.load_config(tmp_path / "a")
    gen = finetune(_val_images(2, 96, 96), tmp_path / "b", cfg, val_items=_val_images(2, 96, 96), device="cpu")
    for ev in gen:
        if (ev.activity or "").startswith("choosing object thresholds 1/"):
            break
    gen.close()
    saved = ck.load_config(tmp_path / "b")
    assert saved["training"]["steps"] == cfg.steps and "postprocess_tuning" not in saved


@pytest.mark.usefixtures("one_torch_thread")
def test_the_eta_counts_the_finishing_stage_before_it_runs(tmp_path, monkeypatch):
    """Issue 35 item 8: the ETA said 0:00 at the last step while choosing the object thresholds
    still took a while. Before that stage it is counted (FINISH_PASSES validation passes); while
    it runs, its guess until a few of its steps set the pace (no jump from 0 to 50 s)."""
    from napari_genselfdiff.core.train import training

    cfg = FinetuneConfig(**{**FT.__dict__, "tune_postprocess": True, "val_every": 2})
    events = list(finetune(_val_images(2, 96, 96), tmp_path / "f", cfg, val_items=_val_images(3, 120, 120),
                           device="cpu"))
    last_step = [e for e in events if e.step == cfg.steps and not e.activity and e.metrics]
    assert last_step and last_step[0].eta_s > 0  # the finishing stage is still to come
    finishing = [e for e in events if e.activity.startswith(("predicting the validation", "choosing object"))]
    assert finishing and all(np.isfinite(e.eta_s) and e.eta_s >= 0 for e in finishing)
    # its first steps show the guess counting down (the pace of one step made it jump to 50 s)
    assert finishing[0].eta_s <= last_step[0].eta_s and training.PACE_STEPS >= 2
