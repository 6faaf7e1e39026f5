"""Entry point: ``terrasynth`` with its sub-commands.

User errors (:class:`TerrasynthError`) end as one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from terrasynth.cli.data import app as data_app
from terrasynth.cli.data import parse_inputs, parse_numbers
from terrasynth.errors import TerrasynthError

app = typer.Typer(
    help="Unified multimodal Earth-observation generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")


def _not_yet(what: str, issue: str) -> None:
    raise TerrasynthError(f"'{what}' is not available yet in this version ({issue})")


@app.command()
def train(
    store: Annotated[Path, typer.Option("-d", "--data", help="Chip store to train on.")],
    run: Annotated[Path, typer.Option("-o", "--output", help="Run folder.")],
    preset: Annotated[str, typer.Option(help="Model size: tiny, small or base.")] = "tiny",
    steps: Annotated[int, typer.Option(help="Optimiser steps in all.")] = 1400,
    batch_size: Annotated[int, typer.Option(help="Chips per process and micro-step.")] = 24,
    accumulate: Annotated[int, typer.Option(help="Micro-steps per optimiser step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1.5e-3,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 200,
    time_limit: Annotated[float, typer.Option(help="Stop after this many minutes (0: no).")] = 0.0,
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast.")] = True,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    source_balance: Annotated[
        float, typer.Option(help="1: sources in store proportions; 0: each equally often.")
    ] = 0.5,
    resume: Annotated[bool, typer.Option(help="Continue the run in the output folder.")] = False,
) -> None:
    """Train the scene model on a chip store (multi-GPU/-node: launch with torchrun)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from terrasynth.training.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        preset=preset,
        steps=steps,
        batch_size=batch_size,
        accumulate=accumulate,
        lr=lr,
        checkpoint_every=checkpoint_every,
        time_limit_min=time_limit,
        bf16=bf16,
        num_workers=workers,
        seed=seed,
        source_balance=source_balance,
    )
    trainer = Trainer(store, run, cfg, resume=resume)
    show = trainer.rank == 0
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not show,
        transient=True,
    ) as progress:
        task = progress.add_task(
            "training", total=trainer.cfg.steps, completed=trainer.step, info=""
        )

        def on_log(rec: dict) -> None:
            progress.update(
                task,
                completed=rec["step"],
                info=f"loss {rec['loss']:.3f} · {rec['samples_per_s']:.1f} chips/s",
            )

        reason = trainer.train(on_log)
    if show:
        typer.echo(f"{reason} at step {trainer.step}; model in {run / 'model'}")
    if reason == "interrupted":
        raise typer.Exit(130)


@app.command()
def generate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    target: Annotated[
        list[str], typer.Option("-t", "--target", help="Modality to generate (repeatable).")
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "-i", "--input", help="MOD[:B1,B2]=FILE GeoTIFF to condition on (repeatable)."
        ),
    ] = None,
    model: Annotated[
        Path | None, typer.Option("-m", "--model", help="Model or run folder (default: built-in).")
    ] = None,
    num_samples: Annotated[int, typer.Option("-n", "--num-samples", help="Samples.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same samples.")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 8,
    eta: Annotated[
        float, typer.Option(help="0: deterministic sampler; up to 1: stochastic.")
    ] = 0.0,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 1.0,
    scale: Annotated[
        list[str] | None, typer.Option(help="MOD=FACTOR: physical = raw * FACTOR + offset.")
    ] = None,
    offset: Annotated[list[str] | None, typer.Option(help="MOD=OFFSET (see --scale).")] = None,
    size: Annotated[int | None, typer.Option(help="Joint generation: pixels per side.")] = None,
    gsd: Annotated[float | None, typer.Option(help="Joint generation: metres per pixel.")] = None,
    lon: Annotated[float | None, typer.Option(help="Joint generation: longitude.")] = None,
    lat: Annotated[float | None, typer.Option(help="Joint generation: latitude.")] = None,
    date: Annotated[str | None, typer.Option(help="Acquisition date (YYYY-MM-DD).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per model call.")] = 32,
    strict: Annotated[bool, typer.Option(help="Refuse inputs that only look suspicious.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
) -> None:
    """Generate modalities from GeoTIFFs (any CRS) onto the first input's grid.

    Translation: -i s1grd=s1.tif -t s2l2a. Band infilling: -i s2l2a:B04,B03,B02=rgb.tif
    -t s2l2a. Joint generation: no -i, -t s2l2a -t dem [--size --gsd --lon --lat].
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from terrasynth.pipeline import Pipeline

    if output.exists() and any(output.iterdir()) and not overwrite:
        raise TerrasynthError(f"{output} exists and is not empty (use --overwrite)")
    if (lon is None) != (lat is None):
        raise TerrasynthError("give both --lon and --lat, or neither")
    scales = parse_numbers(scale or [], "--scale")
    offsets = parse_numbers(offset or [], "--offset")
    scaling = {m: (scales.get(m, 1.0), offsets.get(m, 0.0)) for m in {*scales, *offsets}}
    pipe = Pipeline.from_pretrained(model)
    with Progress(
        TextColumn("generating"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} model calls"),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task("gen", total=None)
        result = pipe.generate(
            parse_inputs(inputs or []),
            target,
            num_samples=num_samples,
            seed=seed,
            steps=steps,
            eta=eta,
            guidance=guidance,
            scaling=scaling,
            size=size,
            gsd=gsd,
            location=(lon, lat) if lon is not None else None,
            time=date,
            batch_size=batch_size,
            strict=strict,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    for w in result.info["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    files = result.save(output, overwrite=overwrite)
    typer.echo(
        f"{len(files)} files in {output.resolve()} "
        f"({num_samples} samples of {', '.join(result.targets)}; "
        f"{result.info['seconds']:.1f} s); quick look: {output / 'quicklook.png'}"
    )


@app.command()
def evaluate(
    store: Annotated[Path, typer.Option("-d", "--data", help="Chip store to evaluate on.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Report folder.")],
    model: Annotated[
        Path | None, typer.Option("-m", "--model", help="Model or run folder (default: built-in).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split: test, val or train.")] = "test",
    baseline: Annotated[
        list[str] | None, typer.Option(help="Baselines to run beside the model: mean, knn.")
    ] = None,
    target: Annotated[
        list[str] | None, typer.Option("-t", "--target", help="Only these target modalities.")
    ] = None,
    num_samples: Annotated[int, typer.Option("-n", "--num-samples", help="Samples per tile.")] = 4,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 8,
    eta: Annotated[float, typer.Option(help="0: deterministic; up to 1: stochastic.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    max_chips: Annotated[
        int | None, typer.Option(help="At most this many chips per direction.")
    ] = None,
    no_model: Annotated[bool, typer.Option(help="Run the baselines only.")] = False,
    protocol: Annotated[
        Path | None,
        typer.Option(help="Frozen protocol JSON: settings and chip ids per direction."),
    ] = None,
) -> None:
    """Score generation on a store's split against baselines (JSON, CSV, report).

    Each modality from all others and from each other one; pointwise, distribution and
    calibration metrics.
    """

    from terrasynth.data.store import ChipStore
    from terrasynth.evaluation.baselines import BASELINES
    from terrasynth.evaluation.benchmark import (
        ModelPredictor,
        default_directions,
        parse_direction,
        protocol_of,
        run_benchmark,
    )
    from terrasynth.evaluation.report import write_report
    from terrasynth.pipeline import Pipeline

    ChipStore.open(store)  # a clear error for a missing or broken store
    frozen = None
    if protocol is not None:
        from terrasynth.data.raster_io import read_json

        frozen = read_json(protocol)
        fixed = frozen.get("settings", {})
        split = fixed.get("split", split)
        num_samples = fixed.get("num_samples", num_samples)
        steps = fixed.get("steps", steps)
        eta = fixed.get("eta", eta)
        seed = fixed.get("seed", seed)
    pipe = Pipeline.from_pretrained(model)
    config = pipe.model.config
    predictors = [] if no_model else [ModelPredictor(pipe.model, steps=steps, eta=eta)]
    for name in baseline or []:
        if name not in BASELINES:
            raise TerrasynthError(f"unknown baseline '{name}' (baselines: {', '.join(BASELINES)})")
        cls = BASELINES[name]
        predictors.append(cls(config, str(store)) if name == "knn" else cls(config))
    if not predictors:
        raise TerrasynthError("nothing to evaluate: no model and no baseline")
    from terrasynth.data.dataset import ChipDataset

    if frozen is not None:
        directions = [parse_direction(n) for n in frozen.get("directions", {})]
    else:
        directions = default_directions(ChipDataset(store, split=split), config)
    if target:
        directions = [d for d in directions if d.target in target]
    if not directions:
        raise TerrasynthError(f"no direction to evaluate on the {split} split of {store}")
    results = run_benchmark(
        predictors, config, str(store), directions, split, num_samples, seed, max_chips,
        progress=lambda line: typer.echo(line, err=True),
        chips=frozen["directions"] if frozen is not None else None,
    )  # fmt: skip
    settings = {
        "model": pipe.source, "store": str(store), "split": split, "num_samples": num_samples,
        "steps": steps, "eta": eta, "seed": seed, "max_chips": max_chips,
    }  # fmt: skip
    report = write_report(results, output, settings, protocol_of(results, settings))
    typer.echo(f"{len(results)} direction x predictor results; report {report.resolve()}")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path(
        "terrasynth-demo"
    ),
    num_samples: Annotated[int, typer.Option("-n", "--num-samples", help="Samples per job.")] = 4,
    model: Annotated[
        Path | None, typer.Option("-m", "--model", help="Model or run folder (default: built-in).")
    ] = None,
) -> None:
    """Run the main job on BigEarthNet patches shipped with a dependency.

    S1 -> S2, S2 -> S1, S2 -> elevation and labels, band infilling; GeoTIFFs and a report.
    """
    from terrasynth.demo import run_demo

    report = run_demo(output, num_samples=num_samples, model=model, log=typer.echo)
    typer.echo(f"outputs in {output.resolve()}")
    typer.echo(f"open {report.resolve()}")


def main() -> None:
    """Console-script entry point: usage errors as click shows them, user errors as one line."""
    try:
        app()  # standalone mode: click reports its own usage errors and exits
    except TerrasynthError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
