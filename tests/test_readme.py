"""The README's runnable examples (```python fences) run as written; ```py fences are
illustrative snippets with placeholder paths and are not executed."""

import os
import re

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def test_readme_python_blocks_run(capsys):
    text = open(README, encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["keep"].tolist() == [True, False]
    assert namespace["grad"].shape == (8, 64)
    assert capsys.readouterr().out.strip()
