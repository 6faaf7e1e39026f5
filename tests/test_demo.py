"""The demo (terrasynth.demo) on the BigEarthNet examples shipped in bigearthnet-common.

Needs no data folder: the archives come with an installed dependency.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import rasterio

from terrasynth.atomic import MARKER
from terrasynth.data.store import ChipStore
from terrasynth.demo import run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("run") / "demo"
    return out, run_demo(out, num_samples=3, log=lambda line: None)


def test_demo_writes_report_preview_and_store(demo):
    out, report = demo
    assert report == out / "report.html" and report.is_file()
    text = report.read_text()
    for word in ("s2l2a", "s1grd", "corine", "preview.png", "24 chips", "CDLA-Permissive-1.0"):
        assert word in text, word
    img = mpimg.imread(out / "preview.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img[..., :3].std() > 0.1
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == [MARKER]  # no temporary files left, only the marker of the output


def test_demo_generates_each_direction_with_samples(demo):
    out, report = demo
    text = report.read_text()
    jobs = ("s1_to_s2", "s2_to_s1", "s2_to_dem_and_labels", "s2_infill_from_rgb")
    patches = sorted(p for p in (out / "generated").iterdir())
    assert len(patches) == 2
    for patch in patches:
        for job in jobs:
            folder = patch / job
            assert (folder / "quicklook.png").is_file() and job in text
            assert (folder / "generation.json").is_file()
            assert (folder / "real.png").is_file() == (job != "s2_to_dem_and_labels")
    s1s2 = patches[0] / "s1_to_s2"
    with (
        rasterio.open(s1s2 / "s2l2a_sample0.tif") as a,
        rasterio.open(s1s2 / "s2l2a_sample2.tif") as b,
    ):
        assert a.count == 12 and a.crs.is_projected and a.shape == (120, 120)
        x, y = a.read(), b.read()
        assert np.isfinite(x).all() and np.abs(x - y).mean() > 1e-4
    assert "MAE of the sample mean against the real image" in text
    assert "most likely labels" in text
    infill = patches[0] / "s2_infill_from_rgb" / "s2l2a_mean.tif"
    with rasterio.open(infill) as f:
        assert f.tags()["given_bands"] == "B02,B03,B04"


def test_demo_store_holds_the_six_patches(demo):
    out, _ = demo
    store = ChipStore.open(out / "store")
    t = store.table
    assert len(store) == 24
    assert t["scene_id"].nunique() == 6
    assert t["scene_id"].value_counts().eq(4).all()
    assert set(t["source"]) == {"bigearthnet_v1"}
    assert set(t["licence"]) == {"CDLA-Permissive-1.0"}
    assert store.modalities == ["s2l2a", "s1grd", "corine"]
    assert store.available("s1grd").all() and store.available("corine").all()
    assert store.array("s2l2a/r10m/data").shape == (24, 4, 64, 64)
    assert store.array("corine/labels")[:].any(axis=1).all()  # every patch has labels


def test_cli_demo(tmp_path):
    out = tmp_path / "cli-demo"
    res = subprocess.run(
        [sys.executable, "-m", "terrasynth.cli.main", "demo", "-o", str(out), "-n", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    report = (out / "report.html").resolve()
    assert str(report) in res.stdout
    assert report.is_file() and (out / "preview.png").is_file()
    assert len(ChipStore.open(out / "store")) == 24
