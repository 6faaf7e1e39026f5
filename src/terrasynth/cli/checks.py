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


def _numbers(text: str, count: int) -> list[float] | None:
    """``count`` comma-separated finite numbers of ``text``, or None."""
    parts = text.replace(" ", "").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        return None
    return values if len(values) == count and all(map(math.isfinite, values)) else None


def parse_window(text: str | None) -> tuple[int, int, int, int] | None:
    """``COL,ROW,WIDTH,HEIGHT`` (whole pixels; offsets >= 0, sizes >= 1) as a tuple."""
    if text is None:
        return None
    v = _numbers(text, 4)
    if v is None or any(x != int(x) for x in v) or min(v[:2]) < 0 or min(v[2:]) < 1:
        raise TerrasynthError(
            f"--window must be COL,ROW,WIDTH,HEIGHT in pixels (offsets >= 0, sizes >= 1), "
            f"not '{text}'"
        )
    col, row, width, height = (int(x) for x in v)
    return col, row, width, height


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``WEST,SOUTH,EAST,NORTH`` in degrees (west < east, south < north) as a tuple; the
    one parser of ``--bbox`` (generate's window, a STAC search's area)."""
    from terrasynth.data.stac_fetch import parse_bbox as parse

    return None if text is None else parse(text)


def window_check(value: str | None) -> str | None:
    """Typer callback: :func:`parse_window` before any work."""
    parse_window(value)
    return value


def bbox_check(value: str | None) -> str | None:
    """Typer callback: :func:`parse_bbox` before any work."""
    parse_bbox(value)
    return value


def device_check(param: typer.CallbackParam, value: str | None) -> str | None:
    """Typer callback: the device must be available (:func:`terrasynth.devices.resolve_device`)."""
    if value is not None:
        from terrasynth.devices import resolve_device

        name = max(param.opts, key=len) if param.opts else param.name
        try:
            resolve_device(value)
        except TerrasynthError as exc:
            raise TerrasynthError(f"{name}: {exc}") from None
    return value


def precision_check(param: typer.CallbackParam, value: str) -> str:
    """Typer callback: one of the sampling precisions (``models.base.PRECISIONS``)."""
    from terrasynth.models.base import check_precision

    name = max(param.opts, key=len) if param.opts else param.name
    try:
        return check_precision(value)
    except TerrasynthError as exc:
        raise TerrasynthError(f"{name}: {exc}") from None


def count_option(help: str, *names: str) -> Any:
    """An option counting something (steps, chips, samples): at least 1."""
    return typer.Option(*names, help=help, callback=at_least(1))


# options several commands share
SEED = typer.Option(help=f"Seed (0 to {SEED_MAX}): the same seed, the same result.", callback=seed)
SAMPLES = count_option("Samples (per scene or chip).", "-n", "--num-samples")
STEPS = count_option("Sampling steps (default: the model's own; one-step models: 1).")
ETA = typer.Option(help="0: deterministic sampler; up to 1: stochastic.", callback=fraction)
WORKERS = typer.Option(help="DataLoader worker processes.", callback=at_least(0))
DEVICE = typer.Option(
    help="Where the model runs: cpu, cuda, cuda:N, mps or auto (a GPU if there is one).",
    callback=device_check,
)
PRECISION = typer.Option(
    help="auto (bfloat16 convolutions where the device runs them natively, else float32), "
    "float32 (a seed's samples equal on every machine, to float precision) or bfloat16.",
    callback=precision_check,
)
WINDOW = typer.Option(
    help="Only this part of the first input: COL,ROW,WIDTH,HEIGHT in its pixels "
    "(only that part of each input is read).",
    callback=window_check,
)
BBOX = typer.Option(
    help="Only this part of the first input: WEST,SOUTH,EAST,NORTH in degrees "
    "(only that part of each input is read); with --stac, the area searched and fetched.",
    callback=bbox_check,
)
