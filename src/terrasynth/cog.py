"""Cloud-optimised GeoTIFFs: how every generated raster is written.

GDAL's COG driver (through rasterio): 256 px tiles, deflate with a predictor, internal
overviews (average for values, nearest for class codes) down to under one tile, and the
layout COG readers rely on (image file directories first, then tile data, smallest overview
first), so a reader fetches a window or a zoom level with a few range requests. Band
descriptions, tags, nodata and georeferencing are kept.

The COG driver only copies a finished dataset. In-memory results are written through
rasterio's buffered writer (the array is in memory already); whole scenes are written tile by
tile into an ordinary tiled GeoTIFF whose overviews are built there, which is then copied
into a COG (:func:`copy_to_cog`) reusing those overviews, with memory bounded by GDAL's block
cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import rasterio
import rasterio.shutil

BLOCK = 256


def cog_options(dtype: str, categorical: bool = False) -> dict[str, Any]:
    """Creation options of the COG driver for one file of ``dtype``; ``categorical``: class
    codes, whose overviews take the nearest code instead of an average."""
    return dict(
        driver="COG",
        blocksize=BLOCK,
        compress="deflate",
        predictor=3 if dtype.startswith("float") else 2,
        overview_resampling="nearest" if categorical else "average",
        BIGTIFF="IF_SAFER",
    )


def copy_to_cog(src: Path, dst: Path, categorical: bool = False) -> Path:
    """Copy the GeoTIFF ``src`` into the COG ``dst``; overviews already in ``src`` are reused
    (the COG driver's ``OVERVIEWS=AUTO``), others are made. ``src`` is left in place."""
    with rasterio.open(src) as f:
        dtype = f.dtypes[0]
    rasterio.shutil.copy(src, dst, **cog_options(dtype, categorical), overviews="AUTO")
    return dst
