"""Issue #11, data loss: nothing a user owns is overwritten, deleted or read from outside its folder.

* every writer (export, predict's --geojson / --overlay, the formats functions the widgets and the
  napari writer use) refuses an existing path unless --force, and --force replaces only an export
  of ours of the same kind, never the input slide or store, never a user's file or folder;
* a crafted project (slide id ``../../victim``, manifest paths leading out, links out of the
  folder) is refused with one line and touches nothing outside;
* an unfinished prediction is not exported as if it were complete (``--partial`` says what is
  missing), and napari's reader warns about it;
* the hidden temporaries a kill leaves (``.NAME.<random>.tmp``) are removed by the next write to
  that place, once nothing has touched them for a while, and only those of our exact pattern.

Data-loss cases assert the user's files are byte-identical afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_genselfdiff.bundled import sample_image_path
from napari_genselfdiff.cli import main
from napari_genselfdiff.core import atomic
from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.formats import geojson as gj
from napari_genselfdiff.formats import ome_zarr, tiff
from napari_genselfdiff.slide.store import PredictionStore

OLD = time.time() - 3600  # an hour ago: long past atomic.STALE_AFTER_S


# ---------------------------------------------------------------------------------------------
# helpers

def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) -> its bytes: compare before and after."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def make_store(path: Path, *, blocks_done: int = 4, labels: str | None = "complete") -> PredictionStore:
    """A 64 x 64 prediction store of 2 x 2 blocks with ``blocks_done`` finished; ``labels``:
    None (the run stopped while predicting), "partial" (stopped while labelling) or "complete"."""
    store = PredictionStore.create_or_resume(
        path, {"slide": "s.png", "level": 0}, 2, (64, 64), 32, (2, 2),
        {"downsample": 1.0, "mpp": 0.5, "slide_mpp": 0.5, "class_names": ["background", "gland"]})
    done = np.zeros(4, np.uint8)
    done[:blocks_done] = 1
    store.done[...] = done.reshape(2, 2)
    probs = np.zeros((2, 64, 64), np.uint8)
    probs[1, 4:12, 4:12] = probs[1, 40:50, 40:50] = 255
    store.probabilities[...] = probs
    if labels is None:
        return store
    store.set_status(status="probabilities_done")
    group, lab0 = store.create_labels("glands", 32)
    lab = np.zeros((64, 64), np.int32)
    lab[4:12, 4:12] = 1
    if labels == "complete":
        lab[40:50, 40:50] = 2
    lab0[...] = lab
    if labels == "complete":
        from napari_genselfdiff.slide.instances import write_label_pyramid
        n_levels = write_label_pyramid(group, block=32)
        PredictionStore.finish_labels(group, "glands", n_levels, count=2)
        store.set_status(status="complete")
    return store


@pytest.fixture
def store(tmp_path) -> Path:
    make_store(tmp_path / "pred.zarr")
    return tmp_path / "pred.zarr"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def age(path: Path, when: float = OLD) -> None:
    """Set the modification time of ``path`` and everything in it back to ``when``."""
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (when, when), follow_symlinks=False)


# ---------------------------------------------------------------------------------------------
# 1. writers never replace what is not ours

@pytest.mark.parametrize("force", [[], ["--force"]])
def test_export_ome_zarr_never_touches_a_users_folder(store, tmp_path, capsys, force):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.docx").write_bytes(b"four years of work")
    before = snapshot(folder)
    assert main(["export", "--labels", str(store), "--ome-zarr", str(folder), *force]) == 2
    assert str(folder) in one_line_error(capsys)
    assert snapshot(folder) == before


@pytest.mark.parametrize("flag", ["--ome-zarr", "--geojson", "--tiff"])
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_export_never_overwrites_a_users_file(store, tmp_path, capsys, flag, force):
    user = tmp_path / "notes.txt"
    user.write_bytes(b"a user's file")
    assert main(["export", "--labels", str(store), flag, str(user), *force]) == 2
    err = one_line_error(capsys)
    assert str(user) in err and ("--force" in err if not force else "never replaced" in err)
    assert user.read_bytes() == b"a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "pred.zarr"]  # no temporaries left


@pytest.mark.parametrize("flag", ["--ome-zarr", "--geojson", "--tiff"])
def test_export_never_writes_over_or_into_its_own_store(store, capsys, flag):
    before = snapshot(store)
    for target in (store, store / "zarr.json", store / "labels"):
        assert main(["export", "--labels", str(store), flag, str(target), "--force"]) == 2
        err = one_line_error(capsys)  # "is the input", or for a file format "is a folder" (the parser)
        assert str(target) in err and ("input" in err or "is a folder" in err)
    assert snapshot(store) == before


def test_force_replaces_our_own_exports_and_nothing_else(store, tmp_path, capsys):
    outs = {"--geojson": tmp_path / "g.geojson", "--tiff": tmp_path / "l.tif", "--ome-zarr": tmp_path / "l.ome.zarr"}
    args = ["export", "--labels", str(store)] + [x for flag, p in outs.items() for x in (flag, str(p))]
    assert main(args) == 0
    first = {flag: snapshot(p) for flag, p in outs.items()}
    assert gj.is_our_geojson(outs["--geojson"]) and tiff.is_our_tiff(outs["--tiff"])
    assert ome_zarr.is_our_ome_zarr(outs["--ome-zarr"])
    capsys.readouterr()
    assert main(args) == 2  # without --force: refused, and nothing was written
    assert "--force" in one_line_error(capsys)
    assert {flag: snapshot(p) for flag, p in outs.items()} == first
    assert main(args + ["--force"]) == 0
    assert len(gj.read_geojson(outs["--geojson"]).features) == 2
    np.testing.assert_array_equal(tiff.read_label_tiff(outs["--tiff"]), np.asarray(PredictionStore.open(store).labels("glands")))
    assert ome_zarr.read_ome_zarr_labels(outs["--ome-zarr"])[0].shape == (64, 64)


def test_a_symlink_is_never_replaced_even_to_an_export_of_ours(store, tmp_path, capsys):
    ours = tmp_path / "ours.geojson"
    assert main(["export", "--labels", str(store), "--geojson", str(ours)]) == 0
    link = tmp_path / "link.geojson"
    link.symlink_to(ours)
    before = ours.read_bytes()
    assert main(["export", "--labels", str(store), "--geojson", str(link), "--force"]) == 2
    assert link.is_symlink() and ours.read_bytes() == before


@pytest.fixture
def slide(tmp_path) -> Path:
    path = tmp_path / "slide.png"
    shutil.copyfile(sample_image_path(), path)
    return path


@pytest.mark.parametrize("flag", ["--geojson", "--overlay"])
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_predict_never_overwrites_its_input_slide(slide, tmp_path, capsys, flag, force):
    before = slide.read_bytes()
    hard = tmp_path / "same-file.geojson"
    os.link(slide, hard)  # the same file under another name
    for target in (slide, hard):
        code = main(["predict", "--model", "glands", "--input", str(slide), "--out", str(tmp_path / "p.zarr"),
                     flag, str(target), "--device", "cpu", *force])
        assert code == 2
        assert str(target) in one_line_error(capsys)
    assert slide.read_bytes() == before
    assert not (tmp_path / "p.zarr").exists()  # refused before any work


def test_formats_writers_refuse_by_default_and_force_only_replaces_ours(tmp_path):
    """The functions the widgets and the napari writer call follow the same rule."""
    from napari_genselfdiff._writer import write_geojson as napari_writer

    labels = np.zeros((16, 16), np.int32)
    labels[2:6, 2:6] = 1
    user = tmp_path / "user.geojson"
    user.write_bytes(b'{"type": "FeatureCollection", "features": []}')
    for call in (lambda: gj.export_labels_geojson(labels, user),
                 lambda: gj.export_labels_geojson(labels, user, force=True),
                 lambda: napari_writer(str(user), labels, {"name": "glands"}),
                 lambda: tiff.write_label_tiff(user, labels, force=True),
                 lambda: ome_zarr.write_ome_zarr_labels(user, labels, force=True)):
        with pytest.raises(DataError, match="user.geojson"):
            call()
    assert user.read_bytes() == b'{"type": "FeatureCollection", "features": []}'
    ours = tmp_path / "ours.geojson"
    assert napari_writer(str(ours), labels, {"name": "glands"}) == [str(ours)]
    labels[8:10, 8:10] = 2
    assert napari_writer(str(ours), labels, {"name": "glands"}) == [str(ours)]  # the save dialog asked
    assert len(gj.read_geojson(ours).features) == 2


def test_an_old_export_without_the_marker_is_still_recognised(tmp_path):
    old = tmp_path / "old.geojson"
    feature = {"type": "Feature", "id": "x", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
               "properties": {"objectType": "annotation", "label_id": 1}}
    old.write_text('{"type":"FeatureCollection","features":[\n' + json.dumps(feature) + "\n]}\n")
    assert gj.is_our_geojson(old)
    qupath = tmp_path / "qupath.geojson"
    qupath.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {**feature, "properties": {"objectType": "annotation"}}]}))
    assert not gj.is_our_geojson(qupath)


# ---------------------------------------------------------------------------------------------
# 3. an unfinished prediction is not exported as a finished one

def test_export_of_a_prediction_stopped_while_predicting_is_refused(tmp_path, capsys):
    make_store(tmp_path / "p.zarr", blocks_done=1, labels=None)
    out = tmp_path / "g.geojson"
    assert main(["export", "--labels", str(tmp_path / "p.zarr"), "--geojson", str(out)]) == 2
    err = one_line_error(capsys)
    assert "not finished (1 of 4 blocks predicted)" in err and "rerun predict" in err
    assert main(["export", "--labels", str(tmp_path / "p.zarr"), "--geojson", str(out), "--partial"]) == 2
    assert "no instance labels yet" in one_line_error(capsys)
    assert not out.exists()


def test_export_of_a_prediction_stopped_while_labelling_needs_partial(tmp_path, capsys):
    make_store(tmp_path / "p.zarr", labels="partial")
    out = tmp_path / "g.geojson"
    assert main(["export", "--labels", str(tmp_path / "p.zarr"), "--geojson", str(out)]) == 2
    err = one_line_error(capsys)
    assert "is not finished (all 4 blocks predicted, instance labels unfinished)" in err and "--partial" in err
    assert not out.exists()
    assert main(["export", "--labels", str(tmp_path / "p.zarr"), "--geojson", str(out), "--partial"]) == 0
    captured = capsys.readouterr()
    assert "partial export" in captured.err and "instance labels unfinished" in captured.err
    assert len(gj.read_geojson(out).features) == 1  # what was there


def test_export_of_a_finished_prediction_says_nothing_about_partial(store, tmp_path, capsys):
    assert main(["export", "--labels", str(store), "--geojson", str(tmp_path / "g.geojson")]) == 0
    captured = capsys.readouterr()
    assert "partial" not in captured.err and "2 objects" in captured.out


def test_napari_reader_shows_an_unfinished_store_with_a_warning(tmp_path, store):
    from napari_genselfdiff._reader import napari_get_reader

    make_store(tmp_path / "half.zarr", blocks_done=3, labels=None)
    reader = napari_get_reader(str(tmp_path / "half.zarr"))
    with pytest.warns(UserWarning, match=r"half.zarr: the prediction is not finished \(3 of 4 blocks predicted\)"):
        layers = reader(str(tmp_path / "half.zarr"))
    assert [kind for *_, kind in layers] == ["image"]  # the probability so far, no labels yet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers = napari_get_reader(str(store))(str(store))
    kinds = {meta["name"]: kind for _, meta, kind in layers}
    assert kinds == {"glands": "labels", "glands probability": "image"}  # named as the live result
    labels = next(data for data, meta, _ in layers if meta["name"] == "glands")
    assert int(np.asarray(labels[0] if isinstance(labels, list) else labels).max()) == 2


# ---------------------------------------------------------------------------------------------
# 2. a project folder cannot make us write, delete or read outside it

@pytest.fixture
def project(tmp_path):
    from napari_genselfdiff.project import Project

    p = Project.create(tmp_path / "proj", task="glands")
    p.add_slide(sample_image_path(), shape=(768, 1024), mpp=0.5)
    return p


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_crafted_slide_id_cannot_reach_outside_the_project(project, tmp_path):
    from napari_genselfdiff.project import Project

    victim = tmp_path / "victim.zarr"
    victim.mkdir()
    (victim / "precious.txt").write_bytes(b"not yours")
    before = snapshot(tmp_path / "victim.zarr")
    _edit_json(project.folder / "project.json", lambda d: d["slides"][0].update(id="../../victim"))
    with pytest.raises(DataError, match=r"project.json: slide 0 has the id '\.\./\.\./victim'"):
        Project.open(project.folder)
    # and the in-memory API refuses such an id as a file name too
    with pytest.raises(DataError, match="not a safe name"):
        project._store_path("../../victim")
    assert snapshot(victim) == before


@pytest.mark.parametrize("bad", ["../../secret.png", "/etc/passwd", "regions/../../secret.png"])
def test_manifest_paths_must_stay_inside_the_project(project, tmp_path, bad):
    from napari_genselfdiff.project import Project

    rid = project.accept_region(project.slides()[0]["id"], np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8),
                                (0, 0, 8, 8))
    manifest = project.folder / "regions" / "manifest.jsonl"
    record = json.loads(manifest.read_text())
    record["mask"] = bad
    manifest.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"manifest.jsonl: line 1: region {rid} mask"):
        Project.open(project.folder)
    with pytest.raises(DataError, match="outside|absolute"):
        project.region_arrays(record)  # an in-memory record is checked when used, too


def test_a_link_out_of_the_project_is_never_written_through(project, tmp_path):
    sid = project.slides()[0]["id"]
    outside = tmp_path / "elsewhere"
    (outside / "regions").mkdir(parents=True)
    (outside / "regions" / "manifest.jsonl").write_bytes(b"someone else's lines\n")
    (outside / "labels" / f"{sid}.zarr").mkdir(parents=True)
    (outside / "labels" / f"{sid}.zarr" / "precious.txt").write_bytes(b"keep")
    before = snapshot(outside)
    (project.folder / "labels").symlink_to(outside / "labels")  # the label stores lead out
    with pytest.warns(UserWarning, match="label store"):  # the region is kept, the store refused
        project.accept_region(sid, np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8), (0, 0, 8, 8))
    shutil.rmtree(project.folder / "regions")
    (project.folder / "regions").symlink_to(outside / "regions")  # the regions lead out
    with pytest.raises(DataError, match="leads outside"):
        project.accept_region(sid, np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8), (8, 8, 8, 8))
    assert snapshot(outside) == before


def test_history_and_reviewed_files_are_checked(project):
    (project.folder / "models").mkdir(exist_ok=True)
    (project.folder / "models" / "history.jsonl").write_text(json.dumps({"status": "finished",
                                                                          "new_model": "../../x"}) + "\n")
    with pytest.raises(DataError, match="history.jsonl: line 1: new_model"):
        project.history()
    (project.folder / "reviewed.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="reviewed.json"):
        project.reviewed(project.slides()[0]["id"])


def test_inside_resolves_links_and_refuses_the_way_out(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ok").mkdir()
    (tmp_path / "a" / "out").symlink_to(tmp_path)
    assert atomic.inside(tmp_path / "a", "ok/x.png") == tmp_path / "a" / "ok" / "x.png"
    for bad in ("../b", "/abs", "out/x", "ok/../../b", "", None, 3):
        with pytest.raises(DataError):
            atomic.inside(tmp_path / "a", bad)


# ---------------------------------------------------------------------------------------------
# 9. what a kill leaves behind is cleaned by the next write

def test_clean_stale_temps_removes_only_our_old_leftovers(tmp_path):
    stale_dir = tmp_path / ".out.zarr.ab12cd_3.tmp"
    (stale_dir / "labels").mkdir(parents=True)
    (stale_dir / "labels" / "chunk").write_bytes(b"x" * 1000)
    stale_file = tmp_path / ".out.zarr.zzzzzzzz.tmp"
    stale_file.write_bytes(b"half a file")
    fresh = tmp_path / ".out.zarr.fresh123.tmp"  # a concurrent writer's live temporary
    fresh.mkdir()
    live = tmp_path / ".out.zarr.live1234.tmp"  # old folder, but a file in it is being written
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"growing")
    look_alikes = [tmp_path / n for n in (".out.zarr.short.tmp", "out.zarr.ab12cd34.tmp", ".out.zarr.ab12cd34.tmp.keep",
                                          ".other.ab12cd34.tmp", ".out.zarr.AB12CD34.tmp", ".out.zarr.ab12cd34.bak")]
    for p in look_alikes:
        p.write_bytes(b"not ours")
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "data.txt").write_bytes(b"precious")
    link = tmp_path / ".out.zarr.linklink.tmp"
    link.symlink_to(user_dir)
    for p in [stale_dir, stale_file, live, link, *look_alikes, user_dir]:
        age(p)
    os.utime(live / "model.safetensors")  # just now
    removed = atomic.clean_stale_temps(tmp_path, "out.zarr")
    assert sorted(p.name for p in removed) == sorted([stale_dir.name, stale_file.name, link.name])
    assert not stale_dir.exists() and not stale_file.exists() and not os.path.lexists(link)
    assert fresh.exists() and live.exists() and all(p.read_bytes() == b"not ours" for p in look_alikes)
    assert (user_dir / "data.txt").read_bytes() == b"precious"  # the link went, not what it pointed to


def test_an_old_copy_is_kept_when_the_target_is_missing(tmp_path):
    old = tmp_path / ".out.zarr.ab12cd34.old"
    old.mkdir()
    (old / "previous").write_bytes(b"the last copy")
    age(old)
    assert atomic.clean_stale_temps(tmp_path, "out.zarr") == []
    assert (old / "previous").read_bytes() == b"the last copy"
    (tmp_path / "out.zarr").mkdir()  # once the new target is in place the old copy may go
    assert atomic.clean_stale_temps(tmp_path, "out.zarr") == [old]


def test_exports_and_atomic_files_clean_their_leftovers(tmp_path):
    labels = np.zeros((16, 16), np.int32)
    labels[2:6, 2:6] = 1
    leftovers = [tmp_path / ".l.ome.zarr.k1ll3d00.tmp", tmp_path / ".g.geojson.k1ll3d00.tmp",
                 tmp_path / ".l.tif.k1ll3d00.tmp"]
    leftovers[0].mkdir()
    (leftovers[0] / ".zgroup").write_text("{}")
    leftovers[1].write_text('{"type":"FeatureCollection","features":[\n')
    leftovers[2].write_bytes(b"II*\x00")
    for p in leftovers:
        age(p)
    ome_zarr.write_ome_zarr_labels(tmp_path / "l.ome.zarr", labels)
    gj.export_labels_geojson(labels, tmp_path / "g.geojson")
    tiff.write_label_tiff(tmp_path / "l.tif", labels, tile=(16, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.geojson", "l.ome.zarr", "l.tif"]


def test_a_killed_region_accept_is_cleaned_by_the_next_accept(project):
    sid = project.slides()[0]["id"]
    regions = project.folder / "regions"
    regions.mkdir(exist_ok=True)
    killed = regions / ".r00001.q9x8w7v6.tmp"  # what a kill between writing and renaming leaves
    killed.mkdir()
    (killed / "image.png").write_bytes(b"\x89PNG half")
    age(killed)
    fresh = regions / ".r00001.n0wn0wn0.tmp"  # another process accepting right now
    fresh.mkdir()
    rid = project.accept_region(sid, np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8), (0, 0, 8, 8))
    assert rid == "r00001" and not killed.exists() and fresh.exists()
    assert sorted(p.name for p in regions.iterdir()) == [fresh.name, "manifest.jsonl", "r00001"]


# ---------------------------------------------------------------------------------------------
# 4. Ctrl-C during an export

def test_a_cancelled_folder_export_leaves_no_temporary_even_while_other_threads_still_write(tmp_path):
    """zarr's event loop thread finishes the chunk writes it holds after a Ctrl-C interrupts the main
    thread, recreating folders inside the temporary after one delete: none may be left."""
    import threading

    target = tmp_path / "out.ome.zarr"
    target.mkdir()
    (target / "ours.txt").write_bytes(b"the earlier export")
    before = snapshot(target)
    writer = None
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "0").mkdir()

            def late_write():  # a write in flight when the interrupt arrived
                time.sleep(0.08)
                (tmp / "labels" / "0" / "c").mkdir(parents=True, exist_ok=True)
                (tmp / "labels" / "0" / "c" / "0").write_bytes(b"chunk")

            writer = threading.Thread(target=late_write)
            writer.start()
            raise KeyboardInterrupt
    writer.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ome.zarr"]
    assert snapshot(target) == before


def test_ctrl_c_during_an_export_is_one_line_saying_what_is_unchanged(store, tmp_path, capsys, monkeypatch):
    import logging

    from napari_genselfdiff.formats import tiff as tiff_format

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiff_format, "write_label_tiff", interrupted)
    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "level", asyncio_log.level)  # restored after the test
    out = tmp_path / "labels.tif"
    assert main(["export", "--labels", str(store), "--tiff", str(out)]) == 2
    line = one_line_error(capsys)
    assert line.startswith("genselfdiff export: cancelled") and "unchanged" in line
    assert not out.exists()
    # the interrupted writes zarr's loop still holds are not logged at exit after our line
    assert asyncio_log.level >= logging.CRITICAL


def test_a_ctrl_c_after_the_program_finished_is_ignored(store, tmp_path, capsys, monkeypatch):
    """As the program (no argv), once the command has finished and said so a late Ctrl-C cannot kill
    the interpreter while it shuts down (exit -2, no line); called with argv (tests, other code),
    main leaves the handler alone."""
    import signal
    import sys

    default = signal.getsignal(signal.SIGINT)
    try:
        assert main(["export", "--labels", str(store), "--tiff", str(tmp_path / "a.tif")]) == 0
        assert signal.getsignal(signal.SIGINT) is default
        monkeypatch.setattr(sys, "argv", ["genselfdiff", "export", "--labels", str(store), "--tiff",
                                          str(tmp_path / "b.tif")])
        assert main() == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert (tmp_path / "b.tif").is_file()
    finally:
        signal.signal(signal.SIGINT, default)


# ---------------------------------------------------------------------------------------------
# 5. a store of ours that a user put a file into is theirs too

def test_a_user_file_inside_our_store_stops_overwriting_it(tmp_path, capsys):
    make_store(tmp_path / "nuclei.zarr")
    (tmp_path / "nuclei.zarr" / "my_notes.txt").write_bytes(b"counts checked by hand")
    (tmp_path / "nuclei.zarr" / "labels").mkdir(exist_ok=True)
    (tmp_path / "nuclei.zarr" / "labels" / "mine.csv").write_bytes(b"id,grade\n")
    before = snapshot(tmp_path)
    from napari_genselfdiff.slide.store import is_our_store

    assert not is_our_store(tmp_path / "nuclei.zarr")
    with pytest.raises(DataError, match="my_notes.txt"):
        PredictionStore.create_or_resume(tmp_path / "nuclei.zarr", {"slide": "other.png", "level": 0}, 2, (64, 64), 32,
                                         (2, 2), {}, overwrite=True)
    assert main(["demo", "--out", str(tmp_path), "--quick", "--device", "cpu"]) == 2
    line = one_line_error(capsys)
    assert "nuclei.zarr" in line and "Traceback" not in line
    assert snapshot(tmp_path) == before
