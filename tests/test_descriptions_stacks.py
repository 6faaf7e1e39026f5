"""Shipped source descriptions of four stacked-export folders, checked on the real data.

Togo and Honduras (Earth Engine monthly S1/S2 L1C/SRTM stacks, 17x17 px), Peru (S1 + L8 SR
plus a second L8 scene elsewhere) and MultiEarth (S1, S2, L8 SR/ST, deforestation masks).
"""

from __future__ import annotations

import shutil
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from terrasynth.data.build import build_store
from terrasynth.data.sources.described import DescribedSource, find_description
from terrasynth.data.store import ChipStore
from terrasynth.modalities import default_registry

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DESCRIPTIONS = Path(__file__).resolve().parents[1] / "src" / "terrasynth" / "data" / "descriptions"
TOGO = "s1_s2l1c_srtm_monthly_togo"
HONDURAS = "s1_s2l1c_srtm_monthly_honduras"
PERU = "s1_landsat8sr_peru"
AMAZON = "multiearth_s1_s2_landsat8_amazon"

pytestmark = pytest.mark.needs_data


def _build(tmp_path_factory, source: Path | str) -> ChipStore:
    out = tmp_path_factory.mktemp("stacks") / "s"
    build_store([source], out, default_registry())
    return ChipStore.open(out)


def _dates(store: ChipStore) -> list[date]:
    return [d.date() for d in pd.to_datetime(store.table["time_days"], unit="D")]


def _values(store: ChipStore, modality: str, group: str, band: str) -> np.ndarray:
    """Valid physical values of one band over all chips that hold it."""
    bands = store.registry[modality].groups
    names = next(g.bands for g in bands if g.name == group)
    data = store.array(f"{modality}/{group}/data")[:][:, names.index(band)]
    valid = store.array(f"{modality}/{group}/valid")[:]
    has = store.available(modality)
    return data[has][valid[has]]


def _windows(start: date, n: int) -> list[date]:
    """Midpoints of the exporter's consecutive 30-day composite windows."""
    return [start + timedelta(days=30 * k + 15) for k in range(n)]


@pytest.fixture(scope="module")
def honduras(tmp_path_factory) -> ChipStore:
    return _build(tmp_path_factory, DATA / HONDURAS)


@pytest.fixture(scope="module")
def togo(tmp_path_factory) -> ChipStore:
    # The folder's files have the same names as Honduras'; the shipped descriptions cannot
    # tell the two folders apart yet, so the Togo description is given as a file here,
    # beside a copy of the data (its root must lie inside the description's folder).
    folder = tmp_path_factory.mktemp("desc")
    shutil.copytree(DATA / TOGO, folder / TOGO)
    text = (DESCRIPTIONS / f"{TOGO}.yaml").read_text()
    (folder / f"{TOGO}.yaml").write_text(f"{text}\nroot: {TOGO}\n")
    return _build(tmp_path_factory, folder / f"{TOGO}.yaml")


@pytest.fixture(scope="module")
def peru(tmp_path_factory) -> ChipStore:
    return _build(tmp_path_factory, DATA / PERU)


@pytest.fixture(scope="module")
def amazon(tmp_path_factory) -> ChipStore:
    return _build(tmp_path_factory, DATA / AMAZON)


@pytest.mark.parametrize(
    ("name", "start", "n"),
    [(HONDURAS, date(2017, 1, 1), 24), (TOGO, date(2019, 2, 6), 12)],
)
def test_monthly_stacks_pair_s1_and_s2_per_window(request, name, start, n):
    store = request.getfixturevalue("honduras" if name == HONDURAS else "togo")
    t = store.table
    assert set(t["source"]) == {name}
    assert set(store.modalities) == {"s2l1c", "s1grd", "dem", "slope"}
    # One scene per 30-day window, S1 and S2 of the window in the same chip.
    assert sorted(set(_dates(store))) == _windows(start, n)
    assert t["scene_id"].nunique() == n
    for m in ("s2l1c", "s1grd", "dem", "slope"):
        assert store.available(m).all(), m
    assert store.array("s2l1c/bands")[:].all()  # all 13 L1C bands, B10 included
    s1 = store.array("s1grd/r10m/valid")[:]
    s2 = store.array("s2l1c/r10m/valid")[:]
    assert ((s1 & s2).sum(axis=(1, 2)) == 17 * 17).all()


def test_monthly_stacks_values_are_physical(honduras, togo):
    for store, (lo, hi) in ((honduras, (948, 1032)), (togo, (207, 215))):
        elev = _values(store, "dem", "r30m", "elevation")
        assert elev.min() == lo and elev.max() == hi
        b4 = _values(store, "s2l1c", "r10m", "B04")
        assert 0.02 < np.median(b4) < 0.3 and b4.max() < 1.0  # TOA reflectance, not DN
        vv = _values(store, "s1grd", "r10m", "VV")
        vh = _values(store, "s1grd", "r10m", "VH")
        assert -20 < np.median(vv) < -5 and np.median(vh) < np.median(vv)
    # Slope is NaN on the patch border (38 %): those pixels stay invalid, not zero.
    for store, (lo, hi) in ((honduras, (12, 30)), (togo, (0.9, 5.1))):
        slope = store.array("slope/r30m/valid")[:].sum(axis=(1, 2))
        assert (slope == 180).all()  # 289 px less the NaN border
        s = _values(store, "slope", "r30m", "slope")
        assert lo <= s.min() and s.max() <= hi


def test_togo_folder_resolves_to_its_own_description():
    found = find_description(DATA / TOGO)
    assert found is not None and found[0]["name"] == TOGO


def test_peru_s1_pairs_only_with_the_landsat_scene_of_its_place(peru):
    t = peru.table.assign(date=_dates(peru))
    assert set(t["source"]) == {PERU}
    assert set(peru.modalities) == {"landsat8_sr", "s1grd"}
    # Two L8 scenes at two places, never merged: one CRS each.
    by_date = t.groupby("date")["crs"].agg(set).to_dict()
    assert by_date == {date(2018, 9, 6): {"EPSG:32619"}, date(2019, 7, 27): {"EPSG:32620"}}
    assert (t["date"] == date(2018, 9, 6)).sum() == 4
    assert (t["date"] == date(2019, 7, 27)).sum() == 12
    # The "2018" S1 joins the Madre de Dios scene only (a timeless S1 would also be put
    # into the Porto Velho scene, where it merely falls outside the grid), on the very
    # same pixels.
    layers = {
        s.time.date(): sorted(la.modality for la in s.layers)
        for s in DescribedSource().scenes(str(DATA / PERU))
    }
    assert layers == {
        date(2018, 9, 6): ["landsat8_sr", "s1grd"],
        date(2019, 7, 27): ["landsat8_sr"],
    }
    assert (t["has_s1grd"] == (t["date"] == date(2018, 9, 6))).all()
    has = peru.available("s1grd")
    both = peru.array("s1grd/r10m/valid")[:][has] & peru.array("landsat8_sr/r30m/valid")[:][has]
    assert both.mean() > 0.95
    # Six SR bands B2-B7 (no B1), reflectance scaled by 1e-4.
    bands = peru.array("landsat8_sr/bands")[:]
    assert not bands[:, 0].any() and bands[:, 1:].all()
    nir = _values(peru, "landsat8_sr", "r30m", "B5")
    red = _values(peru, "landsat8_sr", "r30m", "B4")
    assert 0.15 < np.median(nir) < 0.45 and np.median(red) < 0.15
    vv = _values(peru, "s1grd", "r10m", "VV")
    assert -15 < np.median(vv) < -5


def test_multiearth_scenes_and_pairings(amazon):
    t = amazon.table.assign(date=_dates(amazon))
    assert set(t["source"]) == {AMAZON}
    assert set(amazon.modalities) == {
        "s2l2a",
        "s1grd",
        "landsat8_sr",
        "landsat8_st",
        "change_deforestation",
    }
    assert set(t["crs"]) == {"EPSG:32721"}
    scenes = t.groupby("date")[[c for c in t.columns if c.startswith("has_")]].any()
    assert len(scenes) == 9
    s1_with_s2 = scenes[scenes["has_s1grd"] & scenes["has_s2l2a"]].index
    assert list(s1_with_s2) == [date(2019, 6, 6), date(2019, 6, 11), date(2019, 7, 1)]
    assert scenes.loc[date(2020, 7, 20), ["has_landsat8_sr", "has_landsat8_st"]].all()
    labelled = scenes[scenes["has_change_deforestation"]].index
    assert list(labelled) == [date(2021, 5, 6)]
    assert scenes.loc[date(2021, 5, 6), "has_s2l2a"]
    # S2 holds only B01-B04 (band-level availability).
    names = amazon.registry["s2l2a"].bands
    present = amazon.array("s2l2a/bands")[:][amazon.available("s2l2a")].any(axis=0)
    assert {b for b, p in zip(names, present, strict=True) if p} == {"B01", "B02", "B03", "B04"}


def test_multiearth_values_are_physical(amazon):
    b4 = _values(amazon, "s2l2a", "r10m", "B04")
    assert 0.01 < np.median(b4) < 0.06  # L2A reflectance of forest
    b1 = _values(amazon, "s2l2a", "r60m", "B01")
    assert np.percentile(b1, 10) < 0.03  # aerosol band: bottom of atmosphere
    nir = _values(amazon, "landsat8_sr", "r30m", "B5")
    red = _values(amazon, "landsat8_sr", "r30m", "B4")
    assert 0.2 < np.median(nir) < 0.45 and 0.0 < np.median(red) < 0.06
    st = _values(amazon, "landsat8_st", "r30m", "ST_B10")
    assert st.min() > 295 and st.max() < 325  # kelvin
    vv = _values(amazon, "s1grd", "r10m", "VV")
    assert -12 < np.median(vv) < -4
    # Three labelled sites, one scene each (scene_key): legend codes 0/1; the site at
    # -54.92/-3.61 has no deforestation, the other two are 58 % and 62 % deforested.
    has = amazon.available("change_deforestation")
    mask = amazon.array("change_deforestation/r10m/data")[:][has]
    assert set(np.unique(mask)) == {0, 1}
    sites = amazon.table[has]["scene_id"].to_numpy()
    share = {sid.split(":")[1]: mask[sites == sid].mean() for sid in set(sites)}
    assert len(share) == 3
    assert share["site_-54.92_-3.61"] == 0.0
    assert 0.5 < share["site_-54.68_-4.17"] < 0.7 and 0.5 < share["site_-55.06_-4.09"] < 0.7
