"""Issue 35 (1) and 36 (3): a refine keeps its base model's head, a refined model that scores lower
than its base on the held-out regions is kept aside (adopt it anyway, roll back any change), and
one refine writes to a project at a time."""
from __future__ import annotations

import json

import pytest

from _shapes import he_blobs
from napari_genselfdiff.cli import main
from napari_genselfdiff.core import checkpoint as ck
from napari_genselfdiff.core.data import LabeledImage, TaskSpec, mask_to_target
from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.core.train.training import FinetuneConfig, finetune
from napari_genselfdiff.project import Project
from napari_genselfdiff.project import refine as R
from napari_genselfdiff.project.lock import LOCK_FILE, writer_lock

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = dict(patch=32, batch=2, lr=1e-3, warmup=1, checkpoint_every=0)
SHAPE = (300, 400)


_region = he_blobs


@pytest.fixture(scope="module")
def nuclei_model(tmp_path_factory):
    """A tiny nuclei model with a boundary class and a distance map (the bundled nuclei head)."""
    spec = TaskSpec.make("nuclei", True, distance=True)
    items = [LabeledImage(f"s{i}", im, mask_to_target(lab, spec)) for i in range(3) for im, lab in [_region(i)]]
    out = tmp_path_factory.mktemp("base") / "nuclei"
    drain(finetune(items, out, FinetuneConfig(task="nuclei", boundary=True, distance=True, preset="tiny", steps=2,
                                              val_every=0, tune_postprocess=False, **FAST), device="cpu"))
    return out


@pytest.fixture
def project(tmp_path, nuclei_model):
    slide = tmp_path / "slides" / "case.svs"
    slide.parent.mkdir()
    slide.write_bytes(b"not read: the shape is given")
    proj = Project.create(tmp_path / "proj", task="nuclei", model=nuclei_model)  # no --boundary: the model has one
    sid = proj.add_slide(slide, mpp=0.5, shape=SHAPE)
    for i in range(3):
        proj.accept_region(sid, *_region(10 + i), (0, 64 * i, 64, 64))
    return proj


def test_a_refine_keeps_its_base_models_head(project, nuclei_model):
    assert not project.spec.boundary  # the project alone would train a 2-class head
    last = drain(project.refine(steps=1, device="cpu", **FAST))
    task = ck.load_config(last.checkpoint)["task"]
    base = ck.load_config(nuclei_model)["task"]
    assert task["num_classes"] == base["num_classes"] == 3 and task["boundary"] and task.get("distance")
    assert "new 3-class head" not in " ".join(e.message or "" for e in [last])


def test_a_refine_that_scores_lower_is_kept_aside_then_adopted_and_rolled_back(project, nuclei_model,
                                                                                monkeypatch, capsys):
    scores = iter([0.9, 0.5])  # base, then the refined model
    monkeypatch.setattr(R, "score", lambda model, items, device: next(scores))
    last = drain(project.refine(steps=1, device="cpu", **FAST))
    new = project.folder / "models" / "refine-1"
    assert last.metrics["adopted"] is False and "kept aside" in last.message and "refine-1" in last.message
    assert Project.open(project.folder).current_model == nuclei_model.absolute()  # unchanged
    (rec,) = project.history()
    assert rec["status"] == "finished" and rec["adopted"] is False
    # one click (here: one command) adopts it anyway ...
    assert main(["project", "adopt", str(project.folder), "refine-1"]) == 0
    assert Project.open(project.folder).current_model == new
    # ... and one rolls it back
    assert main(["project", "rollback", str(project.folder)]) == 0
    assert Project.open(project.folder).current_model == nuclei_model.absolute()
    assert [h["status"] for h in project.history()] == ["finished", "adopted", "rolled back"]
    assert main(["project", "rollback", str(project.folder)]) == 2  # nothing made the base current
    assert "nothing to roll back" in capsys.readouterr().err
    assert main(["project", "status", str(project.folder)]) == 0
    assert "kept aside" in capsys.readouterr().out


def test_a_refine_that_scores_as_well_is_adopted_and_can_be_rolled_back(project, nuclei_model, monkeypatch):
    scores = iter([0.5, 0.7])
    monkeypatch.setattr(R, "score", lambda model, items, device: next(scores))
    last = drain(project.refine(steps=1, device="cpu", **FAST))
    assert last.metrics["adopted"] is True and "kept aside" not in last.message
    assert Project.open(project.folder).current_model == project.folder / "models" / "refine-1"
    assert R.roll_back(project) == nuclei_model.absolute()


def test_one_refine_at_a_time_and_a_dead_holders_lock_is_taken_over(project):
    with writer_lock(project.folder, "a refine"):
        with pytest.raises(DataError, match=r"a refine \(pid \d+ on .*\) is writing to it"):
            next(project.refine(steps=1, device="cpu", **FAST))
    assert not (project.folder / "models" / "refine-1").exists()
    # a lock file left by a process that died (its content says who; the kernel dropped its lock)
    (project.folder / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "what": "a refine"}))
    assert drain(project.refine(steps=1, device="cpu", **FAST)).done
    assert [h["status"] for h in project.history()] == ["finished"]


def test_two_refines_in_two_processes_never_write_one_model_twice(project, tmp_path):
    """Two `project refine` at once: one runs, the other gets one line naming the holder."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "napari_genselfdiff.cli", "project", "refine", str(project.folder), "--steps", "30",
           "--patch", "32", "--batch", "2", "--device", "cpu"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = project.folder / LOCK_FILE
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.1)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 2
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is writing to it" in lines[0] and f"pid {first.pid}" in lines[0]
    assert [h["status"] for h in project.history()] == ["finished"]
    assert sorted(p.name for p in (project.folder / "models").iterdir() if p.is_dir()) == ["refine-1"]
