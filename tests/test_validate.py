"""Inputs that do not look like their modality: refused, warned about, or accepted."""

import numpy as np
import pytest
import rasterio

from terrasynth.data.raster_io import read_layer
from terrasynth.data.validate import check_layer, check_values
from terrasynth.errors import InputError
from terrasynth.modalities import default_registry
from tests.conftest import DATA, ZION

pytestmark = pytest.mark.needs_data
L7 = DATA / "landsat7_pa_ridge_valley_dem" / "landsat7_etm_july2002_DN.tif"
REG = default_registry()


def test_landsat7_dn_as_landsat8_is_warned_as_its_own_modality_not():
    as_l8 = read_layer(L7, "landsat8", ["B1", "B2", "B3", "B4"], indexes=[1, 2, 3, 4])
    warning = check_layer(as_l8, REG["landsat8"], "pa")
    assert warning is not None
    assert "landsat8" in warning and "8-bit values given as a 16-bit modality" in warning
    as_l7 = read_layer(L7, "landsat7", ["B1", "B2", "B3", "B4"], indexes=[1, 2, 3, 4])
    assert check_layer(as_l7, REG["landsat7"], "pa") is None
    with pytest.raises(InputError, match="refused with --strict"):
        check_layer(as_l8, REG["landsat8"], "pa", strict=True)


def test_real_inputs_of_the_right_modality_pass():
    l8 = read_layer(ZION / "landsat_b4.tif", "landsat8", ["B4"])
    assert check_layer(l8, REG["landsat8"], "zion") is None
    dem = read_layer(ZION / "srtm.tif", "dem", ["elevation"])
    assert check_layer(dem, REG["dem"], "zion") is None


def test_dn_given_as_reflectance_is_refused_with_a_hint():
    with rasterio.open(DATA / "s2l2a_dolomites" / "S2_L2A_Tofane_202206_B02B03B04B08.tif") as f:
        dn = f.read(1).astype(np.float32).ravel()
    with pytest.raises(InputError, match="--scale"):
        check_values(dn, REG["s2l2a"], "dolomites")
    assert check_values(dn * 1e-4 - 0.1, REG["s2l2a"], "dolomites") is None


def test_linear_power_given_as_db_is_explained():
    rng = np.random.default_rng(0)
    linear = rng.gamma(1.0, 0.05, 10_000).astype(np.float32)  # sigma0 in linear power
    warning = check_values(linear, REG["s1grd"], "s1")
    assert warning is not None and "linear power" in warning
    db = 10 * np.log10(linear + 1e-6)
    assert check_values(db, REG["s1grd"], "s1") is None


def test_training_statistics_narrow_the_expectation():
    stats = {"p01": 10.0, "p99": 20.0}
    values = np.full(100, 45.0, np.float32)  # inside the dem's expected range, not the store's
    assert check_values(values, REG["dem"], "x") is None
    assert check_values(values, REG["dem"], "x", stats=stats) is not None


def test_categorical_and_empty_inputs_are_not_range_checked():
    assert check_values(np.array([11.0, 90.0]), REG["landcover_nlcd"], "x") is None
    assert check_values(np.array([], np.float32), REG["dem"], "x") is None
