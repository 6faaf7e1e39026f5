"""Arrays in, arrays out: in-memory rasters as inputs, xarray Datasets as results.

Inputs: wherever :meth:`terrasynth.pipeline.Pipeline.generate` takes a GeoTIFF it also takes

* a :class:`GeoArray` (or the tuple ``(array, transform, crs)``): a ``(bands, rows, cols)``
  or ``(rows, cols)`` numpy array with its affine transform and CRS, optionally its nodata
  value and band names (what a file's band descriptions say);
* an ``xarray.DataArray`` georeferenced with rioxarray (``rioxarray.open_rasterio``, or any
  array with ``.rio.write_crs``/``.rio.write_transform``): its CRS, transform, nodata
  (``rio.nodata``, else ``rio.encoded_nodata``) and band names (string ``band`` coordinates,
  or the ``long_name`` attribute that ``open_rasterio`` fills from band descriptions).

Each is read exactly as the same pixels in a file: the same band layout rules, scaling,
nodata and checks, so the same seed gives bit-identical samples from a file, its array and
its DataArray.

Outputs: :meth:`terrasynth.pipeline.Generation.to_dataset` (in memory) and
:func:`open_generation` (a saved folder, e.g. a whole scene: lazily, in chunks) give one
``xarray.Dataset`` per target with the variables ``samples`` (sample, band, y, x), ``mean``
and ``std`` (band, y, x), or for class maps ``samples``, ``probs`` (class, y, x) and
``entropy`` (y, x); the CRS is kept through rioxarray (``ds.rio.crs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError

from terrasynth.cog import BLOCK
from terrasynth.data.raster_io import Header, Raster, check_georeference, read_header
from terrasynth.data.scene import Grid
from terrasynth.errors import InputError, TerrasynthError
from terrasynth.extras import require

if TYPE_CHECKING:
    import xarray as xr


@dataclass
class GeoArray:
    """An in-memory raster: values, affine transform and CRS (and optionally nodata and band
    names, as a GeoTIFF's nodata and band descriptions)."""

    data: np.ndarray
    transform: Affine | Sequence[float]
    crs: CRS | str | int
    nodata: float | None = None
    bands: Sequence[str] | None = None


def is_array_input(value: Any) -> bool:
    """Whether an input is an in-memory raster rather than a file path."""
    if isinstance(value, str | Path):
        return False
    if isinstance(value, GeoArray | tuple):
        return True
    import xarray as xr

    return isinstance(value, xr.DataArray)


def as_raster(value: Any, key: str) -> Raster | None:
    """The in-memory raster ``value`` of input ``key`` as a :class:`Raster` (what reading a
    file gives); None for a file path."""
    if not is_array_input(value):
        return None
    label = Path(f"<{key} {type(value).__name__}>")
    if isinstance(value, tuple):
        if len(value) != 3 or not isinstance(value[0], np.ndarray):
            raise InputError(f"{label}: give an array input as (array, transform, crs)")
        value = GeoArray(*value)
    if isinstance(value, GeoArray):
        return _raster(label, value)
    return _raster(label, _from_dataarray(label, value))


def input_header(value: Any, key: str) -> Header:
    """The checked :class:`Header` of input ``key``: read from a file's header, or taken
    from an in-memory array (already in memory, so nothing is read)."""
    raster = as_raster(value, key)
    if raster is None:
        return read_header(value)
    _, height, width = raster.raw.shape
    grid = Grid(raster.crs, raster.transform, width, height)
    return Header(raster.path, grid, raster.count, raster.raw.dtype.itemsize)


def _raster(label: Path, g: GeoArray) -> Raster:
    data = np.asarray(g.data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or 0 in data.shape:
        raise InputError(f"{label}: expected a (bands, rows, cols) array, got shape {data.shape}")
    try:
        crs = CRS.from_user_input(g.crs)
    except (CRSError, TypeError, ValueError) as exc:
        raise InputError(f"{label}: not a CRS: {g.crs!r}") from exc
    transform = g.transform if isinstance(g.transform, Affine) else Affine(*list(g.transform)[:6])
    check_georeference(crs, transform, data.shape[2], data.shape[1], label)
    names = tuple(g.bands) if g.bands is not None else (None,) * data.shape[0]
    if len(names) != data.shape[0]:
        raise InputError(f"{label}: {len(names)} band names for {data.shape[0]} bands")
    nodata = None if g.nodata is None else float(g.nodata)
    return Raster(label, data, crs, transform, nodata, names)


def _from_dataarray(label: Path, da: xr.DataArray) -> GeoArray:
    """A rioxarray-georeferenced DataArray as a GeoArray (band dimension first)."""
    rio = da.rio
    if rio.crs is None:
        raise InputError(f"{label}: the DataArray has no CRS (use .rio.write_crs)")
    y, x = rio.y_dim, rio.x_dim
    other = [d for d in da.dims if d not in (x, y)]
    if len(other) > 1:
        raise InputError(f"{label}: one band dimension besides {y} and {x} expected: {da.dims}")
    da = da.transpose(*other, y, x)
    names = None
    if other:
        coords = da[other[0]].values
        if coords.dtype.kind in "UO" and all(isinstance(c, str) for c in coords.tolist()):
            names = [str(c) for c in coords.tolist()]
    # rioxarray.open_rasterio puts the file's band descriptions in long_name: a tuple, or a
    # string for one band
    long_name = da.attrs.get("long_name")
    count = da.sizes[other[0]] if other else 1
    if names is None and isinstance(long_name, str) and count == 1:
        names = [long_name]
    elif (
        names is None
        and isinstance(long_name, list | tuple)
        and len(long_name) == count
        and all(isinstance(n, str) for n in long_name)
    ):
        names = list(long_name)
    nodata = rio.nodata if rio.nodata is not None else rio.encoded_nodata
    return GeoArray(np.asarray(da.values), rio.transform(recalc=False), rio.crs, nodata, names)


def describe_input(value: Any) -> str:
    """How an input is recorded in ``generation.json``: a file path, or an array's shape."""
    if not is_array_input(value):
        return str(value)
    data = value[0] if isinstance(value, tuple) else value.data
    shape = "x".join(map(str, np.shape(data)))
    return f"<in-memory {type(value).__name__} {shape} {np.asarray(data).dtype}>"


# -- outputs ---------------------------------------------------------------------------------
VARIABLES = {
    "continuous": ("samples", "mean", "std"),
    "categorical": ("samples", "probs", "entropy"),
}


def open_generation(folder: str | Path, name: str | None = None, chunks: Any = True):
    """The outputs of target ``name`` in a generation folder (in-memory or whole scene) as an
    ``xarray.Dataset`` with the variables of :meth:`Generation.to_dataset`.

    ``chunks`` (default: the files' 256 px tiles) opens the files lazily as Dask arrays, so a
    scene larger than memory is read window by window when computed (needs the ``dask``
    extra); ``chunks=None`` reads everything into memory with no Dask.
    """
    import rioxarray
    import xarray as xr

    folder = Path(folder)
    if chunks is not None:
        require("dask.array", "dask", "lazy, chunked whole-scene results (chunks=...)")
    if chunks is True:  # the COGs' own tiles
        chunks = {"band": -1, "y": BLOCK, "x": BLOCK}
    names = sorted({p.name.rpartition("_sample")[0] for p in folder.glob("*_sample*.tif")})
    if not names:
        raise TerrasynthError(f"{folder}: no generated raster (MOD_sampleK.tif) in it")
    if name is None:
        if len(names) > 1:
            raise TerrasynthError(f"{folder}: several targets ({', '.join(names)}); name one")
        name = names[0]
    if name not in names:
        raise TerrasynthError(f"{folder}: no outputs of '{name}' (it has {', '.join(names)})")
    kind = "categorical" if (folder / f"{name}_probs.tif").exists() else "continuous"

    def read(stem: str, lead: str | None) -> xr.DataArray:
        da = rioxarray.open_rasterio(folder / f"{stem}.tif", chunks=chunks, mask_and_scale=False)
        labels = da.attrs.get("long_name")
        labels = [labels] if isinstance(labels, str) else list(labels or [])
        if lead is None:
            return da.isel(band=0, drop=True)
        return da.rename(band=lead).assign_coords({lead: labels})

    samples = sorted(
        folder.glob(f"{name}_sample*.tif"), key=lambda p: int(p.stem.rpartition("sample")[2])
    )
    stack = xr.concat([read(p.stem, "band") for p in samples], dim="sample")
    variables = {"samples": stack.assign_coords(sample=np.arange(len(samples)))}
    if kind == "continuous":
        variables |= {"mean": read(f"{name}_mean", "band"), "std": read(f"{name}_std", "band")}
    else:
        variables |= {
            "probs": read(f"{name}_probs", "class"),
            "entropy": read(f"{name}_entropy", None),
        }
    ds = xr.Dataset({k: _plain(v) for k, v in variables.items()})
    crs = variables["samples"].rio.crs
    ds.attrs.update(modality=name, kind=kind, source=str(folder))
    return ds.rio.write_crs(crs)


def _plain(da: xr.DataArray) -> xr.DataArray:
    """A variable without the per-file attributes (descriptions, scale, offset)."""
    da = da.copy()
    for key in ("long_name", "scale_factor", "add_offset", "AREA_OR_POINT"):
        da.attrs.pop(key, None)
    return da
