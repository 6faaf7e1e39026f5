"""Post-hoc calibration of a one-step generator's spread, fitted on the validation split.

A model trained with proper scores is calibrated on its training data, but with little
data and few CPU hours its spread can still be off on held-out chips. Per continuous
modality, one factor ``s`` scales the generator's residuals (sample = mean + s residual);
it is chosen on the validation split (never test) to minimise the CRPS of ``all -> modality``
generations, over a log grid of factors, and stored in the model's ``config.json`` as
``spread_scale``. Minimising a proper score is what a calibrated spread does; the spread
to error ratio and the 90 % interval coverage at the chosen factor are reported beside it.

With ``bands``, the residual is first calibrated per spatial scale (``spread_bands``,
``models/filters.py``): per scale band, the factor that makes the members' spread match
the error of their mean at that scale (the power of ``truth - ensemble mean`` equals
``(1 + 1/N)`` times the members' unbiased variance, as it does for a calibrated
ensemble), so samples are as rough as the truth at every scale; the CRPS factor is then
fitted on top of the rescaled residuals.

With ``mean``, the deterministic mean is calibrated before the spread, per band and scale
band too (``mean_bands``): the least-squares factor that maps the mean's scale band onto
the truth's (less what the members' mean adds), clipped to ``MEAN_FACTOR_RANGE``; the
level band keeps its factor of 1. Structure the mean invents on validation (roads drawn as
relief, blotches of colour) shrinks towards none; structure it gets right keeps its factor
near 1; what the shrunk mean no longer explains is error the spread is then fitted to.

A model trained with ``level_correction_bound`` (elevation: the mean head's correction of the
retrieved neighbours' level, bounded by their spread) has that bound refitted first
(:func:`fit_level_bound`): the multiple, over a grid around the current one, whose samples
have the least CRPS on the split's elevation chips, before any other factor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import track
from torch.utils.data import DataLoader, Subset

from terrasynth.data.dataset import ChipDataset, collate_chips
from terrasynth.evaluation.metrics import interval_coverage
from terrasynth.evaluation.translate import tiles
from terrasynth.models.conv_generator import band_rows
from terrasynth.models.filters import NAMES as SCALE_NAMES
from terrasynth.models.filters import rescale_bands, split_bands
from terrasynth.models.signals import batch_signals
from terrasynth.sampling.conditional import sampling_inputs
from terrasynth.training.score_objective import fair_crps

FACTORS = np.exp(np.linspace(np.log(0.25), np.log(4.0), 25))
# multiples of the model's level_correction_bound tried by fit_level_bound
LEVEL_BOUND_MULTIPLES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
BAND_FACTOR_RANGE = (0.05, 10.0)  # a band the residual lacks is not blown up from round-off
MEAN_FACTOR_RANGE = (0.0, 2.0)  # none of the mean's band, up to twice it


@dataclass
class ScaleFit:
    """The fit of one modality: CRPS per factor, the chosen factor and its diagnostics."""

    modality: str
    chips: int
    values: int = 0
    crps: np.ndarray = field(default_factory=lambda: np.zeros(len(FACTORS)))
    spread: np.ndarray = field(default_factory=lambda: np.zeros(len(FACTORS)))
    sq_err: float = 0.0
    inside90: np.ndarray = field(default_factory=lambda: np.zeros(len(FACTORS)))
    # per band, factors per scale band (empty: none) and the spread/error ratios before them
    bands: list[list[float]] = field(default_factory=list)
    band_spread: list[list[float]] = field(default_factory=list)
    # per band, the mean's factors per scale band (empty: none)
    mean_bands: list[list[float]] = field(default_factory=list)

    @property
    def best(self) -> int:
        return int(np.argmin(self.crps))

    @property
    def scale(self) -> float:
        return float(FACTORS[self.best])

    def band_summary(self) -> str:
        """One line: per scale band, the medians over bands of the spread/error ratio before
        calibration and of the factor."""
        before, after = np.median(self.band_spread, 0), np.median(self.bands, 0)
        return "per scale, median over bands (spread/skill before -> factor): " + ", ".join(
            f"{n} {b:.2f} -> {f:.2f}" for n, b, f in zip(SCALE_NAMES, before, after, strict=True)
        )

    def mean_summary(self) -> str:
        """One line: per scale band, the median over bands of the mean's factor."""
        med = np.median(self.mean_bands, 0)
        return "the mean per scale, median over bands: " + ", ".join(
            f"{n} {f:.2f}" for n, f in zip(SCALE_NAMES, med, strict=True)
        )

    def summary(self) -> dict[str, float]:
        n = max(self.values, 1)
        i = self.best
        one = int(np.argmin(np.abs(FACTORS - 1.0)))
        rmse = (self.sq_err / n) ** 0.5
        return {
            "scale": round(self.scale, 4),
            "crps_at_1": float(self.crps[one] / n),
            "crps": float(self.crps[i] / n),
            "spread_skill_at_1": float(self.spread[one] / n / max(rmse, 1e-12)),
            "spread_skill": float(self.spread[i] / n / max(rmse, 1e-12)),
            "coverage_90_at_1": float(self.inside90[one] / n),
            "coverage_90": float(self.inside90[i] / n),
            "chips": self.chips,
        }


@torch.no_grad()
def fit_spread_scale(
    model,
    store: str,
    split: str = "val",
    members: int = 8,
    max_chips: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    bands: bool = True,
    mean: bool = True,
) -> dict[str, ScaleFit]:
    """Fit ``mean_bands`` (unless ``mean`` is false), ``spread_bands`` (unless ``bands``
    is false) and ``spread_scale`` per continuous raster modality (see the module docstring).

    Units are the store-normalised ones the model works in. Modalities without chips in
    ``split`` are left out (they keep their factor)."""
    cfg = model.config
    model.eval()
    with _uncalibrated(cfg):  # fit against the raw mean and residuals
        ds = ChipDataset(store, split=split)
        rasters = [
            m for m in cfg.raster_modalities() if m.kind == "continuous" and m.name in ds.modalities
        ]
        gen = torch.Generator().manual_seed(seed)
        fits: dict[str, ScaleFit] = {}
        for mod in track(rasters, "calibrating", disable=not progress, transient=True):
            pick = _chips_of(ds, mod.name, cfg, max_chips)
            if len(pick) == 0:
                continue
            fit = fits[mod.name] = ScaleFit(mod.name, len(pick))
            windows = _windows_of(model, ds, pick, mod.name, members, batch_size, gen)
            groups = [g.name for g in mod.groups]
            if mean:
                fit.mean_bands = mean_factors(windows, groups)
                if fit.mean_bands:
                    rows = band_rows(mod, fit.mean_bands)
                    windows = [(g, rescale_bands(mu, rows[g]), *rest) for g, mu, *rest in windows]
            if bands:
                fit.bands, fit.band_spread = band_factors(windows, groups)
            per_group = band_rows(mod, fit.bands) if fit.bands else {}
            for group, mu, res, y, known in windows:
                if group in per_group:
                    res = rescale_bands(res.flatten(0, 1), per_group[group]).view(res.shape)
                _accumulate(fit, mu, res, y, known.numpy())
        return fits


@contextmanager
def _uncalibrated(cfg) -> Iterator[None]:
    """``cfg`` without its calibration (spread and mean factors, and the level bound it
    holds), all restored afterwards."""
    saved = (
        dict(cfg.spread_scale),
        dict(cfg.spread_bands),
        dict(cfg.mean_bands),
        cfg.level_correction_bound,
    )
    cfg.spread_scale, cfg.spread_bands, cfg.mean_bands = {}, {}, {}
    try:
        yield
    finally:
        cfg.spread_scale, cfg.spread_bands, cfg.mean_bands, cfg.level_correction_bound = saved


Window = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _chips_of(ds: ChipDataset, name: str, cfg, max_chips: int) -> np.ndarray:
    """Indices (into ``ds``) of up to ``max_chips`` chips holding ``name`` and another of
    the model's modalities."""
    order = ds.modalities
    has = np.stack([ds.store.available(m)[ds.indices] for m in order], 1)
    partners = [order.index(m) for m in order if m != name and cfg.registry.get(m) is not None]
    return np.flatnonzero(has[:, order.index(name)] & has[:, partners].any(1))[:max_chips]


def _windows_of(
    model, ds: ChipDataset, pick: np.ndarray, name: str, members: int, batch_size: int, gen
) -> list[Window]:
    """``name`` generated from all else on the tiles of chips ``pick`` of ``ds``."""
    cfg = model.config
    loader = DataLoader(Subset(ds, pick.tolist()), batch_size=batch_size, collate_fn=collate_chips)
    return [
        w
        for chips in loader
        for batch in tiles(chips, cfg.window_size, ds.chip_size)
        for w in _generate(model, name, batch, cfg, ds.modalities, members, gen)
    ]


@torch.no_grad()
def fit_level_bound(
    model,
    store: str,
    split: str = "val",
    members: int = 8,
    max_chips: int = 64,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[float, float] | None:
    """Per multiple of the model's ``level_correction_bound`` in ``LEVEL_BOUND_MULTIPLES``:
    the mean fair CRPS (normalised units, spread as generated, no calibration) of ``all ->
    elevation`` samples on ``split``'s chips, the same noise for every candidate. None where
    the model has no bound or the split no elevation chip. The config is left as it was;
    the caller sets ``level_correction_bound`` to the best key."""
    cfg = model.config
    trained = float(cfg.level_correction_bound)
    if trained <= 0:
        return None
    model.eval()
    with _uncalibrated(cfg):
        ds = ChipDataset(store, split=split)
        names = [
            m.name
            for m in cfg.raster_modalities()
            if m.kind == "continuous" and m.units == "m" and m.name in ds.modalities
        ]
        picks = {n: p for n in names if len(p := _chips_of(ds, n, cfg, max_chips))}
        if not picks:
            return None
        scores = {}
        for multiple in LEVEL_BOUND_MULTIPLES:
            cfg.level_correction_bound = trained * multiple
            gen = torch.Generator().manual_seed(seed)
            total, count = 0.0, 0
            for name, pick in picks.items():
                for _, mu, res, y, known in _windows_of(
                    model, ds, pick, name, members, batch_size, gen
                ):
                    crps = fair_crps(mu[None] + res, y).numpy()[known.numpy()]
                    total, count = total + float(crps.sum()), count + crps.size
            scores[trained * multiple] = total / max(count, 1)
        return scores


def _generate(model, name: str, batch: dict, cfg, order, members, gen) -> list[Window]:
    """Generate ``name`` on one batch of tiles from all else (tiles of the model's sampling
    window, as the benchmark and generation cut them): per band group, its name, the mean
    (B, C, H, W), the members' residuals (N, B, C, H, W), the truth and its known mask."""
    sig = batch_signals(batch, cfg, order)
    if name not in sig:
        return []
    target = sig[name]
    x = {name: {g: torch.randn(v.shape, generator=gen) for g, v in target.groups.items()}}
    conds = {n: s for n, s in sig.items() if n == name or bool(s.present.any())}
    inputs = sampling_inputs(conds, [name], x, 1.0, batch["gsd"], None, True)
    mean, samples = model(inputs, batch["gsd"], members=members, generator=gen)
    out = []
    for g, y in target.groups.items():
        mu = mean[name][g].float()
        res = torch.stack([s[name][g].float() - mu for s in samples])
        out.append((g, mu, res, y.float(), target.known[g] > 0))
    return out


def _whole(windows: list[Window]):
    """The windows' parts whose truth is known everywhere (a gap would put false edges
    into every scale band), skipping windows with none."""
    for group, mu, res, y, known in windows:
        whole = known.flatten(1).all(1)
        if bool(whole.any()):
            yield group, mu[whole], res[:, whole], y[whole]


def mean_factors(windows: list[Window], groups: list[str]) -> list[list[float]]:
    """Per band (``groups``' bands in order) and scale band: the least-squares factor on
    the mean's band that best gives the truth's band less the members' mean residual
    (clipped to ``MEAN_FACTOR_RANGE``), 1 for the level; an empty list where no window is
    whole."""
    cross: dict[str, np.ndarray] = {}
    power: dict[str, np.ndarray] = {}
    for group, mu, res, y in _whole(windows):
        want = split_bands(y - res.mean(0))
        have = split_bands(mu)
        c = np.stack(
            [
                (h.double() * w.double()).sum((0, 2, 3)).numpy()
                for h, w in zip(have, want, strict=True)
            ],
            1,
        )
        p = np.stack([(h.double() ** 2).sum((0, 2, 3)).numpy() for h in have], 1)
        cross[group] = cross.get(group, 0) + c
        power[group] = power.get(group, 0) + p
    if any(g not in power for g in groups):
        return []
    c = np.concatenate([cross[g] for g in groups])
    p = np.concatenate([power[g] for g in groups])
    factors = np.clip(np.where(p > 1e-12, c / np.maximum(p, 1e-30), 1.0), *MEAN_FACTOR_RANGE)
    # the level is kept: shrinking it pulls the mean towards the training mean, which on
    # the frozen protocol cost S2 -> elevation 54 % more CRPS (docs/design.md, seventh round)
    factors[:, -1] = 1.0
    return factors.tolist()


def band_factors(
    windows: list[Window], groups: list[str]
) -> tuple[list[list[float]], list[list[float]]]:
    """Per band (``groups``' bands in order) and scale band: the factor on the residual that
    makes the members' spread match the error of their mean, and the spread/error ratio
    before it. Only windows whose truth is known everywhere count (a gap would put false
    edges into every band); empty lists where none does."""
    err_power: dict[str, np.ndarray] = {}
    spread_power: dict[str, np.ndarray] = {}
    members = 2
    for group, mu, res, y in _whole(windows):
        members = res.shape[0]
        ens = res.mean(0)
        err = split_bands(y - mu - ens)
        dev = split_bands((res - ens).flatten(0, 1))
        e = np.stack([(b.double() ** 2).sum((0, 2, 3)).numpy() for b in err], 1)
        d = np.stack([(b.double() ** 2).sum((0, 2, 3)).numpy() for b in dev], 1)
        err_power[group] = err_power.get(group, 0) + e
        spread_power[group] = spread_power.get(group, 0) + d / (members - 1)
    if any(g not in err_power for g in groups):
        return [], []
    err = np.concatenate([err_power[g] for g in groups])
    calibrated = (1 + 1 / members) * np.concatenate([spread_power[g] for g in groups])
    ratio = np.sqrt(calibrated / np.maximum(err, 1e-30))
    factors = np.clip(np.sqrt(err / np.maximum(calibrated, 1e-30)), *BAND_FACTOR_RANGE)
    return factors.tolist(), ratio.tolist()


def _accumulate(
    fit: ScaleFit, mu: torch.Tensor, res: torch.Tensor, y: torch.Tensor, known: np.ndarray
) -> None:
    n = int(known.sum())
    if n == 0:
        return
    fit.values += n
    fit.sq_err += float((((mu + res.mean(0)) - y) ** 2).numpy()[known].sum())
    for i, s in enumerate(FACTORS):
        ens = mu[None] + float(s) * res
        fit.crps[i] += float(fair_crps(ens, y).numpy()[known].sum())
        fit.spread[i] += float(ens.std(0, unbiased=True).numpy()[known].sum())
        share = interval_coverage(ens.numpy(), y.numpy(), 0.9, known)
        fit.inside90[i] += share * n
