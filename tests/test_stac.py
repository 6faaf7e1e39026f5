"""STAC search -> store -> generate, end to end against a real STAC API on loopback.

The catalogue is rustac's STAC API server (``rustac serve``, in-memory backend; PyPI
``rustac``, in the ``dev`` extra): a real server, searched by pystac-client over HTTP. Its
items point at cloud-optimised GeoTIFFs made here from real SSL4EO-S12 rasters and served by
a small HTTP server with range requests (Python's own ``http.server`` has none), so GDAL
reads them window by window through ``/vsicurl/``. Sentinel-2 L2A comes as one asset per
band (Earth Search's layout: ``eo:bands`` + ``raster:bands`` with scale and nodata, in
EPSG:4326), Sentinel-1 as one two-band asset (STAC 1.1 ``bands``) warped to UTM, so the fetch
reprojects both onto one grid.

stac-fastapi-geoparquet was tried first: its DuckDB client downloads the ``spatial``
extension at start-up, which needs the internet.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import DATA, run_cli

from terrasynth.errors import TerrasynthError

SSL4EO = DATA / "ssl4eo_s12"
S2_DATES = {
    "20200604": "20200604T054639_20200604T054831_T43RCP",
    "20200813": "20200813T054639_20200813T054952_T43RCP",
}
S1_DATES = {
    "20200607": "S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457",
    "20200903": "S1A_IW_GRDH_1SDV_20200903T131212_20200903T131237_034195_03F8F5_AC1C",
}
# Earth Search's asset keys for Sentinel-2 L2A bands, with the file and eo:bands of each
S2_ASSETS = {
    "coastal": ("B1", "B01", "coastal"), "blue": ("B2", "B02", "blue"),
    "green": ("B3", "B03", "green"), "red": ("B4", "B04", "red"),
    "rededge1": ("B5", "B05", "rededge"), "rededge2": ("B6", "B06", "rededge"),
    "rededge3": ("B7", "B07", "rededge"), "nir": ("B8", "B08", "nir"),
    "nir08": ("B8A", "B8A", "nir08"), "nir09": ("B9", "B09", "nir09"),
    "swir16": ("B11", "B11", "swir16"), "swir22": ("B12", "B12", "swir22"),
}  # fmt: skip
BBOX = "73.296,30.456,73.315,30.472"  # the middle ~1.8 km of the 2.6 km SSL4EO-S12 patch
COG = "image/tiff; application=geotiff; profile=cloud-optimized"

pytestmark = pytest.mark.needs_data


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single-range requests (``Range: bytes=A-B``), as object stores
    serve them; counts whole-file and range requests."""

    counts = {"whole": 0, "range": 0}

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        spec = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not spec.startswith("bytes=") or not path.is_file():
            type(self).counts["whole"] += 1
            return super().do_GET()
        size = path.stat().st_size
        first, _, last = spec[len("bytes=") :].partition("-")
        start = int(first) if first else max(size - int(last), 0)
        end = min(int(last), size - 1) if first and last else size - 1
        type(self).counts["range"] += 1
        with path.open("rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _polygon(bounds) -> dict:
    w, s, e, n = bounds
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def _make_cogs(root: Path) -> tuple[list[dict], list[dict]]:
    """COGs of two S2 L2A and two S1 acquisitions under ``root``; their items (hrefs
    relative to the file server, filled in later)."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    from terrasynth.cog import copy_to_cog

    s2_items, s1_items = [], []
    for day, folder in S2_DATES.items():
        assets = {}
        for key, (stem, name, common) in S2_ASSETS.items():
            dst = root / f"s2_{day}_{name}.tif"
            copy_to_cog(SSL4EO / "s2a/0000200" / folder / f"{stem}.tif", dst)
            assets[key] = {
                "href": dst.name, "type": COG, "roles": ["data"],
                "eo:bands": [{"name": name, "common_name": common}],
                "raster:bands": [{"scale": 0.0001, "offset": 0.0, "nodata": 0}],
            }  # fmt: skip
        assets["thumbnail"] = {"href": "thumb.png", "type": "image/png", "roles": ["thumbnail"]}
        assets["aot"] = {"href": "aot.tif", "type": COG, "roles": ["data"]}  # maps to no band
        with rasterio.open(SSL4EO / "s2a/0000200" / folder / "B2.tif") as f:
            bounds = tuple(f.bounds)
        s2_items.append(
            {
                "id": f"S2_{day}", "collection": "sentinel-2-l2a", "bbox": list(bounds),
                "geometry": _polygon(bounds),
                "properties": {
                    "datetime": f"{day[:4]}-{day[4:6]}-{day[6:]}T05:48:31Z",
                    "platform": "sentinel-2b", "s2:product_type": "S2MSI2A", "proj:epsg": 4326,
                },
                "assets": assets,
            }
        )  # fmt: skip
    for day, folder in S1_DATES.items():
        with rasterio.open(SSL4EO / "s1/0000200" / folder / "VV.tif") as f:
            src_crs, src_t, bounds = f.crs, f.transform, tuple(f.bounds)
            shape = (f.height, f.width)
            t, w, h = calculate_default_transform(
                src_crs, "EPSG:32643", f.width, f.height, *f.bounds, resolution=10
            )
        data = np.full((2, h, w), np.nan, np.float32)
        for i, pol in enumerate(("VV", "VH")):
            with rasterio.open(SSL4EO / "s1/0000200" / folder / f"{pol}.tif") as f:
                band = f.read(1)
            assert band.shape == shape
            reproject(
                band, data[i], src_transform=src_t, src_crs=src_crs, dst_transform=t,
                dst_crs="EPSG:32643", dst_nodata=np.nan, resampling=Resampling.bilinear,
            )  # fmt: skip
        tmp, dst = root / f"s1_{day}.tmp.tif", root / f"s1_{day}.tif"
        with rasterio.open(
            tmp, "w", driver="GTiff", width=w, height=h, count=2, dtype="float32",
            crs="EPSG:32643", transform=t, nodata=np.nan,
        ) as f:  # fmt: skip
            f.write(data)
        copy_to_cog(tmp, dst)
        tmp.unlink()
        s1_items.append(
            {
                "id": f"S1_{day}", "collection": "sentinel-1-grd", "bbox": list(bounds),
                "geometry": _polygon(bounds),
                "properties": {
                    "datetime": f"{day[:4]}-{day[4:6]}-{day[6:]}T01:08:00Z",
                    "constellation": "sentinel-1", "platform": "sentinel-1a",
                    "sar:polarizations": ["VV", "VH"], "sar:instrument_mode": "IW",
                    "proj:code": "EPSG:32643",
                },
                "assets": {
                    "data": {
                        "href": dst.name, "type": COG, "roles": ["data"],
                        "bands": [{"name": "VV"}, {"name": "VH"}],
                    }
                },
            }
        )  # fmt: skip
    return s2_items, s1_items


def _collection(cid: str, items: list[dict]) -> dict:
    w = min(i["bbox"][0] for i in items)
    s = min(i["bbox"][1] for i in items)
    e = max(i["bbox"][2] for i in items)
    n = max(i["bbox"][3] for i in items)
    days = sorted(i["properties"]["datetime"] for i in items)
    return {
        "type": "Collection", "stac_version": "1.1.0", "id": cid, "description": cid,
        "license": "CC-BY-4.0", "links": [],
        "extent": {"spatial": {"bbox": [[w, s, e, n]]},
                   "temporal": {"interval": [[days[0], days[-1]]]}},
    }  # fmt: skip


def _wait(url: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """(STAC API URL, request counts of the COG server): both on 127.0.0.1."""
    root = tmp_path_factory.mktemp("stac")
    cogs = root / "cogs"
    cogs.mkdir()
    s2_items, s1_items = _make_cogs(cogs)
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(cogs)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}/"
    hrefs = []
    for item in s2_items + s1_items:
        item.update(type="Feature", stac_version="1.1.0", links=[])
        item["stac_extensions"] = [
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
        ]
        for asset in item["assets"].values():
            asset["href"] = base + asset["href"]
        hrefs.append(item)
    for cid, items in (("sentinel-2-l2a", s2_items), ("sentinel-1-grd", s1_items)):
        (root / f"{cid}.json").write_text(json.dumps(_collection(cid, items)))
    (root / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": hrefs}))
    port = _free_port()
    exe = shutil.which("rustac", path=os.pathsep.join([str(Path(sys.executable).parent), ""]))
    assert exe, "rustac (the dev extra) is needed for the STAC API server"
    server = subprocess.Popen(
        [exe, "serve", "-a", f"127.0.0.1:{port}", str(root / "sentinel-2-l2a.json"),
         str(root / "sentinel-1-grd.json"), str(root / "items.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait(url)
        yield url, RangeHandler.counts
    finally:
        server.terminate()
        server.wait(10)
        files.shutdown()


def test_fetch_info_generate(catalogue, tmp_path):
    """STAC search -> store (data fetch) -> data info -> generate --stac, through the CLI."""
    url, counts = catalogue
    store = tmp_path / "store"
    args = [
        "--stac", url, "--collections", "sentinel-2-l2a,sentinel-1-grd", "--bbox", BBOX,
        "--datetime", "2020-06-01/2020-09-30",
    ]  # fmt: skip
    r = run_cli("data", "fetch", *args, "-o", str(store))
    assert r.returncode == 0, r.stderr
    assert "4 STAC items, 4 acquisitions on 186 x 181 px of 10 m" in r.stderr
    assert "EPSG:32643" in r.stderr  # S2 in EPSG:4326 reprojected onto S1's UTM grid
    assert "sentinel-2-l2a: aot" in r.stderr  # a raster asset mapping to no band is named
    assert "28 files fetched, 0 already complete" in r.stderr  # 2 x 12 S2 + 2 x 2 S1 bands
    assert counts["whole"] == 0 and counts["range"] > 0  # GDAL read by ranges only
    fetched = store.with_name("store.fetch")
    with rasterio.open(fetched / "s2l2a" / "20200604_B04.tif") as f:
        red = f.read(1)
        assert f.crs.to_epsg() == 32643 and f.res == (10.0, 10.0)
    assert 0.0 < np.nanmedian(red) < 0.3  # DN * 0.0001: reflectance
    assert not list(fetched.rglob("*.part"))

    info = run_cli("data", "info", str(store), "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["chips"] > 0
    assert {"s2l2a", "s1grd"} <= set(summary["modalities"])
    (source,) = summary["sources"].values()
    assert source["dates"]["count"] == 3  # S2 06-04 + S1 06-07 pair; 08-13 and 09-03 alone
    assert source["licence"] == "CC-BY-4.0"

    # a rerun of the same query (another store, same downloads) fetches nothing again
    again = run_cli("data", "fetch", *args, "-o", str(tmp_path / "store2"),
                    "--download-dir", str(fetched))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "0 files fetched, 28 already complete" in again.stderr

    out = tmp_path / "gen"
    gen = run_cli(
        "generate", "--stac", url, "--collections", "sentinel-1-grd", "--bbox", BBOX,
        "--datetime", "2020-06-01/2020-09-30", "-t", "s2l2a", "-n", "2", "--steps", "2",
        "-o", str(out),
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    with (
        rasterio.open(out / "s2l2a_mean.tif") as f,
        rasterio.open(fetched / "s1grd" / "20200607_VV.tif") as s1,
    ):
        assert (f.crs, f.transform, f.shape) == (s1.crs, s1.transform, s1.shape)
        assert f.count == 12
    assert (out.with_name("gen.stac") / "inputs" / "s1grd_20200607.tif").is_file()
    assert not list(out.with_name("gen.stac").rglob("*.part"))


def test_errors(catalogue, tmp_path):
    """Unreachable catalogue, no items, assets that map to no modality: one line each."""
    url, _ = catalogue
    dead = f"http://127.0.0.1:{_free_port()}/"
    common = ["--bbox", BBOX, "-o", str(tmp_path / "s")]
    r = run_cli("data", "fetch", "--stac", dead, "--collections", "sentinel-2-l2a", *common)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: STAC catalogue {dead} is unreachable")
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("data", "fetch", "--stac", url, "--collections", "sentinel-2-l2a",
                "--datetime", "2019-01-01/2019-02-01", *common)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.startswith("error: no STAC items found"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("collections:\n  sentinel-1-grd:\n    modality: dem\n")  # VV, VH: no
    r = run_cli("data", "fetch", "--stac", url, "--collections", "sentinel-1-grd",
                "--mapping", str(mapping), *common)  # fmt: skip
    assert r.returncode == 2
    assert "maps to a registry modality" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.fetch").exists()


def test_mapping_by_metadata():
    """Band names, common names and polarisations find registry bands; a mapping file
    overrides modality, bands and scaling."""
    import pystac

    from terrasynth.data.stac_fetch import map_assets, modality_of
    from terrasynth.modalities import default_registry

    reg = default_registry()
    item = pystac.Item("x", None, None, pystac.utils.str_to_datetime("2020-01-01T00:00:00Z"), {})
    item.collection_id = "sentinel-2-l2a"
    item.properties["platform"] = "sentinel-2a"
    for key, extra in {
        "B4": {"eo:bands": [{"name": "B4"}]},
        "nir": {"eo:bands": [{"common_name": "nir"}], "raster:bands": [{"scale": 2.0}]},
        "rededge1": {},
        "visual": {"roles": ["visual"]},
    }.items():
        roles = extra.pop("roles", ["data"])
        item.add_asset(
            key, pystac.Asset(f"{key}.tif", media_type=COG, roles=roles, extra_fields=extra)
        )
    assert modality_of(item, {}, reg) == "s2l2a"
    bands, unmapped = map_assets(item, reg["s2l2a"], {})
    assert {b: s.href for b, s in bands.items()} == {
        "B04": "B4.tif", "B08": "nir.tif", "B05": "rededge1.tif"
    }  # fmt: skip
    assert bands["B08"].scale == 2.0 and unmapped == []
    mapping = {"sentinel-2-*": {"modality": "s2l1c", "assets": {"B4": "B04"}, "scale": 1e-4}}
    bands, unmapped = map_assets(item, reg["s2l1c"], mapping)
    assert modality_of(item, mapping, reg) == "s2l1c"
    assert list(bands) == ["B04"] and bands["B04"].scale == 1e-4
    assert sorted(unmapped) == ["nir", "rededge1"]


def test_an_interrupted_fetch_resumes(catalogue, tmp_path):
    """Files are complete or absent: a rerun after an interruption fetches only the rest."""
    from terrasynth.data.stac_fetch import Query, fetch, parse_bbox
    from terrasynth.modalities import default_registry

    url, _ = catalogue
    query = Query(url, ("sentinel-2-l2a",), parse_bbox(BBOX), "2020-06-01/2020-06-30")

    def stop_at_five(done: int, total: int, what: str) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(query, tmp_path / "dl", default_registry(), on_file=stop_at_five)
    assert len(list((tmp_path / "dl").rglob("*.tif"))) == 5
    (tmp_path / "dl" / "s2l2a" / "20200604_B12.tif.part").write_bytes(b"cut short")
    result = fetch(query, tmp_path / "dl", default_registry())
    assert (len(result.files), result.skipped) == (12, 5)
    assert not list((tmp_path / "dl").rglob("*.part"))  # the cut-short file was redone
    with rasterio.open(tmp_path / "dl" / "s2l2a" / "20200604_B12.tif") as f:
        assert f.descriptions == ("B12",) and np.isfinite(f.read(1)).mean() > 0.99
    other = Query(url, ("sentinel-2-l2a",), parse_bbox(BBOX), "2020-08-01/2020-08-30")
    with pytest.raises(TerrasynthError, match="holds the files of another STAC query"):
        fetch(other, tmp_path / "dl", default_registry())


def test_without_the_stac_extra_one_line_says_what_to_install(tmp_path):
    code = (
        "import sys\nsys.modules['pystac_client'] = None\n"
        "from terrasynth.cli.main import main\n"
        f"main(['data', 'fetch', '--stac', 'http://127.0.0.1:9/', '--collections', 'x',"
        f" '--bbox', '0,0,1,1', '-o', {str(tmp_path / 's')!r}])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: STAC search: needs the optional package 'pystac_client', which is not "
        "installed: pip install 'terrasynth[stac]'"
    )


def test_a_timeless_collection_joins_every_scene(tmp_path):
    """The description pairs dated modalities by day; a 'timeless' one (a DEM) has no
    dates, so it joins every scene, and never anchors."""
    import yaml

    from terrasynth.data.stac_fetch import Acquisition, write_description

    day = datetime(2020, 6, 4, tzinfo=UTC)
    acqs = [Acquisition("dem", "cop-dem", day, timeless=True), Acquisition("s2l2a", "s2", day)]
    desc = yaml.safe_load(write_description(tmp_path, acqs, "n", "CC0", 5).read_text())
    assert desc["anchor"] == "s2l2a" and desc["pair_tolerance_days"] == 5
    layers = {layer["modality"]: layer for layer in desc["layers"]}
    assert "dates" not in layers["dem"] and layers["s2l2a"]["dates"] == {"from_filename": True}
