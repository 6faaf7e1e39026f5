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


def test_readme_generation_example_runs(tmp_path):
    import numpy as np
    import rasterio

    from tests.conftest import DATA

    s1 = DATA / "bigearthnet_v1_examples/BigEarthNet-S1-Example"
    folder = next(iter(sorted(s1.iterdir())))
    bands = [rasterio.open(folder / f"{folder.name}_{p}.tif") for p in ("VV", "VH")]
    with rasterio.open(tmp_path / "s1.tif", "w", **(bands[0].profile | {"count": 2})) as f:
        f.write(np.stack([b.read(1) for b in bands]))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "Pipeline" in b)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(example, "README.md", "exec"), scope)  # noqa: S102
    finally:
        os.chdir(cwd)
    assert scope["mean"].shape == (12, 120, 120)
    assert (scope["spread"] >= 0).all() and scope["spread"].mean() > 0
    assert scope["da"].rio.crs == bands[0].crs
    assert (tmp_path / "result" / "s2l2a_sample3.tif").is_file()
