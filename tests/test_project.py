"""Annotate-and-refine projects: persistence, atomic accepts, refine with before/after scores,
uncertainty-ranked region suggestions, CLI entry points and clear errors on bad input."""
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from _shapes import he_blobs
from napari_genselfdiff.cli.project import project_cli_create, project_cli_refine, project_cli_status
from napari_genselfdiff.core import checkpoint as ck
from napari_genselfdiff.core.data import LabeledImage, read_image, read_mask
from napari_genselfdiff.core.errors import DataError
from napari_genselfdiff.core.progress import drain
from napari_genselfdiff.core.train.training import FinetuneConfig, finetune
from napari_genselfdiff.project import Project
from napari_genselfdiff.project import store as project_store
from napari_genselfdiff.project.refine import at_model_resolution, split_for_refine, training_mpp

SHAPE = (300, 400)
FAST = dict(patch=32, batch=2, lr=1e-3, warmup=1, checkpoint_every=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _needs_instances():
    """Scoring goes through core.eval.evaluation, which uses the slide room's instance extraction."""
    import napari_genselfdiff.slide.instances  # noqa: F401  (our own module: a failure, never a skip)


_region = he_blobs  # a synthetic H&E-ish region with instance ids 1..n (tests/_shapes.py)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny segmentation model: 3 steps of core fine-tuning on synthetic regions."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("base") / "seg"
    items = [LabeledImage(f"s{i}", *(lambda im, lab: (im, (lab > 0).astype(np.uint8)))(*_region(i)))
             for i in range(3)]
    drain(finetune(items, out, FinetuneConfig(preset="tiny", steps=3, val_every=0, **FAST), device="cpu"))
    return out


@pytest.fixture
def slide_file(tmp_path):
    path = tmp_path / "slides" / "case 01.svs"
    path.parent.mkdir()
    path.write_bytes(b"not read: the shape is given")
    return path


def _project(tmp_path, slide_file, model=None):
    proj = Project.create(tmp_path / "proj", model=model)
    sid = proj.add_slide(slide_file, mpp=0.5, shape=SHAPE)
    return proj, sid


def _same_objects(stored, labels):
    """The store holds ``labels``' objects up to their numbering: the same background and a
    one-to-one map between the two sets of ids > 0."""
    stored, labels = np.asarray(stored), np.asarray(labels)
    np.testing.assert_array_equal(stored > 0, labels > 0)
    pairs = np.unique(np.stack([stored[labels > 0], labels[labels > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# ------------------------------------------------------------------------------ persistence

def test_create_accept_reopen_roundtrip_and_store_writeback(tmp_path, slide_file, glas_dir):
    proj, sid = _project(tmp_path, slide_file)
    assert sid == "case_01"
    img1, lab1 = _region(1)
    img2, lab2 = _region(2, h=40, w=56)
    lab2[lab2 == 2] = 300  # instance ids beyond uint8 -> TIFF mask
    glas_img = read_image(glas_dir / "images" / "train_1.png")[:96, :128]
    glas_mask = read_mask(glas_dir / "masks" / "train_1.png")[:96, :128]
    glas_lab = ndi.label(glas_mask > 0)[0]
    assert glas_lab.max() >= 1
    r1 = proj.accept_region(sid, img1, lab1, (10, 20, 64, 64), author="dr a", model="models/x")
    r2 = proj.accept_region(sid, img2, lab2, (200, 300, 40, 56))
    r3 = proj.accept_region(sid, glas_img, glas_lab, (100, 0, 96, 128), source="import")
    assert (r1, r2, r3) == ("r00001", "r00002", "r00003")
    assert (proj.folder / "regions" / r2 / "mask.tif").is_file()
    assert (proj.folder / "regions" / r1 / "mask.png").is_file()

    lines = (proj.folder / "regions" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3
    rec = json.loads(lines[0])
    assert set(rec) >= {"id", "slide", "level", "bounds", "time", "author", "n_objects", "source", "model"}
    assert rec["bounds"] == [10, 20, 64, 64] and rec["slide"] == sid and rec["author"] == "dr a"
    assert rec["n_objects"] == len(np.unique(lab1)) - 1 and rec["source"] == "correction"
    assert rec["time"].endswith("+00:00") and rec["model"] == "models/x"
    assert json.loads(lines[2])["source"] == "import"

    items_before = proj.training_items()
    reopened = Project.open(proj.folder)
    assert reopened.regions() == proj.regions()
    assert reopened.slides() == proj.slides()
    items = reopened.training_items()
    assert [it.name for it in items] == [r1, r2, r3]
    for a, b in zip(items, items_before):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.target, b.target)
    np.testing.assert_array_equal(items[2].image, glas_img)
    np.testing.assert_array_equal(items[2].target, (glas_mask > 0).astype(np.uint8))
    np.testing.assert_array_equal(reopened.region_arrays(r2)[1], lab2)  # uint16 ids survive

    store = reopened.labels_store(sid)
    assert store.shape == SHAPE and store.dtype == np.int32 and store.chunks == (1024, 1024)
    full = store[:]
    parts = [full[10:74, 20:84], full[200:240, 300:356], full[100:196, 0:128]]
    for part, lab in zip(parts, (lab1, lab2, glas_lab)):
        _same_objects(part, lab)
    ids = [set(np.unique(part[part > 0]).tolist()) for part in parts]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # object ids unique in the store
    outside = np.ones(SHAPE, bool)
    for y, x, h, w in ([10, 20, 64, 64], [200, 300, 40, 56], [100, 0, 96, 128]):
        outside[y:y + h, x:x + w] = False
    assert not full[outside].any()

    shutil.rmtree(proj.folder / "labels" / f"{sid}.zarr")
    assert reopened.labels_store(sid) is None
    np.testing.assert_array_equal(reopened.rebuild_labels_store(sid)[:], full)
    n = reopened.export_geojson(sid, tmp_path / "labels.geojson")
    assert n == len(np.unique(full)) - 1
    assert len(json.loads((tmp_path / "labels.geojson").read_text())["features"]) == n


def test_coarse_level_labels_are_scaled_up_into_the_store(tmp_path, slide_file):
    proj = Project.create(tmp_path / "p")
    sid = proj.add_slide(slide_file, shape=(3000, 2500))
    labels = np.array([[0, 1], [2, 0]], np.int32)
    image = np.full((2, 2, 3), 120, np.uint8)
    proj.accept_region(sid, image, labels, (1020, 8, 8, 4), level=2)
    store = proj.labels_store(sid)
    expected = np.zeros((8, 4), np.int32)
    expected[:4, 2:] = 1
    expected[4:, :2] = 2
    np.testing.assert_array_equal(store[1020:1028, 8:12], expected)
    assert proj.regions()[0]["level"] == 2 and proj.regions()[0]["shape"] == [2, 2]


def test_add_slide_ids_are_stable_and_unique(tmp_path):
    proj = Project.create(tmp_path / "p")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "x.ome.tif").write_bytes(b"")
    first = proj.add_slide(tmp_path / "a" / "x.ome.tif", shape=(10, 10))
    second = proj.add_slide(tmp_path / "b" / "x.ome.tif", shape=(10, 10))
    assert (first, second) == ("x", "x-2")
    assert proj.add_slide(tmp_path / "a" / "x.ome.tif", shape=(10, 10)) == "x"
    assert [s["id"] for s in Project.open(proj.folder).slides()] == ["x", "x-2"]
    with pytest.raises(DataError, match="no such slide file"):
        proj.add_slide(tmp_path / "missing.svs", shape=(10, 10))


# ------------------------------------------------------------------------------ label store ids, replaced regions

def _export_features(proj, sid, path):
    n = proj.export_geojson(sid, path)
    features = json.loads(path.read_text())["features"]
    assert len(features) == n
    return features


def test_object_ids_are_unique_per_store_so_an_export_has_one_feature_per_object(tmp_path, slide_file):
    """Two regions numbered 1..n each (and a binary one) export as one Polygon per object, not
    as objects merged across regions into MultiPolygons far apart."""
    proj, sid = _project(tmp_path, slide_file)
    img1, lab1 = _region(1, n_blobs=4)
    img2, lab2 = _region(2, n_blobs=4)
    assert set(np.unique(lab1)) == set(np.unique(lab2)) == {0, 1, 2, 3, 4}  # the same ids in both
    binary = (_region(3, n_blobs=3)[1] > 0).astype(np.uint8)  # one id, separate blobs
    n_binary = ndi.label(binary)[1]
    proj.accept_region(sid, img1, lab1, (0, 0, 64, 64))
    proj.accept_region(sid, img2, lab2, (200, 300, 64, 64))
    proj.accept_region(sid, img1, binary, (0, 300, 64, 64))
    total = sum(r["n_objects"] for r in proj.regions())
    assert total == 4 + 4 + n_binary

    features = _export_features(proj, sid, tmp_path / "labels.geojson")
    assert len(features) == total
    assert {f["geometry"]["type"] for f in features} == {"Polygon"}
    assert len({f["properties"]["label_id"] for f in features}) == total
    store = proj.labels_store(sid)
    assert store.attrs["max_id"] == total
    # the rebuilt store numbers its objects the same way
    np.testing.assert_array_equal(proj.rebuild_labels_store(sid)[:], store[:])


def test_a_region_over_accepted_objects_replaces_them_and_keeps_ids_unique(tmp_path, slide_file):
    proj, sid = _project(tmp_path, slide_file)
    img, lab = _region(4, n_blobs=4)
    proj.accept_region(sid, img, lab, (0, 0, 64, 64))
    before = proj.labels_store(sid)[:].copy()
    img2, lab2 = _region(5, n_blobs=4)
    proj.accept_region(sid, img2, lab2, (32, 32, 64, 64))  # overlaps the first region's corner
    full = proj.labels_store(sid)[:]
    new = full[32:96, 32:96]
    _same_objects(new, lab2)
    old_ids = set(np.unique(before[before > 0]).tolist())
    assert not old_ids & set(np.unique(new).tolist())  # the old objects there are gone, none reused
    outside = np.ones(SHAPE, bool)
    outside[32:96, 32:96] = False
    np.testing.assert_array_equal(full[outside], before[outside])  # the rest of the first region is kept
    features = _export_features(proj, sid, tmp_path / "labels.geojson")
    assert len(features) == len(np.unique(full)) - 1


def test_a_store_written_before_unique_ids_is_rebuilt_on_the_next_accept(tmp_path, slide_file):
    import zarr

    proj, sid = _project(tmp_path, slide_file)
    img, lab = _region(1, n_blobs=3)
    proj.accept_region(sid, img, lab, (0, 0, 64, 64))
    path = proj.folder / "labels" / f"{sid}.zarr"
    old = zarr.create_array(str(path), shape=SHAPE, chunks=(1024, 1024), dtype="int32", fill_value=0,
                            zarr_format=3, overwrite=True)  # the old layout: ids 1..n, no max_id
    old[0:64, 0:64] = lab
    proj.accept_region(sid, img, lab, (100, 100, 64, 64))
    full = proj.labels_store(sid)[:]
    assert len(np.unique(full)) - 1 == 6 and proj.labels_store(sid).attrs["max_id"] == 6


def test_multiclass_labels_keep_their_class_ids_in_the_store(tmp_path, slide_file):
    proj = Project.create(tmp_path / "m", task="multiclass", class_names=["bg", "a", "b"])
    sid = proj.add_slide(slide_file, shape=SHAPE)
    labels = np.zeros((8, 8), np.uint8)
    labels[:4], labels[4:, :4] = 2, 1
    proj.accept_region(sid, np.zeros((8, 8, 3), np.uint8), labels, (0, 0, 8, 8))
    proj.accept_region(sid, np.zeros((8, 8, 3), np.uint8), labels, (8, 8, 8, 8))
    np.testing.assert_array_equal(proj.labels_store(sid)[8:16, 8:16], labels)


def test_accepting_the_same_bounds_again_replaces_the_region(tmp_path, slide_file):
    proj, sid = _project(tmp_path, slide_file)
    img1, lab1 = _region(1)
    img2, lab2 = _region(2)
    img3, lab3 = _region(3, n_blobs=5)
    r1 = proj.accept_region(sid, img1, lab1, (0, 0, 64, 64))
    r2 = proj.accept_region(sid, img2, lab2, (100, 100, 64, 64))
    old_files = {p.name: p.read_bytes() for p in (proj.folder / "regions" / r1).iterdir()}
    r3 = proj.accept_region(sid, img3, lab3, (0, 0, 64, 64))  # Accept pressed again over the first
    assert (r1, r2, r3) == ("r00001", "r00002", "r00003")
    assert [r["id"] for r in proj.regions()] == [r2, r3] and proj.regions()[1]["replaces"] == [r1]
    manifest = (proj.folder / "regions" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in manifest] == [r2, r3]
    reopened = Project.open(proj.folder)
    assert [r["id"] for r in reopened.regions()] == [r2, r3]
    items = reopened.training_items()
    assert [it.name for it in items] == [r2, r3]
    for seed in range(6):  # refine's held-out split can never hold the region twice
        split = split_for_refine(items, 0.5, seed)
        names = [it.name for it in split.train + split.val]
        assert sorted(names) == [r2, r3] and r1 not in names
    _same_objects(reopened.labels_store(sid)[0:64, 0:64], lab3)
    _same_objects(reopened.rebuild_labels_store(sid)[0:64, 0:64], lab3)
    # the earlier correction's files are kept untouched (named by no line); its id is never reused
    assert {p.name: p.read_bytes() for p in (proj.folder / "regions" / r1).iterdir()} == old_files
    assert reopened.accept_region(sid, img1, lab1, (0, 0, 64, 64)) == "r00004"
    assert [r["id"] for r in reopened.regions()] == [r2, "r00004"]
    # other bounds, or the same bounds at another level, are another region
    reopened.accept_region(sid, img1[:32, :32], lab1[:32, :32], (0, 0, 64, 64), level=1)
    assert len(reopened.regions()) == 3


# ------------------------------------------------------------------------------ atomicity

def test_failed_accept_leaves_nothing_and_project_still_opens(tmp_path, slide_file, monkeypatch):
    proj, sid = _project(tmp_path, slide_file)
    img, lab = _region(0)
    proj.accept_region(sid, img, lab, (0, 0, 64, 64))
    real = project_store._write_png

    def fail_on_mask(path, array):
        if path.name == "mask.png":
            raise OSError("disk full")
        real(path, array)

    monkeypatch.setattr(project_store, "_write_png", fail_on_mask)
    with pytest.raises(OSError, match="disk full"):
        proj.accept_region(sid, img, lab, (64, 64, 64, 64))
    monkeypatch.undo()

    assert len((proj.folder / "regions" / "manifest.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in (proj.folder / "regions").iterdir()) == ["manifest.jsonl", "r00001"]
    assert not proj.labels_store(sid)[64:128, 64:128].any()  # nothing written back either
    reopened = Project.open(proj.folder)
    assert [r["id"] for r in reopened.regions()] == ["r00001"]
    assert reopened.accept_region(sid, img, lab, (64, 64, 64, 64)) == "r00002"


def test_truncated_manifest_line_is_ignored_with_a_warning_and_cut_on_next_accept(tmp_path, slide_file):
    proj, sid = _project(tmp_path, slide_file)
    img, lab = _region(0)
    proj.accept_region(sid, img, lab, (0, 0, 64, 64))
    manifest = proj.folder / "regions" / "manifest.jsonl"
    with open(manifest, "a") as f:
        f.write('{"id": "r00002", "slide": "case_01", "bou')  # a crash mid-append
    (proj.folder / "regions" / "r00002").mkdir()  # its folder was renamed in before the crash
    with pytest.warns(UserWarning, match="truncated last line"):
        reopened = Project.open(proj.folder)
    assert [r["id"] for r in reopened.regions()] == ["r00001"]
    assert reopened.accept_region(sid, img, lab, (0, 64, 64, 64)) == "r00003"  # the orphan id is not reused
    lines = manifest.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["r00001", "r00003"]
    assert [r["id"] for r in Project.open(proj.folder).regions()] == ["r00001", "r00003"]


def test_damaged_manifest_line_in_the_middle_is_an_error(tmp_path, slide_file):
    proj, sid = _project(tmp_path, slide_file)
    img, lab = _region(0)
    proj.accept_region(sid, img, lab, (0, 0, 64, 64))
    manifest = proj.folder / "regions" / "manifest.jsonl"
    manifest.write_text("{oops\n" + manifest.read_text())
    with pytest.raises(DataError, match="manifest.jsonl: line 1 is damaged"):
        Project.open(proj.folder)


# ------------------------------------------------------------------------------ refine

def test_refine_records_scores_and_switches_model_cancel_keeps_it(tmp_path, slide_file, base_model):
    _needs_instances()
    proj, sid = _project(tmp_path, slide_file, model=base_model)
    assert proj.current_model == base_model.absolute()
    for i in range(3):
        img, lab = _region(10 + i)
        proj.accept_region(sid, img, lab, (0, 64 * i, 64, 64), model=str(base_model))

    events = list(proj.refine(steps=3, device="cpu", **FAST))
    last = events[-1]
    assert last.done and [e.done for e in events].count(True) == 1
    assert any("held-out" in e.message for e in events)
    before, after = last.metrics["before"], last.metrics["after"]
    assert isinstance(before, float) and isinstance(after, float)
    assert 0 <= before <= 1 and 0 <= after <= 1
    new = proj.folder / "models" / "refine-1"
    assert last.checkpoint == str(new)
    assert ck.load_config(new)["training"]["steps"] == 3
    current = new if after >= before else base_model.absolute()  # a model that scores lower is kept aside
    assert Project.open(proj.folder).current_model == current
    (rec,) = proj.history()
    assert rec["status"] == "finished" and rec["before"] == before and rec["after"] == after
    assert rec["adopted"] == (after >= before)
    assert rec["base_model"] == str(base_model.absolute()) and rec["new_model"] == "models/refine-1"
    assert sorted(rec["train_regions"] + rec["val_regions"]) == ["r00001", "r00002", "r00003"]
    assert len(rec["val_regions"]) == 1

    gen = proj.refine(steps=3, device="cpu", **FAST)
    for ev in gen:
        if ev.stage == "finetune" and ev.step == 1:
            break
    gen.close()
    assert Project.open(proj.folder).current_model == current  # unchanged
    assert ck.load_config(proj.folder / "models" / "refine-2")["training"]["steps"] == 1
    assert [h["status"] for h in proj.history()] == ["finished", "cancelled"]
    assert proj.history()[1]["base_model"] == proj.relative(current)

    # Cancel inside a step (the widget's stop event): the run ends there, recorded as cancelled, never scored
    import threading

    import torch
    from napari_genselfdiff.core.progress import stoppable

    stop, handles = threading.Event(), []
    with stoppable(stop):
        events = []
        try:
            for ev in proj.refine(steps=3, device="cpu", **FAST):
                events.append(ev)
                if ev.stage == "finetune" and ev.step == 1 and not handles:
                    handles.append(torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: stop.set()))
        finally:
            for h in handles:
                h.remove()
    assert stop.is_set() and not any(e.done for e in events)
    assert not any("scoring the refined" in (e.message or "") for e in events)
    assert [h["status"] for h in proj.history()] == ["finished", "cancelled", "cancelled"]
    assert Project.open(proj.folder).current_model == current


def test_refine_with_one_region_validates_on_it_and_says_so(tmp_path, slide_file, base_model):
    _needs_instances()
    proj, sid = _project(tmp_path, slide_file, model=base_model)
    proj.accept_region(sid, *_region(5), (0, 0, 64, 64))
    messages = []
    last = drain(proj.refine(steps=1, device="cpu", **FAST),
                 on_event=lambda e: e.message and messages.append(e.message))
    assert last.done
    assert any("fewer than 2 regions" in m for m in messages)
    assert proj.history()[0]["val_regions"] == ["r00001"] == proj.history()[0]["train_regions"]


def test_refine_refuses_when_every_mask_is_empty(tmp_path, slide_file, base_model):
    proj, sid = _project(tmp_path, slide_file, model=base_model)
    img, _ = _region(0)
    proj.accept_region(sid, img, np.zeros((64, 64), np.uint8), (0, 0, 64, 64))  # a valid correction
    proj.accept_region(sid, img, np.zeros((64, 64), np.uint8), (0, 64, 64, 64))
    assert proj.regions()[0]["n_objects"] == 0
    with pytest.raises(DataError, match="every training mask is empty"):
        next(proj.refine(steps=2, device="cpu", **FAST))
    assert not (proj.folder / "models" / "refine-1").exists()
    with pytest.raises(DataError, match="unknown refine setting"):
        next(proj.refine(steps=2, bogus=1))


# ------------------------------------------------------------------------------ suggestions

def _two_class(p_fg):
    return np.stack([1 - p_fg, p_fg], axis=1).astype(np.float32)


def _uncertain_where_green_is_high(tiles):
    """Fake probabilities: 0.5/0.5 on pixels whose green is > 128, 0.99/0.01 elsewhere."""
    return _two_class(np.where(tiles[..., 1] > 128, 0.5, 0.01))


def _test_image():
    """256 x 256: left half glass (uniform 235), right half textured tissue; its top-right
    quadrant has green > 128 (where the fake model is unsure), the bottom-right green < 100."""
    rng = np.random.default_rng(0)
    img = np.full((256, 256, 3), 235, np.uint8)
    tissue = np.stack([rng.integers(120, 220, (256, 128)), rng.integers(0, 90, (256, 128)),
                       rng.integers(120, 220, (256, 128))], -1)
    tissue[:128, :, 1] += 140  # green 140..229 in the top-right quadrant
    img[:, 128:] = tissue
    return img


def test_suggest_regions_ranks_the_uncertain_quadrant_first_and_skips_reviewed(tmp_path, slide_file):
    proj = Project.create(tmp_path / "p")
    sid = proj.add_slide(slide_file, shape=(256, 256))
    img = _test_image()
    sugg = proj.suggest_regions(_uncertain_where_green_is_high, img, region_size=64, top_k=16, slide_id=sid)
    assert len(sugg) == 8  # the 8 glass cells of the left half are skipped
    assert all(s["bounds"][1] >= 128 for s in sugg)
    top = [s for s in sugg if s["bounds"][0] < 128]
    assert len(top) == 4 and sugg[:4] == top  # top-right quadrant first, all with entropy 1
    assert sugg[0]["bounds"] == [0, 128, 64, 64]
    assert all(s["score"] == pytest.approx(1.0) for s in top)
    h = -(0.99 * math.log(0.99) + 0.01 * math.log(0.01)) / math.log(2)  # confident elsewhere
    assert all(s["score"] == pytest.approx(h, rel=1e-4) for s in sugg[4:])

    for s in top:
        proj.mark_reviewed(sid, s["bounds"])
    proj.accept_region(sid, img[128:192, 128:192], np.zeros((64, 64), np.uint8), (128, 128, 64, 64))
    again = Project.open(proj.folder).suggest_regions(_uncertain_where_green_is_high, img, region_size=64,
                                                      top_k=16, slide_id=sid)
    assert [s["bounds"] for s in again] == [[128, 192, 64, 64], [192, 128, 64, 64], [192, 192, 64, 64]]
    assert len(proj.reviewed(sid)) == 4
    everything = proj.suggest_regions(_uncertain_where_green_is_high, img, region_size=64, top_k=16,
                                      slide_id=sid, exclude_reviewed=False)
    assert len(everything) == 8


class _WithAMap:
    """The same fake classes, then a map channel (as a nuclei model's distance map) that would
    change every entropy if it were read as a class."""

    num_classes = 2

    def __call__(self, tiles):
        two = _uncertain_where_green_is_high(tiles)
        return np.concatenate([two, np.full_like(two[:, :1], 0.7)], axis=1)


def test_suggestions_score_the_classes_not_a_map_after_them(tmp_path, slide_file):
    proj = Project.create(tmp_path / "p")
    sid = proj.add_slide(slide_file, shape=(256, 256))
    img = _test_image()
    plain = proj.suggest_regions(_uncertain_where_green_is_high, img, region_size=64, top_k=16, slide_id=sid)
    mapped = proj.suggest_regions(_WithAMap(), img, region_size=64, top_k=16, slide_id=sid)
    assert [s["bounds"] for s in mapped] == [s["bounds"] for s in plain]
    assert [s["score"] for s in mapped] == pytest.approx([s["score"] for s in plain])
    assert mapped[0]["score"] == pytest.approx(1.0)


def test_suggest_regions_tissue_mask_subsampling_and_slide_objects(tmp_path):
    proj = Project.create(tmp_path / "p")
    img = _test_image()
    mask = np.zeros((16, 16), bool)
    mask[8:, 8:] = True  # only the bottom-right quadrant counts as tissue
    sugg = proj.suggest_regions(_uncertain_where_green_is_high, img, region_size=64, top_k=16, tissue_mask=mask)
    assert sorted(s["bounds"][:2] for s in sugg) == [[128, 128], [128, 192], [192, 128], [192, 192]]
    few = proj.suggest_regions(_uncertain_where_green_is_high, img, region_size=32, top_k=100, max_candidates=5)
    assert len(few) <= 5
    assert few == proj.suggest_regions(_uncertain_where_green_is_high, img, region_size=32, top_k=100,
                                       max_candidates=5)  # deterministic subsample

    class Pyramid:  # a 2-level slide-like object: level 1 is a 2x downsample
        levels = [img, img[::2, ::2]]
        downsamples = [1.0, 2.0]
        shape = img.shape

        def read_region(self, level, y, x, h, w):
            return self.levels[level][y:y + h, x:x + w]

    coarse = proj.suggest_regions(_uncertain_where_green_is_high, Pyramid(), region_size=32, level=1, top_k=1)
    assert coarse[0]["bounds"] == [0, 128, 64, 64] and coarse[0]["level"] == 1


def test_suggestion_scoring_reports_progress_and_stops_when_closed(tmp_path):
    proj = Project.create(tmp_path / "p")
    img = _test_image()
    calls = []

    def counting(tiles):
        calls.append(len(tiles))
        return _uncertain_where_green_is_high(tiles)

    events = proj.iter_suggest_regions(counting, img, region_size=32, top_k=3, batch=4)
    first, second = next(events), next(events)
    assert first.stage == "suggest" and first.step == 0 and second.step == 4 and first.total == second.total > 8
    assert len(calls) == 1
    events.close()  # a cancel: nothing more is scored
    assert len(calls) == 1
    everything = list(proj.iter_suggest_regions(counting, img, region_size=32, top_k=3, batch=4))
    assert everything[-1].done and everything[-1].step == everything[-1].total
    assert proj.suggest_regions(_uncertain_where_green_is_high, img, region_size=32, top_k=3, batch=4) \
        == proj.suggest_regions(_uncertain_where_green_is_high, img, region_size=32, top_k=3, batch=32)


def test_flip_disagreement_matches_hand_computed_entropies(tmp_path):
    proj_img = _test_image()[:, 128:]  # all tissue

    def sided(tiles):  # depends on the pixel position: unstable under a horizontal flip
        w = tiles.shape[2]
        p = np.where(np.arange(w) < w // 2, 0.9, 0.1)
        return _two_class(np.broadcast_to(p, tiles.shape[:3]))

    def h2(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)

    proj = Project.create(tmp_path / "p")
    (s,) = proj.suggest_regions(sided, proj_img[:64, :64], region_size=64, top_k=1, flips=True)
    # identity and vertical flip: left 0.9, right 0.1; horizontal flip: left 0.1, right 0.9
    assert s["score"] == pytest.approx(h2((0.9 + 0.1 + 0.9) / 3), rel=1e-4)
    assert s["disagreement"] == pytest.approx(h2((0.9 + 0.1 + 0.9) / 3) - h2(0.9), rel=1e-4)
    (plain,) = proj.suggest_regions(sided, proj_img[:64, :64], region_size=64, top_k=1)
    assert plain["score"] == pytest.approx(h2(0.9), rel=1e-4) and plain["disagreement"] == 0


def test_suggest_regions_with_a_real_predictor(tmp_path, base_model):
    from napari_genselfdiff.core.inference import TorchPredictor
    proj = Project.create(tmp_path / "p", model=base_model)
    predictor = TorchPredictor.from_checkpoint(proj.current_model, device="cpu")
    sugg = proj.suggest_regions(predictor, _test_image(), region_size=40, top_k=3)  # 40: padded to 48
    assert len(sugg) == 3 and all(0 <= s["score"] <= 1 for s in sugg)
    assert [s["score"] for s in sugg] == sorted((s["score"] for s in sugg), reverse=True)


# ------------------------------------------------------------------------------ bad input

def test_bad_input_raises_clear_data_errors(tmp_path, slide_file):
    proj, sid = _project(tmp_path, slide_file)
    img, lab = _region(0)
    with pytest.raises(DataError, match=r"image is 64x64 .* labels are 64x60"):
        proj.accept_region(sid, img, lab[:, :60], (0, 0, 64, 60))
    with pytest.raises(DataError, match=r"\(h, w, 3\) uint8"):
        proj.accept_region(sid, img[..., 0], lab, (0, 0, 64, 64))
    with pytest.raises(DataError, match="bounds say the level-0 region is 32x32"):
        proj.accept_region(sid, img, lab, (0, 0, 32, 32))
    with pytest.raises(DataError, match="start outside slide"):
        proj.accept_region(sid, img, lab, (400, 0, 64, 64))
    with pytest.raises(DataError, match="unknown slide id 'nope'.*case_01"):
        proj.accept_region("nope", img, lab, (0, 0, 64, 64))
    with pytest.raises(DataError, match="unknown slide id"):
        proj.mark_reviewed("nope", (0, 0, 1, 1))
    assert proj.regions() == [] and not (proj.folder / "regions" / "manifest.jsonl").exists()

    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a napari-genselfdiff project"):
        Project.open(tmp_path / "plain")
    with pytest.raises(DataError, match="no such project folder"):
        Project.open(tmp_path / "absent")
    (tmp_path / "plain" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not an empty folder"):
        Project.create(tmp_path / "plain")
    with pytest.raises(DataError, match="already a project"):
        Project.create(proj.folder)
    meta = json.loads((proj.folder / "project.json").read_text())
    (proj.folder / "project.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataError, match="newer napari-genselfdiff"):
        Project.open(proj.folder)
    with pytest.raises(DataError, match="3 class names"):
        Project.create(tmp_path / "q", class_names=["a", "b", "c"])
    assert Project.create(tmp_path / "m", task="multiclass", class_names=["bg", "a", "b"]).spec.num_classes == 3


# ------------------------------------------------------------------------------ CLI

def test_cli_create_refine_status(tmp_path, slide_file, base_model, capsys):
    _needs_instances()
    folder = tmp_path / "cli"
    assert project_cli_create(SimpleNamespace(folder=str(folder), model=str(base_model), slides=None)) == 0
    proj = Project.open(folder)
    sid = proj.add_slide(slide_file, shape=SHAPE)
    for i in range(2):
        proj.accept_region(sid, *_region(20 + i), (0, 64 * i, 64, 64))
    args = SimpleNamespace(folder=str(folder), steps=2, device="cpu", val_fraction="all", patch=32, batch=2,
                           lr=1e-3)
    assert project_cli_refine(args) == 0
    out = capsys.readouterr()
    assert "models/refine-1" in out.out and "as asked" in out.err
    assert project_cli_status(SimpleNamespace(folder=str(folder))) == 0
    text = capsys.readouterr().out
    assert "slide case_01: 2 region(s)" in text and "last refine (finished" in text
    assert project_cli_status(SimpleNamespace(folder=str(folder), json=True)) == 0
    status = json.loads(capsys.readouterr().out)
    last = status["last_refine"]
    assert status["regions"] == 2 and last["new_model"] == "models/refine-1"
    assert status["current_model"].endswith("refine-1") == (last["after"] >= last["before"])


def test_slide_added_by_path_is_read_for_its_shape_and_suggested_by_id(tmp_path, glas_dir):
    import napari_genselfdiff.slide.reader  # noqa: F401
    path = glas_dir / "images" / "train_1.png"
    image = read_image(path)
    proj = Project.create(tmp_path / "p")
    sid = proj.add_slide(path)
    assert proj.slide(sid)["shape"] == list(image.shape[:2]) and sid == "train_1"
    by_id = proj.suggest_regions(_uncertain_where_green_is_high, sid, region_size=128, top_k=3)
    assert by_id == proj.suggest_regions(_uncertain_where_green_is_high, image, region_size=128, top_k=3,
                                         slide_id=sid)
    assert len(by_id) == 3


def test_regions_are_rescaled_to_the_model_resolution_for_refine(tmp_path, slide_file):
    """A model trained at 1.0 um/px refines on full-resolution regions of a 0.5 um/px slide at half size."""
    proj = Project.create(tmp_path / "p")
    sid = proj.add_slide(slide_file, mpp=0.5, shape=SHAPE)
    img = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    lab = np.zeros((64, 96), np.int32)
    lab[10:30, 20:60] = 1
    proj.accept_region(sid, img, lab, (0, 0, 64, 96))
    items = proj.training_items()
    half = at_model_resolution(proj, items, 1.0)
    assert half[0].image.shape == (32, 48, 3) and half[0].target.shape == (32, 48)
    assert half[0].target.sum() == 10 * 20  # a 20x40 box becomes 10x20
    assert at_model_resolution(proj, items, 0.52)[0].image.shape == (64, 96, 3)  # within 10%: untouched
    assert at_model_resolution(proj, items, None)[0] is items[0]


def test_coarse_level_regions_are_rescaled_by_their_own_resolution(tmp_path, slide_file):
    """A region accepted at a coarser level already has fewer microns per pixel than level 0: a
    level-1 region of a 0.5 um/px slide is at 1.0 um/px, so a 1.0 um/px model takes it as it is, a
    0.5 um/px model gets it doubled, and the project's own training mpp is 1.0."""
    proj = Project.create(tmp_path / "p")
    sid = proj.add_slide(slide_file, mpp=0.5, shape=SHAPE)
    img = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    lab = np.zeros((32, 48), np.int32)
    lab[5:15, 10:30] = 1
    proj.accept_region(sid, img, lab, (0, 0, 64, 96), level=1)
    items = proj.training_items()
    assert at_model_resolution(proj, items, 1.0)[0].image.shape == (32, 48, 3)
    doubled = at_model_resolution(proj, items, 0.5)[0]
    assert doubled.image.shape == (64, 96, 3) and doubled.target.sum() == 4 * 10 * 20
    assert training_mpp(proj, None) == pytest.approx(1.0)
    proj.accept_region(sid, img[:16, :24], lab[:16, :24], (100, 100, 16, 24))  # level 0: 0.5 um/px
    assert training_mpp(proj, None) is None  # regions disagree: no single resolution to record


class _At05:
    """The same fake classes from a model that learned 0.5 um/px, recording what it was given."""

    num_classes = 2
    mpp = 0.5

    def __init__(self):
        self.shapes = []

    def __call__(self, tiles):
        self.shapes.append(tiles.shape[1:3])
        return _uncertain_where_green_is_high(tiles)


def test_suggestions_score_a_level_at_the_models_resolution(tmp_path, slide_file):
    """A level at 0.25 um/px is scored by a 0.5 um/px model on regions resampled to its pixel size
    (64-px cells seen as 32 px), and ranks them as at its own resolution."""
    from napari_genselfdiff.slide.consistency import image_slide

    proj = Project.create(tmp_path / "p")
    sid = proj.add_slide(slide_file, shape=(256, 256))
    img = _test_image()
    model = _At05()
    sugg = proj.suggest_regions(model, image_slide(img, mpp=0.25), region_size=64, top_k=16, slide_id=sid)
    assert model.shapes and all(s == (32, 32) for s in model.shapes)
    assert [s["bounds"][0] < 128 for s in sugg[:4]] == [True] * 4 and all(s["bounds"][1] >= 128 for s in sugg)
    model.shapes.clear()
    proj.suggest_regions(model, image_slide(img, mpp=0.5), region_size=64, top_k=16, slide_id=sid)
    assert model.shapes and all(s == (64, 64) for s in model.shapes)  # at the model's own: as it is
