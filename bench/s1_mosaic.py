"""A large real Sentinel-1 scene for whole-scene benchmarks, mosaicked from the shared data.

    python bench/s1_mosaic.py --side 4096 -o s1_4096.tif

No shared source holds a 4096 px Sentinel-1 scene, so this one is a mosaic of 256 px pieces
of every real Sentinel-1 GRD image in ``../shared/data`` with VV and VH in dB: SSL4EO-S12
(2 dates), MultiEarth Amazon (4 dates, 10 m), the Myanmar time series (98 dates, 30 m, dB x
100) and Peru (30 m). Each image is warped to 10 m in its own UTM zone; pieces are placed
in a seeded random order, each under one of the 8 flips/rotations, on a 10 m grid in the
MultiEarth scene's UTM zone. Pixel values are real backscatter; the layout is not a real
place (piece borders are visible in the input). Written tile by tile (memory: one piece).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PIECE = 256


def _utm_of(src) -> CRS:
    from rasterio.warp import transform_bounds

    left, bottom, right, top = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    lon, lat = (left + right) / 2, (bottom + top) / 2
    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def _at_10m(src, crs: CRS | None = None) -> WarpedVRT:
    """``src`` warped to a 10 m grid in ``crs`` (default: its own CRS if projected, else UTM)."""
    from rasterio.warp import calculate_default_transform

    crs = crs or (src.crs if src.crs.is_projected else _utm_of(src))
    transform, width, height = calculate_default_transform(
        src.crs, crs, src.width, src.height, *src.bounds, resolution=10.0
    )
    return WarpedVRT(
        src, crs=crs, transform=transform, width=width, height=height,
        resampling=Resampling.bilinear,
    )  # fmt: skip


def _pairs(path: Path, scale: float = 1.0) -> list[np.ndarray]:
    """(2, h, w) VV/VH dB arrays of every date of one file, warped to 10 m UTM."""
    with rasterio.open(path) as src, _at_10m(src) as vrt:
        arr = vrt.read().astype(np.float32) * scale
        nodata = vrt.nodata
    if nodata is not None:
        arr[arr == nodata * scale] = np.nan
    arr[(arr < -60) | (arr > 35)] = np.nan  # fill values (-327.68 dB in the Myanmar series)
    pairs = [arr[i : i + 2] for i in range(0, arr.shape[0] - 1, 2)]
    return [p for p in pairs if p.shape[1] >= PIECE and p.shape[2] >= PIECE]


def pieces() -> list[np.ndarray]:
    """Every 256 px VV/VH piece the shared data gives (top-left crop of each date)."""
    out = []
    ssl = DATA / "ssl4eo_s12" / "s1" / "0000200"
    for folder in sorted(ssl.iterdir()):
        vv, vh = _pairs(folder / "VV.tif"), _pairs(folder / "VH.tif")
        if not vv:  # single-band files: read both and pair them
            with rasterio.open(folder / "VV.tif") as a:
                crs = _utm_of(a)
            arrs = []
            for b in ("VV", "VH"):
                with (
                    rasterio.open(folder / f"{b}.tif") as src,
                    WarpedVRT(src, crs=crs, resolution=10.0, resampling=Resampling.bilinear) as vrt,
                ):
                    arrs.append(vrt.read(1).astype(np.float32))
            out.append(np.stack(arrs))
        else:
            out += [np.concatenate([a[:1], b[:1]]) for a, b in zip(vv, vh, strict=False)]
    multi = next((DATA / "multiearth_s1_s2_landsat8_amazon").glob("*S1_VV_VH*.tif"))
    out += _pairs(multi)
    out += _pairs(
        DATA / "s1_timeseries_myanmar_srtm" / "s1_grd_vv_vh_timeseries_2014_2018_dBx100.tif", 0.01
    )
    with (
        rasterio.open(DATA / "s1_landsat8sr_peru" / "S1_2018_VV_VH_ratio.tif") as src,
        WarpedVRT(src, resolution=10.0, resampling=Resampling.bilinear) as vrt,
    ):
        out.append(vrt.read([1, 2]).astype(np.float32))
    crops = []
    for p in out:
        c = p[:, :PIECE, :PIECE]
        if c.shape[1:] == (PIECE, PIECE) and np.isfinite(c).mean() > 0.99:
            crops.append(np.nan_to_num(c, nan=float(np.nanmedian(c))))
    return crops


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    a = np.rot90(a, k % 4, axes=(1, 2))
    return a[:, :, ::-1] if k >= 4 else a


def make_mosaic(side: int, path: Path, seed: int = 0) -> Path:
    """Write a ``side`` x ``side`` px VV/VH mosaic (10 m, UTM) to ``path``; returns it."""
    if side % PIECE:
        raise ValueError(f"side must be a multiple of {PIECE}")
    parts = pieces()
    rng = np.random.default_rng(seed)
    multi = next((DATA / "multiearth_s1_s2_landsat8_amazon").glob("*S1_VV_VH*.tif"))
    with rasterio.open(multi) as src:
        crs, origin = src.crs, (src.transform.c, src.transform.f)
    profile = dict(
        driver="GTiff", width=side, height=side, count=2, dtype="float32", crs=crs,
        transform=Affine(10.0, 0, origin[0], 0, -10.0, origin[1]), tiled=True,
        blockxsize=PIECE, blockysize=PIECE, compress="deflate", nodata=np.nan,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.set_band_description(1, "VV")
        dst.set_band_description(2, "VH")
        for r in range(0, side, PIECE):
            for c in range(0, side, PIECE):
                piece = parts[int(rng.integers(len(parts)))]
                arr = _dihedral(piece, int(rng.integers(8)))
                dst.write(np.ascontiguousarray(arr), window=Window(c, r, PIECE, PIECE))
    tmp.replace(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    print(f"{len(pieces())} real 256 px pieces")
    print(make_mosaic(args.side, args.output))


if __name__ == "__main__":
    main()
