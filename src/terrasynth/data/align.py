"""Put every layer of a scene on the scene's reference grid, per band group.

Each modality's finest band group lands on the scene grid; coarser groups land on the same
footprint at their storage factor (``BandGroup.factor``: 2x, 4x coarser), so native
resolution differences inside a modality survive. Resampling follows the modality's kind:
bilinear for continuous values, nearest for class codes. Nodata travels as a validity mask;
no value is invented where a source has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rasterio.warp import Resampling, reproject

from terrasynth.data.raster_io import GDAL_ERRORS, first_line
from terrasynth.data.scene import Grid, Layer, Scene
from terrasynth.errors import InputError
from terrasynth.modalities import Modality, Registry


@dataclass
class AlignedGroup:
    """One band group of one modality on the scene grid (scaled by the group factor)."""

    bands: tuple[str, ...]
    data: np.ndarray  # (C, H, W) float32 physical values, or class indices for categorical
    valid: np.ndarray  # (C, H, W) bool
    grid: Grid


@dataclass
class AlignedScene:
    """A scene whose rasters all share one footprint; image-level labels kept aside."""

    scene: Scene
    groups: dict[tuple[str, str], AlignedGroup]


def reference_grid(layers: list[Layer], registry: Registry, prefer: str | None = None) -> Grid:
    """The grid a scene's layers are aligned onto: the finest one no band loses detail on.

    A band of native GSD ``g`` in group factor ``f``, delivered at pixel size ``r``, is stored
    at ``base * f``; it keeps its detail when ``base * f <= max(r, g)``. The base is the
    smallest such bound over all bands, applied to the finest layer's footprint: S2 20 m
    bands delivered at 20 m (with their 10 m siblings resampled to 20 m) give a 10 m base,
    so the 20 m group is stored at 20 m, not 40 m. ``prefer`` restricts the choice to one
    modality's layers.
    """
    pool = [la for la in layers if la.modality == prefer] or layers

    def base(layer: Layer) -> float:
        mod = registry[layer.modality]
        r = layer.grid.ground_resolution_m()
        if not mod.groups:
            return r
        return min(max(r, mod.group_of(b).gsd) / mod.group_of(b).factor for b in layer.bands)

    best = min(pool, key=base)
    r = best.grid.ground_resolution_m()
    return best.grid.refined(max(1, round(r / base(best))))


def _resampling(modality: Modality) -> Resampling:
    return Resampling.nearest if modality.kind == "categorical" else Resampling.bilinear


def warp_to_grid(
    src: np.ndarray,
    src_valid: np.ndarray,
    src_transform,
    src_crs,
    dst: Grid,
    resampling: Resampling,
) -> tuple[np.ndarray, np.ndarray]:
    """Reproject one band (h, w) or a stack of bands (C, h, w) and its validity onto ``dst``:
    (values, valid) of shape (H, W) or (C, H, W); 0 where invalid.

    Where ``dst`` is a crop of the source's own pixel grid (the same CRS, pixel size and
    alignment: a model's output written back to its input's grid), the pixels are copied:
    resampling at the pixel centres themselves gives the same values without GDAL's cost."""
    shape = (*src.shape[:-2], dst.height, dst.width)
    # NaN marks invalid input so bilinear weights never mix nodata into valid pixels.
    src_f = np.where(src_valid, src.astype(np.float32), np.nan)
    offset = _pixel_offset(src_transform, src_crs, dst)
    if src.ndim == 3:
        src_valid = np.broadcast_to(src_valid, src.shape)
    if offset is None and src.ndim == 3 and not (src_valid == src_valid[:1]).all():
        # GDAL warps a stack with one validity for all bands; bands with gaps of their
        # own go one at a time so each keeps its own edges
        parts = [
            warp_to_grid(b, v, src_transform, src_crs, dst, resampling)
            for b, v in zip(src, src_valid, strict=True)
        ]
        return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
    if offset is not None:
        out = _crop_pixels(src_f, offset, dst.height, dst.width)
    else:
        out = np.zeros(shape, np.float32)
        try:
            reproject(
                src_f,
                out,
                src_transform=src_transform,
                src_crs=src_crs,
                dst_transform=dst.transform,
                dst_crs=dst.crs,
                src_nodata=np.nan,
                dst_nodata=np.nan,
                resampling=resampling,
            )
        except GDAL_ERRORS as exc:  # e.g. no coordinate operation from a local CRS to EPSG
            raise InputError(
                f"cannot warp a layer in {_crs_text(src_crs)} onto a grid in "
                f"{_crs_text(dst.crs)} ({first_line(exc)[:120]})"
            ) from exc
    valid = np.isfinite(out)
    return np.where(valid, out, 0.0).astype(np.float32), valid


def _pixel_offset(src_transform, src_crs, dst: Grid) -> tuple[int, int] | None:
    """(row, col) of ``dst``'s first pixel on the source grid when ``dst`` is a crop of that
    grid (same CRS, pixel size and alignment, no rotation); None when it must be resampled."""
    if src_crs is None or dst.crs is None or src_crs != dst.crs:
        return None
    a, b, c, d, e, f = tuple(src_transform)[:6]
    a2, b2, c2, d2, e2, f2 = tuple(dst.transform)[:6]
    if b or d or b2 or d2 or not (np.isclose(a, a2, rtol=1e-9) and np.isclose(e, e2, rtol=1e-9)):
        return None
    col, row = (c2 - c) / a, (f2 - f) / e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(row), round(col)


def _crop_pixels(src: np.ndarray, offset: tuple[int, int], height: int, width: int) -> np.ndarray:
    """``src``'s pixels from ``offset`` (row, col), ``height`` x ``width``; NaN off its edges."""
    out = np.full((*src.shape[:-2], height, width), np.nan, np.float32)
    r, c = offset
    h, w = src.shape[-2:]
    r0, c0 = max(r, 0), max(c, 0)
    r1, c1 = min(r + height, h), min(c + width, w)
    if r1 > r0 and c1 > c0:
        out[..., r0 - r : r1 - r, c0 - c : c1 - c] = src[..., r0:r1, c0:c1]
    return out


def _crs_text(crs) -> str:
    text = crs.to_string() if crs is not None else "no CRS"
    return text if len(text) <= 60 else text[:57] + "..."


def align_scene(scene: Scene, registry: Registry) -> AlignedScene:
    """Reproject all raster layers of ``scene`` onto its grid, per (modality, group)."""
    groups: dict[tuple[str, str], AlignedGroup] = {}
    for layer in scene.layers:
        modality = registry[layer.modality]
        resampling = _resampling(modality)
        valid_all = layer.valid_mask()
        codes = modality.class_index() if modality.kind == "categorical" else None
        for b, band in enumerate(layer.bands):
            group = modality.group_of(band)
            key = (modality.name, group.name)
            if key not in groups:
                dst = scene.grid.scaled(group.factor)
                shape = (len(group.bands), dst.height, dst.width)
                groups[key] = AlignedGroup(
                    group.bands, np.zeros(shape, np.float32), np.zeros(shape, bool), dst
                )
            target = groups[key]
            src = layer.data[b]
            src_valid = valid_all[b]
            if codes is not None:
                src, src_valid = _codes_to_index(src, src_valid, codes, modality)
            data, valid = warp_to_grid(
                src, src_valid, layer.transform, layer.crs, target.grid, resampling
            )
            c = group.bands.index(band)
            # A band given by several layers (rare) keeps the first valid value.
            fill = valid & ~target.valid[c]
            target.data[c][fill] = data[fill]
            target.valid[c] |= valid
    return AlignedScene(scene, groups)


def legend_lookup(codes: np.ndarray, index: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Class indices of legend ``codes`` (``index``: code -> class index) and where a code
    is in the legend (elsewhere the index is 0).

    A binary search in the sorted legend codes: memory grows with the legend, never with
    the code values an array holds (a corrupt code of 2e9 costs nothing more)."""
    flat = codes.astype(np.int64, copy=False)
    if not index:
        return np.zeros(flat.shape, np.int32), np.zeros(flat.shape, bool)
    keys = np.array(sorted(index), np.int64)
    values = np.array([index[k] for k in keys.tolist()], np.int32)
    pos = np.searchsorted(keys, flat).clip(0, len(keys) - 1)
    known = keys[pos] == flat
    return np.where(known, values[pos], 0), known


def _codes_to_index(
    codes: np.ndarray, valid: np.ndarray, index: dict[int, int], modality: Modality
) -> tuple[np.ndarray, np.ndarray]:
    """Map legend codes to class indices 0..K-1; codes outside the legend become invalid."""
    idx, known = legend_lookup(codes, index)
    if modality.nodata is not None:
        valid = valid & (codes != modality.nodata)
    ok = valid & known
    return np.where(ok, idx, 0), ok
