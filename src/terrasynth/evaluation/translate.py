"""Predict each modality from the others on a split, against the simplest baselines.

For every raster modality of the model, on the chips of ``split`` that hold it together with
at least one other raster or label modality, the modality is generated from all the others
(plus location and time) and compared, in physical units, with

* continuous: the per-band training mean (the store's statistics): MAE of the mean of
  ``samples`` samples (one sample of a calibrated generator is as far from the truth as its
  spread says, so a single sample's MAE measures the spread as much as the prediction);
* categorical: the training majority class: accuracy of the first sample's classes.

Chips are cut into non-overlapping tiles of the model's training size, so every pixel of a
chip is predicted once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from terrasynth.data.dataset import ChipDataset, collate_chips, is_raster_key
from terrasynth.data.stats import denormalise
from terrasynth.models.base import GenerativeModel, sampling_steps
from terrasynth.models.signals import batch_signals
from terrasynth.sampling.conditional import generate
from terrasynth.sampling.flow import FlowSampler


@dataclass
class Row:
    modality: str
    kind: str
    chips: int
    metric: str  # "MAE" (lower is better) or "accuracy" (higher is better)
    model: float
    baseline: float
    units: str

    @property
    def better(self) -> bool:
        return self.model < self.baseline if self.metric == "MAE" else self.model > self.baseline


def tile_offsets(size: int, chip_size: int) -> list[tuple[int, int]]:
    """(row, col) in chip pixels of the tiles :func:`tiles` cuts, in its order."""
    size = min(size, chip_size)
    starts = range(0, chip_size - size + 1, size)
    return [(r, c) for r in starts for c in starts]


def tiles(batch: dict, size: int, chip_size: int) -> list[dict]:
    """Split a collated batch of chips into batches of non-overlapping ``size`` tiles (the
    whole chips when ``size`` is larger), at :func:`tile_offsets`."""
    size = min(size, chip_size)
    return [crop(batch, r, c, size, chip_size) for r, c in tile_offsets(size, chip_size)]


def crop(batch: dict, row: int, col: int, size: int, chip_size: int) -> dict:
    """The ``size`` px window at (``row``, ``col``) of every chip of a collated batch, each
    band group cut on its own grid (the offsets multiples of its factor)."""
    out = {}
    for k, v in batch.items():
        if is_raster_key(k, v):
            f = chip_size // v.shape[-1]
            out[k] = v[..., row // f : (row + size) // f, col // f : (col + size) // f]
        else:
            out[k] = v
    return out


def _denorm(x: torch.Tensor, stats: dict, bands: tuple[str, ...], transform: str) -> torch.Tensor:
    return torch.from_numpy(denormalise(x.numpy(), stats, bands, transform))


@torch.no_grad()
def evaluate_translation(
    model: GenerativeModel,
    store: str,
    split: str = "test",
    steps: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    max_chips: int | None = None,
    samples: int = 1,
) -> list[Row]:
    """The table of model vs baseline per modality (see the module docstring)."""
    model.eval()
    cfg = model.config
    ds = ChipDataset(store, split=split)
    reg = cfg.registry
    stats = cfg.stats
    order = ds.modalities
    rasters = [m.name for m in cfg.raster_modalities() if m.name in order]
    others = [m for m in order if m in cfg.modalities and reg[m].kind != "scalar"]
    gen = torch.Generator().manual_seed(seed)
    sampler = FlowSampler(steps=sampling_steps(model, steps))
    rows = []
    has = np.stack([ds.store.available(m)[ds.indices] for m in order], 1)
    for target in rasters:
        ti = order.index(target)
        partners = [order.index(m) for m in others if m != target]
        pick = np.flatnonzero(has[:, ti] & has[:, partners].any(1)) if partners else []
        if max_chips is not None:
            pick = pick[:max_chips]
        if len(pick) == 0:
            continue
        mod = reg[target]
        sub = torch.utils.data.Subset(ds, pick.tolist())
        loader = DataLoader(sub, batch_size=batch_size, collate_fn=collate_chips)
        err_m = err_b = n = 0.0
        for batch in loader:
            for tile in tiles(batch, cfg.window_size, ds.chip_size):
                sig = batch_signals(tile, cfg, order)
                conds = [m for m in sig if m != target]
                outs = [
                    generate(model, sig, [target], conds, tile["gsd"], sampler, gen)
                    for _ in range(samples if mod.kind != "categorical" else 1)
                ]
                out = outs[0]
                s = sig[target]
                if mod.kind == "categorical":
                    counts = np.asarray(stats[target]["class_counts"])
                    majority = int(counts.argmax())
                    for g, probs in out[target].probs.items():
                        tgt = s.target[g]
                        ok = tgt >= 0
                        err_m += float((probs.argmax(1) == tgt)[ok].sum())
                        err_b += float((tgt == majority)[ok].sum())
                        n += float(ok.sum())
                else:
                    for g in mod.groups:
                        known = s.known[g.name] > 0
                        pred = sum(
                            _denorm(o[target].groups[g.name], stats[target], g.bands, mod.transform)
                            for o in outs
                        ) / len(outs)
                        true = _denorm(s.groups[g.name], stats[target], g.bands, mod.transform)
                        base = _denorm(
                            torch.zeros_like(true), stats[target], g.bands, mod.transform
                        )
                        err_m += float((pred - true).abs()[known].sum())
                        err_b += float((base - true).abs()[known].sum())
                        n += float(known.sum())
        if n == 0:
            continue
        metric = "accuracy" if mod.kind == "categorical" else "MAE"
        rows.append(Row(target, mod.kind, len(pick), metric, err_m / n, err_b / n, mod.units))
    return rows


def format_table(rows: list[Row], baseline: str = "training mean / majority") -> str:
    lines = [
        f"| modality | chips | metric | model | {baseline} | units | better |",
        "|---|---:|---|---:|---:|---|:---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.modality} | {r.chips} | {r.metric} | {r.model:.4g} | "
            f"{r.baseline:.4g} | {r.units} | {'yes' if r.better else 'NO'} |"
        )
    return "\n".join(lines)
