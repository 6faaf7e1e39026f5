"""The quick-look panel of a generation."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
from affine import Affine
from rasterio.crs import CRS

from terrasynth.data.scene import Grid
from terrasynth.modalities import default_registry
from terrasynth.pipeline import Generation, TargetResult
from terrasynth.quicklook import _as_groups, render_quicklook


def test_codes_become_class_indices_and_unknown_codes_no_data():
    mod = default_registry()["landcover_nlcd"]
    codes = [e.code for e in mod.legend]
    arr = np.array([[[codes[0], codes[3]], [99, codes[-1]]]])
    data, valid = _as_groups(mod, arr)[mod.groups[0].name]
    assert data[0, 0, 0] == 0 and data[0, 0, 1] == 3 and data[0, 1, 1] == len(codes) - 1
    assert valid.tolist() == [[True, True], [False, True]]


def test_panel_has_a_row_per_raster_target(tmp_path):
    reg = default_registry()
    rng = np.random.default_rng(0)
    grid = Grid(CRS.from_epsg(32633), Affine(10, 0, 0, 0, -10, 0), 24, 20)
    s2 = rng.uniform(0, 0.3, (3, 12, 20, 24)).astype(np.float32)
    codes = np.array([e.code for e in reg["landcover_nlcd"].legend])
    lc = codes[rng.integers(0, len(codes), (2, 1, 20, 24))]
    probs = rng.dirichlet(np.ones(len(codes)), (20, 24)).transpose(2, 0, 1)
    targets = {
        "s2l2a": TargetResult(
            reg["s2l2a"], reg["s2l2a"].bands, samples=s2, mean=s2.mean(0), std=s2.std(0)
        ),
        "landcover_nlcd": TargetResult(
            reg["landcover_nlcd"],
            ("class",),
            samples=lc,
            probs=probs,
            entropy=-(probs * np.log(probs)).sum(0),
        ),
    }
    s1 = rng.normal(-12, 3, (2, 20, 24)).astype(np.float32)
    gen = Generation(grid, targets, {"s1grd": (reg["s1grd"], ("VV", "VH"), s1)}, {})
    png = render_quicklook(gen, tmp_path / "q.png")
    img = mpimg.imread(png)
    assert img.shape[0] > 250 and img.shape[1] > 600  # two rows, input + 3 samples + spread
    assert img[..., :3].std() > 0.1
    assert [p.name for p in tmp_path.iterdir()] == ["q.png"]  # no temporary file left
