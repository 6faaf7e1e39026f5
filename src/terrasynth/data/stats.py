"""Normalisation statistics computed from the chips themselves while a store is built.

Per band of each continuous modality: count, mean, standard deviation, min, max and the
1st / 99th percentiles (from a fixed-seed random subsample of valid pixels), after the
modality's value transform. Per categorical modality: class pixel counts. Only training
chips feed the statistics; a modality with no training chip falls back to all chips and
says so (``from_split: all``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from terrasynth.modalities import Modality

SAMPLES_PER_CHIP = 256
RESERVOIR = 100_000


def apply_transform(x: np.ndarray, transform: str) -> np.ndarray:
    """The modality's value transform (``none`` or ``log1p`` of non-negative values)."""
    if transform == "log1p":
        return np.log1p(np.maximum(x, 0.0))
    return x


def band_moments(stats: dict, bands: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Training mean and standard deviation of ``bands`` from a modality's statistics
    (0 and 1 for a band without statistics), as float32 arrays."""
    per_band = stats.get("bands", {})
    mean = np.array([per_band.get(b, {}).get("mean", 0.0) for b in bands], np.float32)
    std = np.array([per_band.get(b, {}).get("std", 1.0) for b in bands], np.float32)
    return mean, std


def normalise(x: np.ndarray, stats: dict, bands: tuple[str, ...], transform: str) -> np.ndarray:
    """Physical values (..., C, H, W) -> model space: transform, then standardise."""
    mean, std = band_moments(stats, bands)
    v = apply_transform(np.asarray(x, np.float32), transform)
    return ((v - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def denormalise(x: np.ndarray, stats: dict, bands: tuple[str, ...], transform: str) -> np.ndarray:
    """Model space (..., C, H, W) -> physical values (inverse of :func:`normalise`)."""
    mean, std = band_moments(stats, bands)
    y = np.asarray(x, np.float32) * std[:, None, None] + mean[:, None, None]
    return np.expm1(y) if transform == "log1p" else y


@dataclass
class _BandAccumulator:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    low: float = np.inf
    high: float = -np.inf
    samples: list[np.ndarray] = field(default_factory=list)
    n_samples: int = 0

    def add(self, values: np.ndarray, rng: np.random.Generator) -> None:
        if values.size == 0:
            return
        v = values.astype(np.float64)
        self.count += v.size
        self.total += float(v.sum())
        self.total_sq += float((v * v).sum())
        self.low = min(self.low, float(v.min()))
        self.high = max(self.high, float(v.max()))
        if self.n_samples < RESERVOIR:
            take = min(SAMPLES_PER_CHIP, v.size)
            self.samples.append(rng.choice(v, take, replace=False))
            self.n_samples += take

    def result(self) -> dict[str, float]:
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        sample = np.concatenate(self.samples)
        p01, p99 = np.percentile(sample, [1, 99])
        return {
            "count": self.count,
            "mean": mean,
            "std": max(float(np.sqrt(var)), 1e-6),
            "min": self.low,
            "max": self.high,
            "p01": float(p01),
            "p99": float(p99),
        }


class StatsAccumulator:
    """Streams chips in; ``result()`` gives the JSON-ready statistics of every modality."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        self._bands: dict[tuple[str, str, str], _BandAccumulator] = {}
        self._classes: dict[tuple[str, str], np.ndarray] = {}

    def add(
        self,
        modality: Modality,
        bands: tuple[str, ...],
        data: np.ndarray,
        valid: np.ndarray,
        split_name: str,
    ) -> None:
        """Add one chip's (C, h, w) group of ``modality`` seen in split ``split_name``."""
        key_split = "train" if split_name == "train" else "all"
        splits = ("train", "all") if key_split == "train" else ("all",)
        if modality.kind == "categorical":
            k = modality.num_classes
            counts = np.bincount(data[0][valid[0]].astype(np.int64), minlength=k)[:k]
            for s in splits:
                self._classes.setdefault((modality.name, s), np.zeros(k, np.int64))
                self._classes[(modality.name, s)] += counts
            return
        for c, band in enumerate(bands):
            values = apply_transform(data[c][valid[c]], modality.transform)
            for s in splits:
                acc = self._bands.setdefault((modality.name, band, s), _BandAccumulator())
                acc.add(values, self._rng)

    def result(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        names = {k[0] for k in self._bands} | {k[0] for k in self._classes}
        for name in sorted(names):
            has_train = any(k[0] == name and k[-1] == "train" for k in self._bands) or (
                (name, "train") in self._classes
            )
            split = "train" if has_train else "all"
            entry: dict = {"from_split": split}
            bands = {
                band: acc.result()
                for (mod, band, s), acc in self._bands.items()
                if mod == name and s == split and acc.count
            }
            if bands:
                entry["bands"] = bands
            if (name, split) in self._classes:
                entry["class_counts"] = self._classes[(name, split)].tolist()
            out[name] = entry
        return out
