"""The seam metric: pure maths on made-up images, then on a real scene through evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from terrasynth.evaluation.seams import border_positions, seam_ratio


def test_border_positions():
    assert border_positions(64, [0, 16, 32], 32) == [16, 32, 48]


def test_tile_edges_raise_the_ratio_and_smooth_images_do_not():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = np.sin(xx / 7.0) + np.cos(yy / 9.0) + rng.normal(0, 0.01, (64, 64))
    borders = [16, 32, 48]
    assert 0.8 < seam_ratio(smooth, borders, borders) < 1.2
    tiles = smooth + (xx // 16) * 0.5 + (yy // 16) * 0.5  # a step at every border
    assert seam_ratio(tiles, borders, borders) > 5


def test_control_lines_discount_a_grid_the_image_has_everywhere():
    yy, xx = np.mgrid[0:64, 0:64]
    patches = ((xx // 8) % 2 + (yy // 8) % 2).astype(float)  # an edge every 8 px
    borders = [16, 32, 48]
    control = [8, 24, 40, 56]
    assert seam_ratio(patches, borders, borders) > 2  # edges everywhere look like seams
    assert abs(seam_ratio(patches, borders, borders, control=control) - 1) < 1e-6


@pytest.mark.needs_data
def test_evaluate_measures_seams_of_both_ways_of_tiling_a_real_scene(small_store, tmp_path):
    from tests.conftest import run_cli, write_s1_utm

    s1 = write_s1_utm(tmp_path / "s1.tif", 96, 96)
    out = tmp_path / "report"
    r = run_cli("evaluate", "-d", str(small_store), "-o", str(out), "--no-model",
                "--baseline", "mean", "-t", "dem", "--max-chips", "1", "--steps", "2",
                "--seam-input", f"s1grd={s1}", "--seam-target", "s2l2a")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "seams.json").read_text())
    assert {(x["method"], x["target"]) for x in rows} == {
        ("shared", "s2l2a"), ("independent", "s2l2a")
    }  # fmt: skip
    assert all(np.isfinite(x["seam_ratio"]) and x["seam_ratio"] > 0 for x in rows)
    assert "Seams of whole scenes" in (out / "report.md").read_text()
