"""BigEarthNet v2 (reBEN) in its LMDB layout, with georeferencing rebuilt from patch names.

Layout::

    metadata.parquet                 patch_id, labels (19-class names), split, country,
                                     s1_name, s2v1_name, ...
    metadata_for_patches_with_snow_cloud_or_shadow.parquet   (optional, same columns)
    BigEarthNet-V2-LMDB/data.mdb     key = patch name, value = safetensors dict band -> array

S2 values are uint16 DN (B01..B12, B8A at 10/20/60 m: 120/60/20 px); S1 values are float32
dB (VV, VH, 120 px at 10 m). One :class:`Scene` per S2 patch of both parquet files, with
the S1 patch named by ``s1_name`` when the LMDB holds it, and the ``corine19`` labels.

Georeferencing. The LMDB stores none, so it is rebuilt from the name, e.g.
``S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_37_88``: Sentinel-2 tile 33UUP, patch column
37 and row 88 of 1200 m (120 px at 10 m) counted from the tile's upper-left corner. The
tile's corner is derived from the MGRS definition (:func:`s2_tile_origin`): the north-west
corner of the 100 km MGRS square, moved outwards to the next multiple of 60 m (the
Sentinel-2 tiling grid aligns 60 m pixels). Accuracy: exact (0 m) where this rule holds;
it reproduces the GeoTIFF georeference of all BigEarthNet v1 example patches (tiles 33UUP,
29UPU, 29SND, 35VPK), which use the same ``_col_row`` naming, and the column/row order is
confirmed by the continuity of neighbouring v2 patches (see the tests). Untested: southern
hemisphere tiles and the irregular zones 31V/32V and 31X-37X.

S2 reflectance = DN / 10000 without offset: BigEarthNet v2 covers 2017-06 .. 2018-05, from
L1C products of baselines 02.0x, before the -1000 DN offset of baseline 04.00 (the data
agree: many band minima are far below 1000 DN).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

from terrasynth.data.scene import Grid, Layer, Scene
from terrasynth.errors import InputError
from terrasynth.extras import require
from terrasynth.modalities import Modality, Registry, default_registry

if TYPE_CHECKING:
    import lmdb

LICENCE = "CDLA-Permissive-1.0"
METADATA = "metadata.parquet"
EXTRA_METADATA = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
COLUMNS = ("patch_id", "labels", "s1_name")
PATCH_M = 1200.0  # patch side in metres (120 px at 10 m)
TILE_PATCH = re.compile(r"_T?(\d{1,2}[C-HJ-NP-X][A-HJ-NP-Z][A-HJ-NP-V])_(\d+)_(\d+)$")
S2_TIME = re.compile(r"^S2[AB]_MSIL2A_(\d{8}T\d{6})_")

_BANDS_LAT = "CDEFGHJKLMNPQRSTUVWX"  # 8 degree latitude bands from 80 S (X: 72-84 N)
_COL_SETS = ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")  # 100 km column letters, by zone % 3
_ROWS = "ABCDEFGHJKLMNPQRSTUV"  # 100 km row letters, a cycle of 2000 km
_ROW_CYCLE = 2_000_000


@cache
def s2_tile_origin(tile: str) -> tuple[CRS, float, float]:
    """UTM CRS and upper-left (x, y) in metres of a Sentinel-2 tile, e.g. ``"33UUP"``.

    MGRS: the column letter counts 100 km squares east from easting 0 (letter set by zone
    number mod 3); the row letter counts 100 km squares north in a 2000 km cycle (odd zones
    start at 'A', even zones at 'F'); the latitude band picks the cycle: the first square at
    or north of the band's lowest northing (rounded down to 100 km). The tile's corner is the
    square's north-west corner snapped outwards to the 60 m grid.
    """
    m = re.fullmatch(r"(\d{1,2})([C-HJ-NP-X])([A-HJ-NP-Z])([A-HJ-NP-V])", tile)
    zone = int(m.group(1)) if m else 0
    if m is None or not 1 <= zone <= 60:
        raise InputError(f"'{tile}' is not a Sentinel-2 MGRS tile name (like 33UUP)")
    band, col, row = m.group(2), m.group(3), m.group(4)
    col_set = _COL_SETS[(zone - 1) % 3]
    if col not in col_set:
        raise InputError(f"tile {tile}: column letter {col} does not occur in UTM zone {zone}")
    crs = CRS.from_epsg((32600 if band >= "N" else 32700) + zone)
    west = (col_set.index(col) + 1) * 100_000
    south = ((_ROWS.index(row) - (0 if zone % 2 else 5)) % 20) * 100_000
    lat = -80.0 + 8.0 * _BANDS_LAT.index(band)
    meridian = -183.0 + 6.0 * zone
    _, ys = warp_transform(CRS.from_epsg(4326), crs, [meridian, meridian + 3.0], [lat, lat])
    lowest = math.floor(min(ys) / 100_000) * 100_000
    while south < lowest:
        south += _ROW_CYCLE
    return crs, math.floor(west / 60) * 60.0, math.ceil((south + 100_000) / 60) * 60.0


def patch_grid(name: str) -> Grid:
    """The 10 m grid of a BigEarthNet patch named ``..._<tile>_<col>_<row>``."""
    m = TILE_PATCH.search(name)
    if m is None:
        raise InputError(f"patch name {name} holds no MGRS tile and column/row indices")
    crs, ulx, uly = s2_tile_origin(m.group(1))
    col, row = int(m.group(2)), int(m.group(3))
    transform = Affine(10.0, 0.0, ulx + col * PATCH_M, 0.0, -10.0, uly - row * PATCH_M)
    size = int(PATCH_M / 10)
    return Grid(crs, transform, size, size)


@cache
def _modalities() -> tuple[Modality, Modality, Modality]:
    reg = default_registry()
    return reg["s2l2a"], reg["s1grd"], reg["corine19"]


def _locate(path: Path) -> tuple[Path, Path] | None:
    """(LMDB folder, metadata folder) for a top folder or the LMDB folder itself."""
    if (path / "data.mdb").is_file():
        return path, path.parent
    if (path / METADATA).is_file():
        subs = sorted(p for p in path.iterdir() if (p / "data.mdb").is_file())
        if subs:
            return subs[0], path
    return None


def _load_parquet(path: Path) -> pd.DataFrame:
    try:
        df = pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: unreadable parquet file ({exc})") from exc
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


class BigEarthNetV2Source:
    """Reader for the BigEarthNet v2 LMDB + metadata.parquet layout."""

    name = "bigearthnet_v2"

    def detect(self, path: str) -> bool:
        p = Path(path)
        found = _locate(p) if p.is_dir() else None
        if found is None or not (found[1] / METADATA).is_file():
            return False
        try:
            names = pq.read_schema(found[1] / METADATA).names
        except (OSError, pa.ArrowException):
            return False
        return all(c in names for c in COLUMNS)

    def scenes(self, path: str, registry: Registry | None = None) -> Iterator[Scene]:
        found = _locate(Path(path))
        if found is None:
            raise InputError(f"{path}: no BigEarthNet v2 LMDB (data.mdb) with {METADATA}")
        db, meta_dir = found
        tables = [_load_parquet(meta_dir / METADATA)]
        if (meta_dir / EXTRA_METADATA).is_file():
            tables.append(_load_parquet(meta_dir / EXTRA_METADATA))
        meta = pd.concat(tables).sort_values("patch_id")
        if meta["patch_id"].duplicated().any():
            raise InputError(f"{meta_dir}: a patch_id is listed twice in the metadata files")
        lmdb = require("lmdb", "lmdb", "the BigEarthNet v2 LMDB reader")
        check_lmdb_size(db)
        try:
            env = lmdb.open(str(db), readonly=True, lock=False, readahead=False)
        except lmdb.Error as exc:
            raise InputError(f"{db}: unreadable LMDB ({exc})") from exc
        try:
            for row in meta.itertuples(index=False):
                try:
                    with env.begin() as txn:
                        scene = self._scene(db, txn, row)
                except lmdb.Error as exc:  # a damaged page or index: lmdb's own error
                    raise InputError(f"{db}: damaged LMDB ({exc})") from exc
                yield scene
        finally:
            env.close()

    def _scene(self, db: Path, txn: lmdb.Transaction, row: Any) -> Scene:
        s2mod, s1mod, corine19 = _modalities()
        patch = str(row.patch_id)
        grid = patch_grid(patch)
        arrays = _arrays(db, txn, patch)
        if arrays is None:
            raise InputError(f"{db}: no entry for patch {patch} listed in the metadata")
        layers = [
            _layer(db, patch, arrays, "s2l2a", g.bands, g.gsd, grid, scale=1e-4, nodata=0)
            for g in s2mod.groups
        ]
        s1_name = row.s1_name
        s1 = _arrays(db, txn, str(s1_name)) if isinstance(s1_name, str) and s1_name else None
        if s1 is not None:
            s1_grid = patch_grid(str(s1_name))
            if s1_grid != grid:
                raise InputError(f"{db}: S1 patch {s1_name} is not at the place of {patch}")
            layers.append(_layer(db, str(s1_name), s1, "s1grd", s1mod.bands, 10.0, grid))
        codes = {e.name: e.code for e in corine19.legend}
        if isinstance(row.labels, str) or not hasattr(row.labels, "__iter__"):
            raise InputError(f"{db}: patch {patch}: 'labels' is not a list of class names")
        names = [str(n) for n in row.labels]
        unknown = [n for n in names if n not in codes]
        if unknown:
            raise InputError(f"{db}: patch {patch}: unknown 19-class label(s) {unknown}")
        m = S2_TIME.match(patch)
        if m is None:
            raise InputError(f"{db}: patch {patch} has no acquisition time in its name")
        return Scene(
            scene_id=f"{self.name}:{patch}",
            source=self.name,
            licence=LICENCE,
            grid=grid,
            layers=layers,
            time=datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC),
            labels={"corine19": sorted({codes[n] for n in names})},
        )


LMDB_MAGIC = 0xBEEFC0DE


def check_lmdb_size(db: Path) -> None:
    """Refuse an LMDB data file shorter than its meta pages say: LMDB maps the file and
    would be killed by SIGBUS on the first page past its end. Reads the two meta pages
    (64-bit little-endian layout: magic at byte 16, page size at 40, last page at 136,
    transaction id at 144) and keeps the newer one."""
    data = db / "data.mdb" if db.is_dir() else db
    size = data.stat().st_size
    with open(data, "rb") as f:
        first = f.read(160)
        if len(first) < 160 or struct.unpack_from("<I", first, 16)[0] != LMDB_MAGIC:
            raise InputError(f"{db}: not an LMDB data file (truncated or corrupt header)")
        page = struct.unpack_from("<I", first, 40)[0]
        if page < 512 or page > 65536 or page & (page - 1):
            raise InputError(f"{db}: corrupt LMDB header (page size {page})")
        f.seek(page)
        second = f.read(160)
    metas = [m for m in (first, second) if len(m) == 160]
    metas = [m for m in metas if struct.unpack_from("<I", m, 16)[0] == LMDB_MAGIC]
    newest = max(metas, key=lambda m: struct.unpack_from("<Q", m, 144)[0])
    last = struct.unpack_from("<Q", newest, 136)[0]
    need = (last + 1) * page
    if size < need:
        raise InputError(f"{db}: truncated LMDB file ({size} bytes, its pages need {need})")


def _arrays(db: Path, txn: lmdb.Transaction, key: str) -> dict[str, np.ndarray] | None:
    """The band arrays stored under ``key``, or None when the LMDB has no such key."""
    raw = txn.get(key.encode())
    if raw is None:
        return None
    try:
        return load_safetensors(bytes(raw))
    except (SafetensorError, ValueError) as exc:
        raise InputError(f"{db}: entry {key} is not a valid safetensors blob ({exc})") from exc


def _layer(
    db: Path,
    key: str,
    arrays: dict[str, np.ndarray],
    modality: str,
    bands: tuple[str, ...],
    gsd: float,
    grid: Grid,
    scale: float = 1.0,
    nodata: float | None = None,
) -> Layer:
    """Stack the named bands (all ``gsd`` metres) into one layer on ``grid`` scaled to gsd."""
    size = round(PATCH_M / gsd)
    for b in bands:
        a = arrays.get(b)
        if a is None:
            raise InputError(f"{db}: entry {key} has no band {b} (has {', '.join(arrays)})")
        if a.shape != (size, size):
            raise InputError(f"{db}: entry {key} band {b} is {a.shape}, expected {size}x{size}")
        if nodata is not None and a.dtype.kind not in "ui":
            raise InputError(f"{db}: entry {key} band {b} is {a.dtype}, expected integer DN")
    raw = np.stack([arrays[b] for b in bands])
    data = raw.astype(np.float32) * np.float32(scale)
    valid = np.isfinite(data) if nodata is None else raw != nodata
    transform = grid.transform @ Affine.scale(gsd / 10.0)
    return Layer(modality, bands, data, grid.crs, transform, valid)
