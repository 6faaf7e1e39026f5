"""Embed a whole scene tile by tile: memory flat in the scene's size.

>>> from terrasynth.scenes.embed import embed_scene
>>> embed_scene(pipe, [("s2l2a", "s2_4096.tif")], "out/", chip_size=64)

The geometry is a whole-scene job's (``terrasynth.scenes.plan``): embedding windows on one
global layout over the padded working grid, cut into tiles. A tile reads only its region
(the tile grown by one window) of every input (``terrasynth.scenes.inputs``), runs the
windows that overlap it, blends them like :meth:`terrasynth.pipeline.Pipeline.embed` does,
and writes its part of ``embedding.tif``; its chips' sums are kept (one row per chip), and
``chips.parquet`` is written at the end. The result equals the in-memory embedding of the
same inputs. Everything is written into a temporary sibling of the output folder that is
renamed into place at the end: a failed or interrupted run leaves nothing behind (and is
rerun from the start; there is no state to resume, only one pass).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from terrasynth.arrays import input_header
from terrasynth.atomic import atomic_folder, check_output, output_files
from terrasynth.data.raster_io import cropped_grid
from terrasynth.embedding import (
    CHIPS_PARQUET,
    EMBEDDING_JSON,
    EMBEDDING_TIF,
    ChipMeans,
    EmbeddingWriter,
    check_chip_size,
    embedding_grid,
    embedding_tags,
    feature_names,
    write_chips,
)
from terrasynth.errors import InputError, TerrasynthError
from terrasynth.models.signals import batch_signals
from terrasynth.pipeline import Pipeline, days_since_epoch, header_working_grid, scene_batch
from terrasynth.sampling.windows import embed_stride, embed_windows
from terrasynth.scenes.inputs import open_inputs, read_region
from terrasynth.scenes.plan import Box, ScenePlan, check_tile

Progress = Callable[[int, int], None]  # (tiles done, tiles)


def embed_scene(
    pipe: Pipeline,
    inputs: Iterable[tuple[str, str | Path]],
    output: str | Path,
    chip_size: int = 64,
    *,
    scaling: dict[str, tuple[float, float]] | None = None,
    time: str | None = None,
    window: tuple[int, int, int, int] | None = None,
    tile: int = 256,
    batch_size: int = 32,
    strict: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_start: Callable[[dict], None] | None = None,
) -> list[Path]:
    """Write ``embedding.tif``, ``chips.parquet`` and ``embedding.json`` of ``inputs``
    (``(modality[:bands], file)``) into ``output``, tile by tile (module docstring).

    ``window``: COL, ROW, WIDTH, HEIGHT of the first input (``Pipeline.input_window``
    turns a bbox into one). ``tile``: tile side in working-grid pixels (a multiple of 64,
    at least the model's window). ``on_start`` gets a summary (grid, tiles) before the work.
    """
    t0 = _now()
    output = Path(output)
    check_output(output, overwrite)
    model, cfg = pipe.model, pipe.model.config
    reg = cfg.registry
    factor = model.feature_factor
    chip = check_chip_size(chip_size, factor)
    check_tile(tile, cfg.window_size)
    if tile % factor or cfg.window_size % factor:
        raise TerrasynthError(
            f"--tile must be a multiple of the model's feature resolution ({factor} px)"
        )
    items = [(k, str(v)) for k, v in inputs]
    if not items:
        raise InputError("embedding needs at least one input (MODALITY=FILE)")
    pipe._check_inputs(items)
    days = days_since_epoch(time)
    region = None
    if window is not None:
        region = cropped_grid(input_header(items[0][1], items[0][0]).grid, Window(*window))
    files, warnings = open_inputs(items, reg, scaling, strict, region)
    first = files[0]
    work = header_working_grid(region or first.grid, first.modality, first.bands, reg)
    padded = embedding_grid(work, cfg.window_size, factor)
    plan = ScenePlan(padded.height, padded.width, cfg.window_size, embed_stride(model), tile)
    held: dict[str, np.ndarray] = {}
    for f in files:  # which bands each modality holds: decided once for the scene
        mask = held.setdefault(f.modality, np.zeros(len(reg[f.modality].bands), bool))
        mask |= np.isin(np.array(reg[f.modality].bands), np.array(f.bands))
    names_in = {f.modality for f in files}
    location = padded.center_lonlat()
    gsd = padded.ground_resolution_m()
    fgrid = work.scaled(factor)
    names = feature_names(model.feature_channels)
    tiles = [t for t in plan.tiles() if t.row < work.height and t.col < work.width]
    info = pipe._embed_info(items, fgrid, factor, warnings, t0)
    info.update(mode="whole scene (streamed tiles)", tile=tile, tiles=len(tiles),
                chip_size=chip_size)  # fmt: skip
    if window is not None:
        info["window"] = list(window)
    if on_start is not None:
        on_start(info)

    def embed_tile(t: Box) -> np.ndarray:
        """(C, h, w) features of tile ``t`` on the feature grid (NaN: no input)."""
        r = plan.region(t)
        rgrid = padded.window(r.col, r.row, r.width, r.height)
        groups = read_region(files, rgrid, reg)
        batch, order, _ = scene_batch(cfg, groups, rgrid, [], location, days, names_in, held)
        signals = batch_signals(batch, cfg, order)
        wins = [(row - r.row, col - r.col) for row, col in plan.windows(t)]
        feats, valid = embed_windows(model, signals, gsd, wins, batch_size)
        r0, c0 = (t.row - r.row) // factor, (t.col - r.col) // factor
        h = min(t.height // factor, fgrid.height - t.row // factor)
        w = min(t.width // factor, fgrid.width - t.col // factor)
        feats = feats[:, r0 : r0 + h, c0 : c0 + w].numpy()
        return np.where(valid[r0 : r0 + h, c0 : c0 + w].numpy(), feats, np.nan)

    with atomic_folder(output, overwrite, "embed") as tmp:
        tags = embedding_tags(info)
        writer = EmbeddingWriter(tmp / EMBEDDING_TIF, fgrid, names, tags, block=tile // factor)
        means = ChipMeans(fgrid, chip, len(names))
        try:
            for k, t in enumerate(tiles):
                feats = embed_tile(t)
                writer.write(feats, t.row // factor, t.col // factor)
                means.add(feats, t.row // factor, t.col // factor)
                if progress is not None:
                    progress(k + 1, len(tiles))
        finally:
            writer.close()
        info["seconds"] = round(_now() - t0, 2)
        write_chips(tmp / CHIPS_PARQUET, means.frame(names), info)
        (tmp / EMBEDDING_JSON).write_text(json.dumps(info, indent=2, default=str))
    return output_files(output)


def _now() -> float:
    return time.perf_counter()
