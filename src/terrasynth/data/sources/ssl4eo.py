"""SSL4EO-S12 reader: per-band GeoTIFF folders of S2 L2A, S2 L1C and S1 GRD per location.

Layout (one location shown)::

    ssl4eo_s12/
      s2a/0000200/20200604T054639_20200604T054831_T43RCP/{B1..B12,B8A}.tif + metadata.json
      s2c/0000200/20200604T054639_20200604T054831_T43RCP/{B1..B12,B8A,B10}.tif + metadata.json
      s1/0000200/S1A_IW_GRDH_1SDV_20200607T010800_..._D457/{VV,VH}.tif + metadata.json

Pairing rule (one scene per location and season): every S2 L2A acquisition anchors a scene.
The S2 L1C and then the S1 acquisitions of the same location are matched to the anchors by
nearest acquisition time, greedily over all (anchor, candidate) pairs from the smallest time
gap up, each acquisition used at most once and only within ``PAIR_WINDOW`` (45 days). L1C
acquisitions left unmatched anchor their own scene (so S1 can pair with them), and S1
acquisitions left unmatched become S1-only scenes: nothing is dropped silently.

Units: S2 DN -> reflectance = DN / 10000 for processing baselines below 04.00 and
(DN - 1000) / 10000 from 04.00 on (baseline from ``metadata.json`` ``PROCESSING_BASELINE``;
without it, from the acquisition date, 2022-01-25 onward). The sample location is 2020 data
with baselines 02.14 (L2A) and 02.09 (L1C), and its darkest DN (L2A B4 >= 456, L1C B10 >= 5)
rule out a +1000 offset. DN 0 is S2 no-data. S1 is stored in dB (VV -24..4 dB, VH -36..-7
dB here) and kept as dB; a band without any negative value is taken as linear power and
converted with 10*log10.

Grids: all files are EPSG:4326 (~10 m: 264 px at 10 m, 132 at 20 m, 44 at 60 m) with a
slightly different grid per resolution group and for S1; layers keep their native grids and
the scene grid is the 10 m grid of the anchor (S2 L2A, else L1C, else S1). The S1 footprint
is 2-4 S2 pixels larger / offset per edge. Caveat: on the 2020-06 pair, correlating S1 VH
with S2 B04 after reprojection peaks ~4 pixels (~40 m) north-west of zero shift, so the S1
georeferencing as distributed may be off by that much; it is kept unchanged here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from terrasynth.data.raster_io import read_json, read_layer, stack_layers
from terrasynth.data.scene import Layer, Scene
from terrasynth.errors import InputError
from terrasynth.modalities import Registry

LICENCE = "CC-BY-4.0"
PAIR_WINDOW = timedelta(days=45)
OFFSET_FROM = datetime(2022, 1, 25, tzinfo=UTC)  # first day of processing baseline 04.00

# folder name -> registry modality; order = anchor priority
_KINDS: dict[str, str] = {"s2a": "s2l2a", "s2c": "s2l1c", "s1": "s1grd"}
_LOCATION = re.compile(r"\d+")
_S2_ACQ = re.compile(r"(\d{8}T\d{6})_\d{8}T\d{6}_T[0-9A-Z]{5}")
_S1_ACQ = re.compile(r"S1[A-D]_[A-Z0-9]{2}_GRD[A-Z]_1S[A-Z]{2}_(\d{8}T\d{6})_.*")
_REF_BAND = {"s2l2a": "B02", "s2l1c": "B02", "s1grd": "VV"}


@dataclass(frozen=True)
class _Acq:
    """One acquisition folder of one modality."""

    kind: str  # s2a | s2c | s1
    path: Path
    time: datetime

    @property
    def modality(self) -> str:
        return _KINDS[self.kind]


class SSL4EOSource:
    """Reader for SSL4EO-S12 folders (``s1/``, ``s2a/``, ``s2c/`` with location folders)."""

    name = "ssl4eo_s12"

    def __init__(self, registry: Registry | None = None) -> None:
        self._registry = registry or Registry.builtin()

    def detect(self, path: str) -> bool:
        p = Path(path)
        if not p.is_dir():
            return False
        if _is_location(p):
            return True
        return any(_is_location(loc) for kind in _KINDS for loc in _first_dirs(p / kind))

    def scenes(self, path: str, registry: Registry | None = None) -> Iterator[Scene]:
        p = Path(path)
        if _is_location(p):
            root, locations = p.parent.parent, [p.name]
        elif self.detect(path):
            root = p
            found = {d.name for k in _KINDS if (p / k).is_dir() for d in _dirs(p / k)}
            locations = sorted(n for n in found if _LOCATION.fullmatch(n))
        else:
            raise InputError(f"{p}: not an SSL4EO-S12 folder (expected s1/, s2a/ or s2c/)")
        for loc in locations:
            yield from self._location_scenes(root, loc)

    def _location_scenes(self, root: Path, loc: str) -> Iterator[Scene]:
        acqs = {k: sorted(_acquisitions(root / k / loc, k), key=lambda a: a.time) for k in _KINDS}
        l1c_of, l1c_left = _pair(acqs["s2a"], acqs["s2c"])
        anchors = acqs["s2a"] + l1c_left
        partners: list[list[_Acq]] = [
            [l1c_of[i]] if i in l1c_of else [] for i in range(len(anchors))
        ]
        s1_of, s1_left = _pair(anchors, acqs["s1"])
        for i, s1 in s1_of.items():
            partners[i].append(s1)
        groups = [(a, partners[i]) for i, a in enumerate(anchors)] + [(s, []) for s in s1_left]
        seen: set[str] = set()
        for anchor, others in sorted(groups, key=lambda g: g[0].time):
            suffix = "" if anchor.kind == "s2a" else f":{anchor.modality}"
            scene_id = f"ssl4eo:{loc}:{anchor.time:%Y-%m-%d}{suffix}"
            n = 2
            while scene_id in seen:
                scene_id = f"ssl4eo:{loc}:{anchor.time:%Y-%m-%d}{suffix}-{n}"
                n += 1
            seen.add(scene_id)
            yield self._scene(scene_id, anchor, others)

    def _scene(self, scene_id: str, anchor: _Acq, others: list[_Acq]) -> Scene:
        anchor_layers = self._read(anchor)
        layers = anchor_layers + [layer for acq in others for layer in self._read(acq)]
        ref = _REF_BAND[anchor.modality]
        grid = next(layer.grid for layer in anchor_layers if ref in layer.bands)
        return Scene(scene_id, SSL4EOSource.name, LICENCE, grid, layers, time=anchor.time)

    def _read(self, acq: _Acq) -> list[Layer]:
        """All bands of one acquisition, stacked per shared grid, in physical units."""
        bands = self._registry[acq.modality].bands
        if acq.kind == "s1":
            layers = [_to_db(read_layer(acq.path / f"{b}.tif", acq.modality, [b])) for b in bands]
        else:
            offset = -0.1 if _baseline_has_offset(acq) else 0.0
            layers = [
                read_layer(
                    _band_file(acq.path, b), acq.modality, [b], scale=1e-4, offset=offset, nodata=0
                )
                for b in bands
            ]
        return stack_layers(layers)


def _dirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _first_dirs(p: Path, n: int = 3) -> list[Path]:
    """Up to ``n`` sub-folders of ``p`` (cheap on folders with many entries)."""
    if not p.is_dir():
        return []
    out = []
    for entry in p.iterdir():
        if entry.is_dir() and not entry.name.startswith("."):
            out.append(entry)
            if len(out) == n:
                break
    return out


def _is_location(p: Path) -> bool:
    """A location folder: digits, inside s1/s2a/s2c, holding acquisition folders."""
    if not (p.is_dir() and _LOCATION.fullmatch(p.name) and p.parent.name in _KINDS):
        return False
    pattern = _S1_ACQ if p.parent.name == "s1" else _S2_ACQ
    return any(pattern.fullmatch(d.name) for d in _first_dirs(p))


def _acquisitions(loc_dir: Path, kind: str) -> list[_Acq]:
    if not loc_dir.is_dir():
        return []
    return [_Acq(kind, d, _acq_time(d, kind)) for d in _dirs(loc_dir)]


def _acq_time(d: Path, kind: str) -> datetime:
    """Acquisition start from the folder name, else ``system:time_start`` of metadata.json."""
    m = (_S1_ACQ if kind == "s1" else _S2_ACQ).fullmatch(d.name)
    if m:
        return datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    start = _metadata(d).get("system:time_start")
    if isinstance(start, int | float):
        return datetime.fromtimestamp(start / 1000.0, tz=UTC)
    raise InputError(f"{d}: cannot tell the acquisition time (unexpected folder name)")


def _metadata(d: Path) -> dict:
    f = d / "metadata.json"
    return read_json(f) if f.exists() else {}


def _baseline_has_offset(acq: _Acq) -> bool:
    """True for processing baseline >= 04.00 (DN carry +1000)."""
    baseline = _metadata(acq.path).get("PROCESSING_BASELINE")
    if baseline is None:
        return acq.time >= OFFSET_FROM
    try:
        return float(baseline) >= 4.0
    except (TypeError, ValueError) as exc:
        raise InputError(f"{acq.path}: bad PROCESSING_BASELINE {baseline!r}") from exc


def _pair(anchors: list[_Acq], others: list[_Acq]) -> tuple[dict[int, _Acq], list[_Acq]]:
    """Match ``others`` to anchors by nearest time (greedy, each used once, within window)."""
    candidates = sorted(
        (abs(a.time - o.time), i, j)
        for i, a in enumerate(anchors)
        for j, o in enumerate(others)
        if abs(a.time - o.time) <= PAIR_WINDOW
    )
    match: dict[int, _Acq] = {}
    used: set[int] = set()
    for _, i, j in candidates:
        if i not in match and j not in used:
            match[i] = others[j]
            used.add(j)
    return match, [o for j, o in enumerate(others) if j not in used]


def _band_file(folder: Path, band: str) -> Path:
    """SSL4EO names files B1..B12, B8A; registry names are B01..B12, B8A."""
    short = folder / f"B{band[1:].lstrip('0')}.tif"
    padded = folder / f"{band}.tif"
    return padded if not short.exists() and padded.exists() else short


def _to_db(layer: Layer) -> Layer:
    """Keep dB; convert a band that is linear power (no negative value) to dB."""
    values = layer.data[layer.valid_mask()]
    if values.size and values.min() >= 0.0:
        positive = layer.data > 0
        layer.valid = layer.valid_mask() & positive
        layer.data = np.where(positive, 10.0 * np.log10(np.where(positive, layer.data, 1.0)), 0.0)
        layer.data = layer.data.astype(np.float32)
    return layer
