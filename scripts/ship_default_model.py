"""Make a training run the built-in model: weights, config and a measured model card.

    python scripts/ship_default_model.py RUN STORE [--sampling-steps N] [--benchmark REPORT]

Copies the run's EMA weights (stored as bfloat16 to keep the package small) and config into
``src/terrasynth/weights/default/``, measures the model on the store's test split against
the training mean / majority class (``terrasynth.evaluation.translate``), and writes
``MODEL_CARD.md`` from the run's settings, its metrics log and that table. With
``--benchmark``, a ``terrasynth evaluate`` report of the model on the frozen protocol (with
its baselines) adds the benchmark table (``bench/benchmark_table.py``) and is copied into
``docs/runs/default-model/benchmark/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from terrasynth.evaluation.translate import evaluate_translation, format_table
from terrasynth.models.base import CONFIG, WEIGHTS
from terrasynth.models.factory import load_model
from terrasynth.training.trainer import read_metrics

TARGET = Path(__file__).resolve().parents[1] / "src" / "terrasynth" / "weights" / "default"
SAMPLES = 8  # continuous modalities: MAE of the mean of this many samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run", type=Path)
    ap.add_argument("store", type=Path)
    ap.add_argument("--sampling-steps", type=int, default=None, help="default: the model's")
    ap.add_argument("--benchmark", type=Path, help="report folder of terrasynth evaluate")
    args = ap.parse_args()
    model = load_model(args.run / "model")
    tmp = TARGET.with_name(".default.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save(tmp / CONFIG)
    # weights as bfloat16; a retrieval index keeps its own dtypes (half summaries, boolean
    # masks, float32 places)
    state = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() and "retrieval." not in k else v)
        for k, v in model.state_dict().items()
    }
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(tmp / WEIGHTS))
    # measure the shipped (bfloat16) weights, not the float32 ones
    shipped = load_model(tmp)
    t0 = time.perf_counter()
    rows = evaluate_translation(
        shipped, str(args.store), "test", args.sampling_steps, samples=SAMPLES
    )
    seconds = time.perf_counter() - t0
    train_cfg = json.loads((args.run / "train_config.json").read_text())
    metrics = read_metrics(args.run)
    last = metrics[-1] if metrics else {}
    final_step = int((args.run / "latest").read_text().strip().removeprefix("step_"))
    minutes = _minutes(metrics, train_cfg["batch_size"] * train_cfg["accumulate"])
    table = pd.read_parquet(args.store / "chips.parquet")
    sources = sorted(table["source"].unique())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    wins = sum(r.better for r in rows)
    c = model.config
    params = model.num_parameters() / 1e6
    names = ", ".join(model.modality_names)
    if c.backbone == "conv_generator":
        scales = ", ".join(f"{k} {v:.2f}" for k, v in sorted(c.spread_scale.items())) or "none"
        banded = ", ".join(sorted(c.spread_bands)) or "none"
        mean_banded = ", ".join(sorted(c.mean_bands)) or "none"
        lines = [
            f"- Backbone `conv_generator`, preset `{c.preset}`: {params:.2f} M parameters;",
            f"  U-Net widths {c.widths}, residual generator width {c.generator_channels},",
            f"  training crop {c.image_size} px, sampling window {c.window_size} px",
            f"  (stride {c.stride}), ensemble of {c.ensemble} in training, one sampling step.",
            "- Calibrated on the validation split (`terrasynth calibrate`): the mean per band",
            f"  and spatial scale, its level kept, for: {mean_banded}; the spread per band and",
            f"  spatial scale for: {banded}; then one spread factor per modality: {scales}.",
            f"- Modalities ({len(model.modality_names)}): {names}.",
            "- Full-resolution convolutional mean plus a one-step residual generator trained",
            "  with proper scores (fair CRPS, patch and spectral energy scores); spectral slots",
            "  shared across optical sensors (`docs/design.md`).",
        ]
        index = getattr(model, "retrieval", None)
        if index is not None:
            lines += [
                f"- Retrieval: the {c.retrieval_k} most alike of the {len(index)} training",
                "  chips (their summaries are saved with the weights) condition every window.",
            ]
    else:
        lines = [
            f"- Backbone `scene_transformer`, preset `{c.preset}`: {params:.2f} M parameters,",
            f"  dim {c.dim}, depth {c.depth}, {c.heads} heads, patch {c.patch_size} px,",
            f"  window {c.image_size} px, {c.scene_tokens} scene tokens.",
            f"- Modalities ({len(model.modality_names)}): {names}.",
            "- Pixel-space patch tokens, flow matching with a noise level per modality, x0",
            "  prediction (`docs/design.md`).",
        ]
    if c.retrieval_mixture:
        lines.append(
            "- Each sample takes its level from the retrieved neighbours (a mixture, per pixel"
            if c.neighbour_pixels
            else "- Each sample takes its level from one retrieved neighbour (a mixture"
        )
        lines.append("  weighted by how near they are), `docs/design.md`.")
    description = "\n".join(lines)
    benchmark = _benchmark(args.benchmark) if args.benchmark else ""
    steps = model.default_steps if args.sampling_steps is None else args.sampling_steps
    card = f"""# terrasynth built-in model

The model `terrasynth generate`, `terrasynth evaluate` and `terrasynth demo` use when no
`-m` is given. Trained by this project on the 2-core CPU build machine; weights stored as
bfloat16 ({(tmp / WEIGHTS).stat().st_size / 2**20:.1f} MiB).

## Model

{description}

## Data

Store of all {len(sources)} sources in `../shared/data` ({len(table)} chips; train
{int((table.split == "train").sum())}, val {int((table.split == "val").sum())}, test
{int((table.split == "test").sum())}; spatial split in 2.56 km blocks), built with
`terrasynth data build ../shared/data/* -o STORE`. Sources: {", ".join(sources)}.
Their licences are listed per chip in the store and in `../shared/data/*/SOURCE.md`.

## Training

`terrasynth train -d STORE -o RUN --backbone {train_cfg.get("backbone", "scene_transformer")}
--preset {train_cfg["preset"]} --steps {train_cfg["steps"]} --batch-size
{train_cfg["batch_size"]} --source-balance {train_cfg.get("source_balance", 1.0)}
--time-limit {train_cfg["time_limit_min"]:g}` (seed {train_cfg["seed"]}, lr {train_cfg["lr"]},
warm-up {train_cfg["warmup"]}, EMA {train_cfg["ema_decay"]}, bf16 autocast): stopped at step
{final_step} after {minutes:.1f} minutes on the 2-core CPU machine; last logged loss
{last.get("loss", float("nan")):.4f}. Full settings: `train_config.json` of the run (copied
into `docs/runs/`).

## Measured on the test split

Each raster modality predicted from all others present on a test chip, compared with the
training mean (MAE of the mean of {SAMPLES} samples, physical units) or the training majority
class (accuracy); {steps} sampling step(s), seed 0. Reproduce with
`python bench/model_vs_mean.py src/terrasynth/weights/default STORE --steps
{steps} --samples {SAMPLES}` ({seconds:.0f} s here). The benchmark against kNN retrieval,
the U-Net and the U-Net plus noise at the same budget is in `docs/benchmark.md`.

{format_table(rows)}

Beats the baseline on {wins} of {len(rows)} modalities. Rows with few chips (a handful of
test chips from one region) are noisy; where the model loses, the modality is rare in the
training data (see `docs/training.md`).
{benchmark}
## Limits

A model this small, trained for at most an hour or two on 2 CPU cores, follows the coarse
structure of its inputs, not every field edge; where the inputs say little (Sentinel-1
alone), its samples differ widely and its spread says so. Class maps are its most likely
classes (every sample the same map); their probabilities are calibrated by the
cross-entropy training. It knows only the modalities above, at the resolutions of the
training data. Built from commit
`{commit}`.
"""
    (tmp / "MODEL_CARD.md").write_text(card)
    shutil.rmtree(TARGET, ignore_errors=True)
    tmp.rename(TARGET)
    runs = TARGET.parents[3] / "docs" / "runs" / "default-model"
    runs.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.run / "train_config.json", runs / "train_config.json")
    shutil.copy(args.run / "metrics.jsonl", runs / "metrics.jsonl")
    if args.benchmark:
        shutil.rmtree(runs / "benchmark", ignore_errors=True)
        (runs / "benchmark").mkdir()
        for name in ("metrics.csv", "protocol.json", "report.md"):
            shutil.copy(args.benchmark / name, runs / "benchmark" / name)
    print(card)


def _benchmark(report: Path) -> str:
    """The card's section on the frozen protocol: bench/benchmark_table.py's tables of the
    protocol's directions from a ``terrasynth evaluate`` report with its baselines."""
    protocol = json.loads((report / "protocol.json").read_text())
    table = subprocess.run(
        [sys.executable, str(TARGET.parents[3] / "bench" / "benchmark_table.py"), str(report),
         "--directions", *protocol["directions"]],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    samples = protocol.get("settings", {}).get("num_samples", "?")
    return f"""
## Frozen protocol against the baselines

`bench/protocols/issue17_9directions_8samples.json` ({samples} samples per chip, seed frozen;
the chips are test chips of the store), against the training mean, kNN retrieval of
training chips, the U-Net and the U-Net plus Gaussian noise (docs/benchmark.md). The report
is in `docs/runs/default-model/benchmark/`. Reproduce with `terrasynth evaluate -d STORE -o
REPORT --protocol bench/protocols/issue17_9directions_8samples.json --unet UNET --baseline
mean --baseline knn --baseline unet --baseline unet_noise --shuffle-conditions`.

{table}
"""


def _minutes(metrics: list[dict], batch: int) -> float:
    """Training time: the logged elapsed time, else steps over logged throughput."""
    if metrics and "elapsed_s" in metrics[-1]:
        return metrics[-1]["elapsed_s"] / 60
    total, prev = 0.0, 0
    for rec in metrics:
        total += (rec["step"] - prev) * batch / rec["samples_per_s"]
        prev = rec["step"]
    return total / 60


if __name__ == "__main__":
    main()
