"""The package's shape holds: every error is in the one tree, the packages import each other
without a cycle and in the layer order docs/design.md draws, and only store/ touches the Redis
driver."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import ratelimitd
from ratelimitd import errors

PACKAGE = Path(ratelimitd.__file__).parent
DESIGN = PACKAGE.parent / "docs" / "design.md"


def _modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages([str(PACKAGE)], "ratelimitd.")
            if info.name != "ratelimitd.__main__"]  # importing it runs the command line


def _imports(path: Path) -> set[str]:
    """The ratelimitd modules a source file imports (at any depth, typing-only ones too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith(("ratelimitd", "redis"))}


def _package_of(module: str) -> str | None:
    """ratelimitd.auth.keys.store -> auth; ratelimitd.errors -> errors; None for a name
    imported from ratelimitd itself (__version__)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    top = parts[1]
    return top if (PACKAGE / top).is_dir() or (PACKAGE / f"{top}.py").is_file() else None


def test_every_error_class_is_in_the_drawn_tree() -> None:
    for name in _modules():
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, BaseException):
                continue
            if name.startswith("ratelimitd.client"):
                continue  # the client's own tree (client/errors.py): it imports no daemon
            assert issubclass(cls, errors.RatelimitdError), f"{name}.{cls_name}"
            assert cls_name in (errors.__doc__ or ""), f"{name}.{cls_name} is not drawn"


def _package_graph() -> dict[str, set[str]]:
    """Package -> the other packages it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).with_suffix("").parts
        here = _package_of(".".join(("ratelimitd", *relative)))
        if relative == ("__main__",):
            continue
        for target in _imports(path):
            there = _package_of(target)
            if (here is not None and there is not None and target.startswith("ratelimitd")
                    and there not in (here, "__init__", "__main__")):
                graph.setdefault(here, set()).add(there)
    return graph


def test_the_packages_import_each_other_without_a_cycle() -> None:
    graph = _package_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_only_the_store_imports_the_redis_driver() -> None:
    store = PACKAGE / "store"
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(store):
            continue
        driver = {name for name in _imports(path) if name.split(".")[0] == "redis"}
        assert not driver, f"{path.relative_to(PACKAGE)} imports {sorted(driver)}"


def test_every_package_imports_only_the_layers_above_it_in_the_design() -> None:
    """docs/design.md's table of layers, read row by row: `errors.py`, `policy/`, ..."""
    rows = [line for line in DESIGN.read_text().splitlines() if line.startswith("| `")]
    layer = {name: index for index, row in enumerate(rows)
             for name in re.findall(r"`(\w+)(?:/|\.py)`", row.split("|")[1])}
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert packages <= set(layer), f"not in docs/design.md: {sorted(packages - set(layer))}"
    for here, theirs in _package_graph().items():
        for there in theirs:
            assert layer[there] < layer[here], f"{here} imports {there}, drawn below it"
