"""What readers produce: georeferenced layers of one place, before alignment.

A :class:`Scene` is one place (and, where it matters, one date) as a source holds it: a list
of :class:`Layer` objects, each a stack of bands sharing one grid, in whatever CRS and
resolution the source distributes. Alignment (``terrasynth.data.align``) puts them on the
scene's reference :class:`Grid`; chipping cuts the aligned scene into chips.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError

from terrasynth.errors import InputError
from terrasynth.modalities import Registry


@dataclass(frozen=True)
class Grid:
    """A raster grid: CRS, affine transform (pixel -> CRS coordinates) and size."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> tuple[float, float]:
        return (abs(self.transform.a), abs(self.transform.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) for north-up grids."""
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (self.width, self.height)
        return (min(left, right), min(bottom, top), max(left, right), max(bottom, top))

    def scaled(self, factor: int) -> Grid:
        """The same footprint at ``factor`` times coarser pixels (size rounded up)."""
        if factor == 1:
            return self
        return Grid(
            self.crs,
            self.transform @ Affine.scale(factor),
            -(-self.width // factor),
            -(-self.height // factor),
        )

    def refined(self, factor: int) -> Grid:
        """The same footprint at ``factor`` times finer pixels."""
        if factor == 1:
            return self
        return Grid(
            self.crs,
            self.transform @ Affine.scale(1 / factor),
            self.width * factor,
            self.height * factor,
        )

    def window(self, col: int, row: int, width: int, height: int) -> Grid:
        """The sub-grid starting at pixel (col, row)."""
        return Grid(self.crs, self.transform @ Affine.translation(col, row), width, height)

    def ground_resolution_m(self) -> float:
        """Pixel size in metres (approximate for geographic CRSs)."""
        rx, _ = self.res
        if self.crs.is_geographic:
            _, lat = self.center_lonlat()
            return float(rx * 111_320.0 * max(np.cos(np.radians(lat)), 1e-6))
        try:
            factor = self.crs.linear_units_factor
        except CRSError:  # a local CRS without a defined unit: taken as metres
            return float(rx)
        return float(rx * factor[1]) if factor else rx

    def center_lonlat(self) -> tuple[float, float]:
        from rasterio.warp import transform as warp_transform

        x, y = self.transform @ (self.width / 2, self.height / 2)
        if self.crs.is_geographic:
            return float(x), float(y)
        try:
            lon, lat = warp_transform(self.crs, CRS.from_epsg(4326), [x], [y])
        except (RasterioError, CRSError, CPLE_BaseError) as exc:  # a local CRS, say
            raise InputError(f"a grid in {self.crs} cannot be placed on the Earth") from exc
        if not (np.isfinite(lon[0]) and np.isfinite(lat[0])):
            raise InputError(f"a grid in {self.crs} does not lie on the Earth")
        return float(lon[0]), float(lat[0])


@dataclass
class Layer:
    """Bands of one modality that share one grid, as the source stores them.

    ``data`` is (C, H, W) in the modality's physical units (scale/offset already applied)
    for continuous modalities, or the source's class codes for categorical ones.
    ``valid`` is True where a pixel holds data: (H, W) for all bands or (C, H, W).
    """

    modality: str
    bands: tuple[str, ...]
    data: np.ndarray
    crs: CRS
    transform: Affine
    valid: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.data.ndim == 2:
            self.data = self.data[None]
        if self.data.ndim != 3:
            raise InputError(f"{self.modality}: expected a (bands, rows, cols) array")
        if self.data.shape[0] != len(self.bands):
            raise InputError(
                f"{self.modality}: {self.data.shape[0]} bands of data for "
                f"{len(self.bands)} band names ({', '.join(self.bands)})"
            )
        if self.crs is None:
            raise InputError(f"{self.modality}: raster has no CRS")

    @property
    def grid(self) -> Grid:
        return Grid(self.crs, self.transform, self.data.shape[2], self.data.shape[1])

    def valid_mask(self) -> np.ndarray:
        """(C, H, W) validity: the given mask combined with finite values."""
        finite = (
            np.isfinite(self.data)
            if self.data.dtype.kind == "f"
            else np.ones(self.data.shape, bool)
        )
        if self.valid is None:
            return finite
        v = self.valid if self.valid.ndim == 3 else np.broadcast_to(self.valid, self.data.shape)
        return finite & v


@dataclass
class Scene:
    """One place as a source holds it: layers in native grids plus metadata.

    ``grid`` is the reference grid every layer is aligned onto (usually the finest grid of
    the main modality). ``labels`` holds image-level labels per multilabel modality, as
    legend codes. ``licence`` and ``source`` travel into the store with every chip.
    """

    scene_id: str
    source: str
    licence: str
    grid: Grid
    layers: list[Layer]
    time: datetime | None = None
    labels: dict[str, list[int]] = field(default_factory=dict)
    min_valid: dict[str, float] = field(default_factory=dict)  # per-modality availability

    @property
    def modalities(self) -> list[str]:
        seen: list[str] = []
        for layer in self.layers:
            if layer.modality not in seen:
                seen.append(layer.modality)
        return seen + [m for m in self.labels if m not in seen]


class Source(Protocol):
    """A reader for one distribution format. Readers live in ``terrasynth.data.sources``."""

    name: str

    def detect(self, path: str) -> bool:
        """True if ``path`` is in this reader's format (cheap: look at names, not pixels)."""
        ...

    def scenes(self, path: str, registry: Registry | None = None) -> Iterator[Scene]:
        """Yield the scenes found under ``path`` (``registry``: user modalities, if any)."""
        ...
