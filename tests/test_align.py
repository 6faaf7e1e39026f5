"""Alignment on real data: the Zion Landsat 8, SRTM (EPSG:4326) and NLCD (EPSG:6367)."""

import numpy as np
import pytest

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
