"""shortlab's modules import each other along a DAG: no cycle, counting imports inside functions.

A function-level import that goes back up (``models`` → ``llava_mini`` → ``models``) hides a
cycle from the interpreter until the function runs; here every import counts. A subpackage's
``__init__`` importing its own submodules is its re-export and is an ordinary edge; the implicit
import of a package before its submodule is not counted (it is never a cycle of our making).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "shortlab"


def module_files() -> dict[str, Path]:
    """Dotted module name → file, packages named by their ``__init__``'s folder."""
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts).removesuffix(".__init__")] = path
    return files


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <...> import`` in ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the shortlab modules it imports anywhere in its source (the top-level
    ``shortlab`` package, whose exports load lazily by name, is left out as a target)."""
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, path.name == "__init__.py", node)
                # `from pkg import sub` imports the submodule pkg.sub
                names = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source
                         for a in node.names]
            else:
                continue
            for name in names:
                # `import a.b.c` where only a.b is ours (or an attribute path): the longest module
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != PACKAGE and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None for a DAG (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_intra_package_imports_form_no_cycle():
    graph = import_graph(module_files())
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_layering_the_cycle_was_broken_by():
    graph = import_graph(module_files())
    assert "shortlab.llava_mini" in graph["shortlab.models"]  # load_model("llava-mini")
    for lower in ("shortlab.llava_mini.build", "shortlab.vision", "shortlab.checkpoints"):
        assert "shortlab.models" not in graph[lower], lower
    assert graph["shortlab.checkpoints"] <= {"shortlab.wheels"}


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "shortlab"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from shortlab import b\n")
    (package / "b.py").write_text("from .sub.c import x\n")
    (package / "sub" / "__init__.py").write_text("from shortlab.sub.c import x\n")
    (package / "sub" / "c.py").write_text("import shortlab.a.f\n")
    files = {name: path for name, path in (
        ("shortlab", package / "__init__.py"), ("shortlab.a", package / "a.py"),
        ("shortlab.b", package / "b.py"), ("shortlab.sub", package / "sub" / "__init__.py"),
        ("shortlab.sub.c", package / "sub" / "c.py"),
    )}
    graph = import_graph(files)
    assert graph == {
        "shortlab": set(), "shortlab.a": {"shortlab.b"}, "shortlab.b": {"shortlab.sub.c"},
        "shortlab.sub": {"shortlab.sub.c"}, "shortlab.sub.c": {"shortlab.a"},
    }
    assert find_cycle(graph) == ["shortlab.a", "shortlab.b", "shortlab.sub.c", "shortlab.a"]
    (package / "sub" / "c.py").write_text("x = 1\n")
    assert find_cycle(import_graph(files)) is None
