"""Check an installed napari-genselfdiff: every dependency it declares (with the test extras when
they are installed) imports, and the pairs that must move together work together. Prints one line
naming the first thing broken and exits 2; prints one line "install check: ok ..." otherwise.

    python scripts/check_install.py            # run by scripts/setup.sh and scripts/lock.sh
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import sys

DIST = "napari-genselfdiff"
# what must work, beyond "the module imports": each pair the registry has broken before
DEEP = [
    ("dask.distributed", "from dask.distributed import LocalCluster, Client"),
    ("PyQt6", "from PyQt6 import QtCore, QtGui, QtWidgets"),
    ("openslide", "import openslide; openslide.lib.openslide_version if hasattr(openslide, 'lib') else None"),
    ("zarr", "import zarr, numcodecs; zarr.create_array(store={}, shape=(4,), dtype='u1', chunks=(2,))"),
    ("napari", "import napari, npe2; npe2.PluginManager.instance()"),
    ("torch", "import torch; torch.zeros(1) + 1"),
]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extras: set[str]) -> list[str]:
    """Distribution names napari-genselfdiff requires, with ``extras`` on."""
    from packaging.requirements import Requirement  # pip's own vendored copy is not public

    names = []
    for text in md.requires(DIST) or []:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            continue
        names.append(req.name)
        names.extend(f"{req.name}[{x}]" for x in req.extras)
    return names


def modules_of(dist: str) -> list[str]:
    top = [m for m, ds in md.packages_distributions().items() if _norm(dist) in {_norm(d) for d in ds}]
    return sorted(m for m in top if not m.startswith("_") and m.isidentifier())


def main() -> int:
    try:
        md.version(DIST)
    except md.PackageNotFoundError:
        print(f"install check: {DIST} is not installed in {sys.prefix}")
        return 2
    extras = {"testing"} if _installed("pytest-qt") else set()
    for name in declared(extras):
        base = name.split("[")[0]
        if not _installed(base):
            print(f"install check: {base} (declared by {DIST}) is not installed")
            return 2
        for mod in modules_of(base):
            try:
                importlib.import_module(mod)
            except Exception as e:  # noqa: BLE001  (any failure to import is the finding)
                print(f"install check: {base} is broken: import {mod} fails ({type(e).__name__}: {e})"[:400])
                return 2
    for what, code in DEEP:
        try:
            exec(code, {})  # noqa: S102  (fixed strings above)
        except Exception as e:  # noqa: BLE001
            print(f"install check: {what} is broken ({type(e).__name__}: {e})"[:400])
            return 2
    import dask
    import distributed
    import torch

    print(f"install check: ok (torch {torch.__version__}, dask {dask.__version__}, "
          f"distributed {distributed.__version__}, {len(declared(extras))} declared dependencies import)")
    return 0


def _installed(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
