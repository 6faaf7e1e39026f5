"""Tile latency of ``terrasynth serve`` on a 4096 x 4096 scene: cold and warm, per zoom.

    python bench/serve_tiles.py [--size 4096] [--warm 20] [--keep DIR] [--scene FILE]

Writes a 4096 x 4096 px, 12-band Sentinel-2 L2A result (float32 reflectance on a 10 m UTM
grid) as the generator writes its outputs: a cloud-optimised GeoTIFF with internal
overviews (``terrasynth.cog``), as ``s2l2a_mean.tif`` and ``s2l2a_sample0.tif`` of a finished
job of a fresh app. The values are a smooth random field, not a model's output (a model's
4096 px scene takes long to sample on 2 CPU cores; what a tile costs depends on the file's
layout, not on its values). Then it requests 256 x 256 PNG tiles through the app's own tile
endpoint (Starlette's test client: routing, reading by rio-tiler, stretch, PNG encoding):

* cold: the first tile of a new app process state (no stretch statistics computed, no file
  opened yet; the file itself may still be in the OS page cache, since it was just written);
* warm: ``--warm`` further tiles at the same zoom (other tiles, same file), median and max.

at the native zoom (one tile pixel about one scene pixel), two levels out (overviews) and
at the zoom where the whole scene is about one tile. Target: under 0.3 s a tile.

``--scene FILE``: time the tiles of a scene the model generated instead (an output GeoTIFF
of ``terrasynth generate``, e.g. ``s2l2a_mean.tif`` of a whole-scene run), copied into the
fake job; its modality is read from the file's tags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.warp import transform_bounds
from scipy.ndimage import zoom

from terrasynth.cog import copy_to_cog
from terrasynth.modalities import default_registry

CRS = "EPSG:32632"
ORIGIN = (700000.0, 5160000.0)  # the Dolomites, 10 m UTM 32N
ROWS = 512  # rows written per block


def write_scene(folder: Path, size: int) -> Path:
    """A ``size`` x ``size`` 12-band reflectance COG with overviews; returns its path."""
    bands = default_registry()["s2l2a"].bands
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0.02, 0.35, (len(bands), size // 64 + 2, size // 64 + 2))
    tiled = folder / "scene.tif"
    profile = dict(driver="GTiff", width=size, height=size, count=len(bands), dtype="float32",
                   crs=CRS, transform=Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]),
                   tiled=True, blockxsize=256, blockysize=256, nodata=np.nan,
                   compress="deflate", predictor=3, BIGTIFF="IF_SAFER")  # fmt: skip
    with rasterio.open(tiled, "w", **profile) as dst:
        for row in range(0, size, ROWS):
            # the smooth field for these rows: the coarse grid zoomed 64x, cut to the block
            c0 = row // 64
            part = zoom(coarse[:, c0 : c0 + ROWS // 64 + 2, :], (1, 64, 64), order=1)
            block = part[:, :ROWS, :size] + rng.normal(0, 0.01, (len(bands), ROWS, size))
            dst.write(block.astype(np.float32), window=((row, row + ROWS), (0, size)))
        dst.descriptions = bands
        dst.update_tags(modality="s2l2a", units="reflectance", generator="terrasynth")
        dst.build_overviews([2, 4, 8, 16], rasterio.enums.Resampling.average)
    out = copy_to_cog(tiled, folder / "s2l2a_mean.tif")
    tiled.unlink()
    return out


def fake_job(workdir: Path, scene: Path, modality: str = "s2l2a") -> str:
    """A finished job of the app whose outputs are ``scene`` (mean and sample 0)."""
    from terrasynth.serve.inputs import new_id
    from terrasynth.serve.jobs import write_json

    job_id = new_id()
    output = workdir / "jobs" / job_id / "output"
    output.mkdir(parents=True)
    os.replace(scene, output / f"{modality}_mean.tif")
    os.link(output / f"{modality}_mean.tif", output / f"{modality}_sample0.tif")
    job = {"id": job_id, "targets": [modality], "inputs": [], "num_samples": 1, "steps": None,
           "seed": 0, "model": None}  # fmt: skip
    write_json(output.parent / "job.json", job)
    files = [f"{modality}_mean.tif", f"{modality}_sample0.tif"]
    write_json(output.parent / "state.json", {"status": "done", "files": files})
    return job_id


def tiles_at(bounds: tuple[float, float, float, float], z: int) -> list[tuple[int, int]]:
    """The x, y of the web-mercator tiles at zoom ``z`` that cover lon/lat ``bounds``."""
    west, south, east, north = bounds

    def xy(lon: float, lat: float) -> tuple[int, int]:
        n = 2**z
        x = int((lon + 180) / 360 * n)
        y = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)
        return x, y

    x0, y0 = xy(west, north)
    x1, y1 = xy(east, south)
    return [(x, y) for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--warm", type=int, default=20, help="warm tiles per zoom")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--scene", type=Path, help="a generated GeoTIFF to serve instead")
    args = parser.parse_args()
    from starlette.testclient import TestClient

    from terrasynth.serve.app import ServeConfig, create_app

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if args.scene is not None:  # a generated scene: copied, its modality from its tags
            scene = workdir / "scene.tif"
            shutil.copyfile(args.scene, scene)
        else:
            scene = write_scene(workdir, args.size)
        written = time.perf_counter() - t0
        with rasterio.open(scene) as f:
            bounds = transform_bounds(f.crs, "EPSG:4326", *f.bounds)
            overviews = f.overviews(1)
            args.size, count, dtype = f.width, f.count, f.dtypes[0]
            modality = f.tags().get("modality", "s2l2a")
            res_m = abs(f.transform.a)
        size_mb = scene.stat().st_size / 2**20
        job_id = fake_job(workdir, scene, modality)
        # native zoom: a tile pixel about a scene pixel (10 m) at this latitude
        lat = (bounds[1] + bounds[3]) / 2
        native = round(math.log2(40075016.686 * math.cos(math.radians(lat)) / (256 * res_m)))
        whole = native - round(math.log2(args.size / 256))
        results = {}
        with TestClient(create_app(ServeConfig(workdir))) as client:
            for z in (native, native - 2, whole):
                xy = tiles_at(bounds, z)
                inner = xy[len(xy) // 2 :] + xy[: len(xy) // 2]  # start inside the scene
                times = []
                for x, y in inner[: args.warm + 1]:
                    t = time.perf_counter()
                    res = client.get(f"/api/jobs/{job_id}/tiles/{modality}_mean/{z}/{x}/{y}.png")
                    times.append(time.perf_counter() - t)
                    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
                warm = times[1:] or times
                results[z] = {
                    "cold_s": round(times[0], 3),
                    "warm_median_s": round(statistics.median(warm), 3),
                    "warm_max_s": round(max(warm), 3),
                    "warm_tiles": len(warm),
                }
    what = f"generated {modality}, {args.scene}" if args.scene else "smooth random field"
    print(f"scene ({what}): {args.size} x {args.size} px x {count} bands {dtype} COG, "
          f"{size_mb:.0f} MiB, overviews {overviews}, ready in {written:.1f} s")  # fmt: skip
    print(f"{'zoom':>4} {'cold s':>7} {'warm median s':>14} {'warm max s':>11} {'tiles':>6}")
    for z, r in results.items():
        print(f"{z:>4} {r['cold_s']:>7.3f} {r['warm_median_s']:>14.3f} {r['warm_max_s']:>11.3f} "
              f"{r['warm_tiles']:>6}")  # fmt: skip
    print(json.dumps({"size": args.size, "zooms": results}))


if __name__ == "__main__":
    main()
