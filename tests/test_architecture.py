"""The house rules of docs/architecture.md, checked on the source: every import in keyedge/ (those inside
functions and TYPE_CHECKING blocks too) points down the layers or stays in its own, none forms a circle,
and only the CLI imports typer."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from .helpers import ROOT

PACKAGE = ROOT / "keyedge"
# a module may import modules of its own layer and of layers of a lower rank; layers of one rank are
# independent of each other (the runtime never imports training or the deployment builders)
RANK = {"core": 0, "share": 0, "training": 1, "runtime": 1, "deploy": 2, "redteam": 2, "checks": 3, "workflows": 4,
        "fleet": 5}
ENTRY = 6  # keyedge/__init__.py, cli.py, kernels.py: the entry points on top


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The keyedge modules ``name`` imports (a ``from X import y`` of a module y counts as y), and those it
    names in a string (``importlib.import_module("keyedge...")``, ``resources.files("keyedge...")``). A
    module's own enclosing packages do not count, but the top package ``keyedge`` (the entry layer) does."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".")
            if node.level:
                base = base[:len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("keyedge."):
            targets = [node.value]
        else:
            continue
        found |= {t for t in targets
                  if t in mods and t != name and (t == "keyedge" or not name.startswith(t + "."))}
    return found


def _layer(module: str) -> str:
    """``core``, ``runtime``, ...; ``entry`` for keyedge/__init__.py, cli.py and kernels.py."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "entry"


def _rank(module: str) -> int:
    return RANK.get(_layer(module), ENTRY)


def test_every_module_has_a_layer():
    for name in _modules():
        parts = name.split(".")
        if len(parts) > 2:
            assert parts[1] in RANK, f"{name}: keyedge/{parts[1]}/ is not a layer of docs/architecture.md"
        elif len(parts) == 2 and parts[1] not in RANK:
            assert parts[1] in ("cli", "kernels"), f"{name}: a module beside the layers; put it in one"


def test_imports_point_down_the_layers():
    mods = _modules()
    wrong = []
    for name, path in mods.items():
        for target in _imports(name, path, mods):
            if _layer(target) != _layer(name) and _rank(target) >= _rank(name):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports that point up (or across) the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circles():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_only_the_cli_imports_typer():
    users = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "typer" or n.startswith("typer.") for n in names):
                users.append(name)
    assert set(users) == {"keyedge.cli"}, users


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """Positive control: the walk finds what it must refuse."""
    pkg = tmp_path / "keyedge"
    for rel, text in {"__init__.py": "", "core/__init__.py": "", "core/a.py": "from ..runtime import b\n",
                      "core/c.py": "from .. import cli\n", "core/d.py": "import keyedge\n", "cli.py": "",
                      "core/e.py": "AREA = 'keyedge.runtime.b'\n",
                      "runtime/__init__.py": "", "runtime/b.py": "def f():\n    from ..core import a\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    mods = _modules()
    assert "keyedge.core.a" in _imports("keyedge.runtime.b", mods["keyedge.runtime.b"], mods)  # inside a function
    assert "keyedge.runtime.b" in _imports("keyedge.core.a", mods["keyedge.core.a"], mods)
    try:
        test_imports_point_down_the_layers()
    except AssertionError as exc:
        for edge in ("keyedge.core.a -> keyedge.runtime.b", "keyedge.core.c -> keyedge.cli",
                     "keyedge.core.d -> keyedge", "keyedge.core.e -> keyedge.runtime.b"):
            assert edge in str(exc), edge
    else:
        raise AssertionError("the upward import was not found")
    try:
        test_no_import_circles()
    except AssertionError as exc:
        assert "keyedge.core.a" in str(exc) and "keyedge.runtime.b" in str(exc)
    else:
        raise AssertionError("the circle was not found")
