"""Predict each modality from the others on a split: model vs training mean / majority.

    python bench/model_vs_mean.py RUN_OR_MODEL_DIR STORE [--split test] [--steps N] [--samples N]

Prints a Markdown table (MAE in physical units for continuous modalities, accuracy for
land-cover maps) and whether the model beats the baseline on each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from terrasynth.evaluation.translate import evaluate_translation, format_table
from terrasynth.models.base import sampling_steps
from terrasynth.models.factory import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", type=Path, help="a run folder (uses RUN/model) or a model folder")
    ap.add_argument("store")
    ap.add_argument("--split", default="test")
    ap.add_argument("--steps", type=int, default=None, help="default: the model's own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-chips", type=int, default=None)
    ap.add_argument("--samples", type=int, default=8, help="continuous: MAE of their mean")
    args = ap.parse_args()
    folder = args.model / "model" if (args.model / "model").is_dir() else args.model
    model = load_model(folder)
    args.steps = sampling_steps(model, args.steps)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    rows = evaluate_translation(
        model, args.store, args.split, args.steps, seed=args.seed, max_chips=args.max_chips,
        samples=args.samples,
    )  # fmt: skip
    print(
        f"model {folder} ({model.num_parameters() / 1e6:.1f} M parameters), store "
        f"{args.store}, split {args.split}, {args.steps} sampling steps, MAE of the mean of "
        f"{args.samples} samples, seed {args.seed}"
    )
    print(format_table(rows))
    wins = sum(r.better for r in rows)
    print(
        f"beats the baseline on {wins} of {len(rows)} modalities ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
