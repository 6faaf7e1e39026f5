"""Embeddings of a place: a model's features per pixel and per chip, georeferenced.

>>> emb = Pipeline.from_pretrained().embed({"s2l2a": "s2.tif"}, chip_size=64)
>>> emb.pixels            # xarray DataArray (band, y, x) at the model's feature resolution
>>> emb.chips             # pandas DataFrame: chip_id, row, col, x, y, lon, lat, emb000...
>>> emb.save("out/")      # embedding.tif, chips.parquet, embedding.json

Every input is given clean (noise level 0) and nothing is generated; the model's
:meth:`~terrasynth.models.base.GenerativeModel.feature_map` runs over overlapping windows
whose maps are blended (``terrasynth.sampling.windows.embed_windows``). The feature grid is
the working grid of generation (the first input's own grid when it is projected in metres,
a local UTM grid otherwise) with pixels ``feature_factor`` times larger: 1 for the
convolutional backbones, the patch size for the transformer. Feature pixels with no valid
input under them are NaN. Chips are squares of ``chip_size`` working-grid pixels from the
grid's top-left corner (the last row and column may be cut by the scene's edge); a chip's
embedding is the mean of its valid feature pixels.

Large scenes are embedded tile by tile with flat memory by ``terrasynth.scenes.embed``;
both paths write the same files through :class:`EmbeddingWriter` and :class:`ChipMeans`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from terrasynth.atomic import atomic_folder, output_files
from terrasynth.data.scene import Grid
from terrasynth.errors import TerrasynthError

EMBEDDING_TIF = "embedding.tif"
CHIPS_PARQUET = "chips.parquet"
EMBEDDING_JSON = "embedding.json"
DEFAULT_CHIP_SIZE = 64
GDAL_CACHE_MB = 128


def feature_names(channels: int) -> list[str]:
    """Band descriptions and Parquet columns of the features: ``emb000``, ``emb001``..."""
    return [f"emb{i:03d}" for i in range(channels)]


def check_chip_size(chip_size: int, factor: int) -> int:
    """``chip_size`` working-grid pixels as feature pixels; a user error unless it is a
    positive multiple of the model's feature factor."""
    if chip_size < 1 or chip_size % factor:
        raise TerrasynthError(
            f"chip size must be a positive multiple of the model's feature resolution "
            f"({factor} px), not {chip_size}"
        )
    return chip_size // factor


def embedding_grid(work: Grid, window: int, factor: int) -> Grid:
    """``work`` grown right and down to at least one window and a multiple of 4 px and of
    the feature factor (the padding holds no input)."""
    step = int(np.lcm(4, factor))
    w = max(window, -(-work.width // step) * step)
    h = max(window, -(-work.height // step) * step)
    return Grid(work.crs, work.transform, w, h)


class ChipMeans:
    """Per-chip sums of valid feature pixels, added tile by tile (memory: one row per
    chip), and their table."""

    def __init__(self, grid: Grid, chip: int, channels: int) -> None:
        """``grid``: the feature grid; ``chip``: feature pixels per chip side."""
        self.grid, self.chip = grid, chip
        self.rows, self.cols = -(-grid.height // chip), -(-grid.width // chip)
        self.sums = np.zeros((self.rows, self.cols, channels), np.float64)
        self.counts = np.zeros((self.rows, self.cols), np.int64)

    def add(self, features: np.ndarray, row: int, col: int) -> None:
        """Add (C, h, w) features (NaN: no input) lying at feature pixel (row, col)."""
        _, h, w = features.shape
        valid = np.isfinite(features).all(0)
        k = self.chip
        for i in range(row // k, (row + h - 1) // k + 1):
            r0, r1 = max(row, i * k) - row, min(row + h, (i + 1) * k) - row
            for j in range(col // k, (col + w - 1) // k + 1):
                c0, c1 = max(col, j * k) - col, min(col + w, (j + 1) * k) - col
                m = valid[r0:r1, c0:c1]
                block = features[:, r0:r1, c0:c1]
                self.sums[i, j] += np.where(m, block, 0.0).sum((1, 2))
                self.counts[i, j] += int(m.sum())

    def frame(self, names: list[str]):
        """The chips holding input: ``chip_id`` (row-major over all chips), ``row``,
        ``col`` (chip indices), ``x``, ``y`` (centre of the chip's part of the scene, in
        the grid's CRS), ``lon``, ``lat``, ``pixels`` (valid feature pixels) and the mean
        of each feature."""
        import pandas as pd

        rows, cols = np.nonzero(self.counts)
        k, g = self.chip, self.grid
        # the chip's footprint, cut by the scene's edge, in feature pixels
        top, left = rows * k, cols * k
        bottom, right = np.minimum(top + k, g.height), np.minimum(left + k, g.width)
        xs, ys = g.transform @ ((left + right) / 2.0, (top + bottom) / 2.0)
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        if len(xs):
            lon, lat = warp_transform(g.crs, CRS.from_epsg(4326), xs.tolist(), ys.tolist())
        else:
            lon, lat = [], []
        counts = self.counts[rows, cols]
        means = (self.sums[rows, cols] / counts[:, None]).astype(np.float32)
        table = {
            "chip_id": (rows * self.cols + cols).astype(np.int64),
            "row": rows.astype(np.int32),
            "col": cols.astype(np.int32),
            "x": xs,
            "y": ys,
            "lon": np.asarray(lon, float),
            "lat": np.asarray(lat, float),
            "pixels": counts.astype(np.int32),
        }
        df = pd.DataFrame(table)
        feats = pd.DataFrame(means.reshape(len(rows), -1), columns=names)
        df = pd.concat([df, feats], axis=1)
        df.attrs.update(crs=g.crs.to_string(), chip_pixels=k)
        return df


def write_chips(path: Path, frame, meta: dict[str, Any]) -> Path:
    """``frame`` as Parquet, with ``meta`` (JSON) in the schema's ``terrasynth`` key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[b"terrasynth"] = json.dumps(meta, default=str).encode()
    pq.write_table(table.replace_schema_metadata(schema_meta), path)
    return path


def read_chips(path: str | Path):
    """A ``chips.parquet`` as a DataFrame, its ``terrasynth`` metadata in ``attrs``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    df = table.to_pandas()
    raw = (table.schema.metadata or {}).get(b"terrasynth")
    if raw:
        df.attrs.update(json.loads(raw))
    return df


class EmbeddingWriter:
    """``embedding.tif`` open for writing window by window: float32, one band per feature
    (described ``emb000``...), NaN nodata, deflate, tiled where the grid is large enough."""

    def __init__(self, path: Path, grid: Grid, names: list[str], tags: dict, block: int = 32):
        profile: dict[str, Any] = dict(
            driver="GTiff", width=grid.width, height=grid.height, count=len(names),
            dtype="float32", nodata=np.nan, crs=grid.crs, transform=grid.transform,
            compress="deflate", predictor=3, BIGTIFF="IF_SAFER", interleave="band",
        )  # fmt: skip
        # blocks of the size the tiles are written in: no block is written twice
        block = block if block % 16 == 0 else 256
        if grid.width >= block and grid.height >= block:
            profile.update(tiled=True, blockxsize=block, blockysize=block)
        self.env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
        self.env.__enter__()
        try:
            self.dst = rasterio.open(path, "w", **profile)
        except BaseException:
            self.env.__exit__(None, None, None)
            raise
        for i, name in enumerate(names, start=1):
            self.dst.set_band_description(i, name)
        self.dst.update_tags(**{k: str(v) for k, v in tags.items()})

    def write(self, features: np.ndarray, row: int, col: int) -> None:
        _, h, w = features.shape
        self.dst.write(features.astype(np.float32), window=Window(col, row, w, h))

    def close(self) -> None:
        try:
            self.dst.close()
        finally:
            self.env.__exit__(None, None, None)


def embedding_tags(info: dict[str, Any]) -> dict[str, str]:
    """GeoTIFF tags of ``embedding.tif``: what made it."""
    keys = ("model", "backbone", "layer", "feature_factor", "feature_gsd_m")
    return {"generator": "terrasynth", **{k: str(info[k]) for k in keys if k in info}}


@dataclass
class Embedding:
    """What :meth:`~terrasynth.pipeline.Pipeline.embed` returns (module docstring).

    ``grid``: the feature grid; ``features``: (C, h, w) float32 on it, NaN where no input;
    ``factor``: working-grid pixels per feature pixel; ``chip_size``: working-grid pixels
    per chip side of :attr:`chips`."""

    grid: Grid
    features: np.ndarray
    factor: int
    chip_size: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return feature_names(self.features.shape[0])

    @property
    def valid(self) -> np.ndarray:
        """(h, w) bool: the feature pixels with input under them."""
        return np.isfinite(self.features).all(0)

    def to_xarray(self):
        """The per-pixel embeddings as a georeferenced ``xarray.DataArray`` (band, y, x):
        band names ``emb000``..., pixel-centre coordinates, CRS and transform (rioxarray)."""
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        import xarray as xr

        g = self.grid
        xs = (g.transform @ (np.arange(g.width) + 0.5, np.full(g.width, 0.5)))[0]
        ys = (g.transform @ (np.full(g.height, 0.5), np.arange(g.height) + 0.5))[1]
        da = xr.DataArray(
            self.features,
            dims=("band", "y", "x"),
            coords={"band": self.names, "y": ys, "x": xs},
            name="embedding",
        )
        da.attrs.update(feature_factor=self.factor, model=str(self.info.get("model", "")))
        return da.rio.write_crs(g.crs).rio.write_transform(g.transform).rio.write_nodata(np.nan)

    @property
    def pixels(self):
        """:meth:`to_xarray`."""
        return self.to_xarray()

    def chip_table(self, chip_size: int | None = None):
        """Per-chip mean embeddings (:meth:`ChipMeans.frame`) for chips of ``chip_size``
        working-grid pixels (default: the size given to ``embed``)."""
        chip = check_chip_size(chip_size or self.chip_size, self.factor)
        means = ChipMeans(self.grid, chip, self.features.shape[0])
        means.add(self.features, 0, 0)
        return means.frame(self.names)

    @cached_property
    def chips(self):
        """:meth:`chip_table` at the chip size given to ``embed``."""
        return self.chip_table()

    def save(self, folder: str | Path, overwrite: bool = False) -> list[Path]:
        """Write ``embedding.tif``, ``chips.parquet`` and ``embedding.json`` into ``folder``
        (atomically: a temporary sibling renamed into place)."""
        with atomic_folder(folder, overwrite, "embed") as tmp:
            info = {**self.info, "chip_size": self.chip_size}
            writer = EmbeddingWriter(tmp / EMBEDDING_TIF, self.grid, self.names,
                                     embedding_tags(info))  # fmt: skip
            try:
                writer.write(self.features, 0, 0)
            finally:
                writer.close()
            write_chips(tmp / CHIPS_PARQUET, self.chips, info)
            (tmp / EMBEDDING_JSON).write_text(json.dumps(info, indent=2, default=str))
        return output_files(folder)
