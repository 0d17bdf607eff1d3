"""The module structure: every module imports on its own, no import cycle, no module over 500 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fedilora"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, at module level or inside a function, by an import
    statement or by name (a string constant that is a module's name, as ``importlib.import_module`` takes
    it); imports only for type checkers (``if TYPE_CHECKING:``) do not run and are left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parts, *([child.module] if child.module else [])])
                for alias in child.names:  # ``from pkg import module`` imports that module
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
            elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                found.add(child.value)
            visit(child)

    visit(ast.parse(path.read_text()))
    # a package's __init__ runs before any of its modules anyway: edges to a package that holds the
    # importing module are not imports of their own (and its bare name is a run's default name too)
    return {m for m in found if m in known and m != name and not name.startswith(f"{m}.")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_cycle_and_a_function_level_import() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    known = {"fedilora.x", "fedilora.y"}
    source = PACKAGE / "cli.py"  # any file: only its text is parsed below
    code = "import typing\nif typing.TYPE_CHECKING:\n    import fedilora.y\ndef f():\n    import fedilora.x\n"
    by_name = "import importlib\nTABLE = {'y': 'fedilora.y'}\n"
    tmp = source.with_name("_probe_for_test.py")
    try:
        tmp.write_text(code)
        assert imports("fedilora.cli", tmp, known) == {"fedilora.x"}
        tmp.write_text(by_name)
        assert imports("fedilora.cli", tmp, known) == {"fedilora.y"}
    finally:
        tmp.unlink()


def test_no_import_cycle_in_the_package() -> None:
    modules = _modules()
    graph = {name: imports(name, path, set(modules)) for name, path in modules.items()}
    assert sum(len(v) for v in graph.values()) > 100, "the import scan found too little: it is broken"
    assert graph["fedilora.compare"] and "fedilora.compare" in graph["fedilora.cli"]
    assert cycles(graph) == []


def test_every_module_imports_on_its_own() -> None:
    # one interpreter; before each module every fedilora module is dropped (but the package root and its
    # torchvision fix, which run first in any process), so that each is imported first, alone, with only
    # what it imports itself: what a cycle between two modules or a missing import would break
    names = [n for n in _modules() if not n.endswith("__main__")]
    code = (
        "import importlib, sys, traceback\n"
        f"names = {names!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('fedilora.') and m != 'fedilora._compat']:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed) or 'ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok", done.stdout
    assert len(names) > 60


MAX_MODULE_LINES = 500  # issue 24: a module over this does several jobs; split it, one module per job


def test_no_module_is_over_500_lines() -> None:
    lengths = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert lengths["fedilora.trainer"] > 100, "the line count is broken"  # what the check reads is real code
    too_long = {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES}
    assert too_long == {}, f"modules over {MAX_MODULE_LINES} lines: {too_long}"
