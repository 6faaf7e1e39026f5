"""Alignment on real data: the Zion Landsat 8, SRTM (EPSG:4326) and NLCD (EPSG:6367)."""

import numpy as np
import pytest
from rasterio.transform import Affine

from terrasynth.data.align import align_scene
from terrasynth.modalities import default_registry

pytestmark = pytest.mark.needs_data


@pytest.fixture(scope="module")
def aligned(zion_scene):
    return align_scene(zion_scene, default_registry())


def test_every_modality_lands_on_the_landsat_grid(aligned, zion_scene):
    grid = zion_scene.grid
    assert (grid.width, grid.height) == (1128, 1428)
    assert set(aligned.groups) == {
        ("landsat8", "r30m"),
        ("dem", "r30m"),
        ("landcover_nlcd", "r30m"),
    }
    for g in aligned.groups.values():
        assert g.data.shape[1:] == (1428, 1128)
        assert g.grid == grid


def test_coregistration_ndvi_water_vs_forest(aligned):
    """NDVI from Landsat red/NIR is low on NLCD open water and high on forest."""
    reg = default_registry()
    ls = aligned.groups[("landsat8", "r30m")]
    lc = aligned.groups[("landcover_nlcd", "r30m")]
    r, n = ls.bands.index("B4"), ls.bands.index("B5")
    red, nir = ls.data[r], ls.data[n]
    ok = ls.valid[r] & ls.valid[n] & lc.valid[0]
    ndvi = (nir - red) / np.maximum(nir + red, 1.0)
    index = reg["landcover_nlcd"].class_index()
    cls = lc.data[0]
    water = ok & (cls == index[11])
    evergreen = ok & (cls == index[42])
    assert water.sum() > 50 and evergreen.sum() > 1000
    assert np.median(ndvi[evergreen]) > np.median(ndvi[water]) + 0.1
    # a mis-registration by half the scene would erase the contrast: check it would
    shifted = np.roll(cls, 700, axis=0)
    water_shifted = ok & (shifted == index[11])
    assert abs(np.median(ndvi[water_shifted]) - np.median(ndvi[evergreen])) < abs(
        np.median(ndvi[water]) - np.median(ndvi[evergreen])
    )


def test_elevation_is_resampled_continuously_and_classes_stay_classes(aligned):
    dem = aligned.groups[("dem", "r30m")]
    vals = dem.data[0][dem.valid[0]]
    assert vals.min() > 900 and vals.max() < 3300  # Zion area: ~1050-2900 m
    # bilinear resampling produces values between the 3" SRTM integers
    assert np.mean(vals != np.round(vals)) > 0.5
    lc = aligned.groups[("landcover_nlcd", "r30m")]
    assert np.all(lc.data[0] == np.round(lc.data[0]))
    assert lc.data[0].max() < default_registry()["landcover_nlcd"].num_classes


def test_nodata_stays_invalid(zion_scene):
    """Pixels marked nodata in a source are never filled in by alignment."""
    from dataclasses import replace

    layer = zion_scene.layers[0]
    valid = layer.valid_mask().copy()
    valid[:, :200, :] = False
    scene = replace(zion_scene, layers=[replace(layer, valid=valid)])
    g = align_scene(scene, default_registry()).groups[("landsat8", "r30m")]
    b2 = g.bands.index("B2")
    assert not g.valid[b2, :199, :].any()
    assert g.valid[b2, 250:, :].mean() > 0.5


def _gdal(data, valid, layer, dst, resampling):
    """What GDAL's reproject gives, band by band (the path the crop shortcut replaces)."""
    from rasterio.warp import reproject

    out = []
    for band, ok in zip(data, valid, strict=True):
        o = np.zeros((dst.height, dst.width), np.float32)
        src = np.where(ok, band.astype(np.float32), np.nan)
        reproject(
            src, o, src_transform=layer.transform, src_crs=layer.crs, dst_transform=dst.transform,
            dst_crs=dst.crs, src_nodata=np.nan, dst_nodata=np.nan, resampling=resampling,
        )  # fmt: skip
        out.append(o)
    out = np.stack(out)
    return np.nan_to_num(out), np.isfinite(out)


@pytest.mark.parametrize("offset", [(100, 200), (-7, 5), (1400, 1100)])
@pytest.mark.parametrize("method", ["bilinear", "nearest"])
def test_a_crop_of_the_source_grid_is_copied_as_gdal_would_resample_it(zion_scene, offset, method):
    from rasterio.warp import Resampling

    from terrasynth.data.align import warp_to_grid
    from terrasynth.data.scene import Grid

    layer = zion_scene.layers[0]
    data = np.concatenate([layer.data, zion_scene.layers[1].data])[:, :400, :400]
    valid = np.isfinite(data) & (data > 0)
    valid[:, 50:60, 70:90] = False  # a hole of nodata inside the crop
    r, c = offset
    dst = Grid(layer.crs, layer.transform @ Affine.translation(c, r), 64, 48)
    resampling = Resampling[method]
    got, ok = warp_to_grid(data, valid, layer.transform, layer.crs, dst, resampling)
    want, want_ok = _gdal(data, valid, layer, dst, resampling)
    assert got.shape == (2, 48, 64)
    np.testing.assert_array_equal(ok, want_ok)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if offset == (100, 200):  # inside the source: its own pixels
        np.testing.assert_array_equal(got, np.where(valid, data, 0)[:, 100:148, 200:264])
    if offset == (1400, 1100):  # off the source altogether: nothing valid
        assert not ok.any()


@pytest.mark.parametrize("own_gaps", [False, True])
def test_a_stack_of_bands_resamples_as_each_band_alone(zion_scene, own_gaps):
    from rasterio.warp import Resampling

    from terrasynth.data.align import warp_to_grid

    layer = zion_scene.layers[0]
    data = np.concatenate([lyr.data for lyr in zion_scene.layers[:3]])[:, :300, :300]
    valid = np.isfinite(data) & (data > 0)
    valid[:, 100:110] = False  # a gap in every band
    if own_gaps:
        valid[1, :40] = False  # and one of the second band alone
    dst = layer.grid.scaled(3)  # a coarser grid: GDAL resamples
    dst = type(dst)(dst.crs, dst.transform, 80, 80)
    got, ok = warp_to_grid(data, valid, layer.transform, layer.crs, dst, Resampling.bilinear)
    want, want_ok = _gdal(data, valid, layer, dst, Resampling.bilinear)
    np.testing.assert_array_equal(ok, want_ok)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert ok[0].sum() > ok[1].sum() > 0 if own_gaps else (ok == ok[:1]).all()
