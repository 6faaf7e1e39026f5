"""Resolution cascade against single-level generation, scored against the real image.

    python bench/cascade.py [--side 256] [--samples 4] [--steps 8]

Input: a real Sentinel-1 scene (SSL4EO-S12 location 0000200, 2020-06-07, VV/VH dB) warped to
10 m UTM; reference: the Sentinel-2 L2A acquisition of the same place three days earlier
(2020-06-04). Generates S2 L2A with the built-in model through the whole-scene engine, once
in one level and once as a cascade (first at 20 m or 40 m, then 10 m starting from the
up-sampled coarse result at noise level ``--start``), and prints per run the MAE of the
sample mean (10 m bands, reflectance) against the real image, the mean per-pixel spread of
the samples, the seam ratio of the first sample and the time. This location is part of
the model's training data (its chips are in the store's train split), so the scores
compare the two ways of sampling, not held-out skill.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.warp import Resampling, reproject

from terrasynth.evaluation.seams import border_positions, seam_ratio
from terrasynth.pipeline import Pipeline
from terrasynth.sampling.windows import window_offsets
from terrasynth.scenes.engine import generate_scene
from terrasynth.scenes.job import JobSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ssl4eo_s12"
S1 = DATA / "s1/0000200/S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457"
S2 = DATA / "s2a/0000200/20200604T054639_20200604T054831_T43RCP"
CRS, ORIGIN = "EPSG:32643", (336030.0, 3372750.0)


def warp(files: list[Path], side: int, scale: float = 1.0) -> np.ndarray:
    transform = Affine(10.0, 0, ORIGIN[0], 0, -10.0, ORIGIN[1])
    out = np.full((len(files), side, side), np.nan, np.float32)
    for i, f in enumerate(files):
        with rasterio.open(f) as src:
            reproject(
                src.read(1).astype(np.float32) * scale, out[i], src_transform=src.transform,
                src_crs=src.crs, dst_transform=transform, dst_crs=CRS, dst_nodata=np.nan,
                resampling=Resampling.bilinear,
            )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--start", type=float, default=0.6)
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained()
    s1 = warp([S1 / "VV.tif", S1 / "VH.tif"], args.side)
    real = warp([S2 / f"{b}.tif" for b in ("B2", "B3", "B4", "B8")], args.side, 1e-4)
    ok = np.isfinite(real).all(0) & np.isfinite(s1).all(0)
    size = pipe.model.config.image_size
    borders = border_positions(args.side, window_offsets(args.side, size, size // 2), size)
    print(f"S1 -> S2 L2A, {args.side} px at 10 m, {args.samples} samples, {args.steps} steps")
    print("| levels | MAE of mean (10 m bands) | spread (std) | seam ratio | seconds |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s1.tif"
        profile = dict(driver="GTiff", width=args.side, height=args.side, count=2,
                       dtype="float32", crs=CRS, nodata=np.nan,
                       transform=Affine(10.0, 0, ORIGIN[0], 0, -10.0, ORIGIN[1]))  # fmt: skip
        with rasterio.open(path, "w", **profile) as f:
            f.write(s1)
            f.descriptions = ("VV", "VH")
        for cascade in (None, 20.0, 40.0):
            spec = JobSpec(
                inputs=[("s1grd", str(path))], targets=["s2l2a"], num_samples=args.samples,
                steps=args.steps, seed=0, cascade=cascade, cascade_start=args.start,
            )  # fmt: skip
            out = Path(tmp) / f"out_{cascade}"
            t0 = time.perf_counter()
            generate_scene(pipe, spec, out)
            secs = time.perf_counter() - t0
            with rasterio.open(out / "s2l2a_mean.tif") as f:
                mean = f.read([1, 2, 3, 4])
            with rasterio.open(out / "s2l2a_std.tif") as f:
                std = f.read([1, 2, 3, 4])
            with rasterio.open(out / "s2l2a_sample0.tif") as f:
                first = f.read(1)
            mae = float(np.abs(mean - real)[:, ok].mean())
            label = "10 m" if cascade is None else f"{cascade:g} m -> 10 m (start {args.start})"
            print(
                f"| {label} | {mae:.4f} | {float(std[:, ok].mean()):.4f} | "
                f"{seam_ratio(first, borders, borders):.3f} | {secs:.1f} |"
            )


if __name__ == "__main__":
    main()
