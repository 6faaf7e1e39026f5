"""Shipped source descriptions of seven single-site folders, checked on the real data.

Landsat 7 DN + DEM (Pennsylvania), Landsat 8 SR + DEM (Carmel), 8-bit visual RGB + DEM
(Rocky Mountains), Landsat 8 L1 DN (Parana), S2 L1C (Brandenburg, Patagonia), S2 L2A
(Dolomites). Each test builds a store from the folder and checks facts of the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from terrasynth.data.build import build_store
from terrasynth.data.store import ChipStore
from terrasynth.modalities import default_registry

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.needs_data


def _build(tmp_path: Path, folder: str) -> tuple[ChipStore, dict]:
    build_store([DATA / folder], tmp_path / "s", default_registry())
    store = ChipStore.open(tmp_path / "s")
    assert set(store.table["source"]) == {folder}
    return store, store.source_summary(folder)


def _band(store: ChipStore, modality: str, band: str) -> dict:
    return store.stats[modality]["bands"][band]


def _overlap(store: ChipStore, a: str, b: str, group: str = "r30m") -> float:
    """Fraction of a's valid pixels also valid in b, over chips holding both."""
    both = store.available(a) & store.available(b)
    va = store.array(f"{a}/{group}/valid")[:][both]
    vb = store.array(f"{b}/{group}/valid")[:][both]
    return float((va & vb).sum() / max(va.sum(), 1))


def test_landsat7_pa_ridge_valley_dem(tmp_path):
    store, info = _build(tmp_path, "landsat7_pa_ridge_valley_dem")
    assert info["scenes"] == 2 and info["chips"] == 32  # 300 px -> 4 x 4 chips, two dates
    assert info["modalities"] == {
        "landsat7": ["B1", "B2", "B3", "B4", "B5", "B7", "B61", "B62"],
        "dem": ["elevation"],
    }
    assert info["dates"] == {"count": 2, "first": "2002-07-20", "last": "2002-11-25"}
    # 8-bit DN; thermal DN around 100-190; DEM of the ridges 161-520 m
    for band in ("B1", "B2", "B3", "B4", "B5", "B7"):
        st = _band(store, "landsat7", band)
        assert st["p01"] >= 5 and st["max"] <= 255 and 20 < st["mean"] < 120
    assert 90 < _band(store, "landsat7", "B61")["mean"] < 160
    dem = _band(store, "dem", "elevation")
    assert dem["p01"] > 160 and dem["p99"] < 521
    assert store.available("dem").all()
    assert _overlap(store, "landsat7", "dem") == 1.0
    lat, lon = store.table["lat"].mean(), store.table["lon"].mean()
    assert 40.4 < lat < 40.7 and -76.4 < lon < -76.1  # central Pennsylvania


def test_landsat8sr_dem_carmel(tmp_path):
    store, info = _build(tmp_path, "landsat8sr_dem_carmel")
    assert info["chips"] == 12  # 258 x 241 px -> 4 x 3
    assert info["modalities"] == {"landsat8_sr": ["B2", "B3", "B4"], "dem": ["elevation"]}
    assert info["dates"]["count"] == 0  # no acquisition date is known
    assert store.table["time_days"].isna().all()
    for band in ("B2", "B3", "B4"):
        st = _band(store, "landsat8_sr", band)
        assert st["p01"] >= 0.0 and st["p99"] < 0.4 and 0.05 < st["mean"] < 0.2
    dem = _band(store, "dem", "elevation")
    assert dem["p01"] > -20 and dem["p99"] < 400  # Mount Carmel ridge, 358 m in the window
    # The DEM is NaN over the sea: some chips lack it, and the sea is dark in red.
    assert 0 < store.available("dem").sum() < len(store)
    both = store.available("dem")
    red = store.array("landsat8_sr/r30m/data")[:][both][:, 2]
    ok = store.array("landsat8_sr/r30m/valid")[:][both]
    land = store.array("dem/r30m/valid")[:][both]
    assert red[ok & ~land].mean() < 0.08 < red[ok & land].mean()


def test_rgbvisual_dem_rockymountains(tmp_path):
    store, info = _build(tmp_path, "rgbvisual_dem_rockymountains")
    assert info["chips"] == 35  # 485 x 373 px -> 7 x 5
    assert info["modalities"] == {"rgb_visual": ["R", "G", "B"], "dem": ["elevation"]}
    assert store.table["time_days"].isna().all()
    for band in ("R", "G", "B"):
        st = _band(store, "rgb_visual", band)
        assert st["max"] < 255 and 60 < st["mean"] < 160  # 255 is the white frame (nodata)
    dem = _band(store, "dem", "elevation")
    assert dem["p01"] > 2280 and dem["p99"] < 4262
    # the DEM covers a sub-extent of the RGB
    assert 0 < store.available("dem").sum() < len(store)
    assert _overlap(store, "dem", "rgb_visual") > 0.95


def test_landsat8_l1_parana(tmp_path):
    store, info = _build(tmp_path, "landsat8_l1_parana")
    assert info["modalities"] == {"landsat8": ["B2", "B3", "B4"]}
    assert info["dates"] == {"count": 1, "first": "2020-05-18", "last": "2020-05-18"}
    assert info["scenes"] == 2  # one per WRS row (scene_key), each on its own grid
    assert info["chips"] >= 701 + 740
    for band in ("B2", "B3", "B4"):
        st = _band(store, "landsat8", band)
        assert st["p01"] > 5000 and st["p99"] < 10000  # L1 DN; 0 fill is nodata
    assert _band(store, "landsat8", "B2")["mean"] > _band(store, "landsat8", "B4")["mean"]
    lat, lon = store.table["lat"], store.table["lon"]
    assert lat.between(-25.7, -24.9).all() and lon.between(-55.2, -54.1).all()


def test_s2l1c_brandenburg(tmp_path):
    store, info = _build(tmp_path, "s2l1c_brandenburg")
    assert info["chips"] == 288  # 1536 x 768 px -> 24 x 12
    assert info["modalities"]["s2l1c"] == list(default_registry()["s2l1c"].bands)  # all 13
    assert info["dates"] == {"count": 1, "first": "2017-02-16", "last": "2017-02-16"}
    b02, b10 = _band(store, "s2l1c", "B02"), _band(store, "s2l1c", "B10")
    assert 0.1 < b02["mean"] < 0.2  # TOA blue, winter haze
    assert b10["mean"] < 0.005  # cirrus band ~13 DN
    assert _band(store, "s2l1c", "B01")["p01"] > 0.1  # coastal aerosol, strong path signal
    for band in ("B04", "B08", "B11", "B12"):
        assert 0 <= _band(store, "s2l1c", band)["p01"] < _band(store, "s2l1c", band)["p99"] < 0.6


def test_s2l2a_dolomites(tmp_path):
    store, info = _build(tmp_path, "s2l2a_dolomites")
    assert info["modalities"] == {"s2l2a": ["B02", "B03", "B04", "B08"]}
    assert info["dates"]["count"] == 1 and info["dates"]["first"].startswith("2022-06")
    assert info["chips"] == 224  # 1059 x 934 px -> 16 x 14
    # post-2022 offset removed: (DN - 1000) / 10000 puts dark forest near 0.02-0.06
    for band in ("B02", "B03", "B04", "B08"):
        st = _band(store, "s2l2a", band)
        assert 0.0 < st["p01"] < 0.07 and st["p99"] < 0.6
    assert _band(store, "s2l2a", "B08")["mean"] > 2 * _band(store, "s2l2a", "B04")["mean"]
    bands = store.array("s2l2a/bands")[:]
    assert bands[:, :4].all() and not bands[:, 4:].any()


def test_s2_patagonia(tmp_path):
    store, info = _build(tmp_path, "s2_patagonia")
    assert info["modalities"] == {"s2l1c": ["B02", "B03", "B04", "B08", "B11", "B12"]}
    assert info["dates"]["count"] == 0 and store.table["time_days"].isna().all()
    assert info["chips"] == 12  # 300 x 200 px at 10 m -> 4 x 3
    st = {b: _band(store, "s2l1c", b) for b in ("B02", "B03", "B04", "B08", "B11", "B12")}
    assert all(s["p01"] > 0.05 and s["p99"] < 0.4 for s in st.values())
    # top-of-atmosphere signature: blue above green everywhere dark or bright
    assert st["B02"]["mean"] > st["B03"]["mean"] and st["B02"]["p01"] > st["B03"]["p01"]
    # the 20 m SWIR covers the whole 10 m window
    assert np.asarray(store.array("s2l1c/r20m/valid")[:]).all()
