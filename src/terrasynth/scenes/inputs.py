"""Inputs of a whole-scene job, read window by window.

The files are checked once, from their headers and a decimated read (band layout, CRS,
overlap with the first input, value ranges: the same rules as ``data build``'s generic
mode), and then only the part of each file under a tile is ever read: a window of the file
that covers the tile's footprint in the file's CRS, warped onto the tile's grid by the same
alignment code the rest of the package uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from terrasynth.data.align import AlignedGroup, align_scene
from terrasynth.data.raster_io import (
    READ_ERRORS,
    Raster,
    check_header,
    first_line,
    layer_from_raster,
    open_dataset,
    window_over,
)
from terrasynth.data.remote import RasterPath, raster_env, raster_path
from terrasynth.data.scene import Grid, Layer, Scene
from terrasynth.data.sources.generic import input_layout, overlaps
from terrasynth.data.validate import check_values
from terrasynth.errors import InputError
from terrasynth.modalities import Registry

SAMPLE_SIDE = 1024  # pixels per side of the decimated read that value checks look at


@dataclass(frozen=True)
class InputFile:
    """One input file of a job: what it holds and where it lies."""

    key: str  # modality[:bands] as the user gave it
    path: RasterPath
    modality: str
    bands: tuple[str, ...]
    indexes: tuple[int, ...]
    scale: float
    offset: float
    grid: Grid
    categorical: bool


def open_inputs(
    items: Iterable[tuple[str, str | Path]],
    registry: Registry,
    scaling: dict[str, tuple[float, float]] | None = None,
    strict: bool = False,
    region: Grid | None = None,
) -> tuple[list[InputFile], list[str]]:
    """Check every input from its header and a decimated read (of the part under
    ``region`` only, when given); returns the files and the value-check warnings. Raises
    :class:`InputError` with one line for a bad input."""
    files: list[InputFile] = []
    warnings: list[str] = []
    for key, file in items:
        path = raster_path(file)
        mod, bands, indexes = input_layout(key, path, registry)
        name = mod.name
        scale, offset = (scaling or {}).get(name, (1.0, 0.0))
        with raster_env(path), _open(path) as src:
            if src.crs is None:
                raise InputError(f"{path}: raster has no CRS (not georeferenced)")
            grid = Grid(src.crs, src.transform, src.width, src.height)
            window = Window(0, 0, src.width, src.height)
            if region is not None:
                window = window_over(grid, region)
                if window is None:
                    raise InputError(f"{path} does not overlap the region asked for")
            step = max(1, max(window.width, window.height) // SAMPLE_SIDE)
            shape = (len(indexes), -(-window.height // step), -(-window.width // step))
            raw = _read(src, path, indexes=list(indexes), out_shape=shape, window=window)
            nodata = src.nodata
        f = InputFile(
            key, path, name, bands, indexes, scale, offset, grid, mod.kind == "categorical"
        )
        if files and not overlaps(grid, files[0].grid, path):
            raise InputError(f"{path} does not overlap {files[0].path}")
        layer = _layer(f, raw, nodata, grid.transform)
        if mod.kind == "continuous":
            w = check_values(layer.data[layer.valid_mask()], mod, path.name, strict=strict)
            if w is not None:
                warnings.append(w)
        files.append(f)
    return files, warnings


def read_region(files: list[InputFile], grid: Grid, registry: Registry):
    """The inputs aligned onto ``grid`` (a tile's region): (modality, group) -> AlignedGroup.

    Each file contributes the window that covers ``grid``'s footprint (plus two pixels for
    resampling); a file that does not reach the region contributes invalid pixels only."""
    layers = []
    for f in files:
        with raster_env(f.path), _open(f.path) as src:
            window = window_over(Grid(src.crs, src.transform, src.width, src.height), grid)
            if window is None:
                continue
            raw = _read(src, f.path, indexes=list(f.indexes), window=window)
            layers.append(_layer(f, raw, src.nodata, src.window_transform(window)))
    scene = Scene("tile", "generic", "user", grid, layers)
    groups = align_scene(scene, registry).groups
    for f in files:  # a file outside the region: its groups are all invalid
        mod = registry[f.modality]
        for g in mod.groups:
            if (f.modality, g.name) not in groups and set(g.bands) & set(f.bands):
                dst = grid.scaled(g.factor)
                shape = (len(g.bands), dst.height, dst.width)
                groups[(f.modality, g.name)] = AlignedGroup(
                    g.bands, np.zeros(shape, np.float32), np.zeros(shape, bool), dst
                )
    return groups


def _layer(f: InputFile, raw: np.ndarray, nodata, transform) -> Layer:
    raster = Raster(f.path, raw, f.grid.crs, transform, nodata, ())
    return layer_from_raster(
        raster,
        f.modality,
        f.bands,
        indexes=list(range(1, raw.shape[0] + 1)),
        scale=f.scale,
        offset=f.offset,
        categorical=f.categorical,
    )


def _open(path: RasterPath):
    """The open raster, its header checked (:func:`check_header`); any size is fine here,
    as only windows of it are ever read."""
    src = open_dataset(path)
    try:
        check_header(src, path)
    except InputError:
        src.close()
        raise
    return src


def _read(src, path: RasterPath, **kwargs) -> np.ndarray:
    try:
        return src.read(**kwargs)
    except READ_ERRORS as exc:
        raise InputError(
            f"{path}: cannot read pixels: truncated or corrupt ({first_line(exc)})"
        ) from exc
