"""Entry point: ``terrasynth`` with its sub-commands.

User errors (:class:`TerrasynthError`) end as one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from terrasynth.cli.data import app as data_app
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
def generate() -> None:
    """Generate modalities from GeoTIFFs (arrives with the generation issue)."""
    _not_yet("terrasynth generate", "generation is in progress")


@app.command()
def evaluate() -> None:
    """Evaluate a model on a store's test split (arrives with the benchmark issue)."""
    _not_yet("terrasynth evaluate", "the benchmark is in progress")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path(
        "terrasynth-demo"
    ),
) -> None:
    """Run the main job on real data shipped with the package (BigEarthNet examples)."""
    from terrasynth.demo import run_demo

    report = run_demo(output)
    typer.echo(f"store, preview and report in {output.resolve()}")
    typer.echo(f"open {report.resolve()}")
    typer.echo("note: generation joins the demo when the built-in model lands")


def main() -> None:
    """Console-script entry point: usage errors as click shows them, user errors as one line."""
    try:
        app()  # standalone mode: click reports its own usage errors and exits
    except TerrasynthError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
