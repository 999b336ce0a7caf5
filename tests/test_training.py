"""Training loops: cancel saves, resume continues the same run, real runs learn."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_genselfdiff.core import checkpoint as ck
from napari_genselfdiff.core.data import (LabeledImage, TaskSpec, downscale_item, load_labeled_folder,
                                          split_items)
from napari_genselfdiff.core.errors import CheckpointError, DataError
from napari_genselfdiff.core.inference import TorchPredictor
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.core.train.training import FinetuneConfig, PretrainConfig, finetune, pretrain
from napari_genselfdiff.core.train.validation import evaluate_dice
from napari_genselfdiff.slide.sources import unlabeled_sources


from conftest import random_labeled, random_sources  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_sources, _labeled = random_sources, random_labeled


PRE = PretrainConfig(preset="tiny", steps=6, patch=32, batch=2, lr=1e-3, warmup=2, checkpoint_every=0)
FT = FinetuneConfig(preset="tiny", steps=6, patch=32, batch=2, lr=1e-3, warmup=2, checkpoint_every=0, val_every=0)


def _weights(path):
    return ck.load_weights(path)


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_pretrain_cancel_saves_and_resume_continues_the_same_run(tmp_path):
    full = drain(pretrain(_sources(), tmp_path / "full", PRE, device="cpu"))
    assert full.done and full.step == 6

    gen = pretrain(_sources(), tmp_path / "cut", PRE, device="cpu")
    for ev in gen:
        if ev.step == 3:
            break
    gen.close()  # cancel: the loop's finally saves
    assert ck.load_training_state(tmp_path / "cut")["step"] == 3
    assert ck.load_config(tmp_path / "cut")["training"]["steps"] == 3

    resumed = drain(pretrain(_sources(), tmp_path / "cut", PRE, device="cpu", resume=True))
    assert resumed.step == 6
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the test's own hook, on the first layer
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_cancel_inside_a_step_stops_it_there_and_the_run_resumes_the_same(tmp_path, where):
    """Issue 35 item 8 (pretraining Cancel took 4.1-4.5 s, a whole CPU step): the stop is set in the
    middle of step 4's forward (or backward) pass; the pass stops at the next layer, the step is not
    taken, the three steps done are saved, and resuming gives the uninterrupted run's weights."""
    import threading

    from napari_genselfdiff.core.progress import stoppable

    full = drain(pretrain(_sources(), tmp_path / "full", PRE, device="cpu"))
    stop, calls, handles = threading.Event(), {"after": 0}, []

    def arm(module, *_):
        if not any(True for _ in module.children()):
            calls["after"] += stop.is_set()  # layers reached after the stop was set: the next one stops
            stop.set()

    register = {"forward": torch.nn.modules.module.register_module_forward_pre_hook,
                "backward": torch.nn.modules.module.register_module_full_backward_pre_hook}[where]
    with stoppable(stop):
        gen = pretrain(_sources(), tmp_path / "cut", PRE, device="cpu")
        try:
            events = []
            for ev in gen:
                events.append(ev)
                if ev.step == 3 and not handles:  # step 4's first layer (or first gradient) sets the stop
                    handles.append(register(arm))
        finally:
            for h in handles:
                h.remove()
    assert stop.is_set() and calls["after"] <= 1  # stopped at that layer or the next
    assert events[-1].step == 3 and not events[-1].done  # no event after the stop: the job ends there
    assert ck.load_training_state(tmp_path / "cut")["step"] == 3
    resumed = drain(pretrain(_sources(), tmp_path / "cut", PRE, device="cpu", resume=True))
    assert resumed.step == 6
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))


def test_a_model_with_stop_checks_can_be_copied_for_validation():
    """The fused copy validation makes (deepcopy) of a model with Cancel's checks inside a job
    (the fine-tune widget's validation failed: 'cannot pickle _thread.lock')."""
    import copy
    import threading

    from napari_genselfdiff.core.progress import StopRequested, stoppable
    from napari_genselfdiff.core.train.stops import StopChecks

    stop = threading.Event()
    with stoppable(stop):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        checks = StopChecks(model)
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 8, 8)
    stop.set()
    assert twin(x).shape == (1, 4, 6, 6)  # outside a step: never stopped
    with checks.armed(), pytest.raises(StopRequested):
        twin(x)


def test_resuming_says_when_the_checkpoint_is_not_the_preset_asked_for(tmp_path):
    """Resume continues the saved run with the saved architecture; when that is not the preset now
    asked for (e.g. the preset was redefined since), the first message says so."""
    from dataclasses import replace

    from napari_genselfdiff.core.nets.unet import UNetConfig

    old_tiny = UNetConfig.from_preset("tiny", mults=(1, 2, 2))
    gen = pretrain(_sources(), tmp_path / "old", PRE, device="cpu", model_config=old_tiny)
    for ev in gen:
        if ev.step == 2:
            break
    gen.close()
    first = next(pretrain(_sources(), tmp_path / "old", PRE, device="cpu", resume=True))
    assert "checkpoint's own architecture (mults [1, 2, 2]" in first.message and "'tiny'" in first.message
    assert ck.load_config(tmp_path / "old")["model"]["mults"] == [1, 2, 2]
    same = next(pretrain(_sources(), tmp_path / "old", replace(PRE, preset="small"), device="cpu", resume=True,
                         model_config=old_tiny))  # an explicit architecture: nothing to warn about
    assert "own architecture" not in same.message


def test_finetune_cancel_and_resume_match_uninterrupted(tmp_path):
    drain(finetune(_labeled(), tmp_path / "full", FT, device="cpu"))
    gen = finetune(_labeled(), tmp_path / "cut", FT, device="cpu")
    for ev in gen:
        if ev.step == 2:
            break
    gen.close()
    drain(finetune(_labeled(), tmp_path / "cut", FT, device="cpu", resume=True))
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))


def test_a_finished_run_resumed_keeps_its_validation_scores(tmp_path):
    """Resuming a run that already reached its last step (e.g. to bundle it again) must not wipe
    the validation record the model chooser shows."""
    cfg = FinetuneConfig(**{**FT.__dict__, "val_every": 3, "tune_postprocess": False})
    drain(finetune(_labeled(), tmp_path / "seg", cfg, val_items=_labeled(1), device="cpu"))
    before = ck.load_config(tmp_path / "seg")["validation"]
    assert 0.0 <= before["val_dice"] <= 1.0
    drain(finetune(_labeled(), tmp_path / "seg", cfg, val_items=_labeled(1), device="cpu", resume=True))
    assert ck.load_config(tmp_path / "seg")["validation"] == before


def test_finetune_from_pretrained_transfers_weights(tmp_path):
    drain(pretrain(_sources(), tmp_path / "pre", PRE, device="cpu"))
    cfg = FinetuneConfig(**{**FT.__dict__, "steps": 0})
    last = drain(finetune(_labeled(), tmp_path / "seg", cfg, init=tmp_path / "pre", device="cpu"))
    assert last.done
    pre, seg = _weights(tmp_path / "pre"), _weights(tmp_path / "seg")
    stats = [k for k in seg if k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")]
    assert stats, "the segmentation network is the tile-invariant one (BatchNorm)"
    for k in seg:
        if k.startswith("final_conv"):
            assert seg[k].shape[0] == 2 and pre[k].shape[0] == 3
        elif k in stats:  # estimated on the training patches (recalibrated), not copied
            assert k not in pre
            if k.endswith("running_var"):
                assert not torch.equal(seg[k], torch.ones_like(seg[k])), k
        else:
            assert torch.equal(pre[k], seg[k]), k
    assert any("attn" in k for k in pre) and not any("attn" in k for k in seg)
    info = ck.load_config(tmp_path / "seg")
    assert info["kind"] == "segmentation" and info["normalization"] == "minus_one_one"
    assert info["training"]["init_info"]["init_kind"] == "pretrain"


def test_refuses_to_overwrite_and_rejects_wrong_resume(tmp_path):
    drain(pretrain(_sources(), tmp_path / "pre", PRE, device="cpu"))
    with pytest.raises(CheckpointError, match="already exists"):
        next(pretrain(_sources(), tmp_path / "pre", PRE, device="cpu"))
    with pytest.raises(CheckpointError, match="cannot resume it as finetune"):
        next(finetune(_labeled(), tmp_path / "pre", FT, device="cpu", resume=True))


def test_empty_labels_and_empty_sources_are_clear_errors(tmp_path):
    items = [LabeledImage("a", np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8))]
    with pytest.raises(DataError, match="every training mask is empty"):
        next(finetune(items, tmp_path / "x", FT, device="cpu"))
    with pytest.raises(DataError, match="no unlabeled images"):
        next(pretrain([], tmp_path / "y", PRE, device="cpu"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_progress_events_are_complete(tmp_path):
    events = list(pretrain(_sources(), tmp_path / "p", PretrainConfig(**{**PRE.__dict__, "checkpoint_every": 2}),
                           device="cpu"))
    assert "using cpu" in events[0].message
    trained = [e for e in events[1:-1] if not e.activity]
    assert [e.step for e in trained] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(e.loss) and e.lr > 0 and e.images_per_s > 0 for e in trained)
    assert events[-2].activity == "saving the checkpoint" and events[-2].step == 6  # a stage with its own text
    assert [e.step for e in events if e.checkpoint and not e.done] == [2, 4]
    assert events[-1].done and events[-1].checkpoint


@pytest.mark.slow
def test_real_glas_pretraining_loss_falls_and_finetuned_tiny_beats_chance(glas_dir, tmp_path):
    """Short real run on GlaS: the pretext loss falls, and a tiny model fine-tuned from it segments
    held-out images better than chance (a predictor that marks pixels foreground at random with the
    true foreground rate has expected Dice equal to that rate)."""

    torch.set_num_threads(2)
    names = sorted(p.name for p in (glas_dir / "images").iterdir())[:24]
    sources = unlabeled_sources([glas_dir / "images" / n for n in names])
    pcfg = PretrainConfig(preset="tiny", steps=120, patch=64, batch=8, lr=2e-3, warmup=10, checkpoint_every=0)
    losses = [e.loss for e in pretrain(sources, tmp_path / "pre", pcfg, device="cpu") if e.step and not e.done and not e.activity]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.8 * first, f"pretext loss did not fall: {first:.4f} -> {last:.4f}"

    spec = TaskSpec.make("glands")
    items = [downscale_item(it, 2) for it in load_labeled_folder(glas_dir / "images", glas_dir / "masks", spec)[:24]]
    train, held_out = split_items(items, 0.25, seed=0)
    fcfg = FinetuneConfig(preset="tiny", steps=150, patch=128, batch=4, lr=2e-3, warmup=10, checkpoint_every=0,
                          val_every=0)
    drain(finetune(train, tmp_path / "seg", fcfg, init=tmp_path / "pre", device="cpu"))
    pred = TorchPredictor.from_checkpoint(tmp_path / "seg", device="cpu")
    score = evaluate_dice(pred, held_out)["val_dice"]
    chance = np.mean([(it.target > 0).mean() for it in held_out])
    # measured here: 0.62 vs 0.53 (a CPU-seconds tiny model; the benchmarks train longer)
    assert score > chance + 0.05, f"held-out Dice {score:.3f} vs chance {chance:.3f}"


def test_frozen_batchnorm_statistics_are_exact_after_a_few_steps(tmp_path):
    """Momentum statistics after 2 steps are still ~(0, 1): the saved model must carry statistics
    recalibrated for its final weights, or it predicts garbage in eval mode."""
    from napari_genselfdiff.core.data import sample_labeled_batch, to_model_input
    from napari_genselfdiff.core.nets.unet import recalibrate_batchnorm

    cfg = FinetuneConfig(**{**FT.__dict__, "steps": 2})
    drain(finetune(_labeled(), tmp_path / "seg", cfg, device="cpu"))
    model, _ = ck.load_model(tmp_path / "seg")
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    items = _labeled()
    batches = [torch.from_numpy(to_model_input(sample_labeled_batch(items, np.random.default_rng([cfg.seed, 7919, k]),
                                                                    cfg.batch, cfg.patch, cfg.augment)[0]))
               for k in range(16)]
    assert recalibrate_batchnorm(model, batches) > 0
    for k, v in model.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, saved[k], rtol=1e-4, atol=1e-5)
    mean0 = saved["down.0.blocks.0.norm1.running_mean"]
    assert mean0.abs().max() > 0.01  # real statistics, not the initial zeros


def test_training_runs_channels_last_on_the_cpu_and_saves_the_same_function(tmp_path):
    """The trainer moves the network's convolutions to channels_last on the CPU (the faster layout
    for oneDNN); the checkpoint it writes is plain contiguous tensors computing the same outputs."""
    from napari_genselfdiff.core.nets.unet import UNet, UNetConfig, segmentation_config
    from napari_genselfdiff.core.train.training import _Trainer

    net = UNet(segmentation_config(UNetConfig.from_preset("tiny", in_channels=3, out_channels=2), 2))
    trainer = _Trainer(net, torch.device("cpu"), lr=1e-3, weight_decay=0.0, precision="fp32", ema=0.9)
    convs = [p for p in trainer.model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                         for p in convs if p.shape[-1] > 1)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32))
    loss = trainer.step(lambda: torch.nn.functional.cross_entropy(trainer.net(x), y), grad_clip=1.0)
    assert np.isfinite(loss)
    ck.save_checkpoint(tmp_path / "m", trainer.model, {"kind": "segmentation", "model": net.config.to_dict()})
    assert all(w.is_contiguous() for w in ck.load_weights(tmp_path / "m").values())
    loaded, _ = ck.load_model(tmp_path / "m")
    trainer.model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trainer.model(x), rtol=1e-4, atol=1e-5)


_FAULTS = """
import resource, torch
from napari_genselfdiff.core.device import tune_allocator
from napari_genselfdiff.core.nets.unet import UNet, UNetConfig, segmentation_config
tuned = tune_allocator()
torch.set_num_threads(1)
torch.manual_seed(0)
net = UNet(segmentation_config(UNetConfig.from_preset("tiny", in_channels=3, out_channels=2), 2))
net = net.to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(net.parameters())
x, y = torch.randn(4, 3, 128, 128), torch.randint(0, 2, (4, 128, 128))
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(int(tuned), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator tuning is for glibc on Linux")
def test_the_tuned_allocator_reuses_freed_activations_instead_of_faulting_them_in_again():
    """The same training steps in two processes: glibc as it comes hands the activations' memory
    back to the kernel and faults it in again every step; tuned (the default) it is reused.
    GENSELFDIFF_MALLOC=default opts out."""
    def faults_per_step(mode):
        env = {**os.environ, "GENSELFDIFF_MALLOC": mode}
        out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env, check=True)
        return tuple(map(int, out.stdout.split()))
    (tuned, with_tuning), (untuned, without) = faults_per_step(""), faults_per_step("default")
    assert (tuned, untuned) == (1, 0)
    assert without > 5 * max(with_tuning, 1000), (with_tuning, without)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator tuning is for glibc on Linux")
def test_a_process_keeps_the_largest_reserve_asked_for():
    """Prediction asks for a small reserve, training for a large one; whichever comes first, the
    process ends up keeping the larger, and a later small request does not shrink it."""
    from napari_genselfdiff.core import device

    if os.environ.get("GENSELFDIFF_MALLOC", "").lower() == "default":
        pytest.skip("GENSELFDIFF_MALLOC=default: the allocator is left as it is")
    assert device.tune_allocator(device.KEEP_MB["predict"])
    assert device._ALLOCATOR["keep_mb"] >= device.KEEP_MB["predict"]
    assert device.tune_allocator(device.KEEP_MB["train"])
    assert device._ALLOCATOR["keep_mb"] == device.KEEP_MB["train"]
    assert device.tune_allocator(device.KEEP_MB["predict"])
    assert device._ALLOCATOR["keep_mb"] == device.KEEP_MB["train"]


_MAPPED_SCRIPT = r"""
import sys
import numpy as np
from napari_genselfdiff.core.allocator import large_arrays_mapped, tune_allocator

def rss_mb():
    return [int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmRSS')][0]

assert tune_allocator(1024)
mapped = sys.argv[1] == 'mapped'
def freed_kept():
    keep = np.ones(1 << 20, np.uint8)        # a small live array below the big one
    big = np.ones(200 << 20, np.uint8)      # 200 MB, touched
    tail = np.ones(1 << 20, np.uint8)       # pins the heap's top above the big one
    before = rss_mb()
    del big
    return before - rss_mb(), keep, tail
if mapped:
    with large_arrays_mapped():
        dropped = freed_kept()[0]
else:
    dropped = freed_kept()[0]
print(round(dropped))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator tuning is for glibc on Linux")
def test_large_arrays_go_back_to_the_kernel_while_mapped():
    """The tuned heap keeps a freed 200 MB array inside the process; under large_arrays_mapped (the
    whole-slide labelling) the same array is unmapped when freed and the RSS drops by its size."""
    if os.environ.get("GENSELFDIFF_MALLOC", "").lower() == "default":
        pytest.skip("GENSELFDIFF_MALLOC=default: the allocator is left as it is")
    import subprocess
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    dropped = {mode: float(subprocess.run([sys.executable, "-c", _MAPPED_SCRIPT, mode], env=env, check=True,
                                          capture_output=True, text=True).stdout.split()[-1])
               for mode in ("heap", "mapped")}
    assert dropped["heap"] < 50, dropped
    assert dropped["mapped"] > 150, dropped
