"""The package's shape, read from its source: no circle of imports between sdlora's modules, and every module opens
with a docstring that says its job."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sdlora"


def modules() -> dict[str, Path]:
    """Every module of sdlora by its dotted name; a package by its own name (its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The sdlora modules that module `name` imports, at the top of the file or inside functions.

    `from sdlora.app import page` imports the module sdlora.app.page, `from sdlora.app import main` the package
    sdlora.app; `import sdlora.app.page` imports sdlora.app.page. Parent packages are not counted: Python has them
    half-made in sys.modules by the time a submodule runs, so a submodule importing its package is no circle."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in (or the module, for a package)
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".rstrip(".")
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (its modules in import order, the first repeated at the end) per group of modules that import each
    other round (Tarjan's strongly connected components), sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(_circle_in(graph, group) for group in groups)


def _circle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest circle through the group's first module, staying inside the group."""
    first = min(group)
    paths, seen = [[first]], {first}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph[path[-1]] & group):
            if nxt == first:
                return path + [first]
            if nxt not in seen:
                seen.add(nxt)
                paths.append(path + [nxt])
    raise AssertionError(f"no circle in {group}")


def test_the_graph_is_read_as_python_imports():
    graph = import_graph()
    assert "sdlora.launch" in graph["sdlora.cli"]  # inside a function
    assert "sdlora.app" in graph["sdlora.cli"]  # `from sdlora.app import main`: the package
    assert "sdlora.app.page" in graph["sdlora.app"]  # `from sdlora.app.page import serve`
    assert {"sdlora.app.tab_train", "sdlora.app.context"} <= graph["sdlora.app.page"]  # `from sdlora.app import x`
    assert "sdlora.rundir" in graph["sdlora.card"] and "sdlora.atomic" in graph["sdlora.rundir"]


def test_circles_are_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert circles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_round_a_circle():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(circle) for circle in found)


def test_every_module_says_its_job_first():
    for name, path in modules().items():
        body = ast.parse(path.read_text(encoding="utf-8")).body
        opening = body[0] if body else None
        assert isinstance(opening, ast.Expr) and isinstance(opening.value, ast.Constant) and \
            isinstance(opening.value.value, str), f"{name} ({path}) does not start with a docstring"
        assert opening.value.value.strip().splitlines()[0].strip(), f"{name}: its docstring's first line is empty"
