"""Inputs of the map app: uploaded GeoTIFFs and files picked from the server's folder.

Every input gets an unguessable id; its record (``inputs/ID.json``) holds the server-side
path, which is never taken from the client: an upload is stored as ``uploads/ID.tif`` (the
client's file name is only shown, after :func:`display_name` cleaned it), a folder pick must
be one of the files :func:`list_folder` lists; a catalogue search's GeoTIFF
(:mod:`terrasynth.serve.catalogue`) is kept like an upload. An upload is checked whole before it is
kept (a TIFF, georeferenced, within the size and pixel limits, every block readable); a
refused one leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.warp import transform_bounds

from terrasynth.data.raster_io import READ_ERRORS, check_header, first_line
from terrasynth.errors import InputError
from terrasynth.modalities import Registry
from terrasynth.modalities.guess import Guess, guess_modality, summarise

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{24}$")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
MAX_BANDS = 64
OWNED = ("upload", "stac")  # sources whose file the server keeps (and removes with the input)
FOLDER_FILES = 500  # at most this many files listed from --folder
SCAN_ROWS = 256  # rows per read while checking that every block of an upload is readable


@dataclass(frozen=True)
class Limits:
    """What an upload may be: bytes of the file, pixels per band."""

    max_bytes: int = 1024 * 2**20
    max_pixels: int = 8192 * 8192


def new_id() -> str:
    """An unguessable id (144 random bits, URL-safe, 24 characters)."""
    return secrets.token_urlsafe(18)


def valid_id(value: str) -> bool:
    """Whether ``value`` has the form of an id (checked before any path is built from it)."""
    return bool(ID_PATTERN.match(value or ""))


def display_name(name: str) -> str:
    """The client's file name made safe to show: its last path component, printable
    characters only, at most 100 of them."""
    last = re.split(r"[\\/]", name or "")[-1]
    clean = re.sub(r"[^A-Za-z0-9._ ()+-]", "_", last).strip(" .")
    return clean[:100] or "upload.tif"


def check_raster(path: Path, name: str, limits: Limits) -> None:
    """Refuse a file that is not a readable, georeferenced GeoTIFF within ``limits``."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in TIFF_MAGIC:
        raise InputError(f"{name}: not a GeoTIFF (the file does not start like a TIFF)")
    try:
        with warnings.catch_warnings():
            # a missing georeference is refused below, in one line of our own
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
        with src:
            if src.driver != "GTiff":
                raise InputError(f"{name}: not a GeoTIFF ({src.driver})")
            if src.crs is None:
                raise InputError(
                    f"{name}: the file has no CRS (not georeferenced); give it one first, "
                    "e.g. gdal_edit.py -a_srs EPSG:32632"
                )
            check_header(src, Path(name))
            if src.width * src.height > limits.max_pixels:
                raise InputError(
                    f"{name}: {src.width} x {src.height} px is more than this server's limit "
                    f"of {limits.max_pixels:,} px per band"
                )
            if src.count > MAX_BANDS:
                raise InputError(f"{name}: {src.count} bands, more than {MAX_BANDS}")
            for row in range(0, src.height, SCAN_ROWS):
                window = ((row, min(row + SCAN_ROWS, src.height)), (0, src.width))
                src.read(window=window)
    except READ_ERRORS as exc:
        raise InputError(
            f"{name}: not a readable GeoTIFF (truncated or corrupt?): {first_line(exc)}"
        ) from exc


def footprint(path: Path) -> dict[str, Any]:
    """Size, bands, CRS and the lon/lat bounds of a raster (for the page)."""
    with rasterio.open(path) as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        return {
            "width": src.width,
            "height": src.height,
            "count": src.count,
            "dtype": src.dtypes[0],
            "crs": src.crs.to_string(),
            "bounds": [west, south, east, north],
        }


class InputStore:
    """The inputs of one server: records in ``root/inputs``, uploads in ``root/uploads``."""

    def __init__(self, root: Path, registry: Registry, candidates: list[str], limits: Limits):
        self.records = root / "inputs"
        self.uploads = root / "uploads"
        self.records.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self.candidates = candidates
        self.limits = limits

    def upload_path(self, input_id: str) -> Path:
        return self.uploads / f"{input_id}.tif"

    def add_upload(
        self, tmp: Path, name: str, source: str = "upload", known: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        """Check the received file ``tmp`` and keep it as a new input; a refused file is
        removed. ``name``: the client's file name (shown only); ``source``: ``upload``, or
        ``stac`` for a file a catalogue search wrote, whose modality is ``known``
        ((modality, why): the first guess)."""
        shown = display_name(name)
        input_id = new_id()
        try:
            check_raster(tmp, shown, self.limits)
            path = self.upload_path(input_id)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        try:
            return self._register(input_id, path, shown, source, known)
        except Exception:
            path.unlink(missing_ok=True)
            (self.records / f"{input_id}.json").unlink(missing_ok=True)
            raise

    def add_from_folder(self, folder: Path, relative: str) -> dict[str, Any]:
        """A file of the server's folder, named by its place in :func:`list_folder`."""
        listed = list_folder(folder)
        if relative not in listed:
            raise InputError(f"{display_name(relative)}: not a GeoTIFF of the server's folder")
        path = (folder / relative).resolve()
        check_raster(path, relative, self.limits)
        return self._register(new_id(), path, relative, "folder")

    def _register(
        self,
        input_id: str,
        path: Path,
        name: str,
        source: str,
        known: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        summary = summarise(path, name)
        guesses = guess_modality(summary, self.registry, self.candidates)
        if known is not None:
            modality, why = known
            bands = summary.descriptions  # the fetch names every band
            check_bands(
                {"name": name, "count": summary.count}, modality, list(bands), self.registry
            )
            guesses = [Guess(modality, bands, 1.0, why)] + [
                g for g in guesses if g.modality != modality
            ]
        if not guesses:
            raise InputError(f"{name}: no modality of the model fits its {summary.count} band(s)")
        record = {
            "id": input_id,
            "name": name,
            "source": source,
            "path": str(path),
            **footprint(path),
            "descriptions": list(summary.descriptions),
            "guesses": [
                {
                    "modality": g.modality,
                    "bands": list(g.bands),
                    "score": g.score,
                    "reason": g.reason,
                }
                for g in guesses[:5]
            ],
            "modality": guesses[0].modality,
            "bands": list(guesses[0].bands),
        }
        (self.records / f"{input_id}.json").write_text(json.dumps(record, indent=1))
        return record

    def get(self, input_id: str) -> dict[str, Any]:
        """The record of an input; an unknown or malformed id is an :class:`InputError`."""
        path = self.records / f"{input_id}.json"
        if not valid_id(input_id) or not path.is_file():
            raise InputError("no such input")
        return json.loads(path.read_text())

    def public(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record without its server-side path."""
        return {k: v for k, v in record.items() if k != "path"}

    def remove(self, input_id: str) -> None:
        record = self.get(input_id)
        if record["source"] in OWNED:
            self.upload_path(input_id).unlink(missing_ok=True)
        (self.records / f"{input_id}.json").unlink(missing_ok=True)


def list_folder(folder: Path | None) -> list[str]:
    """GeoTIFFs under ``folder`` (relative POSIX paths, sorted, at most
    :data:`FOLDER_FILES`); links leading outside it are left out."""
    if folder is None:
        return []
    root = folder.resolve()
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.lower().endswith((".tif", ".tiff")) and not f.startswith("."):
                path = Path(dirpath, f).resolve()
                if path.is_relative_to(root) and path.is_file():
                    found.append(path.relative_to(root).as_posix())
                if len(found) >= FOLDER_FILES:
                    return found
    return found


def check_bands(
    record: dict[str, Any], modality: str, bands: list[str], registry: Registry
) -> None:
    """Refuse a modality and band list that cannot describe the input's bands."""
    mod = registry[modality]
    if not mod.is_raster:
        raise InputError(f"{modality} is not a raster modality")
    if len(bands) != record["count"]:
        raise InputError(
            f"{record['name']}: {len(bands)} band name(s) given, the file has {record['count']}"
        )
    for b in bands:
        mod.group_of(b)
    if len(set(bands)) != len(bands):
        raise InputError(f"{record['name']}: a band is named twice")


def finite_or_none(values: np.ndarray) -> list[float | None]:
    """Floats for JSON: NaN and infinities as None."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]
