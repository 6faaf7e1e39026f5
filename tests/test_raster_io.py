"""read_layer, stack_layers and read_json (terrasynth.data.raster_io) on real files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio
from affine import Affine

from terrasynth.data.raster_io import read_json, read_layer, stack_layers
from terrasynth.errors import InputError
from terrasynth.modalities import default_registry
from tests.conftest import DATA, ZION

pytestmark = pytest.mark.needs_data

B2 = ZION / "landsat_b2.tif"
PARANA = DATA / "landsat8_l1_parana" / "LC08_L1TP_224077_20200518_B2B3B4_DN.tif"


def raw(path, indexes=None) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(indexes) if indexes is not None else src.read()


def test_read_layer_zion_band_is_the_file():
    layer = read_layer(B2, "landsat8", ["B2"])
    pixels = raw(B2)
    assert layer.modality == "landsat8" and layer.bands == ("B2",)
    assert layer.data.shape == (1, 1428, 1128) and layer.data.dtype == np.float32
    assert np.array_equal(layer.data, pixels.astype(np.float32))
    with rasterio.open(B2) as src:
        assert layer.crs == src.crs and layer.transform == src.transform
        assert src.nodata == 65535
    # every pixel equal to the file's nodata (65535) is invalid, and only those
    assert layer.valid.shape == pixels.shape
    assert int((~layer.valid_mask()).sum()) == int((pixels == 65535).sum())


def test_file_nodata_marks_exactly_the_nodata_pixels(tmp_path):
    """A copy of the Zion band with some pixels set to 65535: exactly those are invalid."""
    with rasterio.open(B2) as src:
        profile = src.profile
        pixels = src.read()
    pixels[0, :10, :] = 65535
    pixels[0, 500, 300:320] = 65535
    out = tmp_path / "landsat_b2.tif"
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(pixels)
    layer = read_layer(out, "landsat8", ["B2"])
    invalid = ~layer.valid_mask()
    assert int(invalid.sum()) == 10 * 1128 + 20
    assert np.array_equal(invalid, pixels == 65535)


def test_multiband_fill_value_is_invalid_per_band():
    pixels = raw(PARANA)
    layer = read_layer(PARANA, "landsat8", ["B2", "B3", "B4"])
    assert layer.data.shape == pixels.shape == (3, 1515, 2006)
    zeros = pixels == 0  # the file's nodata: L1TP fill
    assert zeros.any(), "expected fill pixels at the scene edge"
    assert np.array_equal(~layer.valid_mask(), zeros)


def test_nodata_argument_overrides_the_file(tmp_path):
    pixels = raw(B2)
    value = int(pixels[0, 700, 500])
    layer = read_layer(B2, "landsat8", ["B2"], nodata=value)
    assert int((~layer.valid_mask()).sum()) == int((pixels == value).sum()) > 0


def test_nan_nodata_of_a_float_file(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    data[0, 1, 2] = np.nan
    out = tmp_path / "float.tif"
    profile = dict(
        driver="GTiff",
        width=4,
        height=3,
        count=1,
        dtype="float32",
        crs="EPSG:32612",
        transform=Affine(30, 0, 300000, 0, -30, 4150000),
        nodata=float("nan"),
    )
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    layer = read_layer(out, "dem", ["elevation"])
    assert int((~layer.valid_mask()).sum()) == 1 and not layer.valid[0, 1, 2]


def test_scale_and_offset_are_applied():
    pixels = raw(B2).astype(np.float64)
    layer = read_layer(B2, "s2l2a", ["B02"], scale=1e-4, offset=-0.1)
    assert layer.data.dtype == np.float32
    np.testing.assert_allclose(layer.data, pixels * 1e-4 - 0.1, rtol=1e-5, atol=1e-6)
    assert float(layer.data.min()) == pytest.approx(pixels.min() * 1e-4 - 0.1, rel=1e-5)


def test_categorical_keeps_integer_codes():
    nlcd = ZION / "nlcd2011.tif"
    pixels = raw(nlcd)
    layer = read_layer(nlcd, "landcover_nlcd", ["class"], categorical=True)
    assert layer.data.dtype.kind == "i"
    assert np.array_equal(layer.data, pixels.astype(np.int32))
    legend = {e.code for e in default_registry()["landcover_nlcd"].legend}
    codes = set(np.unique(layer.data[layer.valid_mask()]).tolist())
    assert codes <= legend and {11, 42, 52} <= codes
    # scale/offset never touch class codes
    scaled = read_layer(nlcd, "landcover_nlcd", ["class"], categorical=True, scale=2.0)
    assert np.array_equal(scaled.data, layer.data)


def test_band_index_selection():
    layer = read_layer(PARANA, "landsat8", ["B4", "B2"], indexes=[3, 1])
    assert layer.bands == ("B4", "B2")
    assert np.array_equal(layer.data, raw(PARANA, [3, 1]).astype(np.float32))


def test_wrong_band_count_and_index_errors():
    with pytest.raises(InputError, match=r"expects 2 band\(s\).*file has 1") as exc:
        read_layer(B2, "landsat8", ["B2", "B3"])
    assert str(B2) in str(exc.value)
    with pytest.raises(InputError, match="expects 3 band"):
        read_layer(PARANA, "landsat8", ["B2", "B3", "B4"], indexes=[1, 2])
    with pytest.raises(InputError, match=r"has 3 band\(s\), band 4 asked for"):
        read_layer(PARANA, "landsat8", ["B4"], indexes=[4])


def test_missing_file(tmp_path):
    path = tmp_path / "nope.tif"
    with pytest.raises(InputError, match="not found") as exc:
        read_layer(path, "landsat8", ["B2"])
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("keep", [100, 50_000, 2_000_000])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "landsat_b2.tif"
    path.write_bytes(B2.read_bytes()[:keep])
    with pytest.raises(InputError) as exc:
        read_layer(path, "landsat8", ["B2"])
    msg = str(exc.value)
    assert str(path) in msg and "\n" not in msg


def test_truncated_pixels_are_reported_as_such(tmp_path):
    path = tmp_path / "landsat_b2.tif"
    path.write_bytes(B2.read_bytes()[:1_000_000])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_layer(path, "landsat8", ["B2"])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_geotiff_without_crs(tmp_path):
    path = tmp_path / "plain.tif"
    profile = dict(driver="GTiff", width=8, height=8, count=1, dtype="uint16")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.ones((1, 8, 8), np.uint16))
    with pytest.raises(InputError, match="no CRS") as exc:
        read_layer(path, "landsat8", ["B2"])
    assert str(path) in str(exc.value)


def test_stack_layers_merges_same_grid_same_modality():
    b2 = read_layer(ZION / "landsat_b2.tif", "landsat8", ["B2"])
    b3 = read_layer(ZION / "landsat_b3.tif", "landsat8", ["B3"])
    srtm = read_layer(ZION / "srtm.tif", "dem", ["elevation"])
    out = stack_layers([b2, srtm, b3])
    assert [layer.modality for layer in out] == ["landsat8", "dem"]
    landsat, dem = out
    assert landsat.bands == ("B2", "B3")
    assert np.array_equal(landsat.data, np.concatenate([b2.data, b3.data]))
    assert landsat.valid_mask().shape == (2, 1428, 1128)
    assert landsat.transform == b2.transform and landsat.crs == b2.crs
    assert dem is srtm


def test_stack_layers_keeps_other_grids_and_modalities_apart():
    b2 = read_layer(ZION / "landsat_b2.tif", "landsat8", ["B2"])
    b3 = read_layer(ZION / "landsat_b3.tif", "landsat8", ["B3"])
    # same grid, other modality
    as_dem = read_layer(ZION / "landsat_b4.tif", "dem", ["elevation"])
    # same modality, shifted grid
    shifted = read_layer(ZION / "landsat_b5.tif", "landsat8", ["B5"])
    shifted.transform = shifted.transform @ Affine.translation(1, 0)
    # same modality, cropped grid (same transform, other size)
    cropped = read_layer(ZION / "landsat_b4.tif", "landsat8", ["B4"])
    cropped.data = cropped.data[:, :100, :100]
    cropped.valid = cropped.valid[:, :100, :100]
    out = stack_layers([b2, as_dem, shifted, b3, cropped])
    assert [(layer.modality, layer.bands) for layer in out] == [
        ("landsat8", ("B2", "B3")),
        ("dem", ("elevation",)),
        ("landsat8", ("B5",)),
        ("landsat8", ("B4",)),
    ]


def test_stack_layers_combines_validity(tmp_path):
    b2 = read_layer(ZION / "landsat_b2.tif", "landsat8", ["B2"])
    b3 = read_layer(ZION / "landsat_b3.tif", "landsat8", ["B3"])
    b3.valid = np.ones(b3.data.shape[1:], bool)
    b3.valid[:5] = False  # a (H, W) mask is broadcast to the band
    b2.data[0, 0, 0] = np.nan
    (merged,) = stack_layers([b2, b3])
    mask = merged.valid_mask()
    assert not mask[0, 0, 0] and mask[0, 1, 0]
    assert not mask[1, :5].any() and mask[1, 5:].all()


def test_read_json_real_and_errors(tmp_path):
    meta = sorted((DATA / "ssl4eo_s12" / "s2a" / "0000200").glob("*/metadata.json"))[0]
    value = read_json(meta)
    assert isinstance(value, dict) and value["CLOUDY_PIXEL_PERCENTAGE"] >= 0

    missing = tmp_path / "missing.json"
    with pytest.raises(InputError, match="not found") as exc:
        read_json(missing)
    assert str(missing) in str(exc.value)

    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,')
    with pytest.raises(InputError, match="unreadable JSON") as exc:
        read_json(bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)

    binary = tmp_path / "binary.json"
    shutil.copy(B2, binary)
    with pytest.raises(InputError, match="unreadable JSON"):
        read_json(binary)

    array = tmp_path / "array.json"
    array.write_text(json.dumps([1, 2]))
    with pytest.raises(InputError, match="expected a JSON object, found list"):
        read_json(array)
    assert read_json(array, expect=list) == [1, 2]
    with pytest.raises(InputError, match="expected a JSON array, found dict"):
        read_json(meta, expect=list)

    folder = tmp_path / "folder.json"
    folder.mkdir()
    with pytest.raises(InputError, match="not found"):
        read_json(folder)
