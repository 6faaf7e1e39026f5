"""Baselines behind the predictor interface of ``terrasynth.evaluation.benchmark``.

* ``mean``: the per-band training mean (continuous) or the training majority class
  (categorical); every sample is the same.
* ``knn``: retrieval. Training chips that hold the target and the same conditions are
  described by the per-band mean and standard deviation of their conditioning modalities
  (centre tile, normalised units); the N nearest (Euclidean) give their target as the N
  samples. A real image, so sharp, but from elsewhere.
* ``unet``: a deterministic any-to-any U-Net (``terrasynth.models.unet``, backbone
  ``"unet"``) trained by the model's trainer on the model's training data with the model's
  wall-clock budget, loaded with ``terrasynth.models.factory.load_model`` and called through
  the model protocol; every sample is its one prediction (continuous: normalised values;
  categorical: softmax probabilities).
* ``unet_noise``: the U-Net's prediction plus independent Gaussian noise per pixel, with a
  per-band standard deviation fitted on the store's validation split: the root mean square
  residual of the U-Net, per direction (target and conditions), over the known pixels of
  up to 256 validation chips. The simplest probabilistic version of the U-Net: calibrated
  in its spread, but with the texture of white noise. Land cover: as ``unet``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from terrasynth.data.dataset import ChipDataset
from terrasynth.data.stats import band_moments
from terrasynth.errors import TerrasynthError
from terrasynth.models.base import GenerativeModel
from terrasynth.models.config import ModelConfig
from terrasynth.models.signals import Signal
from terrasynth.sampling.conditional import predict, x0_from_prediction


class MeanBaseline:
    name = "mean"

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def sample(self, signals, tile, target, conditions, num_samples, generator):
        sig = signals[target]
        out = {}
        for g, x in sig.groups.items():
            if sig.target is not None:
                counts = np.asarray(self.config.stats[target]["class_counts"])
                probs = np.zeros(x.shape, np.float32)
                probs[:, int(counts.argmax())] = 1.0
                out[g] = np.repeat(probs[None], num_samples, 0)
            else:
                out[g] = np.zeros((num_samples, *x.shape), np.float32)
        return out


def band_statistics(
    sig_groups: dict[str, torch.Tensor], known: dict[str, torch.Tensor]
) -> np.ndarray:
    """Per-band mean and std of one modality over its known pixels: (B, 2C)."""
    feats = []
    for g, x in sig_groups.items():
        k = known[g]
        n = k.flatten(2).sum(-1).clamp_min(1)
        mean = (x * k).flatten(2).sum(-1) / n
        var = ((x - mean[..., None, None]) ** 2 * k).flatten(2).sum(-1) / n
        feats += [mean, var.sqrt()]
    return torch.cat(feats, 1).numpy()


class KNNBaseline:
    name = "knn"

    def __init__(self, config: ModelConfig, store: str, max_train: int = 3000) -> None:
        self.config = config
        self.train = ChipDataset(store, split="train")
        self.max_train = max_train
        self._index: dict[tuple, tuple[np.ndarray, list[dict]]] = {}

    def _build(self, target: str, conds: tuple[str, ...]):
        from terrasynth.evaluation.translate import tiles
        from terrasynth.models.signals import batch_signals

        ds = self.train
        has = {m: ds.store.available(m)[ds.indices] for m in ds.modalities}
        ok = has[target].copy()
        for c in conds:
            ok &= has[c]
        pick = np.flatnonzero(ok)[: self.max_train]
        size = self.config.window_size
        feats, targets = [], []
        for i in pick:
            sample = ds[int(i)]
            batch = {k: (v[None] if torch.is_tensor(v) else v) for k, v in sample.items()}
            centre = tiles(batch, size, ds.chip_size)
            tile = centre[len(centre) // 2]
            sig = batch_signals(tile, self.config, ds.modalities)
            feats.append(
                np.concatenate([band_statistics(sig[c].groups, sig[c].known)[0] for c in conds])
            )
            t = sig[target]
            targets.append({g: (v[0], t.known[g][0]) for g, v in t.groups.items()})
        self._index[(target, conds)] = (np.stack(feats) if feats else np.zeros((0, 1)), targets)

    def sample(self, signals, tile, target, conditions, num_samples, generator):
        rasters = tuple(c for c in conditions if signals[c].groups is not None)
        present = tuple(c for c in rasters if bool(signals[c].present.all()))
        key = (target, present)
        if key not in self._index:
            self._build(target, present)
        feats, targets = self._index[key]
        sig: Signal = signals[target]
        b = next(iter(sig.groups.values())).shape[0]
        out = {g: np.zeros((num_samples, *v.shape), np.float32) for g, v in sig.groups.items()}
        if not targets:
            return out
        query = np.concatenate(
            [band_statistics(signals[c].groups, signals[c].known) for c in present], 1
        ) if present else np.zeros((b, 1))  # fmt: skip
        for k in range(b):
            d = np.linalg.norm(feats - query[k], axis=1) if present else np.zeros(len(targets))
            nearest = np.argsort(d, kind="stable")[:num_samples]
            for s in range(num_samples):
                chip = targets[nearest[s % len(nearest)]]
                for g, (x, _) in chip.items():
                    if sig.target is not None:  # categorical: one-hot in [-1, 1] -> probs
                        out[g][s, k] = ((x.numpy() + 1) / 2).astype(np.float32)
                    else:
                        out[g][s, k] = x.numpy()
        return out


def stats_mismatch(config: ModelConfig, stats: dict) -> list[str]:
    """Continuous modalities whose normalisation differs between ``config`` and ``stats``
    (values are normalised with one and read back with the other)."""
    reg = config.registry
    out = []
    for name in config.modalities:
        mod = reg[name]
        if mod.kind != "continuous" or name not in stats:
            continue
        a = band_moments(config.stats.get(name, {}), mod.bands)
        b = band_moments(stats[name], mod.bands)
        if not all(np.allclose(x, y, rtol=1e-3, atol=1e-6) for x, y in zip(a, b, strict=True)):
            out.append(name)
    return out


def load_unet(path: str | Path) -> GenerativeModel:
    """The model of a U-Net run or model folder (``baseline train-unet``), in eval mode."""
    from terrasynth.models.factory import load_model, model_folder

    try:
        folder = model_folder(path)
    except TerrasynthError:
        raise TerrasynthError(
            f"{path}: not a U-Net folder (train one with `terrasynth baseline train-unet`)"
        ) from None
    return load_model(folder).eval()


class UNetBaseline:
    """A deterministic model (the U-Net) as a predictor: its one prediction, N times."""

    name = "unet"

    def __init__(self, config: ModelConfig, path: str | Path) -> None:
        self.config = config
        self.model: GenerativeModel = load_unet(path)
        differ = stats_mismatch(self.model.config, config.stats)
        self.warnings = (
            [
                f"the U-Net in {path} was trained with other normalisation statistics than "
                f"the evaluated model's for {', '.join(differ)}"
            ]
            if differ
            else []
        )

    @property
    def modality_names(self) -> list[str]:
        return list(self.model.modality_names)

    @torch.inference_mode()
    def predict(
        self, signals: dict[str, Signal], target: str, conditions, gsd: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The model's x0 of ``target`` given ``conditions`` (clean, where known), per group:
        normalised values (continuous) or class probabilities (categorical)."""
        if target not in self.modality_names:
            raise TerrasynthError(f"the U-Net was not trained to predict '{target}'")
        conds = [c for c in conditions if c != target and c in signals]
        sigs = {n: signals[n] for n in [target, *conds]}
        sig = sigs[target]
        x = {target: {g: torch.zeros_like(v) for g, v in sig.groups.items()}}
        pred = predict(self.model, sigs, [target], x, 1.0, gsd, None, True)[target]
        x0, probs = x0_from_prediction(sig, pred)
        return probs if probs is not None else x0

    def sample(self, signals, tile, target, conditions, num_samples, generator):
        pred = self.predict(signals, target, conditions, tile["gsd"])
        return {g: np.repeat(v.float().numpy()[None], num_samples, 0) for g, v in pred.items()}


class UNetNoiseBaseline(UNetBaseline):
    """The U-Net plus Gaussian noise of its validation residual (module docstring).

    The standard deviations are fitted once per direction, when the baseline first meets it
    (:meth:`fit`), and kept in :attr:`fits` (the report's settings list them)."""

    name = "unet_noise"

    def __init__(
        self,
        config: ModelConfig,
        path: str | Path,
        store: str | Path,
        max_chips: int = 256,
        batch_size: int = 16,
    ) -> None:
        super().__init__(config, path)
        self.store = str(store)
        self.max_chips = max_chips
        self.batch_size = batch_size
        self.fits: dict[tuple[str, tuple[str, ...]], dict] = {}

    def _key(self, target: str, conditions) -> tuple[str, tuple[str, ...]]:
        names = self.modality_names
        return target, tuple(sorted({c for c in conditions if c != target and c in names}))

    @torch.inference_mode()
    def fit(self, target: str, conditions) -> dict:
        """Per band of ``target``: the root mean square residual of the U-Net given
        ``conditions`` (those of them each chip holds), in normalised units, over the known
        pixels of the validation chips that hold the target and any condition (the training
        split's when the validation split has none; 1, the training spread, for bands seen
        on no chip)."""
        from terrasynth.data.dataset import collate_chips
        from terrasynth.evaluation.translate import tiles
        from terrasynth.models.signals import batch_signals

        key = self._key(target, conditions)
        if key in self.fits:
            return self.fits[key]
        if target not in self.modality_names:
            raise TerrasynthError(f"the U-Net was not trained to predict '{target}'")
        mod = self.config.registry[target]
        conds = key[1]
        pick, ds, used = np.zeros(0, int), None, None
        for split in ("val", "train"):
            here = ChipDataset(self.store, split=split)
            if target not in here.modalities or len(here) == 0:
                continue
            has = {m: here.store.available(m)[here.indices] for m in here.modalities}
            ok = has[target] & np.logical_or.reduce(
                [has[c] for c in conds if c in has] or [np.zeros(len(here), bool)]
            )
            if ok.any():
                pick, ds, used = np.flatnonzero(ok), here, split
                break
        if len(pick) > self.max_chips:  # spread over the split, not its first source
            pick = pick[np.linspace(0, len(pick) - 1, self.max_chips).astype(int)]
        sq = {g.name: np.zeros(len(g.bands)) for g in mod.groups}
        cnt = {g.name: np.zeros(len(g.bands)) for g in mod.groups}
        for start in range(0, len(pick), self.batch_size):
            batch = collate_chips([ds[int(i)] for i in pick[start : start + self.batch_size]])
            for tile in tiles(batch, self.config.window_size, ds.chip_size):
                sig = batch_signals(tile, self.config, ds.modalities)
                given = [c for c in conds if c in sig]
                if target not in sig or not given:
                    continue
                pred = self.predict(sig, target, given, tile["gsd"])
                t = sig[target]
                for g in mod.groups:
                    k = t.known[g.name] * t.present[:, None, None, None]
                    err = (pred[g.name].float() - t.groups[g.name]) ** 2 * k
                    sq[g.name] += err.sum((0, 2, 3)).double().numpy()
                    cnt[g.name] += k.sum((0, 2, 3)).double().numpy()
        sigma = {}
        for g in mod.groups:
            with np.errstate(invalid="ignore", divide="ignore"):
                sigma[g.name] = np.where(cnt[g.name] > 0, np.sqrt(sq[g.name] / cnt[g.name]), 1.0)
        bands = [b for g in mod.groups for b in g.bands]
        flat = np.concatenate([sigma[g.name] for g in mod.groups])
        _, std = band_moments(self.config.stats.get(target, {}), tuple(bands))
        self.fits[key] = {
            "target": target,
            "conditions": list(conds),
            "split": used,
            "chips": int(len(pick)),
            "pixels": {
                b: int(n) for b, n in zip(bands, np.concatenate(list(cnt.values())), strict=True)
            },
            "sigma": {b: float(v) for b, v in zip(bands, flat, strict=True)},
            "sigma_physical": (
                {b: float(v * w) for b, v, w in zip(bands, flat, std, strict=True)}
                if mod.transform == "none"
                else None
            ),
            "groups": sigma,
        }
        return self.fits[key]

    def sample(self, signals, tile, target, conditions, num_samples, generator):
        out = super().sample(signals, tile, target, conditions, num_samples, generator)
        if signals[target].target is not None:  # land cover: the U-Net's probabilities
            return out
        sigma = self.fit(target, conditions)["groups"]
        for g, v in out.items():
            noise = torch.randn(v.shape, generator=generator).numpy()
            out[g] = (v + noise * sigma[g][None, None, :, None, None]).astype(np.float32)
        return out

    def fitted(self) -> list[dict]:
        """The fitted standard deviations, one entry per direction (JSON-ready)."""
        return [{k: v for k, v in f.items() if k != "groups"} for f in self.fits.values()]


BASELINES = {
    "mean": MeanBaseline,
    "knn": KNNBaseline,
    "unet": UNetBaseline,
    "unet_noise": UNetNoiseBaseline,
}


def make_baseline(
    name: str, config: ModelConfig, store: str | Path, unet: str | Path | None = None
) -> MeanBaseline | KNNBaseline | UNetBaseline:
    """A baseline by name with what it needs: ``knn`` the store's training split, ``unet``
    the folder of a trained U-Net, ``unet_noise`` that folder and the store's validation
    split."""
    if name not in BASELINES:
        raise TerrasynthError(f"unknown baseline '{name}' (baselines: {', '.join(BASELINES)})")
    if name == "knn":
        return KNNBaseline(config, str(store))
    if name in ("unet", "unet_noise"):
        if unet is None:
            raise TerrasynthError(
                f"--baseline {name} needs --unet FOLDER (train one with "
                "`terrasynth baseline train-unet`)"
            )
        if name == "unet_noise":
            return UNetNoiseBaseline(config, unet, store)
        return UNetBaseline(config, unet)
    return BASELINES[name](config)
