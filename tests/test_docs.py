"""The documentation holds together: the MkDocs site (mkdocs.yml, docs/) builds with --strict (no
warning: broken links and anchors, docstrings mkdocstrings cannot render, pages left out of the
nav); the README's and the pages' runnable examples (```python fences) run as written, while ```py
fences are illustrative snippets with placeholder paths and are not executed; the README stays a
short front page; every relative link in README.md, CHANGELOG.md and docs/ points at a file that
exists; the API reference lists every public module; and no page names a module path that is gone."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
README_MAX_LINES = 250
LAYERS = ("core", "parallel", "models", "generation", "rewards", "data", "config", "train", "integrations")


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def run_blocks(path: pathlib.Path) -> dict:
    """Run a file's ```python blocks in order, in one namespace (a block may continue the one before)."""
    namespace: dict = {"__name__": f"docs_example_{path.stem}"}
    for block in python_blocks(path):
        exec(compile(block, str(path.relative_to(ROOT)), "exec"), namespace)  # noqa: S102
    return namespace


def test_the_site_builds_strict(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                             str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    site = tmp_path / "site"
    # the pages the README links to, the API reference rendered from docstrings, the shared snippets expanded
    for page in ("getting-started", "functional-api", "troubleshooting", "performance", "architecture", "changelog"):
        assert (site / page / "index.html").is_file(), page
    api_core = (site / "api" / "core" / "index.html").read_text(encoding="utf-8")
    assert "policy_loss_terms" in api_core and "discounted_reverse_cumsum" in api_core
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "dynamic_sampling_mask" in index and "8&lt;" not in index
    assert "fipo_jax.train.update" in (site / "changelog" / "index.html").read_text(encoding="utf-8")


def test_readme_example_runs_and_does_what_it_says(capsys):
    readme = ROOT / "README.md"
    assert len(python_blocks(readme)) == 1, "the README has one runnable example"
    namespace = run_blocks(readme)
    keep, grad, loss, metrics = (namespace[k] for k in ("keep", "grad", "loss", "metrics"))
    assert keep.tolist() == [True, False]  # group 2 (rows 4…7) is all wrong: dynamic sampling drops it
    assert grad.shape == (8, 64)
    assert float(abs(grad[4:]).max()) == 0.0 and float(abs(grad[:4]).max()) > 0  # zero advantage, zero gradient
    assert bool(abs(loss) < 1e3) and float(metrics["influence_weights_mean"]) >= 1.0  # weights in [1, 1.2]
    assert "mean influence weight" in capsys.readouterr().out


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files (views)
    namespace = run_blocks(page)
    if page.name == "functional-api.md":  # the functional example and the views after it
        assert namespace["keep"].tolist() == [True, False] and namespace["grad"].shape == (8, 64)
        assert (tmp_path / "view.png").stat().st_size > 0 and "<" in (tmp_path / "view.html").read_text()


def test_the_docs_have_runnable_examples():
    assert python_blocks(DOCS / "functional-api.md"), "the functional API page lost its runnable example"


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it ≤ {README_MAX_LINES}, move text to docs/"


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links and images that are relative paths (no scheme, not a bare #anchor),
    outside fenced code and inline code; snippet includes (--8<-- "path") too."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    includes = re.findall(r'^--8<-- "([^"]+)"', text, flags=re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    links = [t.split("#")[0] for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]
    return links + [("/" + i.split(":")[0]) for i in includes]  # includes are relative to the root


def test_the_link_finder_finds_links():
    text = ('see [a](docs/a.md#x), ![p](p.png), [web](https://x.org), [here](#top), `[no](code.md)`\n'
            '```\n[no](fenced.md)\n```\n--8<-- "README.md:intro"\n')
    assert relative_links(text) == ["docs/a.md", "p.png", "/README.md"]


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "CHANGELOG.md", *PAGES],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(path):
    links = relative_links(path.read_text(encoding="utf-8"))
    missing = [link for link in links
               if not ((ROOT / link.lstrip("/")) if link.startswith("/") else (path.parent / link)).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


def public_modules(layer: str) -> set[str]:
    folder = ROOT / "fipo_jax" / layer
    return {f"fipo_jax.{layer}.{p.stem}" for p in folder.glob("*.py") if not p.name.startswith("_")}


@pytest.mark.parametrize("layer", LAYERS)
def test_the_api_reference_lists_every_public_module(layer):
    page = DOCS / "api" / f"{layer}.md"
    assert page.is_file(), f"no API page for fipo_jax/{layer}/"
    listed = set(re.findall(r"^::: (fipo_jax\.[\w.]+)", page.read_text(encoding="utf-8"), flags=re.M))
    assert listed == public_modules(layer), f"docs/api/{layer}.md: add {public_modules(layer) - listed}, " \
                                            f"remove {listed - public_modules(layer)}"
    assert all(importlib.util.find_spec(name.rpartition(".")[0]) for name in listed)


# Module paths the layer folders replaced (CHANGELOG.md, "Moved"): no page but the changelog names them.
GONE = ("_checks", "segments", "future_kl", "advantages", "loss_metrics", "losses", "packing", "diagnostics",
        "sharding", "distributed", "logprobs", "engine", "sampling", "rl_step", "render", "build", "checkpoint",
        "memory_model", "plan", "preflight", "rollouts", "run_dir", "runtime_configs", "sft", "trainer", "run_log")
GONE_RE = re.compile(r"\bfipo_jax[./](?:%s)\b(?![\w])" % "|".join(GONE) + r"|experiments/train\.py")


def test_no_page_names_a_module_path_that_is_gone():
    assert GONE_RE.search("from fipo_jax.rl_step import x") and GONE_RE.search("see fipo_jax/sampling.py")
    assert not GONE_RE.search("fipo_jax.generation.sampling, fipo_jax.core.losses, fipo_jax.train.plan")
    stale = {str(p.relative_to(ROOT)): GONE_RE.findall(p.read_text(encoding="utf-8"))
             for p in [ROOT / "README.md", *PAGES]}
    assert not {k: v for k, v in stale.items() if v}, stale


def test_the_doctest_hook_fences_examples():
    spec = importlib.util.spec_from_file_location("doctest_blocks", DOCS / "hooks" / "doctest_blocks.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    lines = ["Text.", ">>> sorted(x)[:2]", "['a', 'b']", "", "```", ">>> kept as is", "```"]
    assert hook.fence_doctests(lines) == ["Text.", "", "```pycon", ">>> sorted(x)[:2]", "['a', 'b']", "```", "",
                                          "```", ">>> kept as is", "```"]
