"""Build time, chips/s and peak memory of `data build`, per source and for all together.

Each build runs in its own process so its peak resident memory is its own.

    python bench/build_time.py [--data ../shared/data] [--out /tmp/bench-stores]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"

CHILD = """
import json, resource, sys, time
from terrasynth.data.build import build_store
from terrasynth.modalities import default_registry
paths, out = sys.argv[1:-1], sys.argv[-1]
t0 = time.perf_counter()
r = build_store(paths, out, default_registry(), overwrite=True)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "chips": r.chips, "scenes": sum(r.scenes_per_source.values()),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(paths: list[Path], out: Path) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, paths), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="ts-bench-")))
    ap.add_argument("--sources", nargs="*", default=None, help="folder names (default: all)")
    args = ap.parse_args()
    from terrasynth.data.sources import detect_source
    from terrasynth.errors import InputError

    folders = []
    for p in sorted(args.data.iterdir()):
        if args.sources and p.name not in args.sources:
            continue
        try:
            detect_source(p)
            folders.append(p)
        except InputError:
            continue
    print(
        f"{'source':34s} {'scenes':>6s} {'chips':>6s} {'seconds':>8s} {'chips/s':>8s} "
        f"{'peak MiB':>9s}"
    )
    for p in folders:
        r = run([p], args.out / p.name)
        print(
            f"{p.name:34s} {r['scenes']:6d} {r['chips']:6d} {r['seconds']:8.2f} "
            f"{r['chips'] / r['seconds']:8.1f} {r['peak_rss_mib']:9.0f}"
        )
    t0 = time.perf_counter()
    r = run(folders, args.out / "all")
    print(
        f"{'ALL (' + str(len(folders)) + ' sources)':34s} {r['scenes']:6d} {r['chips']:6d} "
        f"{r['seconds']:8.2f} {r['chips'] / r['seconds']:8.1f} {r['peak_rss_mib']:9.0f}"
    )
    print(f"(wall {time.perf_counter() - t0:.1f} s incl. interpreter start; stores in {args.out})")


if __name__ == "__main__":
    main()
