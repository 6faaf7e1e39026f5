"""Sources described as data: a user's folder enters a store with no code change."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from terrasynth.data.build import build_store
from terrasynth.data.sources import detect_source
from terrasynth.data.sources.described import (
    DescribedSource,
    find_description,
    safe_regex,
    shipped_descriptions,
)
from terrasynth.data.store import ChipStore
from terrasynth.errors import InputError, TerrasynthError
from terrasynth.modalities import default_registry
from tests.conftest import DATA, run_cli

pytestmark = pytest.mark.needs_data
MYANMAR = DATA / "s1_timeseries_myanmar_srtm"


def _crop(src_path, dst_path, window: Window, bands: list[int] | None = None) -> None:
    with rasterio.open(src_path) as src:
        idx = bands or list(range(1, src.count + 1))
        profile = src.profile | {
            "width": window.width,
            "height": window.height,
            "count": len(idx),
            "transform": src.window_transform(window),
        }
        with rasterio.open(dst_path, "w", **profile) as dst:
            dst.write(src.read(idx, window=window))
            dst.descriptions = tuple(src.descriptions[i - 1] for i in idx)


@pytest.fixture
def my_folder(tmp_path):
    """Part of the Myanmar S1 series, renamed, with the user's own description."""
    folder = tmp_path / "my_radar_site"
    folder.mkdir()
    _crop(
        MYANMAR / "s1_grd_vv_vh_timeseries_2014_2018_dBx100.tif",
        folder / "radar_stack.tif",
        Window(0, 0, 80, 80),
        bands=list(range(5, 25)),
    )
    _crop(MYANMAR / "srtm_elevation_slope.tif", folder / "terrain.tif", Window(0, 0, 80, 80))
    (folder / "terrasynth-source.yaml").write_text(
        "name: my_radar_site\n"
        "licence: MIT (test copy)\n"
        "georeference: exact\n"
        "anchor: s1grd\n"
        "layers:\n"
        "  - file: radar_stack.tif\n"
        "    modality: s1grd\n"
        "    band_pattern: '^(?P<date>\\d{8})_(?P<band>VV|VH)_dBx100$'\n"
        "    scale: 0.01\n"
        "    nodata: -32768\n"
        "  - file: terrain.tif\n"
        "    modality: dem\n"
        "    bands: [elevation]\n"
    )
    return folder


def test_user_folder_with_description_enters_a_store(my_folder, tmp_path):
    assert isinstance(detect_source(my_folder), DescribedSource)
    report = build_store([my_folder], tmp_path / "store", default_registry())
    store = ChipStore.open(tmp_path / "store")
    info = store.source_summary("my_radar_site")
    assert info["scenes"] == 10  # 20 bands = 10 dates of VV + VH
    assert info["dates"]["first"] == "2014-11-05" and info["dates"]["count"] == 10
    assert info["modalities"] == {"s1grd": ["VV", "VH"], "dem": ["elevation"]}
    vv = store.stats["s1grd"]["bands"]["VV"]
    assert -12 < vv["mean"] < -4  # dB after the x0.01 scale
    assert report.chips == len(store) == 40  # 80 px scene: 2 x 2 overlapping chips a date


def test_yaml_given_as_the_source_points_at_its_root(my_folder, tmp_path):
    desc = tmp_path / "elsewhere.yaml"
    text = (my_folder / "terrasynth-source.yaml").read_text()
    desc.write_text(text + f"root: {my_folder}\n")
    (my_folder / "terrasynth-source.yaml").unlink()
    found = find_description(desc)
    assert found is not None and found[1] == my_folder.resolve()
    scenes = list(DescribedSource().scenes(str(desc)))
    assert len(scenes) == 10 and all(s.time is not None for s in scenes)


def test_bad_descriptions_fail_clearly(my_folder):
    yaml_path = my_folder / "terrasynth-source.yaml"
    text = yaml_path.read_text()
    yaml_path.write_text(text.replace("modality: dem", "modality: dem_of_mars"))
    with pytest.raises(TerrasynthError, match="unknown modality .dem_of_mars."):
        list(DescribedSource().scenes(str(my_folder)))
    yaml_path.write_text(text.replace("bands: [elevation]", "bands: [elevation, x, y]"))
    with pytest.raises(InputError, match="expects 3 band"):
        list(DescribedSource().scenes(str(my_folder)))
    yaml_path.write_text(text.replace("file: terrain.tif", "file: nothing_*.tif"))
    with pytest.raises(InputError, match="no file matches 'nothing_"):
        list(DescribedSource().scenes(str(my_folder)))
    yaml_path.write_text("layers: [")
    with pytest.raises(InputError, match="unreadable source description"):
        list(DescribedSource().scenes(str(my_folder)))


def _outside(tmp_path):
    """A folder beside the described one, holding a raster a description must not reach."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tmp_path / "my_radar_site" / "terrain.tif", outside / "terrain.tif")
    return outside


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_root_outside_the_yamls_folder_is_refused(my_folder, tmp_path, how):
    descs = tmp_path / "descriptions"
    descs.mkdir()
    root = {"dotdot": "../my_radar_site", "absolute": str(my_folder), "symlink": "data"}[how]
    (descs / "data").symlink_to(my_folder, target_is_directory=True)
    desc = descs / "mine.yaml"
    desc.write_text((my_folder / "terrasynth-source.yaml").read_text() + f"root: {root}\n")
    with pytest.raises(InputError, match="outside the description's folder"):
        list(DescribedSource().scenes(str(desc)))


@pytest.mark.parametrize(
    "file, message",
    [
        ("../outside/terrain.tif", "must be relative"),
        ("OUTSIDE/terrain.tif", "must be relative"),  # absolute
        ("linked.tif", "outside the description's folder"),  # a link to a file outside
        ("linked_dir/terrain.tif", "outside the description's folder"),  # via a linked folder
    ],
)
def test_layer_globs_outside_the_folder_are_refused(my_folder, tmp_path, file, message):
    outside = _outside(tmp_path)
    (my_folder / "linked.tif").symlink_to(outside / "terrain.tif")
    (my_folder / "linked_dir").symlink_to(outside, target_is_directory=True)
    yaml_path = my_folder / "terrasynth-source.yaml"
    file = file.replace("OUTSIDE", str(outside))
    yaml_path.write_text(yaml_path.read_text().replace("file: terrain.tif", f"file: {file}"))
    with pytest.raises(InputError, match=message):
        list(DescribedSource().scenes(str(my_folder)))


def test_scene_folders_outside_the_folder_are_refused(my_folder, tmp_path):
    outside = _outside(tmp_path)
    (my_folder / "site").symlink_to(outside, target_is_directory=True)
    yaml_path = my_folder / "terrasynth-source.yaml"
    yaml_path.write_text(yaml_path.read_text() + 'scenes: "*/"\n')
    with pytest.raises(InputError, match="outside the description's folder"):
        list(DescribedSource().scenes(str(my_folder)))
    yaml_path.write_text(yaml_path.read_text().replace('"*/"', '"../*/"'))
    with pytest.raises(InputError, match="must be relative"):
        list(DescribedSource().scenes(str(my_folder)))


def test_description_reaching_outside_ends_in_one_error_line(my_folder, tmp_path):
    _outside(tmp_path)
    yaml_path = my_folder / "terrasynth-source.yaml"
    text = yaml_path.read_text().replace("file: terrain.tif", "file: ../outside/terrain.tif")
    yaml_path.write_text(text)
    res = run_cli("data", "build", str(my_folder), "-o", str(tmp_path / "store"))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "must be relative" in lines[0]
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"^(?P<date>(\d+_?)+)(?P<band>VV|VH)_dBx100$", "nested quantifiers"),
        (r"(?P<date>\d*)\d*\d*(?P<band>VV|VH)", "may take too long"),
        (r"^(?P<date>\d{8})_(?P<band>VV|VH)_(?P=band)", "no back-references"),
        ("(?P<date>" + "x" * 300 + ")", "<= 256 chars"),
        (r"(?P<date>\d{8}", "invalid regular expression"),
    ],
)
def test_costly_regular_expressions_are_refused(my_folder, pattern, message):
    with pytest.raises(InputError, match=message):
        safe_regex(pattern, "test")
    yaml_path = my_folder / "terrasynth-source.yaml"
    old = "'^(?P<date>\\d{8})_(?P<band>VV|VH)_dBx100$'"
    text = yaml_path.read_text()
    assert old in text
    text = text.replace(old, "'" + pattern.replace("'", "''") + "'")  # YAML single quotes
    assert pattern in text
    yaml_path.write_text(text)
    with pytest.raises(InputError, match=message):
        list(DescribedSource().scenes(str(my_folder)))


def test_scene_key_is_bounded_too(my_folder):
    yaml_path = my_folder / "terrasynth-source.yaml"
    yaml_path.write_text(yaml_path.read_text() + "scene_key: '(a|ab)*c'\n")
    with pytest.raises(InputError, match="scene_key.*nested quantifiers"):
        list(DescribedSource().scenes(str(my_folder)))


def test_scene_key_splits_places_sharing_a_date(tmp_path):
    """Two Landsat rows of one date become two scenes, each on its own grid."""
    folder = tmp_path / "rows"
    shutil.copytree(DATA / "landsat8_l1_parana", folder)
    scenes = list(DescribedSource().scenes(str(folder)))
    assert len(scenes) == 2
    assert scenes[0].grid != scenes[1].grid
    assert {s.scene_id.split(":")[1] for s in scenes} == {"224077", "224078"}


def test_mask_from_another_file_and_valid_range(tmp_path):
    """WorldCereal: the 20 m file's SCL masks the 10 m bands of the same date."""
    site = DATA / "worldcereal_s2_s1_landsat8_dem_crops" / "flanders_31UES_a_2019"
    scenes = list(DescribedSource().scenes(str(site.parent)))
    ours = [s for s in scenes if s.scene_id.split(":")[1] == site.name]
    s2 = [la for s in ours for la in s.layers if la.modality == "s2l2a" and "B02" in la.bands]
    assert s2
    masked = sum(int((~la.valid_mask()[0]).sum()) for la in s2)
    assert masked > 0  # cloudy dates lose pixels through the SCL of the other file
    sr = [la for s in scenes for la in s.layers if la.modality == "landsat8_sr"]
    assert max(float(la.data[la.valid_mask()].max(initial=0)) for la in sr) < 1.6


def test_shipped_descriptions_each_claim_their_own_folder():
    names = [d["name"] for _, d in shipped_descriptions()]
    assert len(names) == len(set(names)) == 17
    for name in names:
        found = find_description(DATA / name)
        assert found is not None and found[0]["name"] == name, name


def test_chips_of_tiny_scenes_are_padded_not_invented(tmp_path):
    store_path = tmp_path / "togo"
    build_store([DATA / "s1_s2l1c_srtm_monthly_togo"], store_path, default_registry())
    store = ChipStore.open(store_path)
    assert len(store) == 12  # 12 monthly scenes of 17 x 17 px, one padded chip each
    valid = store.array("s1grd/r10m/valid")[:]
    frac = valid.reshape(len(store), -1).mean(axis=1)
    assert np.all(frac <= 17 * 17 / 64**2 + 1e-6)  # padding is never valid
    assert np.all(frac > 0.05)
