"""Major TOM Core reader: S2 L2A products as per-band GeoTIFF folders per grid cell.

Layout::

    majortom_core/S2L2A/<row>/<row>_<col>/<product>/{B01..B12,B8A}.tif, cloud_mask.tif,
                                                     thumbnail.png

e.g. ``S2L2A/0U/0U_199R/S2A_MSIL2A_20220706T085611_N0400_R007_T33NZA_20220706T153419``.
One scene per product: the s2l2a bands stacked per resolution (10 m 1068 px, 20 m 534 px,
60 m 178 px on one footprint in the product's UTM zone); the scene grid is the 10 m grid;
time is the sensing time in the product name.

Units: reflectance = DN / 10000, and (DN - 1000) / 10000 for processing baseline N0400 or
higher (the +1000 BOA offset of baseline 04.00). Products named N9999 (reprocessed: the
sample's processing date is 2023-09-24) are decided from the data: NO offset. Evidence from
the 2020-02-23 N9999 product (T48QUE): 93 % of B02 pixels are below 1000 DN (median 483),
B8A and B07 reach 1 DN, B12 2 DN, and dark water gives B08 1st percentile 197 DN; with the
offset these would be negative reflectances (B02 median -0.05), without it dark water in B08
is 0.02 as expected. The N0400 product (2022-07-06, overcast) has no DN below 1500 in any
10/20 m band, as the offset implies. DN 0 is no-data.

Cloud mask: ``cloud_mask.tif`` is uint8 on the 10 m grid, a SEnSeI-model cloud mask in Major
TOM (0 = clear; non-zero = cloud: 1 in a binary form, or thick cloud / thin cloud / cloud
shadow = 1 / 2 / 3 in SEnSeI's 4-class form). Both shipped samples hold only 0, so the
encoding cannot be confirmed from them (and the 2022-07-06 product is visibly overcast yet
unflagged). We mark every non-zero pixel invalid for all s2l2a bands; a 20 m / 60 m pixel is
invalid when any 10 m mask pixel inside it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from terrasynth.data.raster_io import read_layer, stack_layers
from terrasynth.data.scene import Layer, Scene
from terrasynth.errors import InputError
from terrasynth.modalities import Registry

LICENCE = "CC-BY-SA-4.0"
MODALITY = "s2l2a"
CLOUD_MASK = "cloud_mask.tif"

_PRODUCT = re.compile(r"S2[A-D]_MSIL2A_(\d{8}T\d{6})_N(\d{4})_R\d{3}_(T[0-9A-Z]{5})_\d{8}T\d{6}")
_ROW = re.compile(r"\d+[UD]")
_CELL = re.compile(r"\d+[UD]_\d+[LR]")


class MajorTOMSource:
    """Reader for Major TOM Core S2L2A folders (top folder, ``S2L2A/``, row, cell or product)."""

    name = "majortom"

    def __init__(self, registry: Registry | None = None) -> None:
        self._registry = registry or Registry.builtin()

    def detect(self, path: str) -> bool:
        p = Path(path)
        return p.is_dir() and next(_iter_products(p), None) is not None

    def scenes(self, path: str, registry: Registry | None = None) -> Iterator[Scene]:
        p = Path(path)
        products = list(_iter_products(p)) if p.is_dir() else []
        if not products:
            raise InputError(f"{p}: no Major TOM S2L2A product folders found")
        seen: set[str] = set()
        for product in products:
            scene = self._scene(product)
            if scene.scene_id in seen:
                raise InputError(f"{product}: a second product for {scene.scene_id}")
            seen.add(scene.scene_id)
            yield scene

    def _scene(self, product: Path) -> Scene:
        m = _PRODUCT.fullmatch(product.name)
        if m is None:
            raise InputError(f"{product}: not a Major TOM S2L2A product folder name")
        time = datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
        offset = _reflectance_offset(int(m.group(2)))
        cell = product.parent.name if _CELL.fullmatch(product.parent.name) else m.group(3)
        layers = stack_layers(
            [
                read_layer(
                    product / f"{band}.tif", MODALITY, [band], scale=1e-4, offset=offset, nodata=0
                )
                for band in self._registry[MODALITY].bands
            ]
        )
        grid = next(layer.grid for layer in layers if "B02" in layer.bands)
        _apply_cloud_mask(product / CLOUD_MASK, layers)
        scene_id = f"majortom:{cell}:{time:%Y-%m-%d}"
        return Scene(scene_id, MajorTOMSource.name, LICENCE, grid, layers, time=time)


def _reflectance_offset(baseline: int) -> float:
    """Physical offset added after scaling DN by 1e-4 (see the module docstring)."""
    if baseline == 9999:  # reprocessed products: no +1000 offset in their DN
        return 0.0
    return -0.1 if baseline >= 400 else 0.0


def _is_product(d: Path) -> bool:
    return d.is_dir() and _PRODUCT.fullmatch(d.name) is not None and (d / "B02.tif").exists()


def _dirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _iter_products(p: Path) -> Iterator[Path]:
    """Product folders under a product, cell, row, ``S2L2A`` or top folder (lazily)."""
    if _is_product(p):
        yield p
        return
    if (p / "S2L2A").is_dir():
        p = p / "S2L2A"
    if _CELL.fullmatch(p.name):
        levels: list[re.Pattern[str]] = []
    elif _ROW.fullmatch(p.name):
        levels = [_CELL]
    else:
        levels = [_ROW, _CELL]
    yield from _walk(p, levels)


def _walk(p: Path, levels: list[re.Pattern[str]]) -> Iterator[Path]:
    for d in _dirs(p):
        if not levels:
            if _is_product(d):
                yield d
        elif levels[0].fullmatch(d.name):
            yield from _walk(d, levels[1:])


def _apply_cloud_mask(path: Path, layers: list[Layer]) -> None:
    """Mark pixels flagged in the cloud mask (any non-zero value) invalid in every layer."""
    mask = read_layer(path, "cloud_mask", ["cloud"], categorical=True)
    cloudy = (mask.data[0] != 0) & mask.valid_mask()[0]
    mt = mask.transform
    for layer in layers:
        t = layer.transform
        f = int(round(t.a / mt.a))
        h, w = layer.data.shape[1:]
        nested = (
            layer.crs == mask.crs
            and f >= 1
            and np.isclose(t.a, f * mt.a)
            and np.isclose(t.e, f * mt.e)
            and np.isclose(t.c, mt.c)
            and np.isclose(t.f, mt.f)
            and cloudy.shape == (h * f, w * f)
        )
        if not nested:
            raise InputError(f"{path}: cloud mask grid does not match the {layer.bands} grid")
        coarse = cloudy.reshape(h, f, w, f).any(axis=(1, 3))
        layer.valid = layer.valid_mask() & ~coarse[None]
