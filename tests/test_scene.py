"""Grid, Layer and Scene (terrasynth.data.scene) checked against rasterio on real files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from rasterio.windows import transform as window_transform

from terrasynth.data.scene import Grid, Layer, Scene
from terrasynth.errors import InputError
from tests.conftest import DATA, ZION

pytestmark = pytest.mark.needs_data

SSL4EO_B2 = sorted((DATA / "ssl4eo_s12" / "s2a" / "0000200").glob("*/B2.tif"))


def grid_of(path) -> tuple[Grid, rasterio.io.DatasetReader]:
    src = rasterio.open(path)
    return Grid(src.crs, src.transform, src.width, src.height), src


@pytest.mark.parametrize("name", ["landsat_b2.tif", "srtm.tif", "nlcd2011.tif"])
def test_bounds_and_res_match_rasterio(name):
    grid, src = grid_of(ZION / name)
    with src:
        assert grid.bounds == pytest.approx(tuple(src.bounds), abs=1e-9)
        assert grid.res == pytest.approx(src.res, rel=1e-12)
    left, bottom, right, top = grid.bounds
    assert left < right and bottom < top


def test_zion_landsat_grid_facts():
    grid, src = grid_of(ZION / "landsat_b2.tif")
    src.close()
    assert grid.crs.to_epsg() == 32612
    assert grid.res == (30.0, 30.0)
    assert (grid.width, grid.height) == (1128, 1428)
    assert grid.bounds == (301905.0, 4111245.0, 335745.0, 4154085.0)


@pytest.mark.parametrize("name", ["landsat_b2.tif", "nlcd2011.tif", "srtm.tif"])
@pytest.mark.parametrize("factor", [2, 3, 5])
def test_scaled_keeps_the_footprint(name, factor):
    grid, src = grid_of(ZION / name)
    src.close()
    coarse = grid.scaled(factor)
    assert coarse.crs == grid.crs
    assert coarse.res == pytest.approx((grid.res[0] * factor, grid.res[1] * factor))
    assert coarse.width == math.ceil(grid.width / factor)
    assert coarse.height == math.ceil(grid.height / factor)
    # same upper-left corner; covers the fine footprint, overshooting by less than one pixel
    fl, fb, fr, ft = grid.bounds
    cl, cb, cr, ct = coarse.bounds
    px, py = coarse.res
    assert cl == pytest.approx(fl) and ct == pytest.approx(ft)
    assert fr - 1e-9 <= cr < fr + px
    assert fb - py < cb <= fb + 1e-9


def test_scaled_by_one_is_the_same_grid():
    grid, src = grid_of(ZION / "landsat_b2.tif")
    src.close()
    assert grid.scaled(1) == grid


@pytest.mark.parametrize("name", ["landsat_b2.tif", "srtm.tif"])
def test_window_matches_rasterio_windows(name):
    grid, src = grid_of(ZION / name)
    with src:
        for col, row, w, h in [(0, 0, 64, 64), (100, 37, 64, 32), (400, 300, 1, 1)]:
            win = Window(col, row, w, h)
            sub = grid.window(col, row, w, h)
            expected = window_transform(win, src.transform)
            assert sub.transform.almost_equals(expected, precision=1e-9)
            assert (sub.width, sub.height) == (w, h)
            assert sub.bounds == pytest.approx(window_bounds(win, src.transform), abs=1e-9)
            assert sub.res == grid.res and sub.crs == grid.crs


def test_window_bounds_locate_the_same_pixels_in_the_file():
    """rasterio finds the window's pixel offsets back from the window's bounds."""
    grid, src = grid_of(ZION / "landsat_b2.tif")
    with src:
        sub = grid.window(200, 150, 16, 8)
        win = src.window(*sub.bounds)
    assert (win.col_off, win.row_off) == pytest.approx((200, 150))
    assert (win.width, win.height) == pytest.approx((16, 8))


def test_ground_resolution_projected_and_geographic():
    zion, src = grid_of(ZION / "landsat_b2.tif")
    src.close()
    assert zion.ground_resolution_m() == pytest.approx(30.0)
    assert SSL4EO_B2, "SSL4EO sample 0000200 not found"
    s2, src = grid_of(SSL4EO_B2[0])
    src.close()
    assert s2.crs.is_geographic and s2.crs.to_epsg() == 4326
    assert s2.res[0] < 0.001  # degrees, not metres
    assert s2.ground_resolution_m() == pytest.approx(10.0, abs=0.5)


def test_center_lonlat_of_zion_is_in_utah():
    zion, src = grid_of(ZION / "landsat_b2.tif")
    src.close()
    lon, lat = zion.center_lonlat()
    assert -113.5 < lon < -112.5
    assert 37.0 < lat < 38.0
    # the SRTM tile (EPSG:4326) of the same place has about the same centre
    srtm, src = grid_of(ZION / "srtm.tif")
    src.close()
    slon, slat = srtm.center_lonlat()
    assert abs(slon - lon) < 0.05 and abs(slat - lat) < 0.05
    left, bottom, right, top = srtm.bounds
    assert (slon, slat) == pytest.approx(((left + right) / 2, (bottom + top) / 2))


UTM = CRS.from_epsg(32612)
T = Affine(30.0, 0.0, 300000.0, 0.0, -30.0, 4150000.0)


def test_layer_rejects_band_count_mismatch():
    with pytest.raises(InputError, match="2 band names"):
        Layer("landsat8", ("B2", "B3"), np.zeros((1, 4, 4), np.float32), UTM, T)
    with pytest.raises(InputError, match="3 bands of data"):
        Layer("landsat8", ("B2",), np.zeros((3, 4, 4), np.float32), UTM, T)


def test_layer_rejects_bad_shapes_and_missing_crs():
    with pytest.raises(InputError, match="bands, rows, cols"):
        Layer("dem", ("elevation",), np.zeros((1, 1, 4, 4), np.float32), UTM, T)
    with pytest.raises(InputError, match="no CRS"):
        Layer("dem", ("elevation",), np.zeros((4, 4), np.float32), None, T)


def test_layer_accepts_2d_data_and_reports_its_grid():
    layer = Layer("dem", ("elevation",), np.zeros((5, 7), np.float32), UTM, T)
    assert layer.data.shape == (1, 5, 7)
    assert layer.grid == Grid(UTM, T, 7, 5)


def test_valid_mask_combines_nan_and_the_given_mask():
    data = np.ones((2, 3, 4), np.float32)
    data[0, 0, 0] = np.nan
    data[1, 2, 3] = np.inf
    given = np.ones((3, 4), bool)
    given[1, 1] = False
    layer = Layer("landsat8", ("B2", "B3"), data, UTM, T, valid=given)
    mask = layer.valid_mask()
    assert mask.shape == (2, 3, 4)
    expected = np.ones((2, 3, 4), bool)
    expected[0, 0, 0] = False
    expected[1, 2, 3] = False
    expected[:, 1, 1] = False
    assert np.array_equal(mask, expected)
    # per-band masks are used as given
    per_band = np.ones((2, 3, 4), bool)
    per_band[1, 0, 0] = False
    layer = Layer("landsat8", ("B2", "B3"), data, UTM, T, valid=per_band)
    assert layer.valid_mask().sum() == 24 - 3
    # no mask: only non-finite values are invalid
    assert Layer("landsat8", ("B2", "B3"), data, UTM, T).valid_mask().sum() == 22


def test_valid_mask_of_integer_codes_is_the_given_mask():
    codes = np.full((1, 2, 2), 42, np.int32)
    assert Layer("landcover_nlcd", ("class",), codes, UTM, T).valid_mask().all()
    given = np.array([[True, False], [False, True]])
    mask = Layer("landcover_nlcd", ("class",), codes, UTM, T, valid=given).valid_mask()
    assert np.array_equal(mask[0], given)


def test_scene_modalities_include_labels(zion_scene):
    assert zion_scene.modalities == ["landsat8", "dem", "landcover_nlcd"]
    layer = Layer("s2l2a", ("B02",), np.zeros((1, 4, 4), np.float32), UTM, T)
    other = Layer("s2l2a", ("B05",), np.zeros((1, 2, 2), np.float32), UTM, T @ Affine.scale(2))
    scene = Scene("x", "test", "CC0-1.0", layer.grid, [layer, other], labels={"corine": [211, 243]})
    assert scene.modalities == ["s2l2a", "corine"]
    # a label modality that is also a layer modality is listed once
    scene.labels["s2l2a"] = []
    assert scene.modalities == ["s2l2a", "corine"]
