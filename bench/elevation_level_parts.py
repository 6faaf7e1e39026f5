"""Where a generated elevation chip's level comes from (issue 17, thirteenth round).

    python bench/elevation_level_parts.py -d STORE -m MODEL [--direction "s2sr_arcsi -> dem"]

A convolutional generator with the retrieval mixture builds each elevation sample's chip
level (its mean) from three parts: the retrieved neighbours' weighted level, the mean head's
correction of it, and the residual generator's own chip level. This runs
``terrasynth evaluate`` on one elevation direction of the frozen protocol
(``bench/protocols/issue17_9directions_8samples.json``) with those parts watched (wrappers
around ``ConvGenerator._add_retrieved`` and ``ConvGenerator.forward`` that record and change
nothing) and prints, in metres: the neighbours' level and spread, the head's correction
before and after ``level_correction_bound``, the residual's level (samples minus the mean;
bounded too with ``residual_level_bound``)
and the error of the samples' mean level against the truth (``level_mae``, as scored).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from terrasynth.cli.main import main as terrasynth
from terrasynth.evaluation import metrics
from terrasynth.models import conv_generator as cg

PROTOCOL = Path(__file__).parent / "protocols" / "issue17_9directions_8samples.json"


def watch() -> dict[str, list]:
    """Wrap the level step, the forward pass and ``level_mae``; returns what they record."""
    seen: dict[str, list] = {"parts": [], "samples": [], "levels": []}
    add, forward = cg.ConvGenerator._add_retrieved, cg.ConvGenerator.forward
    level_mae = metrics.level_mae

    def metres(model, x):
        band = model.config.stats["dem"]["bands"]["elevation"]
        return x * band["std"], band["mean"]

    def add_watched(self, mod, mu, ret, near=None, spread=None):
        out = add(self, mod, mu, ret, near, spread)
        if mod.name == "dem" and near is not None:
            level, _ = metres(self, cg._weighted_level(*near)[:, 0])
            spread, _ = metres(self, cg._level_spread(*near)[:, 0])
            head, _ = metres(self, mu["r30m"].mean((2, 3))[:, 0])
            applied = out["r30m"].mean((2, 3))[:, 0] - cg._weighted_level(*near)[:, 0]
            applied, offset = metres(self, applied)
            rows = zip(level + offset, spread, head, applied, strict=True)
            seen["parts"] += [[float(v) for v in r] for r in rows]
        return out

    def forward_watched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        for s in out[1] if isinstance(out, tuple) else [out]:
            if "dem" in s and isinstance(s["dem"], dict):
                level, offset = metres(self, s["dem"]["r30m"].mean((2, 3))[:, 0])
                seen["samples"] += (level + offset).tolist()
        return out

    def level_mae_watched(pred, truth, valid=None):
        keep = np.ones(truth.shape, bool) if valid is None else np.asarray(valid, bool)
        seen["levels"].append([float(pred[keep].mean()), float(truth[keep].mean())])
        return level_mae(pred, truth, valid)

    cg.ConvGenerator._add_retrieved = add_watched
    cg.ConvGenerator.forward = forward_watched
    metrics.level_mae = level_mae_watched
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--data", required=True, help="chip store")
    parser.add_argument("-m", "--model", required=True, help="model or run folder")
    parser.add_argument("--direction", default="s2sr_arcsi -> dem")
    args = parser.parse_args()
    protocol = json.loads(PROTOCOL.read_text())
    protocol["directions"] = {args.direction: protocol["directions"][args.direction]}
    seen = watch()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "protocol.json"
        path.write_text(json.dumps(protocol))
        try:
            terrasynth(["evaluate", "-d", args.data, "-m", args.model, "--protocol", str(path),
                        "-o", str(Path(tmp) / "report")])  # fmt: skip
        except SystemExit as exc:
            if exc.code:
                raise
    parts = np.array(seen["parts"])
    if not len(parts):
        raise SystemExit("no elevation level step seen: not a conv generator with the mixture")
    samples, levels = np.array(seen["samples"]), np.array(seen["levels"])
    mean_level = parts[:, 0] + parts[:, 3]  # the mean's level: the neighbours' plus the head's
    print(f"{args.direction}, {len(levels)} tiles, {len(samples)} sample levels (m):")
    print(f"  neighbours' level, mean          {parts[:, 0].mean():8.1f}")
    print(f"  neighbours' spread, median       {np.median(parts[:, 1]):8.1f}")
    print(f"  head's correction |.|, median    {np.median(np.abs(parts[:, 2])):8.1f}")
    print(f"  ... after the bound, median      {np.median(np.abs(parts[:, 3])):8.1f}")
    if len(samples) == len(mean_level):
        residual = samples - mean_level
        print(f"  residual's level, mean (sd)      {residual.mean():8.1f} ({residual.std():.1f})")
    print(f"  truth's level, mean              {levels[:, 1].mean():8.1f}")
    print(f"  samples' mean level, MAE         {np.abs(levels[:, 0] - levels[:, 1]).mean():8.1f}")


if __name__ == "__main__":
    main()
