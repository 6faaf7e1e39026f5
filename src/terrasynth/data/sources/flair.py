"""Reader for FLAIR #2 aerial samples as laid out by GEO-Bench-2 (one folder per sample).

Each ``sample_*`` folder holds ``aerial.tif`` (5 uint8 bands: R, G, B, NIR and normalised
surface elevation, EPSG:2154, 0.2 m), ``mask.tif`` (uint8 land-cover codes) and
``_meta.csv`` (``stac:time_start`` in unix seconds). Modalities: ``aerial`` (R, G, B, NIR
as 8-bit DN), ``ndsm`` (band 5, 8-bit DN) and ``landcover_flair`` (mask codes as stored).

The mask codes are FLAIR's original 1-based nomenclature (1 building, 2 pervious surface,
3 impervious surface, 4 bare soil, 5 water, ...), not GEO-Bench-2's 0-based training indices
(its loader subtracts 1 at read time). The imagery confirms it: code 1 has by far the
highest surface elevation (buildings), code 5 covers a lake and a pool, code 3 roads. Codes
are kept as stored. Most masks carry a CRS-less ``LOCAL_CS`` named "RGF93 v1 / Lambert-93";
on the aerial image's exact grid it is given the aerial image's CRS (EPSG:2154).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from terrasynth.data.raster_io import read_layer
from terrasynth.data.scene import Layer, Scene
from terrasynth.errors import InputError
from terrasynth.modalities import Registry

LICENCE = "Etalab-2.0"
AERIAL_BANDS = ("R", "G", "B", "NIR")
NDSM_BAND = 5


def _is_sample(path: Path) -> bool:
    return (path / "aerial.tif").is_file() and (path / "mask.tif").is_file()


def _child_samples(path: Path) -> list[Path]:
    with os.scandir(path) as entries:
        dirs = sorted(Path(e.path) for e in entries if e.is_dir() and e.name.startswith("sample_"))
    return [d for d in dirs if _is_sample(d)]


def _time(sample: Path) -> datetime | None:
    """Acquisition date from the sample's ``_meta.csv`` (or the parent's row for it)."""
    for path, key in ((sample / "_meta.csv", "aerial"), (sample.parent / "_meta.csv", sample.name)):
        if not path.is_file():
            continue
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: unreadable metadata table ({type(exc).__name__})") from exc
        for row in rows:
            if row.get("tortilla:id") == key and row.get("stac:time_start"):
                try:
                    return datetime.fromtimestamp(float(row["stac:time_start"]), UTC)
                except (ValueError, OverflowError, OSError) as exc:
                    raise InputError(f"{path}: bad stac:time_start for {key} ({exc})") from exc
    return None


def _with_reference_crs(mask: Layer, aerial: Layer, path: Path) -> Layer:
    """The mask on the aerial CRS when it only lacks a proper CRS on the same grid."""
    if mask.crs == aerial.crs:
        return mask
    local = not (mask.crs.is_projected or mask.crs.is_geographic)
    same_grid = mask.data.shape[1:] == aerial.data.shape[1:] and mask.transform.almost_equals(
        aerial.transform
    )
    if not (local and same_grid):
        raise InputError(f"{path}: mask grid or CRS differs from aerial.tif ({mask.crs})")
    return Layer(mask.modality, mask.bands, mask.data, aerial.crs, aerial.transform, mask.valid)


class FlairSource:
    """FLAIR #2 aerial samples (GEO-Bench-2 layout): aerial RGBN, nDSM and land cover."""

    name = "flair"

    def detect(self, path: str) -> bool:
        p = Path(path)
        try:
            return p.is_dir() and (_is_sample(p) or bool(_child_samples(p)))
        except OSError:
            return False

    def scenes(self, path: str, registry: Registry | None = None) -> Iterator[Scene]:
        p = Path(path)
        samples = [p] if _is_sample(p) else _child_samples(p)
        if not samples:
            raise InputError(f"{p}: no FLAIR sample folder (aerial.tif + mask.tif) found")
        for sample in samples:
            yield self._scene(sample)

    def _scene(self, sample: Path) -> Scene:
        aerial_path, mask_path = sample / "aerial.tif", sample / "mask.tif"
        aerial = read_layer(aerial_path, "aerial", AERIAL_BANDS, indexes=(1, 2, 3, 4))
        ndsm = read_layer(aerial_path, "ndsm", ("height",), indexes=(NDSM_BAND,))
        mask = read_layer(mask_path, "landcover_flair", ("class",), categorical=True)
        mask = _with_reference_crs(mask, aerial, mask_path)
        time = _time(sample)
        day = f":{time:%Y-%m-%d}" if time is not None else ""
        return Scene(
            scene_id=f"flair:{sample.name}{day}",
            source=self.name,
            licence=LICENCE,
            grid=aerial.grid,
            layers=[aerial, ndsm, mask],
            time=time,
        )
