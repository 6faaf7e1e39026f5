"""BigEarthNet v1 folders: one folder per patch with per-band GeoTIFFs and a JSON of labels.

Layout (either under a top folder such as ``BigEarthNet-S2-Example/`` and
``BigEarthNet-S1-Example/``, or patch folders directly in the given folder)::

    S2A_MSIL2A_20170613T101031_87_48/
        S2A_MSIL2A_20170613T101031_87_48_B01.tif ... _B12.tif, _B8A.tif  (uint16 DN)
        S2A_MSIL2A_20170613T101031_87_48_labels_metadata.json
    S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48/
        ..._VV.tif, ..._VH.tif  (float32 dB)
        ..._labels_metadata.json  ("corresponding_s2_patch" names the S2 partner)

One :class:`Scene` per S2 patch: ``s2l2a`` as three layers (10/20/60 m: 120/60/20 px),
``s1grd`` (VV, VH) when an S1 patch names it, and the CORINE level-3 labels of the S2 JSON.
The reference grid is the 10 m S2 grid.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from itertools import islice
from pathlib import Path

from terrasynth.data.raster_io import read_json, read_layer, stack_layers
from terrasynth.data.scene import Layer, Scene
from terrasynth.errors import InputError
from terrasynth.modalities import Modality, Registry, default_registry

LICENCE = "CDLA-Permissive-1.0"
S2_PATCH = re.compile(r"^S2[AB]_MSIL2A_\d{8}T\d{5,6}_\d+_\d+$")
S1_PATCH = re.compile(r"^S1[AB]_IW_GRDH_1SDV_\d{8}T\d{6}_\d{1,2}[C-X][A-Z]{2}_\d+_\d+$")
_BASELINE = re.compile(r"_N(\d{4})_")
# Sentinel-2 L2A products of processing baseline >= 04.00 carry BOA_ADD_OFFSET = -1000 DN.
# BigEarthNet v1 (2017-06 .. 2018-05, baselines 02.05/02.06) has none: reflectance = DN/10000.
_OFFSET_BASELINE = 400
_PEEK = 20  # entries looked at per sub-folder by detect()


@cache
def _modalities() -> tuple[Modality, Modality, Modality]:
    reg = default_registry()
    return reg["s2l2a"], reg["s1grd"], reg["corine"]


def _subdirs(path: Path, limit: int | None = None) -> Iterator[os.DirEntry[str]]:
    with os.scandir(path) as it:
        yield from (e for e in islice(it, limit) if e.is_dir())


def _has_s2_patch(path: Path, limit: int | None = None) -> bool:
    return any(S2_PATCH.match(e.name) for e in _subdirs(path, limit))


def _field(meta: dict, key: str, path: Path) -> object:
    if key not in meta:
        raise InputError(f"{path}: missing key '{key}'")
    return meta[key]


def _stack(
    folder: Path,
    modality: str,
    bands: tuple[str, ...],
    scale: float,
    offset: float,
    nodata: float | None,
) -> Layer:
    """Read one single-band GeoTIFF per band and stack them; all must share one grid."""
    parts = [
        read_layer(
            folder / f"{folder.name}_{b}.tif",
            modality,
            [b],
            scale=scale,
            offset=offset,
            nodata=nodata,
        )
        for b in bands
    ]
    stacked = stack_layers(parts)
    if len(stacked) > 1:
        band = stacked[1].bands[0]  # the first band off the first band's grid
        raise InputError(
            f"{folder / f'{folder.name}_{band}.tif'}: grid differs from band {bands[0]}'s"
        )
    return stacked[0]


def _s2_offset(tile_source: str) -> float:
    """Reflectance offset from the product's processing baseline (N0205 -> 0)."""
    m = _BASELINE.search(tile_source)
    return -0.1 if m and int(m.group(1)) >= _OFFSET_BASELINE else 0.0


class BigEarthNetV1Source:
    """Reader for BigEarthNet v1 S2 (+ S1) patch folders."""

    name = "bigearthnet_v1"

    def detect(self, path: str) -> bool:
        p = Path(path)
        if not p.is_dir():
            return False
        if S2_PATCH.match(p.name):
            return (p / f"{p.name}_labels_metadata.json").is_file()
        if _has_s2_patch(p):
            return True
        return any(_has_s2_patch(Path(e.path), _PEEK) for e in _subdirs(p))

    def _patch_folders(self, root: Path) -> tuple[list[Path], list[Path]]:
        if S2_PATCH.match(root.name):
            return [root], []
        entries = list(_subdirs(root))
        for e in list(entries):
            if not (S2_PATCH.match(e.name) or S1_PATCH.match(e.name)):
                entries += list(_subdirs(Path(e.path)))
        s2 = sorted(Path(e.path) for e in entries if S2_PATCH.match(e.name))
        s1 = sorted(Path(e.path) for e in entries if S1_PATCH.match(e.name))
        return s2, s1

    def _pairs(self, s2: list[Path], s1: list[Path]) -> dict[str, Path]:
        """S2 patch name -> S1 patch folder, from each S1 JSON's ``corresponding_s2_patch``."""
        names = {p.name for p in s2}
        pairs: dict[str, Path] = {}
        for folder in s1:
            js = folder / f"{folder.name}_labels_metadata.json"
            partner = str(_field(read_json(js), "corresponding_s2_patch", js))
            if partner not in names:
                raise InputError(f"{js}: its S2 patch {partner} is not among the S2 patch folders")
            if partner in pairs:
                raise InputError(
                    f"{js}: S2 patch {partner} is already paired with {pairs[partner]}"
                )
            pairs[partner] = folder
        return pairs

    def scenes(self, path: str, registry: Registry | None = None) -> Iterator[Scene]:
        root = Path(path)
        if not root.is_dir():
            raise InputError(f"{root}: not a folder of BigEarthNet v1 patches")
        s2, s1 = self._patch_folders(root)
        if not s2:
            raise InputError(f"{root}: no BigEarthNet v1 S2 patch folders found")
        pairs = self._pairs(s2, s1)
        for folder in s2:
            yield self._scene(folder, pairs.get(folder.name))

    def _scene(self, folder: Path, s1_folder: Path | None) -> Scene:
        s2mod, s1mod, corine = _modalities()
        js = folder / f"{folder.name}_labels_metadata.json"
        meta = read_json(js)
        offset = _s2_offset(str(meta.get("tile_source", "")))
        # DN 0 is the L2A no-data value (the GeoTIFFs declare none): marked invalid.
        layers = [_stack(folder, "s2l2a", g.bands, 1e-4, offset, nodata=0) for g in s2mod.groups]
        if s1_folder is not None:
            layers.append(_stack(s1_folder, "s1grd", s1mod.bands, 1.0, 0.0, nodata=None))
        try:
            time = datetime.strptime(
                str(_field(meta, "acquisition_date", js)), "%Y-%m-%d %H:%M:%S"
            ).replace(tzinfo=UTC)
        except ValueError as exc:
            raise InputError(f"{js}: bad acquisition_date ({exc})") from exc
        codes = {e.name: e.code for e in corine.legend}
        names = _field(meta, "labels", js)
        if not isinstance(names, list):
            raise InputError(f"{js}: 'labels' must be a list of CORINE class names")
        unknown = [n for n in names if n not in codes]
        if unknown:
            raise InputError(f"{js}: unknown CORINE label(s): {', '.join(map(str, unknown))}")
        return Scene(
            scene_id=f"{self.name}:{folder.name}",
            source=self.name,
            licence=LICENCE,
            grid=layers[0].grid,
            layers=layers,
            time=time,
            labels={"corine": sorted({codes[n] for n in names})},
        )
