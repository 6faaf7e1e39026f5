"""Whole-scene outputs: cloud-optimised GeoTIFFs with overviews, band names, tags, quick-look,
STAC Item."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from pystac.extensions.eo import EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension

from terrasynth.arrays import open_generation
from terrasynth.pipeline import Pipeline
from terrasynth.scenes.engine import generate_scene
from terrasynth.scenes.job import JobSpec
from terrasynth.scenes.output import _on_base_grid
from tests.conftest import write_s1_utm
from tests.test_outputs_discoverable import check_cog, read_item

pytestmark = pytest.mark.needs_data


def test_coarse_bands_keep_their_own_pixels():
    coarse = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    fine = _on_base_grid(coarse, 2, 3, 4)
    assert fine.shape == (1, 3, 4)
    assert (fine[0, :2, :2] == 0).all() and (fine[0, 2, 2:] == 3).all()


def test_outputs_are_tiled_with_overviews_and_described(tmp_path):
    s1 = write_s1_utm(tmp_path / "s1.tif", 520, 512)
    pipe = Pipeline.from_pretrained()
    spec = JobSpec(inputs=[("s1grd", str(s1))], targets=["s2l2a", "landcover_lulc"],
                   num_samples=2, steps=2, seed=1)  # fmt: skip
    files = {p.name for p in generate_scene(pipe, spec, tmp_path / "out")}
    assert {"s2l2a_std.tif", "landcover_lulc_probs.tif", "landcover_lulc_entropy.tif",
            "quicklook.png", "generation.json"} <= files  # fmt: skip
    out = tmp_path / "out"
    with rasterio.open(out / "s2l2a_sample1.tif") as f, rasterio.open(s1) as src:
        assert (f.crs, f.transform, f.width, f.height) == (
            src.crs, src.transform, src.width, src.height
        )  # fmt: skip
        assert f.profile["tiled"] and f.block_shapes[0] == (256, 256)
        assert f.overviews(1) == [2]
        assert f.descriptions[:4] == ("B02", "B03", "B04", "B08")
        assert f.tags()["sample"] == "1" and f.tags()["units"] == "reflectance"
        assert np.isfinite(f.read()).all()
    with rasterio.open(out / "landcover_lulc_sample0.tif") as f:
        codes = np.unique(f.read())
        legend = json.loads(f.tags()["legend"])
        assert set(codes.tolist()) <= {int(c) for c in legend}
    with rasterio.open(out / "landcover_lulc_probs.tif") as f:
        np.testing.assert_allclose(f.read().sum(0), 1.0, atol=1e-4)
    info = json.loads((out / "generation.json").read_text())
    assert info["tiles"] == 6 and info["spec"]["seed"] == 1
    # cloud-optimised, reusing the overviews built while streaming; no working file left
    tifs = sorted(out.glob("*.tif"))
    assert len(tifs) == 8 and not list(out.glob(".*.part.tif"))
    for path in tifs:
        check_cog(path, [2])
    item = read_item(out)
    assert item.id == "out" and item.properties["terrasynth:datetime_source"] == "generation"
    assert item.properties["terrasynth:seed"] == 1
    assert item.properties["terrasynth:weights_sha256"] == info["weights_sha256"]
    proj = ProjectionExtension.ext(item)
    assert (proj.code, proj.shape) == ("EPSG:32643", [512, 520])
    assert {k: a.roles[-1] for k, a in item.assets.items() if "landcover" in k} == {
        "landcover_lulc_sample0": "sample", "landcover_lulc_sample1": "sample",
        "landcover_lulc_probs": "probabilities", "landcover_lulc_entropy": "entropy",
    }  # fmt: skip
    probs = item.assets["landcover_lulc_probs"]
    legend = json.loads(item.assets["landcover_lulc_sample0"].extra_fields["terrasynth:legend"])
    assert [b.name for b in EOExtension.ext(probs).bands] == list(legend.values())
    codes = RasterExtension.ext(item.assets["landcover_lulc_sample0"]).bands[0]
    assert codes.data_type == "uint8" and codes.nodata is not None
    assert RasterExtension.ext(probs).bands[0].unit == "probability"
    # the result opens lazily as xarray: Dask arrays in the COGs' 256 px tiles
    lc = open_generation(out, "landcover_lulc")
    assert set(lc.data_vars) == {"samples", "probs", "entropy"}
    assert lc["probs"].chunks == ((len(legend),), (256, 256), (256, 256, 8))
    assert list(lc["class"].values) == list(legend.values())
    np.testing.assert_allclose(lc["probs"][:, :64, :64].sum("class").compute(), 1.0, atol=1e-4)
    s2 = open_generation(out, "s2l2a")
    assert s2["samples"].dims == ("sample", "band", "y", "x") and s2.rio.crs == proj_crs(item)
    with rasterio.open(out / "s2l2a_sample1.tif") as f:
        window = f.read(3, window=rasterio.windows.Window(300, 200, 40, 30))
    assert np.array_equal(s2["samples"].sel(sample=1, band="B04")[200:230, 300:340], window)


def proj_crs(item) -> rasterio.crs.CRS:
    return rasterio.crs.CRS.from_user_input(ProjectionExtension.ext(item).code)
