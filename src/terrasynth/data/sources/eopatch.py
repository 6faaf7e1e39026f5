"""Reader for eo-learn EOPatch folders (numpy arrays + JSON metadata), without eo-learn.

An EOPatch folder holds ``bbox.geojson`` (polygon and CRS), ``timestamps.json`` and one
``.npy`` file per feature, arrays shaped (time, rows, cols, bands) or (rows, cols, bands).
This reader yields:

* one scene per date whose cloud cover (mean of ``mask/CLM`` over ``mask/IS_DATA``) is below
  10 %, holding ``ndvi`` (cloudy pixels invalid), ``dem`` and ``landcover_lulc``;
* one scene per entry of ``REFERENCE_SCENES.npy`` (next to the patch folder, as in eo-learn's
  ``example_data``) holding ``s2l1c`` (+ ``dem`` and ``landcover_lulc``).

Units: NDVI unitless, DEM in metres, L1C top-of-atmosphere reflectance as stored (already
DN/10000: values 0.0005..0.53). The reference scenes' band order is eo-learn's
B01..B12 with B8A after B08 and B10 eleventh; the values confirm it: the 11th band (B10,
cirrus) is ~0.001-0.005, far below all others, and (band 8 - band 4) / (band 8 + band 4)
equals the patch's NDVI exactly, which also identifies each reference scene's date.
Clouds are not masked in the L1C scenes: clouds are part of a top-of-atmosphere image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import from_bounds

from terrasynth.data.raster_io import read_json
from terrasynth.data.scene import Grid, Layer, Scene
from terrasynth.errors import InputError
from terrasynth.modalities import Registry

MAX_CLOUD = 0.10  # dates with at least this cloud fraction are skipped
REFERENCE_FILE = "REFERENCE_SCENES.npy"
# Band order of eo-learn's L1C arrays (all 13 bands resampled to the patch's 10 m grid).
L1C_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
             "B11", "B12")  # fmt: skip
LICENCE = "MIT"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _is_eopatch(path: Path) -> bool:
    return (
        (path / "bbox.geojson").is_file()
        and (path / "timestamps.json").is_file()
        and ((path / "data").is_dir() or (path / "mask_timeless").is_dir())
    )


def _child_patches(path: Path) -> list[Path]:
    with os.scandir(path) as entries:
        dirs = sorted(Path(e.path) for e in entries if e.is_dir())
    return [d for d in dirs if _is_eopatch(d)]


def _load_optional(path: Path) -> np.ndarray | None:
    """One feature array, or None where the patch lacks that feature."""
    return _load(path) if path.is_file() else None


def _load(path: Path) -> np.ndarray:
    """One feature array; a missing or damaged file is an :class:`InputError`."""
    if not path.is_file():
        raise InputError(f"{path}: missing EOPatch feature file")
    try:
        _check_npy_size(path)
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: unreadable .npy array ({_first_line(exc)})") from exc


def _check_npy_size(path: Path) -> None:
    """Refuse a .npy file whose header declares more data than the file holds, before
    anything is allocated for it (numpy would size its buffer by the header)."""
    with open(path, "rb") as f:
        fmt = np.lib.format
        major, _ = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        shape, _, dtype = read(f)
        need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        held = path.stat().st_size - f.tell()
    if need > held:
        raise InputError(
            f"{path}: .npy header declares {shape} {dtype} ({need} bytes), the file holds "
            f"{held} (truncated or corrupt)"
        )


def _grid(patch: Path, height: int, width: int) -> Grid:
    """The patch grid: ``height`` x ``width`` pixels spanning the bbox polygon's extent."""
    path = patch / "bbox.geojson"
    bbox = read_json(path)
    try:
        crs = CRS.from_user_input(bbox["crs"]["properties"]["name"])
        xy = np.asarray(bbox["coordinates"][0], dtype=float)
    except (KeyError, TypeError, IndexError, ValueError, CRSError) as exc:
        raise InputError(
            f"{path}: expected a Polygon with a named CRS ({_first_line(exc)})"
        ) from exc
    left, bottom = xy.min(axis=0)
    right, top = xy.max(axis=0)
    transform = from_bounds(left, bottom, right, top, width, height)
    return Grid(crs, transform, width, height)


def _timestamps(patch: Path) -> list[datetime]:
    path = patch / "timestamps.json"
    raw = read_json(path, expect=list)
    try:
        times = [datetime.fromisoformat(str(t)) for t in raw]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: expected a list of ISO timestamps ({_first_line(exc)})") from exc
    # Sentinel Hub timestamps are UTC; eo-learn writes them without a zone.
    return [t if t.tzinfo else t.replace(tzinfo=UTC) for t in times]


def _check_shape(path: Path, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise InputError(f"{path}: array shape {array.shape}, expected {shape}")


class EOPatchSource:
    """eo-learn EOPatch folders: low-cloud NDVI dates and reference L1C scenes."""

    name = "eopatch"

    def detect(self, path: str) -> bool:
        p = Path(path)
        try:
            return p.is_dir() and (_is_eopatch(p) or bool(_child_patches(p)))
        except OSError:
            return False

    def scenes(self, path: str, registry: Registry | None = None) -> Iterator[Scene]:
        p = Path(path)
        patches = [p] if _is_eopatch(p) else _child_patches(p)
        if not patches:
            raise InputError(f"{p}: no EOPatch folder (bbox.geojson + timestamps.json) found")
        for patch in patches:
            yield from self._patch_scenes(patch)

    def _patch_scenes(self, patch: Path) -> Iterator[Scene]:
        ndvi = _load_optional(patch / "data" / "NDVI.npy")
        dem = _load_optional(patch / "data_timeless" / "DEM.npy")
        lulc = _load_optional(patch / "mask_timeless" / "LULC.npy")
        spatial = next((a.shape[-3:-1] for a in (ndvi, dem, lulc) if a is not None), None)
        if spatial is None:
            raise InputError(f"{patch}: EOPatch has none of data/NDVI, DEM or LULC")
        height, width = spatial
        grid = _grid(patch, height, width)
        static = self._static_layers(patch, grid, dem, lulc)
        if ndvi is not None:
            yield from self._date_scenes(patch, grid, ndvi, static)
        ref_path = patch.parent / REFERENCE_FILE
        if ref_path.is_file():
            yield from self._reference_scenes(patch, ref_path, grid, ndvi, static)

    def _static_layers(
        self, patch: Path, grid: Grid, dem: np.ndarray | None, lulc: np.ndarray | None
    ) -> list[Layer]:
        layers = []
        if dem is not None:
            _check_shape(patch / "data_timeless" / "DEM.npy", dem, (grid.height, grid.width, 1))
            data = dem[..., 0].astype(np.float32)  # metres
            layers.append(
                Layer("dem", ("elevation",), data, grid.crs, grid.transform, np.isfinite(data))
            )
        if lulc is not None:
            _check_shape(patch / "mask_timeless" / "LULC.npy", lulc, (grid.height, grid.width, 1))
            codes = lulc[..., 0].astype(np.int32)  # registry landcover_lulc codes, 0 = no data
            layers.append(
                Layer("landcover_lulc", ("class",), codes, grid.crs, grid.transform, codes != 0)
            )
        return layers

    def _date_scenes(
        self, patch: Path, grid: Grid, ndvi: np.ndarray, static: list[Layer]
    ) -> Iterator[Scene]:
        times = _timestamps(patch)
        shape = (len(times), grid.height, grid.width, 1)
        _check_shape(patch / "data" / "NDVI.npy", ndvi, shape)
        clm_path = patch / "mask" / "CLM.npy"
        clm = _load(clm_path)
        _check_shape(clm_path, clm, shape)
        is_data = _load_optional(patch / "mask" / "IS_DATA.npy")
        if is_data is None:
            is_data = np.ones(shape, bool)
        _check_shape(patch / "mask" / "IS_DATA.npy", is_data, shape)
        cloud = clm[..., 0].astype(bool)
        has_data = is_data[..., 0].astype(bool)
        for t, time in enumerate(times):
            n_data = int(has_data[t].sum())
            if n_data == 0 or cloud[t][has_data[t]].mean() >= MAX_CLOUD:
                continue
            data = ndvi[t, ..., 0].astype(np.float32)
            valid = has_data[t] & ~cloud[t] & np.isfinite(data)
            layer = Layer("ndvi", ("ndvi",), data, grid.crs, grid.transform, valid)
            yield Scene(
                scene_id=f"eopatch:{patch.name}:{time:%Y%m%dT%H%M%S}",
                source=self.name,
                licence=LICENCE,
                grid=grid,
                layers=[layer, *static],
                time=time,
            )

    def _reference_scenes(
        self,
        patch: Path,
        ref_path: Path,
        grid: Grid,
        ndvi: np.ndarray | None,
        static: list[Layer],
    ) -> Iterator[Scene]:
        refs = _load(ref_path)
        if refs.ndim != 4 or refs.shape[1:] != (grid.height, grid.width, len(L1C_BANDS)):
            raise InputError(
                f"{ref_path}: array shape {refs.shape}, expected (scenes, {grid.height}, "
                f"{grid.width}, {len(L1C_BANDS)}) to match {patch.name}"
            )
        times = _timestamps(patch) if ndvi is not None else []
        for i in range(refs.shape[0]):
            data = np.moveaxis(refs[i], -1, 0).astype(np.float32)  # reflectance as stored
            layer = Layer("s2l1c", L1C_BANDS, data, grid.crs, grid.transform, np.isfinite(data))
            yield Scene(
                scene_id=f"eopatch:{patch.name}:ref{i}",
                source=self.name,
                licence=LICENCE,
                grid=grid,
                layers=[layer, *static],
                time=_matching_date(data, ndvi, times),
            )


def _matching_date(
    l1c: np.ndarray, ndvi: np.ndarray | None, times: list[datetime]
) -> datetime | None:
    """The one date whose stored NDVI equals this scene's (B08-B04)/(B08+B04), else None.

    The reference scenes carry no timestamps; in eo-learn's example data each one is one of
    the patch's dates, and its NDVI reproduces that date's NDVI array to float precision.
    """
    if ndvi is None or ndvi.shape[0] != len(times):
        return None
    b08, b04 = l1c[L1C_BANDS.index("B08")], l1c[L1C_BANDS.index("B04")]
    with np.errstate(divide="ignore", invalid="ignore"):
        own = (b08 - b04) / (b08 + b04)
    diff = np.abs(ndvi[..., 0] - own[None])
    matches = [t for t in range(len(times)) if np.nanmax(diff[t]) < 1e-5]
    return times[matches[0]] if len(matches) == 1 else None
