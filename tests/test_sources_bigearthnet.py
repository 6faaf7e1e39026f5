"""BigEarthNet v1 (folders) and v2 (LMDB) readers on the real example data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pandas as pd
import pytest
import rasterio

from terrasynth.data.scene import Scene
from terrasynth.data.sources.bigearthnet_v1 import BigEarthNetV1Source
from terrasynth.data.sources.bigearthnet_v2 import (
    BigEarthNetV2Source,
    patch_grid,
    s2_tile_origin,
)
from terrasynth.errors import InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.is_dir():
    pytest.skip(f"real data folder {DATA} not found", allow_module_level=True)

V1 = DATA / "bigearthnet_v1_examples"
V2 = DATA / "bigearthnet_v2_lmdb"
V1_PATCH = V1 / "BigEarthNet-S2-Example" / "S2A_MSIL2A_20170613T101031_87_48"
S2_BANDS = {"B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"}
TUP = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_"


@pytest.fixture(scope="module")
def v1_scenes() -> list[Scene]:
    return list(BigEarthNetV1Source().scenes(str(V1)))


@pytest.fixture(scope="module")
def v2_scenes() -> list[Scene]:
    return list(BigEarthNetV2Source().scenes(str(V2)))


def _s2_10m(scene: Scene) -> np.ndarray:
    (layer,) = [x for x in scene.layers if x.modality == "s2l2a" and x.grid.res == (10.0, 10.0)]
    return layer.data


def test_detect() -> None:
    v1, v2 = BigEarthNetV1Source(), BigEarthNetV2Source()
    assert v1.detect(str(V1))
    assert v1.detect(str(V1 / "BigEarthNet-S2-Example"))  # folder of patch folders
    assert v1.detect(str(V1_PATCH))  # one patch folder
    assert v2.detect(str(V2))
    assert v2.detect(str(V2 / "BigEarthNet-V2-LMDB"))
    assert not v1.detect(str(V2)) and not v2.detect(str(V1))
    for other in ("flair2", "ssl4eo_s12", "majortom_core", "no_such_folder"):
        assert not v1.detect(str(DATA / other)) and not v2.detect(str(DATA / other))
    assert not v1.detect(str(V1_PATCH / f"{V1_PATCH.name}_B02.tif"))


def test_v1_scenes(v1_scenes: list[Scene]) -> None:
    assert len(v1_scenes) == 6
    assert len({s.scene_id for s in v1_scenes}) == 6
    for s in v1_scenes:
        assert s.source == "bigearthnet_v1" and s.licence == "CDLA-Permissive-1.0"
        s2 = [x for x in s.layers if x.modality == "s2l2a"]
        assert [x.grid.res[0] for x in s2] == [10.0, 20.0, 60.0]
        assert [x.data.shape[1:] for x in s2] == [(120, 120), (60, 60), (20, 20)]
        assert {b for x in s2 for b in x.bands} == S2_BANDS
        assert sum(len(x.bands) for x in s2) == 12
        (s1,) = [x for x in s.layers if x.modality == "s1grd"]
        assert s1.bands == ("VV", "VH") and s1.data.shape == (2, 120, 120)
        assert s.grid == s2[0].grid and s.grid.crs.to_epsg() in (32629, 32633, 32635)
        left, bottom, right, top = s.grid.bounds
        s1l, s1b, s1r, s1t = s1.grid.bounds
        assert s1l < right and left < s1r and s1b < top and bottom < s1t
        assert s.labels["corine"] and all(100 < c < 600 for c in s.labels["corine"])
        assert s.time is not None and s.time.year in (2017, 2018)
        refl = np.concatenate([x.data.ravel() for x in s2])
        assert np.mean((refl >= 0) & (refl <= 1)) > 0.99 and refl.max() < 1.7
        assert -50 < np.median(s1.data) < 5  # dB, not linear power


def test_v1_values_match_files(v1_scenes: list[Scene]) -> None:
    (s,) = [x for x in v1_scenes if x.scene_id.endswith(V1_PATCH.name)]
    assert s.labels == {"corine": [211, 243]}
    with rasterio.open(V1_PATCH / f"{V1_PATCH.name}_B04.tif") as src:
        dn = src.read(1)
    np.testing.assert_allclose(_s2_10m(s)[2], dn / 10000.0, rtol=1e-6)


def test_v1_truncated_band_raises(tmp_path: Path) -> None:
    patch = tmp_path / V1_PATCH.name
    shutil.copytree(V1_PATCH, patch)
    band = patch / f"{V1_PATCH.name}_B11.tif"
    band.chmod(0o644)
    os.truncate(band, band.stat().st_size // 2)
    with pytest.raises(InputError, match="B11"):
        list(BigEarthNetV1Source().scenes(str(tmp_path)))


def test_v1_missing_band_raises(tmp_path: Path) -> None:
    patch = tmp_path / V1_PATCH.name
    shutil.copytree(V1_PATCH, patch)
    (patch / f"{V1_PATCH.name}_B8A.tif").unlink()
    with pytest.raises(InputError, match="B8A"):
        list(BigEarthNetV1Source().scenes(str(tmp_path)))


def test_tile_origin_reproduces_v1_georeference() -> None:
    """The MGRS-derived tile corner + ``_col_row`` gives each v1 GeoTIFF's exact origin."""
    folders = sorted((V1 / "BigEarthNet-S2-Example").iterdir())
    assert len(folders) == 6
    for folder in folders:
        meta = json.loads((folder / f"{folder.name}_labels_metadata.json").read_text())
        tile = meta["tile_source"].split("_")[5]  # e.g. T33UUP
        col, row = folder.name.split("_")[-2:]
        grid = patch_grid(f"S2_{tile}_{col}_{row}")
        with rasterio.open(folder / f"{folder.name}_B02.tif") as src:
            assert grid.crs == src.crs
            assert grid.transform == src.transform
        assert (grid.transform.c, grid.transform.f) == (
            meta["coordinates"]["ulx"],
            meta["coordinates"]["uly"],
        )
    crs, ulx, uly = s2_tile_origin("33UUP")
    assert (crs.to_epsg(), ulx, uly) == (32633, 300000.0, 5400000.0)
    with pytest.raises(InputError):
        s2_tile_origin("33IAA")


def test_v2_scenes(v2_scenes: list[Scene]) -> None:
    meta = pd.concat(
        [
            pd.read_parquet(V2 / "metadata.parquet"),
            pd.read_parquet(V2 / "metadata_for_patches_with_snow_cloud_or_shadow.parquet"),
        ]
    )
    assert len(v2_scenes) == len(meta) == 24
    assert {s.scene_id.split(":", 1)[1] for s in v2_scenes} == set(meta["patch_id"])
    for s in v2_scenes:
        assert s.source == "bigearthnet_v2" and s.licence == "CDLA-Permissive-1.0"
        s2 = [x for x in s.layers if x.modality == "s2l2a"]
        assert [x.data.shape[1:] for x in s2] == [(120, 120), (60, 60), (20, 20)]
        assert {b for x in s2 for b in x.bands} == S2_BANDS
        (s1,) = [x for x in s.layers if x.modality == "s1grd"]
        assert s1.bands == ("VV", "VH") and s1.grid == s.grid
        for x in s2:  # coarser groups cover the same footprint
            assert x.grid.bounds == pytest.approx(s.grid.bounds)
        assert s.labels["corine19"] and set(s.labels["corine19"]) <= set(range(1, 20))
        assert s.time is not None and (s.time.year, s.time.month) in ((2017, 6), (2017, 11))
        refl = np.concatenate([x.data.ravel() for x in s2])
        assert np.mean((refl >= 0) & (refl <= 1)) > 0.95 and refl.max() < 1.7
        assert -50 < np.median(s1.data) < 5


def test_v2_georeference_is_plausible(v2_scenes: list[Scene]) -> None:
    """Rebuilt grids: UTM zone of the tile, and centres inside the metadata's country."""
    meta = pd.concat(
        [
            pd.read_parquet(V2 / "metadata.parquet"),
            pd.read_parquet(V2 / "metadata_for_patches_with_snow_cloud_or_shadow.parquet"),
        ]
    ).set_index("patch_id")
    boxes = {"Austria": (9.5, 46.3, 17.2, 49.1), "Finland": (20.0, 59.7, 31.6, 70.1)}
    for s in v2_scenes:
        patch = s.scene_id.split(":", 1)[1]
        assert s.grid.crs.to_epsg() == (32633 if "T33UUP" in patch else 32635)
        lon, lat = s.grid.center_lonlat()
        w, south, e, n = boxes[meta.loc[patch, "country"]]
        assert w < lon < e and south < lat < n
    (s,) = [x for x in v2_scenes if x.scene_id.endswith(TUP + "37_88")]
    assert (s.grid.transform.c, s.grid.transform.f) == (300000 + 37 * 1200, 5400000 - 88 * 1200)


def test_v2_column_row_order(v2_scenes: list[Scene]) -> None:
    """Patches that the rebuilt grids place side by side continue across their shared edge."""
    by_name = {s.scene_id.split(":", 1)[1]: s for s in v2_scenes}
    a, east, south = (by_name[TUP + n] for n in ("37_88", "38_88", "37_89"))
    assert east.grid.transform.c == a.grid.bounds[2]  # 38_88 starts where 37_88 ends (x)
    assert south.grid.transform.f == a.grid.bounds[1]  # 37_89 starts below 37_88 (y)
    na, ne, ns = (_s2_10m(x)[3] for x in (a, east, south))  # B08
    inner = np.abs(np.diff(na, axis=1)).mean()
    seam_e, swapped_e = np.abs(na[:, -1] - ne[:, 0]).mean(), np.abs(na[-1] - ne[0]).mean()
    seam_s, swapped_s = np.abs(na[-1] - ns[0]).mean(), np.abs(na[:, -1] - ns[:, 0]).mean()
    assert seam_e < 1.5 * inner and seam_e < 0.5 * swapped_e
    assert seam_s < 1.5 * inner and seam_s < 0.5 * swapped_s


def test_v2_corrupt_entry_raises(tmp_path: Path) -> None:
    patch = TUP + "37_88"
    meta = pd.read_parquet(V2 / "metadata.parquet")
    meta[meta["patch_id"] == patch].to_parquet(tmp_path / "metadata.parquet")
    env = lmdb.open(str(tmp_path / "BigEarthNet-V2-LMDB"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(patch.encode(), b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    env.close()
    source = BigEarthNetV2Source()
    assert source.detect(str(tmp_path))
    with pytest.raises(InputError, match="37_88"):
        list(source.scenes(str(tmp_path)))


def test_v2_missing_entry_raises(tmp_path: Path) -> None:
    meta = pd.read_parquet(V2 / "metadata.parquet").head(1).copy()
    meta.to_parquet(tmp_path / "metadata.parquet")
    lmdb.open(str(tmp_path / "BigEarthNet-V2-LMDB"), map_size=1 << 20).close()
    with pytest.raises(InputError, match="no entry"):
        list(BigEarthNetV2Source().scenes(str(tmp_path)))
