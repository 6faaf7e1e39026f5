"""Remote rasters (https://, /vsicurl/, s3://) and devices.

A real HTTP server on 127.0.0.1 (``tests/loopback.py``), started here, serves
cloud-optimised GeoTIFFs made from the shared data and counts the bytes it sends.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from tests.conftest import DATA, run_cli
from tests.loopback import LoopbackServer

S2 = DATA / "s2l2a_dolomites" / "S2_L2A_Tofane_202206_B02B03B04B08.tif"
SIDE = 4096  # the large COG's width and height
# the Dolomites file holds L2A DN of processing baseline 04.00 and later
SCALING = ("--scale", "s2l2a=0.0001", "--offset", "s2l2a=-0.1")
WINDOW = (1800, 2100, 96, 80)  # COL, ROW, WIDTH, HEIGHT of the large COG


@pytest.fixture(scope="module")
def cogs(tmp_path_factory) -> Path:
    """A 4096 x 4096 cloud-optimised GeoTIFF (512 px tiles, overviews) of real Sentinel-2
    L2A: the Dolomites scene mirrored out to that size, its band descriptions kept; also in
    ``bucket/`` (the path style of an S3 endpoint), and the Dolomites file itself."""
    folder = tmp_path_factory.mktemp("served")
    (folder / "bucket").mkdir()
    shutil.copy(S2, folder / "dolomites.tif")
    with rasterio.open(S2) as src:
        raw, profile, descriptions = src.read(), src.profile, src.descriptions
    _, h, w = raw.shape
    big = np.pad(raw, ((0, 0), (0, SIDE - h), (0, SIDE - w)), mode="symmetric")
    options = dict(
        driver="COG", blocksize=512, compress="deflate", level=1, predictor=2,
        overview_resampling="average", BIGTIFF="NO",
    )  # fmt: skip
    with rasterio.open(
        folder / "s2_4096.tif", "w", width=SIDE, height=SIDE, count=big.shape[0],
        dtype=big.dtype, crs=profile["crs"], transform=profile["transform"], **options,
    ) as dst:  # fmt: skip
        dst.write(big)
        dst.descriptions = descriptions
    os.link(folder / "s2_4096.tif", folder / "bucket" / "s2_4096.tif")
    return folder


@pytest.fixture(scope="module")
def server(cogs) -> Iterator[LoopbackServer]:
    srv = LoopbackServer(cogs).start()
    yield srv
    srv.stop()


def assert_one_line_error(res, pattern: str) -> None:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and pattern in lines[0], lines[0]


# -- locations ---------------------------------------------------------------------------
def test_locations_map_onto_gdal_file_systems():
    from terrasynth.data.remote import RemotePath, gdal_name, is_remote, raster_path

    assert gdal_name("https://h.org/a/b.tif") == "/vsicurl/https://h.org/a/b.tif"
    assert gdal_name("s3://bucket/key/b.tif") == "/vsis3/bucket/key/b.tif"
    assert gdal_name("/vsicurl/https://h.org/b.tif") == "/vsicurl/https://h.org/b.tif"
    assert gdal_name("local/b.tif") == "local/b.tif"
    for remote in ("https://h.org/b.tif?x=1", "s3://b/k.tif", "/vsis3/b/k.tif", "HTTP://h/x"):
        assert is_remote(remote)
    assert not is_remote("/data/b.tif") and not is_remote(Path("b.tif"))
    p = raster_path("https://h.org/dir/b.tif?sig=abc")
    assert isinstance(p, RemotePath) and str(p) == "https://h.org/dir/b.tif?sig=abc"
    assert (p.name, p.stem, p.suffix) == ("b.tif", "b", ".tif")
    assert isinstance(raster_path("b.tif"), Path)


def test_remote_settings_hold_only_inside_the_reads():
    from terrasynth.data.remote import raster_env

    get = rasterio.env.get_gdal_config
    before = get("GDAL_DISABLE_READDIR_ON_OPEN")
    with raster_env("https://h.org/b.tif"):
        assert get("GDAL_DISABLE_READDIR_ON_OPEN") == "EMPTY_DIR"
        assert get("CPL_VSIL_CURL_ALLOWED_EXTENSIONS") == ".tif"
        assert int(get("GDAL_HTTP_MAX_RETRY")) >= 1
    assert get("GDAL_DISABLE_READDIR_ON_OPEN") == before  # not set process-wide
    with raster_env("local.tif"):
        assert get("GDAL_DISABLE_READDIR_ON_OPEN") == before


# -- a large COG on loopback ---------------------------------------------------------------
@pytest.mark.needs_data
def test_a_window_of_a_4096_px_cog_reads_under_a_tenth_of_it(server, cogs, tmp_path):
    """The CLI generates from a small window of the served 4096 x 4096 COG, transferring
    less than 10 % of its bytes; the outputs lie on the window's grid."""
    name = "s2_4096.tif"
    size = (cogs / name).stat().st_size
    server.sent.clear()
    out = tmp_path / "out"
    window = ",".join(map(str, WINDOW))
    res = run_cli(
        "generate", "-i", f"s2l2a:B02,B03,B04,B08={server.url(name)}", *SCALING, "-t", "dem",
        "-n", "1", "--steps", "2", "--window", window, "-o", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    sent = server.sent[name]
    print(f"4096 px COG: {sent} of {size} bytes sent ({100 * sent / size:.2f} %)")
    assert 0 < sent < 0.10 * size
    with rasterio.open(out / "dem_sample0.tif") as dem, rasterio.open(cogs / name) as src:
        assert (dem.width, dem.height) == WINDOW[2:]
        win = rasterio.windows.Window(*WINDOW)
        assert dem.transform == src.window_transform(win) and dem.crs == src.crs
        assert np.isfinite(dem.read(1)).all()


@pytest.mark.needs_data
def test_the_whole_scene_engine_reads_a_window_of_a_url(server, cogs, tmp_path):
    """--stream on a URL with --bbox: the decimated value check and the tiles read only the
    part under the box."""
    from rasterio.warp import transform_bounds

    name = "s2_4096.tif"
    with rasterio.open(cogs / name) as src:
        win = rasterio.windows.Window(*WINDOW)
        box = transform_bounds(src.crs, "EPSG:4326", *rasterio.windows.bounds(win, src.transform))
    server.sent.clear()
    out = tmp_path / "scene"
    res = run_cli(
        "generate", "-i", f"s2l2a={server.url(name)}", *SCALING, "-t", "dem", "-n", "1",
        "--steps", "1", "--stream", "--bbox", ",".join(f"{v:.6f}" for v in box),
        "-o", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert 0 < server.sent[name] < 0.10 * (cogs / name).stat().st_size
    with rasterio.open(out / "dem_sample0.tif") as dem:
        # the degree box covers the window, widened to whole pixels of the file
        assert WINDOW[2] <= dem.width <= WINDOW[2] + 12
        assert WINDOW[3] <= dem.height <= WINDOW[3] + 12
    assert not (tmp_path / "scene.work").exists()


@pytest.mark.needs_data
def test_the_same_samples_from_the_file_and_its_url(server, cogs, one_torch_thread):
    from terrasynth.pipeline import Pipeline

    pipe = Pipeline.from_pretrained()
    kw = dict(
        targets=["dem", "s1grd"], num_samples=2, seed=3, steps=2, window=WINDOW,
        scaling={"s2l2a": (1e-4, -0.1)},
    )  # fmt: skip
    local = pipe.generate({"s2l2a": str(cogs / "s2_4096.tif")}, **kw)
    for url in (server.url("s2_4096.tif"), "/vsicurl/" + server.url("s2_4096.tif")):
        remote = pipe.generate({"s2l2a": url}, **kw)
        assert remote.grid == local.grid
        for t in ("dem", "s1grd"):
            assert np.array_equal(remote[t].samples, local[t].samples, equal_nan=True)
        assert remote.info["inputs"] == [["s2l2a", url]]


@pytest.mark.needs_data
def test_s3_locations_read_through_gdal(server, cogs, monkeypatch, one_torch_thread):
    """s3://bucket/key (and /vsis3/) through GDAL's S3 client against the loopback server
    standing in for an S3 endpoint (path-style, unsigned): the same samples as the file."""
    from terrasynth.pipeline import Pipeline

    endpoint = server.url("").removeprefix("http://").rstrip("/")
    for key, value in {
        "AWS_S3_ENDPOINT": endpoint, "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
        "AWS_NO_SIGN_REQUEST": "YES",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    pipe = Pipeline.from_pretrained()
    kw = dict(
        targets=["dem"], num_samples=1, seed=1, steps=1, window=WINDOW,
        scaling={"s2l2a": (1e-4, -0.1)},
    )  # fmt: skip
    local = pipe.generate({"s2l2a": str(cogs / "s2_4096.tif")}, **kw)
    server.sent.clear()
    for location in ("s3://bucket/s2_4096.tif", "/vsis3/bucket/s2_4096.tif"):
        remote = pipe.generate({"s2l2a": location}, **kw)
        assert np.array_equal(remote["dem"].samples, local["dem"].samples, equal_nan=True)
    # read from the "bucket" (the second time from GDAL's cache of the same object)
    assert server.sent["bucket/s2_4096.tif"] > 0


@pytest.mark.needs_data
def test_data_build_takes_a_url(server, tmp_path):
    from terrasynth.data.build import build_store
    from terrasynth.data.store import ChipStore
    from terrasynth.modalities import default_registry

    url = server.url("dolomites.tif")
    report = build_store(
        [], tmp_path / "store", default_registry(), inputs=[("s2l2a", url)],
        scaling={"s2l2a": (1e-4, -0.1)},
    )  # fmt: skip
    assert report.chips > 100
    assert "s2l2a" in ChipStore.open(tmp_path / "store").summary()["modalities"]


@pytest.mark.needs_data
def test_a_missing_url_is_one_error_line_and_leaves_nothing(server, tmp_path):
    out = tmp_path / "out"
    res = run_cli(
        "generate", "-i", f"s2l2a={server.url('missing.tif')}", "-t", "dem", "-o", str(out)
    )
    assert_one_line_error(res, "missing.tif: cannot open the remote raster: HTTP 404 (not found)")
    assert res.returncode == 2 and not out.exists()
    assert not any(tmp_path.iterdir())


def test_an_unreachable_server_is_one_error_line(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    res = run_cli(
        "generate", "-i", f"s2l2a=http://127.0.0.1:{port}/x.tif", "-t", "dem", "-o", str(out)
    )
    assert_one_line_error(res, f"http://127.0.0.1:{port}/x.tif: cannot open the remote raster")
    assert not out.exists()


def test_window_and_bbox_values_are_checked():
    res = run_cli("generate", "-t", "dem", "-o", "x", "--window", "1,2,0,4")
    assert_one_line_error(res, "--window must be COL,ROW,WIDTH,HEIGHT")
    res = run_cli("generate", "-t", "dem", "-o", "x", "--bbox", "12,47,11,46")
    assert_one_line_error(res, "must be W,S,E,N with -180 <= W < E <= 180")


# -- devices -----------------------------------------------------------------------------
def test_device_names_resolve_or_are_refused():
    from terrasynth.devices import resolve_device
    from terrasynth.errors import TerrasynthError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(TerrasynthError, match="device must be cpu, cuda, cuda:N, mps or auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TerrasynthError, match="no CUDA device is available"):
            resolve_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal of a missing CUDA device")
@pytest.mark.parametrize("command", ["generate", "evaluate", "train"])
def test_a_missing_cuda_device_is_one_error_line(command, tmp_path):
    args = {
        "generate": ["-t", "dem"],
        "evaluate": ["-d", str(tmp_path / "store")],
        "train": ["-d", str(tmp_path / "store")],
    }[command]
    res = run_cli(command, *args, "-o", str(tmp_path / "out"), "--device", "cuda")
    assert_one_line_error(res, "--device: device 'cuda': no CUDA device is available")
    assert res.returncode == 2 and not any(tmp_path.iterdir())


@pytest.mark.needs_data
def test_pipeline_to_cpu_gives_the_same_samples(cogs, one_torch_thread):
    from terrasynth.pipeline import Pipeline

    kw = dict(targets=["dem"], num_samples=1, seed=0, steps=1, window=WINDOW)
    inputs = {"s2l2a": str(cogs / "s2_4096.tif")}
    pipe = Pipeline.from_pretrained()
    first = pipe.generate(inputs, scaling={"s2l2a": (1e-4, -0.1)}, **kw)
    moved = pipe.to("cpu")
    assert moved is pipe and pipe.device == torch.device("cpu")
    again = pipe.generate(inputs, scaling={"s2l2a": (1e-4, -0.1)}, **kw)
    assert np.array_equal(first["dem"].samples, again["dem"].samples)
    assert again.info["device"] == "cpu"


@pytest.mark.needs_data
def test_a_window_of_an_array_input_is_that_of_its_file(one_torch_thread):
    from terrasynth.arrays import GeoArray
    from terrasynth.pipeline import Pipeline

    with rasterio.open(S2) as src:
        array = GeoArray(src.read(), src.transform, src.crs, src.nodata, src.descriptions)
    pipe = Pipeline.from_pretrained()
    kw = dict(
        targets=["dem"], num_samples=1, seed=2, steps=1, window=(300, 200, 64, 72),
        scaling={"s2l2a": (1e-4, -0.1)},
    )  # fmt: skip
    from_file = pipe.generate({"s2l2a": str(S2)}, **kw)
    from_array = pipe.generate({"s2l2a": array}, **kw)
    assert from_file.grid == from_array.grid and from_file.grid.width == 64
    assert np.array_equal(from_file["dem"].samples, from_array["dem"].samples, equal_nan=True)
