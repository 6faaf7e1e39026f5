"""A small fixed-seed slice of ``bench/fuzz.py`` (issue 18, point 8): mutated real files
through the readers and the command lines end as ``ok`` or one clean ``error:`` line, never
as a traceback, a crash, a hang or files left behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.needs_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fuzz  # noqa: E402


def test_a_fixed_seed_slice_has_no_failure(tmp_path):
    out = tmp_path / "out"
    code = fuzz.main(
        ["--cases", "48", "--seed", "18", "--jobs", "2", "--cli-fraction", "0.1",
         "--out", str(out), "--work", str(tmp_path / "work")]
    )  # fmt: skip
    summary = json.loads((out / "fuzz.json").read_text())
    assert summary["cases"] == 48 and summary["cli_runs"] > 0
    assert summary["failing"] == [], summary["failing"]
    assert code == 0
    assert {o for o, n in summary["outcomes"].items() if n} <= {"ok", "error"}


def test_mutations_change_only_the_copy(tmp_path):
    """Cases are hard-link copies of the shared data: the mutated file is a new file, the
    original is untouched, and the same case number mutates the same way."""
    work = tmp_path / "work"
    (work / "cases").mkdir(parents=True)
    fuzz.build_seeds(work)
    files = {s.name: fuzz.candidate_files(s, work) for s in fuzz.SEEDS}
    for number in range(12):
        case = fuzz.plan_case(number, 5, 0.0, work, files)
        assert case == fuzz.plan_case(number, 5, 0.0, work, files)
        seed = next(s for s in fuzz.SEEDS if s.name == case.seed)
        root = fuzz.seed_root(seed, work)
        original = root if seed.kind == "generic" else root / case.file
        before = original.read_bytes()
        first, second = tmp_path / f"a{number}", tmp_path / f"b{number}"
        first.mkdir(), second.mkdir()
        top = fuzz.prepare(case, 5, work, first)
        fuzz.prepare(case, 5, work, second)
        mutated = top if seed.kind == "generic" else top / case.file
        twin = second / mutated.relative_to(first)
        assert original.read_bytes() == before
        assert mutated.stat().st_nlink == 1
        assert mutated.read_bytes() == twin.read_bytes()


# -- regressions: one per class of failure the fuzzer found ---------------------------------
def _copy_store(tmp_path: Path) -> Path:
    import shutil

    from terrasynth.data.build import build_store
    from terrasynth.modalities import default_registry
    from tests.conftest import DATA

    out = tmp_path / "store"
    build_store([DATA / "s1_s2l1c_srtm_monthly_togo"], out, default_registry())
    return Path(shutil.copytree(out, tmp_path / "copy"))


def test_store_arrays_whose_shape_disagrees_with_the_registry_are_refused(tmp_path):
    """Found: a `bands` array declaring more columns than the modality has bands ended in
    zip(strict=True)'s ValueError in `data info`."""
    from terrasynth.data.store import ChipStore
    from terrasynth.errors import TerrasynthError

    store = _copy_store(tmp_path)
    meta_path = store / "slope" / "bands" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [meta["shape"][0], 7]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TerrasynthError, match="not this store's"):
        ChipStore.open(store).summary()


def test_a_truncated_lmdb_is_an_error_not_a_bus_error(tmp_path):
    """Found: LMDB maps data.mdb and a truncated file killed the process with SIGBUS."""
    import shutil
    import subprocess

    from tests.conftest import DATA

    root = Path(shutil.copytree(DATA / "bigearthnet_v2_lmdb", tmp_path / "v2"))
    data = next(root.rglob("data.mdb"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    code = (
        "from terrasynth.data.sources.bigearthnet_v2 import BigEarthNetV2Source\n"
        "from terrasynth.errors import InputError\n"
        "try:\n"
        f"    list(BigEarthNetV2Source().scenes({str(root)!r}))\n"
        "except InputError as exc:\n"
        "    print('refused:', exc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, (res.returncode, res.stderr[-500:])
    assert "refused:" in res.stdout and "truncated LMDB file" in res.stdout


def test_a_damaged_lmdb_page_is_an_error_not_a_traceback(tmp_path):
    """Found (seed 200, case 5745): a byte flip in data.mdb's first KiB made lmdb raise its
    own PageNotFoundError while reading a patch, past the reader's error handling."""
    out = tmp_path / "out"
    code = fuzz.main(
        ["--seed", "200", "--case", "5745", "--out", str(out), "--work", str(tmp_path / "w")]
    )
    summary = json.loads((out / "fuzz.json").read_text())
    assert summary["failing"] == [] and summary["cases_clean_error"] == 1, summary["failing"]
    assert code == 0


def test_library_warnings_are_warning_lines_and_the_error_stays_last(tmp_path):
    """Found: rasterio's NotGeoreferencedWarning printed its source line on stderr before
    the error line; a raster without a geotransform is now named as such."""
    import numpy as np
    import rasterio
    from rasterio.crs import CRS

    from tests.conftest import run_cli

    path = tmp_path / "no_transform.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=64, height=64, count=1, dtype="float32",
        crs=CRS.from_epsg(32633),
    ) as dst:  # fmt: skip
        dst.write(np.ones((1, 64, 64), np.float32))
    res = run_cli("generate", "-i", f"dem={path}", "-t", "s2l2a", "-o", str(tmp_path / "o"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert lines[-1].startswith("error:") and "no geotransform" in lines[-1]
    assert all(ln.startswith("warning:") for ln in lines[:-1])


def test_class_codes_stored_as_non_finite_floats_are_invalid_without_a_cast_warning(tmp_path):
    """Found: NaN class codes in a float land cover raster were cast to int32 (a
    RuntimeWarning on stderr and a garbage code)."""
    import warnings

    import numpy as np
    from affine import Affine
    from rasterio.crs import CRS

    from terrasynth.data.raster_io import Raster, layer_from_raster

    raw = np.full((1, 4, 4), 41.0, np.float32)
    raw[0, 0, :3] = (np.nan, np.inf, 3e9)
    raster = Raster(Path("x.tif"), raw, CRS.from_epsg(32612), Affine(30, 0, 0, 0, -30, 0), None, ())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = layer_from_raster(raster, "landcover_nlcd", ["class"], categorical=True)
    assert layer.valid_mask()[0, 0].tolist() == [False, False, False, True]
    assert (layer.data[0, 1:] == 41).all()


@pytest.mark.parametrize(
    "crs, transform, message",
    [
        ("EPSG:4326", (1e-12, 0, 500000.0, 0, -1e-12, 0), "does not lie on the Earth"),
        ('LOCAL_CS["arbitrary"]', (30, 0, 0, 0, -30, 0), r"local \(engineering\) CRS"),
    ],
)
def test_georeferencing_that_cannot_be_placed_is_an_input_error(tmp_path, crs, transform, message):
    """Found: a geographic grid at longitude 500,000 made calculate_default_transform fail
    inside GDAL, and a local CRS made the working grid's unit lookup raise CRSError."""
    import rasterio
    from affine import Affine
    from rasterio.crs import CRS

    from terrasynth.data.sources.generic import generic_scene
    from terrasynth.errors import InputError
    from tests.conftest import DATA

    src = DATA / "athabasca_hls_s30_l30_dem" / "dem_30m.tif"
    with rasterio.open(src) as f:
        data, profile = f.read(), f.profile
    profile.update(crs=CRS.from_user_input(crs), transform=Affine(*transform))
    path = tmp_path / "bad.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    with pytest.raises(InputError, match=message):
        generic_scene([("dem", path)])


def test_a_source_file_in_a_local_crs_is_an_input_error_when_aligned(tmp_path):
    """Found: one file of a described folder in a local CRS made GDAL's reproject fail
    (CPLE_NotSupportedError: no coordinate operation) inside the alignment."""
    import shutil

    import rasterio
    from rasterio.crs import CRS

    from terrasynth.data.align import align_scene
    from terrasynth.data.sources import detect_source
    from terrasynth.errors import InputError
    from terrasynth.modalities import default_registry
    from tests.conftest import DATA

    name = "s1_s2l1c_srtm_monthly_togo"
    folder = Path(shutil.copytree(DATA / name, tmp_path / name))
    dem = folder / "srtm_elevation_slope.tif"
    with rasterio.open(dem) as f:
        data, profile = f.read(), f.profile
    dem.unlink()
    with rasterio.open(dem, "w", **{**profile, "crs": CRS.from_wkt('LOCAL_CS["arbitrary"]')}) as f:
        f.write(data)
    registry = default_registry()
    with pytest.raises(InputError, match="cannot warp a layer in LOCAL_CS"):
        for scene in detect_source(folder).scenes(folder):
            align_scene(scene, registry)


def test_a_whole_scene_run_refused_at_its_inputs_leaves_no_work_folder(tmp_path):
    """Found: a header declaring 2,000 px sent generate to the whole-scene engine, whose
    input check failed after the work folder (lock and marker) was made: `out.work` stayed."""
    from tests.conftest import DATA, run_cli

    lying = tmp_path / "dem.tif"
    dem = DATA / "athabasca_hls_s30_l30_dem" / "dem_30m.tif"
    lying.write_bytes(fuzz.set_tiff_size(dem.read_bytes(), 2000, 2000))
    res = run_cli("generate", "-i", f"dem={lying}", "-t", "s2l2a", "-o", str(tmp_path / "out"))
    assert res.returncode == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dem.tif"]
