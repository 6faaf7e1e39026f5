"""Whole-scene generation: time and peak memory against scene area and worker count.

    python bench/large_scene.py [--sides 1024 2048 4096] [--workers 1 2] [--steps 8]

Input: a real Sentinel-1 mosaic (``bench/s1_mosaic.py``: 256 px pieces of every shared
Sentinel-1 image, 10 m UTM) of each side; task: S1 -> S2 L2A, 1 sample, the built-in model,
``terrasynth generate --stream`` run as a fresh process (``--workers 1``: this process's
engine; ``N`` > 1: a local Dask cluster of N one-thread workers). Peak memory is the largest
sum of the resident memory of the run's whole process tree (polled every 0.2 s from
``/proc``, so Linux only). Prints one Markdown row per run and a fit of seconds per km² so
that 10k² and 100k² px can be extrapolated.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s1_mosaic import make_mosaic

PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = pages * PAGE
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak tree RSS (bytes) and output of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return time.perf_counter() - t0, peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sides", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="Keep inputs and outputs in this folder.")
    args = ap.parse_args()
    exe = shutil.which("terrasynth") or str(Path(sys.executable).parent / "terrasynth")
    root = args.keep or Path(tempfile.mkdtemp(prefix="large_scene_"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"S1 -> S2 L2A, {args.samples} sample(s), {args.steps} steps, built-in model, "
        f"{os.cpu_count()} CPU cores"
    )
    print("| side (px) | area (km²) | workers | seconds | s/km² | peak memory (GiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    fits = []
    for side in args.sides:
        s1 = make_mosaic(side, root / f"s1_{side}.tif")
        area = side * side * 100 / 1e6
        for workers in args.workers:
            out = root / f"s2_{side}_w{workers}"
            cmd = [exe, "generate", "-i", f"s1grd={s1}", "-t", "s2l2a", "-o", str(out),
                   "-n", str(args.samples), "--steps", str(args.steps), "--stream"]  # fmt: skip
            if workers > 1:
                cmd += ["--engine", "dask", "--workers", str(workers)]
            seconds, peak, _ = run(cmd)
            fits.append((workers, area, seconds))
            print(
                f"| {side} | {area:.0f} | {workers} | {seconds:.0f} | {seconds / area:.3f} "
                f"| {peak / 2**30:.2f} |",
                flush=True,
            )
            if args.keep is None:
                shutil.rmtree(out, ignore_errors=True)
    for workers in args.workers:
        rows = [(a, s) for w, a, s in fits if w == workers]
        if not rows:
            continue
        rate = sum(s for _, s in rows) / sum(a for a, _ in rows)
        print(
            f"workers {workers}: {rate:.3f} s/km² over all sizes -> 10k² px (10,000 km² at "
            f"10 m): {rate * 1e4 / 3600:.1f} h; 100k² px (10⁶ km²): {rate * 1e6 / 3600:.0f} h "
            "on this machine"
        )
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
