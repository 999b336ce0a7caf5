"""The install: declared dependencies agree with the committed lock, every one imports, and a
mismatched pair (the registry once paired a new dask with an old distributed) is named in one line."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _declared() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["testing"].splitlines()
    return [Requirement(ln.strip()) for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _locked() -> dict[str, str]:
    pins = {}
    for ln in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, _, version = ln.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_every_declared_dependency_is_locked_inside_its_declared_range():
    pins = _locked()
    for req in _declared():
        key = req.name.lower().replace("_", "-")
        assert key in pins, f"{req.name} is declared but not in requirements/lock.txt"
        assert req.specifier.contains(pins[key], prereleases=True), \
            f"lock pins {req.name}=={pins[key]} outside the declared {req.specifier}"
    # the pair that broke: distributed comes only through dask's own extra, locked to dask's version
    assert not any(r.name == "distributed" for r in _declared())
    assert any(r.name == "dask" and "distributed" in r.extras for r in _declared())
    assert pins["distributed"] == pins["dask"]
    assert pins["torch"] == "2.13.0"


def test_the_installed_versions_are_the_locked_ones():
    """scripts/setup.sh installs from the lock: what this environment holds is what it pins (the
    suite under `scripts/test.sh --latest` runs without the lock and skips nothing but this)."""
    import importlib.metadata as md

    if Path(sys.prefix).name == ".venv-latest":
        return  # resolved without the lock on purpose
    pins = _locked()
    for name in ("dask", "distributed", "napari", "zarr", "numcodecs", "PyQt6", "openslide-python", "npe2"):
        assert md.version(name) == pins[name.lower()], name


def test_install_check_passes_here_and_imports_dask_distributed():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "check_install.py")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("install check: ok") and "distributed" in r.stdout
    from dask.distributed import LocalCluster  # noqa: F401  (the issue's "done when")


def _broken_distributed(tmp_path: Path) -> dict:
    """An environment where ``distributed`` is installed but does not import (as distributed 2021
    beside dask 2026 did): a package of that name first on the path that raises on import."""
    fake = tmp_path / "shadow" / "distributed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"cannot import name 'collections_to_dsk' from 'dask.base'\")\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}


def test_install_check_names_a_broken_pair_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "check_install.py")],
                       capture_output=True, text=True, timeout=300, env=_broken_distributed(tmp_path))
    assert r.returncode == 2
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "distributed" in lines[0] and "collections_to_dsk" in lines[0], r.stdout


def test_workers_say_distributed_is_installed_but_broken(tmp_path):
    code = ("from napari_genselfdiff.slide.distributed import connect\n"
            "from napari_genselfdiff.core.errors import GenSelfDiffError\n"
            "try:\n    connect(workers=1)\nexcept GenSelfDiffError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=_broken_distributed(tmp_path))
    assert "is installed but does not import" in r.stdout and 'pip install "dask[distributed]"' in r.stdout, \
        r.stdout + r.stderr
