"""Peak memory against input size: flat for reading and for whole-scene generation.

    python bench/memory_flat.py [--read 512 2048 8192] [--generate 512 1024 2048]

Inputs are real Sentinel-1 VV/VH mosaics (``bench/s1_mosaic.py``: 256 px pieces of the
shared Sentinel-1 images, 10 m UTM) of each side. Each measurement runs in a fresh
process and reports its peak resident memory (``VmHWM``, or ``ru_maxrss`` of the
``terrasynth`` child):

* read: the file is checked from its header (``open_inputs``) and then read tile by tile
  over the whole scene as the whole-scene engine reads it (``read_region``, 256 px tiles);
* generate: ``terrasynth generate -i s1grd=MOSAIC -t s2l2a -n 1 --steps 1 --stream``.

Prints one Markdown row per run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from s1_mosaic import make_mosaic

READ = """
from pathlib import Path
from terrasynth.data.scene import Grid
from terrasynth.modalities import default_registry
from terrasynth.scenes.inputs import open_inputs, read_region

reg = default_registry()
files, _ = open_inputs([("s1grd", {path!r})], reg)
g = files[0].grid
tile = 256
for row in range(0, g.height, tile):
    for col in range(0, g.width, tile):
        w, h = min(tile, g.width - col), min(tile, g.height - row)
        read_region(files, g.window(col, row, w, h), reg)
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM"):
        print(int(line.split()[1]) // 1024)
"""

GENERATE = """
import resource, subprocess, sys
cmd = [sys.executable, "-m", "terrasynth.cli.main", "generate", "-i", "s1grd=" + {path!r},
       "-t", "s2l2a", "-n", "1", "--steps", "1", "--stream", "-o", {out!r}]
done = subprocess.run(cmd, capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
"""


def measure(code: str) -> tuple[int, float]:
    """Peak MiB the snippet prints, and its wall seconds, in a fresh interpreter."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return int(done.stdout.split()[-1]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--read", type=int, nargs="*", default=[512, 2048, 8192])
    ap.add_argument("--generate", type=int, nargs="*", default=[512, 1024, 2048])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("| run | side (px) | input (MiB) | peak RSS (MiB) | seconds |")
        print("|---|---:|---:|---:|---:|")
        for kind, sides in (("read", args.read), ("generate", args.generate)):
            for side in sides:
                path = make_mosaic(side, Path(tmp) / f"s1_{side}.tif")
                raw = 2 * 4 * side * side / 2**20  # VV and VH, float32
                if kind == "read":
                    code = READ.format(path=str(path))
                else:
                    code = GENERATE.format(path=str(path), out=str(Path(tmp) / f"out{side}"))
                peak, seconds = measure(code)
                print(f"| {kind} | {side} | {raw:.0f} | {peak} | {seconds:.0f} |", flush=True)
                path.unlink()


if __name__ == "__main__":
    main()
