"""Derived modalities: slope from elevation, and training chips widened with it."""

import numpy as np
import pytest

from terrasynth.data.build import build_store
from terrasynth.data.dataset import ChipDataset
from terrasynth.data.derived import scale_relief, slope_degrees
from terrasynth.data.stats import denormalise
from terrasynth.modalities import default_registry
from tests.conftest import DATA, ZION


def test_slope_of_a_tilted_plane():
    y, x = np.mgrid[0:8, 0:8].astype(np.float32)
    valid = np.ones((8, 8), bool)
    slope, ok = slope_degrees(3.0 * x, valid, pixel_m=30.0)  # 3 m per 30 m pixel: 10 %
    assert ok.all()
    np.testing.assert_allclose(slope, np.degrees(np.arctan(0.1)), rtol=1e-5)
    slope, _ = slope_degrees(30.0 * x + 30.0 * y, valid, pixel_m=30.0)  # 1 m/m both ways
    np.testing.assert_allclose(slope, np.degrees(np.arctan(np.sqrt(2.0))), rtol=1e-5)
    flat, _ = slope_degrees(np.full((8, 8), 412.0, np.float32), valid, pixel_m=10.0)
    assert flat.max() == 0


def test_slope_is_invalid_next_to_nodata():
    valid = np.ones((6, 6), bool)
    valid[2, 3] = False
    z = np.where(valid, 100.0, -9999.0).astype(np.float32)  # nodata must not make a cliff
    slope, ok = slope_degrees(z, valid, pixel_m=30.0)
    assert not ok[2, 3] and not ok[1, 3] and not ok[3, 3] and not ok[2, 2] and not ok[2, 4]
    assert ok.sum() == 36 - 5
    assert slope[ok].max() == 0 and slope[~ok].max() == 0


def test_scale_relief_keeps_the_mean_and_scales_the_slope():
    y, x = np.mgrid[0:8, 0:8].astype(np.float32)
    valid = np.ones((8, 8), bool)
    valid[0, 0] = False
    z = np.where(valid, 500.0 + 30.0 * x, -9999.0).astype(np.float32)  # 45 degrees
    flat = scale_relief(z, valid, 0.1)
    assert flat[0, 0] == -9999.0  # nodata untouched
    np.testing.assert_allclose(flat[valid].mean(), z[valid].mean(), rtol=1e-6)
    slope, ok = slope_degrees(flat, valid, pixel_m=30.0)
    np.testing.assert_allclose(slope[ok], np.degrees(np.arctan(0.1)), rtol=1e-4)


@pytest.fixture(scope="module")
def dem_slope_store(tmp_path_factory):
    """Zion (DEM, no slope) beside Myanmar (DEM and a shipped slope)."""
    out = tmp_path_factory.mktemp("stores") / "slope"
    build_store([ZION, DATA / "s1_timeseries_myanmar_srtm"], out, default_registry())
    return out


@pytest.mark.needs_data
def test_training_chips_gain_slope_where_they_hold_a_dem(dem_slope_store):
    plain = ChipDataset(dem_slope_store)
    wide = ChipDataset(dem_slope_store, derive=True)
    si, di = plain.modalities.index("slope"), plain.modalities.index("dem")
    has = plain._has[plain.indices]
    lacking = np.flatnonzero(has[:, di] & ~has[:, si])
    shipped = np.flatnonzero(has[:, di] & has[:, si])
    assert len(lacking) and len(shipped)
    i = int(lacking[0])
    assert not plain[i]["available"][si] and wide[i]["available"][si]
    s = wide[i]
    stats = wide.store.stats["slope"]
    slope = denormalise(s["slope/r30m"].numpy(), stats, ("slope",), "none")[0]
    ok = s["slope/r30m/valid"].numpy()
    assert ok.mean() > 0.9 and slope[ok].min() >= 0 and slope[ok].max() < 90
    assert slope[ok].std() > 1  # Zion is canyon country: the slope varies
    # a chip that ships its slope keeps the stored values
    j = int(shipped[0])
    np.testing.assert_array_equal(wide[j]["slope/r30m"].numpy(), plain[j]["slope/r30m"].numpy())
    # and the derivation agrees with the shipped slope of Myanmar's SRTM chips
    d = wide._derived_modality("slope", int(wide.indices[j]))
    both = d["slope/r30m/valid"].numpy() & plain[j]["slope/r30m/valid"].numpy()
    a = denormalise(d["slope/r30m"].numpy(), stats, ("slope",), "none")[0][both]
    b = denormalise(plain[j]["slope/r30m"].numpy(), stats, ("slope",), "none")[0][both]
    assert np.abs(a - b).mean() < 2.0


@pytest.mark.needs_data
def test_relief_scaling_flattens_dem_and_slope_together(dem_slope_store):
    plain = ChipDataset(dem_slope_store, derive=True)
    scaled = ChipDataset(dem_slope_store, derive=True, relief_scale=1.0, seed=3)
    never = ChipDataset(dem_slope_store, derive=True, relief_scale=0.0, seed=3)
    i = int(np.flatnonzero(plain._has[plain.indices][:, plain.modalities.index("dem")])[0])
    a, b = plain[i], scaled[i]
    np.testing.assert_array_equal(never[i]["dem/r30m"].numpy(), a["dem/r30m"].numpy())
    dem_stats, slope_stats = plain.store.stats["dem"], plain.store.stats["slope"]
    ok = a["dem/r30m/valid"].numpy()
    za = denormalise(a["dem/r30m"].numpy(), dem_stats, ("elevation",), "none")[0][ok]
    zb = denormalise(b["dem/r30m"].numpy(), dem_stats, ("elevation",), "none")[0][ok]
    assert abs(za.mean() - zb.mean()) < 1.0  # the mean height stays
    factor = zb.std() / za.std()
    assert 0.01 <= factor < 1.0
    # the slope is that of the flattened DEM: small angles scale with the relief
    s_ok = b["slope/r30m/valid"].numpy()
    sa = denormalise(a["slope/r30m"].numpy(), slope_stats, ("slope",), "none")[0][s_ok]
    sb = denormalise(b["slope/r30m"].numpy(), slope_stats, ("slope",), "none")[0][s_ok]
    assert sb.mean() < sa.mean()
    ta, tb = np.tan(np.radians(sa)), np.tan(np.radians(sb))
    np.testing.assert_allclose(np.median(tb / np.maximum(ta, 1e-6)), factor, rtol=0.05)
    # other modalities are untouched
    for key in a:
        if not key.startswith(("dem/", "slope/")):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    with pytest.raises(ValueError, match="relief_scale"):
        ChipDataset(dem_slope_store, relief_scale=1.5)
