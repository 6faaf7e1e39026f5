"""S1 -> S2 latency on one 224 x 224 tile: seconds per sample, and how it grows with samples.

    python bench/tile_latency.py [-m MODEL] [--samples 1 4 8] [--repeats 3] \
        [--precision float32 auto]

Crops 224 x 224 px of a real Sentinel-1 GeoTIFF of the shared data (SSL4EO-S12, VV and
VH stacked into one file), generates S2 L2A with the model's own sampler (one step for the
convolutional generator, 8 for the transformer) and prints the best of ``--repeats`` wall
times of ``Pipeline.generate`` (reading, sampling, writing to memory), seconds per sample,
and the process's peak resident memory, for each sampling precision (``auto``: bfloat16
convolutions where the CPU runs them natively, ``Pipeline.set_precision``). Timings depend
on other load: run it alone.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import rasterio
import torch
from rasterio.windows import Window

from terrasynth.pipeline import Pipeline

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
S1 = (
    DATA
    / "ssl4eo_s12/s1/0000200/S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457"
)
SIZE = 224


def tile(folder: Path) -> Path:
    """A 224 x 224 two-band (VV, VH) GeoTIFF cut from the SSL4EO-S12 scene."""
    out = folder / "s1_224.tif"
    win = Window(0, 0, SIZE, SIZE)
    with rasterio.open(S1 / "VV.tif") as vv, rasterio.open(S1 / "VH.tif") as vh:
        profile = vv.profile | {
            "count": 2,
            "width": SIZE,
            "height": SIZE,
            "transform": vv.window_transform(win),
        }
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(vv.read(1, window=win), 1)
            dst.write(vh.read(1, window=win), 2)
            dst.descriptions = ("VV", "VH")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, default=None, help="model folder (built-in)")
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["float32", "auto"])
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained(args.model)
    cfg = pipe.model.config
    print(
        f"model {pipe.source}: {cfg.backbone}, {pipe.model.num_parameters() / 1e6:.2f} M "
        f"parameters, window {cfg.image_size} px, {pipe.model.default_steps} step(s); "
        f"torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        s1 = tile(Path(tmp))
        print(f"{'precision':>9} {'samples':>7} {'best s':>8} {'s/sample':>9} {'peak MiB':>9}")
        for precision in args.precision:
            pipe.set_precision(precision)
            pipe.generate({"s1grd": s1}, ["s2l2a"], num_samples=1, seed=0)  # warm-up
            for n in args.samples:
                best = float("inf")
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    pipe.generate({"s1grd": s1}, ["s2l2a"], num_samples=n, seed=r)
                    best = min(best, time.perf_counter() - t0)
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"{pipe.precision:>9} {n:7d} {best:8.3f} {best / n:9.3f} {peak:9.0f}")


if __name__ == "__main__":
    main()
