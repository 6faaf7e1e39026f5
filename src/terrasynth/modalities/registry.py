"""The modality registry: one table of modality facts from which every shape is derived.

Entries are data (``builtin.yaml``); users add their own with a YAML file of the same form
(``Registry.with_file(path)`` or ``terrasynth data build --modalities FILE``). No model or
reader code changes when a modality is added.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from terrasynth.errors import TerrasynthError, UnknownModalityError

Kind = Literal["continuous", "categorical", "multilabel", "scalar"]
KINDS: tuple[str, ...] = ("continuous", "categorical", "multilabel", "scalar")
TRANSFORMS: tuple[str, ...] = ("none", "log1p")
MAX_GROUP_FACTOR = 4  # coarsest band group is stored at most 4x coarser than the finest
# Spectral slots: wavelength ranges that bands of different optical sensors share. A band
# mapped to a slot (``spectral`` in its entry) shares the model's input and output channels
# with every other sensor's band of that slot, so what one sensor teaches carries to others.
SPECTRAL_SLOTS: tuple[str, ...] = (
    "coastal",  # ~443 nm
    "blue",  # ~490 nm
    "green",  # ~560 nm
    "red",  # ~665 nm
    "rededge1",  # ~705 nm
    "rededge2",  # ~740 nm
    "rededge3",  # ~783 nm
    "nir",  # broad near infrared, ~840 nm
    "nir08",  # narrow near infrared, ~865 nm
    "watervapour",  # ~945 nm
    "cirrus",  # ~1375 nm
    "swir16",  # ~1610 nm
    "swir22",  # ~2200 nm
    "thermal",  # ~11 um
)
# Approximate centre wavelength of each slot in micrometres (Sentinel-2 MSI's where it has
# the band): what a band of the slot reports as its wavelength, e.g. in a STAC Item.
SLOT_WAVELENGTH_UM: dict[str, float] = {
    "coastal": 0.443,
    "blue": 0.49,
    "green": 0.56,
    "red": 0.665,
    "rededge1": 0.705,
    "rededge2": 0.74,
    "rededge3": 0.783,
    "nir": 0.842,
    "nir08": 0.865,
    "watervapour": 0.945,
    "cirrus": 1.375,
    "swir16": 1.61,
    "swir22": 2.19,
    "thermal": 10.9,
}


@dataclass(frozen=True)
class BandGroup:
    """Bands of one modality that share a native ground sampling distance."""

    name: str
    gsd: float
    bands: tuple[str, ...]
    factor: int = 1  # stored pixel size relative to the modality's finest group (power of 2)


@dataclass(frozen=True)
class LegendEntry:
    """One class of a categorical or multi-label modality."""

    code: int
    name: str
    color: str = "#808080"


@dataclass(frozen=True)
class Modality:
    """Everything terrasynth knows about one modality."""

    name: str
    description: str
    kind: Kind
    units: str
    groups: tuple[BandGroup, ...]
    value_range: tuple[float, float] | None = None
    expected_range: tuple[float, float] | None = None  # where most valid values lie
    transform: str = "none"
    nodata: float | None = None
    legend: tuple[LegendEntry, ...] = ()
    rgb: tuple[str, ...] = ()
    spectral: tuple[tuple[str, str], ...] = ()  # (band, spectral slot) pairs

    @property
    def spectral_slots(self) -> dict[str, str]:
        """Band -> spectral slot (see ``SPECTRAL_SLOTS``) of the bands that have one."""
        return dict(self.spectral)

    @property
    def bands(self) -> tuple[str, ...]:
        """All band names in group order."""
        return tuple(b for g in self.groups for b in g.bands)

    @property
    def is_raster(self) -> bool:
        return self.kind in ("continuous", "categorical")

    @property
    def num_classes(self) -> int:
        return len(self.legend)

    def group(self, name: str) -> BandGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise UnknownModalityError(f"modality '{self.name}' has no band group '{name}'")

    def group_of(self, band: str) -> BandGroup:
        """The band group holding ``band``; raises a clear error for unknown bands."""
        for g in self.groups:
            if band in g.bands:
                return g
        raise UnknownModalityError(
            f"modality '{self.name}' has no band '{band}' (bands: {', '.join(self.bands)})"
        )

    def class_index(self) -> dict[int, int]:
        """Map source class code -> contiguous class index 0..K-1."""
        return {e.code: i for i, e in enumerate(self.legend)}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "description": self.description,
            "kind": self.kind,
            "units": self.units,
            "groups": [{"name": g.name, "gsd": g.gsd, "bands": list(g.bands)} for g in self.groups],
        }
        if self.value_range is not None:
            d["value_range"] = list(self.value_range)
        if self.expected_range is not None:
            d["expected_range"] = list(self.expected_range)
        if self.transform != "none":
            d["transform"] = self.transform
        if self.nodata is not None:
            d["nodata"] = self.nodata
        if self.legend:
            d["legend"] = {e.code: {"name": e.name, "color": e.color} for e in self.legend}
        if self.rgb:
            d["rgb"] = list(self.rgb)
        if self.spectral:
            d["spectral"] = dict(self.spectral)
        return d


def _group_factors(gsds: list[float]) -> list[int]:
    """Power-of-two storage factor of each group relative to the finest (capped)."""
    finest = min(gsds) if gsds else 1.0
    out = []
    for gsd in gsds:
        ratio = gsd / finest if finest > 0 else 1.0
        f = 2 ** int(math.floor(math.log2(max(ratio, 1.0)) + 1e-9))
        out.append(min(f, MAX_GROUP_FACTOR))
    return out


def modality_from_dict(name: str, d: Mapping[str, Any]) -> Modality:
    """Build and validate a :class:`Modality` from its YAML/JSON form."""
    where = f"modality '{name}'"
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise TerrasynthError(f"{where}: names are lowercase letters, digits and '_'")
    kind = d.get("kind")
    if kind not in KINDS:
        raise TerrasynthError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    transform = d.get("transform", "none")
    if transform not in TRANSFORMS:
        raise TerrasynthError(f"{where}: transform must be one of {', '.join(TRANSFORMS)}")
    raw_groups = d.get("groups") or []
    if kind != "multilabel" and not raw_groups:
        raise TerrasynthError(f"{where}: needs at least one band group")
    try:
        gsds = [float(g["gsd"]) for g in raw_groups]
        factors = _group_factors(gsds)
        groups = tuple(
            BandGroup(str(g["name"]), gsd, tuple(str(b) for b in g["bands"]), f)
            for g, gsd, f in zip(raw_groups, gsds, factors, strict=True)
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TerrasynthError(f"{where}: each group needs name, gsd and bands ({exc})") from exc
    all_bands = [b for g in groups for b in g.bands]
    if len(set(all_bands)) != len(all_bands):
        raise TerrasynthError(f"{where}: a band name appears twice")
    legend_raw = d.get("legend") or {}
    if kind in ("categorical", "multilabel") and not legend_raw:
        raise TerrasynthError(f"{where}: a {kind} modality needs a legend")
    legend = tuple(
        LegendEntry(int(code), str(v["name"]), str(v.get("color", "#808080")))
        for code, v in legend_raw.items()
    )
    vr = d.get("value_range")
    if kind == "continuous" and vr is None:
        raise TerrasynthError(f"{where}: a continuous modality needs value_range [low, high]")
    er = d.get("expected_range")
    rgb = tuple(d.get("rgb") or ())
    for b in rgb:
        if b not in all_bands:
            raise TerrasynthError(f"{where}: rgb band '{b}' is not one of its bands")
    spectral = tuple((str(b), str(s)) for b, s in (d.get("spectral") or {}).items())
    for b, slot in spectral:
        if b not in all_bands:
            raise TerrasynthError(f"{where}: spectral band '{b}' is not one of its bands")
        if slot not in SPECTRAL_SLOTS:
            raise TerrasynthError(
                f"{where}: spectral slot '{slot}' of band '{b}' is not one of "
                f"{', '.join(SPECTRAL_SLOTS)}"
            )
    if spectral and kind != "continuous":
        raise TerrasynthError(f"{where}: only continuous modalities have spectral slots")
    return Modality(
        name=name,
        description=str(d.get("description", "")),
        kind=kind,
        units=str(d.get("units", "")),
        groups=groups,
        value_range=(float(vr[0]), float(vr[1])) if vr is not None else None,
        expected_range=(float(er[0]), float(er[1])) if er is not None else None,
        transform=transform,
        nodata=d.get("nodata"),
        legend=legend,
        rgb=rgb,
        spectral=spectral,
    )


@dataclass
class Registry(Mapping[str, Modality]):
    """Name -> :class:`Modality`; behaves as a read-only mapping."""

    modalities: dict[str, Modality] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Modality:
        try:
            return self.modalities[name]
        except KeyError:
            known = ", ".join(sorted(self.modalities))
            raise UnknownModalityError(f"unknown modality '{name}' (known: {known})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.modalities)

    def __len__(self) -> int:
        return len(self.modalities)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Registry:
        mods = d.get("modalities", d)
        return cls({n: modality_from_dict(str(n), v) for n, v in mods.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> Registry:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise TerrasynthError(f"cannot read modality file {path}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("modalities"), dict):
            raise TerrasynthError(f"{path}: expected a mapping with a 'modalities' key")
        return cls.from_dict(data)

    @classmethod
    def builtin(cls) -> Registry:
        text = resources.files("terrasynth.modalities").joinpath("builtin.yaml").read_text()
        return cls.from_dict(yaml.safe_load(text))

    def merged(self, other: Registry) -> Registry:
        """A registry with ``other``'s entries added; redefining a name is an error."""
        clash = set(self.modalities) & set(other.modalities)
        for name in clash:
            if self.modalities[name] != other.modalities[name]:
                raise TerrasynthError(f"modality '{name}' is already defined differently")
        return Registry({**self.modalities, **other.modalities})

    def with_file(self, path: str | Path) -> Registry:
        return self.merged(Registry.from_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        return {"modalities": {n: m.to_dict() for n, m in self.modalities.items()}}


def default_registry(extra: list[str | Path] | None = None) -> Registry:
    """The built-in registry, plus any user modality files."""
    reg = Registry.builtin()
    for path in extra or []:
        reg = reg.with_file(path)
    return reg
