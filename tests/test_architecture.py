"""The house rules of docs/architecture.md, checked on the source: imports point down (actstore
never imports probes; each package's floors import only lower floors), no import circles, no
function longer than ~80 lines outside bench/, short module docstrings."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("actstore", "probes")
MAX_FUNCTION_LINES = 80
MAX_MODULE_DOC_LINES = 15

# Floors, bottom to top: a module may import its own floor and the floors below. A module not
# listed is on the floor of its parent package's entry (e.g. probes.fit.primal -> "probes.fit").
FLOORS = [
    ["actstore.errors", "actstore.io", "actstore.options", "actstore.lazy"],
    ["actstore.datasets", "actstore.models", "actstore.store", "actstore.native"],
    ["actstore.prompts", "actstore.distributed"],
    ["actstore.extract"],
    ["actstore.cli", "actstore.__main__", "actstore"],
    ["probes.errors", "probes.cli_common"],
    ["probes.inputs", "probes.metrics", "probes.stats", "probes.stream"],
    ["probes.kernels"],
    ["probes.ridge", "probes.classify"],
    ["probes.report"],
    ["probes.distributed"],
    ["probes.fit"],
    ["probes.neurons"],
    ["probes.experiments"],
    ["probes.pipeline"],
    ["probes.cli", "probes.__main__", "probes"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _floor(module: str) -> int:
    best, best_len = None, -1
    for i, names in enumerate(FLOORS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best_len:
                best, best_len = i, len(n)
    assert best is not None, f"{module} is on no floor of tests/test_architecture.py"
    return best


def _imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of our packages."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                if path.name != "__init__.py":
                    pkg = pkg[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] in PACKAGES:
                # the longest name that is one of our modules ("from x import y" may name a
                # function y or a submodule x.y)
                while n not in MODULES and "." in n:
                    n = n.rsplit(".", 1)[0]
                out.append((n, node.lineno, id(node) in top))
    return out


def test_actstore_never_imports_probes():
    bad = [f"{m}:{line} imports {n}" for m, p in MODULES.items() if m.startswith("actstore")
           for n, line, _ in _imports(p, m) if n.startswith("probes")]
    assert not bad, bad


def test_imports_point_down():
    bad = []
    for m, p in MODULES.items():
        for n, line, _ in _imports(p, m):
            if m == n or n == m.split(".")[0] or m.startswith(n + ".") or n.startswith(m + "."):
                continue          # a package and its own modules
            if _floor(n) > _floor(m):
                bad.append(f"{m}:{line} imports {n}, a higher floor")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = {m: {n for n, _, _ in _imports(p, m) if n != m} for m, p in MODULES.items()}
    # a package's lazy __init__ names its modules only inside __getattr__; count top-level edges
    graph = {m: {n for n, _, top in _imports(p, m) if top and n != m and not n.startswith(m + ".")}
             for m, p in MODULES.items()}
    seen, stack, cycles = {}, [], []

    def visit(m):
        seen[m] = 1
        stack.append(m)
        for n in graph.get(m, ()):
            if seen.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in seen:
                visit(n)
        stack.pop()
        seen[m] = 2

    for m in graph:
        if m not in seen:
            visit(m)
    assert not cycles, cycles


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _code_lines(f) -> int:
    """Lines of a function without its docstring (the signature included)."""
    body = f.body
    doc = (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
           and isinstance(body[0].value.value, str))
    doc_lines = body[0].end_lineno - body[0].lineno + 1 if doc else 0
    return f.end_lineno - f.lineno + 1 - doc_lines


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_longer_than_80_lines(package):
    """Code lines (the docstring not counted) of every function and method."""
    long = []
    for m, p in MODULES.items():
        if not m.startswith(package):
            continue
        for f in _functions(ast.parse(p.read_text())):
            n = _code_lines(f)
            if n > MAX_FUNCTION_LINES:
                long.append(f"{m}.{f.name}: {n} lines")
    assert not long, "\n".join(long)


def test_module_docstrings_are_short():
    long = []
    for m, p in MODULES.items():
        doc = ast.get_docstring(ast.parse(p.read_text()), clean=False)
        if doc and doc.count("\n") + 1 > MAX_MODULE_DOC_LINES:
            long.append(f"{m}: {doc.count(chr(10)) + 1} lines")
    assert not long, "\n".join(long)
