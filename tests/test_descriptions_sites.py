"""Shipped source descriptions of three site folders, checked on the real data.

S2 ARCSI reflectance + native SRTM (Aberystwyth), an S2 ARCSI time series + 1997 mangrove map
in a negative-northing CRS (Rufiji), and the WorldCereal multi-sensor crop patches (two of
its four sites, copied into a temporary folder: reading all four takes ~30 s).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from terrasynth.data.build import build_store
from terrasynth.data.store import ChipStore
from terrasynth.modalities import default_registry

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.needs_data

ARCSI = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
WORLDCEREAL = "worldcereal_s2_s1_landsat8_dem_crops"


def _build(tmp_path: Path, folder: Path, name: str) -> tuple[ChipStore, dict]:
    build_store([folder], tmp_path / "s", default_registry())
    store = ChipStore.open(tmp_path / "s")
    assert set(store.table["source"]) == {name}
    return store, store.source_summary(name)


def _band(store: ChipStore, modality: str, band: str) -> dict:
    return store.stats[modality]["bands"][band]


def _dates(store: ChipStore, rows=None) -> list[str]:
    days = store.table["time_days"] if rows is None else store.table["time_days"][rows]
    return sorted(pd.to_datetime(days.dropna().unique(), unit="D").strftime("%Y-%m-%d"))


def test_s2_srtm_aberystwyth(tmp_path):
    name = "s2_srtm_aberystwyth"
    store, info = _build(tmp_path, DATA / name, name)
    assert info["scenes"] == 1 and info["chips"] == 196  # 931 x 947 px -> 14 x 14 chips
    assert {m: sorted(b) for m, b in info["modalities"].items()} == {
        "s2sr_arcsi": sorted(ARCSI),
        "dem": ["elevation"],
    }
    assert _dates(store) == ["2021-05-27"]
    assert set(store.table["crs"]) == {"EPSG:27700"}
    assert store.available("s2sr_arcsi").all() and store.available("dem").all()
    # ARCSI reflectance x1000 -> reflectance: dark visible, bright NIR (May vegetation)
    assert 0.02 < _band(store, "s2sr_arcsi", "B02")["mean"] < 0.1
    assert 0.3 < _band(store, "s2sr_arcsi", "B08")["mean"] < 0.6
    assert all(_band(store, "s2sr_arcsi", b)["p99"] < 0.8 for b in ARCSI)
    dem = _band(store, "dem", "elevation")
    assert dem["p01"] > -5 and dem["p99"] < 250 and 40 < dem["mean"] < 130
    # The 1" SRTM (EPSG:4326) lands on the BNG grid: sea (NDVI < 0) sits at ~0 m.
    s2 = store.array("s2sr_arcsi/r10m/data")[:]
    elev = store.array("dem/r30m/data")[:][:, 0]
    ndvi = (s2[:, 3] - s2[:, 2]) / (s2[:, 3] + s2[:, 2] + 1e-6)
    assert np.median(elev[ndvi < 0]) < 1.0 and elev[ndvi > 0.5].mean() > 40
    lat, lon = store.table["lat"].mean(), store.table["lon"].mean()
    assert 52.35 < lat < 52.45 and -4.1 < lon < -3.95


def test_s2_timeseries_mangrove_rufiji(tmp_path):
    name = "s2_timeseries_mangrove_rufiji"
    store, info = _build(tmp_path, DATA / name, name)
    # 169 x 140 px @20 m; the 20 m bands keep 20 m on a 10 m base grid -> 5 x 4 chips a date
    assert info["scenes"] == 21 and info["chips"] == 420
    assert {m: sorted(b) for m, b in info["modalities"].items()} == {
        "s2sr_arcsi": sorted(ARCSI),
        "landcover_mangrove": ["class"],
    }
    dates = _dates(store)
    assert len(dates) == 21 and dates[0] == "2016-03-12" and dates[-1] == "2020-01-01"
    # The map (EPSG:32637, negative northings) covers every chip; cloud-masked dates drop S2.
    assert store.available("landcover_mangrove").all()
    assert store.available("s2sr_arcsi").sum() == 323
    assert set(store.table["crs"]) == {"EPSG:32737"} and set(store.table["gsd_m"]) == {10.0}
    assert store.array("s2sr_arcsi/r20m/data").shape[-1] == 32  # 20 m group at 20 m
    assert 0.02 < _band(store, "s2sr_arcsi", "B02")["mean"] < 0.06
    assert 0.25 < _band(store, "s2sr_arcsi", "B08")["mean"] < 0.45
    counts = store.stats["landcover_mangrove"]["class_counts"]  # mangrove, other land, water
    assert counts[0] > counts[1] and counts[0] > counts[2] > 0
    # The reprojected map agrees with the image: its water is darker in NIR than mangrove.
    both = store.available("s2sr_arcsi")
    nir = store.array("s2sr_arcsi/r10m/data")[:][both][:, 3]
    ok = store.array("s2sr_arcsi/r10m/valid")[:][both]
    cls = store.array("landcover_mangrove/r30m/data")[:][both][:, 0]
    ok &= store.array("landcover_mangrove/r30m/valid")[:][both]
    assert nir[ok & (cls == 2)].mean() < 0.25 < nir[ok & (cls == 0)].mean()


def test_worldcereal_two_flanders_sites(tmp_path):
    root = tmp_path / WORLDCEREAL
    root.mkdir()
    for site in ("flanders_31UES_a_2019", "flanders_31UES_b_2019"):
        # copied: a description does not follow links out of its folder
        shutil.copytree(DATA / WORLDCEREAL / site, root / site)
    store, info = _build(tmp_path, root, WORLDCEREAL)
    t = store.table
    site = t["scene_id"].str.split(":").str[1]
    a = (site == "flanders_31UES_a_2019").to_numpy()
    b = (site == "flanders_31UES_b_2019").to_numpy()
    assert a.sum() == 85 and b.sum() == 162  # one 640 m chip per date (S2 anchor + extra S1/L8)
    assert set(info["modalities"]) == {
        "s2l2a",
        "s1grd",
        "landsat8_sr",
        "landsat8_st",
        "dem",
        "landcover_worldcereal",
        "croptype_worldcereal",
    }
    assert sorted(info["modalities"]["landsat8_sr"]) == ["B2", "B3", "B4", "B5", "B6", "B7"]
    assert set(t["crs"]) == {"EPSG:32631"} and set(t["gsd_m"]) == {10.0}
    assert _dates(store, a)[0] == "2018-08-04" and _dates(store, a)[-1] == "2019-11-27"
    assert _dates(store, b)[0] == "2018-08-02" and _dates(store, b)[-1] == "2019-11-27"
    # S2 L2A: the 10 m file exists at site a only; the 20 m bands are there at both
    bands = store.array("s2l2a/bands")[:]
    s2 = store.available("s2l2a")
    assert bands[a & s2][:, :4].all() and not bands[b & s2][:, :4].any()
    assert bands[b & s2][:, 4:10].all()
    # the SCL of the 20 m file masks the 10 m bands too: only SCL-clear dates count, at
    # both sites (72 dates at site a, 40 of them clear)
    assert s2[a].sum() == 40 and s2[b].sum() == 73
    # SCL-masked 20 m bands: vegetation/soil reflectance, no cloud tops
    for band in ("B05", "B8A", "B11", "B12"):
        st = _band(store, "s2l2a", band)
        assert st["p01"] > 0.0 and st["p99"] < 0.8
    # S1 in dB (int32 dB x 1e4), L8 SR reflectance (C1 x 1e-4), L8 ST in K, DEM in m
    vv, vh = _band(store, "s1grd", "VV"), _band(store, "s1grd", "VH")
    assert -12 < vv["mean"] < -8 and -19 < vh["mean"] < -15 and vv["p01"] > -25
    nir, red = _band(store, "landsat8_sr", "B5"), _band(store, "landsat8_sr", "B4")
    assert 0.2 < nir["mean"] < 0.4 and red["mean"] < 0.1 and nir["p99"] < 0.7
    st = _band(store, "landsat8_st", "ST_B10")
    assert st["min"] > 230 and st["max"] < 330 and 280 < st["mean"] < 300
    elev = store.array("dem/r30m/data")[:][:, 0]
    assert 30 < elev[a].mean() < 55 and 5 < elev[b].mean() < 20
    # S1 and Landsat join S2 dates within 6 days; other dates are scenes of their own
    s1 = store.available("s1grd")
    assert (s1 & s2).sum() > 100 and (s1 & ~s2).sum() > 50
    assert (store.available("landsat8_sr") & s2).sum() > 5
    # Labels (timeless, every chip): LPIS classes found in the two parcels
    assert store.available("landcover_worldcereal").all()
    assert store.available("croptype_worldcereal").all()
    assert _codes(store, "landcover_worldcereal", a | b) == {11, 13, 60, 99}
    assert _codes(store, "croptype_worldcereal", a) == {1110, 1200, 1500, 1510, 5100, 8100, 9120}
    assert _codes(store, "croptype_worldcereal", b) == {1110, 1200, 1910, 5100, 9120}


def _codes(store: ChipStore, modality: str, rows: np.ndarray) -> set[int]:
    """Legend codes present in the valid pixels of ``rows``."""
    group = store.registry[modality].groups[0].name
    idx = store.array(f"{modality}/{group}/data")[:][rows]
    ok = store.array(f"{modality}/{group}/valid")[:][rows]
    legend = store.registry[modality].legend
    return {legend[int(i)].code for i in np.unique(idx[:, 0][ok])}
