"""Catalogue searches of the map app: a STAC API searched and fetched in the background.

``POST /api/stac`` starts one. The request is checked at once (an ``http(s)`` URL,
collection ids, a bbox, an optional datetime and pixel size); a thread then runs the fetch
of ``terrasynth generate --stac`` (:func:`terrasynth.data.stac_fetch.fetch`, no mapping
file): it searches with pystac-client, refuses before anything is downloaded a grid of more
pixels than the server allows per band, more bytes than :data:`DOWNLOAD_UPLOADS` uploads
or an asset that is not ``http(s)``, downloads into ``stac/ID/`` under the server's
workdir, stacks per modality the day with the most valid pixels
(:func:`~terrasynth.data.stac_fetch.input_stack`) and keeps each stacked GeoTIFF as an
input, checked and recorded like an upload, its modality the one the fetch mapped. The
search's folder is removed at the end, whatever the outcome; its state (status, progress,
one-line message, the inputs) lives in memory as long as the server, like the thread.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import rasterio

from terrasynth.data.raster_io import first_line
from terrasynth.data.scene import Grid
from terrasynth.data.stac_fetch import Query, fetch, input_stack, parse_bbox
from terrasynth.errors import InputError, TerrasynthError
from terrasynth.extras import MissingExtraError, require
from terrasynth.modalities import Registry
from terrasynth.serve.inputs import InputStore, new_id, valid_id

MAX_RUNNING = 2  # searches fetching at once
MAX_ITEMS = 20  # STAC items per search
MAX_COLLECTIONS = 8
MAX_TEXT = 300  # characters of the URL, a collection id, the datetime
DOWNLOAD_UPLOADS = 8  # a search downloads at most this many uploads' worth of bytes
FINISHED = ("done", "failed")
log = logging.getLogger(__name__)


def missing_extra() -> str | None:
    """None when the ``stac`` extra is installed, else the one line saying what to install."""
    try:
        require("pystac_client", "stac", "STAC search")
    except MissingExtraError as exc:
        return str(exc)
    return None


def _text(value: Any, name: str) -> str:
    text = str(value if value is not None else "").strip()
    if not text:
        raise InputError(f"give the {name}")
    if len(text) > MAX_TEXT or not text.isprintable():
        raise InputError(f"the {name} is not a short line of text")
    return text


def check_url(value: Any) -> str:
    """The catalogue's address: an ``http(s)`` URL with a host, nothing else (the server
    fetches it, so no ``file:``, ``s3:`` or other schemes)."""
    url = _text(value, "catalogue URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"the catalogue URL must be http:// or https://, got '{url}'")
    return url


def parse_request(body: dict[str, Any]) -> tuple[Query, float | None]:
    """Check a search request from the page (url, collections, bbox W,S,E,N, datetime,
    resolution in metres): the query and the pixel size (None: the finest native GSD);
    one-line :class:`InputError` otherwise."""
    url = check_url(body.get("url"))
    raw = body.get("collections") or []
    items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list) else []
    collections = tuple(c for c in (str(v).strip() for v in items) if c)
    if not collections:
        raise InputError("give at least one collection id")
    if len(collections) > MAX_COLLECTIONS:
        raise InputError(f"at most {MAX_COLLECTIONS} collections per search")
    collections = tuple(_text(c, "collection id") for c in collections)
    bbox = body.get("bbox")
    text = ",".join(str(v) for v in bbox) if isinstance(bbox, list) else _text(bbox, "bbox")
    try:
        box = parse_bbox(text)
    except TerrasynthError as exc:
        raise InputError(str(exc).removeprefix("--")) from None
    when = body.get("datetime")
    when = _text(when, "datetime") if when not in (None, "") else None
    resolution = body.get("resolution")
    if resolution in (None, ""):
        metres = None
    else:
        try:
            metres = float(resolution)
        except (TypeError, ValueError):
            raise InputError("the pixel size must be a number of metres") from None
        if not 0.1 <= metres <= 10_000:
            raise InputError("the pixel size must be between 0.1 and 10000 m")
    return Query(url, collections, box, when, MAX_ITEMS), metres


class SearchStore:
    """Starts catalogue searches (one thread each) and keeps their state."""

    def __init__(self, root: Path, inputs: InputStore, registry: Registry) -> None:
        self.root = root / "stac"
        shutil.rmtree(self.root, ignore_errors=True)  # downloads of a server that was stopped
        self.root.mkdir(parents=True)
        self.inputs = inputs
        self.registry = registry
        self.states: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def start(self, body: dict[str, Any]) -> str:
        """Check a request and start its search; returns the search id."""
        missing = missing_extra()
        if missing is not None:
            raise InputError(missing)
        query, resolution = parse_request(body)
        with self.lock:
            running = [s for s in self.states.values() if s["status"] not in FINISHED]
            if len(running) >= MAX_RUNNING:
                raise InputError(f"{MAX_RUNNING} searches are running already; wait for one")
            search_id = new_id()
            self.states[search_id] = {"status": "searching", "done": 0, "total": 0}
        args = (search_id, query, resolution)
        threading.Thread(target=self._run, args=args, daemon=True).start()
        return search_id

    def state(self, search_id: str) -> dict[str, Any]:
        """Status, progress, message and (when done) the inputs' public records."""
        with self.lock:
            if not valid_id(search_id) or search_id not in self.states:
                raise InputError("no such search")
            return dict(self.states[search_id])

    def _update(self, search_id: str, **changes: Any) -> None:
        with self.lock:
            self.states[search_id].update(changes)

    def _limits(self, grid: Grid, acquisitions: list[Any]) -> None:
        """Refuse, before downloading, what the server's limits do not allow."""
        limits = self.inputs.limits
        pixels = grid.width * grid.height
        if pixels > limits.max_pixels:
            raise InputError(
                f"the bbox is {grid.width} x {grid.height} px of {grid.ground_resolution_m():g} "
                f"m, more than this server's limit of {limits.max_pixels:,} px per band: give "
                "a smaller bbox or a coarser pixel size"
            )
        files = sum(len(a.bands) for a in acquisitions)
        budget = DOWNLOAD_UPLOADS * limits.max_bytes
        if files * pixels * 4 > budget:
            raise InputError(
                f"the search would download {files} bands of {grid.width} x {grid.height} px "
                f"({files * pixels * 4 / 2**20:.0f} MiB), more than this server's limit of "
                f"{budget / 2**20:.0f} MiB: narrow the datetime or the collections"
            )

    @staticmethod
    def _sources(acquisitions: list[Any]) -> None:
        """Refuse, before any asset is opened (even for its header), assets that are not
        http(s): a catalogue must not make the server read its own files."""
        for acq in acquisitions:
            for sources in acq.bands.values():
                for src in sources:
                    if urlsplit(src.href).scheme not in ("http", "https"):
                        raise InputError(
                            f"the catalogue points at {src.href}: this server reads only "
                            "http(s) assets"
                        )

    def _run(self, search_id: str, query: Query, resolution: float | None) -> None:
        folder = self.root / search_id
        kept: list[str] = []

        def progress(done: int, total: int, what: str) -> None:
            self._update(
                search_id, status="fetching", done=done, total=total, phase=f"fetching {what}"
            )

        try:
            result = fetch(
                query, folder / "download", self.registry, resolution=resolution,
                on_file=progress, before_download=self._limits, check_sources=self._sources,
            )  # fmt: skip
            self._update(search_id, status="stacking", phase="stacking the best day")
            stack, _ = input_stack(result, folder / "inputs", self.registry)
            records = []
            for modality, file in stack:
                path = Path(file)
                with rasterio.open(path) as f:
                    collection = f.tags().get("collection", "")
                why = f"from the STAC search ({collection})"
                record = self.inputs.add_upload(path, path.name, "stac", (modality, why))
                kept.append(record["id"])
                records.append(self.inputs.public(record))
            g = result.grid
            message = (
                f"{result.items} STAC items; {len(records)} input(s) of {g.width} x {g.height} "
                f"px of {g.ground_resolution_m():g} m ({g.crs.to_string()})"
            )
            self._update(search_id, status="done", inputs=records, message=message, phase="")
        except Exception as exc:  # every failure becomes the search's one-line message
            for input_id in kept:
                self.inputs.remove(input_id)
            if isinstance(exc, TerrasynthError):
                message = " ".join(str(exc).split())
            else:
                log.exception("catalogue search %s failed", search_id)
                message = f"the search failed unexpectedly: {first_line(exc)}"
            self._update(search_id, status="failed", message=message, phase="")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
