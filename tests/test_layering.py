"""The package layering, read from the source with ``ast`` (nothing is imported).

Every import counts: module level, inside functions (lazy imports), under
``if``/``try``. An import is an edge from the importing module to the module it
names:

* ``import a.b.c`` and ``from a.b.c import name`` -> ``a.b.c``;
* ``from a.b import c`` -> ``a.b.c`` when ``c`` is a module, else ``a.b``
  (the package ``__init__``, whose names are being read);
* relative imports are resolved first (``from . import x`` in ``pkg.mod`` is
  ``from pkg import x``; in ``pkg/__init__.py`` it is the same package).

Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those
implicit parent imports are not edges (every ``__init__`` that imports its own
submodules would otherwise be a cycle).

Rules: ``unwinder`` imports neither ``deopt`` nor ``osrjit``; ``deopt`` does
not import ``osrjit``; no import cycle among the modules of the three packages.
And in ``tests/``: test modules do not import each other (shared scenarios and
fixtures live in helper modules, whose names do not start with ``test_``).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("unwinder", "deopt", "osrjit")
#: Package -> the packages it must not import (data flows osrjit -> deopt -> unwinder).
FORBIDDEN = {"unwinder": ("deopt", "osrjit"), "deopt": ("osrjit",), "osrjit": ()}


@dataclass(frozen=True)
class Import:
    importer: str   # dotted module name, e.g. "osrjit.runtime"
    imported: str   # dotted module name inside PACKAGES
    path: Path      # the importer's source file
    line: int       # 1-based line of the import statement in the importer


def module_files() -> dict[str, Path]:
    """Dotted name -> source file, for every module of PACKAGES
    (a package is named by its ``__init__.py``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from."""
    if not node.level:
        return node.module
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[:-(node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _deepest_known(name: str, modules) -> str | None:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(importer: str, path: Path, modules) -> list[Import]:
    """Every import in ``path`` (at any depth) that names a module of PACKAGES."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [_deepest_known(alias.name, modules) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, path.name == "__init__.py", node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in modules
                               else _deepest_known(base, modules))
        found += [Import(importer, t, path, node.lineno) for t in set(targets) if t is not None]
    return found


def import_graph() -> list[Import]:
    modules = module_files()
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one module (or a
    module importing itself), each sorted, in sorted order (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _where(imports, component) -> str:
    inside = set(component)
    return "\n".join(f"  {i.importer} -> {i.imported} ({i.path.relative_to(ROOT)}:{i.line})"
                     for i in sorted(imports, key=lambda i: (i.importer, i.line, i.imported))
                     if i.importer in inside and i.imported in inside)


# -- the rules ------------------------------------------------------------------------


def test_every_package_module_is_parsed():
    modules = module_files()
    assert {"unwinder.walk", "deopt.transfer", "osrjit.runtime", "osrjit.emulated.runtime"} <= set(modules)
    assert import_graph(), "no imports found: the graph builder is broken"


def test_lower_packages_do_not_import_higher_ones():
    bad = [f"{i.importer} imports {i.imported} (line {i.line})" for i in import_graph()
           if i.imported.split(".")[0] in FORBIDDEN[i.importer.split(".")[0]]]
    assert bad == []


def test_no_import_cycles():
    imports = import_graph()
    edges = {(i.importer, i.imported) for i in imports}
    found = cycles(edges)
    assert found == [], "import cycles:\n" + "\n".join(
        f"{' <-> '.join(c)}:\n{_where(imports, c)}" for c in found)


def test_test_modules_do_not_import_each_other():
    """No test module imports another one (lazy imports included)."""
    found = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            found |= {(path.stem, name.split(".")[0]) for name in names
                      if name.split(".")[0].startswith("test_")}
    assert sorted(found) == []


def test_import_edges(tmp_path):
    """Module-level, lazy and relative imports, read as the module docstring says."""
    modules = {"p": tmp_path / "p/__init__.py", "p.a": tmp_path / "p/a.py",
               "p.b": tmp_path / "p/b.py", "p.sub": tmp_path / "p/sub/__init__.py",
               "p.sub.c": tmp_path / "p/sub/c.py"}
    for path in modules.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    modules["p.sub.c"].write_text(
        "import os\n"
        "from .. import a, NAME\n"          # p.a (a module), p (a name of p/__init__)
        "from ..b import f\n"               # p.b
        "def lazy():\n"
        "    import p.sub\n"                # p.sub
        "    from p.sub import c, g\n"      # p.sub.c, p.sub
        "    if True:\n"
        "        from . import c\n")        # p.sub.c
    modules["p.sub"].write_text("from . import c\n")   # in an __init__: this package
    edges = {(i.importer, i.imported, i.line) for name, path in modules.items()
             for i in imports_of(name, path, modules)}
    assert edges == {("p.sub.c", "p.a", 2), ("p.sub.c", "p", 2), ("p.sub.c", "p.b", 3),
                     ("p.sub.c", "p.sub", 5), ("p.sub.c", "p.sub.c", 6), ("p.sub.c", "p.sub", 6),
                     ("p.sub.c", "p.sub.c", 8), ("p.sub", "p.sub.c", 1)}


def test_cycle_finder():
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    assert cycles({("a", "b"), ("b", "c")}) == []
    assert cycles({("a", "a")}) == [["a"]]
