"""Store builds (terrasynth.data.build): value checks, source resolution, reports, atomicity."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio

from terrasynth.data.build import build_store, check_scene_values, resolve_sources
from terrasynth.data.raster_io import read_layer
from terrasynth.data.scene import Layer, Scene
from terrasynth.data.store import ChipStore
from terrasynth.errors import InputError, TerrasynthError
from terrasynth.modalities import default_registry
from tests.conftest import DATA, ZION

pytestmark = pytest.mark.needs_data

BEN = DATA / "bigearthnet_v1_examples"
L7 = DATA / "landsat7_pa_ridge_valley_dem" / "landsat7_etm_july2002_DN.tif"
SSL4EO_B2 = sorted((DATA / "ssl4eo_s12" / "s2a" / "0000200").glob("*/B2.tif"))[0]


@pytest.fixture(scope="module")
def registry():
    return default_registry()


def one_layer_scene(layer: Layer) -> Scene:
    return Scene("check:" + layer.modality, "test", "CC0-1.0", layer.grid, [layer])


def test_right_modalities_pass_without_warnings(zion_scene, registry):
    # DN, metres and class codes: all plausible, even under --strict
    assert check_scene_values(zion_scene, registry, strict=False) == []
    assert check_scene_values(zion_scene, registry, strict=True) == []


def test_landsat_dn_given_as_ndvi_is_refused(registry):
    layer = read_layer(ZION / "landsat_b2.tif", "ndvi", ["ndvi"])
    with pytest.raises(InputError, match=r"ndvi values \(median .*\) are far outside") as exc:
        check_scene_values(one_layer_scene(layer), registry, strict=False)
    assert "check:ndvi" in str(exc.value)


def test_s2_dn_given_as_reflectance_is_refused(registry):
    dn = read_layer(SSL4EO_B2, "s2l2a", ["B02"])
    with pytest.raises(InputError, match="s2l2a"):
        check_scene_values(one_layer_scene(dn), registry, strict=False)
    reflectance = read_layer(SSL4EO_B2, "s2l2a", ["B02"], scale=1e-4)
    assert check_scene_values(one_layer_scene(reflectance), registry, strict=True) == []


def test_8bit_dn_given_as_16bit_landsat8_is_warned_or_refused(zion_scene, registry):
    l7 = read_layer(L7, "landsat8", ["B2", "B3", "B4"], indexes=[2, 3, 4])
    scene = Scene("pa", "test", "CC0-1.0", zion_scene.grid, [*zion_scene.layers, l7])
    warnings = check_scene_values(scene, registry, strict=False)
    assert len(warnings) == 1  # only the Landsat 7 layer
    assert warnings[0].startswith("pa: landsat8 values look wrong") and "8-bit" in warnings[0]
    with pytest.raises(InputError, match="refused with --strict"):
        check_scene_values(scene, registry, strict=True)


def test_value_check_looks_at_valid_pixels_only(registry):
    layer = read_layer(ZION / "landsat_b2.tif", "ndvi", ["ndvi"])
    layer.data[:, :10, :10] = 0.5
    layer.valid = np.zeros(layer.data.shape, bool)
    layer.valid[:, :10, :10] = True
    assert check_scene_values(one_layer_scene(layer), registry, strict=True) == []
    # no valid pixel at all: nothing to judge
    layer.valid[:] = False
    assert check_scene_values(one_layer_scene(layer), registry, strict=True) == []


def test_a_few_outliers_are_not_a_unit_mistake(registry):
    layer = read_layer(ZION / "srtm.tif", "dem", ["elevation"])
    layer.data[0, :20, :] = 1e6  # far out, but a small minority
    assert check_scene_values(one_layer_scene(layer), registry, strict=True) == []
    layer.data[0, :20, :] = layer.data[0, 20:40, :]
    layer.data *= 100.0  # centimetres given as metres: the median is far above 9000 + 9500
    with pytest.raises(InputError, match="dem values"):
        check_scene_values(one_layer_scene(layer), registry, strict=False)


def test_resolve_sources_skips_unknown_paths_among_several(tmp_path):
    unknown = tmp_path / "notes"
    unknown.mkdir()
    (unknown / "readme.txt").write_text("not a source")
    missing = tmp_path / "missing"
    found, skipped = resolve_sources([ZION, unknown, missing, BEN], strict=False)
    assert [(p, s.name) for p, s in found] == [(ZION, "band_folder"), (BEN, "bigearthnet_v1")]
    assert skipped == [str(unknown), str(missing)]


def test_resolve_sources_refuses_a_single_unknown_path_or_strict(tmp_path):
    unknown = tmp_path / "notes"
    unknown.mkdir()
    with pytest.raises(InputError, match="not a recognised source format"):
        resolve_sources([unknown], strict=False)
    with pytest.raises(InputError, match="no such file"):
        resolve_sources([tmp_path / "missing"], strict=False)
    with pytest.raises(InputError, match=str(unknown)):
        resolve_sources([ZION, unknown], strict=True)
    found, skipped = resolve_sources([ZION], strict=True)
    assert len(found) == 1 and skipped == []


@pytest.fixture(scope="module")
def built(tmp_path_factory, registry):
    root = tmp_path_factory.mktemp("build")
    unknown = root / "notes"
    unknown.mkdir()
    seen: list[tuple[str, str, int]] = []
    report = build_store(
        [ZION, unknown, BEN],
        root / "store",
        registry,
        on_scene=lambda name, scene, n: seen.append((name, scene.scene_id, n)),
    )
    return report, ChipStore.open(root / "store"), seen, unknown


def test_report_counts_equal_the_store(built):
    report, store, seen, unknown = built
    t = store.table
    assert report.chips == len(store) == len(t)
    assert report.skipped == [str(unknown)]
    assert report.scenes_per_source == t.groupby("source")["scene_id"].nunique().to_dict()
    assert report.chips_per_source == t["source"].value_counts().to_dict()
    assert report.scenes_per_source == {"band_folder": 1, "bigearthnet_v1": 6}
    assert report.chips_per_source["bigearthnet_v1"] == 24  # 4 overlapping chips per patch
    assert set(report.seconds_per_source) == {"band_folder", "bigearthnet_v1"}
    # the store's own record of its sources agrees
    for name, rec in store.attrs["sources"].items():
        assert rec["chips"] == report.chips_per_source[name]
        assert rec["scenes"] == report.scenes_per_source[name]
    # the per-scene callback saw every scene once, with its chip count
    assert len(seen) == 7 and len({sid for _, sid, _ in seen}) == 7
    per_scene = t["scene_id"].value_counts().to_dict()
    assert all(per_scene[sid] == n for _, sid, n in seen)
    assert {name for name, _, _ in seen} == set(report.scenes_per_source)
    assert report.warnings == []  # real data of the right modalities
    assert store.attrs["build"]["sources"] == [str(ZION), str(BEN)]


def test_existing_output_is_not_overwritten_by_default(built, registry):
    report, store, _, _ = built
    with pytest.raises(TerrasynthError, match="already exists"):
        build_store([BEN], store.path, registry)
    assert len(ChipStore.open(store.path)) == report.chips


def test_no_recognised_source(tmp_path, registry):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with pytest.raises(TerrasynthError, match="no recognised source"):
        build_store([a, b], tmp_path / "out", registry)
    assert not (tmp_path / "out").exists()


def test_failed_build_leaves_nothing(tmp_path, registry):
    broken = tmp_path / "zion_copy"
    shutil.copytree(ZION, broken)
    band = broken / "landsat_b5.tif"
    band.chmod(0o644)
    band.write_bytes(band.read_bytes()[:500_000])
    out = tmp_path / "out"
    with pytest.raises(InputError) as exc:
        build_store([BEN, broken], out, registry)
    assert str(band) in str(exc.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*partial"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zion_copy"]


def test_warnings_land_in_the_report_and_strict_refuses(tmp_path, registry):
    """Landsat 7 8-bit DN given as landsat8 through --input: built with a warning, or
    refused under --strict with nothing left behind."""
    band = tmp_path / "l7_b2.tif"
    with rasterio.open(L7) as src:
        profile = {**src.profile, "count": 1}
        pixels = src.read([2])
    with rasterio.open(band, "w", **profile) as dst:
        dst.write(pixels)
    report = build_store([], tmp_path / "out", registry, inputs={"landsat8:B2": str(band)})
    assert len(report.warnings) == 1 and "8-bit" in report.warnings[0]
    assert report.chips_per_source == {"generic": report.chips} and report.chips > 0
    with pytest.raises(InputError, match="refused with --strict"):
        build_store(
            [], tmp_path / "strict", registry, inputs={"landsat8:B2": str(band)}, strict=True
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l7_b2.tif", "out"]
