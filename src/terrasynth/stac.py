"""A STAC Item beside every generation: ``item.json`` in the output folder.

It describes the folder's files for catalogues and STAC tools (pystac, stac-browser,
odc-stac, stackstac): the footprint and bounding box in WGS 84, the grid (projection
extension: ``proj:code``, ``proj:wkt2``, ``proj:shape``, ``proj:transform``, ``proj:bbox`` in
the output CRS), one asset per file with its roles (``data`` plus ``sample``, ``mean``,
``std``, ``probabilities`` or ``entropy``; ``metadata`` for ``generation.json``, ``overview``
for the quick-look), per band the data type, nodata and unit (raster extension) and the
name, plus the STAC common name and approximate centre wavelength of optical bands (eo
extension, from the registry's spectral slots). The model (folder, backbone, sha256 of its
weights), seed, number of samples and sampler are ``terrasynth:`` properties.

``datetime`` is the acquisition date given with the inputs (``--date`` / ``time=``) when
known, else the generation time; ``terrasynth:datetime_source`` says which (``input`` or
``generation``), and ``created`` is always the generation time. Values are in physical
units, so no ``raster:scale`` / ``raster:offset`` is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, NoDataStrings, RasterBand, RasterExtension
from rasterio.crs import CRS
from rasterio.warp import transform_geom

from terrasynth.data.scene import Grid
from terrasynth.modalities import Modality, default_registry
from terrasynth.modalities.registry import SLOT_WAVELENGTH_UM

ITEM = "item.json"
# the registry's spectral slots as STAC eo common names
COMMON_NAMES = {
    "rededge1": "rededge",
    "rededge2": "rededge",
    "rededge3": "rededge",
    "watervapour": "nir09",
    "thermal": "lwir",
}
FILE = re.compile(r"^(?P<mod>.+)_(?P<what>sample(?P<k>\d+)|mean|std|probs|entropy)\.tif$")
ROLES = {"mean": "mean", "std": "std", "probs": "probabilities", "entropy": "entropy"}


def _footprint(grid: Grid) -> dict[str, Any]:
    """The grid's outline as a GeoJSON polygon in WGS 84 (10 points per side when it is
    reprojected, so that curved edges stay close)."""
    left, bottom, right, top = grid.bounds
    t = np.linspace(0, 1, 2 if grid.crs == CRS.from_epsg(4326) else 11)[:-1]
    ring = (
        [(left + f * (right - left), top) for f in t]
        + [(right, top - f * (top - bottom)) for f in t]
        + [(right - f * (right - left), bottom) for f in t]
        + [(left, bottom + f * (top - bottom)) for f in t]
    )
    ring.append(ring[0])
    polygon = {"type": "Polygon", "coordinates": [ring]}
    geom = transform_geom(grid.crs, CRS.from_epsg(4326), polygon)
    coords = [[round(float(x), 7), round(float(y), 7)] for x, y in geom["coordinates"][0]]
    return {"type": "Polygon", "coordinates": [coords]}


def _bbox(geometry: dict[str, Any]) -> list[float]:
    xy = np.array(geometry["coordinates"][0])
    return [*map(float, xy.min(0)), *map(float, xy.max(0))]


def _nodata(value: float | None) -> float | NoDataStrings | None:
    if value is None:
        return None
    if np.isnan(value):
        return NoDataStrings.NAN
    return int(value) if float(value).is_integer() else float(value)


def _spectral_slots(mod: Modality | None) -> dict[str, str]:
    """Band -> spectral slot of an optical modality. A model saved before the registry had
    slots lacks them: the built-in registry's entry of the same name and bands gives them."""
    if mod is None:
        return {}
    if mod.spectral:
        return mod.spectral_slots
    builtin = default_registry().modalities.get(mod.name)
    return builtin.spectral_slots if builtin is not None and builtin.bands == mod.bands else {}


def _eo_band(name: str, slots: Mapping[str, str]) -> Band:
    slot = slots.get(name)
    if slot is None:
        return Band.create(name=name)
    return Band.create(
        name=name,
        common_name=COMMON_NAMES.get(slot, slot),
        center_wavelength=SLOT_WAVELENGTH_UM[slot],
    )


def _add_raster_asset(item: pystac.Item, path: Path, modalities: Mapping[str, Modality]) -> None:
    """An asset for one generated GeoTIFF, described from the file itself."""
    match = FILE.match(path.name)
    with rasterio.open(path) as f:
        dtype, nodata, descriptions, tags = f.dtypes[0], f.nodata, f.descriptions, f.tags()
    name = tags.get("modality") or (match["mod"] if match else path.stem)
    mod = modalities.get(name)
    what = match["what"] if match else "data"
    if what.startswith("sample"):
        roles, title = ["data", "sample"], f"{name} sample {match['k']}"
    else:
        roles, title = ["data", ROLES.get(what, what)], f"{name} {ROLES.get(what, what)}"
    asset = pystac.Asset(
        href=f"./{path.name}", media_type=pystac.MediaType.COG, title=title, roles=roles
    )
    if "sample" in tags:
        asset.extra_fields["terrasynth:sample"] = int(tags["sample"])
    if tags.get("given_bands"):
        asset.extra_fields["terrasynth:given_bands"] = tags["given_bands"].split(",")
    if tags.get("legend"):
        asset.extra_fields["terrasynth:legend"] = tags["legend"]
    item.add_asset(path.stem, asset)  # extensions are declared on the item
    unit = tags.get("units") or None
    bands = [d or f"band{i + 1}" for i, d in enumerate(descriptions)]
    RasterExtension.ext(asset, add_if_missing=True).apply(
        bands=[
            RasterBand.create(data_type=DataType(dtype), nodata=_nodata(nodata), unit=unit)
            for _ in bands
        ]
    )
    # band names always; common names and wavelengths where the band is optical (only the
    # values of an optical modality are per band of a spectrum)
    optical = mod if what in ("mean", "std") or what.startswith("sample") else None
    slots = _spectral_slots(optical)
    EOExtension.ext(asset, add_if_missing=True).apply(bands=[_eo_band(b, slots) for b in bands])


def write_item(
    folder: Path,
    item_id: str,
    grid: Grid,
    modalities: Mapping[str, Modality],
    info: Mapping[str, Any],
) -> Path:
    """Write ``item.json``, the STAC Item of the generation in ``folder``, into it: its files
    as written there, ``info`` the content of its ``generation.json``. Asset links are
    relative, so the folder can be moved or uploaded as it is."""
    spec = info.get("spec", info)  # whole-scene jobs keep the settings under "spec"
    created = datetime.now(UTC).replace(microsecond=0)
    when, source = created, "generation"
    if spec.get("time"):
        when = datetime.fromisoformat(str(spec["time"]))
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        source = "input"
    geometry = _footprint(grid)
    properties = {
        "created": created.isoformat().replace("+00:00", "Z"),
        "terrasynth:datetime_source": source,
        "terrasynth:targets": list(spec.get("targets", [])),
        "terrasynth:seed": spec.get("seed"),
        "terrasynth:num_samples": spec.get("num_samples"),
        "terrasynth:model": info.get("model"),
        "terrasynth:backbone": info.get("backbone"),
        "terrasynth:weights_sha256": info.get("weights_sha256"),
        "terrasynth:inputs": [list(map(str, x)) for x in spec.get("inputs", [])],
        "terrasynth:version": (info.get("versions") or {}).get("terrasynth"),
    }
    sampler = info.get("sampler") or {
        k: spec.get(k) for k in ("steps", "eta", "guidance") if k in spec
    }
    if sampler:
        properties["terrasynth:sampler"] = sampler
    item = pystac.Item(
        id=item_id,
        geometry=geometry,
        bbox=_bbox(geometry),
        datetime=when,
        properties={k: v for k, v in properties.items() if v is not None},
    )
    epsg = grid.crs.to_epsg()
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=f"EPSG:{epsg}" if epsg else None,
        wkt2=grid.crs.to_wkt(version="WKT2_2019"),
        shape=[grid.height, grid.width],
        transform=[float(v) for v in list(grid.transform)[:6]],
        bbox=[float(v) for v in grid.bounds],
    )
    for path in sorted(folder.iterdir()):
        if path.suffix == ".tif":
            _add_raster_asset(item, path, modalities)
        elif path.name == "quicklook.png":
            item.add_asset(
                "quicklook",
                pystac.Asset(f"./{path.name}", "quick-look panel", media_type=pystac.MediaType.PNG,
                             roles=["overview"]),
            )  # fmt: skip
        elif path.suffix == ".json" and path.stem in modalities:  # one-token targets
            item.add_asset(
                path.stem,
                pystac.Asset(f"./{path.name}", f"{path.stem} values per sample",
                             media_type=pystac.MediaType.JSON, roles=["data"]),
            )  # fmt: skip
    item.add_asset(
        "generation",
        pystac.Asset("./generation.json", "settings of the generation",
                     media_type=pystac.MediaType.JSON, roles=["metadata"]),
    )  # fmt: skip
    path = folder / ITEM
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    path.write_text(json.dumps(d, indent=2))
    return path
