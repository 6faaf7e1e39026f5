"""Fetch from a STAC API: search, map assets to registry modalities, stack on one grid.

``terrasynth data fetch --stac URL`` and ``terrasynth generate --stac URL`` search a STAC
API with pystac-client (the ``stac`` extra) for ``--collections``, ``--bbox`` (WGS 84) and
``--datetime``, and map every item's assets to registry modalities and bands:

* the modality of an item comes from a mapping file (``collections: {ID: {modality: ...}}``)
  or, without one, from its metadata: Sentinel-1 (``sar:*``, platform or constellation
  ``sentinel-1*``) is ``s1grd`` (``s1rtc`` for RTC collections), Sentinel-2 is ``s2l2a`` or
  ``s2l1c`` by its product type, processing level or collection id;
* the band of an asset comes from the mapping file's ``assets`` or from its band metadata
  (STAC 1.1 ``bands`` or ``eo:bands``: a name such as ``B04`` / ``B4`` or a common name such
  as ``red`` or ``rededge1``; SAR assets by their ``sar:polarizations`` or key ``vv``/``vh``);
  scale, offset and nodata come from ``raster:bands`` (or the mapping file), and a
  collection the mapping marks ``timeless`` (elevation, maps) joins every scene.

Every mapped band is read through GDAL (``/vsicurl/`` for ``http(s)://``, ``/vsis3/`` for
``s3://``) with a :class:`rasterio.vrt.WarpedVRT` onto one grid covering the bbox, so only
the windows of cloud-optimised GeoTIFFs that cover it are read, whatever their CRS. The
grid's CRS is ``--crs``, else the first asset's projected CRS, else the UTM zone of the
bbox; its pixel size is ``--resolution``, else the finest native GSD of the found
modalities. Items of one collection and day are mosaicked.

The result is a folder that the existing builder reads: one single-band float32 GeoTIFF
per modality, day and band (``MOD/YYYYMMDD_BAND.tif``, physical units, NaN = no data) and a
source description (``terrasynth-source.yaml``, ``docs/sources.md``) that pairs the days of
different modalities. Files are written under a temporary name and renamed when complete,
so a rerun of the same query skips what is done (``fetch.json`` records the query and grid;
another query in the same folder is refused).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
import yaml
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

from terrasynth.data.raster_io import READ_ERRORS, first_line
from terrasynth.data.scene import Grid
from terrasynth.data.sources.described import DESCRIPTION_FILE
from terrasynth.errors import InputError, TerrasynthError
from terrasynth.extras import require
from terrasynth.modalities import Modality, Registry
from terrasynth.stac import COMMON_NAMES

FETCH_RECORD = "fetch.json"
MAX_SIDE = 20_000  # pixels per side of the fetch grid
SKIP_ROLES = {"thumbnail", "overview", "visual", "metadata"}
RASTER_TYPES = ("image/tiff", "image/jp2", "application/x-hdf")
# GDAL settings for reading cloud-optimised GeoTIFFs over HTTP: no directory listing, a few
# retries, ranges merged
GDAL_REMOTE = dict(
    GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
    GDAL_HTTP_MAX_RETRY="3",
    GDAL_HTTP_RETRY_DELAY="1",
    GDAL_HTTP_MERGE_CONSECUTIVE_RANGES="YES",
    CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.tiff,.TIF,.TIFF,.jp2,.vrt",
)


@dataclass(frozen=True)
class Query:
    """A STAC item search: API landing page, collections, bbox (WGS 84), datetime."""

    url: str
    collections: tuple[str, ...]
    bbox: tuple[float, float, float, float]
    datetime: str | None = None
    max_items: int = 100


@dataclass(frozen=True)
class BandSource:
    """One band of one asset: where to read it and how to make it physical."""

    href: str
    index: int  # 1-based band of the file
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    to_db: bool = False  # linear power to dB (10 log10)


@dataclass
class Acquisition:
    """The bands of one modality on one day (items of one collection, mosaicked)."""

    modality: str
    collection: str
    day: datetime
    items: list[str] = field(default_factory=list)
    bands: dict[str, list[BandSource]] = field(default_factory=dict)
    crs: CRS | None = None  # of the first asset, when the item says
    timeless: bool = False  # joins every scene (elevation, maps): the mapping's 'timeless'


@dataclass
class FetchResult:
    """What a fetch found and wrote."""

    folder: Path
    grid: Grid
    items: int
    acquisitions: list[Acquisition]
    files: list[Path]
    skipped: int  # files already complete from an earlier run
    unmapped: list[str]  # "collection: asset" of raster assets that map to no band


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """``W,S,E,N`` in degrees; anything else is refused in one line."""
    parts = [p.strip() for p in text.split(",")]
    try:
        w, s, e, n = (float(p) for p in parts)
    except ValueError:
        raise TerrasynthError(f"--bbox expects W,S,E,N in degrees, got '{text}'") from None
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        raise TerrasynthError(f"--bbox expects finite numbers, got '{text}'")
    if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
        raise TerrasynthError(
            f"--bbox '{text}' must be W,S,E,N with -180 <= W < E <= 180 and -90 <= S < N <= 90"
        )
    return (w, s, e, n)


def load_mapping(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """The ``collections`` table of a mapping file (empty without one)."""
    if path is None:
        return {}
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{p}: unreadable mapping file ({first_line(exc)})") from exc
    table = data.get("collections") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise InputError(f"{p}: a mapping file needs 'collections: {{ID: {{modality: ...}}}}'")
    for cid, entry in table.items():
        keys = {"modality", "assets", "scale", "offset", "nodata", "transform", "timeless"}
        unknown = set(entry) - keys
        if unknown:
            raise InputError(f"{p}: collection '{cid}': unknown key(s) {sorted(unknown)}")
        if not isinstance(entry.get("assets", {}), dict):
            raise InputError(f"{p}: collection '{cid}': 'assets' maps asset keys to bands")
        if entry.get("transform", "none") not in ("none", "db"):
            raise InputError(f"{p}: collection '{cid}': transform must be 'none' or 'db'")
    return {str(k): v for k, v in table.items()}


def search(query: Query) -> tuple[list[Any], dict[str, str]]:
    """Items of ``query`` (pystac Items, at most ``max_items``) and each collection's
    licence; one-line errors for an unreachable catalogue or an unknown collection."""
    pystac_client = require("pystac_client", "stac", "STAC search")
    errors = (pystac_client.exceptions.APIError, pystac.STACError, ValueError, OSError)
    try:
        client = pystac_client.Client.open(query.url, timeout=30)
    except errors as exc:
        raise TerrasynthError(
            f"STAC catalogue {query.url} is unreachable or not a STAC API ({first_line(exc)})"
        ) from exc
    licences: dict[str, str] = {}
    try:
        for cid in query.collections:
            collection = client.get_collection(cid)
            licences[cid] = str(getattr(collection, "license", "") or "unknown")
        found = client.search(
            collections=list(query.collections),
            bbox=list(query.bbox),
            datetime=query.datetime,
            max_items=query.max_items,
            limit=min(query.max_items, 100),
        )
        items = list(found.items())
    except errors as exc:
        raise TerrasynthError(f"STAC search at {query.url} failed: {first_line(exc)}") from exc
    if not items:
        when = f" and datetime {query.datetime}" if query.datetime else ""
        raise TerrasynthError(
            f"no STAC items found at {query.url} in {', '.join(query.collections)} for bbox "
            f"{','.join(f'{v:g}' for v in query.bbox)}{when}"
        )
    return items, licences


def _mapping_entry(collection: str, mapping: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for pattern, entry in mapping.items():
        if fnmatch.fnmatchcase(collection, pattern):
            return entry
    return {}


def modality_of(item: Any, mapping: dict[str, dict[str, Any]], registry: Registry) -> str | None:
    """The registry modality of an item: from the mapping file, else its metadata."""
    collection = str(item.collection_id or "")
    entry = _mapping_entry(collection, mapping)
    if "modality" in entry:
        return registry[str(entry["modality"])].name  # unknown names end in a clear error
    props = item.properties
    platform = " ".join(str(props.get(k, "")) for k in ("platform", "constellation")).lower()
    text = " ".join(
        [collection, str(props.get("s2:product_type", "")), str(props.get("processing:level", ""))]
    ).lower()
    if "sentinel-1" in platform or any(k.startswith("sar:") for k in props):
        return "s1rtc" if "rtc" in text else "s1grd"
    if "sentinel-2" in platform:
        if "l2a" in text or "msi2a" in text:
            return "s2l2a"
        if "l1c" in text or "msi1c" in text:
            return "s2l1c"
    return None


def _band_key(name: str) -> str:
    """A band name for matching: lower case, leading zeros of band numbers dropped
    (``B04``, ``b4`` and ``B4`` agree; ``B8A`` stays ``b8a``)."""
    return re.sub(r"^b0*(?=\d)", "b", name.strip().lower())


def _lookup(modality: Modality) -> dict[str, str]:
    """Names a catalogue may use for the modality's bands -> registry band name."""
    table: dict[str, str] = {}
    common: dict[str, list[str]] = {}
    for band, slot in modality.spectral_slots.items():
        table[slot] = band
        common.setdefault(COMMON_NAMES.get(slot, slot), []).append(band)
    for name, bands in common.items():
        if len(bands) == 1:  # 'rededge' names three bands: not a band of its own
            table.setdefault(name, bands[0])
    for band in modality.bands:
        table[_band_key(band)] = band
    return table


def _asset_bands(key: str, asset: Any) -> list[dict[str, Any]]:
    """Per file band: candidate names and raster metadata (STAC 1.1 ``bands`` or
    ``eo:bands`` + ``raster:bands``)."""
    extra = asset.extra_fields
    if isinstance(extra.get("bands"), list):
        rows = [
            {
                "names": [b.get("name"), b.get("eo:common_name")],
                "scale": b.get("raster:scale", b.get("scale")),
                "offset": b.get("raster:offset", b.get("offset")),
                "nodata": b.get("nodata"),
            }
            for b in extra["bands"]
        ]
    else:
        eo = extra.get("eo:bands") if isinstance(extra.get("eo:bands"), list) else []
        raster = extra.get("raster:bands") if isinstance(extra.get("raster:bands"), list) else []
        n = max(len(eo), len(raster), 1)
        rows = []
        for i in range(n):
            e = eo[i] if i < len(eo) else {}
            r = raster[i] if i < len(raster) else {}
            rows.append(
                {
                    "names": [e.get("name"), e.get("common_name")],
                    "scale": r.get("scale"),
                    "offset": r.get("offset"),
                    "nodata": r.get("nodata"),
                }
            )
    pols = extra.get("sar:polarizations")
    if len(rows) == 1:
        rows[0]["names"].append(key)
        if isinstance(pols, list) and len(pols) == 1:
            rows[0]["names"].append(pols[0])
    return rows


def _is_raster_asset(asset: Any) -> bool:
    roles = set(asset.roles or [])
    if roles & SKIP_ROLES and "data" not in roles:
        return False
    media = (asset.media_type or "").lower()
    return media.startswith(RASTER_TYPES) or (
        not media and asset.href.lower().endswith((".tif", ".tiff", ".jp2"))
    )


def map_assets(
    item: Any, modality: Modality, mapping: dict[str, dict[str, Any]]
) -> tuple[dict[str, BandSource], list[str]]:
    """Band -> source of an item's assets, and the keys of raster assets left unmapped.

    A band offered by several assets (a COG and a JPEG 2000 copy) is read from the first
    cloud-optimised one."""
    entry = _mapping_entry(str(item.collection_id or ""), mapping)
    by_asset = {  # asset key -> its bands in file order
        str(k): [str(b) for b in (v if isinstance(v, list) else [v])]
        for k, v in (entry.get("assets") or {}).items()
    }
    lookup = _lookup(modality)
    to_db = entry.get("transform") == "db"
    found: dict[str, BandSource] = {}
    unmapped: list[str] = []
    assets = sorted(
        item.assets.items(), key=lambda kv: "cloud-optimized" not in (kv[1].media_type or "")
    )
    for key, asset in assets:
        if by_asset:
            if key not in by_asset:
                if _is_raster_asset(asset):
                    unmapped.append(key)
                continue
        elif not _is_raster_asset(asset):
            continue
        rows = _asset_bands(key, asset)
        given = by_asset.get(key, [])
        hit = False
        for i, row in enumerate(rows, start=1):
            if by_asset:
                band = given[i - 1] if i <= len(given) else None
                if band is not None:
                    modality.group_of(band)  # a clear error for a band the modality lacks
            else:
                names = [str(n) for n in row["names"] if n]
                band = next(
                    (lookup[k] for n in names for k in (n.lower(), _band_key(n)) if k in lookup),
                    None,
                )
            hit = hit or band is not None  # a band another asset gives too counts as mapped
            if band is None or band in found:
                continue
            found[band] = BandSource(
                href=asset.href,
                index=i,
                scale=float(entry.get("scale", row["scale"] if row["scale"] is not None else 1)),
                offset=float(
                    entry.get("offset", row["offset"] if row["offset"] is not None else 0)
                ),
                nodata=entry.get("nodata", row["nodata"]),
                to_db=to_db,
            )
        if not hit:
            unmapped.append(key)
    return found, unmapped


def _item_day(item: Any) -> datetime:
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        raise InputError(f"STAC item {item.id} has no datetime")
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    when = when.astimezone(UTC)
    return datetime(when.year, when.month, when.day, tzinfo=UTC)


def _item_crs(item: Any) -> CRS | None:
    props = item.properties
    code = props.get("proj:code") or (
        f"EPSG:{props['proj:epsg']}" if props.get("proj:epsg") else None
    )
    return CRS.from_user_input(code) if code else None


def plan_acquisitions(
    items: Sequence[Any], mapping: dict[str, dict[str, Any]], registry: Registry
) -> tuple[list[Acquisition], list[str]]:
    """Items grouped into acquisitions (modality, collection, day); refuses a search whose
    items map to no modality or no band, naming what was found."""
    acqs: dict[tuple[str, str, datetime], Acquisition] = {}
    unmapped: list[str] = []
    unknown: dict[str, list[str]] = {}
    for item in items:
        collection = str(item.collection_id or "")
        name = modality_of(item, mapping, registry)
        if name is None:
            unknown.setdefault(collection, []).append(item.id)
            continue
        bands, rest = map_assets(item, registry[name], mapping)
        unmapped += [f"{collection}: {k}" for k in rest]
        if not bands:
            unknown.setdefault(collection, []).append(item.id)
            continue
        day = _item_day(item)
        timeless = bool(_mapping_entry(collection, mapping).get("timeless", False))
        acq = acqs.setdefault(
            (name, collection, day), Acquisition(name, collection, day, timeless=timeless)
        )
        acq.items.append(item.id)
        acq.crs = acq.crs or _item_crs(item)
        for band, src in bands.items():
            acq.bands.setdefault(band, []).append(src)
    if not acqs:
        what = "; ".join(
            f"collection '{c}' ({len(ids)} items, e.g. {ids[0]})" for c, ids in unknown.items()
        )
        raise InputError(
            f"no asset of the STAC items maps to a registry modality and band: {what}; "
            "give a mapping file (--mapping, see docs/stac.md)"
        )
    order = sorted(acqs.values(), key=lambda a: (a.modality, a.day, a.collection))
    return order, list(dict.fromkeys(unmapped))


def gdal_path(href: str) -> str:
    """What GDAL opens for an asset href: ``/vsicurl/`` for http(s), ``/vsis3/`` for s3."""
    if href.startswith(("http://", "https://")):
        return "/vsicurl/" + href
    if href.startswith("s3://"):
        return "/vsis3/" + href[len("s3://") :]
    if href.startswith("file://"):
        return href[len("file://") :]
    return href


def _first_crs(acqs: Sequence[Acquisition]) -> CRS:
    for acq in acqs:
        if acq.crs is not None:
            return acq.crs
    href = next(iter(acqs[0].bands.values()))[0].href
    try:
        with rasterio.Env(**GDAL_REMOTE), rasterio.open(gdal_path(href)) as src:
            crs = src.crs
    except READ_ERRORS as exc:
        raise InputError(f"cannot open STAC asset {href} ({first_line(exc)})") from exc
    if crs is None:
        raise InputError(f"STAC asset {href} has no CRS")
    return crs


def utm_crs(lon: float, lat: float) -> CRS:
    """The WGS 84 UTM zone of a point."""
    zone = min(int((lon + 180) // 6) + 1, 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def fetch_grid(
    bbox: tuple[float, float, float, float],
    acqs: Sequence[Acquisition],
    registry: Registry,
    crs: str | None = None,
    resolution: float | None = None,
) -> Grid:
    """One north-up grid covering ``bbox``: CRS ``crs``, else the first asset's projected
    CRS, else the bbox's UTM zone; pixels of ``resolution`` m, else the finest native GSD
    of the acquisitions' modalities; edges on multiples of the pixel size."""
    if crs is not None:
        try:
            target = CRS.from_user_input(crs)
        except CRSError as exc:
            raise TerrasynthError(f"--crs: unknown CRS '{crs}' ({first_line(exc)})") from exc
    else:
        target = _first_crs(acqs)
        if not target.is_projected:
            target = utm_crs((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)
    metres = resolution or min(g.gsd for a in acqs for g in registry[a.modality].groups)
    res = metres / 111_320.0 if target.is_geographic else metres  # degrees at the equator
    left, bottom, right, top = transform_bounds("EPSG:4326", target, *bbox, densify_pts=21)
    left, bottom = math.floor(left / res) * res, math.floor(bottom / res) * res
    right, top = math.ceil(right / res) * res, math.ceil(top / res) * res
    width, height = round((right - left) / res), round((top - bottom) / res)
    if max(width, height) > MAX_SIDE:
        raise TerrasynthError(
            f"the bbox is {width} x {height} px of {metres:g} m (more than {MAX_SIDE} per side): "
            "give a smaller --bbox or a coarser --resolution"
        )
    return Grid(target, Affine(res, 0, left, 0, -res, top), max(width, 1), max(height, 1))


def read_band(src: BandSource, grid: Grid, categorical: bool) -> np.ndarray:
    """One band of one asset on ``grid`` in physical units (float32, NaN = no data),
    reading only the source windows that cover it."""
    try:
        with rasterio.Env(**GDAL_REMOTE), rasterio.open(gdal_path(src.href)) as ds:
            if src.index > ds.count:
                raise InputError(f"{src.href}: has {ds.count} band(s), band {src.index} asked")
            nodata = src.nodata if src.nodata is not None else ds.nodatavals[src.index - 1]
            with WarpedVRT(
                ds,
                crs=grid.crs,
                transform=grid.transform,
                width=grid.width,
                height=grid.height,
                resampling=Resampling.nearest if categorical else Resampling.bilinear,
                src_nodata=nodata,
                nodata=nodata,
                add_alpha=nodata is None,
            ) as vrt:
                raw = vrt.read(src.index)
                valid = vrt.read_masks(src.index) > 0
    except READ_ERRORS as exc:
        raise InputError(f"cannot read STAC asset {src.href} ({first_line(exc)})") from exc
    data = raw.astype(np.float32)
    if not categorical:
        data = data * np.float32(src.scale) + np.float32(src.offset)
        if src.to_db:
            valid &= data > 0
            data = np.where(valid, 10 * np.log10(np.where(valid, data, 1)), np.nan)
    data[~(valid & np.isfinite(data))] = np.nan
    return data.astype(np.float32)


def _write_bands(
    path: Path, data: np.ndarray, grid: Grid, bands: Sequence[str], tags: dict[str, str]
) -> None:
    """Write a float32 GeoTIFF (``data``: bands x rows x cols) under a temporary name, then
    rename it into place."""
    part = path.with_name(path.name + ".part")
    tiled = grid.width >= 256 and grid.height >= 256
    profile = dict(
        driver="GTiff", width=grid.width, height=grid.height, count=len(bands),
        dtype="float32", crs=grid.crs, transform=grid.transform, nodata=np.nan, tiled=tiled,
        compress="deflate", predictor=3,
    )  # fmt: skip
    with rasterio.open(part, "w", **profile) as f:
        f.write(data.astype(np.float32))
        for i, band in enumerate(bands, start=1):
            f.set_band_description(i, band)
        f.update_tags(**tags)
    os.replace(part, path)


def band_file(folder: Path, acq: Acquisition, band: str) -> Path:
    """Where a band of an acquisition is written."""
    return folder / acq.modality / f"{acq.day:%Y%m%d}_{band}.tif"


def _record(query: Query, grid: Grid, mapping: dict[str, Any]) -> dict[str, Any]:
    return {
        "url": query.url,
        "collections": list(query.collections),
        "bbox": list(query.bbox),
        "datetime": query.datetime,
        "max_items": query.max_items,
        "mapping": mapping,
        "grid": {
            "crs": grid.crs.to_string(),
            "transform": list(grid.transform)[:6],
            "width": grid.width,
            "height": grid.height,
        },
    }


def _claim_folder(folder: Path, record: dict[str, Any]) -> None:
    """Use ``folder`` for this query: new, empty, or holding this same query's files."""
    rec = folder / FETCH_RECORD
    if rec.is_file():
        if json.loads(rec.read_text()) != json.loads(json.dumps(record)):
            raise TerrasynthError(
                f"{folder} holds the files of another STAC query (see its {FETCH_RECORD}); "
                "give another download folder or remove it"
            )
        return
    if folder.exists() and any(folder.iterdir()):
        raise TerrasynthError(f"{folder} is not empty and not a STAC download folder")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = rec.with_name(rec.name + ".part")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, rec)


def write_description(
    folder: Path, acqs: Sequence[Acquisition], name: str, licence: str, pair_days: float
) -> Path:
    """The source description through which ``data build`` reads the folder."""
    modalities = list(dict.fromkeys(a.modality for a in acqs if not a.timeless))
    modalities += [a.modality for a in acqs if a.modality not in modalities]
    modalities = list(dict.fromkeys(modalities))
    desc = {
        "name": name,
        "licence": licence,
        "georeference": "exact",
        "anchor": modalities[0],
        "pair_tolerance_days": pair_days,
        "layers": [],
    }
    for m in modalities:
        layer = {"file": f"{m}/*.tif", "modality": m, "band_pattern": r"^(?P<band>\S+)$"}
        if not all(a.timeless for a in acqs if a.modality == m):
            layer["dates"] = {"from_filename": True}
        desc["layers"].append(layer)
    path = folder / DESCRIPTION_FILE
    tmp = path.with_name(path.name + ".part")
    header = "# written by terrasynth data fetch: one float32 file per modality/day/band\n"
    tmp.write_text(header + yaml.safe_dump(desc, sort_keys=False))
    os.replace(tmp, path)
    return path


def fetch(
    query: Query,
    folder: str | Path,
    registry: Registry,
    *,
    mapping: dict[str, dict[str, Any]] | None = None,
    crs: str | None = None,
    resolution: float | None = None,
    pair_days: float = 16.0,
    on_file: Callable[[int, int, str], None] | None = None,
    before_download: Callable[[Grid, list[Acquisition]], None] | None = None,
    check_sources: Callable[[list[Acquisition]], None] | None = None,
) -> FetchResult:
    """Search, map and download ``query`` into ``folder`` (resumable); see the module.
    ``check_sources(acquisitions)``, called before any asset is opened (even for its
    header), and ``before_download(grid, acquisitions)``, called before anything is
    written, may refuse the fetch by raising (a server's rules and limits)."""
    mapping = mapping or {}
    items, licences = search(query)
    acqs, unmapped = plan_acquisitions(items, mapping, registry)
    if check_sources is not None:
        check_sources(acqs)
    grid = fetch_grid(query.bbox, acqs, registry, crs, resolution)
    if before_download is not None:
        before_download(grid, acqs)
    folder = Path(folder)
    _claim_folder(folder, _record(query, grid, mapping))
    jobs = [
        (acq, band) for acq in acqs for band in registry[acq.modality].bands if band in acq.bands
    ]
    files: list[Path] = []
    skipped = 0
    for n, (acq, band) in enumerate(jobs):
        path = band_file(folder, acq, band)
        if on_file is not None:
            on_file(n, len(jobs), f"{acq.modality} {acq.day:%Y-%m-%d} {band}")
        files.append(path)
        if path.is_file():
            skipped += 1
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        categorical = registry[acq.modality].kind == "categorical"
        out = np.full((grid.height, grid.width), np.nan, np.float32)
        for src in acq.bands[band]:  # items of one day: the first valid pixel wins
            data = read_band(src, grid, categorical)
            fill = np.isnan(out) & ~np.isnan(data)
            out[fill] = data[fill]
        tags = {"items": ",".join(acq.items), "collection": acq.collection}
        _write_bands(path, out[None], grid, [band], tags)
    if on_file is not None:
        on_file(len(jobs), len(jobs), "done")
    name = "stac:" + ",".join(query.collections)
    licence = "; ".join(dict.fromkeys(licences[c] for c in query.collections))
    write_description(folder, acqs, name, licence, pair_days)
    return FetchResult(folder, grid, len(items), acqs, files, skipped, unmapped)


def input_stack(
    result: FetchResult, folder: Path, registry: Registry
) -> tuple[list[tuple[str, str]], datetime]:
    """Generation inputs from a fetch: per modality the day with the most valid pixels, its
    bands stacked into one GeoTIFF (band descriptions = band names) in ``folder``; and the
    day of the first input."""
    best: dict[str, tuple[int, Acquisition]] = {}
    for acq in result.acquisitions:
        with rasterio.open(band_file(result.folder, acq, next(iter(acq.bands)))) as f:
            valid = int(np.isfinite(f.read(1)).sum())
        if acq.modality not in best or valid > best[acq.modality][0]:
            best[acq.modality] = (valid, acq)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[tuple[str, str]] = []
    for modality, (_, acq) in best.items():
        bands = [b for b in registry[modality].bands if b in acq.bands]
        data = np.stack([_read(band_file(result.folder, acq, b)) for b in bands])
        path = folder / f"{modality}_{acq.day:%Y%m%d}.tif"
        _write_bands(path, data, result.grid, bands, {"collection": acq.collection})
        out.append((modality, str(path)))
    return out, best[next(iter(best))][1].day


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as f:
        return f.read(1)
