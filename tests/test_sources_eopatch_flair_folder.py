"""Readers for eo-learn EOPatch, FLAIR #2 samples, per-band GeoTIFF folders and generic inputs.

All tests read the real data in ../shared/data (or files derived from it in tmp_path).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from terrasynth.data.scene import Layer, Scene
from terrasynth.data.sources.band_folder import BandFolderSource
from terrasynth.data.sources.eopatch import EOPatchSource
from terrasynth.data.sources.flair import FlairSource
from terrasynth.data.sources.generic import generic_scene
from terrasynth.errors import InputError, TerrasynthError, UnknownModalityError
from terrasynth.modalities import default_registry

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.is_dir():
    pytest.skip(f"real data folder {DATA} not found", allow_module_level=True)

EOPATCH = DATA / "eolearn_eopatch"
FLAIR = DATA / "flair2"
ZION = DATA / "zion_landsat8_srtm_nlcd"
READERS = {"eopatch": EOPatchSource(), "flair": FlairSource(), "band_folder": BandFolderSource()}


def _layer(scene: Scene, modality: str) -> Layer:
    (layer,) = [lay for lay in scene.layers if lay.modality == modality]
    return layer


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# --- detection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "owner"),
    [
        (EOPATCH, "eopatch"),
        (EOPATCH / "TestEOPatch", "eopatch"),
        (FLAIR, "flair"),
        (FLAIR / "sample_2349", "flair"),
        (ZION, "band_folder"),
        (DATA / "ssl4eo_s12", None),
        (DATA / "bigearthnet_v1_examples", None),
        (DATA / "README.md", None),
        (ZION / "srtm.tif", None),
        (DATA / "no_such_folder", None),
    ],
)
def test_each_reader_claims_only_its_own_folders(path: Path, owner: str | None) -> None:
    claimed = [name for name, reader in READERS.items() if reader.detect(str(path))]
    assert claimed == ([owner] if owner else [])


def test_band_folder_needs_two_recognised_files(tmp_path: Path) -> None:
    shutil.copy(ZION / "srtm.tif", tmp_path / "srtm.tif")
    (tmp_path / "notes.tif").write_bytes(b"")
    assert not BandFolderSource().detect(str(tmp_path))
    shutil.copy(ZION / "nlcd2011.tif", tmp_path / "nlcd2011.tif")
    assert BandFolderSource().detect(str(tmp_path))


# --- eo-learn EOPatch -------------------------------------------------------------------


@pytest.fixture(scope="module")
def eopatch_scenes() -> list[Scene]:
    return list(EOPatchSource().scenes(str(EOPATCH)))


def test_eopatch_low_cloud_dates(eopatch_scenes: list[Scene]) -> None:
    dated = [s for s in eopatch_scenes if "ndvi" in s.modalities]
    # 32 of the 68 dates have under 10 % of CLM-flagged pixels.
    assert len(dated) == 32
    assert len({s.scene_id for s in eopatch_scenes}) == len(eopatch_scenes) == 37
    assert all(s.time is not None and s.time.utcoffset().total_seconds() == 0 for s in dated)
    assert dated[0].time.isoformat() == "2015-07-11T10:00:08+00:00"
    for scene in dated:
        assert scene.source == "eopatch" and scene.licence == "MIT"
        assert set(scene.modalities) == {"ndvi", "dem", "landcover_lulc"}
        ndvi = _layer(scene, "ndvi")
        values = ndvi.data[ndvi.valid_mask()]
        assert values.size > 0.9 * ndvi.data.size
        assert values.min() >= -1.0 and values.max() <= 1.0


def test_eopatch_grid_dem_and_landcover(eopatch_scenes: list[Scene]) -> None:
    grid = eopatch_scenes[0].grid
    assert grid.crs.to_epsg() == 32633
    assert (grid.width, grid.height) == (100, 101)
    assert all(abs(r - 10.0) < 0.01 for r in grid.res)
    assert grid.bounds == pytest.approx((465181.05, 5079244.89, 466180.53, 5080254.63), abs=0.01)
    dem = _layer(eopatch_scenes[0], "dem")
    assert dem.data.min() == 664.0 and dem.data.max() == 801.0
    lulc = _layer(eopatch_scenes[0], "landcover_lulc")
    legend = {e.code for e in default_registry()["landcover_lulc"].legend}
    codes = set(np.unique(lulc.data[lulc.valid_mask()]).tolist())
    assert codes <= legend and {2, 3} <= codes
    assert not lulc.valid_mask()[lulc.data == 0].any()


def test_eopatch_cloudy_pixels_are_invalid(eopatch_scenes: list[Scene]) -> None:
    patch = EOPATCH / "TestEOPatch"
    clm = np.load(patch / "mask" / "CLM.npy")[..., 0].astype(bool)
    stamps = json.loads((patch / "timestamps.json").read_text())
    partly_cloudy = 0
    for scene in (s for s in eopatch_scenes if "ndvi" in s.modalities):
        t = stamps.index(scene.time.strftime("%Y-%m-%dT%H:%M:%S"))
        assert clm[t].mean() < 0.10
        assert np.array_equal(_layer(scene, "ndvi").valid_mask()[0], ~clm[t])
        partly_cloudy += int(clm[t].any())
    assert partly_cloudy >= 3


def test_eopatch_reference_l1c_scenes(eopatch_scenes: list[Scene]) -> None:
    refs = [s for s in eopatch_scenes if "s2l1c" in s.modalities]
    assert [s.scene_id for s in refs] == [f"eopatch:TestEOPatch:ref{i}" for i in range(5)]
    dates = {s.time for s in eopatch_scenes if "ndvi" in s.modalities}
    for scene in refs:
        assert set(scene.modalities) == {"s2l1c", "dem", "landcover_lulc"}
        l1c = _layer(scene, "s2l1c")
        assert l1c.data.shape == (13, 101, 100)
        assert set(l1c.bands) == set(default_registry()["s2l1c"].bands)
        med = dict(zip(l1c.bands, np.median(l1c.data, axis=(1, 2)), strict=True))
        # B10 (cirrus, 1375 nm) is almost black at TOA; the others are 0.03..0.45.
        assert med["B10"] < 0.01 < min(v for b, v in med.items() if b != "B10")
        assert l1c.data.min() > 0.0 and l1c.data.max() < 1.0
        assert scene.time is not None
    # Dates found by NDVI identity: 3 are low-cloud dates, 2 (refs 0, 1) fully cloud-masked.
    assert refs[4].time.isoformat() == "2015-07-11T10:00:08+00:00"
    assert sum(s.time in dates for s in refs) == 3


def test_eopatch_truncated_array_is_input_error(tmp_path: Path) -> None:
    src, dst = EOPATCH / "TestEOPatch", tmp_path / "patch"
    for rel in ("bbox.geojson", "timestamps.json", "mask/CLM.npy", "data_timeless/DEM.npy"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / rel, dst / rel)
    raw = (src / "data" / "NDVI.npy").read_bytes()
    (dst / "data").mkdir()
    (dst / "data" / "NDVI.npy").write_bytes(raw[: len(raw) // 2])
    assert EOPatchSource().detect(str(dst))
    with pytest.raises(InputError) as exc:
        list(EOPatchSource().scenes(str(dst)))
    assert "NDVI.npy" in _one_line(exc)


# --- FLAIR #2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flair_scenes() -> list[Scene]:
    return list(FlairSource().scenes(str(FLAIR)))


def test_flair_scenes(flair_scenes: list[Scene]) -> None:
    assert len(flair_scenes) == 5
    assert flair_scenes[0].scene_id == "flair:sample_2349:2018-09-16"
    for scene in flair_scenes:
        assert scene.source == "flair" and scene.licence == "Etalab-2.0"
        assert scene.grid.crs.to_epsg() == 2154
        assert (scene.grid.width, scene.grid.height) == (512, 512)
        assert scene.grid.res == pytest.approx((0.2, 0.2))
        assert 2018 <= scene.time.year <= 2021
        aerial, ndsm = _layer(scene, "aerial"), _layer(scene, "ndsm")
        mask = _layer(scene, "landcover_flair")
        assert aerial.bands == ("R", "G", "B", "NIR") and ndsm.bands == ("height",)
        assert aerial.data.min() >= 0 and aerial.data.max() <= 255
        # Most masks carry a CRS-less LOCAL_CS: the reader puts them on the aerial CRS.
        assert mask.crs == aerial.crs and mask.grid == aerial.grid
        assert mask.data.dtype.kind == "i"


def test_flair_mask_codes_are_flair_1_based(flair_scenes: list[Scene]) -> None:
    """The imagery says which code is which class: FLAIR's 1-based codes, not 0-based."""
    sums: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(4))
    for scene in flair_scenes:
        aerial = _layer(scene, "aerial").data
        height = _layer(scene, "ndsm").data[0]
        codes = _layer(scene, "landcover_flair").data[0]
        red, nir = aerial[0], aerial[3]
        ndvi = (nir - red) / np.maximum(nir + red, 1.0)
        for code in np.unique(codes).tolist():
            k = codes == code
            sums[code] += (k.sum(), height[k].sum(), ndvi[k].sum(), nir[k].sum())
    mean = {c: s[1:] / s[0] for c, s in sums.items()}  # code -> (ndsm, ndvi, nir)
    assert 0 not in mean and min(mean) >= 1
    # 1 building: by far the highest surface elevation.
    assert mean[1][0] > 2 * max(m[0] for c, m in mean.items() if c != 1)
    # 6 coniferous, 7 deciduous, 8 brushwood, 10 herbaceous: greener than
    # 1 building, 2 pervious and 3 impervious surfaces.
    assert min(mean[c][1] for c in (6, 7, 8, 10)) > max(mean[c][1] for c in (1, 2, 3)) + 0.2
    # 5 water: the darkest near-infrared of all classes.
    assert mean[5][2] == min(m[2] for m in mean.values())


# --- per-band GeoTIFF folder (Zion) -----------------------------------------------------


@pytest.fixture(scope="module")
def zion_scene() -> Scene:
    (scene,) = list(BandFolderSource().scenes(str(ZION)))
    return scene


def test_zion_layers(zion_scene: Scene) -> None:
    assert zion_scene.source == "band_folder" and zion_scene.licence == "CC0-1.0"
    assert zion_scene.time is None
    landsat = _layer(zion_scene, "landsat8")
    assert landsat.bands == ("B2", "B3", "B4", "B5")
    assert landsat.crs.to_epsg() == 32612 and landsat.data.shape == (4, 1428, 1128)
    assert zion_scene.grid == landsat.grid and zion_scene.grid.res == (30.0, 30.0)
    assert landsat.data.min() > 5000 and landsat.data.max() < 65535  # 16-bit L1 DN
    dem = _layer(zion_scene, "dem")
    assert dem.crs.to_epsg() == 4326
    assert dem.data.min() == 1024.0 and dem.data.max() == 2892.0
    nlcd = _layer(zion_scene, "landcover_nlcd")
    assert nlcd.crs.to_epsg() == 6367 and nlcd.data.dtype.kind == "i"
    legend = {e.code for e in default_registry()["landcover_nlcd"].legend}
    assert set(np.unique(nlcd.data).tolist()) <= legend


def test_zion_footprints_overlap(zion_scene: Scene) -> None:
    left, bottom, right, top = zion_scene.grid.bounds
    area = (right - left) * (top - bottom)
    for layer in zion_scene.layers:
        lo, bo, ro, to = transform_bounds(layer.crs, zion_scene.grid.crs, *layer.grid.bounds)
        inter = max(0.0, min(right, ro) - max(left, lo)) * max(0.0, min(top, to) - max(bottom, bo))
        assert inter > 0.95 * area, layer.modality


# --- generic --input MOD=FILE -----------------------------------------------------------

WINDOW = Window(400, 500, 200, 160)  # a 6 x 4.8 km crop of the Landsat grid


def _write(path: Path, data: np.ndarray, crs, transform: Affine, nodata=None, names=()) -> Path:
    profile = {"driver": "GTiff", "count": data.shape[0], "dtype": data.dtype.name}
    profile.update(height=data.shape[1], width=data.shape[2], crs=crs, transform=transform)
    with rasterio.open(path, "w", nodata=nodata, **profile) as dst:
        dst.write(data)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
    return path


@pytest.fixture()
def landsat_tif(tmp_path: Path) -> Path:
    bands = []
    for b in (2, 3, 4, 5):
        with rasterio.open(ZION / f"landsat_b{b}.tif") as src:
            bands.append(src.read(1, window=WINDOW))
            crs, transform = src.crs, src.window_transform(WINDOW)
    return _write(tmp_path / "landsat.tif", np.stack(bands), crs, transform)


def _dem_crop(landsat: Path, shift_deg: float = 0.0) -> tuple[np.ndarray, object, Affine]:
    with rasterio.open(landsat) as ls:
        bounds = transform_bounds(ls.crs, "EPSG:4326", *ls.bounds)
    with rasterio.open(ZION / "srtm.tif") as src:
        win = from_bounds(*bounds, transform=src.transform).round_offsets().round_lengths()
        data = src.read(window=win)
        transform = Affine.translation(shift_deg, 0) @ src.window_transform(win)
        return data, src.crs, transform


def test_generic_scene_from_real_files(tmp_path: Path, landsat_tif: Path) -> None:
    dem, crs, transform = _dem_crop(landsat_tif)
    dem[:, :10, :] = 65535  # a no-data strip along the northern edge
    dem_tif = _write(tmp_path / "dem.tif", dem, crs, transform, nodata=65535)
    scene = generic_scene({"landsat8:B2,B3,B4,B5": landsat_tif, "dem": str(dem_tif)})
    assert scene.scene_id == "landsat" and scene.source == "generic" and scene.licence == "user"
    assert scene.grid.crs.to_epsg() == 32612
    assert (scene.grid.width, scene.grid.height) == (200, 160)
    landsat, elev = _layer(scene, "landsat8"), _layer(scene, "dem")
    assert landsat.bands == ("B2", "B3", "B4", "B5") and landsat.grid == scene.grid
    assert elev.crs.to_epsg() == 4326 and elev.data.shape == dem.shape
    valid = elev.valid_mask()[0]
    assert not valid[:10].any() and valid[10:].all()
    assert elev.data[0][valid].min() >= 1024 and elev.data[0][valid].max() <= 2892


def test_generic_band_subset_by_description_and_categorical(
    tmp_path: Path, landsat_tif: Path
) -> None:
    with rasterio.open(landsat_tif) as src:
        rgb = src.read([3, 2, 1])
        crs, transform = src.crs, src.transform
    rgb_tif = _write(tmp_path / "rgb.tif", rgb, crs, transform, names=("B4", "b3", "B2"))
    with rasterio.open(ZION / "nlcd2011.tif") as src:
        nlcd = src.read(window=Window(380, 470, 220, 200))
        nlcd_tif = _write(
            tmp_path / "nlcd.tif",
            nlcd,
            src.crs,
            src.window_transform(Window(380, 470, 220, 200)),
            nodata=255,
        )
    scene = generic_scene({"landsat8": rgb_tif, "landcover_nlcd": nlcd_tif}, scene_id="mine")
    assert scene.scene_id == "mine"
    assert _layer(scene, "landsat8").bands == ("B4", "B3", "B2")
    assert np.array_equal(_layer(scene, "landsat8").data, rgb.astype(np.float32))
    codes = _layer(scene, "landcover_nlcd")
    assert codes.crs.to_epsg() == 6367 and codes.data.dtype.kind == "i"
    assert np.array_equal(codes.data, nlcd)


def test_generic_wrong_band_count(tmp_path: Path, landsat_tif: Path) -> None:
    with rasterio.open(landsat_tif) as src:
        three = _write(tmp_path / "three.tif", src.read([1, 2, 3]), src.crs, src.transform)
    with pytest.raises(InputError) as exc:
        generic_scene({"landsat8": three})
    assert _one_line(exc).endswith(
        "landsat8 expects 7 bands (B1, B2, B3, B4, B5, B6, B7), file has 3"
    )
    with pytest.raises(InputError) as exc:
        generic_scene({"s2l2a": three})
    msg = _one_line(exc)
    assert msg.startswith(str(three)) and "s2l2a expects 12 bands (B02, B03" in msg
    assert msg.endswith("file has 3")


def test_generic_unknown_modality(landsat_tif: Path) -> None:
    with pytest.raises(UnknownModalityError) as exc:
        generic_scene({"sentinel9": landsat_tif})
    assert isinstance(exc.value, TerrasynthError)
    assert "sentinel9" in _one_line(exc)


def test_generic_non_overlapping_extent(tmp_path: Path, landsat_tif: Path) -> None:
    dem, crs, transform = _dem_crop(landsat_tif, shift_deg=40.0)
    far = _write(tmp_path / "far_dem.tif", dem, crs, transform, nodata=65535)
    with pytest.raises(InputError) as exc:
        generic_scene({"landsat8:B2,B3,B4,B5": landsat_tif, "dem": far})
    assert _one_line(exc) == f"{far} does not overlap {landsat_tif}"


def test_generic_truncated_file(tmp_path: Path, landsat_tif: Path) -> None:
    raw = landsat_tif.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError) as exc:
        generic_scene({"landsat8": cut})
    assert str(cut) in _one_line(exc)
    with pytest.raises(InputError):
        generic_scene({"landsat8": tmp_path / "missing.tif"})
