"""SSL4EO-S12 and Major TOM readers on the real samples in ../shared/data."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio

from terrasynth.data.scene import Layer, Scene
from terrasynth.data.sources.majortom import MajorTOMSource
from terrasynth.data.sources.ssl4eo import SSL4EOSource
from terrasynth.errors import InputError
from terrasynth.modalities import Registry

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.is_dir():
    pytest.skip(f"real data folder {DATA} not found", allow_module_level=True)

SSL = DATA / "ssl4eo_s12"
LOC = SSL / "s2a" / "0000200"
MT = DATA / "majortom_core"
MT_2020 = MT / "S2L2A/199U/199U_1099R/S2B_MSIL2A_20200223T032739_N9999_R018_T48QUE_20230924T183543"
MT_2022 = MT / "S2L2A/0U/0U_199R/S2A_MSIL2A_20220706T085611_N0400_R007_T33NZA_20220706T153419"
S1_JUNE = "S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457"
REG = Registry.builtin()


@pytest.fixture(scope="module")
def ssl_scenes() -> list[Scene]:
    return list(SSL4EOSource().scenes(str(SSL)))


@pytest.fixture(scope="module")
def mt_scenes() -> dict[str, Scene]:
    return {s.scene_id: s for s in MajorTOMSource().scenes(str(MT))}


def _layers(scene: Scene, modality: str) -> list[Layer]:
    return [layer for layer in scene.layers if layer.modality == modality]


def _band(scene: Scene, modality: str, band: str) -> tuple[Layer, np.ndarray]:
    for layer in _layers(scene, modality):
        if band in layer.bands:
            return layer, layer.data[layer.bands.index(band)]
    raise AssertionError(f"{scene.scene_id} has no {modality} {band}")


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1).astype(np.float64)


def _link_copy(src: Path, dst: Path) -> None:
    """Copy a folder tree as symlinks (fast); files replaced later become real files."""
    shutil.copytree(src, dst, copy_function=os.symlink)


def _truncate(path: Path) -> None:
    raw = Path(os.readlink(path)).read_bytes() if path.is_symlink() else path.read_bytes()
    path.unlink()
    path.write_bytes(raw[: len(raw) // 2])


# ---------------------------------------------------------------- detection


def test_ssl4eo_detect() -> None:
    src = SSL4EOSource()
    assert src.detect(str(SSL))
    for kind in ("s2a", "s2c", "s1"):
        assert src.detect(str(SSL / kind / "0000200"))
    for foreign in (MT, MT / "S2L2A", MT_2022, DATA / "flair2", DATA / "eolearn_eopatch"):
        assert not src.detect(str(foreign)), foreign
    assert not src.detect(str(DATA / "README.md"))
    assert not src.detect(str(DATA / "no_such_folder"))


def test_majortom_detect() -> None:
    src = MajorTOMSource()
    for path in (MT, MT / "S2L2A", MT_2020.parent, MT_2022):
        assert src.detect(str(path)), path
    for foreign in (SSL, LOC, SSL / "s1" / "0000200", DATA / "flair2"):
        assert not src.detect(str(foreign)), foreign
    assert not src.detect(str(MT_2022 / "B02.tif"))
    assert not src.detect(str(DATA / "no_such_folder"))


# ---------------------------------------------------------------- SSL4EO-S12


def test_ssl4eo_scenes_and_bands(ssl_scenes: list[Scene]) -> None:
    assert [s.scene_id for s in ssl_scenes] == [
        "ssl4eo:0000200:2020-06-04",
        "ssl4eo:0000200:2020-08-13",
    ]
    assert [s.time for s in ssl_scenes] == [
        datetime(2020, 6, 4, 5, 46, 39, tzinfo=UTC),
        datetime(2020, 8, 13, 5, 46, 39, tzinfo=UTC),
    ]
    for scene in ssl_scenes:
        assert scene.source == "ssl4eo_s12" and scene.licence == "CC-BY-4.0"
        assert scene.modalities == ["s2l2a", "s2l1c", "s1grd"]
        counts = {"s2l2a": 12, "s2l1c": 13, "s1grd": 2}
        for modality, n in counts.items():
            bands = [b for layer in _layers(scene, modality) for b in layer.bands]
            assert len(bands) == n and set(bands) == set(REG[modality].bands)
        assert scene.grid.crs.to_epsg() == 4326
        assert (scene.grid.width, scene.grid.height) == (264, 264)
        ref, _ = _band(scene, "s2l2a", "B02")
        assert ref.grid == scene.grid and ref.bands == ("B02", "B03", "B04", "B08")
        sizes = {layer.bands[0]: layer.data.shape[1:] for layer in _layers(scene, "s2l2a")}
        assert sizes == {"B02": (264, 264), "B05": (132, 132), "B01": (44, 44)}


def test_ssl4eo_pairs_nearest_acquisitions(ssl_scenes: list[Scene]) -> None:
    # June: L2A 06-04 + L1C 06-04 + S1 06-07; August: L2A 08-13 + L1C 08-23 + S1 09-03.
    l1c = ["20200604T054639_20200604T054831_T43RCP", "20200823T054639_20200823T055618_T43RCP"]
    s1 = [S1_JUNE, "S1A_IW_GRDH_1SDV_20200903T131212_20200903T131237_034195_03F8F5_AC1C"]
    for scene, l1c_dir, s1_dir in zip(ssl_scenes, l1c, s1, strict=True):
        _, b02 = _band(scene, "s2l1c", "B02")
        np.testing.assert_allclose(
            b02, _read(SSL / "s2c/0000200" / l1c_dir / "B2.tif") / 1e4, rtol=1e-6
        )
        _, vh = _band(scene, "s1grd", "VH")
        np.testing.assert_array_equal(vh, _read(SSL / "s1/0000200" / s1_dir / "VH.tif"))


def test_ssl4eo_s1_s2_footprints_match(ssl_scenes: list[Scene]) -> None:
    for scene in ssl_scenes:
        s2, _ = _band(scene, "s2l2a", "B02")
        s1, _ = _band(scene, "s1grd", "VV")
        l1c, _ = _band(scene, "s2l1c", "B02")
        assert l1c.grid == s2.grid
        assert s1.crs == s2.crs
        px_x, px_y = s2.grid.res
        (l2, b2, r2, t2), (l1, b1, r1, t1) = s2.grid.bounds, s1.grid.bounds
        # Measured: S1 edges lie 2.0-4.0 S2 pixels outside the S2 edges (S1 covers ~10 m more
        # on every side and is shifted ~30 m west / ~25 m north); allow 5 pixels.
        for d, px in ((l2 - l1, px_x), (r2 - r1, px_x), (b2 - b1, px_y), (t2 - t1, px_y)):
            assert abs(d) <= 5 * px
        overlap = max(0.0, min(r1, r2) - max(l1, l2)) * max(0.0, min(t1, t2) - max(b1, b2))
        assert overlap / ((r2 - l2) * (t2 - b2)) > 0.97


def test_ssl4eo_physical_units(ssl_scenes: list[Scene]) -> None:
    for scene in ssl_scenes:
        for modality in ("s2l2a", "s2l1c"):
            for layer in _layers(scene, modality):
                assert layer.valid_mask().all()
                values = layer.data
                assert values.min() >= 0.0 and values.max() < 1.0
        _, b04 = _band(scene, "s2l2a", "B04")
        assert 0.05 < np.median(b04) < 0.2  # red reflectance of farmland
        _, b10 = _band(scene, "s2l1c", "B10")
        assert np.median(b10) < 0.01  # cirrus band: near zero without cirrus
        _, vv = _band(scene, "s1grd", "VV")
        _, vh = _band(scene, "s1grd", "VH")
        assert -20 < np.median(vv) < -5 and np.median(vh) < np.median(vv) - 3  # dB
        assert vv.max() < 10 and vh.max() < 0


def test_ssl4eo_location_folder_reads_all_modalities() -> None:
    scenes = list(SSL4EOSource().scenes(str(SSL / "s1" / "0000200")))
    assert [s.scene_id for s in scenes] == [
        "ssl4eo:0000200:2020-06-04",
        "ssl4eo:0000200:2020-08-13",
    ]
    assert all(s.modalities == ["s2l2a", "s2l1c", "s1grd"] for s in scenes)


def test_ssl4eo_without_l2a_anchors_on_l1c_then_s1(tmp_path: Path) -> None:
    for kind in ("s2c", "s1"):
        _link_copy(SSL / kind, tmp_path / kind)
    scenes = list(SSL4EOSource().scenes(str(tmp_path)))
    assert [s.scene_id for s in scenes] == [
        "ssl4eo:0000200:2020-06-04:s2l1c",
        "ssl4eo:0000200:2020-08-23:s2l1c",
    ]
    assert all(s.modalities == ["s2l1c", "s1grd"] for s in scenes)
    shutil.rmtree(tmp_path / "s2c")
    scenes = list(SSL4EOSource().scenes(str(tmp_path)))
    assert [s.scene_id for s in scenes] == [
        "ssl4eo:0000200:2020-06-07:s1grd",
        "ssl4eo:0000200:2020-09-03:s1grd",
    ]
    assert scenes[0].grid == _band(scenes[0], "s1grd", "VV")[0].grid


def test_ssl4eo_truncated_band_raises(tmp_path: Path) -> None:
    for kind in ("s2a", "s2c", "s1"):
        _link_copy(SSL / kind, tmp_path / kind)
    _truncate(tmp_path / "s1/0000200" / S1_JUNE / "VV.tif")
    with pytest.raises(InputError, match="VV.tif"):
        list(SSL4EOSource().scenes(str(tmp_path)))


def test_ssl4eo_missing_band_raises(tmp_path: Path) -> None:
    _link_copy(SSL / "s2a", tmp_path / "s2a")
    (tmp_path / "s2a/0000200/20200604T054639_20200604T054831_T43RCP/B8A.tif").unlink()
    with pytest.raises(InputError, match="B8A.tif"):
        list(SSL4EOSource().scenes(str(tmp_path)))


# ---------------------------------------------------------------- Major TOM


def test_majortom_scenes(mt_scenes: dict[str, Scene]) -> None:
    assert sorted(mt_scenes) == ["majortom:0U_199R:2022-07-06", "majortom:199U_1099R:2020-02-23"]
    epsg = {mt_scenes[k].grid.crs.to_epsg() for k in mt_scenes}
    assert epsg == {32633, 32648}
    assert mt_scenes["majortom:199U_1099R:2020-02-23"].time == datetime(
        2020, 2, 23, 3, 27, 39, tzinfo=UTC
    )
    for scene in mt_scenes.values():
        assert scene.source == "majortom" and scene.licence == "CC-BY-SA-4.0"
        assert (scene.grid.width, scene.grid.height) == (1068, 1068)
        assert scene.grid.res == pytest.approx((10.0, 10.0))
        assert scene.modalities == ["s2l2a"]
        bands = [b for layer in scene.layers for b in layer.bands]
        assert len(bands) == 12 and set(bands) == set(REG["s2l2a"].bands)
        sizes = {layer.bands[0]: layer.data.shape[1:] for layer in scene.layers}
        assert sizes == {"B02": (1068, 1068), "B05": (534, 534), "B01": (178, 178)}
        for layer in scene.layers:
            assert layer.grid.bounds == pytest.approx(scene.grid.bounds)


def test_majortom_offsets_give_plausible_reflectance(mt_scenes: dict[str, Scene]) -> None:
    for scene in mt_scenes.values():
        _, b02 = _band(scene, "s2l2a", "B02")
        assert np.percentile(b02, 1) >= -0.02 and np.median(b02) < 0.3
    # N0400: offset removed; N9999 (reprocessed): no offset, dark water NIR near 0.
    _, b02 = _band(mt_scenes["majortom:0U_199R:2022-07-06"], "s2l2a", "B02")
    np.testing.assert_allclose(b02, (_read(MT_2022 / "B02.tif") - 1000) / 1e4, atol=1e-6)
    _, b08 = _band(mt_scenes["majortom:199U_1099R:2020-02-23"], "s2l2a", "B08")
    np.testing.assert_allclose(b08, _read(MT_2020 / "B08.tif") / 1e4, atol=1e-6)
    assert 0.0 <= np.percentile(b08, 1) < 0.03


def test_majortom_cloud_mask_pixels_are_invalid(tmp_path: Path) -> None:
    product = tmp_path / MT_2020.parent.name / MT_2020.name
    _link_copy(MT_2020, product)
    with rasterio.open(MT_2020 / "cloud_mask.tif") as src:
        profile, mask = src.profile, src.read(1)
    assert not mask.any()  # the shipped masks are all clear
    mask[0:12, 0:12] = 1  # cloud (binary form / SEnSeI thick cloud)
    mask[600:603, 300:301] = 3  # SEnSeI cloud shadow
    (product / "cloud_mask.tif").unlink()
    with rasterio.open(product / "cloud_mask.tif", "w", **profile) as dst:
        dst.write(mask, 1)
    (scene,) = MajorTOMSource().scenes(str(product))
    flagged = mask != 0
    r10, _ = _band(scene, "s2l2a", "B02")
    valid10 = r10.valid_mask()
    assert not valid10[:, flagged].any() and valid10[:, ~flagged].all()
    r20, _ = _band(scene, "s2l2a", "B11")
    valid20 = r20.valid_mask()
    assert not valid20[:, 0:6, 0:6].any() and not valid20[:, 300:302, 150].any()
    assert valid20.sum() == valid20.size - 6 * (36 + 2)
    r60, _ = _band(scene, "s2l2a", "B09")
    assert not r60.valid_mask()[:, 0:2, 0:2].any() and not r60.valid_mask()[:, 100, 50].any()


def test_majortom_truncated_band_raises(tmp_path: Path) -> None:
    product = tmp_path / MT_2022.name
    _link_copy(MT_2022, product)
    _truncate(product / "B03.tif")
    assert MajorTOMSource().detect(str(product))
    with pytest.raises(InputError, match="B03.tif"):
        list(MajorTOMSource().scenes(str(product)))


def test_majortom_refuses_foreign_folder() -> None:
    with pytest.raises(InputError):
        list(MajorTOMSource().scenes(str(DATA / "flair2")))
