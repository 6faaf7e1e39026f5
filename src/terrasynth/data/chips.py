"""Cut an aligned scene into fixed-size chips and decide what each chip holds.

Chips never overlap in scenes larger than two chips, so blocks of the spatial split cannot
share pixels. A smaller scene (a 120 px BigEarthNet patch, a 101 px EOPatch) is covered by
overlapping chips instead, and all of them take the split of the scene's centre.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from terrasynth.data.align import AlignedScene
from terrasynth.data.scene import Grid
from terrasynth.data.split import SplitConfig


@dataclass
class Chip:
    """One chip: per (modality, group) arrays plus availability and placement."""

    scene_id: str
    index_in_scene: int
    grid: Grid
    groups: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # data (C,h,w), valid (C,h,w)
    band_available: dict[str, dict[str, bool]]  # modality -> band -> available
    lon: float
    lat: float
    block: tuple[int, int]
    split: str


def pad_grid(grid: Grid, size: int) -> tuple[Grid, float]:
    """Grow ``grid`` (centred) to at least ``size`` x ``size`` pixels.

    Returns the padded grid and the fraction of it the original grid covers. Padding is
    never filled: alignment leaves it invalid, so a 17 px patch becomes a 64 px chip whose
    outer pixels are marked as no data.
    """
    width, height = max(grid.width, size), max(grid.height, size)
    if (width, height) == (grid.width, grid.height):
        return grid, 1.0
    col, row = -((width - grid.width) // 2), -((height - grid.height) // 2)
    return grid.window(col, row, width, height), grid.width * grid.height / (width * height)


def chip_offsets(size: int, chip: int, step: int) -> list[int]:
    """Start offsets along one axis (multiples of ``step``).

    At least two chips' worth: non-overlapping chips centred on the axis. Less: chips
    spread evenly (overlapping) to cover it. Smaller than one chip: none.
    """
    if size < chip:
        return []
    if size >= 2 * chip:
        n = size // chip
        start = ((size - n * chip) // 2) // step * step
        return [start + i * chip for i in range(n)]
    n = -(-size // chip)
    if n == 1:
        return [((size - chip) // 2) // step * step]
    offsets = [round(i * (size - chip) / (n - 1)) // step * step for i in range(n)]
    return sorted(set(offsets))


def cut_chips(
    aligned: AlignedScene,
    chip_size: int,
    split: SplitConfig,
    min_valid: float = 0.5,
    coverage: float = 1.0,
) -> Iterator[Chip]:
    """Yield the chips of ``aligned`` that hold at least one available raster modality.

    A band is available in a chip when at least ``min_valid`` of its pixels are valid; a
    modality is available when any of its bands is.
    """
    scene = aligned.scene
    grid = scene.grid
    step = max((f for f in _factors(aligned)), default=1)
    if chip_size % step:
        raise ValueError(f"chip size {chip_size} must be a multiple of {step}")
    cols = chip_offsets(grid.width, chip_size, step)
    rows = chip_offsets(grid.height, chip_size, step)
    small = grid.width < 2 * chip_size and grid.height < 2 * chip_size
    scene_lonlat = grid.center_lonlat()
    index = 0
    for row in rows:
        for col in cols:
            chip_grid = grid.window(col, row, chip_size, chip_size)
            groups: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
            bands: dict[str, dict[str, bool]] = {}
            for (mod, gname), g in aligned.groups.items():
                f = _factor(grid, g.grid)
                r0, c0, n = row // f, col // f, chip_size // f
                data = g.data[:, r0 : r0 + n, c0 : c0 + n]
                valid = g.valid[:, r0 : r0 + n, c0 : c0 + n]
                if data.shape[1:] != (n, n):
                    continue
                frac = valid.reshape(valid.shape[0], -1).mean(axis=1)
                avail = frac >= scene.min_valid.get(mod, min_valid) * coverage
                if not avail.any():
                    continue
                groups[(mod, gname)] = (data.copy(), valid.copy())
                bands.setdefault(mod, {}).update(
                    {b: bool(a) for b, a in zip(g.bands, avail, strict=True)}
                )
            if not groups:
                continue
            lon, lat = scene_lonlat if small else chip_grid.center_lonlat()
            block = split.block_of(lon, lat)
            clon, clat = chip_grid.center_lonlat()
            yield Chip(
                scene.scene_id,
                index,
                chip_grid,
                groups,
                bands,
                clon,
                clat,
                block,
                split.split_of_block(block),
            )
            index += 1


def _factor(base: Grid, grid: Grid) -> int:
    return max(1, round(grid.res[0] / base.res[0]))


def _factors(aligned: AlignedScene) -> list[int]:
    return [_factor(aligned.scene.grid, g.grid) for g in aligned.groups.values()]
