"""Issue 36, round two: flag values and environment the parser used to let through end in one line
and exit code 2 before any work, and training never learns from a loss that weighs nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from napari_genselfdiff.bundled import sample_image_path
from napari_genselfdiff.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def data(tmp_path):
    import numpy as np
    from imageio.v3 import imwrite

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    imwrite(images / "a.png", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    mask = np.zeros((48, 48), np.uint8)
    mask[8:30, 8:30] = 255
    imwrite(masks / "a.png", mask)
    return images, masks


def finetune_argv(data, out, *extra):
    images, masks = data
    return ["finetune", "--images", images, "--masks", masks, "--scratch", "--out", out, "--steps", 1,
            "--preset", "tiny", "--patch", 32, "--batch", 1, "--device", "cpu", *extra]


@pytest.mark.parametrize("extra, flag", [(["--lr", "1e308"], "--lr"), (["--seed", str(2 ** 70)], "--seed"),
                                         (["--mpp", "1e-300"], "--mpp"), (["--mpp", "1e9"], "--mpp"),
                                         (["--loss", "0*focal"], "--loss"), (["--loss", "0*focal+0*ssl"], "--loss"),
                                         (["--loss", "1e400*focal"], "--loss")])
def test_finetune_flags_out_of_bounds_are_one_line(extra, flag, data, tmp_path, capsys):
    code, err = run(capsys, *finetune_argv(data, tmp_path / "m", *extra))
    assert code == 2 and flag in one_line(err)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("extra", [["--n", "100000"], ["--size", "100000"]])
def test_sample_sizes_out_of_bounds_are_one_line(extra, tmp_path, capsys):
    code, err = run(capsys, "sample", "--model", tmp_path, "--out", tmp_path / "g.png", *extra)
    assert code == 2 and extra[0] in one_line(err)


def test_evaluate_mpp_out_of_bounds_is_one_line(data, tmp_path, capsys):
    images, masks = data
    for mpp in ("1e-9", "1e9"):
        code, err = run(capsys, "evaluate", "--model", "glands", "--images", images, "--masks", masks, "--mpp", mpp)
        assert code == 2 and "--mpp" in one_line(err)


def test_a_level_the_slide_lacks_is_one_line(tmp_path, capsys):
    code, err = run(capsys, "predict", "--model", "nuclei", "--input", sample_image_path(), "--out",
                    tmp_path / "p.zarr", "--level", "99", "--device", "cpu")
    assert code == 2 and "level 99 does not exist" in one_line(err)
    assert not (tmp_path / "p.zarr").exists()


@pytest.mark.parametrize("value", ["100000", "0", "-3", "many"])
def test_a_thread_count_the_machine_cannot_take_is_one_line(value, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GENSELFDIFF_THREADS", value)
    code, err = run(capsys, *finetune_argv(data, tmp_path / "m"))
    assert code == 2 and "GENSELFDIFF_THREADS" in one_line(err)
    assert not (tmp_path / "m").exists()


def test_a_zero_weighted_loss_is_refused_by_the_core_too():
    from napari_genselfdiff.core.train.losses import build_loss

    with pytest.raises(ValueError, match="weighs every term 0"):
        build_loss("0*focal+0.0*dice")
    assert build_loss("0*focal+ssl") is not None  # one live term is enough


def test_predict_out_inside_the_model_folder_is_refused(tmp_path, capsys):
    import shutil

    from napari_genselfdiff.bundled import bundled_models

    model = tmp_path / "model"
    shutil.copytree(bundled_models()["nuclei"], model)
    before = sorted(p.name for p in model.iterdir())
    code, err = run(capsys, "predict", "--model", model, "--input", sample_image_path(), "--out",
                    model / "pred.zarr", "--device", "cpu")
    assert code == 2 and "is (or holds, or lies inside) the input" in one_line(err)
    assert sorted(p.name for p in model.iterdir()) == before


def _edited_model(tmp_path, edit) -> "Path":
    import shutil

    from napari_genselfdiff.bundled import bundled_models

    model = tmp_path / "edited"
    shutil.copytree(bundled_models()["nuclei"], model)
    cfg_file = model / "config.json"
    cfg = json.loads(cfg_file.read_text())
    text = edit(cfg)
    cfg_file.write_text(text if isinstance(text, str) else json.dumps(cfg))
    return model


@pytest.mark.parametrize("edit, words", [
    (lambda c: c["model"].update(base=100000), "do not match the architecture"),
    (lambda c: c["model"].update(base=-4), "no valid architecture"),
    (lambda c: c["model"].update(mults=[1, 2]), "do not match the architecture"),
    (lambda c: c.update(format_version="1"), "format_version"),
    (lambda c: c.update(model=[1, 2]), "lacks the model architecture"),
    (lambda c: '{"model": ' * 100000 + "1" + "}" * 100000, "nested too deeply"),
])
def test_an_edited_config_is_one_line_before_anything_is_built(edit, words, tmp_path, capsys):
    import resource
    import time

    model = _edited_model(tmp_path, edit)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    code, err = run(capsys, "evaluate", "--model", model, "--images", tmp_path, "--masks", tmp_path)
    assert code == 2 and words in one_line(err)
    assert time.perf_counter() - t0 < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2_000_000  # KB: nothing huge allocated


def test_a_mask_holding_negative_labels_is_one_line_not_an_empty_mask(tmp_path, capsys):
    import numpy as np
    import tifffile
    from imageio.v3 import imwrite

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    imwrite(images / "a.png", np.full((48, 48, 3), 128, np.uint8))
    mask = np.zeros((48, 48), np.int16)
    mask[8:30, 8:30] = -1
    tifffile.imwrite(masks / "a.tif", mask)
    code, err = run(capsys, "finetune", "--images", images, "--masks", masks, "--scratch", "--out", tmp_path / "m",
                    "--steps", 1, "--preset", "tiny", "--patch", 32, "--batch", 1, "--device", "cpu")
    assert code == 2 and "negative labels" in one_line(err) and "a.tif" in one_line(err)


def test_a_config_with_an_impossible_pixel_size_is_one_line(tmp_path, capsys):
    for mpp in (-0.5, 1e-300, "0.5"):
        model = _edited_model(tmp_path / str(mpp), lambda c: c.update(mpp=mpp))
        code, err = run(capsys, "evaluate", "--model", model, "--images", tmp_path, "--masks", tmp_path)
        assert code == 2 and "mpp" in one_line(err), (mpp, err)


@pytest.mark.parametrize("key, value, words", [
    ("halo", [168], "halo [168] is not a tile overlap"), ("halo", "nan", "halo 'nan'"), ("halo", -5, "halo -5"),
    ("halo", 10 ** 9, "halo 1000000000"), ("halo", True, "halo True"),
    ("postprocess", [1, 2], "postprocess settings are invalid"),
    ("postprocess", {"threshold": 5}, "threshold 5 is not a number from 0.0 to 1.0"),
    ("postprocess", {"min_size": -1}, "min_size -1 is not a whole number"),
    ("postprocess", {"min_size": 2.5}, "min_size 2.5 is not a whole number"),
])
def test_a_config_whose_overlap_or_object_rules_were_edited_is_one_line(key, value, words, tmp_path, capsys):
    model = _edited_model(tmp_path, lambda c: c.update({key: value}))
    for argv in (["evaluate", "--model", model, "--images", tmp_path, "--masks", tmp_path],
                 ["predict", "--model", model, "--input", sample_image_path(), "--out", tmp_path / "p.zarr"]):
        code, err = run(capsys, *argv)
        line = one_line(err)
        assert code == 2 and "config.json" in line and words in line, line
    assert not (tmp_path / "p.zarr").exists()


def test_a_glands_configs_fill_holes_must_be_true_or_false(tmp_path, capsys):
    import shutil

    from napari_genselfdiff.bundled import bundled_models

    model = tmp_path / "edited"
    shutil.copytree(bundled_models()["glands"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["postprocess"]["fill_holes"] = "no"  # bool("no") would be True
    (model / "config.json").write_text(json.dumps(cfg))
    code, err = run(capsys, "evaluate", "--model", model, "--images", tmp_path, "--masks", tmp_path)
    assert code == 2 and "fill_holes 'no' is not true or false" in one_line(err)


def test_a_plain_folder_as_input_or_like_says_it_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "some folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    code, err = run(capsys, "predict", "--model", "nuclei", "--input", folder, "--out", tmp_path / "p.zarr",
                    "--device", "cpu")
    assert code == 2 and "is a folder, not an image or slide" in one_line(err)
    code, err = run(capsys, "import", "--geojson", folder / "notes.txt", "--like", folder, "--out", tmp_path / "l.tif")
    assert code == 2 and "is a folder, not an image or slide" in one_line(err)


def test_import_refuses_a_label_image_no_slide_has(tmp_path, capsys):
    gj = tmp_path / "a.geojson"
    gj.write_text('{"type": "FeatureCollection", "features": []}')
    code, err = run(capsys, "import", "--geojson", gj, "--shape", "1000000", "1000000", "--out", tmp_path / "l.tif")
    assert code == 2 and "--shape" in one_line(err) and "262144" in one_line(err)
    assert not (tmp_path / "l.tif").exists()


@pytest.mark.parametrize("extra, flag", [(["--batch", "1000000000"], "--batch"), (["--patch", "100000"], "--patch"),
                                         (["--num-classes", "100000", "--task", "multiclass"], "--num-classes")])
def test_training_sizes_that_cannot_fit_are_refused_before_starting(extra, flag, data, tmp_path, capsys):
    argv = finetune_argv(data, tmp_path / "m")
    for f in ("--batch", "--patch"):  # the test's own small values give way to the ones under test
        if f in extra:
            i = argv.index(f)
            del argv[i:i + 2]
    code, err = run(capsys, *argv, *extra)
    assert code == 2 and flag in one_line(err)
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A prediction store of the bundled nuclei model on the bundled sample."""
    out = tmp_path_factory.mktemp("store") / "pred.zarr"
    assert main(["predict", "--model", "nuclei", "--input", str(sample_image_path()), "--out", str(out),
                 "--device", "cpu"]) == 0
    return out


@pytest.mark.parametrize("damage", ["labels/nuclei/0/c/0/0", "done/c/0/0", "labels/nuclei/0/zarr.json"])
def test_export_of_a_damaged_store_is_one_line_naming_it(damage, store, tmp_path, capsys):
    import hashlib
    import shutil

    copy = tmp_path / "p.zarr"
    shutil.copytree(store, copy)
    part = copy / damage
    part.write_bytes(b'{"zarr_format": 3, "node_type": "array", "shape": "x"}' if damage.endswith(".json")
                     else bytes(range(100)))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.rglob("*") if p.is_file()}
    for flag, target in (("--geojson", tmp_path / "o.geojson"), ("--tiff", tmp_path / "o.tif")):
        code, err = run(capsys, "export", "--labels", copy, flag, target)
        line = one_line(err)
        assert code == 2 and str(copy) in line and "damaged or edited zarr store" in line
        assert not target.exists()
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.rglob("*") if p.is_file()}


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_old_one(data, tmp_path, capsys,
                                                                                  monkeypatch):
    import hashlib

    from safetensors import SafetensorError

    from napari_genselfdiff.core import checkpoint as ck

    out = tmp_path / "m"
    assert run(capsys, *finetune_argv(data, out))[0] == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}

    def full(tensors, filename, *a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" }) (os error 28)")

    monkeypatch.setattr(ck, "save_file", full)
    code, err = run(capsys, *finetune_argv(data, out, "--resume", "--steps", 2))
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after the run's own "fine-tuning ... resumed" line
    assert code == 2 and line.startswith("genselfdiff finetune: error:") and "no space left" in line and str(out) in line
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}


@pytest.mark.parametrize("edit", ["list", "step_string", "step_negative", "optimizer_missing", "param_ids",
                                  "groups_not_lists", "group_size", "moment_shape", "truncated", "tensor_name",
                                  "tensor_number", "param_step"])
def test_an_edited_training_state_is_one_line_on_resume(edit, data, tmp_path, capsys):
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    out = tmp_path / "m"
    assert run(capsys, *finetune_argv(data, out))[0] == 0
    state_json, state_tensors = out / "training_state.json", out / "training_state.safetensors"
    state = json.loads(state_json.read_text())
    if edit == "list":
        state = [state]
    elif edit == "step_string":
        state["step"] = "1"
    elif edit == "step_negative":
        state["step"] = -5
    elif edit == "optimizer_missing":
        del state["optimizer"]
    elif edit == "param_ids":
        state["optimizer"]["state"] = {"x": {}}
    elif edit == "groups_not_lists":
        state["optimizer"]["param_groups"][0]["params"] = 3
    elif edit == "group_size":
        state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:3]
    elif edit == "moment_shape":
        tensors = load_file(str(state_tensors))
        name = next(k for k in tensors if k.endswith("exp_avg") and tensors[k].dim() == 4)
        tensors[name] = tensors[name][:1]
        save_file(tensors, str(state_tensors))
    elif edit == "param_step":  # one parameter's step count: torch's own message named a generator object
        next(iter(state["optimizer"]["state"].values()))["step"] = "x"
    elif edit in ("tensor_name", "tensor_number"):  # a reference to a tensor the .safetensors does not hold
        moments = next(v for v in state["optimizer"]["state"].values() if "exp_avg" in v)
        moments["exp_avg"] = {"__tensor__": "nope" if edit == "tensor_name" else 5}
    if edit == "truncated":
        state_json.write_text(json.dumps(state)[:40])
    else:
        state_json.write_text(json.dumps(state))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    code, err = run(capsys, *finetune_argv(data, out, "--resume", "--steps", 2))
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("genselfdiff finetune: error:"), err
    assert "training state" in line or "training_state.json" in line
    assert "object at 0x" not in line
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}


# ---------------------------------------------------------------------------------------------
# project files someone edited: one line naming the file, exit 2, nothing changed

@pytest.fixture
def project(tmp_path):
    import numpy as np

    from napari_genselfdiff.project import Project

    p = Project.create(tmp_path / "proj", task="glands")
    sid = p.add_slide(sample_image_path(), shape=(768, 1024), mpp=0.5)
    labels = np.zeros((32, 32), np.uint8)
    labels[4:20, 4:20] = 1
    p.accept_region(sid, np.full((32, 32, 3), 200, np.uint8), labels, (0, 0, 32, 32))
    return p


def _hashes(folder: Path) -> dict:
    import hashlib
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("version", ['"1"', "1.5", "[1]", "null", "true", "0", "1e400"])
def test_a_project_file_whose_format_version_is_not_a_whole_number(project, capsys, version):
    path = project.folder / "project.json"
    path.write_text(path.read_text().replace('"format_version": 1', f'"format_version": {version}'))
    before = _hashes(project.folder)
    code, err = run(capsys, "project", "status", project.folder)
    assert code == 2 and "project.json: 'format_version' must be a whole number" in one_line(err)
    assert _hashes(project.folder) == before


@pytest.mark.parametrize("where", ["project.json", "regions/manifest.jsonl"])
def test_deeply_nested_project_files_are_one_line(project, capsys, where):
    path = project.folder / where
    text = path.read_text().rstrip("\n")
    deep = "[" * 100_000 + "]" * 100_000
    path.write_text(text[:-1] + f', "extra": {deep}}}\n')
    code, err = run(capsys, "project", "status", project.folder)
    line = one_line(err)
    assert code == 2 and where.split("/")[-1] in line and "nested too deeply" in line


def test_a_region_mask_whose_size_differs_from_its_image(project, capsys):
    import numpy as np
    from imageio.v3 import imwrite

    mask = next((project.folder / "regions").glob("r*/mask.png"))
    other = np.zeros((20, 24), np.uint8)
    other[2:10, 2:10] = 1
    imwrite(mask, other)
    before = _hashes(project.folder)
    code, err = run(capsys, "project", "refine", project.folder, "--steps", "1")
    line = one_line(err)
    assert code == 2 and "mask.png" in line and "20x24" in line and "32x32" in line
    after = _hashes(project.folder)  # every file as it was; the only new one is the writer lock
    assert before.items() <= after.items() and {p.name for p in after.keys() - before.keys()} <= {
        ".genselfdiff-writer.lock"}


# ---------------------------------------------------------------------------------------------
# a large plain image is the user's own file, not an attack: memory decides, not Pillow's pixel count

def test_an_image_above_pillows_bomb_limit_is_read_when_it_fits(tmp_path, monkeypatch):
    import numpy as np
    from imageio.v3 import imwrite
    from PIL import Image

    from napari_genselfdiff.core.data import read_image
    from napari_genselfdiff.slide.reader import open_slide

    image = np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)
    imwrite(tmp_path / "big.png", image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 7,680 px: over twice the limit, a "bomb"
    assert np.array_equal(read_image(tmp_path / "big.png"), image)
    with open_slide(tmp_path / "big.png") as slide:
        assert np.array_equal(np.asarray(slide.levels[0]), image)
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's own setting is left as it was


def test_an_image_that_cannot_fit_in_memory_is_one_line_before_decoding(tmp_path, capsys, monkeypatch):
    import numpy as np
    from imageio.v3 import imwrite

    from napari_genselfdiff.core import imagefile

    imwrite(tmp_path / "big.png", np.zeros((96, 80, 3), np.uint8))
    monkeypatch.setattr(imagefile, "available_memory", lambda: 10_000)

    def never(*args, **kwargs):
        raise AssertionError("decoded although it cannot fit")

    import imageio.v3
    monkeypatch.setattr(imageio.v3, "imread", never)
    code, err = run(capsys, "predict", "--input", tmp_path / "big.png", "--model", "glands", "--out",
                    tmp_path / "out.zarr")
    line = one_line(err)
    assert code == 2 and "big.png: 80x96 px" in line and "GiB free" in line and "tiled pyramidal TIFF" in line
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_a_step_whose_activations_cannot_fit_is_refused_before_the_first(command, data, tmp_path, capsys):
    """Each flag within its bounds, together terabytes: measured through the network, refused in
    one line before any step (the kernel's OOM killer would end it with no line)."""
    images, masks = data
    out = tmp_path / "m"
    argv = (["finetune", "--images", images, "--masks", masks, "--scratch"] if command == "finetune"
            else ["pretrain", "--images", images])
    code, err = run(capsys, *argv, "--out", out, "--steps", 1, "--batch", 1024, "--patch", 8192, "--device", "cpu")
    line = one_line(err)
    assert code == 2 and "1024 patch(es) of 8192 px needs about" in line and "GiB free on cpu" in line
    assert not (out / "model.safetensors").exists()


def test_the_step_estimate_follows_the_pixels_and_the_frozen_layers():
    import torch

    from napari_genselfdiff.core.nets.unet import UNetConfig, seeded_model
    from napari_genselfdiff.core.precision import resolve_precision
    from napari_genselfdiff.core.train.memory import step_bytes_per_pixel
    from napari_genselfdiff.core.train.segmenter import freeze_backbone

    cpu = torch.device("cpu")
    model = seeded_model(UNetConfig.from_preset("backbone", in_channels=3, out_channels=2), 0).train()
    whole = step_bytes_per_pixel(model, cpu, resolve_precision("fp32", cpu), False)
    # at least the stem's float32 output (16 channels) per pixel, and not wildly more than a network's worth
    assert 16 * 4 < whole < 100_000
    freeze_backbone(model)
    head = step_bytes_per_pixel(model, cpu, resolve_precision("fp32", cpu), False)
    assert 0 < head < whole / 2  # frozen layers keep nothing for a backward pass


@pytest.mark.parametrize("argv, flag", [
    (["predict", "--model", "glands", "--input", "x.png", "--out", ""], "--out"),
    (["predict", "--model", "glands", "--input", " ", "--out", "p.zarr"], "--input"),
    (["import", "--geojson", "a.geojson", "--like", "", "--out", "l.tif"], "--like"),
    (["project", "status", ""], "folder"),
])
def test_an_empty_path_is_said_to_be_empty(argv, flag, tmp_path, capsys, monkeypatch):
    """'--out ""' (an unset shell variable) used to mean the current folder ('.: is a folder'), or
    a traceback for --like."""
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, *argv)
    assert code == 2 and f"argument {flag}: is empty" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_an_overlay_or_geojson_inside_the_model_folder_is_refused(tmp_path, capsys):
    import shutil

    from napari_genselfdiff.bundled import bundled_models

    model = tmp_path / "model"
    shutil.copytree(bundled_models()["glands"], model)
    before = sorted(p.name for p in model.iterdir())
    for flag in ("--overlay", "--geojson"):
        code, err = run(capsys, "predict", "--model", model, "--input", sample_image_path(), "--out",
                        tmp_path / "p.zarr", flag, model / ("o.png" if flag == "--overlay" else "o.geojson"))
        assert code == 2 and "an input is never overwritten" in one_line(err)
    assert sorted(p.name for p in model.iterdir()) == before and not (tmp_path / "p.zarr").exists()


@pytest.mark.parametrize("schedule, words", [([1], "schedule is not an object but a list"),
                                             ({"timesteps": -1}, "schedule timesteps -1"),
                                             ({"kind": "wavy"}, "schedule kind 'wavy'"),
                                             ({"beta_end": "0.02"}, "schedule beta_end '0.02'")])
def test_a_pretraining_whose_schedule_was_edited_is_one_line(schedule, words, data, tmp_path, capsys):
    images, _ = data
    out = tmp_path / "p"
    common = ["--images", images, "--out", out, "--preset", "tiny", "--patch", 32, "--batch", 1, "--device", "cpu"]
    assert run(capsys, "pretrain", *common, "--steps", 1)[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["schedule"] = schedule if isinstance(schedule, list) else {**cfg["schedule"], **schedule}
    (out / "config.json").write_text(json.dumps(cfg))
    for argv in (["sample", "--model", out, "--out", tmp_path / "s.png", "--n", 1, "--size", 32, "--steps", 2],
                 ["pretrain", *common, "--steps", 2, "--resume"]):
        code, err = run(capsys, *argv)
        line = one_line(err)
        assert code == 2 and "config.json" in line and words in line, err


def test_a_pretraining_whose_pretext_name_was_edited_is_one_line(data, tmp_path, capsys):
    images, _ = data
    out = tmp_path / "p"
    assert run(capsys, "pretrain", "--images", images, "--out", out, "--preset", "tiny", "--patch", 32, "--batch", 1,
               "--device", "cpu", "--steps", 1)[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["pretext"] = [1]
    (out / "config.json").write_text(json.dumps(cfg))
    code, err = run(capsys, "sample", "--model", out, "--out", tmp_path / "s.png", "--n", 1, "--size", 32)
    assert code == 2 and "config.json's pretext [1] is not a pretext's name" in one_line(err)


def test_the_step_check_leaves_no_trace_in_the_model():
    import torch

    from napari_genselfdiff.core.nets.unet import UNetConfig, seeded_model
    from napari_genselfdiff.core.precision import resolve_precision
    from napari_genselfdiff.core.train.memory import check_step_fits

    cpu = torch.device("cpu")
    model = seeded_model(UNetConfig.from_preset("tiny", in_channels=3, out_channels=2, norm="batch"), 0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_step_fits(model, cpu, resolve_precision("fp32", cpu), 2, 64)
    assert not model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm's running statistics too


def test_resume_with_nothing_saved_says_it_starts_a_new_run(data, tmp_path, capsys):
    """``--resume`` on an empty --out starts from step 0 (a script that resumes in a loop works from
    its first start) and says so, instead of silently looking like a resumed run."""
    images, _ = data
    out, ft = tmp_path / "p", tmp_path / "ft"
    common = ["--images", images, "--out", out, "--preset", "tiny", "--patch", 32, "--batch", 1, "--device", "cpu"]

    def said(*argv) -> str:
        assert main([str(a) for a in argv]) == 0
        return "".join(capsys.readouterr())

    assert f"nothing saved at {out} yet: a new run" in said("pretrain", *common, "--steps", 1, "--resume")
    assert (out / "config.json").exists()
    text = said("pretrain", *common, "--steps", 2, "--resume")
    assert "resumed at step 1" in text and "a new run" not in text, text
    assert f"nothing saved at {ft} yet: a new run" in said(*finetune_argv(data, ft, "--resume"))
    assert "a new run" not in said(*finetune_argv(data, ft, "--resume", "--steps", 2))


def _low_disk(monkeypatch, free: int) -> None:
    """The disk check sees ``free`` bytes free (the real disk is left alone)."""
    import shutil

    from napari_genselfdiff.core import diskspace

    real = shutil.disk_usage
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def test_a_prediction_its_disk_cannot_hold_is_refused_before_starting(store, tmp_path, capsys, monkeypatch):
    import numpy as np
    import zarr

    from napari_genselfdiff.core.diskspace import tree_bytes
    from napari_genselfdiff.slide.tiler import MIN_STORED_BYTES_PER_PX

    # the estimate is a lower bound: the real store of the bundled sample holds more
    group = zarr.open_group(store, mode="r")
    c, h, w = group["probabilities"].shape
    need = h * w * c * MIN_STORED_BYTES_PER_PX * float(np.asarray(group["tissue"][...]).mean())
    assert tree_bytes(store / "probabilities") > 1.5 * need
    _low_disk(monkeypatch, int(need) - 1)
    out = tmp_path / "new.zarr"
    code, err = run(capsys, "predict", "--model", "nuclei", "--input", sample_image_path(), "--out", out,
                    "--device", "cpu")
    line = one_line(err)
    assert code == 2 and str(out) in line and "needs at least" in line and "free there" in line, line
    assert not out.exists()
    # a finished store asks for nothing more: reopening it works on a full disk
    _low_disk(monkeypatch, 0)
    assert run(capsys, "predict", "--model", "nuclei", "--input", sample_image_path(), "--out", store,
               "--device", "cpu")[0] == 0


@pytest.mark.parametrize("flag, name", [("--tiff", "o.tif"), ("--ome-zarr", "o.ome.zarr")])
def test_an_export_its_disk_cannot_hold_is_refused_before_writing(flag, name, store, tmp_path, capsys, monkeypatch):
    _low_disk(monkeypatch, 100)
    target = tmp_path / name
    code, err = run(capsys, "export", "--labels", store, flag, target)
    line = one_line(err)
    assert code == 2 and str(target) in line and "needs at least" in line, line
    assert not target.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    assert run(capsys, "export", "--labels", store, flag, target)[0] == 0 and target.exists()


def test_free_space_is_read_from_the_nearest_existing_folder(tmp_path):
    import shutil

    from napari_genselfdiff.core.diskspace import free_bytes, size_text

    assert free_bytes(tmp_path / "not" / "yet" / "there.zarr") == shutil.disk_usage(tmp_path).free
    assert [size_text(n) for n in (512, 812e6, 3.44e9, 15.2e9)] == ["512 bytes", "812 MB", "3.4 GB", "15 GB"]
