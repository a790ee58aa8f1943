"""Every ```python block of the README runs (in a child process) — the docs stay true."""
import os
import re

import pytest

from childproc import ROOT_DIR, run_child


def _blocks():
    with open(os.path.join(ROOT_DIR, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def run_block(code):
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    return out.getvalue()


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(index):
    run_child(run_block, _blocks()[index])
