"""Generated rasters are cloud-optimised GeoTIFFs, and a STAC Item describes every
generation (in-memory here; whole scenes in tests/test_scene_output.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pystac
import pytest
import rasterio
from pystac.extensions.eo import EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension

from terrasynth.pipeline import Pipeline
from terrasynth.stac import ITEM
from tests.cog_layout import cog_problems
from tests.conftest import SSL4EO_S1

pytestmark = pytest.mark.needs_data


def check_cog(path, overviews: list[int]) -> None:
    """The COG checks the tests can make without GDAL's Python bindings."""
    assert cog_problems(path) == [], path.name
    with rasterio.open(path) as f:
        assert f.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert f.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        assert f.profile["tiled"] and f.block_shapes[0] == (256, 256)
        assert f.overviews(1) == overviews


def read_item(folder) -> pystac.Item:
    """The folder's STAC Item, read back by pystac, with its three extensions declared."""
    item = pystac.Item.from_file(str(folder / ITEM))
    for ext in (ProjectionExtension, RasterExtension, EOExtension):
        assert ext.has_extension(item), ext.__name__
    # the object model round-trips (no schema validation: that needs jsonschema and the
    # schemas from the network)
    assert pystac.Item.from_dict(item.to_dict()).to_dict() == item.to_dict()
    for asset in item.assets.values():
        href = asset.get_absolute_href()
        assert href is not None and (folder / href.rsplit("/", 1)[-1]).is_file(), href
    return item


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    """S1 -> S2 from a real SSL4EO-S12 Sentinel-1 scene (264 x 264 px, EPSG:4326, its VV
    and VH files as they are), saved."""
    pipe = Pipeline.from_pretrained()
    inputs = [("s1grd:VV", SSL4EO_S1 / "VV.tif"), ("s1grd:VH", SSL4EO_S1 / "VH.tif")]
    gen = pipe.generate(inputs, ["s2l2a"], num_samples=2, steps=1, seed=5, time="2020-06-07")
    out = tmp_path_factory.mktemp("gen") / "s1_to_s2"
    gen.save(out)
    return gen, out


def test_in_memory_outputs_are_cogs_keeping_values_and_metadata(generation):
    gen, out = generation
    res = gen["s2l2a"]
    files = {f"s2l2a_sample{k}.tif": res.samples[k] for k in range(2)}
    files |= {"s2l2a_mean.tif": res.mean, "s2l2a_std.tif": res.std}
    with rasterio.open(SSL4EO_S1 / "VV.tif") as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    for name, values in files.items():
        check_cog(out / name, [2])  # 264 px: one overview level, at 132 px
        with rasterio.open(out / name) as f:
            assert (f.crs, f.transform, f.shape) == (crs, transform, shape)
            assert f.descriptions == res.bands and np.isnan(f.nodata)
            assert f.tags()["units"] == "reflectance"
            assert np.array_equal(f.read(), values, equal_nan=True)  # lossless
            assert f.read(1, out_shape=(132, 132)).shape == (132, 132)  # read via overview


def test_in_memory_generation_has_a_stac_item(generation):
    gen, out = generation
    info = json.loads((out / "generation.json").read_text())
    assert ITEM in info["files"]
    item = read_item(out)
    assert item.id == "s1_to_s2"
    assert item.datetime == datetime(2020, 6, 7, tzinfo=UTC)
    props = item.properties
    assert props["terrasynth:datetime_source"] == "input"
    assert props["terrasynth:seed"] == 5 and props["terrasynth:num_samples"] == 2
    assert props["terrasynth:backbone"] == "conv_generator"
    assert props["terrasynth:weights_sha256"] == info["weights_sha256"]
    assert props["terrasynth:targets"] == ["s2l2a"]
    proj = ProjectionExtension.ext(item)
    assert proj.code == "EPSG:4326" and "WGS 84" in proj.wkt2
    assert proj.shape == [gen.grid.height, gen.grid.width] == [264, 264]
    assert proj.transform == list(gen.grid.transform)[:6]
    assert proj.bbox == list(gen.grid.bounds)
    # EPSG:4326 output: the WGS 84 bbox is the grid's bounds (to the rounding of 1e-7 deg)
    assert np.allclose(item.bbox, gen.grid.bounds, atol=1e-6)
    roles = {k: a.roles for k, a in item.assets.items()}
    assert roles == {
        "s2l2a_sample0": ["data", "sample"],
        "s2l2a_sample1": ["data", "sample"],
        "s2l2a_mean": ["data", "mean"],
        "s2l2a_std": ["data", "std"],
        "quicklook": ["overview"],
        "generation": ["metadata"],
    }
    sample = item.assets["s2l2a_sample1"]
    assert sample.media_type == pystac.MediaType.COG
    assert sample.extra_fields["terrasynth:sample"] == 1
    raster = RasterExtension.ext(sample).bands
    assert len(raster) == 12
    assert {(b.data_type, b.nodata, b.unit) for b in raster} == {("float32", "nan", "reflectance")}
    eo = {b.name: b for b in EOExtension.ext(sample).bands}
    assert list(eo) == list(gen["s2l2a"].bands)
    assert (eo["B04"].common_name, eo["B04"].center_wavelength) == ("red", 0.665)
    assert (eo["B11"].common_name, eo["B11"].center_wavelength) == ("swir16", 1.61)
    assert eo["B05"].common_name == "rededge" and eo["B09"].common_name == "nir09"


def test_item_without_a_date_takes_the_generation_time(tmp_path):
    pipe = Pipeline.from_pretrained()
    before = datetime.now(UTC).replace(microsecond=0)
    gen = pipe.generate({}, ["dem"], num_samples=1, size=32, gsd=30, steps=1,
                        location=(11.35, 46.5))  # fmt: skip
    gen.save(tmp_path / "joint")
    item = read_item(tmp_path / "joint")
    assert item.properties["terrasynth:datetime_source"] == "generation"
    assert before <= item.datetime <= datetime.now(UTC)
    assert item.properties["created"] == item.datetime.isoformat().replace("+00:00", "Z")
    assert ProjectionExtension.ext(item).code == "EPSG:32632"
    lon = (item.bbox[0] + item.bbox[2]) / 2
    lat = (item.bbox[1] + item.bbox[3]) / 2
    assert abs(lon - 11.35) < 1e-3 and abs(lat - 46.5) < 1e-3
    dem = item.assets["dem_sample0"]
    (band,) = EOExtension.ext(dem).bands
    assert band.name == "elevation" and band.common_name is None  # not optical
    assert RasterExtension.ext(dem).bands[0].unit == "m"
    check_cog(tmp_path / "joint" / "dem_sample0.tif", [])  # 32 px: no overview
