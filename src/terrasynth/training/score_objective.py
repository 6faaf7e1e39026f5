"""Proper scoring rules for the one-step generator (``ConvGenerator``).

Each step splits every chip's modalities at random into generated, conditioned and dropped
(with band infilling). ``roles="any"`` does it as the flow objective does (any subset
generated, each other modality shown with probability 0.7, now and then none);
``roles="inputs"`` as the U-Net's regression does (at least one modality given, all that are
not generated given); ``roles="mixed"`` draws one of the two per chip, each half the time.
Generated modalities are shown
at ``t = 1`` (their noisy input is the generator's noise). The model returns its mean and an
ensemble of ``config.ensemble`` samples, scored against the truth over generated values:

* **fair CRPS** per value: ``mean_i |X_i - y| - sum_{i != j} |X_i - X_j| / (2 M (M - 1))``,
  unbiased for the ensemble's distribution (Ferro 2014), so spread is rewarded exactly as
  far as it matches the error;
* **patch energy score** over 4 x 4 pixel patches of all bands of a group: the same form
  with Euclidean norms of whole patch vectors. It ties bands and neighbouring pixels
  together, so a sample must get the spectrum and texture of a patch right jointly, not
  band by band (per-band CRPS alone is met by spectrally absurd samples);
* **spectral energy score** (weight ``spectral_weight``): the energy score of each pixel's
  spectrum (all bands of a group), low-dimensional and so far more sensitive to how bands
  vary together than the patch score;
* **anomaly CRPS** (weight ``anomaly_weight``): the fair CRPS again after removing each
  chip's (and each sample's) mean per band. Store-normalised units make a chip's level
  dominate (a DEM's spread is a kilometre, its relief in a chip a few metres); this term
  scores the relief, the structure within the chip, on its own;
* **MSE of the mean** (weight ``mse_weight``), so the mean head is the conditional mean;
  with ``regression_mean`` the samples carry the mean with its gradient stopped, and the
  mean learns from this term alone (weight ``regression_mse_weight``);
* class maps: cross-entropy of the logits (calibrated class probabilities); vectors: MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from terrasynth.errors import TerrasynthError
from terrasynth.models.signals import Signal
from terrasynth.training.objective import (
    DROPPED,
    ObjectiveConfig,
    modality_losses,
    regression_roles,
    sample_roles,
    total_loss,
    training_inputs,
)

PATCH = 4
ROLE_SPLITS = ("any", "inputs", "mixed")


@dataclass
class ScoreConfig:
    energy_weight: float = 1.0
    spectral_weight: float = 1.0
    anomaly_weight: float = 0.5
    mse_weight: float = 0.25
    # a model whose mean is a regression (``regression_mean``) learns it from this alone
    regression_mse_weight: float = 1.0
    # how each chip's modalities are split (module docstring): "any", "inputs" or "mixed"
    roles: str = "any"

    def __post_init__(self) -> None:
        if self.roles not in ROLE_SPLITS:
            raise TerrasynthError(
                f"unknown role split '{self.roles}' (splits: {', '.join(ROLE_SPLITS)})"
            )


def fair_crps(samples: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise fair CRPS of an ensemble (M, ...) against ``y`` (...)."""
    m = samples.shape[0]
    skill = (samples - y[None]).abs().mean(0)
    spread = (samples[:, None] - samples[None]).abs().sum((0, 1)) / (2 * m * (m - 1))
    return skill - spread


def energy_score(samples: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fair energy score per vector: ``samples`` (M, N, D), ``y`` (N, D) -> (N,)."""
    m = samples.shape[0]
    skill = (samples - y[None]).norm(dim=-1).mean(0)
    pair = (samples[:, None] - samples[None]).norm(dim=-1).sum((0, 1)) / (2 * m * (m - 1))
    return skill - pair


def _anomaly(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values minus their mean over the masked pixels of each image and band."""
    mean = (x * mask).sum((-2, -1), keepdim=True) / mask.sum((-2, -1), keepdim=True).clamp_min(1)
    return (x - mean) * mask


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * patches, C * p * p) non-overlapping patch vectors."""
    b, c = x.shape[:2]
    v = F.unfold(x, p, stride=p)  # (B, C p p, L)
    return v.transpose(1, 2).reshape(-1, c * p * p)


class ScoreObjective:
    """Training step of the one-step generator (see the module docstring)."""

    def __init__(self, cfg: ScoreConfig | None = None) -> None:
        self.cfg = cfg or ScoreConfig()
        # every generated modality at pure noise: the generator's only level
        self.roles = ObjectiveConfig(p_pure_noise=1.0, p_pure_noise_categorical=1.0)

    def __call__(
        self, model, signals: dict[str, Signal], gsd: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        base = getattr(model, "module", model)
        config = base.config
        roles = self._split(signals, base, gen)
        inputs, loss_mask, _ = training_inputs(signals, roles, self.roles, gen)
        inputs = {n: inp for n, inp in inputs.items() if bool(inp.present.any())}
        if not inputs:  # no chip of the batch has two modalities to split
            return total_loss(model, {})
        extra = {}
        loc = signals.get("location")
        if getattr(base, "retrieval", None) is not None and loc is not None:
            extra["places"] = loc.vector  # retrieval ignores each chip's own surroundings
        mean, samples = model(inputs, gsd, members=config.ensemble, generator=gen, **extra)
        cfg = self.cfg
        mse_weight = cfg.regression_mse_weight if config.regression_mean else cfg.mse_weight

        def score(name: str, g: str, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            """Summed scores of one continuous band group's generated values."""
            ens = torch.stack([s[name][g].float() for s in samples]) * mask[None]
            y = x0 * mask
            crps = (fair_crps(ens, y) * mask).sum()
            mse = (((mean[name][g].float() - x0) ** 2) * mask).sum() * mse_weight
            es = self._energy(ens, y, mask)
            spectral = self._energy(ens, y, mask, patch=1) if y.shape[1] > 1 else 0.0
            anomaly = (fair_crps(_anomaly(ens, mask[None]), _anomaly(y, mask)) * mask).sum()
            return (
                crps
                + mse
                + self.cfg.energy_weight * es
                + self.cfg.spectral_weight * spectral
                + self.cfg.anomaly_weight * anomaly
            )

        # the mean's cross-entropy for class maps and squared error for vectors
        losses = modality_losses(mean, signals, loss_mask, continuous=score)
        return total_loss(model, losses)

    def _split(
        self, signals: dict[str, Signal], model, gen: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Each chip's roles (DROPPED, CONDITIONED, GENERATED) as ``cfg.roles`` says; the
        inputs split is over the modalities ``model`` knows."""
        if self.cfg.roles == "any":
            return sample_roles(signals, self.roles, gen)
        names = list(model.modality_names)
        if self.cfg.roles == "inputs":
            return regression_roles(signals, names, gen)
        free = sample_roles(signals, self.roles, gen)
        given = regression_roles(signals, names, gen)
        b = next(iter(signals.values())).present.shape[0]
        # chips without two modalities to split keep the free split
        usable = torch.stack([given[n] != DROPPED for n in signals], 1).any(1)
        take = (torch.rand(b, generator=gen) < 0.5) & usable
        return {n: torch.where(take, given[n], free[n]) for n in signals}

    @staticmethod
    def _energy(
        ens: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, patch: int = PATCH
    ) -> torch.Tensor:
        """Energy score of ``patch`` x ``patch`` patches of all bands, summed per value
        (comparable to CRPS). Unknown values (bands a chip lacks, nodata) are zero in the
        samples and the truth alike, so each vector is scored on its known part."""
        p = patch if y.shape[-1] % patch == 0 and y.shape[-1] >= patch else 1
        n = _patches(mask, p).sum(1)
        keep = n > 0
        if not bool(keep.any()):
            return y.new_zeros(())
        yv = _patches(y * mask, p)[keep]
        ev = torch.stack([_patches(e * mask, p)[keep] for e in ens])
        # a vector's norm grows as the square root of its known values: scale so the sum
        # counts per value, as the CRPS does
        return (energy_score(ev, yv) * n[keep].sqrt()).sum()
