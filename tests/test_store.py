"""The chip store built from real sources: layout, metadata, statistics, atomicity."""

import numpy as np
import pytest
import rasterio
from affine import Affine

from terrasynth.data.split import SplitConfig
from terrasynth.data.store import ChipStore, StoreWriter
from terrasynth.errors import TerrasynthError
from terrasynth.modalities import default_registry

pytestmark = pytest.mark.needs_data


@pytest.fixture(scope="module")
def store(small_store):
    return ChipStore.open(small_store)


def test_store_holds_the_sources_and_modalities(store):
    s = store.summary()
    assert set(s["sources"]) == {"band_folder", "bigearthnet_v1", "eopatch"}
    for m in (
        "landsat8",
        "dem",
        "landcover_nlcd",
        "s2l2a",
        "s1grd",
        "corine",
        "ndvi",
        "landcover_lulc",
    ):
        assert m in store.modalities, m
    assert sum(s["splits"].values()) == len(store)
    # licences travel with every chip
    assert set(store.table["licence"]) >= {"CC0-1.0", "CDLA-Permissive-1.0", "MIT"}


def test_partial_pairing_is_recorded(store):
    t = store.table
    zion = t["source"] == "band_folder"
    assert t.loc[zion, "has_landsat8"].all()
    assert not t.loc[zion, "has_s2l2a"].any()
    ben = t["source"] == "bigearthnet_v1"
    assert t.loc[ben, "has_s2l2a"].all() and t.loc[ben, "has_corine"].all()


def test_array_shapes_follow_the_registry(store):
    n = len(store)
    assert store.array("s2l2a/r10m/data").shape == (n, 4, 64, 64)
    assert store.array("s2l2a/r20m/data").shape == (n, 6, 32, 32)
    assert store.array("s2l2a/r60m/data").shape == (n, 2, 16, 16)
    assert store.array("landcover_nlcd/r30m/data").dtype == np.uint8
    assert store.array("corine/labels").shape == (n, 44)  # the full CLC level-3 legend


def test_chip_georeference_matches_the_source_raster(store):
    """A Zion chip's stored pixels equal the Landsat file read at the chip's transform."""
    from tests.conftest import ZION

    t = store.table
    i = int(np.flatnonzero(t["source"] == "band_folder")[5])
    row = t.iloc[i]
    tr = Affine(*row["transform"])
    with rasterio.open(ZION / "landsat_b4.tif") as src:
        assert row["crs"] == f"EPSG:{src.crs.to_epsg()}"
        col0, row0 = ~src.transform @ (tr.c, tr.f)
        window = rasterio.windows.Window(round(col0), round(row0), 64, 64)
        expected = src.read(1, window=window).astype(np.float32)
    got = store.array("landsat8/r30m/data")[i][3]  # B4 in B1..B7
    valid = store.array("landsat8/r30m/valid")[i]
    assert np.allclose(got[valid], expected[valid], atol=0.5)


def test_statistics_are_computed_from_training_chips(store):
    st = store.stats["s2l2a"]
    assert st["from_split"] in ("train", "all")
    b04 = st["bands"]["B04"]
    assert 0.0 < b04["mean"] < 0.5 and b04["std"] > 0.005
    assert b04["p01"] <= b04["mean"] <= b04["p99"]
    t = store.table
    ben = (
        store.available("s2l2a") & (t["split"] == st["from_split"]).to_numpy()
        if st["from_split"] == "train"
        else store.available("s2l2a")
    )
    data = store.array("s2l2a/r10m/data")[:][ben][:, 2]
    valid = store.array("s2l2a/r10m/valid")[:][ben]
    assert abs(data[valid].mean() - b04["mean"]) < 1e-3
    lc = store.stats["landcover_nlcd"]["class_counts"]
    assert len(lc) == default_registry()["landcover_nlcd"].num_classes and sum(lc) > 0


def test_spatial_split_keeps_blocks_and_scenes_together(store):
    t = store.table
    assert t.groupby(["block_x", "block_y"])["split"].nunique().max() == 1
    small = t[t["source"] != "band_folder"]
    assert small.groupby("scene_id")["split"].nunique().max() == 1


def test_failed_build_leaves_nothing(tmp_path):
    reg = default_registry()
    w = StoreWriter(tmp_path / "s", reg, 64, SplitConfig())
    assert w.tmp.exists()
    w.abort()
    assert not (tmp_path / "s").exists() and not w.tmp.exists()
    with pytest.raises(TerrasynthError, match="no chip"):
        StoreWriter(tmp_path / "s", reg, 64, SplitConfig()).close()
    assert list(tmp_path.iterdir()) == []


def test_existing_store_is_not_overwritten(small_store):
    with pytest.raises(TerrasynthError, match="already exists"):
        StoreWriter(small_store, default_registry(), 64, SplitConfig())


def test_open_refuses_non_store(tmp_path):
    with pytest.raises(TerrasynthError, match="not a terrasynth chip store"):
        ChipStore.open(tmp_path)
