"""Arrays in, arrays out: numpy arrays and rioxarray DataArrays as inputs give the same
samples as their files, bit for bit; results as xarray Datasets, in memory or from a folder
(lazily, in chunks)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray
import xarray as xr
from affine import Affine

from terrasynth.arrays import GeoArray, open_generation
from terrasynth.errors import InputError, TerrasynthError
from terrasynth.extras import MissingExtraError
from terrasynth.pipeline import Pipeline
from tests.conftest import DATA

pytestmark = pytest.mark.needs_data

BEN_S1 = DATA / "bigearthnet_v1_examples/BigEarthNet-S1-Example"
SETTINGS = dict(targets=["s2l2a"], num_samples=2, seed=11, steps=1)


@pytest.fixture(scope="module")
def s1_files():
    """The VV and VH files of a real BigEarthNet Sentinel-1 patch (120 px, UTM), as they are."""
    folder = sorted(p for p in BEN_S1.iterdir() if p.is_dir())[0]
    return folder / f"{folder.name}_VV.tif", folder / f"{folder.name}_VH.tif"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()


@pytest.fixture(scope="module")
def from_files(pipe, s1_files):
    vv, vh = s1_files
    return pipe.generate([("s1grd:VV", vv), ("s1grd:VH", vh)], **SETTINGS)


def test_numpy_arrays_give_the_samples_of_their_files(pipe, s1_files, from_files):
    vv, vh = s1_files
    with rasterio.open(vv) as a, rasterio.open(vh) as b:
        stack = np.concatenate([a.read(), b.read()])  # (2, 120, 120) as stored
        transform, crs = a.transform, a.crs
    # a tuple per file, keyed like the files
    tuples = pipe.generate(
        [("s1grd:VV", (stack[0], transform, crs)), ("s1grd:VH", (stack[1:], transform, crs))],
        **SETTINGS,
    )
    # one two-band GeoArray whose band names say which is which (like band descriptions),
    # given VH first, with the CRS as an EPSG code and the transform as six numbers
    geo = GeoArray(stack[::-1], list(transform)[:6], crs.to_epsg(), bands=["VH", "VV"])
    named = pipe.generate({"s1grd": geo}, **SETTINGS)
    expected = from_files["s2l2a"].samples
    for gen in (tuples, named):
        assert gen.grid == from_files.grid
        assert np.array_equal(gen["s2l2a"].samples, expected)  # bit for bit
    assert named.info["inputs"] == [["s1grd", "<in-memory GeoArray 2x120x120 float32>"]]


def test_dataarrays_give_the_samples_of_their_files(pipe, s1_files, from_files, tmp_path):
    vv, vh = s1_files
    das = [rioxarray.open_rasterio(f) for f in (vv, vh)]
    per_file = pipe.generate([("s1grd:VV", das[0]), ("s1grd:VH", das[1])], **SETTINGS)
    # one DataArray with band names as coordinates, dimensions in another order
    stacked = xr.concat(das, dim="band").assign_coords(band=["VV", "VH"])
    named = pipe.generate({"s1grd": stacked.transpose("y", "x", "band")}, **SETTINGS)
    # a file whose band descriptions say VH, VV, opened by rioxarray (long_name)
    with rasterio.open(vv) as a, rasterio.open(vh) as b:
        profile, stack = a.profile | {"count": 2}, np.concatenate([b.read(), a.read()])
    with rasterio.open(tmp_path / "vh_vv.tif", "w", **profile) as f:
        f.write(stack)
        f.descriptions = ("VH", "VV")
    described = rioxarray.open_rasterio(tmp_path / "vh_vv.tif")
    assert described.attrs["long_name"] == ("VH", "VV")
    by_description = pipe.generate({"s1grd": described}, **SETTINGS)
    for gen in (per_file, named, by_description):
        assert gen.grid == from_files.grid
        assert np.array_equal(gen["s2l2a"].samples, from_files["s2l2a"].samples)


def test_bad_array_inputs_are_one_line_errors(pipe, s1_files):
    da = rioxarray.open_rasterio(s1_files[0])
    no_crs = xr.DataArray(da.values, dims=da.dims, coords={"y": da.y, "x": da.x})
    cases = [
        (("s1grd:VV", no_crs), "has no CRS"),
        (("s1grd:VV", (da.values, Affine.identity())), "(array, transform, crs)"),
        (("s1grd:VV", (da.values, Affine(0, 0, 0, 0, 0, 0), 32633)), "degenerate georeferencing"),
        (("s1grd:VV", (da.values, da.rio.transform(), "no such crs")), "not a CRS"),
        (("s1grd", GeoArray(da.values, da.rio.transform(), 32633)), "expects 2 bands"),
        (("s1grd", GeoArray(np.zeros((2, 0, 3)), da.rio.transform(), 32633)), "shape"),
    ]
    for item, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            pipe.generate([item], **SETTINGS)


def test_results_as_an_xarray_dataset_in_memory_and_from_the_saved_folder(from_files, tmp_path):
    ds = from_files.to_dataset()  # the only raster target
    res = from_files["s2l2a"]
    assert set(ds.data_vars) == {"samples", "mean", "std"}
    assert ds.samples.dims == ("sample", "band", "y", "x")
    assert ds["mean"].dims == ds["std"].dims == ("band", "y", "x")
    assert list(ds.band.values) == list(res.bands)
    assert np.array_equal(ds.samples.values, res.samples)
    assert np.array_equal(ds["std"].sel(band="B04").values, res.std[res.bands.index("B04")])
    assert ds.rio.crs == from_files.grid.crs and ds.rio.transform() == from_files.grid.transform
    assert ds.attrs["seed"] == 11 and ds.samples.attrs["units"] == "reflectance"
    with pytest.raises(TerrasynthError, match="no raster target 'dem'"):
        from_files.to_dataset("dem")

    from_files.save(tmp_path / "out")
    lazy = open_generation(tmp_path / "out")  # Dask-backed, in the files' 256 px tiles
    eager = open_generation(tmp_path / "out", chunks=None)  # numpy, no Dask
    assert lazy.samples.chunks is not None and eager.samples.chunks is None
    for opened in (lazy, eager):
        assert set(opened.data_vars) == {"samples", "mean", "std"}
        assert opened.samples.dims == ds.samples.dims
        assert list(opened.band.values) == list(res.bands)
        assert opened.rio.crs == ds.rio.crs
        for v in ("samples", "mean", "std"):
            assert np.array_equal(opened[v].values, ds[v].values), v  # lossless COGs
            np.testing.assert_array_equal(opened[v].x.values, ds[v].x.values)


def test_lazy_opening_without_dask_names_the_extra(from_files, tmp_path, monkeypatch):
    from_files.save(tmp_path / "out")
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'terrasynth\[dask\]'"):
        open_generation(tmp_path / "out")
    assert open_generation(tmp_path / "out", chunks=None).samples.shape == (2, 12, 120, 120)


def test_the_arrays_example_in_the_docs_runs(s1_files, tmp_path, monkeypatch):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "generation.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    example = next(b for b in blocks if "GeoArray" in b and "open_generation" in b)
    with rasterio.open(s1_files[0]) as a, rasterio.open(s1_files[1]) as b:
        profile = a.profile | {"count": 2}
        stack = np.concatenate([a.read(), b.read()])
    with rasterio.open(tmp_path / "s1.tif", "w", **profile) as f:
        f.write(stack)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "docs/generation.md", "exec"), scope)  # noqa: S102
    assert scope["lazy"]["samples"].chunks is not None
    assert scope["ds"]["samples"].shape == (2, 12, 120, 120)
