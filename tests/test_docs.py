"""The examples in the README run as written (against a real store)."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.needs_data


def test_readme_python_example_runs(small_store, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has a Python example"
    (tmp_path / "store").symlink_to(small_store)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102
    finally:
        os.chdir(cwd)
    assert scope["batch"]["s2l2a/r10m"].shape[1:] == (4, 48, 48)
