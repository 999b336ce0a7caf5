"""Many slides on a Dask cluster (slide/distributed.py, ``genselfdiff predict --workers/--scheduler``):
a LocalCluster of 2 worker processes gives the labels of the in-process run, a worker killed
mid-run loses no block, a resumed run computes only what is missing, bad flags are one line."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import require_bundled  # noqa: E402
from napari_genselfdiff.cli import main
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.slide.reader import open_slide
from napari_genselfdiff.slide.store import PredictionStore
from napari_genselfdiff.slide.tiler import SlideSettings, predict_slide

import distributed  # noqa: E402  (declared through dask[distributed]: never a skip)
from napari_genselfdiff.slide import distributed as dx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# tiny: 128-px tiles, 64-px overlap, 192-px output blocks -> 2 x 2 blocks of 16 tiles each per slide
KW = dict(level=0, tile=128, overlap=64, batch=1, block=192)


def _make_test_slide():
    spec = importlib.util.spec_from_file_location("make_test_slide", REPO / "scripts" / "make_test_slide.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_test_slide


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A private copy of the bundled nuclei model (3 classes, real nuclei), so that no change to the
    bundled files during the run can make the two runs differ."""
    models = require_bundled("nuclei")
    out = tmp_path_factory.mktemp("model") / "nuclei"
    shutil.copytree(models["nuclei"], out)
    return out


@pytest.fixture(scope="module")
def predictor(model):
    import torch

    from napari_genselfdiff.core.inference import TorchPredictor

    torch.set_num_threads(1)
    return TorchPredictor.from_checkpoint(model, device="cpu", batch_size=1)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    """Two small pyramidal slides of different sizes (edge blocks that are not full)."""
    d = tmp_path_factory.mktemp("slides")
    make = _make_test_slide()
    return [make(d / f"slide{i}.tif", size, tile=128, mpp=0.5, source=None, compression="zlib", seed=i,
                 tissue_fraction=0.6) for i, size in enumerate((384, 320))]


def _settings(predictor) -> dict:
    return dict(KW, class_names=predictor.class_names, postprocess="nuclei",
                postprocess_options=predictor.postprocess_options)


@pytest.fixture(scope="module")
def reference(slides, predictor, tmp_path_factory) -> list[dict]:
    """The in-process run (predict_slide) of each slide: probabilities, labels, object count."""
    d = tmp_path_factory.mktemp("ref")
    out = []
    for s in slides:
        drain(predict_slide(predictor, s, d / f"{s.stem}.zarr", **_settings(predictor)))
        store = PredictionStore.open(d / f"{s.stem}.zarr")
        labels = np.asarray(store.labels("nuclei"))
        out.append({"probs": np.asarray(store.probabilities), "labels": labels,
                    "count": int(dict(store.group["labels"]["nuclei"].attrs)["count"])})
    assert any(r["count"] > 0 for r in out), "the slides should hold some nuclei"
    return out


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of 2 worker processes (1 thread each) for the whole module."""
    with dx.connect(2, dashboard_address=None) as c:
        yield c


def _jobs(predictor, slides, out_dir: Path) -> list:
    settings = SlideSettings(**{**_settings(predictor), "class_names": tuple(predictor.class_names)})
    jobs = []
    for i, s in enumerate(slides):
        with open_slide(s) as slide:
            jobs.append(dx.plan_job(predictor, slide, out_dir / f"{s.stem}.zarr", settings, i))
    return jobs


def _run(client, model, predictor, jobs) -> dx.ManySlides:
    return dx.ManySlides(client, dx.ModelSpec(str(model), "cpu", 1, 1), jobs, "nuclei", None,
                         predictor.postprocess_options)


def _assert_same(out_dir: Path, slides, reference) -> None:
    for s, ref in zip(slides, reference):
        store = PredictionStore.open(out_dir / f"{s.stem}.zarr")
        assert store.status == "complete" and store.unfinished("nuclei") is None
        assert np.asarray(store.done).all()
        np.testing.assert_array_equal(np.asarray(store.probabilities), ref["probs"])
        np.testing.assert_array_equal(np.asarray(store.labels("nuclei")), ref["labels"])


def test_two_workers_give_the_labels_of_the_in_process_run(client, model, predictor, slides, reference, tmp_path):
    run = _run(client, model, predictor, _jobs(predictor, slides, tmp_path))
    events = list(run.events())
    assert events[-1].done and events[-1].step == events[-1].total == 8  # 2 slides x 4 blocks
    assert [e.step for e in events] == sorted(e.step for e in events)  # progress over all slides
    _assert_same(tmp_path, slides, reference)
    assert [r.objects for r in run.summary] == [r["count"] for r in reference]
    assert [(r.computed, r.blocks, r.status) for r in run.summary] == [(4, 4, "complete")] * 2
    assert all(r.tissue_mm2 is not None and r.tissue_mm2 > 0 and r.seconds > 0 for r in run.summary)
    table = dx.summary_table(run.summary)
    assert "slide0.tif" in table and str(reference[0]["count"]) in table and "mm2" in table
    # each worker process loaded the model once and keeps it (a module-level cache): asking
    # again gives the very object the tasks used
    loaded = client.run(lambda: [id(c.predictor) for c in dx._PREDICTORS.values()])
    assert all(len(v) <= 1 for v in loaded.values()) and sum(map(len, loaded.values())) >= 1
    spec = dx.ModelSpec(str(model), "cpu", 1, 1)
    again = client.run(lambda: [id(dx.worker_predictor(spec))] if dx._PREDICTORS else [])
    assert again == loaded


def test_a_worker_killed_mid_run_loses_no_block(client, model, predictor, slides, reference, tmp_path):
    run = _run(client, model, predictor, _jobs(predictor, slides, tmp_path))
    pids_before = client.run(os.getpid)
    events = run.events()
    killed = None
    for ev in events:
        if ev.step >= 1 and killed is None:
            busy = [w for w, keys in client.processing().items() if keys] or list(pids_before)
            killed = busy[0]
            os.kill(pids_before[killed], signal.SIGKILL)
        if ev.done:
            break
    assert killed is not None
    _assert_same(tmp_path, slides, reference)
    assert pids_before[killed] not in client.run(os.getpid).values()  # it really was killed
    deadline = time.monotonic() + 60  # the nanny brings a new worker up in its place
    while time.monotonic() < deadline and len(client.nthreads()) < 2:
        time.sleep(0.5)


def test_a_resumed_run_computes_only_the_unfinished_block(client, model, predictor, slides, reference, tmp_path):
    first = _run(client, model, predictor, _jobs(predictor, slides[:1], tmp_path))
    drain(first.events())
    store = PredictionStore.open(tmp_path / f"{slides[0].stem}.zarr", mode="r+")
    # a run killed while writing block (1, 0): its chunk holds garbage, it is not marked done
    y0, x0 = 192, 0
    store.probabilities[:, y0:y0 + 64, x0:x0 + 64] = 7
    store.done[1, 0] = 0
    store.set_status(status="predicting")
    jobs = _jobs(predictor, slides[:1], tmp_path)
    assert jobs[0].todo == ((1, 0),)
    again = _run(client, model, predictor, jobs)
    drain(again.events())
    assert again.summary[0].computed == 1
    _assert_same(tmp_path, slides[:1], reference[:1])


def test_cli_on_a_running_cluster_prints_the_summary(client, model, slides, reference, tmp_path, capsys):
    out = tmp_path / "preds"
    code = main(["predict", "--model", str(model), "--input", *map(str, slides), "--out", str(out),
                 "--tile", "128", "--overlap", "64", "--batch", "1", "--level", "0", "--device", "cpu",
                 "--scheduler", client.scheduler.address])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "slide0.tif" in printed and "slide1.tif" in printed and "objects" in printed
    for s, ref in zip(slides, reference):
        store = PredictionStore.open(out / f"{s.stem}.zarr")
        assert store.unfinished("nuclei") is None
        # the CLI's 2048-px blocks hold the whole slide: the probabilities cannot depend on blocks
        np.testing.assert_array_equal(np.asarray(store.probabilities), ref["probs"])
        count = int(dict(store.group["labels"]["nuclei"].attrs)["count"])
        assert count > 0 and any(line.startswith(s.name) and f" {count} " in line for line in printed.splitlines())


@pytest.mark.parametrize("flags, says", [
    (["--workers", "0"], "--workers: must be a whole number >= 1"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"], "not allowed with argument"),
    (["--scheduler", "nowhere"], "--scheduler: must be a scheduler address"),
])
def test_bad_cluster_flags_are_one_line(flags, says, tmp_path, capsys):
    code = main(["predict", "--model", "nuclei", "--input", "x.tif", "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_an_unreachable_scheduler_is_one_line(model, slides, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["predict", "--model", str(model), "--input", str(slides[1]), "--out", str(tmp_path / "o.zarr"),
                 "--tile", "128", "--overlap", "64", "--level", "0", "--device", "cpu",
                 "--scheduler", f"tcp://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and f"--scheduler tcp://127.0.0.1:{port}: cannot connect" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.zarr").exists()  # asked first: no empty store is left behind


# --------------------------------------------------------------------------------------------
# napari: "Predict whole slide" on the same graph ("Run on", _widgets/whole_slide.py)


def _predict_widget(viewer, model, out: Path):
    from napari_genselfdiff._widgets.predict import PredictWidget

    w = PredictWidget(viewer)
    viewer.window.add_dock_widget(w, name="Predict", area="right")
    w.add_model(str(model))
    w.device.combo.setCurrentText("cpu")
    w.tile.setValue(128)
    w.overlap.setValue(64)
    w.batch.setValue(1)
    w.probability.setChecked(False)
    w.out.setText(str(out))
    return w


def _whole_slide(qtbot, w, statuses: list) -> None:
    w.runner.event.connect(lambda e: statuses.append(w.progress.status.text()))
    w.slide_btn.click()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=180_000)


def test_napari_whole_slide_on_a_cluster_gives_the_in_process_labels(client, model, slides, reference,
                                                                      tmp_path, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(slides[0]), plugin="napari-genselfdiff")
    here = _predict_widget(viewer, model, tmp_path / "here")
    assert not here.run_on.workers.isVisibleTo(here) and not here.run_on.scheduler.isVisibleTo(here)
    _whole_slide(qtbot, here, [])
    there = _predict_widget(viewer, model, tmp_path / "there")
    there.run_on.combo.setCurrentText("Dask cluster at")
    assert there.run_on.scheduler.isVisibleTo(there) and not there.run_on.workers.isVisibleTo(there)
    there.run_on.scheduler.setText(client.scheduler.address)
    statuses: list[str] = []
    _whole_slide(qtbot, there, statuses)
    assert any(s.startswith("cluster:") and "blocks" in s for s in statuses), statuses
    (a,) = (tmp_path / "here").glob("*.zarr")
    (b,) = (tmp_path / "there").glob("*.zarr")
    sa, sb = PredictionStore.open(a), PredictionStore.open(b)
    assert sb.status == "complete"
    np.testing.assert_array_equal(np.asarray(sb.probabilities), np.asarray(sa.probabilities))
    np.testing.assert_array_equal(np.asarray(sb.labels("nuclei")), np.asarray(sa.labels("nuclei")))
    np.testing.assert_array_equal(np.asarray(sb.probabilities), reference[0]["probs"])  # and the tiler's, block size aside
    shown = viewer.layers["nuclei"]
    np.testing.assert_array_equal(np.asarray(shown.data[0] if shown.multiscale else shown.data),
                                  np.asarray(sb.labels("nuclei")))


def test_napari_whole_slide_on_a_local_cluster_and_what_a_cluster_cannot_read(model, slides, tmp_path,
                                                                              make_napari_viewer, qtbot, monkeypatch):
    import napari_genselfdiff._widgets.predict as predict_mod

    errors: list[str] = []
    monkeypatch.setattr(predict_mod, "show_error", errors.append)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(slides[1]), plugin="napari-genselfdiff")
    w = _predict_widget(viewer, model, tmp_path / "local")
    w.run_on.combo.setCurrentText("local Dask cluster")
    assert w.run_on.workers.isVisibleTo(w)
    w.run_on.workers.setValue(1)
    _whole_slide(qtbot, w, [])
    (store,) = (tmp_path / "local").glob("*.zarr")
    assert PredictionStore.open(store).status == "complete" and "nuclei" in viewer.layers
    # an image only in napari's memory: a cluster cannot read it, said before anything starts
    viewer.add_image(np.asarray(layer.data[0] if layer.multiscale else layer.data), name="in memory", rgb=True)
    w.image_layer.setCurrentText("in memory")
    w.slide_btn.click()
    assert not w.runner.running and errors and "has no file" in errors[-1] and "this process" in errors[-1]
    w.run_on.combo.setCurrentText("Dask cluster at")
    w.run_on.scheduler.setText("  ")
    w.slide_btn.click()
    assert not w.runner.running and "scheduler's address" in errors[-1]


def test_no_test_writes_the_users_widget_settings():
    """The autouse fixture of conftest.py names the variable _widgets/settings.py reads."""
    from napari_genselfdiff._widgets.settings import CONFIG_ENV, config_dir

    assert CONFIG_ENV == "GENSELFDIFF_CONFIG_DIR"
    assert "session-config" in str(config_dir())
