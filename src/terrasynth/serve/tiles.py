"""Web-mercator map tiles of inputs and outputs, rendered on the fly by rio-tiler.

A layer is a GeoTIFF plus the modality its bands belong to; a *preset* says how its values
become colours:

=============  ==============================================================================
``truecolor``  the modality's red, green, blue bands (reflectance 0..0.3; others: 2-98 %)
``falsecolor`` near infrared, red, green
``db``         one band in decibels, grey from -25 dB (VH: -30) to 0 dB (VH: -5)
``terrain``    elevation coloured by height, shaded by the relief of the tile (hillshade)
``classes``    class codes in the colours of the modality's legend
``spread``     a standard deviation or entropy band, 0 to its 98th percentile (magma)
``probability`` a class probability 0..1 (viridis)
``grey``       one band, 2-98 % stretch
=============  ==============================================================================

Stretches that depend on the data (percentiles) are computed once per file from a
decimated read (its overviews) and cached, so every tile of a layer, and every sample of a
result (stretched from its mean), shares one colour scale.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import rasterio

from terrasynth.errors import InputError
from terrasynth.extras import require
from terrasynth.modalities import Modality

T = TypeVar("T")
FEATURE = "terrasynth serve (the map app)"
TILE = 256
STATS_SIDE = 512
EARTH_CIRCUMFERENCE_M = 40075016.686
DB_RANGE = {"VH": (-30.0, -5.0)}
DB_DEFAULT = (-25.0, 0.0)
SUN_AZIMUTH, SUN_ALTITUDE = 315.0, 45.0


def presets(mod: Modality, role: str = "value") -> list[str]:
    """Presets for a layer of ``mod`` (first: the default). ``role``: ``value`` (an input,
    a sample or a mean), ``spread`` (std, entropy) or ``probability`` (class probabilities)."""
    if role == "spread":
        return ["spread", "grey"]
    if role == "probability":
        return ["probability", "grey"]
    if mod.kind == "categorical":
        return ["classes"]
    found = []
    if len(mod.rgb) == 3:
        found.append("truecolor")
    slots = set(mod.spectral_slots.values())
    if {"red", "green"} <= slots and slots & {"nir", "nir08"}:
        found.append("falsecolor")
    if mod.units == "dB":
        found.append("db")
    if mod.units == "m":
        found.append("terrain")
    return [*found, "grey"]


def _band_for_slot(mod: Modality, slots: tuple[str, ...]) -> str:
    by_slot = {s: b for b, s in mod.spectral}
    for s in slots:
        if s in by_slot:
            return by_slot[s]
    raise InputError(f"{mod.name} has no band for {slots[0]}")


def preset_bands(mod: Modality, preset: str, bands: list[str], band: str | None) -> list[str]:
    """The bands a preset shows, from the file's ``bands`` (``band``: a one-band choice)."""
    if preset == "truecolor":
        wanted = list(mod.rgb)
    elif preset == "falsecolor":
        wanted = [
            _band_for_slot(mod, ("nir", "nir08")),
            _band_for_slot(mod, ("red",)),
            _band_for_slot(mod, ("green",)),
        ]
    else:
        default = mod.rgb[0] if mod.rgb and mod.rgb[0] in bands else bands[0]
        wanted = [band or default]
    missing = [b for b in wanted if b not in bands]
    if missing:
        raise InputError(f"the layer has no band {', '.join(missing)} for preset {preset}")
    return wanted


@lru_cache(maxsize=256)
def _percentiles(path: str, mtime: float, indexes: tuple[int, ...]) -> tuple[float, float, float]:
    """2nd, 98th percentile and maximum of the valid values of bands ``indexes``."""
    with rasterio.open(path) as src:
        scale = max(1.0, max(src.width, src.height) / STATS_SIDE)
        shape = (len(indexes), max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        data = src.read(list(indexes), out_shape=shape, masked=True).astype(np.float64)
    values = data.compressed()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0, 1.0
    p2, p98 = np.percentile(values, [2, 98])
    return float(p2), float(max(p98, p2 + 1e-6)), float(values.max())


def percentiles(path: Path, indexes: list[int]) -> tuple[float, float, float]:
    """Cached :func:`_percentiles` of a file (recomputed when the file changes)."""
    return _percentiles(str(path), path.stat().st_mtime, tuple(indexes))


def value_range(
    mod: Modality, preset: str, band: str, stats_path: Path, indexes: list[int]
) -> tuple[float, float]:
    """The values mapped to the ends of the colour scale."""
    if preset in ("truecolor", "falsecolor") and mod.units == "reflectance":
        return 0.0, 0.3
    if preset == "db":
        return DB_RANGE.get(band, DB_DEFAULT)
    if preset == "probability":
        return 0.0, 1.0
    p2, p98, _ = percentiles(stats_path, indexes)
    if preset == "spread":
        return 0.0, p98
    return p2, p98


def _quiet_casts(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` without numpy's warnings about NaN (no data) cast to bytes under a mask."""

    @functools.wraps(fn)
    def quiet(*args: Any, **kwargs: Any) -> T:
        with np.errstate(invalid="ignore"):
            return fn(*args, **kwargs)

    return quiet


def _hillshade(elevation: np.ndarray, pixel_m: float) -> np.ndarray:
    """Shading 0..1 of an elevation array (metres) with square pixels of ``pixel_m``."""
    dy, dx = np.gradient(elevation, pixel_m)
    slope = np.arctan(np.hypot(dx, dy))
    aspect = np.arctan2(-dx, dy)
    az, alt = math.radians(SUN_AZIMUTH), math.radians(SUN_ALTITUDE)
    shade = math.sin(alt) * np.cos(slope) + math.cos(alt) * np.sin(slope) * np.cos(az - aspect)
    return np.clip(shade, 0.0, 1.0)


def _colormap(name: str) -> dict[int, tuple[int, int, int, int]]:
    colormap = require("rio_tiler.colormap", "serve", FEATURE)
    return colormap.cmap.get(name)


def _legend_colormap(mod: Modality) -> dict[int, tuple[int, int, int, int]]:
    out = {}
    for e in mod.legend:
        h = e.color.lstrip("#")
        out[e.code] = (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16), 255)
    return out


@_quiet_casts
def render_tile(
    path: Path,
    mod: Modality,
    bands: list[str],
    preset: str,
    z: int,
    x: int,
    y: int,
    band: str | None = None,
    stats_path: Path | None = None,
) -> bytes | None:
    """A 256 x 256 PNG of the file ``path`` (bands named ``bands``) at tile z/x/y, or None
    where the file has no data. ``stats_path``: the file whose percentiles set the stretch
    (a result's mean for its samples), default ``path``."""
    io = require("rio_tiler.io", "serve", FEATURE)
    errors = require("rio_tiler.errors", "serve", FEATURE)
    if preset not in {*presets(mod), "spread", "probability", "grey"}:
        raise InputError(f"unknown preset '{preset}' for {mod.name}")
    shown = preset_bands(mod, preset, bands, band)
    indexes = [bands.index(b) + 1 for b in shown]
    with io.Reader(str(path)) as src:
        if not src.tile_exists(x, y, z):
            return None
        buffer = 1 if preset == "terrain" else None
        try:
            img = src.tile(x, y, z, tilesize=TILE, indexes=indexes, buffer=buffer)
        except errors.TileOutsideBounds:
            return None
    if preset == "classes":
        colors = _legend_colormap(mod)
        unknown = ~np.isin(img.data[0], list(colors))
        img.array.mask = np.ma.getmaskarray(img.array) | unknown[None]
        return img.render(img_format="PNG", colormap=colors)
    lo, hi = value_range(mod, preset, shown[0], stats_path or path, indexes)
    if preset == "terrain":
        return _terrain_png(img, lo, hi, z, y)
    img.rescale(in_range=[(lo, hi)] * len(indexes))
    cmap = {"spread": "magma", "probability": "viridis", "grey": None, "db": None}.get(preset)
    if len(indexes) == 1 and cmap is not None:
        return img.render(img_format="PNG", colormap=_colormap(cmap))
    return img.render(img_format="PNG")


def _terrain_png(img: Any, lo: float, hi: float, z: int, y: int) -> bytes:
    """Elevation coloured by height and shaded; ``img`` has a one-pixel buffer."""
    models = require("rio_tiler.models", "serve", FEATURE)
    elevation = np.ma.filled(img.array[0].astype(np.float64), np.nan)
    # ground size of a tile pixel: the mercator pixel size shrunk by cos(latitude)
    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * (y + 0.5) / 2**z))))
    pixel_m = EARTH_CIRCUMFERENCE_M / (TILE * 2**z) * math.cos(math.radians(lat))
    filled = np.where(np.isfinite(elevation), elevation, np.nanmean(elevation))
    shade = _hillshade(filled, pixel_m)[1:-1, 1:-1]
    level = np.clip((elevation[1:-1, 1:-1] - lo) / (hi - lo), 0, 1)
    lut = np.array([_colormap("terrain")[i] for i in range(256)], dtype=np.float64)[:, :3]
    rgb = lut[np.nan_to_num(level * 255).astype(np.uint8)] * (0.35 + 0.65 * shade[..., None])
    valid = ~np.ma.getmaskarray(img.array[0])[1:-1, 1:-1] & np.isfinite(elevation[1:-1, 1:-1])
    data = np.moveaxis(rgb, -1, 0).astype(np.uint8)
    mask = np.broadcast_to(~valid, data.shape)
    out = models.ImageData(np.ma.MaskedArray(data, mask=mask))
    return out.render(img_format="PNG")


def point_values(path: Path, lon: float, lat: float) -> list[float | None] | None:
    """Every band's value of ``path`` at lon/lat (None: nodata), or None outside it."""
    io = require("rio_tiler.io", "serve", FEATURE)
    errors = require("rio_tiler.errors", "serve", FEATURE)
    with io.Reader(str(path)) as src:
        try:
            point = src.point(lon, lat)
        except errors.PointOutsideBounds:
            return None
    masked = np.ma.getmaskarray(point.array)
    out: list[float | None] = []
    for value, invalid in zip(np.asarray(point.array.data, dtype=np.float64), masked, strict=True):
        out.append(None if invalid or not np.isfinite(value) else float(value))
    return out
