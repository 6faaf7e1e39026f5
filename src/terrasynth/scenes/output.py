"""Finished whole-scene arrays into cloud-optimised GeoTIFFs, tile by tile, with overviews.

Same files as an in-memory generation (``MOD_sampleK.tif``, ``MOD_mean.tif``/``_std.tif`` or
``MOD_probs.tif``/``_entropy.tif``, ``generation.json``, ``quicklook.png``, ``item.json``), on
the job's working grid: tiled (256 px), deflate-compressed, with internal overviews (average
for values, nearest for class codes) so that GIS tools and the quick-look read a large scene
fast. Each file is streamed into a hidden tiled GeoTIFF, its overviews built there, and then
copied into a COG (``terrasynth.cog``) that reuses them. Coarser band groups (Sentinel-2's
20 m and 60 m bands) are written at their own pixel size replicated onto the 10 m grid, not
interpolated. Memory: one tile of every sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from rasterio.enums import Resampling

from terrasynth.cog import copy_to_cog
from terrasynth.data.scene import Grid
from terrasynth.data.stats import denormalise
from terrasynth.modalities import Modality

if TYPE_CHECKING:
    from terrasynth.scenes.job import SceneJob

QUICKLOOK_SIDE = 512
GDAL_CACHE_MB = 128


def _profile(grid: Grid, count: int, dtype: str, nodata) -> dict[str, Any]:
    profile: dict[str, Any] = dict(
        driver="GTiff",
        width=grid.width,
        height=grid.height,
        count=count,
        dtype=dtype,
        nodata=nodata,
        crs=grid.crs,
        transform=grid.transform,
        compress="deflate",
        BIGTIFF="IF_SAFER",
        # one band per block: a tile's write completes its blocks, so none is written twice
        # (pixel interleaving rewrote blocks evicted half-written: files 2.5x larger at 4k²)
        interleave="band",
    )
    if grid.width >= 256 and grid.height >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if dtype == "float32":
        profile["predictor"] = 3
    return profile


def _overview_factors(grid: Grid) -> list[int]:
    factors, f = [], 2
    while max(grid.width, grid.height) // f >= 256:
        factors.append(f)
        f *= 2
    return factors


class _Writer:
    """GeoTIFFs of one target, open for tile-by-tile writing."""

    def __init__(self, folder: Path, name: str, mod: Modality, grid: Grid, n: int, given):
        self.files: dict[str, Any] = {}
        self.mod, self.grid = mod, grid
        tags = {"modality": name, "units": mod.units or "", "generator": "terrasynth"}
        if given:
            tags["given_bands"] = ",".join(given)
        if mod.kind == "categorical":
            nodata = int(mod.nodata) if mod.nodata is not None else 255
            legend = json.dumps({str(e.code): e.name for e in mod.legend})
            for k in range(n):
                self._open(folder, f"{name}_sample{k}", 1, "uint8", nodata, [name],
                           {**tags, "sample": str(k), "legend": legend})  # fmt: skip
            self._open(folder, f"{name}_probs", mod.num_classes, "float32", np.nan,
                       [e.name for e in mod.legend], {**tags, "units": "probability"})  # fmt: skip
            self._open(folder, f"{name}_entropy", 1, "float32", np.nan, ["entropy"],
                       {**tags, "units": "nats"})  # fmt: skip
        else:
            b = list(mod.bands)
            for k in range(n):
                self._open(folder, f"{name}_sample{k}", len(b), "float32", np.nan, b,
                           {**tags, "sample": str(k)})  # fmt: skip
            self._open(folder, f"{name}_mean", len(b), "float32", np.nan, b, tags)
            self._open(folder, f"{name}_std", len(b), "float32", np.nan, b, tags)

    def _open(self, folder, stem, count, dtype, nodata, descriptions, tags) -> None:
        profile = _profile(self.grid, count, dtype, nodata)
        dst = rasterio.open(_part(folder / f"{stem}.tif"), "w", **profile)
        for i, d in enumerate(descriptions, start=1):
            dst.set_band_description(i, d)
        dst.update_tags(**tags)
        self.files[stem] = dst

    def write(self, stem: str, arr: np.ndarray, window) -> None:
        self.files[stem].write(arr.astype(self.files[stem].dtypes[0]), window=window)

    def close(self) -> list[Path]:
        """Build the overviews, then copy each file into its cloud-optimised GeoTIFF."""
        factors = _overview_factors(self.grid)
        parts = []
        for dst in self.files.values():
            nearest = dst.dtypes[0] == "uint8"
            if factors:
                dst.build_overviews(factors, Resampling.nearest if nearest else Resampling.average)
            parts.append((Path(dst.name), nearest))
            dst.close()
        paths = []
        for part, nearest in parts:
            final = part.with_name(part.name.removeprefix(".").removesuffix(PART))
            paths.append(copy_to_cog(part, final, categorical=nearest))
            part.unlink()
        return paths


PART = ".part.tif"


def _part(path: Path) -> Path:
    """The hidden working file ``path`` is written to before it becomes a COG."""
    return path.with_name(f".{path.name}{PART}")


def write_outputs(job: SceneJob, folder: Path, progress=None) -> list[Path]:
    """Stream every target of a finished job into GeoTIFFs in ``folder``."""
    # GDAL caches written blocks up to 5 % of the machine's memory before flushing them:
    # cap it, so memory stays bounded by a tile whatever the scene size
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
        return _write_outputs(job, folder, progress)


def _write_outputs(job: SceneJob, folder: Path, progress=None) -> list[Path]:
    reg = job.cfg.registry
    grid = job.grid  # unpadded working grid
    paths: list[Path] = []
    for name in job.spec.targets:
        mod = reg[name]
        given = [b for b in mod.bands if name in job.held and job.held[name][mod.bands.index(b)]]
        writer = _Writer(folder, name, mod, grid, job.spec.num_samples, given)
        try:
            for tile in job.plan.tiles():
                if tile.row >= grid.height or tile.col >= grid.width:
                    continue
                h = min(tile.height, grid.height - tile.row)
                w = min(tile.width, grid.width - tile.col)
                window = rasterio.windows.Window(tile.col, tile.row, w, h)
                _write_tile(job, writer, name, mod, tile, h, w, window)
                if progress is not None:
                    progress()
        finally:
            paths += writer.close()
    return paths


def _on_base_grid(arr: np.ndarray, factor: int, h: int, w: int) -> np.ndarray:
    """(..., h/f, w/f) -> (..., h, w) by pixel replication (a coarse band keeps its pixel)."""
    if factor > 1:
        arr = arr.repeat(factor, -2).repeat(factor, -1)
    return arr[..., :h, :w]


def _write_tile(job, writer: _Writer, name, mod: Modality, tile, h, w, window) -> None:
    stats = job.cfg.stats.get(name, {})
    if mod.kind == "categorical":
        g = mod.groups[0]
        rows, cols = tile.scaled(g.factor)
        probs = job.store[f"probs/{name}/{g.name}"][:, :, rows, cols]  # (N, K, h, w)
        probs = _on_base_grid(probs, g.factor, h, w)
        codes = np.array([e.code for e in mod.legend])
        for k, p in enumerate(probs):
            writer.write(f"{name}_sample{k}", codes[p.argmax(0)][None], window)
        mean_p = probs.mean(0)
        entropy = -(np.clip(mean_p, 1e-9, 1) * np.log(np.clip(mean_p, 1e-9, 1))).sum(0)
        writer.write(f"{name}_probs", mean_p, window)
        writer.write(f"{name}_entropy", entropy[None], window)
        return
    parts = []
    for g in mod.groups:
        rows, cols = tile.scaled(g.factor)
        x0 = job.store[f"final/{name}/{g.name}"][:, :, rows, cols]
        phys = denormalise(x0, stats, g.bands, mod.transform)
        parts.append(_on_base_grid(phys, g.factor, h, w))
    samples = np.concatenate(parts, 1)  # (N, C, h, w) in registry band order
    for k, s in enumerate(samples):
        writer.write(f"{name}_sample{k}", s, window)
    writer.write(f"{name}_mean", samples.mean(0), window)
    writer.write(f"{name}_std", samples.std(0), window)


def quicklook_generation(job: SceneJob, folder: Path, info: dict):
    """A decimated :class:`~terrasynth.pipeline.Generation` of the written files (read
    through their overviews) for the quick-look panel."""
    from terrasynth.pipeline import Generation, TargetResult

    grid = job.grid
    k = max(1, -(-max(grid.width, grid.height) // QUICKLOOK_SIDE))
    small = grid.scaled(k)
    shape = (small.height, small.width)
    reg = job.cfg.registry

    def read(stem: str) -> np.ndarray:
        with rasterio.open(folder / f"{stem}.tif") as src:
            arr = src.read(out_shape=(src.count, *shape), resampling=Resampling.nearest)
            return arr.astype(np.float32) if src.dtypes[0] == "float32" else arr

    targets = {}
    for name in job.spec.targets:
        mod = reg[name]
        n = job.spec.num_samples
        samples = np.stack([read(f"{name}_sample{i}") for i in range(min(n, 4))])
        if mod.kind == "categorical":
            targets[name] = TargetResult(mod, mod.bands, samples=samples.astype(np.int32),
                                         entropy=read(f"{name}_entropy")[0])  # fmt: skip
        else:
            mean, std = read(f"{name}_mean"), read(f"{name}_std")
            targets[name] = TargetResult(mod, mod.bands, samples=samples, mean=mean, std=std)
    inputs = {}
    for m in job.input_names:
        if m in job.spec.targets:
            continue
        g = reg[m].groups[0]
        f = g.factor
        data = job.store[f"conditions/{m}/{g.name}/data"][:, :: max(1, k // f), :: max(1, k // f)]
        valid = job.store[f"conditions/{m}/{g.name}/valid"][:, :: max(1, k // f), :: max(1, k // f)]
        arr = np.where(valid, data, np.nan)[:, : shape[0], : shape[1]]
        inputs[m] = (reg[m], g.bands, arr)
    return Generation(small, targets, inputs, info)
