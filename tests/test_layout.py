"""The package's layering: no import cycles, and the running service never loads the
YAML loaders (issue 13: one module per concern, wiring in one place)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "consentivr"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every consentivr module ``path`` imports, lazily inside functions too: a lazy
    import hides a cycle from Python, not from the reader. ``if TYPE_CHECKING:``
    blocks are left out: they never run."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*up, *([child.module] if child.module else [])])
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in MODULES else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in MODULES and m != me}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
])
def test_cycle_finder(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(graph) == expected


def test_the_package_has_no_import_cycle() -> None:
    assert _cycles(GRAPH) == []


def test_cli_subcommands_share_one_helpers_module() -> None:
    """Subcommand modules import ``cli.common``, never the root group or each other."""
    for name, imported in GRAPH.items():
        if name.startswith("consentivr.cli.") and name != "consentivr.cli.main":
            cli = {m for m in imported if m.startswith("consentivr.cli")}
            assert cli <= {"consentivr.cli.common"}, (name, cli)
    assert GRAPH["consentivr.cli"] == set()  # the package itself wires nothing


@pytest.mark.parametrize("module", [
    "consentivr.ari", "consentivr.ami", "consentivr.stasis", "consentivr.agi.server",
    "consentivr.driver", "consentivr.service", "consentivr.listener",
])
def test_the_running_service_loads_no_yaml_loader(module: str) -> None:
    """The transports and the service get Settings, not the loaders that build them."""
    loaders = ("yaml", "consentivr.configfile", "consentivr.flowfile")
    code = (f"import sys, {module}\n"
            f"print(','.join(m for m in {loaders!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"{module} loads {out}"


@pytest.mark.parametrize(("module", "concern"), [
    ("consentivr.settings", {"consentivr.model"}),
    ("consentivr.recordingsdir", {"consentivr.errors", "consentivr.text"}),
])
def test_leaf_modules_stay_leaves(module: str, concern: set[str]) -> None:
    """Settings are plain data; safe file access needs no log and no purge."""
    assert GRAPH[module] <= concern | {"consentivr.errors"}
