"""Compact Markdown tables from a ``terrasynth evaluate`` report folder.

    python bench/benchmark_table.py REPORT_DIR [--all-directions]
    python bench/benchmark_table.py REPORT_DIR --directions "all -> s2l2a" "s1grd -> s2l2a"

One row per direction and predictor with the headline metrics: MAE of the sample mean,
best-of-N MAE, CRPS, spread-skill, 90 % interval coverage, Wasserstein distance, feature
recall, texture ratio, per-sample spectral angle and input dependence (continuous; the last
only in reports run with ``--shuffle-conditions``, and each of the last three only where
some listed row has it); accuracy, mIoU and calibration error (land cover); and a small
table of the elevation scores (relief and level MAE, median slope error, mean slope ratio)
for the directions whose target is ``dem``.

By default only the ``all -> TARGET`` directions; ``--all-directions`` adds the
single-condition ones; ``--directions`` lists exactly the directions to show, in that
order. Summary lines: in how many listed continuous directions the model's ensemble is
calibrated (90 % coverage within 0.85-0.95 and spread-skill within 0.8-1.2), then, per
baseline, in how many the model has the lower CRPS.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

CONTINUOUS = ["mae", "mae_best_of_n", "crps", "spread_skill", "coverage_90", "wasserstein",
              "feature_recall", "texture_ratio", "sample_spectral_angle",
              "input_dependence"]  # fmt: skip
# columns shown only when some listed row has them (not every target or run produces them)
OPTIONAL = {"texture_ratio", "sample_spectral_angle", "input_dependence"}
CATEGORICAL = ["accuracy", "miou", "ece"]
ELEVATION = ["relief_mae", "level_mae", "slope_error_median", "slope_mean_ratio"]
ELEVATION_TARGETS = {"dem"}
COVERAGE_90 = (0.85, 0.95)
SPREAD_SKILL = (0.8, 1.2)

Table = dict[tuple[str, str], dict[str, float]]


def load(report: Path) -> tuple[Table, dict[str, str]]:
    """The metrics of a report folder: (direction, predictor) -> metric -> value, and
    direction -> target."""
    data = json.loads((Path(report) / "metrics.json").read_text())
    table: Table = defaultdict(dict)
    targets: dict[str, str] = {}
    for row in data["rows"]:
        table[(row["direction"], row["predictor"])][row["metric"]] = row["value"]
        targets[row["direction"]] = row.get("target") or row["direction"].split(" -> ")[-1]
    return dict(table), targets


def _markdown(table: Table, rows: list[tuple[str, str]], metrics: list[str]) -> list[str]:
    out = [f"| direction | predictor | tiles | {' | '.join(metrics)} |"]
    out.append("|---|---|---:|" + "---:|" * len(metrics))
    for d, p in rows:
        v = table[(d, p)]
        cells = " | ".join(f"{v[m]:.4g}" if m in v else "" for m in metrics)
        out.append(f"| {d} | {p} | {int(v.get('tiles', 0))} | {cells} |")
    return out


def render(
    table: Table,
    targets: dict[str, str],
    directions: list[str] | None = None,
    all_directions: bool = False,
) -> str:
    """The tables and summary lines as Markdown (see the module docstring)."""
    if directions is not None:
        known = {d for d, _ in table}
        missing = [d for d in directions if d not in known]
        if missing:
            raise ValueError(
                f"direction(s) not in the report: {', '.join(missing)} "
                f"(it has: {', '.join(sorted(known))})"
            )
        rank = {d: i for i, d in enumerate(directions)}
        keys = sorted((k for k in table if k[0] in rank), key=lambda k: rank[k[0]])
    else:
        keys = [k for k in table if all_directions or k[0].startswith("all ->")]
    listed = list(dict.fromkeys(d for d, _ in keys))
    lines: list[str] = []
    for metrics in (CONTINUOUS, CATEGORICAL):
        rows = [k for k in keys if metrics[0] in table[k]]
        if not rows:
            continue
        shown = [
            m for m in metrics if m not in OPTIONAL or any(m in table[k] for k in rows)
        ]  # fmt: skip
        lines += ["", *_markdown(table, rows, shown)]
    dem_rows = [
        k for k in keys if targets.get(k[0]) in ELEVATION_TARGETS and "relief_mae" in table[k]
    ]
    if dem_rows:
        lines += ["", *_markdown(table, dem_rows, ELEVATION)]
    # the model's calibration on the listed continuous directions
    cont = [d for d in listed if "crps" in table.get((d, "model"), {})]
    if cont:
        calibrated = 0
        for d in cont:
            m = table[(d, "model")]
            cov, ss = m.get("coverage_90"), m.get("spread_skill")
            calibrated += (
                cov is not None
                and ss is not None
                and COVERAGE_90[0] <= cov <= COVERAGE_90[1]
                and SPREAD_SKILL[0] <= ss <= SPREAD_SKILL[1]
            )
        lines += [
            "",
            f"model coverage_90 within {COVERAGE_90[0]}-{COVERAGE_90[1]} and spread_skill "
            f"within {SPREAD_SKILL[0]}-{SPREAD_SKILL[1]} in {calibrated} of {len(cont)} "
            "listed directions",
        ]
    wins: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for d in listed:
        model = table.get((d, "model"), {})
        for (d2, p), v in table.items():
            if d2 != d or p == "model" or "crps" not in v or "crps" not in model:
                continue
            wins[p][0] += model["crps"] < v["crps"]
            wins[p][1] += 1
    for p, (w, n) in sorted(wins.items()):
        lines += ["", f"model CRPS lower than {p} on {w} of {n} continuous directions"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("report", type=Path)
    ap.add_argument("--all-directions", action="store_true")
    ap.add_argument(
        "--directions",
        nargs="+",
        metavar="DIRECTION",
        help='only these directions, in this order (e.g. "all -> s2l2a" "s1grd -> s2l2a")',
    )
    args = ap.parse_args(argv)
    table, targets = load(args.report)
    try:
        text = render(table, targets, args.directions, args.all_directions)
    except ValueError as exc:
        ap.error(str(exc))
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
