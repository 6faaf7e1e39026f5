"""Reader for a folder of per-band GeoTIFFs whose file names say what each file holds.

``BAND_FILES`` maps a file-name pattern to (modality, band, scale, offset, categorical);
``band`` may refer to the pattern's groups (``\\1``). Physical value = raw * scale + offset;
each file's own nodata marks invalid pixels. Files of one modality on one grid are stacked
into one layer; every other file is a layer of its own in its native CRS. The whole folder is
one scene on the grid of its finest-resolution layer. To support another layout, add rows.

The table holds the Zion layout (spDataLarge): Landsat 8 OLI L1 DN bands B2-B5 (uint16,
nodata 65535, 30 m, EPSG:32612), SRTM elevation in metres (EPSG:4326, nodata 65535) and
NLCD 2011 class codes (EPSG:6367, nodata 255). The files carry no acquisition date in their
tags, so the scene's time is None.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from terrasynth.data.raster_io import read_layer, stack_layers
from terrasynth.data.scene import Layer, Scene
from terrasynth.errors import InputError
from terrasynth.modalities import Registry

# file-name regex (whole name, case-insensitive) -> (modality, band, scale, offset, categorical)
BAND_FILES: dict[str, tuple[str, str, float, float, bool]] = {
    r"landsat_b([2-5])\.tif": ("landsat8", r"B\1", 1.0, 0.0, False),
    r"srtm\.tif": ("dem", "elevation", 1.0, 0.0, False),
    r"nlcd\d{4}\.tif": ("landcover_nlcd", "class", 1.0, 0.0, True),
}
LICENCE = "CC0-1.0"


def _matches(folder: Path) -> list[tuple[Path, str, tuple[str, str, float, float, bool]]]:
    """(file, band, row) for each file of ``folder`` named by a row of the table."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file())
    found = []
    for name in names:
        for pattern, row in BAND_FILES.items():
            m = re.fullmatch(pattern, name, flags=re.IGNORECASE)
            if m:
                found.append((folder / name, m.expand(row[1]), row))
                break
    return found


class BandFolderSource:
    """A folder of single-band GeoTIFFs recognised by file name (see ``BAND_FILES``)."""

    name = "band_folder"

    def detect(self, path: str) -> bool:
        p = Path(path)
        try:
            return p.is_dir() and len(_matches(p)) >= 2
        except OSError:
            return False

    def scenes(self, path: str, registry: Registry | None = None) -> Iterator[Scene]:
        folder = Path(path)
        found = _matches(folder)
        if len(found) < 2:
            raise InputError(f"{folder}: fewer than two recognised band files")
        seen: set[tuple[str, str]] = set()
        single: list[Layer] = []
        for file, band, (modality, _, scale, offset, categorical) in found:
            if (modality, band) in seen:
                raise InputError(f"{file}: a second file for {modality} band {band} in {folder}")
            seen.add((modality, band))
            single.append(
                read_layer(
                    file, modality, (band,), scale=scale, offset=offset, categorical=categorical
                )
            )
        layers = stack_layers(single)
        grid = min(layers, key=lambda layer: layer.grid.ground_resolution_m()).grid
        yield Scene(
            scene_id=f"{self.name}:{folder.resolve().name}",
            source=self.name,
            licence=LICENCE,
            grid=grid,
            layers=layers,
            time=None,
        )
