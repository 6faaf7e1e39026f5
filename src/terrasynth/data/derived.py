"""Modalities that can be computed from others, to widen the training pairs.

A store holds slope only where a source ships it (a few hundred chips of two places), while
elevation comes with many more chips, from flat farmland to mountains. Deriving slope from
elevation for the training chips that hold a DEM but no slope lets the model learn the
physical relation rather than "slope of the source this looks like". Only the training
split is widened (``ChipDataset(derive=True)``); validation and test keep stored values.

Relief scaling (``ChipDataset(relief_scale=p)``) goes one step further for the same reason:
with probability ``p`` a training chip's DEM is flattened about its mean by a random factor
and its slope recomputed from the flattened DEM. Slope then follows the DEM even where the
images show mountains, instead of "the images look like the steep training site".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def slope_degrees(
    elevation: np.ndarray, valid: np.ndarray, pixel_m: float
) -> tuple[np.ndarray, np.ndarray]:
    """Terrain slope (degrees) of an elevation grid (metres) with ``pixel_m`` pixels.

    Central differences inside, one-sided at the edges (numpy's ``gradient``; a 3 x 3 slope
    like gdaldem's needs GDAL's Python bindings, which rasterio does not expose). A slope
    is valid where its pixel and its four neighbours inside the grid are valid.
    """
    z = np.where(valid, elevation, 0.0).astype(np.float64)
    dy, dx = np.gradient(z, pixel_m)
    slope = np.degrees(np.arctan(np.hypot(dx, dy))).astype(np.float32)
    ok = valid.copy()
    ok[1:] &= valid[:-1]
    ok[:-1] &= valid[1:]
    ok[:, 1:] &= valid[:, :-1]
    ok[:, :-1] &= valid[:, 1:]
    return np.where(ok, slope, 0.0).astype(np.float32), ok


def scale_relief(elevation: np.ndarray, valid: np.ndarray, factor: float) -> np.ndarray:
    """Elevation with its relief about the mean of its valid pixels multiplied by ``factor``.

    The mean height (what location mostly fixes) stays; hills flatten (``factor`` < 1).
    """
    if not valid.any():
        return elevation
    mean = float(elevation[valid].mean())
    return np.where(valid, mean + factor * (elevation - mean), elevation).astype(np.float32)


# derived modality -> (the modality it comes from, function of (values, valid, pixel metres))
DERIVATIONS: dict[str, tuple[str, Callable[..., tuple[np.ndarray, np.ndarray]]]] = {
    "slope": ("dem", slope_degrees),
}
