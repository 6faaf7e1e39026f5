"""Options of ``data fetch`` and ``generate --stac``, and the fetch they run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from terrasynth.cli.checks import above, at_least, bbox_check, existing
from terrasynth.errors import TerrasynthError
from terrasynth.modalities import Registry

BBOX = typer.Option(
    help="W,S,E,N in degrees (WGS 84): the area searched and fetched.", callback=bbox_check
)
STAC_URL = typer.Option("--stac", help="STAC API landing page to search (pystac-client).")
COLLECTIONS = typer.Option(
    "--collections", help="STAC collection id(s) to search (repeatable, or comma-separated)."
)
DATETIME = typer.Option("--datetime", help="STAC datetime or interval, e.g. 2020-06-01/2020-09-30.")
MAPPING = typer.Option(
    help="YAML mapping of collections to modalities and assets to bands (docs/stac.md).",
    callback=existing,
)
RESOLUTION = typer.Option(
    help="Pixel size of the fetch grid in metres (default: the finest native GSD).",
    callback=above(0),
)
CRS = typer.Option(
    "--crs", help="CRS of the fetch grid (default: the first asset's, or the bbox's UTM zone)."
)
MAX_ITEMS = typer.Option(help="At most this many STAC items.", callback=at_least(1))
PAIR_DAYS = typer.Option(
    help="Days within which acquisitions of different modalities pair into one scene.",
    callback=at_least(0),
)


def run_fetch(
    url: str,
    collections: list[str] | None,
    bbox: str | None,
    when: str | None,
    folder: Path,
    registry: Registry,
    *,
    mapping: Path | None = None,
    resolution: float | None = None,
    crs: str | None = None,
    max_items: int = 100,
    pair_days: float = 16.0,
):
    """Search and download into ``folder`` with a progress bar; returns the
    :class:`~terrasynth.data.stac_fetch.FetchResult`."""
    from terrasynth.data.stac_fetch import Query, fetch, load_mapping, parse_bbox

    ids = tuple(c.strip() for v in collections or [] for c in v.split(",") if c.strip())
    if not ids:
        raise TerrasynthError("--stac needs --collections ID (one or more)")
    if bbox is None:
        raise TerrasynthError("--stac needs --bbox W,S,E,N")
    query = Query(url, ids, parse_bbox(bbox), when, max_items)
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("searching", total=None)

        def on_file(done: int, total: int, what: str) -> None:
            progress.update(task, description=f"fetching {what}", completed=done, total=total)

        result = fetch(
            query,
            folder,
            registry,
            mapping=load_mapping(mapping),
            crs=crs,
            resolution=resolution,
            pair_days=pair_days,
            on_file=on_file,
        )
    if result.unmapped:
        shown = ", ".join(result.unmapped[:8]) + (" ..." if len(result.unmapped) > 8 else "")
        console.print(
            f"note: raster assets mapped to no band (left out): {shown}",
            soft_wrap=True,
            highlight=False,
        )
    g = result.grid
    console.print(
        f"{result.items} STAC items, {len(result.acquisitions)} acquisitions on "
        f"{g.width} x {g.height} px of {g.ground_resolution_m():g} m ({g.crs.to_string()}); "
        f"{len(result.files) - result.skipped} files fetched, {result.skipped} already "
        f"complete, in {result.folder}",
        soft_wrap=True,
        highlight=False,
    )
    return result
