"""The architecture holds: no import cycles (not even inside functions), the attention math and the
kernels import nothing above them, every module imports alone, and modules and functions stay short."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lin_llm", "pallas_kernels")
MAX_MODULE_LINES = 400  # code lines: docstrings and comments aside
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    return {m for m in out if not (path.name == "__init__.py" and m.startswith(package + "."))}


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def _dependency_order(graph) -> list[str]:
    order, state = [], {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "visiting", f"import cycle: {' -> '.join(trail + [node])}"
        state[node] = "visiting"
        for dep in sorted(graph[node]):
            visit(dep, trail + [node])
        state[node] = "done"
        order.append(node)

    for node in sorted(graph):
        visit(node, [])
    return order


def test_no_import_cycles_and_layers_import_downwards():
    _, graph = _graph()
    _dependency_order(graph)  # asserts there is no cycle
    for name, deps in graph.items():
        if name.startswith("lin_llm.attention"):
            assert all(d.startswith(("lin_llm.attention", "pallas_kernels")) for d in deps), (name, deps)
        if name.startswith("pallas_kernels"):
            assert all(d.startswith("pallas_kernels") for d in deps), (name, deps)
        if name.startswith("lin_llm.io"):
            assert not any(d.startswith(("lin_llm.training", "lin_llm.decoding", "lin_llm.cli")) for d in deps), name


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
    _, graph = _graph()
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    run = subprocess.run([sys.executable, "-c", script, *_dependency_order(graph)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def _code_lines(node, lines) -> int:
    """Lines of ``node`` without its docstring, comments and blank lines."""
    skip = set()
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        skip |= set(range(body[0].lineno, body[0].end_lineno + 1))
    first, last = (1, len(lines)) if isinstance(node, ast.Module) else (node.lineno, node.end_lineno)
    return sum(1 for i in range(first, last + 1)
               if i not in skip and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))


def test_modules_and_functions_stay_short():
    long_ones = []
    for name, path in _modules().items():
        text = path.read_text()
        lines, tree = text.splitlines(), ast.parse(text)
        if _code_lines(tree, lines) > MAX_MODULE_LINES:
            long_ones.append(f"{name}: {_code_lines(tree, lines)} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node, lines) > MAX_FUNCTION_LINES:
                long_ones.append(f"{name}.{node.name}: {_code_lines(node, lines)} lines")
    assert not long_ones, long_ones
