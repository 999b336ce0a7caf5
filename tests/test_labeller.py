"""Instance labelling alongside prediction (slide/labeller.py): a second process labels the blocks
of a slide while the first predicts the rest; the labels must be exactly those made afterwards."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import zarr

from napari_genselfdiff.slide import labeller, tiler
from napari_genselfdiff.slide.tiler import predict_slide

from test_tiler import BLOCK, OVERLAP, TILE, DistancePredictor, PixelPredictor
from test_tiler import slide_path  # noqa: F401  (the module-scoped 1024^2 test slide)

CASES = {
    "glands": (PixelPredictor, dict(postprocess="glands", min_size=30)),
    "nuclei": (PixelPredictor, dict(postprocess="nuclei", min_size=4, postprocess_options={"halo": 48})),
    "nuclei with a distance map": (DistancePredictor, dict(
        postprocess="nuclei", min_size=4, class_names=("background", "nucleus", "boundary"),
        postprocess_options={"halo": 48, "distance_h": 0.05})),
}


def _labels(out):
    group = zarr.open_group(out, mode="r")
    kind = next(iter(group["labels"].group_keys()))
    attrs = dict(group[f"labels/{kind}"].attrs)
    return np.asarray(group[f"labels/{kind}/0"][...]), {k: attrs.get(k) for k in ("complete", "count", "truncated", "conflicts")}


class Spy:
    """Records the labelling child a run started (tiler.start_alongside's result)."""

    def __init__(self, monkeypatch, command=None):
        self.children = []
        real = labeller.start_alongside

        def start(*args, **kwargs):
            if command is not None:
                return labeller.LabellingAlongside(args[0].path, args[1], min_size=kwargs["min_size"],
                                                   options=kwargs["options"], done=np.zeros((4, 4), bool),
                                                   command=command)
            child = real(*args, **kwargs)
            self.children.append(child)
            return child
        monkeypatch.setattr(tiler, "start_alongside", start)


@pytest.mark.parametrize("case", list(CASES))
def test_labels_made_alongside_equal_labels_made_afterwards(slide_path, tmp_path, monkeypatch, case):  # noqa: F811
    make, kwargs = CASES[case]
    list(predict_slide(make(), slide_path, tmp_path / "after.zarr", tile=TILE, overlap=OVERLAP, block=BLOCK,
                       label_alongside=False, **kwargs))
    spy = Spy(monkeypatch)
    events = list(predict_slide(make(), slide_path, tmp_path / "along.zarr", tile=TILE, overlap=OVERLAP,
                                block=BLOCK, label_alongside=True, **kwargs))
    # the child ran, to its end, and the run said it was done only after it
    (child,) = spy.children
    assert child is not None and child.proc.returncode == 0
    assert events[-1].done and [e.stage for e in events].count("postprocess") >= 1
    after, after_attrs = _labels(tmp_path / "after.zarr")
    along, along_attrs = _labels(tmp_path / "along.zarr")
    assert after.max() > 20
    np.testing.assert_array_equal(along, after)  # the same ids, not only the same objects
    assert along_attrs == after_attrs and along_attrs["complete"]


def test_small_slides_label_in_process_unless_asked(slide_path, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv(labeller.ENV, raising=False)
    spy = Spy(monkeypatch)
    list(predict_slide(PixelPredictor(), slide_path, tmp_path / "s.zarr", tile=TILE, overlap=OVERLAP, block=BLOCK,
                       postprocess="glands", min_size=30))
    assert spy.children == [None] and 1024 * 1024 < labeller.MIN_PIXELS
    assert _labels(tmp_path / "s.zarr")[1]["complete"]


def test_a_failing_child_costs_only_time(slide_path, tmp_path, monkeypatch):  # noqa: F811
    Spy(monkeypatch, command=[sys.executable, "-c", "import sys; print('no luck'); sys.exit(3)"])
    events = list(predict_slide(PixelPredictor(), slide_path, tmp_path / "f.zarr", tile=TILE, overlap=OVERLAP,
                                block=BLOCK, postprocess="glands", min_size=30, label_alongside=True))
    said = [e.message for e in events if e.message]
    assert any("exit code 3" in m and "no luck" in m and "in this process instead" in m for m in said)
    list(predict_slide(PixelPredictor(), slide_path, tmp_path / "ref.zarr", tile=TILE, overlap=OVERLAP,
                       block=BLOCK, postprocess="glands", min_size=30, label_alongside=False))
    got, attrs = _labels(tmp_path / "f.zarr")
    assert attrs["complete"]
    np.testing.assert_array_equal(got, _labels(tmp_path / "ref.zarr")[0])


def test_a_cancelled_run_stops_its_child_and_the_next_run_labels_again(slide_path, tmp_path, monkeypatch):  # noqa: F811
    spy = Spy(monkeypatch)
    out = tmp_path / "c.zarr"
    kwargs = dict(tile=TILE, overlap=OVERLAP, block=BLOCK, postprocess="nuclei", min_size=4,
                  postprocess_options={"halo": 48}, label_alongside=True)
    gen = predict_slide(PixelPredictor(), slide_path, out, **kwargs)
    for event in gen:
        if event.blocks_done == 6:
            break
    gen.close()
    (child,) = spy.children
    assert child.proc.poll() is not None  # stopped, not left running
    group = zarr.open_group(out, mode="r")
    assert "nuclei" not in group.get("labels", {}) or not dict(group["labels/nuclei"].attrs).get("complete")
    list(predict_slide(PixelPredictor(), slide_path, out, **kwargs))
    list(predict_slide(PixelPredictor(), slide_path, tmp_path / "ref.zarr", **{**kwargs, "label_alongside": False}))
    got, attrs = _labels(out)
    assert attrs["complete"] and spy.children[1].proc.returncode == 0
    np.testing.assert_array_equal(got, _labels(tmp_path / "ref.zarr")[0])


def test_the_gate_reads_only_blocks_the_parent_released():
    said = []
    stream = io.StringIO("0 1\n1 0\nall\n")
    gate = labeller._Gate((3, 3), 100, stream, said.append)
    gate.ready[0, 0] = True
    gate.wait(0, 100, 0, 100)  # block (0, 0) is there: nothing read, nothing said
    assert stream.tell() == 0 and said == []
    gate.wait(0, 100, 50, 150)  # needs (0, 1): one line read, idle meanwhile
    assert gate.ready.sum() == 2 and not gate.ready[1, 0] and said == [{"busy": False}, {"busy": True}]
    gate.wait(150, 300, 0, 300)  # needs rows 1-2: read up to "all"
    assert gate.ready.all()
    with pytest.raises(SystemExit):  # the parent went away before releasing what is needed
        labeller._Gate((1, 1), 100, io.StringIO(""), said.append).wait(0, 10, 0, 10)
    probs = np.arange(2 * 300 * 300, dtype=np.uint8).reshape(2, 300, 300)
    view = labeller._GatedProbabilities(probs, gate)
    assert view.shape == (2, 300, 300)
    np.testing.assert_array_equal(view[1, 10:20, 250:300], probs[1, 10:20, 250:300])


class Sharing(PixelPredictor):
    def __init__(self):
        super().__init__()
        self.shared = []

    def share_cpu(self, cores):
        self.shared.append(cores)


def test_the_predictor_gives_a_core_up_only_while_the_child_labels(tmp_path):
    child = labeller.LabellingAlongside(tmp_path / "none.zarr", "nuclei", min_size=None,
                                        options={}, done=np.zeros((2, 2), bool),
                                        command=[sys.executable, "-c", "import sys; sys.stdin.read()"])
    pred = Sharing()
    try:
        child.pace(pred)
        assert pred.shared == []  # idle child: all cores to the predictor
        child.busy = True
        child.pace(pred)
        child.pace(pred)
        assert pred.shared == [1]  # once, not every call
        child.busy = False
        child.pace(pred)
        child.busy = True
        child.pace(pred)
        assert pred.shared == [1, 0, 1]
    finally:
        child.close()
    assert pred.shared == [1, 0, 1, 0] and child.proc.poll() is not None


def test_torch_predictor_shares_cores_and_gives_them_back():
    import torch

    from napari_genselfdiff.bundled import resolve_model
    from napari_genselfdiff.core.inference import TorchPredictor

    pred = TorchPredictor.from_checkpoint(resolve_model("nuclei"), device="cpu")
    before = torch.get_num_threads()
    try:
        pred.share_cpu(1)
        assert torch.get_num_threads() == max(1, before - 1)
        pred.share_cpu(1)  # asked again: still one fewer than before, not two
        assert torch.get_num_threads() == max(1, before - 1)
    finally:
        pred.share_cpu(0)
    assert torch.get_num_threads() == before


def test_the_environment_can_rule_the_child_in_or_out(monkeypatch):
    from napari_genselfdiff.core.errors import GenSelfDiffError

    big, small = labeller.MIN_PIXELS, labeller.MIN_PIXELS - 1
    monkeypatch.delenv(labeller.ENV, raising=False)
    assert labeller.by_default(big) and not labeller.by_default(small)
    monkeypatch.setenv(labeller.ENV, "0")
    assert not labeller.by_default(big)
    monkeypatch.setenv(labeller.ENV, "1")
    assert labeller.by_default(small)
    monkeypatch.setenv(labeller.ENV, "yes")
    with pytest.raises(GenSelfDiffError, match="GENSELFDIFF_LABEL_ALONGSIDE must be 0 .* not 'yes'"):
        labeller.by_default(big)


def test_large_store_blocks_are_labelled_in_parts_with_the_same_objects(slide_path, tmp_path):  # noqa: F811
    from napari_genselfdiff.core.eval.postprocess import nuclei_from_probabilities
    from napari_genselfdiff.slide import instances

    assert instances.label_block(288) == 288 and instances.label_block(2336) == 779
    assert instances.label_block(2048) == 1024 and all(
        instances.label_block(b) <= instances.LABEL_BLOCK_MAX for b in range(1, 5000, 97))
    out = tmp_path / "big.zarr"
    # one 1,056-px store block over the 1,024-px slide, labelled in 528-px parts
    list(predict_slide(PixelPredictor(), slide_path, out, tile=TILE, overlap=OVERLAP, block=1100,
                       postprocess="nuclei", min_size=4, postprocess_options={"halo": 48}, label_alongside=True))
    group = zarr.open_group(out, mode="r")
    assert group["done"].shape == (1, 1) and group["labels/nuclei/0"].chunks == (528, 528)
    labels = np.asarray(group["labels/nuclei/0"][...])
    reference = nuclei_from_probabilities(np.asarray(group["probabilities"][1]), min_size=4)
    report = instances.compare_partitions(reference, labels)
    assert report.identical and report.n_reference > 100
