"""Shared reading helpers for readers: GeoTIFFs, layer stacking and JSON files.

One place where rasterio and JSON errors become clear one-line :class:`InputError` s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError

from terrasynth.data.scene import Layer
from terrasynth.errors import InputError


@dataclass
class Raster:
    """The raw bands of a raster file with its georeference (read once, sliced many times)."""

    path: Path
    raw: np.ndarray  # (count, H, W) as stored; row i is file band i + 1
    crs: CRS
    transform: Affine
    nodata: float | None
    descriptions: tuple[str | None, ...]

    @property
    def count(self) -> int:
        return self.raw.shape[0]


def open_raster(path: str | Path) -> Raster:
    """Read every band of a raster file; corrupt, truncated or CRS-less files are refused."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        with rasterio.open(path) as src:
            if src.crs is None:
                raise InputError(
                    f"{path}: raster has no CRS (not georeferenced, or a truncated header)"
                )
            try:
                raw = src.read()
            except RasterioError as exc:
                raise InputError(
                    f"{path}: cannot read pixels: the file is truncated or corrupt "
                    f"({_first_line(exc)})"
                ) from exc
            return Raster(path, raw, src.crs, src.transform, src.nodata, src.descriptions)
    except RasterioError as exc:
        raise InputError(
            f"{path}: not a readable raster (corrupt or truncated?): {_first_line(exc)}"
        ) from exc


def layer_from_raster(
    raster: Raster,
    modality: str,
    bands: Sequence[str],
    *,
    indexes: Sequence[int] | None = None,
    scale: float = 1.0,
    offset: float = 0.0,
    nodata: float | None = None,
    categorical: bool = False,
) -> Layer:
    """Bands ``indexes`` (1-based) of ``raster`` as a :class:`Layer` in physical units.

    ``physical = raw * scale + offset``. Pixels equal to the file's nodata (or ``nodata``
    when given), and non-finite pixels, are marked invalid. Categorical rasters keep their
    integer codes.
    """
    path = raster.path
    idx = list(indexes) if indexes is not None else list(range(1, raster.count + 1))
    if len(idx) != len(bands):
        raise InputError(
            f"{path}: {modality} expects {len(bands)} band(s) "
            f"({', '.join(bands)}) but {len(idx)} were given (file has {raster.count})"
        )
    if max(idx) > raster.count or min(idx) < 1:
        raise InputError(f"{path}: has {raster.count} band(s), band {max(idx)} asked for")
    raw = raster.raw[[i - 1 for i in idx]]
    nd = nodata if nodata is not None else raster.nodata
    valid = np.ones(raw.shape, bool)
    if nd is not None:
        valid &= ~(raw == nd) if not np.isnan(nd) else ~np.isnan(raw)
    if categorical:
        data = raw.astype(np.int32)
    else:
        data = raw.astype(np.float32)
        if scale != 1.0 or offset != 0.0:
            data = data * np.float32(scale) + np.float32(offset)
        valid &= np.isfinite(data)
    return Layer(modality, tuple(bands), data, raster.crs, raster.transform, valid)


def read_layer(path: str | Path, modality: str, bands: Sequence[str], **options: Any) -> Layer:
    """Read bands of a raster file as a :class:`Layer`; ``options`` as for
    :func:`layer_from_raster` (indexes, scale, offset, nodata, categorical)."""
    return layer_from_raster(open_raster(path), modality, bands, **options)


def stack_layers(layers: list[Layer]) -> list[Layer]:
    """Layers of one modality on one grid merged into one multi-band layer, order kept.

    Layers share a grid when their CRS, transform and size are equal; each merged layer
    sits where its first part was, with the bands in the order given.
    """
    out: list[Layer] = []
    for layer in layers:
        same = next((o for o in out if o.modality == layer.modality and _same_grid(o, layer)), None)
        if same is None:
            out.append(layer)
            continue
        i = out.index(same)
        valid = np.concatenate([same.valid_mask(), layer.valid_mask()])
        data = np.concatenate([same.data, layer.data])
        out[i] = Layer(
            same.modality, same.bands + layer.bands, data, same.crs, same.transform, valid
        )
    return out


def _same_grid(a: Layer, b: Layer) -> bool:
    return a.crs == b.crs and a.transform == b.transform and a.data.shape[1:] == b.data.shape[1:]


_JSON_KIND = {dict: "object", list: "array"}


def read_json(path: Path, expect: type = dict) -> Any:
    """The JSON value of ``path``, which must be an instance of ``expect`` (an object by default).

    A missing file, unreadable or invalid JSON, or a value of another type raises
    :class:`InputError` with one line naming the file.
    """
    if not path.is_file():
        raise InputError(f"{path}: JSON file not found")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError covers JSON and Unicode decode errors
        raise InputError(f"{path}: unreadable JSON ({_first_line(exc)})") from exc
    if not isinstance(value, expect):
        kind = _JSON_KIND.get(expect, expect.__name__)
        raise InputError(f"{path}: expected a JSON {kind}, found {type(value).__name__}")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
