"""The package's imports, read from the source with `ast`: no cycle, and none against the order the architecture
page of the documentation gives (docs/concepts/architecture.md).

Every import counts, at module level and inside functions (where a cycle hides from Python's import
system but not from a reader), relative or absolute, and `from package import name` where the name is a
submodule. Only imports under `if TYPE_CHECKING:` are left out: they never run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jacdistill_cli

PACKAGE = "jacdistill_cli"
ROOT = Path(jacdistill_cli.__file__).parent
ARCHITECTURE = ROOT.parent / "docs" / "concepts" / "architecture.md"

# The order of parts, as the architecture page gives it (its "**Import order.**" line): a module imports modules
# of its own part and of the parts before it, never of a part after it. errors.py is the leaf every part imports; storage.py
# (the one atomic write and the one safe load) imports only errors.py; cli.py is the entry, importing the
# commands (lazily, so that `jacdistill --help` answers at once); __main__.py runs cli.py.
ORDER = ("errors.py", "storage.py", "config/", "engine/", "zoo/", "robustness/", "explain/", "spec/", "records/", "loop/",
         "analysis/", "proofs/", "commands/", "cli.py")
PART_OF_MODULE = {f"{PACKAGE}": "errors.py", f"{PACKAGE}.__main__": "cli.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def part(module: str) -> str:
    if module in PART_OF_MODULE:
        return PART_OF_MODULE[module]
    first = module.split(".")[1]
    return f"{first}.py" if (ROOT / f"{first}.py").is_file() else f"{first}/"


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.AST):
    """Every Import and ImportFrom node, at any depth, except those in the body of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `module` imports (each with the line it is imported on, for messages)."""
    found: dict[str, int] = {}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from jacdistill_cli.run import resume` imports the submodule resume
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        for target in targets:
            while target and target not in known:   # `import jacdistill_cli.x.y` where y is a name: x
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != module:
                found.setdefault(target, node.lineno)
    return found


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {module: imported(module, path, known) for module, path in known.items()}


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def against_order(edges: dict[str, dict[str, int]]) -> list[str]:
    rank = {name: i for i, name in enumerate(ORDER)}
    return [f"{module} (line {line}) imports {target}: {part(module)} comes before {part(target)}"
            for module, targets in sorted(edges.items()) for target, line in sorted(targets.items())
            if rank[part(target)] > rank[part(module)]]


def test_every_module_belongs_to_a_part_of_the_order():
    assert {part(module) for module in modules()} <= set(ORDER)


def test_the_package_has_no_import_cycle():
    edges = graph()
    cycle = find_cycle(edges)
    lines = [f"{a} imports {b} (line {edges[a][b]})" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "import cycle: " + "; ".join(lines)


def test_no_module_imports_a_part_after_its_own():
    wrong = against_order(graph())
    assert not wrong, "imports against the architecture page's order:\n" + "\n".join(wrong)


def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path):
    # the walk itself: a cycle through a function-level import, a relative `from . import`, a
    # `from package import submodule`, and a TYPE_CHECKING import that is left out
    source = {
        "a.py": "def f():\n    from jacdistill_cli.b import g\n",
        "b.py": "from . import c\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from jacdistill_cli import d\n"
                "from jacdistill_cli import a\n",
        "d.py": "import jacdistill_cli.c\n",
    }
    known = {f"{PACKAGE}.{name[:-3]}": tmp_path / name for name in source}
    for name, text in source.items():
        (tmp_path / name).write_text(text)
    edges = {module: imported(module, path, known) for module, path in known.items()}
    assert {m: set(t) for m, t in edges.items()} == {
        f"{PACKAGE}.a": {f"{PACKAGE}.b"}, f"{PACKAGE}.b": {f"{PACKAGE}.c"}, f"{PACKAGE}.c": {f"{PACKAGE}.a"},
        f"{PACKAGE}.d": {f"{PACKAGE}.c"}}
    assert find_cycle(edges) == [f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.c", f"{PACKAGE}.a"]


def test_the_architecture_page_gives_the_same_order():
    line = next(line for line in ARCHITECTURE.read_text().splitlines() if line.startswith("**Import order.**"))
    named = re.findall(r"`([\w./]+)`", line)
    assert tuple(n for n in named if n in ORDER) == ORDER, line


def test_the_entry_imports_the_package_only_inside_functions():
    # `jacdistill --help` answers without importing a command (nor torch through it)
    path = ROOT / "cli.py"
    top = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in top if isinstance(node, ast.ImportFrom)]
    assert not [name for name in names if name.startswith(PACKAGE)], names


# The size of the parts a reader meets: a command only wires, a function fits a screen, a signature is read at a
# glance. Exceptions: a `_target_` builder, whose parameters are its config keys (named in a conf/ yaml file), and
# an autograd.Function's forward, which mirrors the torch function it stands for.
COMMAND_LINES, FUNCTION_LINES, PARAMETERS = 150, 60, 8


def configured_targets() -> set[str]:
    targets = set()
    for path in (ROOT.parent / "conf").rglob("*.yaml"):
        targets |= set(re.findall(r"_target_:\s*([\w.]+)", path.read_text()))
    return targets


def functions():
    """(module, qualified name, node, the class it is defined in or None) of every function of the package."""
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        stack = [(tree, "", None)]
        while stack:
            node, prefix, owner = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield module, f"{prefix}{child.name}", child, owner
                    stack.append((child, f"{prefix}{child.name}.", owner))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}{child.name}.", child))
                else:
                    stack.append((child, prefix, owner))


def is_autograd_forward(node: ast.AST, owner: ast.ClassDef | None) -> bool:
    bases = [ast.unparse(b) for b in owner.bases] if owner is not None else []
    return node.name in ("forward", "backward") and any(b.endswith("Function") for b in bases)


def test_each_command_module_only_wires():
    long = {path.name: len(path.read_text().splitlines()) for path in (ROOT / "commands").glob("*.py")}
    assert {name: n for name, n in long.items() if n > COMMAND_LINES} == {}


def test_no_function_is_longer_than_a_screen_nor_takes_more_than_eight_parameters():
    targets = configured_targets()
    long, wide = [], []
    for module, name, node, owner in functions():
        first = min([d.lineno for d in node.decorator_list] + [node.lineno])
        if node.end_lineno - first + 1 > FUNCTION_LINES:
            long.append(f"{module}.{name}: {node.end_lineno - first + 1} lines")
        args = node.args
        count = len([a for a in [*args.posonlyargs, *args.args, *args.kwonlyargs] if a.arg not in ("self", "cls")])
        if count > PARAMETERS and f"{module}.{name}" not in targets and not is_autograd_forward(node, owner):
            wide.append(f"{module}.{name}: {count} parameters")
    assert long == [] and wide == [], long + wide


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py (and fixtures in conftest.py), never in a test module."""
    tests = ROOT.parent / "tests"
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in import_nodes(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")
                      or n == "conftest"]
    assert found == []
