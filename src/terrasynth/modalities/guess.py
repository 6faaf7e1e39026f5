"""Guess which modality a raster file holds, from its band count, data type and values.

A guess is only a suggestion shown to the user (``terrasynth serve`` lets them correct it):
each candidate modality is scored by how many of the file's valid values fall inside the
modality's expected range, how much of that range the values span (values of a few dB fit
inside an elevation range too, but fill a tiny part of it), whether the band count fits,
whether the band descriptions or the file name name the modality's bands, and, for class
maps, whether the codes are the legend's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio

from terrasynth.modalities.registry import Modality, Registry

SAMPLE_SIDE = 512  # the values are read at most this many px per side (overviews if any)


@dataclass(frozen=True)
class RasterSummary:
    """What the guess looks at: header facts and a decimated sample of valid values."""

    name: str  # the file's name as the user gave it (for band names in it)
    count: int
    dtype: str
    descriptions: tuple[str, ...]
    values: tuple[np.ndarray, ...]  # valid values of each band (decimated)


@dataclass(frozen=True)
class Guess:
    """One candidate modality for a file, with the band names it would give the bands."""

    modality: str
    bands: tuple[str, ...]
    score: float
    reason: str


def summarise(path: str | Path, name: str | None = None) -> RasterSummary:
    """Read the header and a decimated sample of ``path`` (valid, finite values only)."""
    path = Path(path)
    with rasterio.open(path) as src:
        scale = max(src.width, src.height) / SAMPLE_SIDE
        shape = (
            max(1, round(src.height / max(scale, 1))),
            max(1, round(src.width / max(scale, 1))),
        )
        data = src.read(out_shape=(src.count, *shape), masked=True)
        values = []
        for band in data:
            v = np.asarray(band.compressed(), dtype=np.float64)
            values.append(v[np.isfinite(v)])
        return RasterSummary(
            name=name or path.name,
            count=src.count,
            dtype=src.dtypes[0],
            descriptions=tuple(d or "" for d in src.descriptions),
            values=tuple(values),
        )


def _name_tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^A-Za-z0-9]+", text.lower()) if t]


def guess_bands(summary: RasterSummary, mod: Modality) -> tuple[tuple[str, ...], bool]:
    """Band names for the file's bands under ``mod``, and whether the file names them
    (band descriptions, else the file name, e.g. ``..._VV.tif``)."""
    by_lower = {b.lower(): b for b in mod.bands}
    named = tuple(by_lower.get((_name_tokens(d) or [""])[0], "") for d in summary.descriptions)
    if all(named) and len(set(named)) == len(named):
        return named, True
    in_name = [by_lower[t] for t in _name_tokens(Path(summary.name).stem) if t in by_lower]
    if len(in_name) == summary.count and len(set(in_name)) == len(in_name):
        return tuple(in_name), True
    return mod.bands[: summary.count], False


def _continuous_score(values: np.ndarray, mod: Modality) -> tuple[float, str]:
    lo, hi = mod.expected_range or mod.value_range or (-math.inf, math.inf)
    inside = float(np.mean((values >= lo) & (values <= hi)))
    p1, p99 = np.percentile(values, [1, 99])
    # the share of the expected range the values span: dB values fill a good part of the
    # backscatter range, a vanishing part of the elevation range
    cover = min(1.0, float(p99 - p1) / (hi - lo)) if math.isfinite(hi - lo) else 0.0
    score = inside * (0.5 + 0.5 * math.sqrt(cover))
    if mod.units == "dB" and float(np.mean(values >= 0)) > 0.95:
        score *= 0.3  # linear power, not dB
    return score, f"{100 * inside:.0f}% of values in {lo:g}..{hi:g} {mod.units}"


def _class_score(values: np.ndarray, mod: Modality, dtype: str) -> tuple[float, str]:
    if not np.all(values == np.round(values)):
        return 0.0, "values are not class codes"
    codes = np.array(
        [e.code for e in mod.legend] + ([mod.nodata] if mod.nodata is not None else [])
    )
    known = float(np.mean(np.isin(values, codes)))
    score = known * (1.0 if np.dtype(dtype).kind in "iu" else 0.8)
    return score, f"{100 * known:.0f}% of values are its class codes"


def guess_modality(
    summary: RasterSummary, registry: Registry, candidates: list[str] | None = None
) -> list[Guess]:
    """Candidate modalities (raster ones of ``candidates``, default all), best first."""
    values = np.concatenate(summary.values) if summary.values else np.zeros(0)
    guesses = []
    for name in candidates or list(registry):
        mod = registry[name]
        if not mod.is_raster or summary.count > len(mod.bands) or values.size == 0:
            continue
        if mod.kind == "categorical":
            score, reason = _class_score(values, mod, summary.dtype)
        else:
            score, reason = _continuous_score(values, mod)
            distinct = np.unique(values[:5000]).size
            if np.dtype(summary.dtype).kind in "iu" and distinct <= 32:
                score *= 0.7  # few integer codes: more likely a class map
        bands, named = guess_bands(summary, mod)
        if named:
            score *= 1.25
            reason += f"; bands named {', '.join(bands)}"
        elif summary.count < len(mod.bands):
            score *= 0.8  # some of its bands, in an order the file does not say
        guesses.append(Guess(name, bands, round(score, 4), reason))
    return sorted(guesses, key=lambda g: -g.score)
