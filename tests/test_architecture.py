"""The codebase's shape, checked: every module lives in a layer folder, no folder imports one above
it, no import circle between modules (module-level or inside a function), the functional core
(`fipo_jax/core/`) imports only itself, jax and numpy, and no function in `fipo_jax/` runs over one
screen (50 code lines: docstring, comments and blank lines not counted)."""

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fipo_jax"
MAX_CODE_LINES = 50

# The layer folders, bottom to top: a module may import its own folder and the folders below it.
# `_requires` (the extras' import guards) serves every layer; `integrations` adapts the core to others.
LAYERS = ("_requires", "core", "parallel", "models", "generation", "rewards", "data", "config", "train",
          "integrations")
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
# The functional FIPO math that `pip install fipo_jax` users compose into their own JAX code.
CORE = {name for name in MODULES if name.startswith("fipo_jax.core")}


def layer(name: str) -> int:
    """The layer of module ``name``: its folder's index in `LAYERS`."""
    return LAYERS.index(name.split(".")[1])


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


def test_every_module_lives_in_a_layer_folder():
    loose = [name for name in MODULES if name != "fipo_jax" and name.split(".")[1] not in LAYERS]
    assert loose == []


def upward_imports() -> list[str]:
    return [f"{name} -> {dep}" for name in MODULES if name != "fipo_jax"
            for dep in sorted(GRAPH[name]) if dep != "fipo_jax" and layer(dep) > layer(name)]


def test_no_folder_imports_one_above_it():
    assert upward_imports() == []


def test_the_package_reexports_the_core_only():
    assert GRAPH["fipo_jax"] <= CORE


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
    assert "fipo_jax.core.future_kl" in GRAPH["fipo_jax.core.losses"]
    assert "fipo_jax.models.config" in GRAPH["fipo_jax.models.hf_io"]
    assert "fipo_jax.train.run_log" in GRAPH["fipo_jax.train.trainer"]  # `from fipo_jax.train import run_log as …`
    assert "fipo_jax.core.losses" in CORE and layer("fipo_jax.train.trainer") > layer("fipo_jax.models.decoder")
    GRAPH["fipo_jax.core.segments"].add("fipo_jax.train.trainer")
    try:
        assert upward_imports() == ["fipo_jax.core.segments -> fipo_jax.train.trainer"]
    finally:
        GRAPH["fipo_jax.core.segments"].discard("fipo_jax.train.trainer")
    tree = ast.parse("def f():\n    '''doc'''\n" + "    x = 1\n" * 51)
    assert code_lines(["def f():", "    '''doc'''"] + ["    x = 1"] * 51, tree.body[0]) == 52


@pytest.mark.parametrize("name", ["fipo_jax", "fipo_jax.models", "fipo_jax.data"])
def test_packages_are_seen(name):
    assert name in MODULES and GRAPH[name]
