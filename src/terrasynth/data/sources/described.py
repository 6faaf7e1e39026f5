"""Sources described as data: a YAML file says which files and bands are which modality.

A description (schema in ``docs/sources.md``) names the files of a folder, the modality
and band of every file band, scale/offset to physical units, nodata, dates (fixed, a
list, a monthly series, or parsed from band descriptions or file names), masks (e.g. a
scene-classification band) and how trustworthy the georeference is. Multi-date stacks
become one scene per date of the anchor modality; layers of other modalities join the
nearest date within ``pair_tolerance_days``; timeless layers (elevation, maps) join all.

Descriptions are found three ways: ``terrasynth-source.yaml`` inside a folder, a YAML file
given as the source path (its ``root`` points at the data), or one of the descriptions
shipped in ``terrasynth/data/descriptions`` whose ``match`` globs all hit the folder.

A description is data from the user's disk, so what it can reach is bounded: ``root`` and
every file or folder its globs find must lie, after resolving links, inside the
description's folder (the folder holding the YAML, or the described folder itself); globs
must be relative and free of ``..``; and its regular expressions must pass ``safe_regex``.
"""

from __future__ import annotations

import re
import re._constants as sre  # the parser's opcodes (private, stable across 3.11 to 3.13)
import re._parser as sre_parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import yaml
from rasterio.warp import Resampling, reproject

from terrasynth.data.align import reference_grid
from terrasynth.data.raster_io import (
    GDAL_ERRORS,
    Raster,
    first_line,
    layer_from_raster,
    open_raster,
    stack_layers,
)
from terrasynth.data.scene import Layer, Scene
from terrasynth.errors import InputError
from terrasynth.modalities import Registry, default_registry

DESCRIPTION_FILE = "terrasynth-source.yaml"
DATE_RE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")
# Longest text a description's regular expression is matched against (a file name is at
# most 255 bytes on the usual file systems; longer band descriptions are refused).
MAX_SUBJECT = 255
MAX_REGEX = 256  # characters of one regular expression
# Bound on the ways a backtracking matcher may try a pattern on MAX_SUBJECT characters
# (``_regex_paths``). 1e8 is a fraction of a second for chains of quantifiers and a few
# seconds for chains of optional items, whose paths cost more each.
MAX_REGEX_PATHS = 10**8


@dataclass(frozen=True)
class FileBand:
    """One band of a file: its 1-based index, band name and date (None: timeless)."""

    index: int
    band: str
    date: datetime | None


def parse_date(text: str, where: str) -> datetime:
    m = DATE_RE.search(str(text))
    if m is None:
        raise InputError(f"{where}: no date (YYYY-MM-DD or YYYYMMDD) in '{text}'")
    try:
        return datetime(int(m[1]), int(m[2]), int(m[3]), tzinfo=UTC)
    except ValueError as exc:
        raise InputError(f"{where}: invalid date in '{text}' ({exc})") from exc


def _add_months(d: datetime, n: int) -> datetime:
    y, m = divmod(d.month - 1 + n, 12)
    return d.replace(year=d.year + y, month=m + 1)


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: unreadable source description ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise InputError(f"{path}: a source description needs a 'layers' list")
    for key in ("name", "licence"):
        if key not in data:
            raise InputError(f"{path}: a source description needs '{key}'")
    return data


def shipped_descriptions() -> list[tuple[str, dict[str, Any]]]:
    """The descriptions shipped with terrasynth, as (file name, content)."""
    folder = resources.files("terrasynth.data").joinpath("descriptions")
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            out.append((entry.name, _load_yaml(Path(str(entry)))))
    return out


def _regex_paths(items: Any, n: int, where: str, pattern: str) -> int:
    """An upper bound on the paths a backtracking matcher tries for ``items`` at one start
    position of an ``n``-character text: a product over the sequence, a sum over
    alternatives, and up to n + 1 counts per quantifier. A quantified part that itself
    has several ways to match (``(a+)+``, ``(a|ab)*``) is refused outright: its paths grow
    exponentially with the text."""
    total = 1
    for op, av in items:
        if op is sre.BRANCH:
            k = sum(_regex_paths(alt, n, where, pattern) for alt in av[1])
        elif op is sre.SUBPATTERN:
            k = _regex_paths(av[3], n, where, pattern)
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            k = _regex_paths(av[1], n, where, pattern)
        elif op is sre.ATOMIC_GROUP:
            k = _regex_paths(av, n, where, pattern)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            lo, hi, body = av
            inner = _regex_paths(body, n, where, pattern)
            if inner > 1 and hi > 1:
                raise InputError(
                    f"{where}: regular expression '{pattern}' repeats a part that can match "
                    "in several ways (nested quantifiers); simplify it"
                )
            k = (min(hi, n) - min(lo, n) + 1) * inner
        elif op in (sre.GROUPREF, sre.GROUPREF_EXISTS):
            raise InputError(f"{where}: regular expression '{pattern}': no back-references")
        else:
            k = 1
        total *= k
    return total


def safe_regex(pattern: str, where: str) -> re.Pattern[str]:
    """``pattern`` compiled, if its matching cost is bounded; InputError otherwise.

    Python's ``re`` backtracks and cannot be interrupted, and a time-out would need a
    thread or process per match, so the cost is bounded before matching instead: a length
    limit, no back-references, no quantified part that can match in several ways, and an
    upper bound on backtracking paths over the longest text matched (``MAX_SUBJECT``).
    """
    if not isinstance(pattern, str) or len(pattern) > MAX_REGEX:
        raise InputError(f"{where}: a regular expression must be text of <= {MAX_REGEX} chars")
    try:
        compiled = re.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise InputError(f"{where}: invalid regular expression '{pattern}' ({exc})") from exc
    paths = _regex_paths(parsed, MAX_SUBJECT, where, pattern)
    anchored = bool(parsed.data) and parsed.data[0] == (sre.AT, sre.AT_BEGINNING)
    if paths * (1 if anchored else MAX_SUBJECT + 1) > MAX_REGEX_PATHS:
        hint = "" if anchored else " or anchor it with '^'"
        raise InputError(
            f"{where}: regular expression '{pattern}' may take too long to match (too many "
            f"quantifiers or optional parts); simplify it{hint}"
        )
    return compiled


def _search(regex: re.Pattern[str], text: str, where: str) -> re.Match[str] | None:
    if len(text) > MAX_SUBJECT:
        raise InputError(f"{where}: '{text[:40]}...' is longer than {MAX_SUBJECT} characters")
    return regex.search(text)


def _inside(path: Path, base: Path, where: str) -> Path:
    """``path`` if it lies inside ``base`` (a resolved folder) once links are resolved."""
    if not path.resolve().is_relative_to(base):
        raise InputError(f"{where}: {path} lies outside the description's folder {base}")
    return path


def _glob(folder: Path, pattern: Any, base: Path, where: str) -> list[Path]:
    """Sorted matches of a description's glob under ``folder``, all inside ``base``."""
    text = str(pattern)
    pure = PurePosixPath(text)
    if not text or pure.is_absolute() or ".." in pure.parts or "\\" in text:
        raise InputError(
            f"{where}: pattern '{text}' must be relative to the description's folder "
            "(no leading '/', no '..')"
        )
    return [_inside(p, base, where) for p in sorted(folder.glob(text))]


def _matches(folder: Path, desc: dict[str, Any]) -> bool:
    patterns = desc.get("match") or []
    return bool(patterns) and all(any(folder.glob(p)) for p in patterns)


def find_description(path: Path) -> tuple[dict[str, Any], Path] | None:
    """(description, data root) for ``path``, or None if no description applies."""
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        desc = _load_yaml(path)
        root = path.parent / str(desc.get("root", "."))
        return desc, _inside(root, path.parent.resolve(), f"{path}: root").resolve()
    if not path.is_dir():
        return None
    own = path / DESCRIPTION_FILE
    if own.exists():
        return _load_yaml(own), path.resolve()
    matching = [desc for _, desc in shipped_descriptions() if _matches(path, desc)]
    # Folders laid out alike (two exports of one tool) are told apart by the folder name.
    matching.sort(key=lambda d: d["name"] != path.resolve().name)
    return (matching[0], path.resolve()) if matching else None


def _file_bands(path: Path, spec: dict[str, Any], count: int, descriptions: tuple) -> list:
    """The band table of one file from its layer spec."""
    where = f"{path}"
    first = int(spec.get("first_band", 1))
    if "band_pattern" in spec:
        pattern = safe_regex(spec["band_pattern"], f"{where}: band_pattern")
        rename = spec.get("band_names", {})
        # Without a date group, a `dates` spec (e.g. from the file name) dates every band.
        fixed = _dates(spec, path, 1, 1)
        if len(fixed) > 1:
            raise InputError(f"{where}: with band_pattern, 'dates' must give one date")
        out = []
        for i, d in enumerate(descriptions, start=1):
            if i < first:
                continue
            m = _search(pattern, d or "", f"{where}: band {i} description")
            if m is None:
                raise InputError(f"{where}: band {i} description '{d}' does not match band_pattern")
            groups = m.groupdict()
            band = rename.get(groups["band"], groups["band"])
            date = parse_date(groups["date"], where) if groups.get("date") else None
            out.append(FileBand(i, band, date or (fixed[0] if fixed else None)))
        return out
    bands = list(spec.get("bands") or [])
    if not bands:
        raise InputError(f"{where}: layer needs 'bands' or 'band_pattern'")
    dates = _dates(spec, path, count - first + 1, len(bands))
    n_dates = max(len(dates), 1)
    needed = len(bands) * n_dates
    if first - 1 + needed > count:
        raise InputError(
            f"{where}: description expects {needed} band(s) from band {first}, file has {count}"
        )
    out = []
    date_major = spec.get("band_order", "date_major") == "date_major"
    for t in range(n_dates):
        for b, band in enumerate(bands):
            k = t * len(bands) + b if date_major else b * n_dates + t
            out.append(FileBand(first + k, band, dates[t] if dates else None))
    return out


def _dates(spec: dict[str, Any], path: Path, available: int, per_date: int) -> list:
    d = spec.get("dates")
    where = str(path)
    if d is None:
        return []
    if isinstance(d, str | datetime) or hasattr(d, "year"):
        return [parse_date(str(d), where)]
    if isinstance(d, list):
        return [parse_date(str(x), where) for x in d]
    if isinstance(d, dict) and "from_filename" in d:
        return [parse_date(path.name, where)]
    if isinstance(d, dict) and "start" in d:
        start = parse_date(str(d["start"]), where)
        n = int(d.get("count", available // per_date))
        step = int(d.get("step_months", 1))
        return [_add_months(start, step * i) for i in range(n)]
    raise InputError(f"{where}: unsupported 'dates' spec {d!r}")


def _mask_bad(mask: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    bad = np.zeros(mask.shape, bool)
    values = spec.get("invalid") or []
    if values:
        bad |= np.isin(mask, values)
    for bit in spec.get("invalid_bits") or []:
        bad |= (mask.astype(np.int64) >> int(bit)) & 1 == 1
    return bad


class _Files:
    """Rasters of one place, each read once however many layers and dates use it."""

    def __init__(self) -> None:
        self._cache: dict[Path, Raster] = {}

    def get(self, path: Path) -> Raster:
        if path not in self._cache:
            self._cache[path] = open_raster(path)
        return self._cache[path]


def _mask_for(
    layer: Layer,
    date: datetime | None,
    fbs: list[FileBand],
    raster: Raster,
    spec: dict[str, Any],
    folder: Path,
    files: _Files,
    root: Path,
) -> np.ndarray:
    """Invalid pixels of ``layer`` by its mask spec: a QA band of this file or another
    (a glob relative to ``folder``, inside ``root``)."""
    band = spec.get("band")
    if "file" not in spec:
        m = [fb for fb in fbs if fb.band == band]
        if not m:
            raise InputError(f"{raster.path}: mask band '{band}' not found")
        return _mask_bad(raster.raw[m[0].index - 1], spec)
    # A mask band in another file (e.g. SCL only in the 20 m file): same date, reprojected
    # with nearest neighbour onto this layer's grid.
    paths = _glob(folder, spec["file"], root, f"{folder}: mask file")
    if not paths:
        raise InputError(f"{folder}: no mask file matches '{spec['file']}'")
    other = files.get(paths[0])
    table = _file_bands(
        other.path,
        {**spec, "band_pattern": spec.get("band_pattern")},
        other.count,
        other.descriptions,
    )
    hit = [fb for fb in table if fb.band == band and fb.date == date]
    if not hit:
        raise InputError(f"{other.path}: no mask band '{band}' for {date:%Y-%m-%d}")
    bad = _mask_bad(other.raw[hit[0].index - 1], spec).astype(np.uint8)
    out = np.zeros(layer.data.shape[1:], np.uint8)
    try:
        reproject(
            bad,
            out,
            src_transform=other.transform,
            src_crs=other.crs,
            dst_transform=layer.transform,
            dst_crs=layer.crs,
            resampling=Resampling.nearest,
        )
    except GDAL_ERRORS as exc:
        raise InputError(
            f"{other.path}: cannot warp its mask onto {layer.modality}'s grid ({first_line(exc)})"
        ) from exc
    return out.astype(bool)


def _read_file_layers(
    path: Path, spec: dict[str, Any], registry: Registry, files: _Files, root: Path
) -> list[tuple[datetime | None, Layer]]:
    """All (date, layer) pairs a layer spec yields from one file (of the folder ``root``)."""
    modality = registry[spec["modality"]]
    raster = files.get(path)
    table = _file_bands(path, spec, raster.count, raster.descriptions)
    mask_spec = spec.get("mask")
    ignore = set(spec.get("ignore") or [])
    by_date: dict[datetime | None, list[FileBand]] = {}
    for fb in table:
        by_date.setdefault(fb.date, []).append(fb)
    out: list[tuple[datetime | None, Layer]] = []
    for date, fbs in by_date.items():
        # A band listed twice for one date (a product distributed twice) is read once.
        firsts = {fb.band: fb for fb in reversed(fbs)}
        keep = [fb for fb in fbs if fb.band in modality.bands and firsts[fb.band] is fb]
        own_mask = mask_spec.get("band") if mask_spec and "file" not in mask_spec else None
        unknown = [
            fb.band
            for fb in fbs
            if fb.band not in modality.bands and fb.band not in ignore and fb.band != own_mask
        ]
        if unknown:
            raise InputError(
                f"{path}: band(s) {sorted(set(unknown))} are not bands of "
                f"{modality.name} ({', '.join(modality.bands)}); map or ignore them"
            )
        if not keep:
            continue
        layer = layer_from_raster(
            raster,
            modality.name,
            [fb.band for fb in keep],
            indexes=[fb.index for fb in keep],
            scale=float(spec.get("scale", 1.0)),
            offset=float(spec.get("offset", 0.0)),
            nodata=spec.get("nodata"),
            categorical=modality.kind == "categorical",
        )
        if "valid_range" in spec:  # physical units; e.g. wrapped negative integers
            lo, hi = spec["valid_range"]
            layer.valid = layer.valid_mask() & (layer.data >= lo) & (layer.data <= hi)
        if mask_spec:
            bad = _mask_for(layer, date, fbs, raster, mask_spec, path.parent, files, root)
            layer.valid = layer.valid_mask() & ~bad[None]
        out.append((date, layer))
    return out


def _scene_folders(root: Path, desc: dict[str, Any]) -> list[Path]:
    pattern = desc.get("scenes")
    if not pattern:
        return [root]
    folders = [p for p in _glob(root, pattern, root, f"{root}: scenes") if p.is_dir()]
    if not folders:
        raise InputError(f"{root}: no scene folder matches '{pattern}'")
    return folders


def _assemble(
    dated: dict[str, list[tuple[datetime, list[Layer]]]],
    timeless: list[Layer],
    anchor: str | None,
    tolerance: timedelta,
) -> Iterator[tuple[datetime | None, list[Layer]]]:
    """Group dated layers into per-date scenes around the anchor modality.

    Every date of the anchor modality makes a scene; each other modality contributes its
    nearest unused date within ``tolerance``. Dates no anchor claimed make scenes of their
    own, so nothing is dropped.
    """
    if not dated:
        yield None, list(timeless)
        return
    order = [anchor] if anchor in dated else []
    order += [m for m in dated if m not in order]
    used: set[tuple[str, int]] = set()
    for anchor_mod in order:
        for i, (date, layer) in enumerate(dated[anchor_mod]):
            if (anchor_mod, i) in used:
                continue
            used.add((anchor_mod, i))
            layers = list(layer)
            for mod, items in dated.items():
                if mod == anchor_mod:
                    continue
                best = min(
                    ((abs(d - date), j) for j, (d, _) in enumerate(items) if (mod, j) not in used),
                    default=None,
                )
                if best is not None and best[0] <= tolerance:
                    used.add((mod, best[1]))
                    layers.extend(items[best[1]][1])
            yield date, layers + list(timeless)


def _scene_units(
    folder: Path, desc: dict[str, Any], root: Path
) -> list[tuple[str | None, list[tuple[dict[str, Any], Path]]]]:
    """Files of a scene folder (inside ``root``) split into places by the ``scene_key`` regex.

    Files whose name gives the same key (its first group) are one place; files it does not
    match (a shared DEM, say) belong to every place. Without ``scene_key``: one place.
    """
    pairs: list[tuple[dict[str, Any], Path]] = []
    for spec in desc["layers"]:
        if not isinstance(spec, dict) or "file" not in spec:
            raise InputError(f"{folder}: every layer of a source description needs 'file'")
        files = _glob(folder, spec["file"], root, f"{folder}: layer file")
        if not files and not spec.get("optional"):
            raise InputError(f"{folder}: no file matches '{spec['file']}'")
        pairs += [(spec, f) for f in files]
    if "scene_key" not in desc:
        return [(None, pairs)]
    key_re = safe_regex(desc["scene_key"], f"{folder}: scene_key")
    keys: dict[Path, str | None] = {}
    for _, f in pairs:
        m = _search(key_re, f.name, f"{folder}: scene_key")
        keys[f] = (m.group(1) if m.groups() else m.group(0)) if m else None
    units = sorted({k for k in keys.values() if k is not None})
    if not units:
        raise InputError(f"{folder}: scene_key '{desc['scene_key']}' matches no file name")
    return [(u, [(sp, f) for sp, f in pairs if keys[f] in (u, None)]) for u in units]


class DescribedSource:
    """Reader for folders described by a YAML source description."""

    name = "described"

    def detect(self, path: str) -> bool:
        try:
            return find_description(Path(path)) is not None
        except InputError:
            return Path(path).suffix in (".yaml", ".yml")

    def scenes(self, path: str, registry: Registry | None = None) -> Iterator[Scene]:
        found = find_description(Path(path))
        if found is None:
            raise InputError(f"{path}: no source description applies")
        desc, root = found
        registry = registry or default_registry()
        for folder in _scene_folders(root, desc):
            for unit, pairs in _scene_units(folder, desc, root):
                yield from self._unit_scenes(desc, root, folder, unit, pairs, registry)

    def _unit_scenes(
        self,
        desc: dict[str, Any],
        root: Path,
        folder: Path,
        unit: str | None,
        pairs: list[tuple[dict[str, Any], Path]],
        registry: Registry,
    ) -> Iterator[Scene]:
        """The scenes of one place: all its files, grouped by date."""
        tolerance = timedelta(days=float(desc.get("pair_tolerance_days", 16)))
        dated_raw: dict[tuple[str, datetime], list[Layer]] = {}
        timeless: list[Layer] = []
        files = _Files()
        min_valid: dict[str, float] = {}
        for spec, f in pairs:
            if "min_valid" in spec:
                min_valid[spec["modality"]] = float(spec["min_valid"])
            for date, layer in _read_file_layers(f, spec, registry, files, root):
                if date is None:
                    timeless.append(layer)
                else:
                    dated_raw.setdefault((layer.modality, date), []).append(layer)
        dated: dict[str, list[tuple[datetime, list[Layer]]]] = {}
        for (mod, date), layers in sorted(dated_raw.items(), key=lambda x: x[0][1]):
            dated.setdefault(mod, []).append((date, layers))
        seen: dict[str, int] = {}
        stem = str(desc["name"]) + (f":{folder.name}" if folder != root else "")
        if unit is not None:
            stem += f":{unit}"
        for date, layers in _assemble(dated, timeless, desc.get("anchor"), tolerance):
            layers = stack_layers(layers)
            grid = reference_grid(layers, registry, desc.get("reference"))
            scene_id = f"{stem}:{date:%Y-%m-%d}" if date else stem
            seen[scene_id] = seen.get(scene_id, 0) + 1
            if seen[scene_id] > 1:
                scene_id += f"#{seen[scene_id]}"
            yield Scene(
                scene_id=scene_id,
                source=str(desc["name"]),
                licence=str(desc["licence"]),
                grid=grid,
                layers=layers,
                time=date,
                min_valid=min_valid,
            )
