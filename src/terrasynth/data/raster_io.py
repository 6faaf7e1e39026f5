"""Shared reading helpers for readers: GeoTIFFs, layer stacking and JSON files.

One place where rasterio and JSON errors become clear one-line :class:`InputError` s.
A raster is a local file or a network location GDAL reads (``https://``, ``s3://``,
``/vsicurl/``...: :mod:`terrasynth.data.remote`); :func:`open_dataset` opens either.
Every raster is checked from its header before a pixel is read (:func:`check_header`):
absurd sizes, degenerate georeferencing and whole-file reads beyond :data:`MAX_READ_BYTES`
are refused, so no allocation grows with a number read from a file.
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
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds
from rasterio.windows import transform as window_transform

from terrasynth.data.remote import (
    RasterPath,
    RemotePath,
    gdal_name,
    raster_env,
    raster_path,
)
from terrasynth.data.scene import Grid, Layer
from terrasynth.errors import InputError

MAX_BAND_PIXELS = 2**32  # pixels per band a header may declare (65,536 px squared)
MAX_READ_BYTES = 2 * 2**30  # largest whole-file read (raw values as stored)
EPSG_4326 = CRS.from_epsg(4326)
# errors GDAL raises through rasterio: its own, and GDAL's C-level errors (CPLE_*, e.g. from
# reproject or PROJ), which rasterio exposes under no public name
GDAL_ERRORS = (RasterioError, CRSError, CPLE_BaseError)
# errors reading damaged files: also a message GDAL cannot decode as UTF-8, or a file name
# that is not UTF-8, surfaces as a UnicodeError
READ_ERRORS = (*GDAL_ERRORS, UnicodeError)


@dataclass
class Raster:
    """The raw bands of a raster file with its georeference (read once, sliced many times)."""

    path: RasterPath
    raw: np.ndarray  # (count, H, W) as stored; row i is file band i + 1
    crs: CRS
    transform: Affine
    nodata: float | None
    descriptions: tuple[str | None, ...]

    @property
    def count(self) -> int:
        return self.raw.shape[0]


def check_header(src: Any, path: Path) -> None:
    """Refuse a raster whose header cannot describe a real image, before any pixel is read:
    no band, a side of 0 px, more than :data:`MAX_BAND_PIXELS` per band, or a transform
    with a zero or non-finite pixel size."""
    width, height, count = src.width, src.height, src.count
    if count < 1:
        raise InputError(f"{path}: raster has no band")
    if width < 1 or height < 1:
        raise InputError(f"{path}: raster declares {width} x {height} px (empty or corrupt header)")
    if width * height > MAX_BAND_PIXELS:
        raise InputError(
            f"{path}: header declares {width} x {height} px per band, more than 2**32 "
            "(corrupt header?)"
        )
    check_georeference(src.crs, src.transform, width, height, path)


def check_georeference(crs: CRS | None, t: Affine, width: int, height: int, path: Path) -> None:
    """Refuse georeferencing terrasynth cannot place: a zero or non-finite pixel size, a
    grid that is not north-up (rotated, sheared or flipped), or, in a geodetic CRS, an
    extent that does not lie on the Earth."""
    coefficients = (t.a, t.b, t.c, t.d, t.e, t.f)
    text = ", ".join(f"{c:g}" for c in coefficients)
    if not all(np.isfinite(coefficients)) or t.a * t.e - t.b * t.d == 0:
        raise InputError(
            f"{path}: degenerate georeferencing (pixel size zero or not finite: transform {text})"
        )
    if t.is_identity:
        raise InputError(f"{path}: raster has no geotransform (not georeferenced)")
    if t.b != 0 or t.d != 0 or t.a < 0 or t.e > 0:
        raise InputError(
            f"{path}: the grid is not north-up (transform {text}); warp it to a north-up "
            "grid first (e.g. gdalwarp)"
        )
    if crs is None or not (crs.is_projected or crs.is_geographic):
        return  # a local CRS: nothing to place it on
    left, top = t.c, t.f
    right, bottom = t @ (width, height)
    try:
        west, south, east, north = transform_bounds(crs, EPSG_4326, left, bottom, right, top)
    except GDAL_ERRORS as exc:
        raise InputError(
            f"{path}: its extent cannot be placed on the Earth ({first_line(exc)})"
        ) from exc
    on_earth = -90 <= south <= north <= 90 and west >= -540 and east <= 540
    if not (np.isfinite([west, south, east, north]).all() and on_earth):
        raise InputError(
            f"{path}: its extent ({left:g}, {bottom:g}, {right:g}, {top:g} in {crs}) does not "
            "lie on the Earth (absurd georeferencing)"
        )


def read_bytes(src: Any, count: int | None = None) -> int:
    """Bytes of ``count`` bands (all by default) of an open raster, as stored."""
    size = max(np.dtype(d).itemsize for d in src.dtypes)
    return (src.count if count is None else count) * src.width * src.height * size


def check_read_size(src: Any, path: Path, count: int | None = None) -> None:
    """Refuse reading ``count`` bands of ``src`` whole when that exceeds :data:`MAX_READ_BYTES`."""
    need = read_bytes(src, count)
    if need > MAX_READ_BYTES:
        raise InputError(
            f"{path}: {src.width} x {src.height} px x {src.count} band(s) is "
            f"{need / 2**30:.1f} GiB, more than the {MAX_READ_BYTES / 2**30:.0f} GiB read whole; "
            "generate from it with the whole-scene engine (terrasynth generate --stream), "
            "or cut it into smaller files"
        )


@dataclass(frozen=True)
class Header:
    """What a raster file's header says, checked (:func:`check_header`); no pixel read."""

    path: RasterPath
    grid: Grid
    count: int
    itemsize: int  # bytes per value of its widest band

    @property
    def nbytes(self) -> int:
        """Bytes of all its bands as stored."""
        return self.count * self.grid.width * self.grid.height * self.itemsize


def read_header(path: str | Path | RemotePath) -> Header:
    """The checked header of a georeferenced raster file (or network location)."""
    path = raster_path(path)
    try:
        with raster_env(path), open_dataset(path) as src:
            if src.crs is None:
                raise InputError(
                    f"{path}: raster has no CRS (not georeferenced, or a truncated header)"
                )
            check_header(src, path)
            size = max(np.dtype(d).itemsize for d in src.dtypes)
            grid = Grid(src.crs, src.transform, src.width, src.height)
            return Header(path, grid, src.count, size)
    except READ_ERRORS as exc:
        raise InputError(
            f"{path}: not a readable raster (corrupt or truncated?): {first_line(exc)}"
        ) from exc


def open_raster(path: str | Path | RemotePath, window: Window | None = None) -> Raster:
    """Read every band of a raster file (only ``window`` of it when given); corrupt,
    truncated, CRS-less, absurd or too large files are refused from their header, before
    their pixels are read."""
    path = raster_path(path)
    try:
        with raster_env(path), open_dataset(path) as src:
            if src.crs is None:
                raise InputError(
                    f"{path}: raster has no CRS (not georeferenced, or a truncated header)"
                )
            check_header(src, path)
            if window is None:
                check_read_size(src, path)
            try:
                raw = src.read(window=window)
            except READ_ERRORS as exc:
                raise InputError(
                    f"{path}: cannot read pixels: the file is truncated or corrupt "
                    f"({first_line(exc)})"
                ) from exc
            transform = src.transform if window is None else src.window_transform(window)
            return Raster(path, raw, src.crs, transform, src.nodata, src.descriptions)
    except READ_ERRORS as exc:
        raise InputError(
            f"{path}: not a readable raster (corrupt or truncated?): {first_line(exc)}"
        ) from exc


UNREADABLE = "not a readable raster (corrupt or truncated?)"


def open_dataset(path: RasterPath, unreadable: str = UNREADABLE) -> Any:
    """The open rasterio dataset of a local file or a network location (call it inside
    :func:`~terrasynth.data.remote.raster_env`). A missing file, a location the server
    does not have or cannot serve, or an unreadable file raises one-line :class:`InputError`;
    ``unreadable`` words the last."""
    if isinstance(path, Path) and not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        return rasterio.open(gdal_name(path))
    except READ_ERRORS as exc:
        if isinstance(path, RemotePath):
            reason = _remote_reason(exc)
            raise InputError(f"{path}: cannot open the remote raster: {reason}") from exc
        raise InputError(f"{path}: {unreadable}: {first_line(exc)}") from exc


def _remote_reason(exc: BaseException) -> str:
    """GDAL's words for a failed network open, made plain."""
    text = first_line(exc)
    code = text.removeprefix("HTTP response code: ")
    if code != text and code.strip().isdigit():
        meaning = {"401": "unauthorised", "403": "access denied", "404": "not found"}
        return f"HTTP {code.strip()} ({meaning.get(code.strip(), 'server error')})"
    if "does not exist in the file system" in text:
        return "not found, or the server cannot be reached"
    return text


def window_over(grid: Grid, region: Grid, margin: int = 2) -> Window | None:
    """The window of a raster on ``grid`` covering ``region``'s footprint (in any CRS),
    grown by ``margin`` px for resampling and clipped to the raster; None if the footprint
    misses it."""
    try:
        left, bottom, right, top = transform_bounds(
            region.crs, grid.crs, *region.bounds, densify_pts=21
        )
    except GDAL_ERRORS as exc:
        raise InputError(f"cannot place a region in {grid.crs} ({first_line(exc)})") from exc
    if not np.all(np.isfinite([left, bottom, right, top])):
        return None
    win = from_bounds(left, bottom, right, top, transform=grid.transform)
    c0 = max(int(np.floor(win.col_off)) - margin, 0)
    r0 = max(int(np.floor(win.row_off)) - margin, 0)
    c1 = min(int(np.ceil(win.col_off + win.width)) + margin, grid.width)
    r1 = min(int(np.ceil(win.row_off + win.height)) + margin, grid.height)
    if c1 <= c0 or r1 <= r0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


def pixel_window(
    grid: Grid,
    path: RasterPath,
    window: Sequence[int] | None = None,
    bbox: Sequence[float] | None = None,
) -> Window | None:
    """The part of a raster on ``grid`` to work on: ``window`` (column and row offsets,
    width and height in its pixels) or ``bbox`` (west, south, east, north in degrees,
    widened to whole pixels), clipped to the raster; None when neither is given. A region
    outside the raster, or both given, raises :class:`InputError`."""
    if window is not None and bbox is not None:
        raise InputError("give a window or a bbox, not both")
    if window is None and bbox is None:
        return None
    if window is not None:
        if len(window) != 4 or min(window[2:]) < 1 or min(window[:2]) < 0:
            raise InputError(
                f"a window is COL,ROW,WIDTH,HEIGHT (offsets >= 0, sizes >= 1), not {window}"
            )
        col, row, width, height = (int(v) for v in window)
        w, h = min(width, grid.width - col), min(height, grid.height - row)
        if w < 1 or h < 1:  # (a Window refuses negative sizes itself)
            raise InputError(
                f"the window {col},{row},{width},{height} lies outside {path} "
                f"({grid.width} x {grid.height} px)"
            )
        return Window(col, row, w, h)
    west, south, east, north = (float(v) for v in bbox)  # type: ignore[union-attr]
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise InputError(
            f"a bbox is WEST,SOUTH,EAST,NORTH in degrees (west < east, south < north), "
            f"not {','.join(f'{v:g}' for v in bbox)}"  # type: ignore[union-attr]
        )
    region = Grid(EPSG_4326, Affine(east - west, 0, west, 0, south - north, north), 1, 1)
    win = window_over(grid, region, margin=0)
    if win is None:
        raise InputError(f"the bbox {west:g},{south:g},{east:g},{north:g} does not overlap {path}")
    return win


def cropped_grid(grid: Grid, window: Window | None) -> Grid:
    """The grid of ``window`` of a raster on ``grid`` (``grid`` itself for None)."""
    if window is None:
        return grid
    t = window_transform(window, grid.transform)
    return Grid(grid.crs, t, int(window.width), int(window.height))


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
        if raw.dtype.kind == "f":  # class codes stored as floats: NaN, inf or fractions
            inside = np.isfinite(raw) & (np.abs(raw) < 2**31)
            valid &= inside
            raw = np.where(inside, raw, 0)
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
        raise InputError(f"{path}: unreadable JSON ({first_line(exc)})") from exc
    if not isinstance(value, expect):
        kind = _JSON_KIND.get(expect, expect.__name__)
        raise InputError(f"{path}: expected a JSON {kind}, found {type(value).__name__}")
    return value


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
