"""The codebase's shape, checked: no import circle between modules (module-level or inside a
function), the functional core imports only itself, jax and numpy, and no function in
`fipo_jax/` runs over one screen (50 code lines: docstring, comments and blank lines not counted)."""

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fipo_jax"
MAX_CODE_LINES = 50

# The functional FIPO math that `pip install fipo_jax` users compose into their own JAX code.
CORE = {"fipo_jax._checks", "fipo_jax.segments", "fipo_jax.future_kl", "fipo_jax.advantages",
        "fipo_jax.loss_metrics", "fipo_jax.losses", "fipo_jax.diagnostics", "fipo_jax.packing"}
CORE_ALLOWED = {"jax", "numpy"} | set(sys.stdlib_module_names)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> tuple[set[str], set[str]]:
    """(fipo_jax modules ``name`` imports anywhere in its file, top-level names of other packages)."""
    tree = ast.parse(MODULES[name].read_text())
    ours, others = set(), set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.startswith("fipo_jax") else others).add(alias.name.split(".")[0]
                                                                            if not alias.name.startswith("fipo_jax")
                                                                            else alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("fipo_jax"):
                others.add(base.split(".")[0])
                continue
            for alias in node.names:  # `from fipo_jax import losses` imports the module, not the package
                ours.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in ours if m in MODULES and m != name}, others


GRAPH = {name: imports(name)[0] for name in MODULES}


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
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

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles() == []


def test_the_core_imports_only_itself_jax_and_numpy():
    for name in sorted(CORE):
        ours, others = imports(name)
        assert ours <= CORE, (name, sorted(ours - CORE))
        assert others <= CORE_ALLOWED, (name, sorted(others - CORE_ALLOWED))


def code_lines(lines: list[str], node: ast.AST) -> int:
    body = node.body
    docstring = (set(range(body[0].lineno, body[0].end_lineno + 1))
                 if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
                 and isinstance(body[0].value.value, str) else set())
    return sum(1 for i in range(node.lineno, node.end_lineno + 1)
               if i not in docstring and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))


def long_functions() -> list[str]:
    found = []
    for name, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = code_lines(lines, node)
                if count > MAX_CODE_LINES:
                    found.append(f"{name}.{node.name} ({count} code lines)")
    return found


def test_every_function_fits_a_screen():
    assert long_functions() == []


def test_the_checks_can_fail():
    """The checks above see what they are meant to see."""
    assert "fipo_jax.losses" in GRAPH["fipo_jax.diagnostics"]
    assert "fipo_jax.models.config" in GRAPH["fipo_jax.models.hf_io"]
    assert "fipo_jax.run_log" in GRAPH["fipo_jax.trainer"]  # `from fipo_jax import run_log as …`
    tree = ast.parse("def f():\n    '''doc'''\n" + "    x = 1\n" * 51)
    assert code_lines(["def f():", "    '''doc'''"] + ["    x = 1"] * 51, tree.body[0]) == 52


@pytest.mark.parametrize("name", ["fipo_jax", "fipo_jax.models"])
def test_packages_are_seen(name):
    assert name in MODULES and GRAPH[name]
