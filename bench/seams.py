"""Seams of window-by-window generation: shared noise field against independent tiles.

    python bench/seams.py [--side 256] [--steps 8]

Input: the 10 m bands (B02, B03, B04, B08) of a real Sentinel-2 L2A scene from the shared
Major TOM sample (UTM, 10 m, so the working grid is the input's grid and window borders sit
on known pixel columns), cropped to ``side`` px. Targets: elevation and Sentinel-1 (VV dB),
one sample, deterministic sampler, the built-in model. Prints the seam ratio
(``terrasynth.evaluation.seams``: gradient energy across window borders over the energy
elsewhere; about 1 means no visible seam) for each method, and the time: against all
other pixel pairs, and against the patch edges that are not window borders (the model's
own 8 px patch grid, on which window borders lie).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import rasterio
from rasterio.windows import Window

from terrasynth.evaluation.seams import border_positions, seam_ratio
from terrasynth.pipeline import Pipeline
from terrasynth.sampling.windows import window_offsets

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCENE = next((DATA / "majortom_core" / "S2L2A" / "0U" / "0U_199R").iterdir())
BANDS = ("B02", "B03", "B04", "B08")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    pipe = Pipeline.from_pretrained()
    size = pipe.model.config.image_size
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
            f"window {size} px, stride {size // 2}; {args.steps} steps, 1 sample"
        )
        print("| method | target | seam ratio (all other lines) | seam ratio (patch edges) | s |")
        print("|---|---|---:|---:|---:|")
        for method in ("shared", "independent"):
            t0 = time.perf_counter()
            gen = pipe.generate(
                inputs, ["dem", "s1grd"], num_samples=1, seed=0, steps=args.steps,
                scaling={"s2l2a": (1e-4, -0.1)}, windows=method,
            )  # fmt: skip
            secs = time.perf_counter() - t0
            w = gen.info["working_grid"]
            assert (w["width"], w["height"]) == (args.side, args.side)  # borders on known pixels
            offs = window_offsets(args.side, size, size // 2)
            borders = border_positions(args.side, offs, size)
            patch = pipe.model.config.patch_size
            edges = [i for i in range(patch, args.side, patch) if i not in borders]
            for target in ("dem", "s1grd"):
                img = gen[target].samples[0][:1]
                plain = seam_ratio(img, borders, borders)
                fair = seam_ratio(img, borders, borders, control=edges)
                print(f"| {method} | {target} | {plain:.3f} | {fair:.3f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
