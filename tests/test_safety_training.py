"""Issue #11, the training half: what ``pretrain`` / ``finetune`` / ``sample`` / ``evaluate`` write
never destroys what a user owns, and a bad starting model is one clear line.

* ``--out`` of pretrain / finetune: with ``--force`` only a checkpoint folder of ours (``config.json``
  with a ``kind``, ``model.safetensors``, nothing but our files) is replaced; a user's folder or
  file, or a checkpoint a user put their own files into, is byte-identical afterwards (``--resume``
  does not write into it either);
* ``save_checkpoint`` removes the leftovers of killed saves (``.NAME.<random>.tmp``) that nothing
  has touched for a while, keeps a live one, moves the old copy aside under a hidden name (never
  deleting a user's ``NAME.old``), and an interrupted swap is still recovered;
* ``sample --out`` and ``evaluate --json`` refuse an existing file unless ``--force``, and replace
  only a PNG / metrics file of ours;
* ``finetune --init`` with a checkpoint whose weights do not fit its architecture, or a
  segmentation checkpoint without its task, is one :class:`CheckpointError`, not a traceback.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from imageio.v3 import imwrite

from napari_genselfdiff.cli import main
from napari_genselfdiff.core import checkpoint as ck
from napari_genselfdiff.core.atomic import is_our_json, is_our_png, write_png_atomic
from napari_genselfdiff.core.data import LabeledImage
from napari_genselfdiff.core.errors import CheckpointError
from napari_genselfdiff.core.nets.unet import UNet, UNetConfig
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.core.train.training import FinetuneConfig, finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OLD = time.time() - 3600  # an hour ago: long past atomic.STALE_AFTER_S
TINY = ["--preset", "tiny", "--patch", "32", "--batch", "1", "--device", "cpu"]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) -> its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def age(path: Path, when: float = OLD) -> None:
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (when, when), follow_symlinks=False)


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def data(tmp_path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "data" / "images", tmp_path / "data" / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(2):
        imwrite(images / f"t{i}.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
        mask = np.zeros((48, 48), np.uint8)
        mask[8:30, 8:30] = 255
        imwrite(masks / f"t{i}.png", mask)
    return images, masks


def train_argv(stage: str, data, out: Path, steps: int = 1) -> list:
    images, masks = data
    if stage == "pretrain":
        return ["pretrain", "--images", images, "--out", out, "--steps", steps, *TINY]
    return ["finetune", "--images", images, "--masks", masks, "--scratch", "--out", out, "--steps", steps, *TINY]


def thesis_folder(tmp_path) -> Path:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.docx").write_bytes(b"four years of work")
    (folder / "figures").mkdir()
    (folder / "figures" / "fig1.png").write_bytes(b"\x89PNG a figure")
    return folder


def _tiny_model(out_channels=2, seed=0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig.from_preset("tiny", out_channels=out_channels))


# ---------------------------------------------------------------------------------------------
# 1. --out of pretrain / finetune

@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("flags", [[], ["--force"], ["--resume"]])
def test_training_never_replaces_a_users_folder(stage, flags, data, tmp_path, capsys):
    folder = thesis_folder(tmp_path)
    before = snapshot(folder)
    code, err = run(capsys, *train_argv(stage, data, folder), *flags)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"genselfdiff {stage}: error: {folder}")
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "thesis"]  # no temporaries left


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_force_never_replaces_a_users_file(stage, data, tmp_path, capsys):
    user = tmp_path / "notes.txt"
    user.write_bytes(b"a user's file")
    code, err = run(capsys, *train_argv(stage, data, user), "--force")
    assert code == 2 and "not a checkpoint written by genselfdiff" in one_line(err)
    assert user.read_bytes() == b"a user's file"


@pytest.mark.parametrize("flags", [["--force"], ["--resume"]])
def test_a_checkpoint_holding_a_users_file_is_never_replaced(flags, data, tmp_path, capsys):
    out = tmp_path / "ck"
    assert run(capsys, *train_argv("finetune", data, out))[0] == 0
    (out / "my_notes.txt").write_bytes(b"notes on this model")
    before = snapshot(out)
    code, err = run(capsys, *train_argv("finetune", data, out), *flags)
    assert code == 2
    line = one_line(err)
    assert str(out) in line and "my_notes.txt" in line
    assert snapshot(out) == before


def test_force_replaces_our_own_checkpoint_and_resume_continues_it(data, tmp_path, capsys):
    out = tmp_path / "ck"
    assert run(capsys, *train_argv("finetune", data, out))[0] == 0
    first = snapshot(out)
    code, err = run(capsys, *train_argv("finetune", data, out))  # neither flag: refused, untouched
    assert code == 2 and "--resume" in one_line(err) and "--force" in one_line(err)
    assert snapshot(out) == first
    assert run(capsys, *train_argv("finetune", data, out), "--force", "--seed", "3")[0] == 0
    assert ck.load_config(out)["training"]["seed"] == 3
    assert ck.is_our_checkpoint(out)
    assert run(capsys, *train_argv("finetune", data, out, steps=2), "--resume", "--seed", "3")[0] == 0
    assert ck.load_config(out)["training"]["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "data"]


def test_is_our_checkpoint(tmp_path):
    m = _tiny_model()
    ours = ck.save_checkpoint(tmp_path / "ours", m, {"kind": "segmentation", "model": m.config.to_dict()},
                              {"step": 1})
    assert ck.is_our_checkpoint(ours)
    (ours / ck.MODEL_CARD).write_text("# card")  # the bundled models carry one
    assert ck.is_our_checkpoint(ours)
    no_kind = ck.save_checkpoint(tmp_path / "no_kind", m, {"model": m.config.to_dict()})
    assert not ck.is_our_checkpoint(no_kind)
    extra = ck.save_checkpoint(tmp_path / "extra", m, {"kind": "pretrain", "model": m.config.to_dict()})
    (extra / "sub").mkdir()
    assert not ck.is_our_checkpoint(extra) and ck.foreign_files(extra) == ["sub"]
    linked = ck.save_checkpoint(tmp_path / "linked", m, {"kind": "pretrain", "model": m.config.to_dict()})
    (linked / "training_state.json").symlink_to(tmp_path / "elsewhere.json")
    assert not ck.is_our_checkpoint(linked)
    (tmp_path / "link").symlink_to(ours)
    assert not ck.is_our_checkpoint(tmp_path / "link")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / ck.MODEL_FILE).write_bytes(b"x")
    (bad_json / ck.CONFIG_FILE).write_text("{not json")
    assert not ck.is_our_checkpoint(bad_json)
    assert not ck.is_our_checkpoint(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# 2. leftovers of killed saves, and the swap

def test_save_removes_a_stale_temp_from_a_killed_save_and_keeps_a_fresh_one(tmp_path):
    m = _tiny_model()
    cfg = {"kind": "segmentation", "model": m.config.to_dict()}
    ck.save_checkpoint(tmp_path / "c", m, cfg)
    killed = tmp_path / ".c.k1ll3d00.tmp"  # what a kill during a save leaves
    killed.mkdir()
    (killed / ck.MODEL_FILE).write_bytes(b"half the weights")
    age(killed)
    fresh = tmp_path / ".c.fresh123.tmp"  # another process saving right now
    fresh.mkdir()
    (fresh / ck.MODEL_FILE).write_bytes(b"being written")
    ck.save_checkpoint(tmp_path / "c", m, {**cfg, "v": 2})
    assert not killed.exists()
    assert (fresh / ck.MODEL_FILE).read_bytes() == b"being written"
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name, "c"]
    assert ck.load_config(tmp_path / "c")["v"] == 2


def test_save_never_touches_a_users_folder_named_like_the_old_copy(tmp_path):
    """Saves used to rmtree ``NAME.old`` before swapping: a user's folder of that name is kept."""
    m = _tiny_model()
    cfg = {"kind": "segmentation", "model": m.config.to_dict()}
    user = tmp_path / "c.old"
    user.mkdir()
    (user / "backup.txt").write_bytes(b"my backup")
    ck.save_checkpoint(tmp_path / "c", m, cfg)
    ck.save_checkpoint(tmp_path / "c", m, {**cfg, "v": 2})
    assert snapshot(user) == {"backup.txt": b"my backup"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "c.old"]  # the hidden old copy is gone


def test_the_old_copy_is_hidden_while_swapping(tmp_path, monkeypatch):
    """During the swap the previous checkpoint sits at ``.c.<random>.old``; a crash right after
    moving it aside (before the new one is renamed in) leaves it, and loading recovers it."""
    from napari_genselfdiff.core import atomic

    m = _tiny_model()
    cfg = {"kind": "segmentation", "model": m.config.to_dict()}
    ck.save_checkpoint(tmp_path / "c", m, {**cfg, "v": 1})
    real_rename = os.rename

    class Killed(BaseException):
        pass

    def rename(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(".old"):
            raise Killed  # the process dies here: no handler of ours would run
    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(Killed):
        ck.save_checkpoint(tmp_path / "c", m, {**cfg, "v": 2})
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    left = sorted(p.name for p in tmp_path.iterdir())  # a kill leaves the new one's temporary too
    assert "c" not in left and all(atomic.temp_name_pattern("c").fullmatch(n) for n in left)
    assert sorted(n.rsplit(".", 1)[1] for n in left) == ["old", "tmp"]
    assert ck.load_config(tmp_path / "c")["v"] == 1  # recovered
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["c", *(n for n in left if n.endswith(".tmp"))])


def test_an_interrupted_swap_is_recovered_from_the_hidden_copy_and_resumed(data, tmp_path, capsys):
    out = tmp_path / "ck"
    assert run(capsys, *train_argv("finetune", data, out))[0] == 0
    first = snapshot(out)
    hidden = tmp_path / ".ck.ab12cd34.old"
    out.rename(hidden)  # a kill between the two renames of a save
    age(hidden)
    assert ck.resolve(out) == out and snapshot(out) == first and not hidden.exists()
    out.rename(hidden)
    assert run(capsys, *train_argv("finetune", data, out, steps=2), "--resume")[0] == 0  # recovered first
    assert ck.load_config(out)["training"]["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "data"]


def test_resolve_recovers_only_a_checkpoint_and_never_while_the_target_exists(tmp_path):
    m = _tiny_model()
    not_ckpt = tmp_path / ".c.zzzzzzzz.old"
    not_ckpt.mkdir()
    (not_ckpt / "thing").write_bytes(b"not a checkpoint")
    assert ck.resolve(tmp_path / "c") == tmp_path / "c" and not (tmp_path / "c").exists()
    assert (not_ckpt / "thing").read_bytes() == b"not a checkpoint"
    ck.save_checkpoint(tmp_path / "c", m, {"kind": "pretrain", "model": m.config.to_dict(), "v": 1})
    older = tmp_path / ".c.aaaaaaaa.old"
    ck.save_checkpoint(older, m, {"kind": "pretrain", "model": m.config.to_dict(), "v": 0})
    ck.resolve(tmp_path / "c")
    assert ck.load_config(tmp_path / "c")["v"] == 1 and older.is_dir()


# ---------------------------------------------------------------------------------------------
# 3. sample --out, evaluate --json

@pytest.fixture
def pre_model(tmp_path) -> Path:
    m = UNet(UNetConfig.from_preset("tiny", in_channels=3, out_channels=3))
    return ck.save_checkpoint(tmp_path / "pre", m, {"kind": "pretrain", "model": m.config.to_dict()})


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_sample_never_overwrites_a_users_file(pre_model, tmp_path, capsys, force):
    user = tmp_path / "holiday.png"
    imwrite(user, np.zeros((8, 8, 3), np.uint8))
    before = user.read_bytes()
    code, err = run(capsys, "sample", "--model", pre_model, "--out", user, "--n", "1", "--device", "cpu", *force)
    assert code == 2
    line = one_line(err)
    assert str(user) in line and ("--force" in line if not force else "never replaced" in line)
    assert user.read_bytes() == before


def test_sample_replaces_only_its_own_png_and_never_writes_into_the_model(pre_model, tmp_path, capsys,
                                                                         monkeypatch):
    from napari_genselfdiff.core.pretext import sampling

    monkeypatch.setattr(sampling, "generate_tiles", lambda *a, **k: np.full((1, 8, 8, 3), 7, np.uint8))
    grid = tmp_path / "grid.png"
    write_png_atomic(grid, np.zeros((4, 4, 3), np.uint8))
    assert is_our_png(grid)
    argv = ["sample", "--model", pre_model, "--n", "1", "--device", "cpu", "--out"]
    code, err = run(capsys, *argv, grid)
    assert code == 2 and "--force" in one_line(err)
    assert run(capsys, *argv, grid, "--force")[0] == 0
    from imageio.v3 import imread
    assert imread(grid).shape[:2] != (4, 4) and is_our_png(grid)
    before = snapshot(pre_model)
    code, err = run(capsys, *argv, pre_model / "grid.png")
    assert code == 2 and "input" in one_line(err)
    assert snapshot(pre_model) == before


@pytest.fixture
def fake_evaluation(monkeypatch):
    from napari_genselfdiff.core.eval import evaluation

    calls = []

    def evaluate_folder(*a, **k):
        calls.append(a)
        return {"mean": {"dice": 0.5}, "n": 1}
    monkeypatch.setattr(evaluation, "evaluate_folder", evaluate_folder)
    monkeypatch.setattr(evaluation, "format_report", lambda result: "dice 0.5")
    return calls


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_evaluate_json_never_overwrites_a_users_file(fake_evaluation, pre_model, data, tmp_path, capsys, force):
    images, masks = data
    user = tmp_path / "results.json"
    user.write_text('{"my": "own results"}')
    before = user.read_bytes()
    code, err = run(capsys, "evaluate", "--model", pre_model, "--images", images, "--masks", masks,
                    "--json", user, *force)
    assert code == 2
    line = one_line(err)
    assert str(user) in line and ("--force" in line if not force else "never replaced" in line)
    assert user.read_bytes() == before
    assert fake_evaluation == []  # refused before any work


def test_evaluate_json_is_marked_and_force_replaces_it(fake_evaluation, pre_model, data, tmp_path, capsys):
    images, masks = data
    out = tmp_path / "m.json"
    argv = ["evaluate", "--model", pre_model, "--images", images, "--masks", masks, "--json", out]
    assert run(capsys, *argv)[0] == 0
    assert is_our_json(out, "evaluation") and json.loads(out.read_text())["mean"] == {"dice": 0.5}
    assert not is_our_json(out, "something-else")
    code, err = run(capsys, *argv)
    assert code == 2 and "--force" in one_line(err)
    out.write_text(out.read_text().replace("0.5", "0.25"))
    assert run(capsys, *argv, "--force")[0] == 0
    assert json.loads(out.read_text())["mean"] == {"dice": 0.5}


# ---------------------------------------------------------------------------------------------
# 4. a bad starting model for finetune(...) (the napari widget's path too)

def _items() -> list[LabeledImage]:
    rng = np.random.default_rng(0)
    target = np.zeros((32, 32), np.uint8)
    target[4:20, 4:20] = 1
    return [LabeledImage("a", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), target.astype(np.uint8))]


def _finetune(init, out):
    cfg = FinetuneConfig(preset="tiny", steps=1, patch=32, batch=1, amp=False)
    return drain(finetune(_items(), out, cfg, init=init, device="cpu"))


@pytest.mark.parametrize("kind", ["segmentation", "pretrain"])
def test_init_whose_weights_do_not_fit_its_architecture_is_one_checkpoint_error(kind, tmp_path):
    m = _tiny_model(out_channels=2 if kind == "segmentation" else 3)
    other = UNetConfig.from_preset("tiny", out_channels=m.config.out_channels)
    other = UNetConfig.from_dict({**other.to_dict(), "base": other.base * 2})
    cfg = {"kind": kind, "model": other.to_dict(),
           "task": {"task": "glands", "num_classes": 2, "class_names": ["background", "gland"]}}
    init = ck.save_checkpoint(tmp_path / "init", m, cfg)
    with pytest.raises(CheckpointError) as info:
        _finetune(init, tmp_path / "out")
    assert str(init) in str(info.value) and "\n" not in str(info.value)
    assert "do not match" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_segmentation_init_without_its_task_is_one_checkpoint_error(tmp_path):
    m = _tiny_model()
    init = ck.save_checkpoint(tmp_path / "init", m, {"kind": "segmentation", "model": m.config.to_dict()})
    with pytest.raises(CheckpointError, match="task"):
        _finetune(init, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_good_segmentation_init_still_loads_all_its_weights(tmp_path):
    m = _tiny_model(seed=5)
    cfg = {"kind": "segmentation", "model": m.config.to_dict(),
           "task": {"task": "glands", "num_classes": 2, "class_names": ["background", "gland"]}}
    init = ck.save_checkpoint(tmp_path / "init", m, cfg)
    from napari_genselfdiff.core.data import TaskSpec
    from napari_genselfdiff.core.train.training import build_segmentation_model

    model, info, how = build_segmentation_model(TaskSpec.make("glands"), init, "tiny", seed=0)
    assert how.startswith("all weights") and info["init_kind"] == "segmentation"
    for (k, a), (_, b) in zip(m.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------------------------
# issue 36 (1, 6): an output never replaces an input, never lands inside one, never replaces a bundled model

@pytest.mark.parametrize("flags", [["--force"], ["--resume"], ["--force", "via-link"]])
def test_finetune_never_replaces_the_checkpoint_it_starts_from(flags, data, tmp_path, capsys):
    init = tmp_path / "start"
    assert run(capsys, *train_argv("finetune", data, init))[0] == 0
    before = snapshot(init)
    out = init
    if "via-link" in flags:
        out = tmp_path / "link"
        out.symlink_to(init, target_is_directory=True)
        flags = [f for f in flags if f != "via-link"]
    images, masks = data
    code, err = run(capsys, "finetune", "--images", images, "--masks", masks, "--init", init, "--out", out,
                    "--steps", 1, *TINY, *flags)
    assert code == 2 and "is (or holds, or lies inside) the input" in one_line(err)
    assert snapshot(init) == before


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_training_output_inside_its_images_is_refused(stage, data, tmp_path, capsys):
    images, masks = data
    before = snapshot(images.parent)
    code, err = run(capsys, *train_argv(stage, data, images / "model"))
    assert code == 2 and "is (or holds, or lies inside) the input" in one_line(err)
    assert snapshot(images.parent) == before and not (images / "model").exists()


def test_training_never_writes_into_the_bundled_models(data, tmp_path, capsys, monkeypatch):
    import shutil

    # a copy stands in for the installed models: were the rule broken, the copy is what is lost
    shutil.copytree(ck.bundled_models_dir(), tmp_path / "resources" / "models")
    monkeypatch.setattr(ck, "bundled_models_dir", lambda: tmp_path / "resources" / "models")
    models = tmp_path / "resources" / "models"
    before = sorted(p.name for p in models.iterdir())
    for out in (models / "glands", models / "new"):
        code, err = run(capsys, *train_argv("finetune", data, out), "--force")
        assert code == 2 and "is (or holds, or lies inside) the input" in one_line(err)
    assert sorted(p.name for p in models.iterdir()) == before


@pytest.mark.parametrize("command", ["predict", "evaluate", "sample", "finetune --init"])
def test_every_reader_of_a_model_recovers_a_save_killed_mid_swap(command, data, tmp_path, capsys):
    """README: loading renames the moved-aside copy back; predict / evaluate / sample /
    finetune --init all load through it (issue 36, 5)."""
    images, masks = data
    model = tmp_path / "ck"
    stage = "pretrain" if command == "sample" else "finetune"
    assert run(capsys, *train_argv(stage, data, model))[0] == 0
    first = snapshot(model)
    model.rename(tmp_path / ".ck.ab12cd34.old")  # a kill between the two renames of a save
    argv = {"predict": ["predict", "--model", model, "--input", images / "t0.png", "--out", tmp_path / "p.zarr",
                        "--device", "cpu"],
            "evaluate": ["evaluate", "--model", model, "--images", images, "--masks", masks, "--device", "cpu"],
            "sample": ["sample", "--model", model, "--n", 1, "--steps", 2, "--out", tmp_path / "s.png",
                       "--device", "cpu"],
            "finetune --init": ["finetune", "--images", images, "--masks", masks, "--init", model,
                                "--out", tmp_path / "next", "--steps", 1, *TINY]}[command]
    code, err = run(capsys, *argv)
    assert code == 0, err
    assert snapshot(model) == first and not (tmp_path / ".ck.ab12cd34.old").exists()


def test_an_empty_model_name_says_so(capsys, tmp_path):
    code, err = run(capsys, "evaluate", "--model", "", "--images", tmp_path, "--masks", tmp_path)
    assert code == 2 and "the model is empty" in one_line(err)
