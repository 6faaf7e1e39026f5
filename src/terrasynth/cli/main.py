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
def train() -> None:
    """Train a model on a chip store (arrives with the model issue)."""
    _not_yet("terrasynth train", "the model and its training are in progress")


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
