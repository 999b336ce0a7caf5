"""Shared fixtures. Real data lives in ../shared/data (never copied into the repository); tests
that need it skip with a message saying so when the folder is absent."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("GENSELFDIFF_DATA")
    cand = Path(env) if env else REPO.parent / "shared" / "data"
    return cand if cand.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real data not found: expected ../shared/data next to the repository "
                    "(or set GENSELFDIFF_DATA); see ../shared/data/README.md")
    return d


@pytest.fixture(scope="session")
def glas_dir(shared_data) -> Path:
    d = shared_data / "glas" / "train"
    if not (d / "images").is_dir():
        pytest.skip(f"GlaS training set not found under {d}")
    return d


@pytest.fixture(scope="session")
def monuseg_dir(shared_data) -> Path:
    d = shared_data / "monuseg" / "train"
    if not (d / "images").is_dir():
        pytest.skip(f"MoNuSeg training set not found under {d}")
    return d


@pytest.fixture(scope="session")
def slides_dir(shared_data) -> Path:
    d = shared_data / "slides"
    if not d.is_dir():
        pytest.skip(f"slides not found under {d}")
    return d


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def one_torch_thread():
    """Run a test with torch on one thread (the CI machine has two cores), restoring it after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _never_the_users_config(tmp_path_factory, monkeypatch) -> None:
    """Every test: widget settings in a folder of this test session, never the user's real
    config (a test that checks settings asks for its own fresh folder, :func:`settings_dir`)."""
    # the name of _widgets.settings.CONFIG_ENV, not imported: that module imports Qt
    monkeypatch.setenv("GENSELFDIFF_CONFIG_DIR", str(tmp_path_factory.getbasetemp() / "session-config"))


@pytest.fixture(autouse=True)
def _no_pixel_size_question(request, monkeypatch) -> None:
    """Tests with a napari viewer: the once-per-image pixel size question (a modal dialog,
    _widgets/pixelsize.py) is closed unanswered, as before it existed (the model's own resolution,
    with its warning); the tests of that question answer it themselves."""
    if "make_napari_viewer" not in request.fixturenames:
        return  # no Qt imported for tests without a viewer
    from napari_genselfdiff._widgets import pixelsize

    monkeypatch.setattr(pixelsize, "ask", lambda parent, layer: (False, None))


@pytest.fixture
def settings_dir(tmp_path, monkeypatch) -> Path:
    """Widget settings go to a fresh folder, never the user's real config."""
    from napari_genselfdiff._widgets.settings import CONFIG_ENV

    d = tmp_path / "config"
    monkeypatch.setenv(CONFIG_ENV, str(d))
    return d


def require_bundled(*names: str) -> dict:
    """The bundled models by task. They ship in resources/ with the package: one missing is a broken
    install, so the test fails (never skips)."""
    from napari_genselfdiff.bundled import bundled_models

    models = bundled_models()
    missing = [n for n in names if n not in models]
    if missing:
        pytest.fail(f"the bundled model(s) {missing} are missing from this install (found {sorted(models)})")
    return models


def random_sources(n: int = 3, size: int = 48) -> list:
    """``n`` unlabeled random RGB sources (size x size+8), the same every call."""
    import numpy as np

    from napari_genselfdiff.core.data import ImageSource

    rng = np.random.default_rng(0)
    return [ImageSource(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8), f"img{i}") for i in range(n)]


def random_labeled(n: int = 3, size: int = 48) -> list:
    """``n`` random RGB images labeled where their red channel is over 128, the same every call."""
    import numpy as np

    from napari_genselfdiff.core.data import LabeledImage

    rng = np.random.default_rng(1)
    items = []
    for i in range(n):
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        items.append(LabeledImage(f"img{i}", img, (img[..., 0] > 128).astype(np.uint8)))
    return items
