"""Bounded memory, clear errors (issue 18, point 3): sizes are decided from headers before
any pixel is read, absurd files get one ``error:`` line, and no allocation grows with a value
read from a file. Cases whose failure would allocate gigabytes run in a child process with
its data segment limited, so a regression is a failed test, not an out-of-memory kill."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from terrasynth.data.raster_io import open_raster
from terrasynth.errors import InputError, TerrasynthError
from tests.conftest import DATA, ZION, run_cli, write_s1_utm

pytestmark = pytest.mark.needs_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from fuzz import set_npy_shape, set_tiff_size  # noqa: E402

TOGO_DEM = DATA / "s1_s2l1c_srtm_monthly_togo" / "srtm_elevation_slope.tif"
ATHABASCA_DEM = DATA / "athabasca_hls_s30_l30_dem" / "dem_30m.tif"
LIMIT = 1536 * 2**20  # data segment of the child processes


def _limited(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose data segment is limited to LIMIT bytes."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (LIMIT, LIMIT))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )


def _lying(src: Path, dst: Path, width: int, height: int) -> Path:
    """A copy of the real file ``src`` whose header declares ``width`` x ``height`` px."""
    dst.write_bytes(set_tiff_size(src.read_bytes(), width, height))
    return dst


def _rewritten(src: Path, dst: Path, **profile) -> Path:
    """The real file ``src`` written again with ``profile`` changes (transform, crs...)."""
    with rasterio.open(src) as f:
        data, meta = f.read(), {**f.profile, **profile}
    with rasterio.open(dst, "w", **meta) as f:
        f.write(data)
    return dst


@pytest.mark.parametrize(
    "side, message",
    [
        (100_000, "100000 x 100000 px per band, more than 2**32"),
        # within 2**32 px a band, but 2 float32 bands of 40,000 px squared are 12 GiB
        (40_000, "11.9 GiB, more than the 2 GiB read whole; generate from it with the whole-scene"),
    ],
)
def test_a_huge_declared_size_is_refused_from_the_header(tmp_path, side, message):
    huge = _lying(TOGO_DEM, tmp_path / "huge.tif", side, side)
    res = _limited(f"""
        from terrasynth.data.raster_io import open_raster
        from terrasynth.errors import InputError
        try:
            open_raster({str(huge)!r})
        except InputError as exc:
            print("refused:", exc)
    """)
    assert res.returncode == 0, res.stderr[-800:]
    assert "refused:" in res.stdout and message in res.stdout


@pytest.mark.parametrize(
    "transform, message",
    [
        (Affine(0, 0, 1.42, 0, 0, 7.72), "degenerate georeferencing"),
        (Affine(9e-5, 0, 1.42, 0, 9e-5, 7.72), "not north-up"),
        (Affine(9e-5, 0, 1.42, 0, -9e-5, 1e30), "does not lie on the Earth"),
    ],
)
def test_absurd_georeferencing_is_an_error_line(tmp_path, transform, message):
    bad = _rewritten(ATHABASCA_DEM, tmp_path / "bad.tif", transform=transform, crs="EPSG:4326")
    with pytest.raises(InputError, match=message):
        open_raster(bad)
    res = run_cli("generate", "-i", f"dem={bad}", "-t", "s2l2a", "-o", str(tmp_path / "o"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "o").exists()


def test_a_file_name_that_is_not_utf8_is_an_error_line(tmp_path):
    name = Path(os.fsdecode(os.fsencode(tmp_path) + b"/dem\xff.tif"))
    name.write_bytes(ATHABASCA_DEM.read_bytes())
    with pytest.raises(InputError, match="not a readable raster"):
        open_raster(name)


def test_a_land_cover_code_of_2e9_costs_no_lookup_table(tmp_path):
    """On main a code of 2e9 sized a lookup table at 8 GB; here the child's 1.5 GiB suffice."""
    with rasterio.open(ZION / "nlcd2011.tif") as src:
        window = rasterio.windows.Window(400, 500, 128, 128)
        codes = src.read(window=window).astype(np.int32)
        profile = {**src.profile, "dtype": "int32", "width": 128, "height": 128}
        profile["transform"] = src.window_transform(window)
    codes[0, :4, :4] = 2_000_000_000
    path = tmp_path / "nlcd_code2e9.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(codes)
    res = _limited(f"""
        import numpy as np
        from terrasynth.data.align import align_scene
        from terrasynth.data.sources.generic import generic_scene
        from terrasynth.modalities import default_registry
        reg = default_registry()
        scene = generic_scene([("landcover_nlcd", {str(path)!r})], registry=reg)
        group = next(iter(align_scene(scene, reg).groups.values()))
        print("valid", int(group.valid.sum()), "of", group.valid.size)
    """)
    assert res.returncode == 0, res.stderr[-800:]
    valid, total = (int(w) for w in res.stdout.split()[1::2])
    assert 0 < valid < total  # the unknown codes are invalid, the rest kept


def test_in_memory_generation_decides_from_headers_before_reading(tmp_path, monkeypatch):
    from terrasynth.pipeline import Pipeline

    def no_read(*args, **kwargs):
        raise AssertionError("pixels were read before the size check")

    lying = _lying(ATHABASCA_DEM, tmp_path / "dem_3000.tif", 3000, 3000)
    pipe = Pipeline.from_pretrained()
    monkeypatch.setattr(rasterio.io.DatasetReader, "read", no_read)
    with pytest.raises(InputError, match="whole-scene engine"):
        pipe.generate({"dem": lying}, ["s2l2a"], num_samples=1, steps=1)


def test_inputs_over_the_memory_estimate_are_refused_in_memory(tmp_path, monkeypatch):
    import terrasynth.pipeline as pipeline

    s1 = write_s1_utm(tmp_path / "s1.tif", 256, 256)
    pipe = pipeline.Pipeline.from_pretrained()
    assert pipe.in_memory_refusal([("s1grd", s1)]) is None
    monkeypatch.setattr(pipeline, "MAX_MEMORY_BYTES", 2**20)
    refusal = pipe.in_memory_refusal([("s1grd", s1)])
    assert refusal is not None and "MiB" in refusal
    with pytest.raises(InputError, match="whole-scene engine"):
        pipe.generate({"s1grd": s1}, ["s2l2a"], num_samples=1, steps=1)


def test_generate_says_when_it_takes_the_whole_scene_engine(tmp_path):
    # the header says 1,200 px (more than generate holds in memory), the pixels end early
    lying = _lying(ATHABASCA_DEM, tmp_path / "dem_1200.tif", 1200, 1200)
    res = run_cli("generate", "-i", f"dem={lying}", "-t", "s2l2a", "-o", str(tmp_path / "o"))
    assert res.stdout.startswith("note: the scene is") and "whole-scene engine" in res.stdout
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error:")


@pytest.fixture(scope="module")
def togo_store(tmp_path_factory) -> Path:
    from terrasynth.data.build import build_store
    from terrasynth.modalities import default_registry

    out = tmp_path_factory.mktemp("stores") / "togo"
    build_store([DATA / "s1_s2l1c_srtm_monthly_togo"], out, default_registry())
    return out


def _copy(store: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(store, dst))


def test_a_corrupt_store_chunk_is_an_error_not_a_codec_traceback(togo_store, tmp_path):
    from terrasynth.data.dataset import ChipDataset

    store = _copy(togo_store, tmp_path / "store")
    chunk = store / "s1grd" / "r10m" / "data" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10:40] = bytes(range(30))
    chunk.write_bytes(bytes(data))
    ds = ChipDataset(store, split="test")
    with pytest.raises(TerrasynthError, match="damaged or truncated chunk"):
        ds[0]


@pytest.mark.parametrize("field", ["shape", "chunk_shape"])
def test_store_metadata_that_declares_huge_arrays_is_refused_unread(togo_store, tmp_path, field):
    import json

    store = _copy(togo_store, tmp_path / "store")
    meta_path = store / "s1grd" / "r10m" / "data" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    if field == "shape":
        meta["shape"] = [meta["shape"][0], 2, 64_000_000, 64]
    else:
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [64, 2, 64_000_000, 64]
    meta_path.write_text(json.dumps(meta))
    res = _limited(f"""
        from terrasynth.data.dataset import ChipDataset
        from terrasynth.errors import TerrasynthError
        try:
            ChipDataset({str(store)!r}, split="test")[0]
        except TerrasynthError as exc:
            print("refused:", exc)
    """)
    assert res.returncode == 0, res.stderr[-800:]
    assert "refused:" in res.stdout and "not this store's" in res.stdout


def test_a_npy_header_declaring_more_than_the_file_holds_is_refused_unread(tmp_path):
    path = tmp_path / "feature.npy"
    np.save(path, np.zeros((4, 8, 8, 3), np.float32))
    path.write_bytes(set_npy_shape(path.read_bytes(), (4, 100_000, 100_000, 3)))
    res = _limited(f"""
        from pathlib import Path
        from terrasynth.data.sources.eopatch import _load
        from terrasynth.errors import InputError
        try:
            _load(Path({str(path)!r}))
        except InputError as exc:
            print("refused:", exc)
    """)
    assert res.returncode == 0, res.stderr[-800:]
    assert "refused:" in res.stdout and "truncated or corrupt" in res.stdout
