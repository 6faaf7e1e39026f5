"""The benchmark: generate each direction on a split's chips and score the ensembles.

A *direction* is a target raster modality and the modalities it is generated from: either
all others present on a chip (``all -> s2l2a``) or one other (``s1grd -> s2l2a``). Chips
are cut into tiles of the model's window; every tile that holds the target and the
direction's conditions is generated ``num_samples`` times by a *predictor*: the model, or
a baseline behind the same interface (``terrasynth.evaluation.baselines``). Scores are in
physical units (``terrasynth.evaluation.metrics``) and are averaged over tiles weighted by
their valid pixels; distribution scores pool every tile of a direction. Elevation targets
(``ELEVATION``) get relief, level and slope scores on top (:func:`score_elevation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from terrasynth.data.dataset import ChipDataset, collate_chips
from terrasynth.data.stats import denormalise
from terrasynth.errors import TerrasynthError
from terrasynth.evaluation import metrics as M
from terrasynth.evaluation.translate import tiles
from terrasynth.modalities import Modality
from terrasynth.models.base import GenerativeModel, sampling_steps
from terrasynth.models.config import ModelConfig
from terrasynth.models.signals import Signal, batch_signals
from terrasynth.sampling.conditional import generate
from terrasynth.sampling.flow import FlowSampler


@dataclass(frozen=True)
class Direction:
    target: str
    conditions: tuple[str, ...] | None  # None: every other modality present on the chip

    @property
    def name(self) -> str:
        src = "all" if self.conditions is None else "+".join(self.conditions)
        return f"{src} -> {self.target}"


class Predictor(Protocol):
    """Anything that fills a target from conditions: the model or a baseline."""

    name: str

    def sample(
        self,
        signals: dict[str, Signal],
        tile: dict,
        target: str,
        conditions: list[str],
        num_samples: int,
        generator: torch.Generator,
    ) -> np.ndarray:
        """(N, B, C, h, w): normalised values, or class probabilities for categorical
        targets (C = K)."""
        ...


class ModelPredictor:
    """Any model with a flow sampler: N samples by repeating the batch N times."""

    def __init__(
        self,
        model: GenerativeModel,
        steps: int | None = None,
        eta: float = 0.0,
        name: str = "model",
    ):
        self.model = model.eval()
        self.sampler = FlowSampler(steps=sampling_steps(model, steps), eta=eta)
        self.name = name

    def sample(self, signals, tile, target, conditions, num_samples, generator):
        reps = {n: _repeat(s, num_samples) for n, s in signals.items()}
        gsd = tile["gsd"].repeat(num_samples)
        out = generate(self.model, reps, [target], conditions, gsd, self.sampler, generator)
        res = out[target]
        payload = res.probs if res.probs is not None else res.groups
        b = tile["gsd"].shape[0]
        return {
            g: v.float().reshape(num_samples, b, *v.shape[1:]).numpy() for g, v in payload.items()
        }


def _repeat(sig: Signal, n: int) -> Signal:
    def rep(x):
        if x is None:
            return None
        if isinstance(x, dict):
            return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in x.items()}
        return x.repeat(n, *([1] * (x.dim() - 1)))

    return Signal(
        rep(sig.present), groups=rep(sig.groups), known=rep(sig.known),
        target=rep(sig.target), vector=rep(sig.vector),
    )  # fmt: skip


@dataclass
class DirectionScores:
    """Accumulated scores of one predictor on one direction."""

    direction: Direction
    predictor: str
    kind: str
    tiles: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    real_values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    fake_values: dict[str, list[np.ndarray]] = field(default_factory=dict)
    real_features: list[np.ndarray] = field(default_factory=list)
    fake_features: list[np.ndarray] = field(default_factory=list)
    reliability: list[np.ndarray] = field(default_factory=list)  # continuous: coverage per level
    confidence: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # categorical
    examples: list[dict] = field(default_factory=list)
    chip_ids: list[str] = field(default_factory=list)
    # per band [sum of squared gradients of the samples, their pairs, same of the truth]
    texture: dict[str, np.ndarray] = field(default_factory=dict)
    # per band (2, K): summed radial power spectra of the samples (mean over samples) and
    # of the truth, over the tiles on which the band is fully known
    spectra: dict[str, np.ndarray] = field(default_factory=dict)
    donors: dict[str, str] = field(default_factory=dict)  # shuffle test: chip -> donor chip
    # elevation targets: [sum of the samples' slopes, their pixels, same of the truth]
    slope: np.ndarray | None = None

    def add(self, key: str, value: float, weight: float) -> None:
        if np.isfinite(value):
            self.sums[key] = self.sums.get(key, 0.0) + value * weight
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def summary(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}
        for band in self.real_values:
            real = np.concatenate(self.real_values[band])
            fake = np.concatenate(self.fake_values[band])
            out.setdefault("wasserstein", 0.0)
            out["wasserstein"] += M.band_wasserstein(real, fake) / len(self.real_values)
            out.setdefault("range_coverage", 0.0)
            out["range_coverage"] += M.range_coverage(real, fake) / len(self.real_values)
        if self.texture:
            t = np.stack(list(self.texture.values()))  # (bands, 4)
            out["texture_ratio"] = M.energy_ratio(t[:, 0], t[:, 1], t[:, 2], t[:, 3])
        if self.spectra:
            fake = np.stack([v[0] for v in self.spectra.values()])
            true = np.stack([v[1] for v in self.spectra.values()])
            out["spectrum_ratio"] = M.spectrum_log_ratio(fake, true)
        if self.slope is not None and self.slope[1] > 0 and self.slope[2] > 0:
            s = self.slope
            out["slope_mean_ratio"] = float((s[0] / s[1]) / (s[2] / s[3]))
        # shuffle test: error with another chip's conditions over error with the own ones
        if out.get("crps_shuffled") is not None and out.get("crps", 0) > 0:
            out["input_dependence"] = out["crps_shuffled"] / out["crps"]
        if out.get("accuracy_shuffled") is not None and out.get("accuracy", 1) < 1:
            out["input_dependence"] = (1 - out["accuracy_shuffled"]) / (1 - out["accuracy"])
        if len(self.real_features) > 3 and len(self.fake_features) > 3:
            prc = M.precision_recall_coverage(
                np.stack(self.real_features), np.stack(self.fake_features)
            )
            out.update({f"feature_{k}": v for k, v in prc.items()})
        out["tiles"] = self.tiles
        return out


LEVELS = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
EXAMPLES = 3  # tiles per direction kept for pictures
ELEVATION = ("dem",)  # modalities scored as terrain (metres): relief, level and slope


def physical_tile(
    mod: Modality, group_samples: dict[str, np.ndarray], sig: Signal, stats: dict, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] | None:
    """The k-th tile of a continuous target in physical units on the modality's finest grid:
    truth (C, H, W), samples (N, C, H, W), known (C, H, W) and the band names, for the
    bands the chip holds (None when it holds none)."""
    parts_true, parts_fake, masks = [], [], []
    for g in mod.groups:
        known = sig.known[g.name][k].numpy() > 0  # (C, h, w)
        x = group_samples[g.name][:, k]  # (N, C, h, w) normalised
        true = denormalise(sig.groups[g.name][k].numpy(), stats, g.bands, mod.transform)
        fake = denormalise(x, stats, g.bands, mod.transform)
        factor = g.factor
        if factor > 1:  # compare on the finest grid of the modality
            true = true.repeat(factor, 1).repeat(factor, 2)
            fake = fake.repeat(factor, 2).repeat(factor, 3)
            known = known.repeat(factor, 1).repeat(factor, 2)
        parts_true.append(true)
        parts_fake.append(fake)
        masks.append(known)
    true = np.concatenate(parts_true)
    fake = np.concatenate(parts_fake, 1)
    known = np.concatenate(masks)
    bands = [b for g in mod.groups for b in g.bands]
    keep = known.reshape(len(bands), -1).any(1)  # bands the chip holds
    if not keep.any():
        return None
    kept = [b for b, ok in zip(bands, keep, strict=True) if ok]
    return true[keep], fake[:, keep], known[keep], kept


def score_elevation(
    scores: DirectionScores,
    mod: Modality,
    group_samples: dict[str, np.ndarray],
    sig: Signal,
    stats: dict,
    k: int,
    gsd: float,
) -> None:
    """Slope scores of the k-th tile of an elevation target, per band group on its own
    grid (pixels of ``gsd`` x the group's factor metres; ``gsd``: the tile's metres per
    pixel of the base grid): ``slope_error_median`` weighted by the pixels with a defined
    slope, and the slope sums behind the pooled ``slope_mean_ratio``."""
    for g in mod.groups:
        known = sig.known[g.name][k].numpy() > 0  # (C, h, w)
        if not known.any():
            continue
        true = denormalise(sig.groups[g.name][k].numpy(), stats, g.bands, mod.transform)
        fake = denormalise(group_samples[g.name][:, k], stats, g.bands, mod.transform)
        f, t, ok = M.slopes(fake, true, gsd * g.factor, known)
        n_ok = int(ok.sum())
        if n_ok == 0:
            continue
        scores.add("slope_error_median", M.median_slope_error(f, t, ok), float(n_ok))
        sums = np.array([f[:, ok].sum(), f[:, ok].size, t[ok].sum(), n_ok], np.float64)
        scores.slope = sums if scores.slope is None else scores.slope + sums


def score_tile(
    scores: DirectionScores,
    mod: Modality,
    group_samples: dict[str, np.ndarray],
    sig: Signal,
    stats: dict,
    k: int,
    gsd: float | None = None,
) -> None:
    """Score the k-th tile of a batch: ``group_samples`` (N, B, C, h, w) per group.

    ``gsd``: the tile's metres per pixel of the base grid (``tile["gsd"][k]``), needed for
    the slope scores of elevation targets (left out without it)."""
    if mod.kind == "categorical":
        g = mod.groups[0].name
        probs = group_samples[g][:, k]  # (N, K, h, w)
        truth = sig.target[g][k].numpy()
        n_known = float((truth >= 0).sum())
        if n_known == 0:
            return
        mean_p = probs.mean(0)
        pred = mean_p.argmax(0)
        scores.add("accuracy", M.accuracy(pred, truth), n_known)
        scores.add("miou", M.mean_iou(pred, truth, mod.num_classes), n_known)
        scores.add("ece", M.expected_calibration_error(mean_p, truth), n_known)
        best = max(M.accuracy(p.argmax(0), truth) for p in probs)
        scores.add("accuracy_best_of_n", best, n_known)
        maps = probs.argmax(1)
        pairs = [(i, j) for i in range(len(maps)) for j in range(i)]
        div = np.mean([(maps[i] != maps[j]).mean() for i, j in pairs]) if pairs else 0.0
        scores.add("diversity", float(div), n_known)
        ok = truth >= 0
        scores.confidence.append((mean_p.max(0)[ok], (pred == truth)[ok]))
        scores.tiles += 1
        if len(scores.examples) < EXAMPLES:
            scores.examples.append({"truth": truth, "samples": maps, "kind": "categorical"})
        return
    tile = physical_tile(mod, group_samples, sig, stats, k)
    if tile is None:
        return
    true, fake, known, kept = tile
    n_known = float(known.sum())
    mean = fake.mean(0)
    lo = np.array([stats["bands"].get(b, {}).get("p01", 0.0) for b in kept])
    hi = np.array([stats["bands"].get(b, {}).get("p99", 1.0) for b in kept])
    span = float(np.mean(np.maximum(hi - lo, 1e-9)))
    scores.add("mae", M.mae(mean, true, known), n_known)
    scores.add("rmse", M.rmse(mean, true, known), n_known)
    scores.add("psnr", M.psnr(mean, true, span, known), n_known)
    scores.add("ssim", M.ssim(mean, true, span, known), n_known)
    if len(kept) >= 3:
        scores.add("spectral_angle", M.spectral_angle(mean, true, known), n_known)
        scores.add("sample_spectral_angle", M.sample_spectral_angle(fake, true, known), n_known)
    scores.add("mae_best_of_n", M.best_of_n_mae(fake, true, known), n_known)
    scores.add("crps", M.crps_ensemble(fake, true, known), n_known)
    if len(fake) > 1:
        scores.add("spread_skill", M.spread_skill(fake, true, known), n_known)
        scores.add("coverage_50", M.interval_coverage(fake, true, 0.5, known), n_known)
        scores.add("coverage_90", M.interval_coverage(fake, true, 0.9, known), n_known)
        scores.reliability.append(
            np.array([M.interval_coverage(fake, true, lv, known) for lv in LEVELS])
        )
    scores.add("diversity", M.diversity(fake, known), n_known)
    if mod.name in ELEVATION:  # terrain: relief apart from level, and slope
        scores.add("relief_mae", M.relief_mae(mean, true, known), n_known)
        scores.add("level_mae", M.level_mae(mean, true, known), n_known)
        if gsd is not None:
            score_elevation(scores, mod, group_samples, sig, stats, k, gsd)
    # texture: every sample's own gradients and spectrum, pooled over the direction's tiles
    fake_sum, fake_n = np.sum([M.gradient_energy(s, known) for s in fake], 0)
    energy = np.stack([fake_sum, fake_n, *M.gradient_energy(true, known)], 1)  # (bands, 4)
    for i, b in enumerate(kept):
        scores.texture[b] = scores.texture.get(b, np.zeros(4)) + energy[i]
        if known[i].all():
            p_true = M.radial_power_spectrum(true[i : i + 1])[0]
            p_fake = np.mean([M.radial_power_spectrum(s[i : i + 1])[0] for s in fake], 0)
            prev = scores.spectra.get(b)
            if prev is None:
                scores.spectra[b] = np.stack([p_fake, p_true])
            elif prev.shape[1] == len(p_true):
                prev += np.stack([p_fake, p_true])
    for i, b in enumerate(kept):
        m = known[i]
        scores.real_values.setdefault(b, []).append(true[i][m][::4])
        scores.fake_values.setdefault(b, []).append(fake[0, i][m][::4])
    if known.all():
        scores.real_features.append(M.image_features(true))
        scores.fake_features.append(M.image_features(fake[0]))
    scores.tiles += 1
    if len(scores.examples) < EXAMPLES:
        scores.examples.append(
            {"truth": true, "samples": fake, "bands": kept, "kind": "continuous"}
        )


def score_shuffled_tile(
    scores: DirectionScores,
    mod: Modality,
    group_samples: dict[str, np.ndarray],
    sig: Signal,
    stats: dict,
    k: int,
) -> None:
    """Score the k-th tile generated from another chip's conditions: ``crps_shuffled``
    (continuous) or ``accuracy_shuffled`` (categorical), weighted as in :func:`score_tile`."""
    if mod.kind == "categorical":
        g = mod.groups[0].name
        truth = sig.target[g][k].numpy()
        n_known = float((truth >= 0).sum())
        if n_known:
            pred = group_samples[g][:, k].mean(0).argmax(0)
            scores.add("accuracy_shuffled", M.accuracy(pred, truth), n_known)
        return
    tile = physical_tile(mod, group_samples, sig, stats, k)
    if tile is not None:
        true, fake, known, _ = tile
        scores.add("crps_shuffled", M.crps_ensemble(fake, true, known), float(known.sum()))


def default_directions(ds: ChipDataset, config: ModelConfig, min_tiles_chips: int = 2):
    """``all -> T`` for every raster target with partners, and ``S -> T`` for every pair
    of raster modalities found together on at least ``min_tiles_chips`` chips."""
    order = ds.modalities
    rasters = [m.name for m in config.raster_modalities() if m.name in order]
    has = {m: ds.store.available(m)[ds.indices] for m in order}
    out = []
    for t in rasters:
        partners = [s for s in rasters if s != t and (has[s] & has[t]).sum() >= min_tiles_chips]
        if partners:
            out.append(Direction(t, None))
        out += [Direction(t, (s,)) for s in partners]
    return out


def direction_signals(
    tile: dict, config: ModelConfig, order: list[str], target: str, conds: list[str]
) -> tuple[dict[str, Signal], list[str]]:
    """A tile's signals with the modalities outside the direction marked absent, and the
    conditions the predictor is given (the direction's, then location and time)."""
    sig = batch_signals(tile, config, order)
    conditions = [c for c in conds if c in sig]
    for n in list(sig):
        if n != target and n not in conditions and n not in ("location", "time"):
            sig[n] = Signal(
                torch.zeros_like(sig[n].present), groups=sig[n].groups,
                known=sig[n].known, target=sig[n].target, vector=sig[n].vector,
            )  # fmt: skip
    return sig, conditions + [c for c in ("location", "time") if c in sig]


def donor_chips(scenes: np.ndarray, seed: int) -> np.ndarray:
    """For the shuffle test: a permutation ``donor`` of ``range(len(scenes))`` in which no
    chip is its own donor and, wherever the scene sizes allow it (no scene holds more than
    half the chips), every donor comes from another scene.

    Chips are put in random order grouped by scene, and each takes the chip ``s``
    positions further on (cyclically), ``s`` being the size of the largest scene."""
    n = len(scenes)
    if n < 2:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    names, inverse, counts = np.unique(scenes, return_inverse=True, return_counts=True)
    rank = rng.permutation(len(names))[inverse]  # scenes in random order
    order = np.lexsort((rng.random(n), rank))  # grouped by scene, random within
    shift = min(int(counts.max()), n - 1)
    donor = np.empty(n, dtype=int)
    donor[order] = order[(np.arange(n) + shift) % n]
    return donor


@torch.no_grad()
def run_benchmark(
    predictors: list[Predictor],
    config: ModelConfig,
    store: str,
    directions: list[Direction] | None = None,
    split: str = "test",
    num_samples: int = 4,
    seed: int = 0,
    max_chips: int | None = None,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
    chips: dict[str, list[str]] | None = None,
    shuffle_conditions: bool = False,
) -> list[DirectionScores]:
    """Score every predictor on every direction (see the module docstring).

    ``chips``: a frozen protocol's chip ids per direction name (``Direction.name``); the
    chosen ids are recorded in each result's ``chip_ids`` either way.

    ``shuffle_conditions``: the input-dependence test. After the ordinary pass every chip's
    target is generated again from another chip's conditions (all of them, location and
    time included; donors from :func:`donor_chips`, the same for every predictor), with
    the same seed, and scored as ``crps_shuffled`` (land cover: ``accuracy_shuffled``);
    ``input_dependence`` is the ratio of the two errors. The ordinary scores do not change.
    """
    ds = ChipDataset(store, split=split)
    order = ds.modalities
    reg = config.registry
    directions = directions or default_directions(ds, config)
    has = {m: ds.store.available(m)[ds.indices] for m in order}
    ids = ds.store.table["chip_id"].to_numpy()[ds.indices]
    scenes = ds.store.table["scene_id"].to_numpy()[ds.indices]
    results = []
    for d in directions:
        mod = reg[d.target]
        conds = (
            list(d.conditions)
            if d.conditions
            else [m for m in order if m != d.target and m in config.modalities]
        )
        need = has[d.target] & (
            np.logical_or.reduce([has[c] for c in conds if c in has])
            if d.conditions is None
            else np.logical_and.reduce([has[c] for c in conds])
        )
        pick = np.flatnonzero(need)
        if chips is not None:
            wanted = set(chips.get(d.name, []))
            pick = np.array([i for i in pick if ids[i] in wanted], dtype=int)
            missing = wanted - set(ids[pick])
            if missing:
                raise TerrasynthError(
                    f"{d.name}: {len(missing)} protocol chip(s) not usable in this store's "
                    f"{split} split (e.g. {sorted(missing)[0]})"
                )
        elif max_chips is not None:
            pick = pick[:max_chips]
        if len(pick) == 0:
            continue

        def loader(indices: np.ndarray) -> DataLoader:
            return DataLoader(
                Subset(ds, indices.tolist()), batch_size=batch_size, collate_fn=collate_chips
            )

        donors = pick[donor_chips(scenes[pick], seed)] if shuffle_conditions else None
        for pred in predictors:
            gen = torch.Generator().manual_seed(seed)
            scores = DirectionScores(d, pred.name, mod.kind)
            scores.chip_ids = [str(ids[i]) for i in pick]
            for batch in loader(pick):
                for tile in tiles(batch, config.window_size, ds.chip_size):
                    sig, conditions = direction_signals(tile, config, order, d.target, conds)
                    samples = pred.sample(sig, tile, d.target, conditions, num_samples, gen)
                    for k in range(tile["gsd"].shape[0]):
                        score_tile(
                            scores, mod, samples, sig[d.target], config.stats[d.target], k,
                            gsd=float(tile["gsd"][k]),
                        )  # fmt: skip
            if donors is not None and len(pick) > 1:
                pairs = zip(pick, donors, strict=True)
                scores.donors = {str(ids[i]): str(ids[j]) for i, j in pairs}
                gen = torch.Generator().manual_seed(seed)  # the same noise as above
                for batch, other in zip(loader(pick), loader(donors), strict=True):
                    for tile, dtile in zip(
                        tiles(batch, config.window_size, ds.chip_size),
                        tiles(other, config.window_size, ds.chip_size),
                        strict=True,
                    ):
                        sig, conditions = direction_signals(tile, config, order, d.target, conds)
                        given, _ = direction_signals(dtile, config, order, d.target, conds)
                        mixed = {n: sig[n] if n == d.target else given[n] for n in sig}
                        samples = pred.sample(mixed, tile, d.target, conditions, num_samples, gen)
                        for k in range(tile["gsd"].shape[0]):
                            score_shuffled_tile(
                                scores, mod, samples, sig[d.target], config.stats[d.target], k
                            )
            if progress is not None:
                progress(f"{pred.name}: {d.name} ({scores.tiles} tiles)")
            results.append(scores)
    return results


def protocol_of(results: list[DirectionScores], settings: dict) -> dict:
    """A frozen protocol: the settings and, per direction, the chip ids scored."""
    return {
        "settings": {k: settings[k] for k in ("split", "num_samples", "steps", "eta", "seed")},
        "directions": {r.direction.name: r.chip_ids for r in results},
    }


def parse_direction(name: str) -> Direction:
    """``"all -> s2l2a"`` or ``"s1grd -> s2l2a"`` back to a :class:`Direction`."""
    src, sep, target = name.partition(" -> ")
    if not sep:
        raise TerrasynthError(f"'{name}' is not a direction (SOURCE -> TARGET)")
    return Direction(target.strip(), None if src == "all" else tuple(src.split("+")))
