"""Arrows down only: no package of minidisk imports one on its own layer or above it.

The layers are ARCHITECTURE.md's ```layers block, read from there so that the document and
this check cannot drift apart: one line per layer, top first, each naming packages and
top-level modules of src/minidisk. Every import counts -- module level, inside functions,
under TYPE_CHECKING -- because each is a dependency of the importing code all the same (a
function-level import only moves a cycle to run time).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from tests.harness import ROOT

import minidisk

SOURCE = ROOT / "src" / "minidisk"


@dataclass(frozen=True)
class Edge:
    where: str  # file:line of the import
    importer: str  # the package or top-level module that imports
    imported: str  # the one it imports


def read_layers(architecture: str) -> list[list[str]]:
    """ARCHITECTURE.md's layers, top first."""
    found = re.search(r"^```layers\n(.*?)^```", architecture, re.M | re.S)
    assert found, "ARCHITECTURE.md has no ```layers block"
    return [line.split() for line in found[1].splitlines() if line.strip()]


def unit_of(source: Path, path: Path) -> str:
    """The package (first directory) or top-level module a file belongs to."""
    parts = path.relative_to(source).parts
    return parts[0] if len(parts) > 1 else path.stem


def _module_of(source: Path, path: Path) -> list[str]:
    parts = ["minidisk", *path.relative_to(source).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(source: Path) -> list[Edge]:
    """Every import of one unit of `source` (a minidisk tree) by another, anywhere in a file."""
    units = {unit_of(source, p) for p in source.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").exists()}
    edges = []
    for path in sorted(source.rglob("*.py")):
        importer = unit_of(source, path)
        package = _module_of(source, path)
        if path.name != "__init__.py":
            package = package[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name.split(".") for alias in node.names]
            else:
                base = (package[:len(package) - node.level + 1] if node.level else [])
                base = base + (node.module.split(".") if node.module else [])
                # `from minidisk import x` imports the unit x when x is one, else the root.
                targets = [base + [alias.name] for alias in node.names]
            for target in targets:
                if target[0] != "minidisk":
                    continue
                imported = target[1] if len(target) > 1 and target[1] in units else "__init__"
                edge = Edge(f"{path.relative_to(source.parent)}:{node.lineno}", importer,
                            imported)
                if imported != importer and edge not in edges:  # one per import statement
                    edges.append(edge)
    return edges


def violations(source: Path, layers: list[list[str]]) -> list[str]:
    rank = {unit: len(layers) - i for i, line in enumerate(layers) for unit in line}
    problems = []
    for unit in sorted({unit_of(source, p) for p in source.iterdir()
                        if p.suffix == ".py" or (p / "__init__.py").exists()}):
        if unit not in rank:
            problems.append(f"{unit} is on no layer of ARCHITECTURE.md")
    for edge in imports(source):
        if edge.importer in rank and edge.imported in rank \
                and rank[edge.imported] >= rank[edge.importer]:
            how = "beside" if rank[edge.imported] == rank[edge.importer] else "above"
            problems.append(f"{edge.where}: {edge.importer} imports {edge.imported}, "
                            f"{how} it")
    return problems


def test_architecture_names_every_unit_once() -> None:
    layers = read_layers((ROOT / "ARCHITECTURE.md").read_text())
    units = [unit for line in layers for unit in line]
    assert len(units) == len(set(units)), units
    assert set(units) == {unit_of(SOURCE, p) for p in SOURCE.iterdir()
                          if p.suffix == ".py" or (p / "__init__.py").exists()}


def test_imports_point_down_only() -> None:
    layers = read_layers((ROOT / "ARCHITECTURE.md").read_text())
    assert violations(SOURCE, layers) == []


def test_lazy_public_names_point_down() -> None:
    """minidisk/__init__.py imports its public names by string on first use, unseen by ast."""
    layers = read_layers((ROOT / "ARCHITECTURE.md").read_text())
    rank = {unit: len(layers) - i for i, line in enumerate(layers) for unit in line}
    for home in minidisk._HOMES.values():
        assert rank[home.split(".")[1]] < rank["__init__"], home


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    """A cycle hidden in a function body (or a relative import) is still a cycle."""
    source = tmp_path / "minidisk"
    for package in ("low", "high"):
        (source / package).mkdir(parents=True)
        (source / package / "__init__.py").write_text("")
    (source / "high" / "a.py").write_text("from minidisk.low import b\n")
    (source / "low" / "b.py").write_text("def f():\n    from ..high import a\n    return a\n")
    (source / "leaf.py").write_text("def g():\n    import minidisk.high.a\n")
    found = violations(source, [["high"], ["low"], ["leaf"]])
    assert found == ["minidisk/leaf.py:2: leaf imports high, above it",
                     "minidisk/low/b.py:2: low imports high, above it"]
    assert "minidisk/high/a.py:1: high imports low, beside it" in \
        violations(source, [["high", "low"], ["leaf"]])


def unnamed_modules(source: Path, architecture: str) -> list[str]:
    """The modules of `source` (but package __init__ and __main__) that ARCHITECTURE.md's
    section of their package ("## dm/ — ...") never names in backquotes -- as `stem`,
    `stem.py` or within a path. Top-level modules, and those of a package without a section
    of its own, may be named anywhere."""
    sections: dict[str, str] = {}
    for section in re.split(r"^## ", architecture, flags=re.M)[1:]:
        for package in re.findall(r"(\w+)/", section.split("\n", 1)[0]):
            sections[package] = section
    missing = []
    for path in sorted(source.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        parts = path.relative_to(source).parts
        text = sections.get(parts[0], architecture) if len(parts) > 1 else architecture
        if not re.search(rf"`[^`\n]*\b{re.escape(path.stem)}\b[^`\n]*`", text):
            missing.append(str(path.relative_to(source)))
    return missing


def test_architecture_names_every_module() -> None:
    """Every module has its one job said in ARCHITECTURE.md, in its package's section."""
    assert unnamed_modules(SOURCE, (ROOT / "ARCHITECTURE.md").read_text()) == []


def test_the_module_check_sees_an_unnamed_module(tmp_path: Path) -> None:
    source = tmp_path / "minidisk"
    (source / "dm").mkdir(parents=True)
    for name in ("named.py", "other.py", "__init__.py"):
        (source / "dm" / name).write_text("")
    (source / "leaf.py").write_text("")
    text = "# x\n`leaf.py` is a leaf\n## dm/ — dm\n`named.py` is named; other is not\n"
    assert unnamed_modules(source, text) == ["dm/other.py"]
