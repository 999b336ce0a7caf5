"""The CLI: one-line errors for bad input, and a tiny end-to-end run on real GlaS tiles."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from imageio.v3 import imwrite

from napari_genselfdiff.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _folder(tmp_path, name, n=2, size=(40, 48), mask_size=None, with_masks=True):
    rng = np.random.default_rng(0)
    img_dir, mask_dir = tmp_path / name / "images", tmp_path / name / "masks"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for i in range(n):
        imwrite(img_dir / f"t{i}.png", rng.integers(0, 255, size + (3,), dtype=np.uint8))
        if with_masks:
            m = np.zeros(mask_size or size, np.uint8)
            m[5:20, 5:20] = 255
            imwrite(mask_dir / f"t{i}.png", m)
    return img_dir, mask_dir


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_folder(tmp_path, capsys):
    code, _, err = _run(capsys, "pretrain", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "nope", "no such file or folder")


def test_image_without_mask(tmp_path, capsys):
    imgs, masks = _folder(tmp_path, "d")
    (masks / "t1.png").unlink()
    code, _, err = _run(capsys, "finetune", "--images", str(imgs), "--masks", str(masks), "--out",
                        str(tmp_path / "o"), "--scratch")
    _one_line_error(code, err, "t1.png", "no mask")


def test_mask_of_wrong_size(tmp_path, capsys):
    imgs, masks = _folder(tmp_path, "d", mask_size=(40, 40))
    code, _, err = _run(capsys, "finetune", "--images", str(imgs), "--masks", str(masks), "--out",
                        str(tmp_path / "o"), "--scratch")
    _one_line_error(code, err, "t0.png", "40x40", "48x40")


def test_unreadable_file(tmp_path, capsys):
    imgs, masks = _folder(tmp_path, "d")
    (imgs / "t0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, _, err = _run(capsys, "finetune", "--images", str(imgs), "--masks", str(masks), "--out",
                        str(tmp_path / "o"), "--scratch")
    _one_line_error(code, err, "t0.png", "cannot read image")


def test_empty_training_set(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "pretrain", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "empty", "no images")
    imgs, masks = _folder(tmp_path, "d")
    for m in masks.iterdir():
        imwrite(m, np.zeros((40, 48), np.uint8))
    code, _, err = _run(capsys, "finetune", "--images", str(imgs), "--masks", str(masks), "--out",
                        str(tmp_path / "o2"), "--scratch", "--preset", "tiny", "--patch", "32")
    _one_line_error(code, err, "empty")
    assert not (tmp_path / "o2").exists()


def test_finetune_needs_init_or_scratch(tmp_path, capsys):
    imgs, masks = _folder(tmp_path, "d")
    code, _, err = _run(capsys, "finetune", "--images", str(imgs), "--masks", str(masks), "--out", str(tmp_path / "o"))
    _one_line_error(code, err, "--init", "--scratch")


def test_help_explains_options():
    out = subprocess.run([sys.executable, "-m", "napari_genselfdiff.cli", "finetune", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--init", "--scratch", "--label-fraction", "--loss", "--task", "--resume"):
        assert opt in out


@pytest.mark.slow
def test_end_to_end_on_glas_tiles(glas_dir, tmp_path, capsys):
    """pretrain -> sample -> finetune -> evaluate with the tiny preset on 6 real GlaS tiles."""
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    for p in sorted((glas_dir / "images").iterdir())[:6]:
        shutil.copy(p, imgs / p.name)  # a temporary copy of six tiles, deleted with tmp_path
        shutil.copy(glas_dir / "masks" / p.name, masks / p.name)
    common = ["--preset", "tiny", "--patch", "64", "--batch", "2", "--device", "cpu"]
    assert _run(capsys, "pretrain", "--images", str(imgs), "--out", str(tmp_path / "pre"), "--steps", "4", *common)[0] == 0
    code, out, _ = _run(capsys, "sample", "--model", str(tmp_path / "pre"), "--n", "4", "--steps", "3",
                        "--out", str(tmp_path / "grid.png"))
    assert code == 0 and "after only 4 steps the tiles may well be coloured noise" in out, out
    assert (tmp_path / "grid.png").stat().st_size > 0
    code, out, _ = _run(capsys, "finetune", "--images", str(imgs), "--masks", str(masks), "--init",
                        str(tmp_path / "pre"), "--out", str(tmp_path / "seg"), "--steps", "4", *common)
    assert code == 0 and "segmentation model" in out
    code, out, _ = _run(capsys, "evaluate", "--model", str(tmp_path / "seg"), "--images", str(imgs), "--masks",
                        str(masks), "--json", str(tmp_path / "m.json"), "--device", "cpu")
    assert code == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["n_images"] == 6 and 0 <= result["mean"]["dice"] <= 1
    assert {"object_f1", "object_dice", "object_hausdorff", "iou", "hd95"} <= set(result["mean"])
    # a pretraining checkpoint is not a segmentation model: clear error
    code, _, err = _run(capsys, "evaluate", "--model", str(tmp_path / "pre"), "--images", str(imgs),
                        "--masks", str(masks))
    _one_line_error(code, err, "fine-tune it first")


def test_progress_bar_drives_any_job_to_its_done_event_and_closes_it(capsys):
    """The one terminal driver: training-like and slide-prediction-like events alike; messages
    go to stderr, the last event is returned, and the generator is closed (a Ctrl-C saves)."""
    from napari_genselfdiff.cli.console import progress_bar
    from napari_genselfdiff.core.progress import Progress

    closed = []

    def job(stages):
        try:
            yield Progress(stages[0], 0, 4, message="starting")
            for i, stage in enumerate(stages[1:], 1):
                yield Progress(stage, i, 4, loss=1.0 / i, lr=1e-3, images_per_s=5.0, tiles_skipped=1)
            yield Progress(stages[-1], 4, 4, done=True, checkpoint="ck", message="finished")
            yield Progress("never", 5, 4)  # past the done event: not read
        finally:
            closed.append(True)

    last = progress_bar(job(["finetune"] * 4), "finetune")
    assert last.done and last.checkpoint == "ck" and closed == [True]
    assert capsys.readouterr().err.split() == ["starting", "finished"]
    last = progress_bar(job(["predict", "predict", "postprocess", "postprocess"]), "slide",
                        units={"predict": "tile", "postprocess": "block"})
    assert last.done and last.stage == "postprocess" and closed == [True, True]
    assert progress_bar(iter([]), "nothing") is None


def test_finetune_glands_with_a_contour_class_and_evaluate(tmp_path, capsys):
    """--task glands --boundary: a 3-class model (background, gland, contour, 2 px deep) whose tuned
    options include the interiors' threshold and growth, read back by evaluate."""
    imgs, masks = _folder(tmp_path, "d", n=4, size=(64, 64))
    code, out, err = _run(capsys, "finetune", "--images", str(imgs), "--masks", str(masks), "--scratch", "--boundary",
                          "--out", str(tmp_path / "seg"), "--steps", "2", "--preset", "tiny", "--patch", "32",
                          "--batch", "2", "--val-fraction", "0.25", "--device", "cpu")
    assert code == 0, err
    config = json.loads((tmp_path / "seg" / "config.json").read_text())
    assert config["task"]["class_names"] == ["background", "gland", "contour"]
    assert config["task"]["boundary_width"] == 2 and config["model"]["out_channels"] == 3
    assert {"marker_threshold", "grow"} <= set(config["postprocess"])
    code, _, err = _run(capsys, "evaluate", "--model", str(tmp_path / "seg"), "--images", str(imgs), "--masks",
                        str(masks), "--json", str(tmp_path / "m.json"), "--device", "cpu")
    assert code == 0, err
    assert 0 <= json.loads((tmp_path / "m.json").read_text())["mean"]["object_f1"] <= 1
