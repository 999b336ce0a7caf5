"""The shared small helpers of core: the one progress event and its drivers, the one slugifier."""
from __future__ import annotations

import pytest

from napari_genselfdiff.core.errors import GenSelfDiffError
from napari_genselfdiff.core.names import safe_name
from napari_genselfdiff.core.progress import Progress, drain, relay, run_to_end


def _job(n: int):
    for i in range(n):
        yield Progress("work", i + 1, n, done=i + 1 == n)
    return "result"


def test_progress_has_the_training_and_the_slide_fields():
    ev = Progress("predict", 3, 10, eta_s=None, tiles_computed=2, tiles_skipped=1, megapixels_per_s=1.5,
                  blocks_done=1, blocks_total=4, out_path="x.zarr")
    assert ev.phase == ev.stage == "predict" and ev.step == 3 and not ev.done
    train = Progress("pretrain", 1, 5, 0.5, 1e-4, 8.0, 2.0)  # positional, as the training loop builds it
    assert (train.loss, train.lr, train.images_per_s, train.eta_s) == (0.5, 1e-4, 8.0, 2.0)
    assert train.metrics is None and train.checkpoint is None and train.message == ""


def test_drain_returns_the_last_event_and_calls_back():
    seen = []
    last = drain(_job(3), seen.append)
    assert last.done and last.step == 3 and [e.step for e in seen] == [1, 2, 3]
    with pytest.raises(GenSelfDiffError, match="no events"):
        drain(iter(()))


def test_run_to_end_and_relay_return_the_generators_value():
    assert run_to_end(_job(2)) == "result"

    def outer():
        value = yield from relay(_job(2), lambda e: f"{e.step}/{e.total}")
        return value.upper()

    gen = outer()
    assert [next(gen), next(gen)] == ["1/2", "2/2"]
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value == "RESULT"


def test_closing_a_relay_closes_the_inner_generator():
    closed = []

    def inner():
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    gen = relay(inner())
    assert next(gen) == 1
    gen.close()
    assert closed == [True]


@pytest.mark.parametrize("text, fallback, expected", [
    ("my slide (2).svs", "item", "my_slide_2_.svs"),
    ("..hidden", "item", "hidden"),
    ("a/b\\c", "item", "a_b_c"),
    ("???", "image", "image"),
    ("", "slide", "slide"),
    ("ok-name_1.tif", "item", "ok-name_1.tif"),
])
def test_safe_name(text, fallback, expected):
    assert safe_name(text, fallback) == expected


def test_relay_last_yields_everything_returns_the_last_and_closes_on_cancel():
    from napari_genselfdiff.core.progress import relay_last, run_to_end

    closed = []

    def job(n):
        try:
            for i in range(n):
                yield i
        finally:
            closed.append(n)

    assert run_to_end(relay_last(job(3))) == 2 and closed == [3]
    assert run_to_end(relay_last(job(0))) is None
    seen = []
    relay = relay_last(job(5))
    seen.append(next(relay))
    seen.append(next(relay))
    relay.close()  # a cancel: the job underneath is closed too
    assert seen == [0, 1] and closed[-1] == 5
