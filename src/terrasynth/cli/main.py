"""Entry point: ``terrasynth`` with its sub-commands.

User errors (:class:`TerrasynthError`) end as one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from terrasynth.atomic import check_output, write_marker
from terrasynth.cli import stac_options
from terrasynth.cli.checks import (
    BBOX,
    DEVICE,
    ETA,
    PRECISION,
    SAMPLES,
    SEED,
    STEPS,
    WINDOW,
    WORKERS,
    above,
    at_least,
    between,
    count_option,
    device_check,
    existing,
    fraction,
    iso_date,
    one_of,
    one_of_lazy,
    parse_bbox,
    parse_window,
)
from terrasynth.cli.data import app as data_app
from terrasynth.cli.data import inputs_check, numbers_check, parse_inputs, parse_numbers
from terrasynth.data.split import SPLITS
from terrasynth.errors import TerrasynthError
from terrasynth.models.config import BACKBONES, PRESETS

app = typer.Typer(
    help="Unified multimodal Earth-observation generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")


def _baselines() -> list[str]:
    from terrasynth.evaluation.baselines import BASELINES

    return list(BASELINES)


def _not_yet(what: str, issue: str) -> None:
    raise TerrasynthError(f"'{what}' is not available yet in this version ({issue})")


# options generate and embed share
SCALE = typer.Option(help="MOD=FACTOR: physical = raw * FACTOR + offset.", callback=numbers_check)
OFFSET = typer.Option(help="MOD=OFFSET (see --scale).", callback=numbers_check)
DATE = typer.Option(help="Acquisition date (YYYY-MM-DD).", callback=iso_date)
STRICT = typer.Option(help="Refuse inputs that only look suspicious.")
OVERWRITE = typer.Option(help="Replace an earlier terrasynth output in the output folder.")
MODEL = typer.Option("-m", "--model", help="Model or run folder (default: built-in).")

# ``train``'s options that are training settings, and the TrainConfig field each sets
TRAIN_SETTINGS = {
    "time_limit": "time_limit_min",
    "workers": "num_workers",
    **{k: k for k in ("preset", "backbone", "steps", "batch_size", "accumulate", "lr")},
    **{k: k for k in ("checkpoint_every", "schedule", "bf16", "seed", "source_balance")},
    **{k: k for k in ("balance_by", "derive", "relief_scale")},
}


@app.command()
def train(
    ctx: typer.Context,
    store: Annotated[Path, typer.Option("-d", "--data", help="Chip store to train on.")],
    run: Annotated[Path, typer.Option("-o", "--output", help="Run folder.")],
    preset: Annotated[
        str,
        typer.Option(help="Model size: tiny, small or base.", callback=one_of(*PRESETS)),
    ] = "tiny",
    backbone: Annotated[
        str,
        typer.Option(
            help="Model class: 'scene_transformer', 'conv_generator' or 'unet'.",
            callback=one_of(*BACKBONES),
        ),
    ] = "scene_transformer",
    steps: Annotated[int, count_option("Optimiser steps in all.")] = 1400,
    batch_size: Annotated[int, count_option("Chips per process and micro-step.")] = 24,
    accumulate: Annotated[int, count_option("Micro-steps per optimiser step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.", callback=above(0))] = 1.5e-3,
    checkpoint_every: Annotated[int, count_option("Steps between checkpoints.")] = 200,
    time_limit: Annotated[
        float,
        typer.Option(
            help="Stop after this many minutes of training in all, a resumed run's earlier "
            "time included (0: no).",
            callback=at_least(0),
        ),
    ] = 0.0,
    schedule: Annotated[
        str,
        typer.Option(
            help="Learning-rate decay over 'steps' or over the 'time' limit.",
            callback=one_of("steps", "time"),
        ),
    ] = "steps",
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast.")] = True,
    workers: Annotated[int, WORKERS] = 0,
    seed: Annotated[int, SEED] = 0,
    source_balance: Annotated[
        float,
        typer.Option(
            help="1: chip groups in store proportions; 0: each equally often.", callback=fraction
        ),
    ] = 0.5,
    balance_by: Annotated[
        str,
        typer.Option(
            help="Chip groups to balance: 'kind' (source and modality set) or 'source'.",
            callback=one_of("kind", "source"),
        ),
    ] = "kind",
    derive: Annotated[
        bool, typer.Option(help="Fill derived modalities (slope from DEM) into training chips.")
    ] = True,
    relief_scale: Annotated[
        float,
        typer.Option(
            help="Chance that a training chip's DEM is flattened, slope recomputed.",
            callback=fraction,
        ),
    ] = 0.6,
    resume: Annotated[bool, typer.Option(help="Continue the run in the output folder.")] = False,
    device: Annotated[
        str,
        typer.Option(
            help="Where to train: auto (a GPU if there is one; under torchrun each process's "
            "cuda:LOCAL_RANK), cpu, cuda, cuda:N or mps.",
            callback=device_check,
        ),
    ] = "auto",
) -> None:
    """Train the scene model on a chip store (multi-GPU/-node: launch with torchrun)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from terrasynth.data.store import ChipStore
    from terrasynth.training.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        preset=preset,
        backbone=backbone,
        steps=steps,
        batch_size=batch_size,
        accumulate=accumulate,
        lr=lr,
        checkpoint_every=checkpoint_every,
        time_limit_min=time_limit,
        schedule=schedule,
        bf16=bf16,
        num_workers=workers,
        seed=seed,
        source_balance=source_balance,
        balance_by=balance_by,
        derive=derive,
        relief_scale=relief_scale,
    )
    # the settings given on the command line: on --resume, those must match the saved ones
    given = [
        field
        for option, field in TRAIN_SETTINGS.items()
        # by name: typer's click (vendored or not) has its own ParameterSource enum
        if getattr(ctx.get_parameter_source(option), "name", "DEFAULT") != "DEFAULT"
    ]
    ChipStore.open(store)  # a clear error for a missing store, before the run folder is made
    _claim_run_folder(run, "train", resume)
    trainer = Trainer(store, run, cfg, resume=resume, given=given, device=device)
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


def _claim_run_folder(run: Path, command: str, resume: bool) -> None:
    """A new run goes into an empty folder, or one terrasynth wrote (an earlier run that
    stopped before its first checkpoint); never into a folder of the user's files."""
    if resume or (run / "latest").exists() or int(os.environ.get("RANK", "0")) != 0:
        return  # the trainer resumes or refuses it; DDP: the first process decides
    check_output(run, overwrite=True)
    run.mkdir(parents=True, exist_ok=True)
    write_marker(run, command)


@app.command()
def generate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    target: Annotated[
        list[str], typer.Option("-t", "--target", help="Modality to generate (repeatable).")
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "-i",
            "--input",
            help="MOD[:B1,B2]=FILE GeoTIFF to condition on (repeatable).",
            callback=inputs_check,
        ),
    ] = None,
    model: Annotated[Path | None, MODEL] = None,
    num_samples: Annotated[int, SAMPLES] = 4,
    seed: Annotated[int, SEED] = 0,
    steps: Annotated[int | None, STEPS] = None,
    eta: Annotated[float, ETA] = 0.0,
    guidance: Annotated[
        float, typer.Option(help="Classifier-free guidance scale.", callback=at_least(0))
    ] = 1.0,
    scale: Annotated[list[str] | None, SCALE] = None,
    offset: Annotated[list[str] | None, OFFSET] = None,
    size: Annotated[int | None, count_option("Joint generation: pixels per side.")] = None,
    gsd: Annotated[
        float | None,
        typer.Option(
            help="Metres per pixel to generate at (default: the inputs' own, or 10).",
            callback=above(0),
        ),
    ] = None,
    lon: Annotated[
        float | None,
        typer.Option(help="Joint generation: longitude.", callback=between(-180, 180)),
    ] = None,
    lat: Annotated[
        float | None,
        typer.Option(help="Joint generation: latitude.", callback=between(-90, 90)),
    ] = None,
    date: Annotated[str | None, DATE] = None,
    batch_size: Annotated[int, count_option("Windows per model call.")] = 32,
    strict: Annotated[bool, STRICT] = False,
    overwrite: Annotated[bool, OVERWRITE] = False,
    stream: Annotated[
        bool,
        typer.Option(
            help="Whole-scene engine: tiles streamed from and to disk, resumable "
            "(automatic above 1024 px per side)."
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="Whole scenes: 'local' (this process) or 'dask'.",
            callback=one_of("local", "dask"),
        ),
    ] = "local",
    workers: Annotated[int, count_option("Dask: local worker processes.")] = 2,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask: address of a running scheduler.")
    ] = None,
    tile: Annotated[
        int,
        typer.Option(
            help="Whole scenes: tile size in px (a multiple of 64, at least the model's window)."
        ),
    ] = 256,
    cascade: Annotated[
        float | None,
        typer.Option(
            help="Whole scenes: first generate at this coarser GSD (m), then refine at the "
            "working GSD starting from the up-sampled result (implies --stream).",
            callback=above(0),
        ),
    ] = None,
    cascade_start: Annotated[
        float,
        typer.Option(
            help="Noise level (0-1) the fine level of a cascade starts at.",
            callback=between(0.01, 1.0),
        ),
    ] = 0.6,
    stac: Annotated[
        str | None, typer.Option("--stac", help="Inputs from a STAC API search (docs/stac.md).")
    ] = None,
    collections: Annotated[list[str] | None, stac_options.COLLECTIONS] = None,
    stac_datetime: Annotated[str | None, stac_options.DATETIME] = None,
    mapping: Annotated[Path | None, stac_options.MAPPING] = None,
    crs: Annotated[str | None, stac_options.CRS] = None,
    max_items: Annotated[int, stac_options.MAX_ITEMS] = 100,
    stac_dir: Annotated[
        Path | None,
        typer.Option(
            help="--stac: folder for the downloads (default: OUTPUT.stac); a rerun skips "
            "complete files."
        ),
    ] = None,
    window: Annotated[str | None, WINDOW] = None,
    bbox: Annotated[str | None, BBOX] = None,
    device: Annotated[str, DEVICE] = "cpu",
    precision: Annotated[str, PRECISION] = "auto",
) -> None:
    """Generate modalities from GeoTIFFs (any CRS) onto the first input's grid.

    Translation: -i s1grd=s1.tif -t s2l2a. Band infilling: -i s2l2a:B04,B03,B02=rgb.tif
    -t s2l2a. Joint generation: no -i, -t s2l2a -t dem [--size --gsd --lon --lat].
    Scenes larger than 1024 px (or with --stream) run tile by tile with state on disk
    (OUTPUT.work): rerun the same command after an interruption to resume. Inputs may be
    URLs GDAL reads (https://, s3://, /vsicurl/, /vsis3/); --window or --bbox reads and
    generates only part of the first input.
    """
    from terrasynth.pipeline import Pipeline
    from terrasynth.scenes.engine import remove_trash

    remove_trash(output)  # before the output check: a finished run killed while cleaning up
    check_output(output, overwrite)
    if (lon is None) != (lat is None):
        raise TerrasynthError("give both --lon and --lat, or neither")
    scaling = _scaling(scale, offset)
    if stac is None and (collections or stac_datetime or mapping):
        raise TerrasynthError("--collections, --datetime and --mapping need --stac")
    whole = stream or cascade or engine != "local" or scheduler is not None
    if device != "cpu" and (engine != "local" or scheduler is not None):
        raise TerrasynthError(
            "--device works with --engine local; Dask workers run the model on their CPUs"
        )
    pipe = Pipeline.from_pretrained(model).to(device).set_precision(precision)
    if stac is not None:  # the found assets on one grid (the bbox) become the first inputs
        stac_inputs, day = _stac_inputs(
            stac, collections, bbox, stac_datetime, mapping, crs, gsd, max_items,
            stac_dir or output.with_name(output.name + ".stac"),
        )  # fmt: skip
        inputs = [f"{m}={f}" for m, f in stac_inputs] + list(inputs or [])
        date = date or f"{day:%Y-%m-%d}"
        bbox = None  # the fetched grid is the bbox already
    from terrasynth.models.base import sampling_steps
    from terrasynth.scenes.job import JobSpec
    from terrasynth.scenes.plan import check_tile

    check_tile(tile, pipe.model.config.window_size)
    steps = sampling_steps(pipe.model, steps)
    items = parse_inputs(inputs or [])
    part, region = _region(pipe, items, window, bbox)

    # the same settings drive in-memory generation and the whole-scene engine
    settings = dict(
        num_samples=num_samples, seed=seed, steps=steps, eta=eta, guidance=guidance,
        scaling=scaling, size=size, gsd=gsd, time=date, batch_size=batch_size, strict=strict,
        location=(lon, lat) if lon is not None else None,
    )  # fmt: skip
    spec = JobSpec(
        inputs=[(k, str(v)) for k, v in items],
        targets=list(target),
        tile=tile,
        cascade=cascade,
        cascade_start=cascade_start,
        window=region,
        **settings,
    )
    if not whole:
        refusal = pipe.in_memory_refusal(spec.inputs, gsd, size, part)  # from the headers only
        if refusal is not None:
            typer.echo(f"note: {refusal}: generating it with the whole-scene engine")
            whole = True
    if whole:
        _generate_scene(pipe, spec, output, overwrite, engine, scheduler, workers)
        return
    with _progress("generating", "model calls") as progress:
        task = progress.add_task("gen", total=None)
        result = pipe.generate(
            items,
            target,
            **settings,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            window=region,
        )
    for w in result.info["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    files = result.save(output, overwrite=overwrite)
    typer.echo(
        f"{len(files)} files in {output.resolve()} "
        f"({num_samples} samples of {', '.join(result.targets)}; "
        f"{result.info['seconds']:.1f} s); quick look: {output / 'quicklook.png'}"
    )


def _scaling(scale: list[str] | None, offset: list[str] | None) -> dict:
    """``--scale`` / ``--offset`` values as ``{modality: (scale, offset)}``."""
    scales = parse_numbers(scale or [], "--scale")
    offsets = parse_numbers(offset or [], "--offset")
    return {m: (scales.get(m, 1.0), offsets.get(m, 0.0)) for m in {*scales, *offsets}}


def _region(pipe, items, window: str | None, bbox: str | None):
    """The part of the first input ``--window`` / ``--bbox`` select (from its header), as a
    Window and as (COL, ROW, WIDTH, HEIGHT); (None, None) without them."""
    part = pipe.input_window(items, parse_window(window), parse_bbox(bbox))
    region = (int(part.col_off), int(part.row_off), part.width, part.height) if part else None
    return part, region


def _written_info(path: Path) -> dict:
    """The settings file of a written output; its warnings shown, one line each."""
    info = json.loads(path.read_text())
    for w in info["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    return info


def _progress(label: str, unit: str):
    """A transient progress bar: ``label``, the bar, ``done/total unit``, time left."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} " + unit),
        TimeRemainingColumn(),
        transient=True,
    )


@contextmanager
def _progress_steps(name: str, unit: str):
    """A progress bar driven by the ``step(what, done, total)`` callbacks long jobs take."""
    with _progress("{task.description}", unit) as progress:
        bar = progress.add_task(name, total=None)
        yield lambda what, done, total: progress.update(
            bar, description=what, completed=done, total=total
        )


def _stac_inputs(url, collections, bbox, when, mapping, crs, gsd, max_items, folder: Path):
    """``generate --stac``: search and fetch into ``folder``; per modality the day with the
    most valid pixels as one GeoTIFF in ``folder/inputs``; (inputs, day of the first)."""
    from terrasynth.data.stac_fetch import input_stack
    from terrasynth.modalities import default_registry

    registry = default_registry()
    result = stac_options.run_fetch(
        url, collections, bbox, when, folder, registry, mapping=mapping, resolution=gsd,
        crs=crs, max_items=max_items,
    )  # fmt: skip
    stack, day = input_stack(result, folder / "inputs", registry)
    typer.echo("inputs from STAC: " + ", ".join(f"{m}={f}" for m, f in stack), err=True)
    return stack, day


def _generate_scene(pipe, spec, output: Path, overwrite, engine, scheduler, workers) -> None:
    """The whole-scene path of ``generate``: tiles, state on disk, resumable."""
    from terrasynth.scenes.engine import generate_scene

    def started(job) -> None:
        tasks = len(job.phases()) * len(job.tiles())
        left = sum(len(job.pending(p)) for p in job.phases())
        w = job.work
        typer.echo(
            f"whole scene: {job.grid.width} x {job.grid.height} px at {job.gsd:.1f} m "
            f"({w.crs.to_string()}), {len(job.tiles())} tiles x {len(job.phases())} phases; "
            f"state in {job.folder} (rerun the same command to resume)"
        )
        if left < tasks:
            typer.echo(f"resuming: {tasks - left} of {tasks} tile tasks already done")

    with _progress("{task.description}", "tile tasks") as progress:
        bar = progress.add_task("whole scene", total=None)
        files = generate_scene(
            pipe,
            spec,
            output,
            overwrite=overwrite,
            engine="dask" if scheduler is not None else engine,
            address=scheduler,
            workers=workers,
            progress=lambda phase, done, total: progress.update(
                bar, description=phase, completed=done, total=total
            ),
            on_start=started,
        )
    info = _written_info(output / "generation.json")
    typer.echo(
        f"{len(files)} files in {output.resolve()} ({spec.num_samples} samples of "
        f"{', '.join(spec.targets)}; {info['seconds']:.1f} s); quick look: "
        f"{output / 'quicklook.png'}"
    )


@app.command()
def embed(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    inputs: Annotated[
        list[str],
        typer.Option(
            "-i",
            "--input",
            help="MOD[:B1,B2]=FILE GeoTIFF to embed (repeatable; any subset the model knows).",
            callback=inputs_check,
        ),
    ],
    model: Annotated[Path | None, MODEL] = None,
    chip_size: Annotated[
        int,
        count_option(
            "Chip side in working-grid pixels for chips.parquet (a multiple of the model's "
            "feature resolution)."
        ),
    ] = 64,
    scale: Annotated[list[str] | None, SCALE] = None,
    offset: Annotated[list[str] | None, OFFSET] = None,
    date: Annotated[str | None, DATE] = None,
    tile: Annotated[
        int,
        typer.Option(help="Tile size in px (a multiple of 64, at least the model's window)."),
    ] = 256,
    batch_size: Annotated[int, count_option("Windows per model call.")] = 32,
    strict: Annotated[bool, STRICT] = False,
    overwrite: Annotated[bool, OVERWRITE] = False,
    window: Annotated[str | None, WINDOW] = None,
    bbox: Annotated[str | None, BBOX] = None,
    device: Annotated[str, DEVICE] = "cpu",
) -> None:
    """Embed GeoTIFFs: the model's features per pixel and per chip, georeferenced.

    Writes OUTPUT/embedding.tif (float32, one band per feature, at the model's feature
    resolution on the first input's grid when it is projected in metres, a local UTM grid
    otherwise; NaN where no input lies), OUTPUT/chips.parquet (mean embedding per chip of
    --chip-size px, with chip ids and centres in the CRS and in lon/lat) and
    OUTPUT/embedding.json. Any scene size: tiles are read, embedded and written one at a
    time (memory flat in the scene's size). --window or --bbox embeds part of the first input.
    """
    from terrasynth.pipeline import Pipeline
    from terrasynth.scenes.embed import embed_scene

    check_output(output, overwrite)
    scaling = _scaling(scale, offset)
    pipe = Pipeline.from_pretrained(model).to(device)
    items = parse_inputs(inputs)
    pipe._check_inputs(items)
    part, region = _region(pipe, items, window, bbox)

    def started(info: dict) -> None:
        g = info["grid"]
        typer.echo(
            f"embedding: {info['channels']} features on {g['width']} x {g['height']} px at "
            f"{info['feature_gsd_m']:g} m ({g['crs']}), {info['tiles']} tiles"
        )

    with _progress("embedding", "tiles") as progress:
        bar = progress.add_task("embed", total=None)
        files = embed_scene(
            pipe, items, output, chip_size, scaling=scaling, time=date, window=region,
            tile=tile, batch_size=batch_size, strict=strict, overwrite=overwrite,
            progress=lambda done, total: progress.update(bar, completed=done, total=total),
            on_start=started,
        )  # fmt: skip
    info = _written_info(output / "embedding.json")
    typer.echo(
        f"{len(files)} files in {output.resolve()} (embedding.tif: {info['channels']} "
        f"features; chips.parquet: chips of {chip_size} px; {info['seconds']:.1f} s)"
    )


@app.command()
def evaluate(
    store: Annotated[Path, typer.Option("-d", "--data", help="Chip store to evaluate on.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Report folder.")],
    model: Annotated[Path | None, MODEL] = None,
    split: Annotated[
        str, typer.Option(help="Split: test, val or train.", callback=one_of(*SPLITS))
    ] = "test",
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            help="Baselines to run beside the model: mean, knn, unet, unet_noise.",
            callback=one_of_lazy(_baselines),
        ),
    ] = None,
    unet: Annotated[
        Path | None,
        typer.Option(
            help="U-Net run or model folder for --baseline unet / unet_noise (baseline train-unet)."
        ),
    ] = None,
    target: Annotated[
        list[str] | None, typer.Option("-t", "--target", help="Only these target modalities.")
    ] = None,
    num_samples: Annotated[int, SAMPLES] = 4,
    steps: Annotated[int | None, STEPS] = None,
    eta: Annotated[float, ETA] = 0.0,
    seed: Annotated[int, SEED] = 0,
    max_chips: Annotated[
        int | None,
        count_option("At most this many chips per direction."),
    ] = None,
    no_model: Annotated[bool, typer.Option(help="Run the baselines only.")] = False,
    protocol: Annotated[
        Path | None,
        typer.Option(
            help="Frozen protocol JSON: settings and chip ids per direction.", callback=existing
        ),
    ] = None,
    seam_input: Annotated[
        list[str] | None,
        typer.Option(
            help="MOD=FILE: also measure seams of this scene (shared vs independent).",
            callback=inputs_check,
        ),
    ] = None,
    seam_target: Annotated[
        list[str] | None, typer.Option(help="Targets of the seam scene (default s2l2a).")
    ] = None,
    shuffle_conditions: Annotated[
        bool,
        typer.Option(
            help="Input-dependence test: also generate every chip from another chip's "
            "conditions (crps_shuffled, input_dependence); doubles the time."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier terrasynth report in the output folder.")
    ] = False,
    device: Annotated[str, DEVICE] = "cpu",
    precision: Annotated[str, PRECISION] = "auto",
) -> None:
    """Score generation on a store's split against baselines (JSON, CSV, report).

    Each modality from all others and from each other one; pointwise, distribution and
    calibration metrics.
    """

    import torch

    from terrasynth.data.store import ChipStore
    from terrasynth.evaluation.baselines import make_baseline
    from terrasynth.evaluation.benchmark import (
        ModelPredictor,
        default_directions,
        parse_direction,
        protocol_of,
        run_benchmark,
    )
    from terrasynth.evaluation.report import write_report
    from terrasynth.pipeline import Pipeline

    check_output(output, overwrite)
    ChipStore.open(store)  # a clear error for a missing or broken store
    uses_unet = [b for b in baseline or [] if b in ("unet", "unet_noise")]
    if uses_unet and unet is None:
        raise TerrasynthError(
            f"--baseline {uses_unet[0]} needs --unet FOLDER (train one with "
            "`terrasynth baseline train-unet`)"
        )
    if unet is not None and not uses_unet:
        raise TerrasynthError("--unet is only used with --baseline unet or unet_noise")
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
    pipe = Pipeline.from_pretrained(model).to(device).set_precision(precision)
    config = pipe.model.config
    for t in target or []:
        if t not in pipe.modalities:
            raise TerrasynthError(
                f"the model cannot generate '{t}' (it knows: {', '.join(pipe.modalities)})"
            )
    from terrasynth.models.base import sampling_steps

    steps = sampling_steps(pipe.model, steps)
    predictors = [] if no_model else [ModelPredictor(pipe.model, steps=steps, eta=eta)]
    for name in baseline or []:
        predictors.append(make_baseline(name, config, store, unet))
        if isinstance(getattr(predictors[-1], "model", None), torch.nn.Module):
            predictors[-1].model.to(pipe.device)  # the U-Net baselines run where the model does
        for w in getattr(predictors[-1], "warnings", []):
            typer.echo(f"warning: {w}", err=True)
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
        progress=typer.echo,
        chips=frozen["directions"] if frozen is not None else None,
        shuffle_conditions=shuffle_conditions,
    )  # fmt: skip
    settings = {
        "model": pipe.source, "store": str(store), "split": split, "num_samples": num_samples,
        "steps": steps, "eta": eta, "seed": seed, "max_chips": max_chips,
    }  # fmt: skip
    if unet is not None:
        settings["unet"] = str(unet)
    if shuffle_conditions:
        settings["shuffle_conditions"] = True
    if str(pipe.device) != "cpu":
        settings["device"] = str(pipe.device)
    settings["precision"] = pipe.precision
    for p in predictors:
        if hasattr(p, "fitted"):
            settings[f"{p.name}_sigmas"] = p.fitted()
    seams = None
    if seam_input:
        from terrasynth.evaluation.seams import scene_seams

        typer.echo("seams: generating the scene with shared noise and independent tiles")
        seam_inputs = parse_inputs(seam_input, "--seam-input")
        seams = scene_seams(pipe, seam_inputs, seam_target or ["s2l2a"], seed, steps)
        settings["seam_input"] = list(seam_input)
    report = write_report(
        results, output, settings, protocol_of(results, settings), seams, overwrite=overwrite
    )
    typer.echo(f"{len(results)} direction x predictor results; report {report.resolve()}")


@app.command()
def probe(
    model: Annotated[Path | None, MODEL] = None,
    store: Annotated[
        Path | None, typer.Option("-d", "--data", help="Chip store with label modalities.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Folder for probe.csv, probe.md.")
    ] = None,
    unet: Annotated[
        Path | None,
        typer.Option(help="U-Net run or model folder whose features are compared too."),
    ] = None,
    labels: Annotated[
        list[str] | None, typer.Option("--labels", help="Only these label modalities.")
    ] = None,
    max_chips: Annotated[
        int | None, count_option("At most this many chips per label set and split.")
    ] = None,
    seed: Annotated[int, SEED] = 0,
    batch_size: Annotated[int, count_option("Chips per batch.")] = 16,
    head: Annotated[
        str,
        typer.Option(
            help="Probe on the frozen features: linear, mlp (2 layers) or both.",
            callback=one_of("linear", "mlp", "both"),
        ),
    ] = "linear",
    overwrite: Annotated[bool, OVERWRITE] = False,
    device: Annotated[str, DEVICE] = "cpu",
) -> None:
    """Linear probes (--head mlp: a small MLP head) of the model's embeddings on the
    store's label modalities.

    Per label set (class maps, label vectors) and input subset: the model's features, a
    randomly initialised model of the same architecture, raw band statistics and the
    U-Net's features (--unet); accuracy, macro F1 and mIoU on the test split with
    bootstrap 95 % intervals. The heads are trained on frozen features. See docs/probe.md.
    """
    from terrasynth.data.store import ChipStore
    from terrasynth.evaluation.baselines import load_unet
    from terrasynth.evaluation.probe import HEADS, label_modalities, run_probes, write_probes
    from terrasynth.pipeline import Pipeline

    if store is None or output is None:
        raise TerrasynthError("probe needs a store (-d STORE) and an output folder (-o OUT)")
    check_output(output, overwrite)
    label_modalities(ChipStore.open(store), labels)  # a clear error before loading models
    pipe = Pipeline.from_pretrained(model).to(device)
    net = load_unet(unet).to(pipe.device) if unet is not None else None
    notes: list[str] = []
    heads = HEADS if head == "both" else (head,)
    t0 = time.perf_counter()
    with _progress_steps("probe", "chips") as step:
        rows = run_probes(
            pipe.model, store, net, labels, max_chips, seed, batch_size, step, notes, heads
        )
    for n in notes:
        typer.echo(f"warning: {n}", err=True)
    if not rows:
        raise TerrasynthError(f"{store}: no label set could be probed")
    settings = {
        "model": pipe.source, "store": str(store), "unet": str(unet) if unet else None,
        "max_chips": max_chips, "seed": seed, "head": head,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    write_probes(rows, output, settings, overwrite=overwrite)
    sets = len({r.label for r in rows})
    typer.echo(f"{sets} label sets, {len(rows)} scores in {output.resolve()} (probe.csv, probe.md)")


@app.command()
def tim(
    model: Annotated[Path | None, MODEL] = None,
    store: Annotated[
        Path | None, typer.Option("-d", "--data", help="Chip store with the label set.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Folder for tim.csv, tim.md.")
    ] = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="The label modality (a class map).")
    ] = None,
    given: Annotated[
        str | None, typer.Option(help="Given modalities, MOD[,MOD]: the inputs of arm (a).")
    ] = None,
    generate: Annotated[
        str | None, typer.Option(help="The modality the model generates as extra input.")
    ] = None,
    samples: Annotated[
        int, typer.Option(help="Samples whose mean and spread arm (b2) gets.", callback=at_least(1))
    ] = 4,
    max_chips: Annotated[int | None, count_option("At most this many chips per split.")] = None,
    epochs: Annotated[int, count_option("Training epochs of each segmenter.")] = 30,
    minutes: Annotated[
        float | None,
        typer.Option(
            help="Stop each segmenter's training after this many minutes.", callback=at_least(0.01)
        ),
    ] = None,
    width: Annotated[int, count_option("Channels of the segmenter's layers.")] = 32,
    seed: Annotated[int, SEED] = 0,
    overwrite: Annotated[bool, OVERWRITE] = False,
    device: Annotated[str, DEVICE] = "cpu",
) -> None:
    """Thinking in modalities: does a generated modality help a downstream segmenter?

    Trains the same small segmenter, budget and seed on (a) the given inputs, (b1) those
    and one generated sample of --generate, (b2) those and the mean and spread of --samples
    samples, (c) those and the real modality; accuracy, macro F1 and mIoU on the test chips
    with bootstrap 95 % intervals. See docs/tim.md.
    """
    from terrasynth.data.store import ChipStore
    from terrasynth.evaluation.tim import check_task, run_tim, write_tim
    from terrasynth.pipeline import Pipeline

    if store is None or output is None or labels is None or generate is None or given is None:
        raise TerrasynthError(
            "tim needs a store (-d), an output folder (-o), --labels, --given and --generate"
        )
    check_output(output, overwrite)
    inputs = [m.strip() for m in given.split(",") if m.strip()]
    check_task(ChipStore.open(store), None, labels, inputs, generate)  # before loading models
    pipe = Pipeline.from_pretrained(model).to(device)
    notes: list[str] = []
    t0 = time.perf_counter()
    with _progress_steps("tim", "steps") as step:
        rows = run_tim(
            pipe.model, store, labels, inputs, generate, samples, max_chips, epochs, minutes,
            seed, width, step, notes,
        )  # fmt: skip
    for n in notes:
        typer.echo(f"warning: {n}", err=True)
    settings = {
        "model": pipe.source, "store": str(store), "samples": samples, "max_chips": max_chips,
        "epochs": epochs, "minutes": minutes, "width": width, "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    write_tim(rows, output, settings, overwrite=overwrite)
    arms = len({r.arm for r in rows})
    typer.echo(f"{arms} arms scored in {output.resolve()} (tim.csv, tim.md)")


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option("-m", "--model", help="Model or run folder.")],
    store: Annotated[Path, typer.Option("-d", "--data", help="Chip store.")],
    split: Annotated[
        str, typer.Option(help="Split to fit on (never test).", callback=one_of(*SPLITS))
    ] = "val",
    members: Annotated[int, typer.Option(help="Samples per chip.", callback=at_least(2))] = 8,
    max_chips: Annotated[int, count_option("Chips per modality.")] = 64,
    seed: Annotated[int, SEED] = 0,
    bands: Annotated[
        bool, typer.Option(help="Also fit the spread per band and spatial scale (spread_bands).")
    ] = True,
    mean: Annotated[
        bool,
        typer.Option(help="First fit the mean per band and spatial scale (mean_bands)."),
    ] = True,
    level_bound: Annotated[
        bool,
        typer.Option(
            help="Before all, refit a trained level_correction_bound (elevation) by CRPS."
        ),
    ] = True,
) -> None:
    """Fit the spread of a one-step generator per modality on the validation split.

    Writes ``mean_bands`` (per band and spatial scale, the mean's factor best matching the
    truth, its level kept; not with ``--no-mean``), ``spread_bands`` (per band and spatial
    scale, spread matching error; not with ``--no-bands``) and ``spread_scale`` (then the
    factor minimising CRPS) into the model's config.json; first, for a model trained with
    ``level_correction_bound``, the multiple of it with the least elevation CRPS (not with
    ``--no-level-bound``)."""
    from terrasynth.data.store import ChipStore
    from terrasynth.evaluation.calibration import fit_level_bound, fit_spread_scale
    from terrasynth.pipeline import Pipeline

    if split == "test":
        raise TerrasynthError("calibrate on the validation split, never on the test split")
    ChipStore.open(store)
    pipe = Pipeline.from_pretrained(model)
    cfg = pipe.model.config
    if cfg.backbone != "conv_generator":
        raise TerrasynthError(f"{model}: only one-step generators (conv_generator) have a spread")
    bounds = (
        fit_level_bound(pipe.model, str(store), split, members, max_chips, seed=seed)
        if level_bound
        else None
    )
    if bounds:
        best = min(bounds, key=bounds.__getitem__)
        tried = ", ".join(f"{b:g}: {c:.4f}" for b, c in bounds.items())
        typer.echo(f"level_correction_bound (elevation CRPS per bound): {tried} -> {best:g}")
        cfg.level_correction_bound = best
    fits = fit_spread_scale(
        pipe.model, str(store), split, members, max_chips, seed=seed, bands=bands, mean=mean
    )
    if not fits:
        raise TerrasynthError(f"{store}: no {split} chip holds a modality of the model")
    typer.echo(
        "modality  chips  scale  CRPS(1)  CRPS  spread/skill(1)  spread/skill  cov90(1)  cov90"
    )
    for name, fit in fits.items():
        r = fit.summary()
        typer.echo(
            f"{name:14s} {r['chips']:4d} {r['scale']:6.3f} {r['crps_at_1']:8.4f} {r['crps']:7.4f} "
            f"{r['spread_skill_at_1']:8.3f} {r['spread_skill']:13.3f} "
            f"{r['coverage_90_at_1']:9.3f} {r['coverage_90']:6.3f}"
        )
        if fit.mean_bands:
            typer.echo("  " + fit.mean_summary())
        if fit.bands:
            typer.echo("  " + fit.band_summary())
    cfg.spread_scale = {**cfg.spread_scale, **{n: f.scale for n, f in fits.items()}}
    kept = {n: b for n, b in cfg.spread_bands.items() if n not in fits}
    cfg.spread_bands = {**kept, **{n: f.bands for n, f in fits.items() if f.bands}}
    kept = {n: b for n, b in cfg.mean_bands.items() if n not in fits}
    cfg.mean_bands = {**kept, **{n: f.mean_bands for n, f in fits.items() if f.mean_bands}}
    cfg.save(Path(pipe.source) / "config.json")
    typer.echo(f"spread_scale written to {Path(pipe.source) / 'config.json'}")


baseline_app = typer.Typer(help="Train the benchmark's learned baselines.", no_args_is_help=True)
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("train-unet")
def train_unet(
    store: Annotated[Path, typer.Option("-d", "--data", help="Chip store to train on.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Run folder of the U-Net (new or empty).")
    ],
    minutes: Annotated[
        float,
        typer.Option(
            help="Wall-clock budget: the model's training time on this machine.", callback=above(0)
        ),
    ],
    batch_size: Annotated[int, count_option("Chips per step.")] = 24,
    seed: Annotated[int, SEED] = 0,
    model: Annotated[
        Path | None,
        typer.Option(
            "-m", "--model", help="Model or run folder giving modalities, statistics, window."
        ),
    ] = None,
    workers: Annotated[int, WORKERS] = 0,
) -> None:
    """Train the deterministic U-Net baseline of `evaluate --baseline unet --unet OUTPUT`.

    The model trainer with backbone 'unet' over the raster modalities, statistics and window
    of the model config (-m, default the built-in model), for --minutes of wall time."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from terrasynth.data.store import ChipStore
    from terrasynth.evaluation.baselines import stats_mismatch
    from terrasynth.models.config import ModelConfig
    from terrasynth.models.factory import model_folder
    from terrasynth.models.unet import unet_config
    from terrasynth.training.trainer import TrainConfig, Trainer

    if minutes <= 0:
        raise TerrasynthError("give a training budget: --minutes > 0")
    if output.exists() and any(output.iterdir()):
        raise TerrasynthError(f"{output} exists and is not empty")
    stats = ChipStore.open(store).stats  # a clear error for a missing or broken store
    _claim_run_folder(output, "baseline train-unet", resume=False)
    config = unet_config(ModelConfig.load(model_folder(model) / "config.json"))
    differ = stats_mismatch(config, stats)
    if differ:
        typer.echo(
            f"warning: the store's normalisation differs from the model's for "
            f"{', '.join(differ)}: the U-Net learns the store's units",
            err=True,
        )
    cfg = TrainConfig(
        backbone="unet",
        steps=10**9,  # the time limit stops it
        batch_size=batch_size,
        lr=2e-3,
        warmup=50,
        ema_decay=0.0,  # the exported model is the last weights
        bf16=False,
        checkpoint_every=1000,
        time_limit_min=minutes,
        schedule="time",
        seed=seed,
        num_workers=workers,
    )
    trainer = Trainer(store, output, cfg, model_config=config)
    with Progress(
        TextColumn("training U-Net"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task("unet", total=60.0 * minutes, info="")

        def on_log(rec: dict) -> None:
            progress.update(
                task,
                completed=rec["elapsed_s"],
                info=f"step {rec['step']} · loss {rec['loss']:.3f} · "
                f"{rec['samples_per_s']:.0f} chips/s",
            )

        t0 = time.perf_counter()
        reason = trainer.train(on_log)
    typer.echo(
        f"{reason} after {trainer.step} steps ({(time.perf_counter() - t0) / 60:.1f} min); "
        f"U-Net in {output / 'model'}"
    )
    if reason == "interrupted":
        raise typer.Exit(130)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path(
        "terrasynth-demo"
    ),
    num_samples: Annotated[int, count_option("Samples per job.", "-n", "--num-samples")] = 4,
    model: Annotated[Path | None, MODEL] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier demo (or other terrasynth output) there.")
    ] = False,
) -> None:
    """Run the main job on BigEarthNet patches shipped with the `demo` extra.

    S1 -> S2, S2 -> S1, S2 -> elevation and labels, band infilling; GeoTIFFs and a report.
    """
    from terrasynth.demo import run_demo

    check_output(output, overwrite)
    report = run_demo(
        output, num_samples=num_samples, model=model, log=typer.echo, overwrite=overwrite
    )
    typer.echo(f"outputs in {output.resolve()}")
    typer.echo(f"open {report.resolve()}")


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", callback=between(1, 65535))] = 8765,
    model: Annotated[Path | None, MODEL] = None,
    folder: Annotated[
        Path | None,
        typer.Option(help="Folder of GeoTIFFs the page may pick inputs from.", callback=existing),
    ] = None,
    workdir: Annotated[
        Path, typer.Option(help="Where uploads and jobs (with their outputs) are kept.")
    ] = Path("terrasynth-serve"),
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest upload in MiB.", callback=above(0))
    ] = 1024.0,
    max_pixels: Annotated[int, count_option("Most pixels per band of an upload.")] = 8192 * 8192,
    basemap: Annotated[
        str | None,
        typer.Option(help="Optional online basemap, a tile URL template with {z}/{x}/{y}."),
    ] = None,
) -> None:
    """A local map app: upload GeoTIFFs, generate, compare samples and spread on a map."""
    from terrasynth.extras import require
    from terrasynth.serve.app import ServeConfig, create_app
    from terrasynth.serve.inputs import Limits

    uvicorn = require("uvicorn", "serve", "terrasynth serve")
    if folder is not None and not folder.is_dir():
        raise TerrasynthError(f"--folder {folder}: not a folder")
    limits = Limits(max_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels)
    config = ServeConfig(workdir.resolve(), str(model) if model else None, folder, limits, basemap)
    application = create_app(config)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: whoever reaches it can use the app", err=True)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"terrasynth serve: open http://{shown}:{port}/ (uploads and jobs in {workdir})")
    uvicorn.run(application, host=host, port=port, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every bad option and every user error is one line
    ``error: ...`` on stderr and exit code 2 (an interruption: 130), never a traceback.
    Warnings of the libraries underneath are one line ``warning: ...`` each."""
    warnings.showwarning = _show_warning
    try:
        code = app(args=argv, prog_name="terrasynth", standalone_mode=False)
    except TerrasynthError as exc:
        _fail(str(exc), 2)
    except typer.TyperException as exc:  # click's own: bad syntax, type or option name
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is shown (as typer tests it)
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except typer.Abort:
        _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo("warning: " + " ".join(str(message).split()), err=True)


def _fail(message: str, code: int) -> None:
    typer.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
