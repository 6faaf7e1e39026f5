"""Does an input look like its modality? Range checks with a likely cause, before any use.

Two levels, both from the registry entry (and, where given, a store's training statistics):

* **refused**: the median of the valid values lies outside ``value_range`` widened by its
  own width on each side: physically impossible for the modality (metres given as
  reflectance, DN given as NDVI). Raises :class:`InputError`.
* **warned**: less than half of the valid values fall inside ``expected_range`` (or inside
  the training p01..p99 widened by the same width on each side): plausible physics, wrong
  data (8-bit Landsat 7 given as 16-bit Landsat 8); likewise dB values that are nearly
  all non-negative (linear power given as dB). Returns a one-line warning naming the
  modality and the likely cause; ``strict=True`` raises it as an error instead.
"""

from __future__ import annotations

import numpy as np

from terrasynth.data.scene import Layer
from terrasynth.errors import InputError
from terrasynth.modalities import Modality

MAX_SAMPLE = 200_000


def _likely_cause(values: np.ndarray, mod: Modality, lo: float, hi: float) -> str:
    med = float(np.median(values))
    vmax = float(values.max())
    if hi > 1000 and vmax <= 255:
        return "8-bit values given as a 16-bit modality (e.g. Landsat 7 DN as landsat8)?"
    if mod.units == "reflectance" and med > 50:
        return "scaled integers (DN) given as reflectance: missing --scale (e.g. 0.0001)?"
    if hi > 1000 and med < lo / 100:
        return "reflectance or scaled values given as DN?"
    if mod.units == "dB" and float(values.min()) >= 0:
        return "linear power given as dB (convert with 10*log10)?"
    if med < lo:
        return "values lower than this modality's usual range: wrong sensor or scaling?"
    return "values higher than this modality's usual range: wrong sensor or scaling?"


def check_values(
    values: np.ndarray,
    mod: Modality,
    where: str,
    stats: dict | None = None,
    strict: bool = False,
) -> str | None:
    """Check valid values of ``mod``; returns a warning line, or None if they look right."""
    if mod.kind != "continuous" or values.size == 0:
        return None
    if values.size > MAX_SAMPLE:
        values = values[:: values.size // MAX_SAMPLE + 1]
    med = float(np.median(values))
    if mod.value_range is not None:
        lo, hi = mod.value_range
        width = hi - lo
        if med < lo - width or med > hi + width:
            raise InputError(
                f"{where}: {mod.name} values (median {med:.4g}) are far outside its range "
                f"[{lo:g}, {hi:g}] {mod.units}; check the modality, scale and units "
                "(--scale/--offset for your own files)"
            )
    expected = mod.expected_range
    if stats is not None and "p01" in stats:
        width = stats["p99"] - stats["p01"]
        expected = (stats["p01"] - width, stats["p99"] + width)
    if expected is None:
        return None
    lo, hi = expected
    inside = float(np.mean((values >= lo) & (values <= hi)))
    # Backscatter in dB is overwhelmingly negative; all-positive values inside the range are
    # the signature of linear power.
    linear_power = mod.units == "dB" and float(np.mean(values >= 0)) > 0.95
    if inside >= 0.5 and not linear_power:
        return None
    message = (
        f"{where}: {mod.name} values look wrong: {100 * (1 - inside):.0f}% outside the "
        f"expected {lo:.4g}..{hi:.4g} {mod.units} (median {med:.4g}); "
        f"{_likely_cause(values, mod, lo, hi)}"
    )
    if strict:
        raise InputError(message + " (refused with --strict)")
    return message


def check_layer(layer: Layer, mod: Modality, where: str, strict: bool = False) -> str | None:
    """:func:`check_values` on the valid pixels of a layer."""
    return check_values(layer.data[layer.valid_mask()], mod, where, strict=strict)
