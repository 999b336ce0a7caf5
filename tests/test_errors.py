"""Issue #11, the error messages: every subcommand turns bad flag values, bad input, damaged
models and OS errors into ONE line on stderr with exit code 2 (Ctrl-C: one "cancelled" line,
exit code 2 as well), and accepts the same things everywhere (bundled model names, 16-bit grayscale).

Nothing here trains more than a few steps of the tiny bundled models on tiny synthetic images;
the sweeps train nothing (the parser refuses before any work)."""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from imageio.v3 import imwrite

from conftest import require_bundled  # noqa: E402
from napari_genselfdiff.bundled import bundled_models
from napari_genselfdiff.cli import describe_os_error, main
from napari_genselfdiff.core.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(code, err, *needles, exit_code=2):
    """Exit code 2 (or ``exit_code``), exactly one line on stderr containing every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == exit_code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _last_line(code, err, *needles, exit_code=2):
    """For a command that ran a while (its progress messages go to stderr too): the exit code,
    no traceback, and the final stderr line holds every needle."""
    assert code == exit_code and "Traceback" not in err, err
    line = [line for line in err.splitlines() if line.strip()][-1]
    for needle in needles:
        assert needle in line, line
    return line


def _folder(root: Path, n=1, size=(64, 64)):
    rng = np.random.default_rng(0)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        imwrite(images / f"t{i}.png", rng.integers(0, 255, size + (3,), dtype=np.uint8))
        mask = np.zeros(size, np.uint8)
        mask[8:30, 8:30] = 255
        imwrite(masks / f"t{i}.png", mask)
    return images, masks


def _model_copy(tmp_path, name="glands") -> Path:
    require_bundled(name)
    dst = tmp_path / f"{name}-copy"
    shutil.copytree(bundled_models()[name], dst)
    return dst


def _edit_config(model: Path, edit) -> None:
    cfg = json.loads((model / "config.json").read_text())
    edit(cfg)
    (model / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------ the sweeps

#: A syntactically complete call of every subcommand; the paths are never reached.
BASE = {
    "pretrain": ["pretrain", "--images", "imgs", "--out", "ckpt"],
    "finetune": ["finetune", "--images", "imgs", "--masks", "masks", "--out", "ckpt", "--scratch"],
    "evaluate": ["evaluate", "--model", "glands", "--images", "imgs", "--masks", "masks"],
    "sample": ["sample", "--model", "pre", "--out", "grid.png"],
    "predict": ["predict", "--model", "glands", "--input", "slide.tif", "--out", "pred.zarr"],
    "export": ["export", "--labels", "pred.zarr"],
    "import": ["import", "--geojson", "objects.geojson", "--shape", "64", "64", "--out", "labels.tif"],
    "project create": ["project", "create", "proj"],
    "project refine": ["project", "refine", "proj"],
    "project status": ["project", "status", "proj"],
    "demo": ["demo"],
}

#: (subcommand, flag, bad value); "{dir}" is an existing folder given where a file is written.
BAD_FLAGS = [
    *[("pretrain", f, v) for f, v in [("--steps", "0"), ("--steps", "abc"), ("--batch", "0"), ("--patch", "-8"),
                                      ("--lr", "nan"), ("--lr", "0"), ("--checkpoint-every", "-1"),
                                      ("--seed", "-1"), ("--device", "gpu"), ("--preset", "huge"),
                                      ("--schedule", "sigmoid")]],
    *[("finetune", f, v) for f, v in [("--steps", "0"), ("--batch", "0"), ("--lr", "inf"), ("--loss", "focl+ssl"),
                                      ("--loss", "2*"), ("--val-fraction", "abc"), ("--val-fraction", "1"),
                                      ("--label-fraction", "0"), ("--label-fraction", "1.5"), ("--val-every", "-1"),
                                      ("--num-classes", "1"), ("--mpp", "0"), ("--task", "cells"),
                                      ("--patch", "x")]],
    *[("evaluate", f, v) for f, v in [("--device", "gpu"), ("--json", "{dir}")]],
    *[("sample", f, v) for f, v in [("--n", "0"), ("--steps", "0"), ("--size", "0"), ("--sampler", "euler"),
                                    ("--seed", "x"), ("--out", "{dir}")]],
    *[("predict", f, v) for f, v in [("--level", "abc"), ("--level", "-1"), ("--tile", "0"), ("--overlap", "-1"),
                                     ("--batch", "0"), ("--device", "tpu"), ("--object-type", "polygon"),
                                     ("--geojson", "{dir}"), ("--overlay", "{dir}")]],
    *[("export", f, v) for f, v in [("--object-type", "x"), ("--tiff", "{dir}"), ("--geojson", "{dir}"),
                                    ("--csv", "{dir}")]],
    *[("import", f, v) for f, v in [("--mpp", "0"), ("--mpp", "nan"), ("--out", "{dir}")]],
    *[("project create", f, v) for f, v in [("--task", "cells")]],
    *[("project refine", f, v) for f, v in [("--steps", "0"), ("--val-fraction", "abc"), ("--val-fraction", "1.5"),
                                            ("--lr", "nan"), ("--batch", "0"), ("--patch", "0"), ("--seed", "x"),
                                            ("--device", "gpu")]],
    *[("demo", f, v) for f, v in [("--device", "gpu")]],
]


@pytest.mark.parametrize("command,flag,value", BAD_FLAGS, ids=[f"{c}{f}={v}" for c, f, v in BAD_FLAGS])
def test_every_subcommand_refuses_a_bad_flag_value_in_one_line(command, flag, value, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear here
    (tmp_path / "a folder").mkdir()
    value = value.replace("{dir}", str(tmp_path / "a folder"))
    code, out, err = _run(capsys, *BASE[command], flag, value)
    line = _one_line(code, err, f"genselfdiff {command}: error:", flag)
    assert value in line or value.lower() in line.lower()
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["a folder"]  # no work was done


@pytest.mark.parametrize("command", list(BASE))
def test_every_subcommand_refuses_an_unknown_flag_and_a_missing_argument(command, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line(*_run(capsys, *BASE[command], "--no-such-flag")[::2], "--no-such-flag")
    required = [a for a in BASE[command] if a.startswith("--")][:1]
    if required:  # drop the first required flag and its value
        argv = list(BASE[command])
        i = argv.index(required[0])
        del argv[i:i + 2]
        _one_line(*_run(capsys, *argv)[::2], "required", required[0])
    assert list(tmp_path.iterdir()) == []


def _missing_input_cases(tmp_path):
    images, masks = _folder(tmp_path / "data")
    nope = tmp_path / "nope"
    (tmp_path / "a file").write_text("x")
    return [
        (["pretrain", "--images", nope, "--out", tmp_path / "o"], "nope"),
        (["finetune", "--images", nope, "--masks", masks, "--out", tmp_path / "o", "--scratch"], "nope"),
        (["finetune", "--images", images, "--masks", masks, "--out", tmp_path / "o", "--init", nope], "nope"),
        (["evaluate", "--model", nope, "--images", images, "--masks", masks], "nope"),
        (["evaluate", "--model", "glands", "--images", images, "--masks", nope, "--device", "cpu"], "nope"),
        (["sample", "--model", nope, "--out", tmp_path / "g.png"], "nope"),
        (["predict", "--model", nope, "--input", images / "t0.png", "--out", tmp_path / "p.zarr"], "nope"),
        (["predict", "--model", "glands", "--input", nope, "--out", tmp_path / "p.zarr", "--device", "cpu"], "nope"),
        (["export", "--labels", nope, "--geojson", tmp_path / "x.geojson"], "nope"),
        (["import", "--geojson", nope, "--shape", "64", "64", "--out", tmp_path / "l.tif"], "nope"),
        (["import", "--geojson", nope, "--like", tmp_path / "nope.png", "--out", tmp_path / "l.tif"], "nope"),
        (["project", "create", tmp_path / "proj", "--slides", nope], "nope"),
        (["project", "create", tmp_path / "proj", "--model", nope], "nope"),
        (["project", "refine", nope], "nope"),
        (["project", "status", nope], "nope"),
        (["demo", "--out", tmp_path / "a file", "--device", "cpu"], "a file"),
    ]


def test_every_subcommand_names_a_missing_or_wrong_input_in_one_line(tmp_path, capsys):
    for argv, needle in _missing_input_cases(tmp_path):
        code, _, err = _run(capsys, *argv)
        _one_line(code, err, f"genselfdiff {argv[0]}", needle)
    assert not (tmp_path / "proj").exists() and not (tmp_path / "o").exists()
    assert (tmp_path / "a file").read_text() == "x"


def test_the_real_entry_point_prints_one_line_and_exits_2():
    for argv in (["finetune", "--images", "a", "--masks", "b", "--out", "c", "--steps", "0"],
                 ["evaluate", "--model", "/no/such/model", "--images", "a", "--masks", "b"]):
        proc = subprocess.run([sys.executable, "-m", "napari_genselfdiff.cli", *argv], capture_output=True,
                              text=True, timeout=300)
        _one_line(proc.returncode, proc.stderr, "genselfdiff", "--steps" if "--steps" in argv else "/no/such/model")


# ------------------------------------------------------------------------------ OS errors

def _failing(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.fixture
def evaluate_argv(tmp_path):
    require_bundled("glands")
    images, masks = _folder(tmp_path / "data")
    return ["evaluate", "--model", "glands", "--images", images, "--masks", masks, "--device", "cpu"]


@pytest.mark.parametrize("exc,words", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
    (PermissionError(errno.EACCES, "Permission denied", "{folder}/.m.json.a1b2c3d4.tmp"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "{folder}/.m.json.a1b2c3d4.tmp"), "read-only"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "{folder}/.m.json.a1b2c3d4.tmp", "{folder}/m.json"),
     "is a folder"),
])
def test_os_errors_while_writing_are_one_line_naming_the_target(exc, words, evaluate_argv, tmp_path, capsys,
                                                                monkeypatch):
    """Disk full, a read-only folder, a folder where the file goes: one line naming the file the
    user asked for (never our temporary file), exit code 2."""
    from napari_genselfdiff.core import atomic

    folder = str(tmp_path)
    args = [a.replace("{folder}", folder) if isinstance(a, str) else a for a in exc.args]
    filenames = [f.replace("{folder}", folder) for f in (exc.filename, exc.filename2) if f is not None]
    exc = type(exc)(*args[:2], *filenames)
    monkeypatch.setattr(atomic, "write_json_atomic", _failing(exc))
    code, _, err = _run(capsys, *evaluate_argv, "--json", tmp_path / "m.json")
    line = _one_line(code, err, "genselfdiff evaluate: error:", str(tmp_path / "m.json"), words)
    assert ".tmp" not in line


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(__import__("os"), "geteuid")
                    or __import__("os").geteuid() == 0, reason="root can write into a read-only folder")
def test_a_really_read_only_output_folder(evaluate_argv, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = _run(capsys, *evaluate_argv, "--json", ro / "m.json")
    finally:
        ro.chmod(0o755)
    _one_line(code, err, str(ro / "m.json"), "permission denied")
    assert list(ro.iterdir()) == []


def test_a_real_rename_onto_a_folder_names_the_folder(tmp_path):
    from napari_genselfdiff.core.atomic import write_json_atomic

    (tmp_path / "out.json").mkdir()
    (tmp_path / "out.json" / "keep.txt").write_text("mine")
    with pytest.raises(OSError) as info:
        write_json_atomic(tmp_path / "out.json", {"a": 1})
    assert describe_os_error(info.value).startswith(f"{tmp_path / 'out.json'}: ")
    assert (tmp_path / "out.json" / "keep.txt").read_text() == "mine"
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device"), "x.zarr") == \
        "no space left on the disk; free some space and run again (writing x.zarr)"


@pytest.mark.parametrize("exc,words", [(MemoryError(), "out of memory"),
                                       (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"),
                                        "out of GPU memory")])
def test_running_out_of_memory_is_one_line(exc, words, evaluate_argv, capsys, monkeypatch):
    from napari_genselfdiff.core.eval import evaluation

    monkeypatch.setattr(evaluation, "evaluate_folder", _failing(exc))
    _one_line(*_run(capsys, *evaluate_argv)[::2], words)


def test_a_bug_keeps_its_traceback(evaluate_argv, monkeypatch):
    from napari_genselfdiff.core.eval import evaluation

    monkeypatch.setattr(evaluation, "evaluate_folder", _failing(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        main([str(a) for a in evaluate_argv])


def test_bad_thread_count_in_the_environment(evaluate_argv, capsys, monkeypatch):
    monkeypatch.setenv("GENSELFDIFF_THREADS", "two")
    _one_line(*_run(capsys, *evaluate_argv)[::2], "GENSELFDIFF_THREADS", "two")


# ------------------------------------------------------------------------------ damaged models

def test_non_finite_output_is_refused_naming_the_model(tmp_path):
    """In memory (weights the loader never saw): NaN output raises instead of becoming 0 objects."""
    from napari_genselfdiff.core.inference import TorchPredictor

    model = _model_copy(tmp_path)
    predictor = TorchPredictor.from_checkpoint(model, device="cpu")
    tiles = np.full((1, 64, 64, 3), 200, np.uint8)
    assert np.isfinite(predictor(tiles)).all()
    with torch.no_grad():
        first = next(m for m in predictor.network.modules() if isinstance(m, torch.nn.Conv2d))
        first.weight.fill_(float("nan"))  # of the network that runs (BatchNorm folded in)
    with pytest.raises(CheckpointError, match=rf"{model}: .*NaN or infinite"):
        predictor(tiles)


def test_weights_that_overflow_fail_predict_and_evaluate_in_one_line(tmp_path, capsys):
    """Finite but absurd weights (an old checkpoint without a checksum): the output overflows to
    inf / NaN; predict and evaluate say so instead of reporting zero objects and Dice 0."""
    from safetensors.torch import load_file, save_file

    model = _model_copy(tmp_path)
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: torch.full_like(v, 60000.0) if v.ndim == 4 else v for k, v in weights.items()},
              str(model / "model.safetensors"))
    _edit_config(model, lambda c: c.pop("weights_sha256", None))
    images, masks = _folder(tmp_path / "data")
    code, _, err = _run(capsys, "predict", "--model", model, "--input", images / "t0.png", "--out",
                        tmp_path / "p.zarr", "--device", "cpu", "--tile", "64", "--overlap", "0", "--no-tissue")
    _one_line(code, err, str(model), "NaN or infinite")
    code, out, err = _run(capsys, "evaluate", "--model", model, "--images", images, "--masks", masks,
                          "--device", "cpu")
    _one_line(code, err, str(model), "NaN or infinite")
    assert "dice" not in out


@pytest.mark.parametrize("edit,words", [
    (lambda c: c.pop("task"), "no valid 'task'"),
    (lambda c: c["task"].pop("num_classes"), "no valid 'task'"),
    (lambda c: c["model"].pop("base"), "do not match the architecture"),
    (lambda c: c["model"].update(base=8), "do not match the architecture"),
])
def test_a_config_that_does_not_fit_its_weights_is_one_line(edit, words, tmp_path, capsys):
    model = _model_copy(tmp_path)
    _edit_config(model, edit)
    images, masks = _folder(tmp_path / "data")
    for argv in (["evaluate", "--model", model, "--images", images, "--masks", masks],
                 ["predict", "--model", model, "--input", images / "t0.png", "--out", tmp_path / "p.zarr"],
                 ["finetune", "--init", model, "--images", images, "--masks", masks, "--out", tmp_path / "o",
                  "--preset", "tiny", "--patch", "32", "--steps", "1"]):
        code, _, err = _run(capsys, *argv, "--device", "cpu")
        _one_line(code, err, str(model), words)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ Ctrl-C

def _interrupt_after(n):
    """A progress_bar stand-in: Ctrl-C after ``n`` events, closing the job as the real one does."""
    def bar(events, desc, **kw):
        try:
            for i, _ in enumerate(events):
                if i + 1 >= n:
                    raise KeyboardInterrupt
        finally:
            events.close()
    return bar


def test_ctrl_c_of_finetune_keeps_the_checkpoint_and_says_resume(tmp_path, capsys, monkeypatch):
    from napari_genselfdiff.cli import train

    images, masks = _folder(tmp_path / "data")
    monkeypatch.setattr(train, "progress_bar", _interrupt_after(2))
    code, _, err = _run(capsys, "finetune", "--images", images, "--masks", masks, "--out", tmp_path / "ck",
                        "--scratch", "--preset", "tiny", "--patch", "32", "--batch", "1", "--steps", "3",
                        "--device", "cpu")
    _one_line(code, err, "genselfdiff finetune: cancelled", str(tmp_path / "ck"), "--resume")
    assert (tmp_path / "ck" / "training_state.json").is_file()


def test_ctrl_c_of_predict_says_rerun_not_resume_flag_and_rerunning_resumes(tmp_path, capsys, monkeypatch):
    from napari_genselfdiff.cli import predict

    require_bundled("glands")
    image = tmp_path / "img.png"
    imwrite(image, np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    argv = ["predict", "--model", "glands", "--input", image, "--out", tmp_path / "p.zarr", "--tile", "64",
            "--overlap", "16", "--device", "cpu", "--no-tissue"]
    real = predict.progress_bar
    monkeypatch.setattr(predict, "progress_bar", _interrupt_after(2))
    code, _, err = _run(capsys, *argv)
    line = _one_line(code, err, "genselfdiff predict: cancelled", "run the same command again")
    assert "--resume" not in line
    monkeypatch.setattr(predict, "progress_bar", real)
    assert _run(capsys, *argv)[0] == 0


def _project_with_regions(tmp_path):
    from napari_genselfdiff.project import Project

    require_bundled("glands")
    rng = np.random.default_rng(2)
    image = rng.integers(150, 255, (96, 96, 3), dtype=np.uint8)
    labels = np.zeros((96, 96), np.int32)
    labels[10:40, 10:40], labels[50:80, 50:85] = 1, 2
    image[labels > 0] = (120, 50, 150)
    slide = tmp_path / "slide.png"
    imwrite(slide, image)
    project = Project.create(tmp_path / "proj", model="glands")
    sid = project.add_slide(slide)
    project.accept_region(sid, image[:64, :64], labels[:64, :64], (0, 0, 64, 64))
    project.accept_region(sid, image[32:, 32:], labels[32:, 32:], (32, 32, 64, 64))
    return project


def test_ctrl_c_inside_a_refine_is_recorded_as_cancelled(tmp_path, capsys, monkeypatch):
    """Ctrl-C arrives while the refine's own code runs (a KeyboardInterrupt inside the generator,
    not a close): the history says "cancelled", the current model stays, the line says what to do."""
    from napari_genselfdiff.project import Project, refine

    project = _project_with_regions(tmp_path)
    before = project.current_model
    real = refine.finetune

    def interrupted(*args, **kwargs):
        inner = real(*args, **kwargs)
        try:
            for i, ev in enumerate(inner):
                if i == 2:
                    raise KeyboardInterrupt
                yield ev
        finally:
            inner.close()

    monkeypatch.setattr(refine, "finetune", interrupted)
    code, _, err = _run(capsys, "project", "refine", project.folder, "--steps", "4", "--patch", "32",
                        "--batch", "1", "--val-fraction", "all", "--device", "cpu")
    line = _last_line(code, err, "genselfdiff project refine: cancelled", "models")
    assert "--resume" not in line
    reopened = Project.open(project.folder)
    assert reopened.history()[-1]["status"] == "cancelled"
    assert reopened.current_model == before


def test_ctrl_c_of_a_quick_command_is_one_line(evaluate_argv, capsys, monkeypatch):
    from napari_genselfdiff.core.eval import evaluation

    monkeypatch.setattr(evaluation, "evaluate_folder", _failing(KeyboardInterrupt()))
    _one_line(*_run(capsys, *evaluate_argv)[::2], "genselfdiff evaluate: cancelled")


# ------------------------------------------------------------------------------ bad input files

def test_a_corrupt_png_is_one_line_without_install_hints(tmp_path, capsys):
    images, masks = _folder(tmp_path / "data", n=3)
    data = (images / "t0.png").read_bytes()
    (images / "t0.png").write_bytes(data[: len(data) // 2])
    (images / "t1.png").write_bytes(b"")
    (images / "t2.png").write_bytes(b"not an image at all")
    for name, words in (("t0.png", "not a readable PNG image (truncated or damaged)"), ("t1.png", "empty"),
                        ("t2.png", "not a PNG file")):
        one = tmp_path / name / "images"  # a folder holding only this broken image
        one.mkdir(parents=True)
        (one / name).write_bytes((images / name).read_bytes())
        code, _, err = _run(capsys, "finetune", "--images", one, "--masks", masks, "--out", tmp_path / "o",
                            "--scratch")
        line = _one_line(code, err, name, words)
        assert "pip" not in line
        code, _, err = _run(capsys, "predict", "--model", "glands", "--input", one / name, "--out",
                            tmp_path / "p.zarr", "--device", "cpu")
        assert "pip" not in _one_line(code, err, name)
    assert not (tmp_path / "o").exists()


def test_a_1x1_mask_is_reported_by_its_size_not_as_shape_empty(tmp_path, capsys):
    images, masks = _folder(tmp_path / "data", size=(40, 48))
    imwrite(masks / "t0.png", np.full((1, 1), 255, np.uint8))
    code, _, err = _run(capsys, "finetune", "--images", images, "--masks", masks, "--out", tmp_path / "o",
                        "--scratch")
    line = _one_line(code, err, "t0.png", "1x1", "48x40")
    assert "()" not in line


def test_16_bit_grayscale_is_accepted_by_predict_as_by_training(tmp_path, capsys):
    """The same 16-bit grayscale image: read_image (training, evaluate) and predict agree."""
    from napari_genselfdiff.core.data import read_image

    require_bundled("glands")
    grey = (np.random.default_rng(3).integers(0, 65535, (64, 64))).astype(np.uint16)
    imwrite(tmp_path / "grey16.png", grey)
    assert read_image(tmp_path / "grey16.png").shape == (64, 64, 3)
    code, _, err = _run(capsys, "predict", "--model", "glands", "--input", tmp_path / "grey16.png", "--out",
                        tmp_path / "p.zarr", "--tile", "64", "--overlap", "0", "--device", "cpu", "--no-tissue")
    assert code == 0, err
    assert (tmp_path / "p.zarr").is_dir()


# ------------------------------------------------------------------------------ acceptance

def test_bundled_names_are_accepted_wherever_a_model_is(tmp_path, capsys):
    require_bundled("glands", "nuclei")
    images, masks = _folder(tmp_path / "data")
    code, out, err = _run(capsys, "evaluate", "--model", "glands", "--images", images, "--masks", masks,
                          "--device", "cpu", "--json", tmp_path / "m.json")
    assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["n_images"] == 1
    code, out, err = _run(capsys, "finetune", "--init", "nuclei", "--task", "nuclei", "--images", images,
                          "--masks", masks, "--out", tmp_path / "ft", "--steps", "1", "--patch", "32",
                          "--batch", "1", "--checkpoint-every", "0", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "ft" / "model.safetensors").is_file()
    code, _, err = _run(capsys, "sample", "--model", "glands", "--out", tmp_path / "g.png")
    _one_line(code, err, "pretraining (diffusion) checkpoint")  # resolved, then refused for what it is
    code, _, err = _run(capsys, "project", "create", tmp_path / "proj", "--model", "nuclei", "--task", "nuclei")
    assert code == 0, err


def test_project_create_with_a_bad_slide_leaves_nothing_and_the_retry_works(tmp_path, capsys):
    good = tmp_path / "good.png"
    imwrite(good, np.full((64, 64, 3), 200, np.uint8))
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"II*\x00" + (5000).to_bytes(4, "little") + b"\0" * 100)  # its directory lies past the end
    folder = tmp_path / "proj"
    code, _, err = _run(capsys, "project", "create", folder, "--slides", good, bad)
    _one_line(code, err, "bad.svs", "truncated or damaged")
    assert not folder.exists()
    existing = tmp_path / "empty"
    existing.mkdir()
    _one_line(*_run(capsys, "project", "create", existing, "--slides", bad)[::2], "bad.svs")
    assert list(existing.iterdir()) == []  # an empty folder the user made stays as it was
    code, out, err = _run(capsys, "project", "create", folder, "--slides", good)
    assert code == 0, err
    assert "added slide good" in out and (folder / "project.json").is_file()
