"""Rasters that GDAL reads over the network: ``https://``, ``s3://`` and GDAL's own
``/vsicurl/``, ``/vsis3/`` (and the other ``/vsi*`` network file systems).

Wherever terrasynth takes a GeoTIFF it takes such a location too. A location stays the
string the user gave (``pathlib.Path`` would fold ``https://`` into ``https:/``), wrapped in
:class:`RemotePath`, which offers the few ``Path`` attributes the readers use (``name``,
``stem``, ``suffix``). GDAL reads cloud-optimised GeoTIFFs by HTTP range requests, so only
the header and the tiles under the windows read cross the network.

GDAL's settings for those reads (:func:`raster_env`) hold only inside the ``rasterio.Env``
around an open and its reads, never process-wide: no directory listing on open (no probing
for side-car files), side-car look-ups only for the file's own extension, bounded retries
with a delay on transient HTTP errors (429, 5xx), and connect and overall time-outs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import rasterio

# GDAL's block cache (MB) while reading: its default grows to 5 % of the machine's memory
GDAL_CACHE_MB = 64
# schemes mapped onto GDAL's virtual file systems, and the prefixes GDAL reads directly
SCHEMES = {"https": "/vsicurl/https://", "http": "/vsicurl/http://", "s3": "/vsis3/"}
VSI_NETWORK = ("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/", "/vsiadls/", "/vsioss/", "/vsiswift/")
# transient HTTP errors (429, 5xx) are retried this many times, this many seconds apart
HTTP_RETRIES = 3
HTTP_RETRY_DELAY_S = 0.5
HTTP_CONNECT_TIMEOUT_S = 10
HTTP_TIMEOUT_S = 60


@dataclass(frozen=True)
class RemotePath:
    """A raster location GDAL opens over the network, kept as given (``url``)."""

    url: str

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        return gdal_name(self.url)

    @property
    def _path(self) -> PurePosixPath:
        if self.url.startswith("/vsi"):
            return PurePosixPath(self.url.split("?")[0])
        return PurePosixPath(urlsplit(self.url).path or "/")

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def stem(self) -> str:
        return self._path.stem

    @property
    def suffix(self) -> str:
        return self._path.suffix

    def exists(self) -> bool:
        """Unknown before GDAL opens it: opening says whether it is there."""
        return True

    def resolve(self) -> RemotePath:
        return self


RasterPath = Path | RemotePath


def is_remote(location: Any) -> bool:
    """Whether ``location`` (a string or path) is a network location GDAL reads."""
    if isinstance(location, RemotePath):
        return True
    if not isinstance(location, str):
        return False
    scheme = location.partition("://")[0].lower() if "://" in location else ""
    return scheme in SCHEMES or location.startswith(VSI_NETWORK)


def raster_path(location: str | os.PathLike[str]) -> RasterPath:
    """A raster location as the readers take it: :class:`RemotePath` for a network
    location, else a local ``Path``."""
    if isinstance(location, RemotePath):
        return location
    if isinstance(location, str) and is_remote(location):
        return RemotePath(location.strip())
    return Path(location)


def gdal_name(location: str | os.PathLike[str]) -> str:
    """The name GDAL opens: ``https://h/f.tif`` -> ``/vsicurl/https://h/f.tif``,
    ``s3://bucket/key.tif`` -> ``/vsis3/bucket/key.tif``; other locations unchanged."""
    if isinstance(location, RemotePath):
        location = location.url
    if not isinstance(location, str):
        return os.fspath(location)
    if "://" in location:
        scheme, _, rest = location.partition("://")
        prefix = SCHEMES.get(scheme.lower())
        if prefix is not None:
            return prefix + rest
    return location


def raster_env(location: Any = None, **options: Any) -> rasterio.Env:
    """The ``rasterio.Env`` to open and read ``location`` in: GDAL's block cache bounded,
    and for a network location the settings of this module's docstring. ``options``: more
    GDAL settings."""
    settings: dict[str, Any] = {"GDAL_CACHEMAX": GDAL_CACHE_MB}
    if location is not None and is_remote(location):
        settings.update(
            GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR",
            GDAL_HTTP_MAX_RETRY=HTTP_RETRIES,
            GDAL_HTTP_RETRY_DELAY=HTTP_RETRY_DELAY_S,
            GDAL_HTTP_CONNECTTIMEOUT=HTTP_CONNECT_TIMEOUT_S,
            GDAL_HTTP_TIMEOUT=HTTP_TIMEOUT_S,
            GDAL_HTTP_MERGE_CONSECUTIVE_RANGES="YES",
            VSI_CACHE="TRUE",
        )
        suffix = raster_path(location).suffix
        if suffix:  # only the file itself: no .aux.xml, .ovr or .msk requests
            settings["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"] = suffix
    settings.update(options)
    return rasterio.Env(**settings)
