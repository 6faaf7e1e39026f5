"""Does a 2-process DDP run (gloo, CPU) follow the single-process loss curve?

    python bench/ddp_vs_single.py STORE [--steps 80] [--out /tmp/ddp-vs-single]

Both runs use the same global batch (16 = 1 x 16 = 2 x 8) and seed; the data order is the
same (the two ranks split each global batch), while noise draws and crops differ per rank,
so the curves agree statistically, not bit for bit. Prints both runs' loss at every logged
step (every 10th), their means over the second half, and the relative gap.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from terrasynth.training.trainer import read_metrics

TOLERANCE = 0.15  # relative gap of the second-half mean losses


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("store")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--out", type=Path, default=Path("/tmp/ddp-vs-single"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    common = [
        "train",
        "-d",
        args.store,
        "--steps",
        str(args.steps),
        "--checkpoint-every",
        str(args.steps),
    ]
    single = args.out / "single"
    ddp = args.out / "ddp"
    t1 = run(
        [
            sys.executable,
            "-m",
            "terrasynth.cli.main",
            *common,
            "-o",
            str(single),
            "--batch-size",
            "16",
        ]
    )
    t2 = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "terrasynth.cli.main",
            *common,
            "-o",
            str(ddp),
            "--batch-size",
            "8",
        ]
    )
    a = {m["step"]: m["loss"] for m in read_metrics(single)}
    b = {m["step"]: m["loss"] for m in read_metrics(ddp)}
    print(f"{'step':>5s} {'single':>9s} {'2-proc DDP':>11s}")
    for step in sorted(a):
        print(f"{step:5d} {a[step]:9.4f} {b.get(step, float('nan')):11.4f}")
    half = args.steps // 2
    ma = sum(v for s, v in a.items() if s > half) / max(1, sum(s > half for s in a))
    mb = sum(v for s, v in b.items() if s > half) / max(1, sum(s > half for s in b))
    gap = abs(ma - mb) / ma
    print(
        f"second-half mean loss: single {ma:.4f}, DDP {mb:.4f}, relative gap {gap:.1%} "
        f"(tolerance {TOLERANCE:.0%}: {'within' if gap <= TOLERANCE else 'OUTSIDE'})"
    )
    print(f"wall time: single {t1:.0f} s, DDP {t2:.0f} s")


if __name__ == "__main__":
    main()
