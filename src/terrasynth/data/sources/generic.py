"""Generic mode: users' own GeoTIFFs given as ``--input MOD=FILE``.

Each file holds bands of one registry modality: all of them in registry order, or a subset
named by the file's band descriptions (e.g. "B04", "B03", "B02"; case-insensitive). Files may
be in any CRS and size and need not be co-registered; the first input's grid is the scene's
reference grid, and every other input must overlap its footprint. A modality with several
band groups (s2l2a) read from one file is one layer on one grid; alignment resamples it per
group later. Values are taken to be in the registry's physical units already (reflectance,
dB, metres, ...; value-range checks come later); categorical files keep their codes. The
file's nodata marks invalid pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import CRSError, RasterioError
from rasterio.warp import transform_bounds

from terrasynth.data.raster_io import read_layer
from terrasynth.data.scene import Grid, Layer, Scene
from terrasynth.errors import InputError
from terrasynth.modalities import Modality, Registry, default_registry


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _band_layout(path: Path, modality: Modality) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Band names and 1-based file indexes: by band descriptions, else registry order."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        with rasterio.open(path) as src:
            count, descriptions = src.count, src.descriptions
    except RasterioError as exc:
        raise InputError(f"{path}: unreadable raster ({_first_line(exc)})") from exc
    by_lower = {b.lower(): b for b in modality.bands}
    named = tuple(by_lower.get((d or "").strip().lower(), "") for d in descriptions)
    if all(named) and len(set(named)) == len(named):
        return named, tuple(range(1, count + 1))
    if count == len(modality.bands):
        return modality.bands, tuple(range(1, count + 1))
    raise InputError(
        f"{path}: {modality.name} expects {len(modality.bands)} bands "
        f"({', '.join(modality.bands)}), file has {count}"
    )


def _overlaps(grid: Grid, ref: Grid, path: Path) -> bool:
    """True if ``grid``'s footprint, in ``ref``'s CRS, intersects ``ref``'s footprint."""
    local = any(not (g.crs.is_projected or g.crs.is_geographic) for g in (grid, ref))
    if local and grid.crs != ref.crs:
        raise InputError(
            f"{path}: a local (engineering) CRS cannot be related to another CRS; "
            "give the inputs an EPSG or other geodetic CRS"
        )
    try:
        left, bottom, right, top = transform_bounds(grid.crs, ref.crs, *grid.bounds)
    except (RasterioError, CRSError) as exc:
        raise InputError(f"{path}: cannot transform its extent ({_first_line(exc)})") from exc
    if not np.all(np.isfinite([left, bottom, right, top])):
        return False
    r_left, r_bottom, r_right, r_top = ref.bounds
    return left < r_right and right > r_left and bottom < r_top and top > r_bottom


def generic_scene(
    inputs: dict[str, str | Path],
    registry: Registry | None = None,
    scene_id: str | None = None,
) -> Scene:
    """One scene from ``{modality: file}``; the first file's grid is the reference grid."""
    if not inputs:
        raise InputError("no input files given (use --input MOD=FILE)")
    registry = registry if registry is not None else default_registry()
    first = Path(next(iter(inputs.values())))
    layers: list[Layer] = []
    for name, file in inputs.items():
        path = Path(file)
        modality = registry[name]  # UnknownModalityError names the known ones
        if not modality.is_raster:
            raise InputError(f"{path}: {name} is a {modality.kind} modality, not a raster")
        bands, indexes = _band_layout(path, modality)
        layer = read_layer(
            path, name, bands, indexes=indexes, categorical=modality.kind == "categorical"
        )
        if layers and not _overlaps(layer.grid, layers[0].grid, path):
            raise InputError(f"{path} does not overlap {first}")
        layers.append(layer)
    return Scene(
        scene_id=scene_id or first.stem,
        source="generic",
        licence="user",
        grid=layers[0].grid,
        layers=layers,
        time=None,
    )
