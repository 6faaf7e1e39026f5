"""Embedding whole scenes: wall time and peak memory against scene size (flat in the size).

    python bench/embed_memory.py [--sides 512 1024 2048 4096] [-m MODEL] [--tile 256]

Input: a real Sentinel-1 VV/VH mosaic of each side (``bench/s1_mosaic.py``: 256 px pieces
of the shared Sentinel-1 images, 10 m UTM). Task: ``terrasynth embed -i s1grd=MOSAIC -o OUT
--chip-size 64`` (the built-in model unless ``-m``) run as a fresh process; its peak
resident memory is the child's ``ru_maxrss``. Prints one Markdown row per side: input and
output sizes, chips written, peak RSS, seconds and seconds per megapixel.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from memory_flat import measure
from s1_mosaic import make_mosaic

EMBED = """
import resource, subprocess, sys
cmd = [sys.executable, "-m", "terrasynth.cli.main", "embed", "-i", "s1grd=" + {path!r},
       "-o", {out!r}, "--chip-size", "64", "--tile", {tile!r}] + {model!r}
done = subprocess.run(cmd, capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("-m", "--model", default=None, help="model folder (default: built-in)")
    ap.add_argument("--tile", type=int, default=256)
    args = ap.parse_args()
    model = ["-m", args.model] if args.model else []
    import pandas as pd
    import rasterio

    with tempfile.TemporaryDirectory() as tmp:
        print("| side (px) | input (MiB) | embedding.tif | chips | peak RSS (MiB) | seconds "
              "| s / Mpx |")  # fmt: skip
        print("|---:|---:|---|---:|---:|---:|---:|")
        for side in args.sides:
            path = make_mosaic(side, Path(tmp) / f"s1_{side}.tif")
            out = Path(tmp) / f"out{side}"
            raw = 2 * 4 * side * side / 2**20  # VV and VH, float32
            code = EMBED.format(path=str(path), out=str(out), tile=str(args.tile), model=model)
            peak, seconds = measure(code)
            with rasterio.open(out / "embedding.tif") as src:
                shape = f"{src.count} x {src.height} x {src.width}"
            chips = len(pd.read_parquet(out / "chips.parquet", columns=["chip_id"]))
            mpx = side * side / 1e6
            print(f"| {side} | {raw:.0f} | {shape} | {chips} | {peak} | {seconds:.0f} "
                  f"| {seconds / mpx:.1f} |", flush=True)  # fmt: skip
            path.unlink()
            for f in out.iterdir():
                f.unlink()
            out.rmdir()


if __name__ == "__main__":
    main()
