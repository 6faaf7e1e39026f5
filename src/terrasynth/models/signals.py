"""Batches in model space: the clean signal x0 of each modality and where it is known.

Continuous rasters are the store-normalised values; categorical rasters become K one-hot
planes scaled to [-1, 1] (so they can be noised like any other signal, and a generated map
is the argmax of predicted class probabilities); image-level labels are multi-hot vectors in
[-1, 1]; location is a unit vector on the sphere; time is day-of-year as sine/cosine plus a
scaled year. ``model_inputs`` mixes clean and noisy signals into what the model sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from terrasynth.models.config import ModelConfig
from terrasynth.models.scene_model import ModalityInput

DAYS_PER_YEAR = 365.2425
YEAR_ZERO = 2018.0  # time's year feature is (year - 2018) / 5


@dataclass
class Signal:
    """Clean signal of one modality for a batch and the mask of what is known.

    ``groups`` / ``vector``: x0. ``known``: same shapes, 1 where a value is real (valid
    pixel, available band). ``target``: class index per pixel for categorical groups (-1
    where unknown). ``present``: (B,) the sample holds the modality at all.
    """

    present: torch.Tensor
    groups: dict[str, torch.Tensor] | None = None
    known: dict[str, torch.Tensor] | torch.Tensor | None = None
    target: dict[str, torch.Tensor] | None = None
    vector: torch.Tensor | None = None


def location_vector(lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
    la, lo = torch.deg2rad(lat), torch.deg2rad(lon)
    return torch.stack([la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()], -1)


def location_from_vector(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return torch.rad2deg(torch.asin(v[..., 2].clamp(-1, 1))), torch.rad2deg(
        torch.atan2(v[..., 1], v[..., 0])
    )


def time_vector(days: torch.Tensor) -> torch.Tensor:
    """Days since 1970 -> (sin doy, cos doy, (year - 2018) / 5); NaN stays NaN."""
    years = 1970.0 + days / DAYS_PER_YEAR
    phase = 2 * math.pi * (years - torch.floor(years))
    return torch.stack([phase.sin(), phase.cos(), (years - YEAR_ZERO) / 5.0], -1)


def time_from_vector(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`time_vector` (days since 1970)."""
    frac = torch.remainder(torch.atan2(v[..., 0], v[..., 1]) / (2 * math.pi), 1.0)
    year = torch.round(v[..., 2] * 5.0 + YEAR_ZERO - frac)
    return (year + frac - 1970.0) * DAYS_PER_YEAR


def batch_signals(batch: dict, config: ModelConfig, order: list[str]) -> dict[str, Signal]:
    """Model-space signals of a collated :class:`~terrasynth.data.dataset.ChipDataset` batch.

    ``order``: the dataset's modality order (the columns of ``batch["available"]``).
    Modalities of the model that the batch lacks are left out.
    """
    out: dict[str, Signal] = {}
    for mod in config.raster_modalities():
        if f"{mod.name}/{mod.groups[0].name}" not in batch:
            continue
        present = _present(batch, order, mod.name)
        bands = batch[f"{mod.name}/bands"].bool()
        groups, known, target = {}, {}, {}
        offset = 0
        for g in mod.groups:
            x = batch[f"{mod.name}/{g.name}"]
            valid = batch[f"{mod.name}/{g.name}/valid"].bool() & present[:, None, None]
            if mod.kind == "categorical":
                cls = x.long()
                ok = valid & (cls >= 0)
                onehot = torch.nn.functional.one_hot(cls.clamp_min(0), mod.num_classes)
                x0 = (onehot.permute(0, 3, 1, 2).float() * 2 - 1) * ok[:, None]
                groups[g.name] = x0
                known[g.name] = ok[:, None].expand_as(x0).float()
                target[g.name] = torch.where(ok, cls, torch.full_like(cls, -1))
            else:
                n = len(g.bands)
                band_ok = bands[:, offset : offset + n]
                k = (valid[:, None] & band_ok[:, :, None, None]).float()
                groups[g.name] = x.float() * k
                known[g.name] = k
            offset += len(g.bands)
        out[mod.name] = Signal(present, groups=groups, known=known, target=target or None)
    for name, size in config.vector_modalities().items():
        if name == "location":
            v = location_vector(batch["location"][:, 0], batch["location"][:, 1])
            present = torch.isfinite(v).all(-1)
        elif name == "time":
            v = time_vector(batch["time"][:, 0])
            present = torch.isfinite(v).all(-1)
        else:
            if f"{name}/labels" not in batch:
                continue
            present = _present(batch, order, name)
            v = batch[f"{name}/labels"].float() * 2 - 1
        v = torch.nan_to_num(v) * present[:, None]
        known = present[:, None].expand(-1, size).float()
        out[name] = Signal(present, vector=v, known=known)
    return out


def _present(batch: dict, order: list[str], name: str) -> torch.Tensor:
    return batch["available"][:, order.index(name)].bool()


def model_inputs(
    signals: dict[str, Signal],
    t: dict[str, torch.Tensor],
    given: dict[str, dict[str, torch.Tensor] | torch.Tensor],
    take_part: dict[str, torch.Tensor],
    noise: dict[str, dict[str, torch.Tensor] | torch.Tensor],
) -> dict[str, ModalityInput]:
    """Mix signals into model inputs.

    Per modality: ``t`` (B,) noise level, ``given`` the element mask of values shown clean
    (a conditioned modality: all known values; band infilling: the given bands),
    ``take_part`` (B,) whether it is in the sequence, ``noise`` a standard-normal draw of the
    signal's shape. Noisy part: ``(1 - t) x0 + t noise``.
    """
    out = {}
    for name, sig in signals.items():
        tt = t[name]
        if sig.groups is not None:
            groups = {}
            for g, x0 in sig.groups.items():
                s = tt[:, None, None, None]
                xt = (1 - s) * x0 + s * noise[name][g]
                gv = given[name][g]
                groups[g] = torch.cat([xt, x0 * gv, gv], 1)
            out[name] = ModalityInput(tt, take_part[name], groups=groups)
        else:
            s = tt[:, None]
            xt = (1 - s) * sig.vector + s * noise[name]
            gv = given[name]
            out[name] = ModalityInput(
                tt, take_part[name], vector=torch.cat([xt, sig.vector * gv, gv], 1)
            )
    return out
