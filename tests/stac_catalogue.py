"""A real STAC API on loopback for the tests: rustac's STAC API server (``rustac serve``,
in-memory backend; PyPI ``rustac``, in the ``dev`` extra), searched by pystac-client over
HTTP. Its items point at cloud-optimised GeoTIFFs made here from real SSL4EO-S12 rasters
and served by a small HTTP server with range requests (Python's own ``http.server`` has
none), so GDAL reads them window by window through ``/vsicurl/``. Sentinel-2 L2A comes as
one asset per band (Earth Search's layout: ``eo:bands`` + ``raster:bands`` with scale and
nodata, in EPSG:4326), Sentinel-1 as one two-band asset (STAC 1.1 ``bands``) warped to UTM,
so the fetch reprojects both onto one grid. The ``catalogue`` fixture (``conftest.py``)
starts it once per test session.

stac-fastapi-geoparquet was tried first: its DuckDB client downloads the ``spatial``
extension at start-up, which needs the internet.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import rasterio
from conftest import DATA
from loopback import LoopbackServer

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


def free_port() -> int:
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


@contextlib.contextmanager
def running_catalogue(root: Path) -> Iterator[tuple[str, dict[str, int]]]:
    """(STAC API URL, request counts of the COG server), both on 127.0.0.1, with the files
    under ``root``; stopped on leaving."""
    cogs = root / "cogs"
    cogs.mkdir()
    s2_items, s1_items = _make_cogs(cogs)
    files = LoopbackServer(cogs).start()
    base = files.url("")
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
    port = free_port()
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
        yield url, files.requests
    finally:
        server.terminate()
        server.wait(10)
        files.stop()
