"""Post-hoc calibration of a one-step generator's spread, fitted on the validation split.

A model trained with proper scores is calibrated on its training data, but with little
data and few CPU hours its spread can still be off on held-out chips. Per continuous
modality, one factor ``s`` scales the generator's residuals (sample = mean + s residual);
it is chosen on the validation split (never test) to minimise the CRPS of ``all -> modality``
generations, over a log grid of factors, and stored in the model's ``config.json`` as
``spread_scale``. Minimising a proper score is what a calibrated spread does; the spread
to error ratio and the 90 % interval coverage at the chosen factor are reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import track
from torch.utils.data import DataLoader, Subset

from terrasynth.data.dataset import ChipDataset, collate_chips
from terrasynth.evaluation.metrics import interval_coverage
from terrasynth.evaluation.translate import tiles
from terrasynth.models.signals import batch_signals
from terrasynth.sampling.conditional import sampling_inputs
from terrasynth.training.score_objective import fair_crps

FACTORS = np.exp(np.linspace(np.log(0.25), np.log(4.0), 25))


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

    @property
    def best(self) -> int:
        return int(np.argmin(self.crps))

    @property
    def scale(self) -> float:
        return float(FACTORS[self.best])

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
) -> dict[str, ScaleFit]:
    """Fit ``spread_scale`` per continuous raster modality (see the module docstring).

    Units are the store-normalised ones the model works in. Modalities without chips in
    ``split`` are left out (they keep their factor)."""
    cfg = model.config
    saved = dict(cfg.spread_scale)
    cfg.spread_scale = {}  # fit against the raw residuals
    model.eval()
    try:
        ds = ChipDataset(store, split=split)
        order = ds.modalities
        has = np.stack([ds.store.available(m)[ds.indices] for m in order], 1)
        reg = cfg.registry
        rasters = [m for m in cfg.raster_modalities() if m.kind == "continuous" and m.name in order]
        gen = torch.Generator().manual_seed(seed)
        fits: dict[str, ScaleFit] = {}
        for mod in track(rasters, "calibrating", disable=not progress, transient=True):
            ti = order.index(mod.name)
            partners = [order.index(m) for m in order if m != mod.name and reg.get(m) is not None]
            pick = np.flatnonzero(has[:, ti] & has[:, partners].any(1))[:max_chips]
            if len(pick) == 0:
                continue
            fit = fits[mod.name] = ScaleFit(mod.name, len(pick))
            loader = DataLoader(
                Subset(ds, pick.tolist()), batch_size=batch_size, collate_fn=collate_chips
            )
            for chips in loader:
                for batch in tiles(chips, cfg.window_size, ds.chip_size):
                    _fit_batch(model, fit, mod.name, batch, cfg, order, members, gen)
        return fits
    finally:
        cfg.spread_scale = saved


def _fit_batch(model, fit: ScaleFit, name: str, batch: dict, cfg, order, members, gen) -> None:
    """Generate ``name`` on one batch of tiles from all else and accumulate the scores
    (tiles of the model's sampling window, as the benchmark and generation cut them)."""
    sig = batch_signals(batch, cfg, order)
    if name not in sig:
        return
    target = sig[name]
    x = {name: {g: torch.randn(v.shape, generator=gen) for g, v in target.groups.items()}}
    conds = {n: s for n, s in sig.items() if n == name or bool(s.present.any())}
    inputs = sampling_inputs(conds, [name], x, 1.0, batch["gsd"], None, True)
    mean, samples = model(inputs, batch["gsd"], members=members, generator=gen)
    for g, y in target.groups.items():
        known = (target.known[g] > 0).numpy()
        mu = mean[name][g].float()
        res = torch.stack([s[name][g].float() - mu for s in samples])
        _accumulate(fit, mu, res, y, known)


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
