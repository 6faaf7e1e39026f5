"""Shipped source descriptions of two glacier folders, checked on the real data.

HLS S30 + L30 surface reflectance and a DEM over the Athabasca Glacier (Canada), and Landsat 7
ETM+ 8-bit DN with the RGI 6.0 glacier mask over Mount Everest. Both folders are built into
one store, as ``terrasynth data build`` does with several folders; stored chips are compared
pixel by pixel with the files they were read from (band order, scale, georeference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.windows import Window

from terrasynth.data.build import build_store
from terrasynth.data.split import SplitConfig
from terrasynth.data.store import ChipStore
from terrasynth.modalities import default_registry

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.needs_data

ATHABASCA = "athabasca_hls_s30_l30_dem"
EVEREST = "everest_landsat7_rgi_glaciers"
S30_FILE = DATA / ATHABASCA / "hls_s30_2020-09-09_b02_b03_b04_b8a_b11_b12.tif"
L30_FILE = DATA / ATHABASCA / "hls_l30_2020-08-16_b02-b07.tif"
DEM_FILE = DATA / ATHABASCA / "dem_30m.tif"
L7_FILE = DATA / EVEREST / "LE71400412000304SGS00_rgb_b4.tif"
RGI_FILE = DATA / EVEREST / "rgi6_glacier_mask.tif"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[ChipStore, list[str]]:
    out = tmp_path_factory.mktemp("glaciers") / "store"
    report = build_store([DATA / ATHABASCA, DATA / EVEREST], out, default_registry())
    return ChipStore.open(out), report.warnings


@pytest.fixture(scope="module")
def store(built) -> ChipStore:
    return built[0]


def _rows(store: ChipStore, source: str, modality: str | None = None) -> np.ndarray:
    rows = store.table["source"].to_numpy() == source
    if modality is not None:
        rows &= store.available(modality)
    return np.flatnonzero(rows)


def _file_window(store: ChipStore, row: int, path: Path, bands: list[int]) -> np.ndarray:
    """The file's raw values under chip ``row`` (from the chip's stored transform)."""
    a, _, c, _, e, f = store.table["transform"].iloc[row]
    with rasterio.open(path) as src:
        assert a == src.transform.a and e == src.transform.e  # same 30 m grid
        col = (c - src.transform.c) / a
        top = (f - src.transform.f) / e
        assert col == int(col) and top == int(top)  # chips sit on the file's pixel grid
        size = store.chip_size
        return src.read(bands, window=Window(int(col), int(top), size, size))


def _band_values(store: ChipStore, modality: str, band: str, rows: np.ndarray) -> np.ndarray:
    i = list(store.registry[modality].bands).index(band)
    data = store.array(f"{modality}/r30m/data").oindex[rows, i]
    valid = store.array(f"{modality}/r30m/valid").oindex[rows]
    return np.asarray(data)[np.asarray(valid)]


def test_registry_entries_for_hls_and_rgi():
    reg = default_registry()
    s30, l30, rgi = reg["hls_s30"], reg["hls_l30"], reg["glacier_rgi6"]
    assert len(s30.bands) == 13 and len(l30.bands) == 8
    assert [g.gsd for g in s30.groups] == [30] and [g.gsd for g in l30.groups] == [30]
    assert s30.units == l30.units == "reflectance" and s30.kind == l30.kind == "continuous"
    # every optical band has a spectral slot; the narrow NIR of both is nir08, like OLI B5
    assert set(s30.spectral_slots) == set(s30.bands)
    assert set(l30.spectral_slots) == set(l30.bands)
    assert s30.spectral_slots["B8A"] == l30.spectral_slots["B05"] == "nir08"
    assert s30.spectral_slots["B08"] == "nir"
    assert l30.spectral_slots["B05"] == reg["landsat8_sr"].spectral_slots["B5"]
    assert l30.spectral_slots["B09"] == s30.spectral_slots["B10"] == "cirrus"
    assert rgi.kind == "categorical" and rgi.class_index() == {0: 0, 1: 1}


def test_store_holds_both_sources_without_warnings(built):
    store, warnings = built
    assert warnings == []
    assert set(store.table["source"]) == {ATHABASCA, EVEREST}
    assert set(store.modalities) == {"hls_s30", "hls_l30", "dem", "landsat7", "glacier_rgi6"}


def test_athabasca_scenes_modalities_and_dates(store):
    info = store.source_summary(ATHABASCA)
    # 215 x 205 px -> 3 x 3 chips; S30 and L30 are 24 days apart: a scene each, DEM in both
    assert info["scenes"] == 2 and info["chips"] == 18
    assert info["modalities"] == {
        "hls_s30": ["B02", "B03", "B04", "B8A", "B11", "B12"],
        "dem": ["elevation"],
        "hls_l30": ["B02", "B03", "B04", "B05", "B06", "B07"],
    }
    assert info["dates"] == {"count": 2, "first": "2020-08-16", "last": "2020-09-09"}
    t = store.table.iloc[_rows(store, ATHABASCA)]
    dates = pd.to_datetime(t["time_days"], unit="D").dt.strftime("%Y-%m-%d")
    assert (t["has_hls_s30"] == (dates == "2020-09-09")).all()
    assert (t["has_hls_l30"] == (dates == "2020-08-16")).all()
    assert t["has_dem"].all()
    # the glacier outline of this folder is not an inventory and is not read
    assert not t["has_glacier_rgi6"].any()


def test_athabasca_values_are_reflectance_and_metres(store):
    s30, l30 = _rows(store, ATHABASCA, "hls_s30"), _rows(store, ATHABASCA, "hls_l30")
    for mod, rows, vis, nir, swir in (
        ("hls_s30", s30, "B03", "B8A", "B11"),
        ("hls_l30", l30, "B03", "B05", "B06"),
    ):
        green = _band_values(store, mod, vis, rows)
        # snow and ice: bright visible, up to ~1.2 (not DN, not DN / 255); small negatives
        # in terrain shadow
        assert 0.3 < np.median(green) < 0.7 and 1.0 < green.max() < 1.4
        assert -0.2 < green.min() < 0.0
        assert 0.2 < np.median(_band_values(store, mod, nir, rows)) < 0.6
        sw = _band_values(store, mod, swir, rows)
        assert np.median(sw) < 0.05 and sw.max() < 0.6  # snow is dark in SWIR
    dem = _band_values(store, "dem", "elevation", _rows(store, ATHABASCA, "dem"))
    assert dem.min() >= 1937 and dem.max() <= 3449  # glacier toe ~1950 m, Snow Dome ~3450 m
    assert 2600 < np.median(dem) < 3000


def test_athabasca_chips_match_the_files(store):
    """Band order, scale 1e-4, nodata -9999 and the grid: stored chips equal the files."""
    for mod, path, bands in (
        ("hls_s30", S30_FILE, ["B02", "B03", "B04", "B8A", "B11", "B12"]),
        ("hls_l30", L30_FILE, ["B02", "B03", "B04", "B05", "B06", "B07"]),
    ):
        idx = [list(store.registry[mod].bands).index(b) for b in bands]
        for row in _rows(store, ATHABASCA, mod):
            raw = _file_window(store, row, path, list(range(1, 7)))
            data = np.asarray(store.array(f"{mod}/r30m/data")[row])[idx]
            valid = np.asarray(store.array(f"{mod}/r30m/valid")[row])
            assert (valid == (raw[0] != -9999)).all()
            np.testing.assert_allclose(data[:, valid], raw[:, valid] * 1e-4, atol=1e-6)
    l30_missing = sum(
        int((~np.asarray(store.array("hls_l30/r30m/valid")[r])).sum())
        for r in _rows(store, ATHABASCA, "hls_l30")
    )
    assert l30_missing > 0  # the L30 file has fill (-9999) pixels: they stay invalid
    for row in _rows(store, ATHABASCA, "dem"):
        raw = _file_window(store, row, DEM_FILE, [1])[0]
        valid = np.asarray(store.array("dem/r30m/valid")[row])
        assert (valid == (raw != -32768)).all()
        np.testing.assert_array_equal(
            np.asarray(store.array("dem/r30m/data")[row, 0])[valid], raw[valid]
        )


def test_athabasca_s30_and_l30_agree_three_weeks_apart(store):
    """Same place, two sensors: chips of one location hold closely correlated bands."""
    t = store.table
    s30 = {tuple(t["transform"].iloc[r]): r for r in _rows(store, ATHABASCA, "hls_s30")}
    l30 = {tuple(t["transform"].iloc[r]): r for r in _rows(store, ATHABASCA, "hls_l30")}
    assert s30.keys() == l30.keys() and len(s30) == 9
    for s_band, l_band in (("B04", "B04"), ("B8A", "B05"), ("B11", "B06")):
        a, b = [], []
        for key in s30:
            i = list(store.registry["hls_s30"].bands).index(s_band)
            j = list(store.registry["hls_l30"].bands).index(l_band)
            va = np.asarray(store.array("hls_s30/r30m/valid")[s30[key]])
            vb = np.asarray(store.array("hls_l30/r30m/valid")[l30[key]])
            ok = va & vb
            a.append(np.asarray(store.array("hls_s30/r30m/data")[s30[key], i])[ok])
            b.append(np.asarray(store.array("hls_l30/r30m/data")[l30[key], j])[ok])
        assert np.corrcoef(np.concatenate(a), np.concatenate(b))[0, 1] > 0.9, s_band


def test_everest_modalities_values_and_band_order(store):
    info = store.source_summary(EVEREST)
    assert info["scenes"] == 1 and info["chips"] == 120  # 800 x 655 px -> 12 x 10 chips
    assert info["modalities"] == {"landsat7": ["B1", "B2", "B3", "B4"], "glacier_rgi6": ["class"]}
    assert info["dates"] == {"count": 1, "first": "2000-10-30", "last": "2000-10-30"}
    rows = _rows(store, EVEREST)
    assert store.available("landsat7")[rows].all() and store.available("glacier_rgi6")[rows].all()
    # 8-bit DN, not reflectance; blue has the highest dark floor (path radiance)
    p01 = {
        b: np.percentile(_band_values(store, "landsat7", b, rows), 1) for b in ["B1", "B2", "B3"]
    }
    assert p01["B1"] > p01["B2"] and p01["B1"] > p01["B3"]
    for band in ("B1", "B2", "B3", "B4"):
        v = _band_values(store, "landsat7", band, rows)
        assert v.min() >= 1 and v.max() == 255 and 100 < v.mean() < 200
    # file bands 1, 2, 3 are B3, B2, B1 (R, G, B); band 4 is B4; the mask is copied as is
    idx = [list(store.registry["landsat7"].bands).index(b) for b in ("B3", "B2", "B1", "B4")]
    for row in rows[::7]:
        raw = _file_window(store, row, L7_FILE, [1, 2, 3, 4])
        np.testing.assert_array_equal(np.asarray(store.array("landsat7/r30m/data")[row])[idx], raw)
        mask = _file_window(store, row, RGI_FILE, [1])[0]
        np.testing.assert_array_equal(
            np.asarray(store.array("glacier_rgi6/r30m/data")[row, 0]), mask
        )


def test_everest_glaciers_are_bright_and_cover_half(store):
    rows = _rows(store, EVEREST)
    cls = np.asarray(store.array("glacier_rgi6/r30m/data").oindex[rows, 0])
    assert np.asarray(store.array("glacier_rgi6/r30m/valid").oindex[rows]).all()
    assert set(np.unique(cls)) == {0, 1}
    assert 0.4 < cls.mean() < 0.7  # 54 % of the crop is glacier
    i = list(store.registry["landsat7"].bands).index("B4")
    nir = np.asarray(store.array("landsat7/r30m/data").oindex[rows, i])
    assert nir[cls == 1].mean() > nir[cls == 0].mean() + 30  # ~173 against ~111 DN


def test_georeference_and_split_assignment(store):
    t = store.table
    ath, ev = t.iloc[_rows(store, ATHABASCA)], t.iloc[_rows(store, EVEREST)]
    assert set(ath["crs"]) == {"EPSG:32611"} and set(ev["crs"]) == {"EPSG:32645"}
    assert (ath["gsd_m"] == 30).all() and (ev["gsd_m"] == 30).all()
    # chip centres inside the places the sources describe
    assert ath["lon"].between(-117.32, -117.23).all() and ath["lat"].between(52.155, 52.21).all()
    assert ev["lon"].between(86.78, 87.02).all() and ev["lat"].between(27.92, 28.10).all()
    # splits by ground blocks: reproducible from the chip position, one per block, and the
    # same for S30 and L30 chips of one place
    cfg = SplitConfig.from_dict(store.attrs["split"])
    for _, r in t.iterrows():
        assert (r["block_x"], r["block_y"]) == cfg.block_of(r["lon"], r["lat"])
        assert r["split"] == cfg.split_of_block((r["block_x"], r["block_y"]))
    by_place = ath.groupby(ath["transform"].map(tuple))["split"].nunique()
    assert len(by_place) == 9 and (by_place == 1).all()
    assert set(ev["split"]) == {"train", "val", "test"}
    assert (t.groupby(["block_x", "block_y"])["split"].nunique() == 1).all()
