"""The engine's imports: no plugin or kernel by name, and no cycle among its own modules.

Both are read from the source (AST), not from ``sys.modules``: an import
hidden in a function body or behind ``TYPE_CHECKING`` counts the same as one
at the top of the file, since that is how a dependency (or a cycle) hides.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sparsify_core

CORE = Path(sparsify_core.__file__).parent
PACKAGE = "sparsify_core"
FORBIDDEN = ("sparsify_plugins", "sparsify_kernels")


def _modules(root: Path = CORE) -> dict[str, Path]:
    """Dotted name -> file for every module of the package (``__init__`` is the package itself)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PACKAGE, *parts])] = path
    return out


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imported_names(name: str, path: Path) -> list[tuple[str, tuple[str, ...], int]]:
    """Every import in ``path``, anywhere in the file: ``(absolute module, names taken from it, line)``.

    ``from .x import y, z`` gives ``("pkg.x", ("y", "z"), line)`` (``y`` may be a
    submodule); ``import a.b`` gives ``("a.b", (), line)``. String literals
    passed to ``importlib.import_module``/``__import__`` count as imports.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(name, path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, tuple(a.name for a in node.names if a.name != "*"), node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if called in ("import_module", "__import__"):
                target = node.args[0].value
                if target.startswith(".") and len(node.args) > 1:  # relative to an explicit package
                    target = f"{PACKAGE}{target}"
                found.append((target, (), node.lineno))
    return found


def _forbidden(imports) -> list[tuple[str, int]]:
    return [(mod, line) for mod, _, line in imports if mod.split(".")[0] in FORBIDDEN]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at module level, in functions, or for type checking)."""
    graph = {}
    for name, path in modules.items():
        edges = set()
        for mod, names, _ in imported_names(name, path):
            subs = {f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules}
            edges |= subs
            if len(subs) < len(names) or not names:  # something other than a submodule: the module itself
                edges.add(mod)
        graph[name] = {m for m in edges if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_engine_imports_no_plugin_or_kernel_by_name():
    hits = [f"{path.relative_to(CORE.parent)}:{line}: {mod}"
            for name, path in _modules().items() for mod, line in _forbidden(imported_names(name, path))]
    assert not hits, "sparsify_core reaches plugins/kernels through hooks only, but imports:\n" + "\n".join(hits)


def test_the_engine_modules_import_each_other_without_a_cycle():
    cycle = find_cycle(import_graph(_modules()))
    assert cycle is None, "import cycle among sparsify_core modules: " + " -> ".join(cycle)


# -- the checks themselves catch what they are meant to catch --------------------------


@pytest.mark.parametrize("source", [
    "import sparsify_plugins.layouts\n",
    "import sparsify_kernels as K\n",
    "def f():\n    from sparsify_plugins.layouts.modules import MoEFFN\n",
    "from sparsify_kernels import ffn\n",
    "import importlib\nm = importlib.import_module('sparsify_plugins.layouts')\n",
    "from importlib import import_module\ndef f():\n    return import_module('sparsify_kernels.native')\n",
    "x = __import__('sparsify_kernels')\n",
])
def test_every_form_of_import_is_caught(tmp_path, source):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert [n for n, _ in _forbidden(imported_names(f"{PACKAGE}.m", path))]


def test_strings_and_similar_names_are_not_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import sparsify_pluginsx\nNAME = 'sparsify_plugins.layouts'\nprint('sparsify_kernels')\n")
    assert _forbidden(imported_names(f"{PACKAGE}.m", path)) == []


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from sparsify_core.a import x\n")
    (pkg / "d.py").write_text("from . import a, b\n")
    graph = import_graph(_modules(pkg))
    assert graph[f"{PACKAGE}.d"] == {f"{PACKAGE}.a", f"{PACKAGE}.b"}
    assert find_cycle(graph) == [f"{PACKAGE}.{m}" for m in ("a", "b", "c", "a")]
    (pkg / "b.py").write_text("thing = 1\n")
    assert find_cycle(import_graph(_modules(pkg))) is None
