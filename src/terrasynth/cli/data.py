"""``terrasynth data build | fetch | info | preview``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from terrasynth.cli import stac_options
from terrasynth.cli.checks import (
    SEED,
    above,
    at_least,
    count_option,
    existing,
    finite,
    fraction,
)
from terrasynth.errors import TerrasynthError
from terrasynth.modalities import default_registry

app = typer.Typer(help="Build, inspect and preview chip stores.", no_args_is_help=True)
console = Console(stderr=True)


# options of the commands that build a store
MODALITIES = typer.Option(
    "--modalities", help="YAML file of extra modalities (repeatable).", callback=existing
)
CHIP_SIZE = typer.Option(help="Chip size in pixels (a multiple of 16).", callback=at_least(16))
MIN_VALID = typer.Option(help="Valid-pixel fraction for a band to count.", callback=fraction)
BLOCK_SIZE = typer.Option(help="Split block size in metres.", callback=above(0))


def parse_numbers(values: list[str], option: str) -> dict[str, float]:
    """``MOD=NUMBER`` values of ``option`` as a dict; anything else (a missing name, NaN,
    infinity) is refused naming the option."""
    out: dict[str, float] = {}
    for v in values:
        mod, sep, num = v.partition("=")
        try:
            number = float(num)
        except ValueError:
            number = math.nan
        if not (sep and mod.strip() and finite(number)):
            raise TerrasynthError(f"{option} expects MOD=NUMBER (a finite number), got '{v}'")
        out[mod.strip()] = number
    return out


def parse_inputs(values: list[str], option: str = "--input") -> list[tuple[str, str]]:
    """``MOD=FILE`` values of ``option`` as pairs; a missing name or file is refused."""
    out: list[tuple[str, str]] = []
    for v in values:
        mod, _, path = (part.strip() for part in v.partition("="))
        if not (mod and path):
            raise TerrasynthError(f"{option} expects MOD=FILE, got '{v}'")
        out.append((mod, path))
    return out


def _option_name(param: typer.CallbackParam) -> str:
    return max(param.opts, key=len) if param.opts else str(param.name)


def numbers_check(param: typer.CallbackParam, value: list[str] | None) -> list[str] | None:
    """Typer callback: :func:`parse_numbers` before any work."""
    parse_numbers(value or [], _option_name(param))
    return value


def inputs_check(param: typer.CallbackParam, value: list[str] | None) -> list[str] | None:
    """Typer callback: :func:`parse_inputs` before any work."""
    parse_inputs(value or [], _option_name(param))
    return value


def _run_build(sources: list[Path], output: Path, registry, **options) -> None:
    """``build_store`` with a progress bar, then its report: warnings, skipped paths,
    chips per source (``options`` as for :func:`terrasynth.data.build.build_store`)."""
    from terrasynth.data.build import build_store

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[chips]} chips"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("building", total=None, chips=0)

        def on_scene(source: str, scene, n: int) -> None:
            progress.update(
                task,
                description=f"{source}: {scene.scene_id}",
                chips=progress.tasks[task].fields["chips"] + n,
            )

        report = build_store(sources, output, registry, on_scene=on_scene, **options)
    for line in dict.fromkeys(report.warnings):
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True, highlight=False)
    if report.skipped:
        names = ", ".join(Path(p).name for p in report.skipped)
        console.print(
            f"[yellow]skipped {len(report.skipped)} path(s) in no recognised source "
            f"format[/] (--strict refuses them): {names}",
            soft_wrap=True,
        )
    for name, n in report.chips_per_source.items():
        console.print(
            f"{name}: {report.scenes_per_source[name]} scenes, {n} chips, "
            f"{report.seconds_per_source[name]:.1f} s"
        )
    typer.echo(f"wrote {report.chips} chips to {report.path}")


@app.command()
def build(
    sources: Annotated[
        list[Path] | None,
        typer.Argument(help="Source folders (auto-detected).", callback=existing),
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Store to create.")] = Path(
        "store"
    ),
    input_: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            help="Generic mode: MOD=FILE, a GeoTIFF of modality MOD (repeatable).",
            callback=inputs_check,
        ),
    ] = None,
    scale: Annotated[
        list[str] | None,
        typer.Option(
            "--scale",
            help="Generic mode: MOD=FACTOR; physical = raw * FACTOR + OFFSET.",
            callback=numbers_check,
        ),
    ] = None,
    offset: Annotated[
        list[str] | None,
        typer.Option(
            "--offset", help="Generic mode: MOD=OFFSET (see --scale).", callback=numbers_check
        ),
    ] = None,
    modalities: Annotated[list[Path] | None, MODALITIES] = None,
    chip_size: Annotated[int, CHIP_SIZE] = 64,
    min_valid: Annotated[float, MIN_VALID] = 0.5,
    block_size: Annotated[float, BLOCK_SIZE] = 2560.0,
    seed: Annotated[int, SEED] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    strict: Annotated[
        bool, typer.Option(help="Refuse unrecognised source paths and inputs that look wrong.")
    ] = False,
) -> None:
    """Build an aligned chip store from any supported sources."""
    from terrasynth.data.split import SplitConfig

    registry = default_registry(list(modalities or []))
    inputs = parse_inputs(input_ or [])
    scales = parse_numbers(scale or [], "--scale")
    offsets = parse_numbers(offset or [], "--offset")
    scaling = {m: (scales.get(m, 1.0), offsets.get(m, 0.0)) for m in {*scales, *offsets}}
    if not sources and not inputs:
        raise TerrasynthError("give source folders and/or --input MOD=FILE")
    if chip_size <= 0 or chip_size % 16:
        raise TerrasynthError("--chip-size must be a positive multiple of 16")
    _run_build(
        list(sources or []),
        output,
        registry,
        inputs=inputs or None,
        scaling=scaling,
        chip_size=chip_size,
        min_valid=min_valid,
        split=SplitConfig(block_size_m=block_size, seed=seed),
        overwrite=overwrite,
        strict=strict,
    )


@app.command()
def fetch(
    stac: Annotated[str, stac_options.STAC_URL],
    output: Annotated[Path, typer.Option("-o", "--output", help="Store to create.")],
    collections: Annotated[list[str] | None, stac_options.COLLECTIONS] = None,
    bbox: Annotated[str | None, stac_options.BBOX] = None,
    datetime: Annotated[str | None, stac_options.DATETIME] = None,
    mapping: Annotated[Path | None, stac_options.MAPPING] = None,
    resolution: Annotated[float | None, stac_options.RESOLUTION] = None,
    crs: Annotated[str | None, stac_options.CRS] = None,
    max_items: Annotated[int, stac_options.MAX_ITEMS] = 100,
    pair_days: Annotated[float, stac_options.PAIR_DAYS] = 16.0,
    download_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the downloaded rasters (default: STORE.fetch beside the store); "
            "a rerun of the same query skips complete files."
        ),
    ] = None,
    modalities: Annotated[list[Path] | None, MODALITIES] = None,
    chip_size: Annotated[int, CHIP_SIZE] = 64,
    min_valid: Annotated[float, MIN_VALID] = 0.5,
    block_size: Annotated[float, BLOCK_SIZE] = 2560.0,
    seed: Annotated[int, SEED] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    strict: Annotated[bool, typer.Option(help="Refuse inputs that look wrong.")] = False,
) -> None:
    """Search a STAC API and build a chip store from what it finds.

    Assets become registry modalities and bands by their metadata (or --mapping), are read
    window by window onto one grid over --bbox into --download-dir, and that folder is
    built into the store like any described source.
    """
    from terrasynth.atomic import check_output
    from terrasynth.data.split import SplitConfig

    if chip_size % 16:
        raise TerrasynthError("--chip-size must be a positive multiple of 16")
    check_output(output, overwrite)  # before any download
    registry = default_registry(list(modalities or []))
    folder = download_dir or output.with_name(output.name + ".fetch")
    stac_options.run_fetch(
        stac,
        collections,
        bbox,
        datetime,
        folder,
        registry,
        mapping=mapping,
        resolution=resolution,
        crs=crs,
        max_items=max_items,
        pair_days=pair_days,
    )
    _run_build(
        [folder],
        output,
        registry,
        chip_size=chip_size,
        min_valid=min_valid,
        split=SplitConfig(block_size_m=block_size, seed=seed),
        overwrite=overwrite,
        strict=strict,
    )


def _bands_text(all_bands: tuple[str, ...], present: list[str], modality: str) -> str:
    if not all_bands:
        return modality
    if len(present) == len(all_bands):
        return f"{modality} (all {len(all_bands)} bands)"
    return f"{modality} ({', '.join(present)} of {len(all_bands)})"


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="A chip store.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show modalities, counts per split, grids and sources of a store."""
    from terrasynth.data.store import ChipStore

    opened = ChipStore.open(store)
    reg = opened.registry
    s = opened.summary()
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    out = Console()
    out.print(
        f"[bold]{store}[/]: {s['chips']} chips of {s['chip_size']} px; splits "
        + ", ".join(f"{k} {v}" for k, v in s["splits"].items())
    )
    t = Table("modality", "train", "val", "test", title="chips per modality and split")
    for m, c in s["modalities"].items():
        t.add_row(m, str(c["train"]), str(c["val"]), str(c["test"]))
    out.print(t)
    t = Table(
        "source",
        "scenes",
        "train/val/test",
        "modalities (bands)",
        "dates",
        "licence",
        title="sources",
    )
    for name, v in s["sources"].items():
        mods = "\n".join(_bands_text(reg[m].bands, b, m) for m, b in v["modalities"].items())
        d = v["dates"]
        dates = f"{d['count']}: {d['first']} .. {d['last']}" if d["count"] else "-"
        splits = "/".join(str(v["splits"][k]) for k in ("train", "val", "test"))
        t.add_row(name, str(v["scenes"]), splits, mods, dates, v["licence"])
    out.print(t)
    out.print("CRS: " + ", ".join(s["crs"]))
    out.print("GSD (m): " + ", ".join(f"{g:g}" for g in s["gsd_m"]))


@app.command()
def preview(
    store: Annotated[Path, typer.Argument(help="A chip store.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write.")] = Path(
        "preview.png"
    ),
    chips: Annotated[int, count_option("Chips per modality.", "-n", "--chips")] = 6,
    seed: Annotated[int, SEED] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier terrasynth preview at --output.")
    ] = False,
) -> None:
    """Render a quick-look PNG of chips, one row per modality."""
    from terrasynth.data.preview import check_preview, render_preview
    from terrasynth.data.store import ChipStore

    check_preview(output, overwrite)  # before opening the store
    opened = ChipStore.open(store)
    path = render_preview(opened, output, chips_per_modality=chips, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {path}")
