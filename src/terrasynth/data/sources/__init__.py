"""Readers for the formats EO data is distributed in, and automatic format detection.

Each reader is a class with ``name``, ``detect(path)`` and ``scenes(path)`` (see
:class:`terrasynth.data.scene.Source`). ``detect_source`` tries them in order.
"""

from __future__ import annotations

from pathlib import Path

from terrasynth.data.scene import Source
from terrasynth.data.sources.band_folder import BandFolderSource
from terrasynth.data.sources.bigearthnet_v1 import BigEarthNetV1Source
from terrasynth.data.sources.bigearthnet_v2 import BigEarthNetV2Source
from terrasynth.data.sources.described import DescribedSource
from terrasynth.data.sources.eopatch import EOPatchSource
from terrasynth.data.sources.flair import FlairSource
from terrasynth.data.sources.generic import generic_scene
from terrasynth.data.sources.majortom import MajorTOMSource
from terrasynth.data.sources.ssl4eo import SSL4EOSource
from terrasynth.errors import InputError

SOURCES: tuple[Source, ...] = (
    DescribedSource(),  # a user's own description wins over format detection
    BigEarthNetV1Source(),
    BigEarthNetV2Source(),
    SSL4EOSource(),
    MajorTOMSource(),
    EOPatchSource(),
    FlairSource(),
    BandFolderSource(),
)


def detect_source(path: str | Path) -> Source:
    """The reader whose format ``path`` is in; a clear error if none matches."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    for source in SOURCES:
        if source.detect(str(p)):
            return source
    names = ", ".join(s.name for s in SOURCES)
    raise InputError(
        f"{p}: not a recognised source format (tried {names}); "
        "for your own GeoTIFFs use --input MOD=FILE"
    )


__all__ = ["SOURCES", "detect_source", "generic_scene"]
