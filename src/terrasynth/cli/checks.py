"""Checks of option values, run by the command line before any work.

Each check is a Typer callback: a bad value raises :class:`TerrasynthError` naming the
option, which ``terrasynth`` prints as one ``error:`` line (see ``terrasynth.cli.main``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from terrasynth.errors import TerrasynthError

SEED_MAX = 2**32 - 1  # what every random generator used (numpy, torch, dataset) accepts

Check = Callable[[typer.CallbackParam, Any], Any]


def _rule(ok: Callable[[Any], bool], rule: str) -> Check:
    """A callback refusing values (each of a list) for which ``ok`` is false."""

    def check(param: typer.CallbackParam, value: Any) -> Any:
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is not None and not ok(v):
                name = max(param.opts, key=len) if param.opts else param.name
                shown = f"'{v}'" if isinstance(v, str | Path) else v
                raise TerrasynthError(f"{name} must be {rule}, not {shown}")
        return value

    return check


def finite(v: Any) -> bool:
    """False for a NaN or infinite float, true for anything else."""
    return not isinstance(v, float) or math.isfinite(v)


def at_least(low: float) -> Check:
    return _rule(lambda v: finite(v) and v >= low, f"at least {low}")


def above(low: float) -> Check:
    return _rule(lambda v: finite(v) and v > low, f"greater than {low}")


def between(low: float, high: float) -> Check:
    return _rule(lambda v: finite(v) and low <= v <= high, f"between {low} and {high}")


def one_of(*choices: str) -> Check:
    return _rule(lambda v: v in choices, "one of " + ", ".join(choices))


def one_of_lazy(choices: Callable[[], Iterable[str]]) -> Check:
    """:func:`one_of` names that are only imported when the option is given."""

    def check(param: typer.CallbackParam, value: Any) -> Any:
        return one_of(*choices())(param, value) if value else value

    return check


def _is_date(v: str) -> bool:
    try:
        datetime.fromisoformat(v)
    except ValueError:
        return False
    return True


iso_date = _rule(_is_date, "an ISO date (YYYY-MM-DD)")
seed = between(0, SEED_MAX)
fraction = between(0.0, 1.0)
existing = _rule(lambda v: Path(v).exists(), "an existing file or folder")


def count_option(help: str, *names: str) -> Any:
    """An option counting something (steps, chips, samples): at least 1."""
    return typer.Option(*names, help=help, callback=at_least(1))


# options several commands share
SEED = typer.Option(help=f"Seed (0 to {SEED_MAX}): the same seed, the same result.", callback=seed)
SAMPLES = count_option("Samples (per scene or chip).", "-n", "--num-samples")
STEPS = count_option("Sampling steps (default: the model's own; one-step models: 1).")
ETA = typer.Option(help="0: deterministic sampler; up to 1: stochastic.", callback=fraction)
WORKERS = typer.Option(help="DataLoader worker processes.", callback=at_least(0))
