"""Generation latency: seconds per window per sample per sampling step, and peak memory.

    python bench/generate_latency.py [--model DIR] [--presets tiny small base]

For each preset (an untrained model of that size: latency does not depend on the weights;
``--model`` adds the built-in or a given trained model) and each sampler setting
(deterministic, stochastic, with classifier-free guidance), generates S2 L2A from a real
Sentinel-1 GeoTIFF of the shared data (SSL4EO-S12, 264 x 264 px) and reports:

* s/window/sample/step: wall time of sampling divided by (windows x samples x steps);
* windows/s through the model, and the whole call's time including reading and writing
  to memory on the input grid;
* peak resident memory of the process (ru_maxrss) after each run;
* for the first model, how time and memory grow with scene size: crops of 66, 132 and
  264 px and a 2 x 2 mosaic of the scene (528 px).

Timings depend on other load on the machine: run it alone.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from terrasynth.models.config import preset_config
from terrasynth.models.scene_model import SceneModel
from terrasynth.pipeline import Pipeline, default_model_path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
S1 = (
    DATA
    / "ssl4eo_s12/s1/0000200/S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457"
)
SETTINGS = {
    "deterministic": dict(eta=0.0, guidance=1.0),
    "stochastic": dict(eta=0.5, guidance=1.0),
    "guided x2": dict(eta=0.0, guidance=2.0),
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stacked_input(folder: Path) -> Path:
    """VV and VH in one GeoTIFF (the SSL4EO layout keeps one file per polarisation)."""
    import rasterio

    out = folder / "s1.tif"
    with rasterio.open(S1 / "VV.tif") as vv, rasterio.open(S1 / "VH.tif") as vh:
        profile = vv.profile | {"count": 2}
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(vv.read(1), 1)
            dst.write(vh.read(1), 2)
            dst.descriptions = ("VV", "VH")
    return out


def sized_input(src: Path, folder: Path, side: int) -> Path:
    """A ``side`` px input: a crop of the scene, or a mosaic of it for larger sides."""
    import numpy as np
    import rasterio
    from affine import Affine

    with rasterio.open(src) as f:
        data = f.read()
        profile = f.profile
    reps = -(-side // data.shape[1])
    big = np.tile(data, (1, reps, reps))[:, :side, :side]
    t = profile["transform"]
    profile.update(width=side, height=side, transform=Affine(t.a, t.b, t.c, t.d, t.e, t.f))
    out = folder / f"s1_{side}.tif"
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(big)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=None, help="a trained model to time too")
    ap.add_argument("--presets", nargs="*", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2)
    args = ap.parse_args()
    trained = Pipeline.from_pretrained(args.model or default_model_path())
    base_cfg = trained.model.config
    pipes = {"built-in" if args.model is None else str(args.model): trained}
    for name in args.presets:
        cfg = preset_config(name, base_cfg.modalities, base_cfg.stats)
        pipes[f"{name} (untrained)"] = Pipeline(SceneModel(cfg), source=name)
    with tempfile.TemporaryDirectory() as tmp:
        s1 = stacked_input(Path(tmp))
        print(
            f"input {S1.name} (264 x 264 px, EPSG:4326); {args.samples} samples, "
            f"{args.steps} steps; torch threads {torch.get_num_threads()}"
        )
        print(
            "| model | params | sampler | windows | s/window/sample/step | windows/s "
            "| call s | peak MiB |"
        )
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for label, pipe in pipes.items():
            for setting, kw in SETTINGS.items():
                t0 = time.perf_counter()
                gen = pipe.generate(
                    {"s1grd": s1}, ["s2l2a"], num_samples=args.samples, steps=args.steps,
                    **kw,
                )  # fmt: skip
                secs = time.perf_counter() - t0
                w = gen.info["working_grid"]
                size = pipe.model.config.image_size
                stride = size // 2
                nwin = (max(1, -(-(w["height"] - size) // stride) + 1)) * (
                    max(1, -(-(w["width"] - size) // stride) + 1)
                )
                passes = nwin * args.samples * args.steps * (2 if kw["guidance"] != 1 else 1)
                print(
                    f"| {label} | {pipe.model.num_parameters() / 1e6:.1f} M | {setting} | "
                    f"{nwin} | {secs / (nwin * args.samples * args.steps):.2e} | "
                    f"{passes / secs:.0f} | {secs:.1f} | {peak_mib():.0f} |"
                )
        label, pipe = next(iter(pipes.items()))
        print(f"\nscene size ({label}, deterministic, {args.samples} samples, {args.steps} steps)")
        print("| side px | area km² | call s | s per km² | peak MiB |")
        print("|---:|---:|---:|---:|---:|")
        for side in (66, 132, 264, 528):
            path = sized_input(s1, Path(tmp), side)
            t0 = time.perf_counter()
            gen = pipe.generate(
                {"s1grd": path}, ["s2l2a"], num_samples=args.samples, steps=args.steps
            )
            secs = time.perf_counter() - t0
            w = gen.info["working_grid"]
            km2 = w["width"] * w["height"] * w["gsd_m"] ** 2 / 1e6
            print(f"| {side} | {km2:.2f} | {secs:.1f} | {secs / km2:.2f} | {peak_mib():.0f} |")


if __name__ == "__main__":
    main()
