"""Seams of window-by-window generation: shared noise field against independent tiles.

    python bench/seams.py [-m MODEL] [--side 256] [--steps 8]

Input: the 10 m bands (B02, B03, B04, B08) of a real Sentinel-2 L2A scene from the shared
Major TOM sample (UTM, 10 m, so the working grid is the input's grid and window borders sit
on known pixel columns), cropped to ``side`` px. Targets: elevation and Sentinel-1 (VV dB),
one sample, deterministic sampler, the built-in model; and Sentinel-1 -> Sentinel-2 L2A on a
real Sentinel-1 mosaic (``bench/s1_mosaic.py``) of the same size. Prints the seam ratio
(``terrasynth.evaluation.seams``: gradient energy across window borders over the energy
elsewhere; about 1 means no visible seam) for each method, and the time: against all
other pixel pairs, and against the patch edges that are not window borders (the model's
own 8 px patch grid, on which window borders lie).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import rasterio
from rasterio.windows import Window
from s1_mosaic import make_mosaic

from terrasynth.evaluation.seams import scene_seams
from terrasynth.pipeline import Pipeline

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCENE = next((DATA / "majortom_core" / "S2L2A" / "0U" / "0U_199R").iterdir())
BANDS = ("B02", "B03", "B04", "B08")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("-m", "--model", default=None, help="model folder (default: built in)")
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained(args.model)
    size, stride = pipe.model.config.window_size, pipe.model.config.stride
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for b in BANDS:
            out = Path(tmp) / f"{b}.tif"
            with rasterio.open(SCENE / f"{b}.tif") as src:
                win = Window(200, 200, args.side, args.side)
                profile = src.profile | {
                    "width": args.side, "height": args.side,
                    "transform": src.window_transform(win),
                }  # fmt: skip
                with rasterio.open(out, "w", **profile) as dst:
                    dst.write(src.read(window=win))
            inputs.append((f"s2l2a:{b}", out))
        print(
            f"input {SCENE.name} bands {', '.join(BANDS)}, {args.side} px at 10 m; "
            f"window {size} px, stride {stride}; {args.steps} steps, 1 sample"
        )
        print("| method | target | seam ratio (all other lines) | seam ratio (patch edges) | s |")
        print("|---|---|---:|---:|---:|")
        rows = scene_seams(
            pipe, inputs, ["dem", "s1grd"], seed=0, steps=args.steps,
            scaling={"s2l2a": (1e-4, -0.1)},
        )  # fmt: skip
        s1 = make_mosaic(256 * -(-args.side // 256), Path(tmp) / "s1.tif")
        rows += scene_seams(pipe, [("s1grd", str(s1))], ["s2l2a"], seed=0, steps=args.steps)
        for r in rows:
            print(
                f"| {r['method']} | {r['target']} | {r['seam_ratio']:.3f} | "
                f"{r['seam_ratio_vs_patch_edges']:.3f} | {r['seconds']:.1f} |"
            )


if __name__ == "__main__":
    main()
