"""Generic mode: users' own GeoTIFFs given as ``--input MOD=FILE``.

Each file holds bands of one registry modality: all of them in registry order, a subset
named by the file's band descriptions (e.g. "B04", "B03", "B02"; case-insensitive), or a
subset named in the key, ``--input s2l2a:B04,B03,B02=rgb.tif`` (file band order). Files may
be in any CRS and size and need not be co-registered; the first input's grid is the scene's
reference grid, and every other input must overlap its footprint. A modality with several
band groups (s2l2a) read from one file is one layer on one grid; alignment resamples it per
group later. Values are taken to be in the registry's physical units already (reflectance,
dB, metres, ...; value-range checks come later); categorical files keep their codes. The
file's nodata marks invalid pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from terrasynth.arrays import as_raster
from terrasynth.data.align import reference_grid
from terrasynth.data.raster_io import (
    GDAL_ERRORS,
    READ_ERRORS,
    Raster,
    cropped_grid,
    first_line,
    layer_from_raster,
    open_dataset,
    open_raster,
    window_over,
)
from terrasynth.data.remote import RasterPath, raster_env, raster_path
from terrasynth.data.scene import Grid, Layer, Scene
from terrasynth.errors import InputError
from terrasynth.modalities import Modality, Registry, default_registry


def band_layout(
    path: RasterPath, modality: Modality, given: tuple[str, ...] = ()
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Band names and 1-based file indexes: as given, by band descriptions, else registry
    order."""
    try:
        with raster_env(path), open_dataset(path, "unreadable raster") as src:
            count, descriptions, crs = src.count, src.descriptions, src.crs
    except READ_ERRORS as exc:
        raise InputError(f"{path}: unreadable raster ({first_line(exc)})") from exc
    if crs is not None and not (crs.is_projected or crs.is_geographic):
        raise InputError(
            f"{path}: a local (engineering) CRS cannot be placed on the Earth; "
            "give the input an EPSG or other geodetic CRS"
        )
    return bands_by_description(path, count, descriptions, modality, given)


def bands_by_description(
    path: Path,
    count: int,
    descriptions: tuple[str | None, ...],
    modality: Modality,
    given: tuple[str, ...] = (),
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """:func:`band_layout` of a raster of ``count`` bands with these band descriptions."""
    by_lower = {b.lower(): b for b in modality.bands}
    if given:
        if len(given) != count:
            raise InputError(
                f"{path}: {len(given)} band(s) named for {modality.name} "
                f"({', '.join(given)}), file has {count}"
            )
        return given, tuple(range(1, count + 1))
    # A description names a band by its first word: "B04", "B04 red (L2A DN)", "VV".
    named = tuple(by_lower.get(((d or "").split() or [""])[0].lower(), "") for d in descriptions)
    if all(named) and len(set(named)) == len(named):
        return named, tuple(range(1, count + 1))
    if count == len(modality.bands):
        return modality.bands, tuple(range(1, count + 1))
    raise InputError(
        f"{path}: {modality.name} expects {len(modality.bands)} bands "
        f"({', '.join(modality.bands)}), file has {count}"
    )


def input_layout(
    key: str, path: RasterPath, registry: Registry, raster: Raster | None = None
) -> tuple[Modality, tuple[str, ...], tuple[int, ...]]:
    """Modality, band names and 1-based file band indexes of one ``MOD[:BANDS]=FILE`` input
    (of the in-memory ``raster`` when given: ``terrasynth.arrays``)."""
    name, _, band_spec = key.partition(":")
    modality = registry[name]  # UnknownModalityError names the known ones
    if not modality.is_raster:
        raise InputError(f"{path}: {name} is a {modality.kind} modality, not a raster")
    given = tuple(b.strip() for b in band_spec.split(",") if b.strip())
    for band in given:
        modality.group_of(band)  # a clear error for a band the modality lacks
    if raster is not None:
        bands, indexes = bands_by_description(
            path, raster.count, raster.descriptions, modality, given
        )
    else:
        bands, indexes = band_layout(path, modality, given)
    return modality, bands, indexes


def overlaps(grid: Grid, ref: Grid, path: Path) -> bool:
    """True if ``grid``'s footprint, in ``ref``'s CRS, intersects ``ref``'s footprint."""
    local = any(not (g.crs.is_projected or g.crs.is_geographic) for g in (grid, ref))
    if local and grid.crs != ref.crs:
        raise InputError(
            f"{path}: a local (engineering) CRS cannot be related to another CRS; "
            "give the inputs an EPSG or other geodetic CRS"
        )
    try:
        left, bottom, right, top = transform_bounds(grid.crs, ref.crs, *grid.bounds)
    except GDAL_ERRORS as exc:
        raise InputError(f"{path}: cannot transform its extent ({first_line(exc)})") from exc
    if not np.all(np.isfinite([left, bottom, right, top])):
        return False
    r_left, r_bottom, r_right, r_top = ref.bounds
    return left < r_right and right > r_left and bottom < r_top and top > r_bottom


def generic_scene(
    inputs: Mapping[str, str | Path] | Iterable[tuple[str, str | Path]],
    registry: Registry | None = None,
    scene_id: str | None = None,
    scaling: dict[str, tuple[float, float]] | None = None,
    window: Window | None = None,
) -> Scene:
    """One scene from ``{modality: file}`` (or ``(modality, file)`` pairs, so one modality
    may come in several files, e.g. one per resolution); the first file's grid is the
    reference grid. A file is a local path or a network location GDAL reads
    (``https://``, ``s3://``, ``/vsicurl/``...).

    ``scaling`` maps a modality to ``(scale, offset)``: physical = raw * scale + offset
    (e.g. ``(1e-4, -0.1)`` for Sentinel-2 L2A DN of processing baseline 04.00 and later).
    ``window``: only this pixel window of the first input is the scene, and of every other
    input only the part under it is read.
    """
    items = list(inputs.items() if isinstance(inputs, Mapping) else inputs)
    if not items:
        raise InputError("no input files given (use --input MOD=FILE)")
    registry = registry if registry is not None else default_registry()
    rasters = [as_raster(file, key) for key, file in items]  # in-memory inputs; None: files
    first = rasters[0].path if rasters[0] is not None else raster_path(items[0][1])
    layers: list[Layer] = []
    region: Grid | None = None
    for (key, file), raster in zip(items, rasters, strict=True):
        path = raster.path if raster is not None else raster_path(file)
        modality, bands, indexes = input_layout(key, path, registry, raster)
        name = modality.name
        scale, offset = (scaling or {}).get(name, (1.0, 0.0))
        if raster is None:
            raster = open_raster(path, _part(path, window, region))
        elif window is not None:
            raster = crop_raster(raster, window if region is None else None, region)
        layer = layer_from_raster(
            raster,
            name,
            bands,
            indexes=indexes,
            scale=scale,
            offset=offset,
            categorical=modality.kind == "categorical",
        )
        if layers and not overlaps(layer.grid, layers[0].grid, path):
            raise InputError(f"{path} does not overlap {first}")
        if window is not None and region is None:
            region = layer.grid
        layers.append(layer)
    return Scene(
        scene_id=scene_id or first.stem,
        source="generic",
        licence="user",
        grid=reference_grid(layers[:1], registry),
        layers=layers,
        time=None,
    )


def _part(path: RasterPath, window: Window | None, region: Grid | None) -> Window | None:
    """The window of input ``path`` to read: ``window`` for the first input, the part under
    the first input's ``region`` for the others, everything without a window."""
    if window is None or region is None:
        return window
    with raster_env(path), open_dataset(path) as src:
        grid = Grid(src.crs, src.transform, src.width, src.height)
    part = window_over(grid, region)
    if part is None:
        raise InputError(f"{path} does not overlap the region asked for")
    return part


def crop_raster(raster: Raster, window: Window | None, region: Grid | None = None) -> Raster:
    """An in-memory raster cut to ``window``, or to the part under ``region``."""
    _, height, width = raster.raw.shape
    grid = Grid(raster.crs, raster.transform, width, height)
    if window is None and region is not None:
        window = window_over(grid, region)
        if window is None:
            raise InputError(f"{raster.path} does not overlap the region asked for")
    if window is None:
        return raster
    (r0, r1), (c0, c1) = window.toranges()
    return Raster(
        raster.path,
        raster.raw[:, r0:r1, c0:c1],
        raster.crs,
        cropped_grid(grid, window).transform,
        raster.nodata,
        raster.descriptions,
    )
