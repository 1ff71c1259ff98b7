"""The house rules of the package, read from its source: imports flow one way (no cycles, lazy
imports and importlib strings included), no module imports a command, no function grows past a
screen and no module past a few."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mingpt"
KERNELS = ROOT / "kernels"  # installed as mingpt.kernels
# The commands: each subpackage's __main__ (train, sample, serve) and the modules of the single-file ones.
COMMANDS = {"mingpt.prepare", "mingpt.evaluate", "mingpt.export", "mingpt.bench"}
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def source_files() -> list:
    return sorted(PACKAGE.rglob("*.py")) + sorted(KERNELS.rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ("mingpt", "kernels") + path.relative_to(KERNELS).with_suffix("").parts
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_command(name: str) -> bool:
    return name in COMMANDS or name.endswith(".__main__")


def imported_modules(path: pathlib.Path, known: set) -> set:
    """Every mingpt module `path` imports anywhere in its body, by statement or by importlib string."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else (node.module if not node.level else base)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("mingpt."):
            names = [node.value]
        found |= {name for name in names if name in known}
    # Every submodule runs the package's __init__ first; what that re-exports is no import of theirs.
    return found - {module_name(path), "mingpt"}


def import_graph() -> dict:
    files = source_files()
    known = {module_name(f) for f in files}
    graph = {module_name(f): imported_modules(f, known) for f in files}
    return graph


def test_imports_flow_one_way():
    graph, state, cycles = import_graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state and name != "mingpt":
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_the_commands_are_the_ones_named_here():
    assert {name for name in import_graph() if is_command(name)} == COMMANDS | {
        "mingpt.train.__main__", "mingpt.sample.__main__", "mingpt.serve.__main__"}


def test_no_module_imports_a_command():
    graph = import_graph()
    offenders = {name: sorted(m for m in deps if is_command(m)) for name, deps in graph.items()}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_layers_never_import_upwards():
    graph = import_graph()
    assert not graph["mingpt.config"]
    assert not graph["mingpt.ops.reference"]
    assert not {dep for dep in graph["mingpt.model"]
                if dep.startswith(("mingpt.sample", "mingpt.checkpoint", "mingpt.train", "mingpt.serve"))}
    for name in graph:  # nothing below sampling reaches up into training or serving
        if name.startswith(("mingpt.sample", "mingpt.data", "mingpt.ops", "mingpt.kernels")):
            assert not {d for d in graph[name] if d.startswith(("mingpt.train", "mingpt.serve"))}, name
    for kernel_module in (name for name in graph if name.startswith("mingpt.kernels")):  # and the shared checks
        assert all(dep.startswith("mingpt.kernels") or dep == "mingpt.ops.reference" for dep in graph[kernel_module]), \
            kernel_module


@pytest.mark.parametrize("path", source_files(), ids=lambda p: module_name(p))
def test_modules_fit_a_few_screens(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_MODULE_LINES


@pytest.mark.parametrize("path", source_files(), ids=lambda p: module_name(p))
def test_functions_fit_a_screen(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long
