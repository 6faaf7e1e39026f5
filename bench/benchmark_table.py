"""Compact Markdown tables from a ``terrasynth evaluate`` report folder.

    python bench/benchmark_table.py REPORT_DIR [--all-directions]

One row per direction and predictor with the headline metrics: MAE of the sample mean,
best-of-N MAE, CRPS, spread-skill, 90 % interval coverage, Wasserstein distance and feature
recall (continuous); accuracy, mIoU and calibration error (land cover). By default only the
``all -> TARGET`` directions; ``--all-directions`` adds the single-condition ones. A last
line counts, per baseline, the directions where the model has the lower CRPS.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

CONTINUOUS = ["mae", "mae_best_of_n", "crps", "spread_skill", "coverage_90", "wasserstein",
              "feature_recall"]  # fmt: skip
CATEGORICAL = ["accuracy", "miou", "ece"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("report", type=Path)
    ap.add_argument("--all-directions", action="store_true")
    args = ap.parse_args()
    data = json.loads((args.report / "metrics.json").read_text())
    table: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for row in data["rows"]:
        table[(row["direction"], row["predictor"])][row["metric"]] = row["value"]
    keys = [k for k in table if args.all_directions or k[0].startswith("all ->")]
    for _kind, metrics in (("continuous", CONTINUOUS), ("categorical", CATEGORICAL)):
        rows = [k for k in keys if (metrics[0] in table[k])]
        if not rows:
            continue
        print(f"\n| direction | predictor | tiles | {' | '.join(metrics)} |")
        print("|---|---|---:|" + "---:|" * len(metrics))
        for d, p in rows:
            v = table[(d, p)]
            cells = " | ".join(f"{v[m]:.4g}" if m in v else "" for m in metrics)
            print(f"| {d} | {p} | {int(v.get('tiles', 0))} | {cells} |")
    wins: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for d in {k[0] for k in keys}:
        model = table.get((d, "model"), {})
        for (d2, p), v in table.items():
            if d2 != d or p == "model" or "crps" not in v or "crps" not in model:
                continue
            wins[p][0] += model["crps"] < v["crps"]
            wins[p][1] += 1
    for p, (w, n) in sorted(wins.items()):
        print(f"\nmodel CRPS lower than {p} on {w} of {n} continuous directions")


if __name__ == "__main__":
    main()
