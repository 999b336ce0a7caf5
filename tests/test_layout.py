"""The package's shape, checked from its source with ``ast`` (nothing is imported):

(a) ``core`` imports nothing from the floors above it (slide, formats, project, cli, _widgets),
    and every floor only imports its own and lower ones (_widgets / cli -> project -> slide /
    formats / bundled -> core); a floor is a module's first component below the package, so
    ``core.nets.unet`` is ``core``;
(b) only ``_widgets`` and the npe2 entry points import Qt or napari;
(c) the module import graph (function-level imports included) has no cycle, and neither has the
    graph of core's rooms (its subpackages: nets, pretext, train, eval);
(d) no module is over 550 lines unless its docstring (or a comment at its top) says why it must
    be one piece;
(e) ``project.refine`` and ``project.suggest`` never import ``project.store`` (which imports them),
    not even for type checkers: they take a ``files.ProjectFolder``, which lists exactly what
    they use of a project, all of it defined by ``store.Project``;
(f) every package (core's rooms included) is in setup.cfg's ``packages``.

Imports under ``if TYPE_CHECKING:`` never run, so they are left out, except in (e).
"""
from __future__ import annotations

import ast
import graphlib
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "napari_genselfdiff"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: The npe2 entry points (napari.yaml): they may import napari and Qt.
NPE2_ENTRY_POINTS = {f"{PACKAGE}._reader", f"{PACKAGE}._writer", f"{PACKAGE}._sample_data"}
GUI_PACKAGES = {"qtpy", "napari", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui"}
MAX_LINES = 550

#: Room -> the rooms it may import from (its own included). Rooms not listed (the package
#: ``__init__`` and the npe2 entry points) are not restricted here.
FLOORS = {
    "core": {"core"},
    "slide": {"core", "slide", "formats", "bundled"},
    "formats": {"core", "slide", "formats", "bundled"},
    "bundled": {"core", "bundled"},
    "project": {"core", "slide", "formats", "bundled", "project"},
    "cli": {"core", "slide", "formats", "bundled", "project", "cli"},
    "_widgets": {"core", "slide", "formats", "bundled", "project", "_widgets", "_reader", "_writer", "_sample_data"},
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a module of the package, or a top-level name outside it)
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for path in sorted(SRC.rglob("*.py")):
        name = _module_name(path)
        assert name not in modules, f"{modules[name]} and {path} are both module {name}: remove one"
        modules[name] = path
    return modules


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str) -> str:
    """The module of the package ``name`` lies in (itself, or its nearest parent package), or
    its top-level name when it is outside the package."""
    if name.split(".")[0] != PACKAGE:
        return name.split(".")[0]
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, path: Path, type_checking: bool = False) -> list[Import]:
    """The imports of a module; those under ``if TYPE_CHECKING:`` too when ``type_checking``."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in (ast.walk(tree) if type_checking else _runtime_nodes(tree)):
        if isinstance(node, ast.Import):
            found += [Import(module, _resolve(alias.name), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for alias in node.names:
                full = f"{name}.{alias.name}"
                found.append(Import(module, _resolve(full if full in MODULES else name), node.lineno))
    return found


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _core_room(module: str) -> str | None:
    """The subpackage of ``core`` a module lies in (``nets`` for ``core.nets.unet``); None for the
    modules at core's top level, which every room shares, and for modules outside core."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "core" and MODULES[".".join(parts[:3])].name == "__init__.py":
        return parts[2]
    return None


def _where(imp: Import) -> str:
    return f"{MODULES[imp.source].relative_to(SRC.parent)}:{imp.line}: {imp.source} imports {imp.target}"


def test_the_module_list_is_sane():
    assert {f"{PACKAGE}.core", f"{PACKAGE}.cli", f"{PACKAGE}.project", f"{PACKAGE}.project.store"} <= set(MODULES)
    assert any(imp.target == f"{PACKAGE}.core.errors" for imp in IMPORTS)


def test_every_package_is_installed():
    """setup.cfg lists its packages by name: a subpackage it misses (a new room of core) would be
    left out of a wheel while every test run from the source tree still passed."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(SRC.parents[1] / "setup.cfg")
    listed = {line.strip() for line in cfg["options"]["packages"].splitlines() if line.strip()}
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert packages <= listed, f"setup.cfg [options] packages lacks {sorted(packages - listed)}"


def test_core_imports_no_higher_floor():
    bad = [_where(i) for i in IMPORTS if _room(i.source) == "core" and i.target.startswith(PACKAGE + ".")
           and _room(i.target) in {"slide", "formats", "project", "cli", "_widgets", "bundled"}]
    assert not bad, "core must import only core (torch + numpy); found:\n" + "\n".join(bad)


def test_every_floor_imports_only_its_own_and_lower_ones():
    bad = []
    for imp in IMPORTS:
        room, target = _room(imp.source), _room(imp.target)
        if room in FLOORS and imp.target.startswith(PACKAGE + ".") and target not in FLOORS[room]:
            bad.append(f"{_where(imp)} ({room} may import only {', '.join(sorted(FLOORS[room]))})")
    assert not bad, ("dependencies point one way: _widgets / cli -> project -> slide / formats -> core; "
                     "found:\n" + "\n".join(bad))


def test_only_widgets_and_npe2_entry_points_import_qt_or_napari():
    bad = [_where(i) for i in IMPORTS if i.target in GUI_PACKAGES and _room(i.source) != "_widgets"
           and i.source not in NPE2_ENTRY_POINTS]
    assert not bad, "Qt and napari belong in _widgets/ and the npe2 entry points; found:\n" + "\n".join(bad)


def test_there_is_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    lines: dict[tuple[str, str], int] = {}
    for imp in IMPORTS:
        if imp.target in MODULES and imp.target != imp.source:
            graph[imp.source].add(imp.target)
            lines.setdefault((imp.source, imp.target), imp.line)
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        cycle = e.args[1][::-1]  # [a, b, ..., a]: each one imports the one after it
        steps = [f"{cycle[i]} (line {lines[(cycle[i], cycle[i + 1])]}) imports {cycle[i + 1]}"
                 for i in range(len(cycle) - 1)]
        pytest.fail("import cycle: " + " -> ".join(cycle) + "\n  " + "\n  ".join(steps))


def test_the_rooms_of_core_import_one_another_one_way():
    rooms = {_core_room(m) for m in MODULES} - {None}
    assert {"nets", "pretext", "train", "eval"} <= rooms
    graph: dict[str, set[str]] = {r: set() for r in rooms}
    where: dict[tuple[str, str], str] = {}
    for imp in IMPORTS:
        a, b = _core_room(imp.source), _core_room(imp.target)
        if a and b and a != b:
            graph[a].add(b)
            where.setdefault((a, b), _where(imp))
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        cycle = e.args[1][::-1]
        pytest.fail("the rooms of core import one another in a circle: " + " -> ".join(cycle) + "\n  "
                    + "\n  ".join(where[(cycle[i], cycle[i + 1])] for i in range(len(cycle) - 1)))


def _says_why(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(text)) or ""
    head = "\n".join(line for line in text.splitlines()[:10] if line.lstrip().startswith("#"))
    return "one piece" in (doc + head).lower()


def test_no_module_is_too_long_without_saying_why():
    long = [f"{p.relative_to(SRC.parent)}: {n} lines" for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES and not _says_why(p)]
    assert not long, (f"modules over {MAX_LINES} lines must be split, or say in their docstring why they "
                      "must be one piece:\n" + "\n".join(long))


def test_refine_and_suggest_do_not_import_the_store():
    store = f"{PACKAGE}.project.store"
    bad = [_where(i) for m in (f"{PACKAGE}.project.refine", f"{PACKAGE}.project.suggest")
           for i in _imports(m, MODULES[m], type_checking=True) if i.target == store]
    assert not bad, ("project.store imports refine and suggest, so they must not import it, not even under "
                     "TYPE_CHECKING (annotate with files.ProjectFolder); found:\n" + "\n".join(bad))


def _class(module: str, name: str) -> ast.ClassDef:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def test_project_folder_lists_what_refine_and_suggest_use_and_project_has_it():
    protocol = _class(f"{PACKAGE}.project.files", "ProjectFolder")
    listed = {n.target.id for n in protocol.body if isinstance(n, ast.AnnAssign)} | \
        {n.name for n in protocol.body if isinstance(n, ast.FunctionDef)}
    used = set()
    for m in (f"{PACKAGE}.project.refine", f"{PACKAGE}.project.suggest"):
        tree = ast.parse(MODULES[m].read_text(encoding="utf-8"))
        used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                 and isinstance(n.value, ast.Name) and n.value.id == "project"}
    assert used == listed, (f"ProjectFolder must list exactly what refine and suggest use of a project: "
                            f"used but not listed {sorted(used - listed)}, listed but unused {sorted(listed - used)}")
    project = _class(f"{PACKAGE}.project.store", "Project")
    defined = {n.name for n in project.body if isinstance(n, ast.FunctionDef)} | \
        {t.attr for n in ast.walk(project) if isinstance(n, ast.Assign) for t in n.targets
         if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert listed <= defined, f"store.Project lacks {sorted(listed - defined)} of ProjectFolder"
