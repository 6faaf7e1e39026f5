"""The frozen protocol with some conditions withheld at sampling: what does the model owe them?

    python bench/withhold_conditions.py STORE [-m MODEL] [--without location --without time]

Scores the model on ``bench/protocols/issue17_9directions_8samples.json`` (the same chips,
samples and seeds as ``terrasynth evaluate --protocol``) with the named conditions removed
from every direction's inputs, and prints CRPS, MAE, 90 % coverage and spread-skill per
direction beside the same scores with every condition given. A model trained with random
input dropout has seen each condition missing, so this asks how much it uses them, not
whether it breaks without them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from terrasynth.data.raster_io import read_json
from terrasynth.evaluation.benchmark import ModelPredictor, parse_direction, run_benchmark
from terrasynth.pipeline import Pipeline

PROTOCOL = Path(__file__).resolve().parent / "protocols" / "issue17_9directions_8samples.json"
SHOWN = ("crps", "mae", "coverage_90", "spread_skill")


class Withholding(ModelPredictor):
    """The model's predictor with ``without`` taken out of every direction's conditions."""

    def __init__(self, model, without: list[str], **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.without = set(without)

    def sample(self, signals, tile, target, conditions, num_samples, generator):
        conditions = [c for c in conditions if c not in self.without]
        signals = {n: s for n, s in signals.items() if n not in self.without}
        return super().sample(signals, tile, target, conditions, num_samples, generator)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("-m", "--model", default=None, help="model folder (default: built in)")
    ap.add_argument("--without", action="append", default=None, help="a condition to withhold")
    args = ap.parse_args()
    without = args.without or ["location", "time"]
    protocol = read_json(PROTOCOL)
    fixed = protocol["settings"]
    pipe = Pipeline.from_pretrained(args.model)
    kw = dict(steps=fixed.get("steps"), eta=fixed.get("eta", 0.0))
    predictors = [
        ModelPredictor(pipe.model, name="all given", **kw),
        Withholding(pipe.model, without, name="without " + ", ".join(without), **kw),
    ]
    directions = [parse_direction(n) for n in protocol["directions"]]
    torch.manual_seed(0)
    results = run_benchmark(
        predictors, pipe.model.config, str(args.store), directions, fixed.get("split", "test"),
        fixed["num_samples"], fixed["seed"], None, chips=protocol["directions"],
    )  # fmt: skip
    print(f"model {pipe.source}; withheld: {', '.join(without)}")
    print("| direction | predictor | " + " | ".join(SHOWN) + " |")
    print("|---|---|" + "---:|" * len(SHOWN))
    for r in results:
        s = r.summary()
        cells = " | ".join(f"{s[k]:.4g}" for k in SHOWN)
        print(f"| {r.direction.name} | {r.predictor} | {cells} |")


if __name__ == "__main__":
    main()
