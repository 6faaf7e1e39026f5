"""Baselines behind the predictor interface of ``terrasynth.evaluation.benchmark``.

* ``mean``: the per-band training mean (continuous) or the training majority class
  (categorical); every sample is the same.
* ``knn``: retrieval. Training chips that hold the target and the same conditions are
  described by the per-band mean and standard deviation of their conditioning modalities
  (centre tile, normalised units); the N nearest (Euclidean) give their target as the N
  samples. A real image, so sharp, but from elsewhere.
* ``unet``: a deterministic any-to-any U-Net (``terrasynth.evaluation.unet``) trained on the
  model's training data with the model's wall-clock budget; every sample is its one
  prediction (continuous: normalised values; categorical: softmax probabilities).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from terrasynth.data.dataset import ChipDataset
from terrasynth.errors import TerrasynthError
from terrasynth.models.config import ModelConfig
from terrasynth.models.signals import Signal


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


def _features(sig_groups: dict[str, torch.Tensor], known: dict[str, torch.Tensor]) -> np.ndarray:
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
        size = self.config.image_size
        feats, targets = [], []
        for i in pick:
            sample = ds[int(i)]
            batch = {k: (v[None] if torch.is_tensor(v) else v) for k, v in sample.items()}
            centre = tiles(batch, size, ds.chip_size)
            tile = centre[len(centre) // 2]
            sig = batch_signals(tile, self.config, ds.modalities)
            feats.append(np.concatenate([_features(sig[c].groups, sig[c].known)[0] for c in conds]))
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
            [_features(signals[c].groups, signals[c].known) for c in present], 1
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


class UNetBaseline:
    name = "unet"

    def __init__(self, config: ModelConfig, path: str | Path) -> None:
        from terrasynth.evaluation.unet import UNet, stats_mismatch

        self.config = config
        self.net = UNet.from_pretrained(path)
        differ = stats_mismatch(self.net.config, config.stats)
        self.warnings = (
            [
                f"the U-Net in {path} was trained with other normalisation statistics than "
                f"the evaluated model's for {', '.join(differ)}"
            ]
            if differ
            else []
        )

    @torch.inference_mode()
    def sample(self, signals, tile, target, conditions, num_samples, generator):
        if target not in self.net.modality_names:
            raise TerrasynthError(f"the U-Net was not trained to predict '{target}'")
        given = {
            m: signals[m].present.bool()
            for m in conditions
            if m != target and m in signals and m in self.net.modality_names
        }
        pred = self.net.predict(signals, given)[target]
        categorical = signals[target].target is not None
        out = {}
        for g, v in pred.items():
            v = v.softmax(1) if categorical else v
            out[g] = np.repeat(v.float().numpy()[None], num_samples, 0)
        return out


BASELINES = {"mean": MeanBaseline, "knn": KNNBaseline, "unet": UNetBaseline}


def make_baseline(
    name: str, config: ModelConfig, store: str | Path, unet: str | Path | None = None
) -> MeanBaseline | KNNBaseline | UNetBaseline:
    """A baseline by name with what it needs: ``knn`` the store's training split, ``unet``
    the folder of a trained U-Net."""
    if name not in BASELINES:
        raise TerrasynthError(f"unknown baseline '{name}' (baselines: {', '.join(BASELINES)})")
    if name == "knn":
        return KNNBaseline(config, str(store))
    if name == "unet":
        if unet is None:
            raise TerrasynthError(
                "--baseline unet needs --unet FOLDER (train one with "
                "`terrasynth baseline train-unet`)"
            )
        return UNetBaseline(config, unet)
    return BASELINES[name](config)
