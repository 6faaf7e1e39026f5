"""The training objective: flow matching with a noise level per modality.

Every step splits each sample's present modalities at random into *generated* (noised at
their own level t, predicted), *conditioned* (shown clean) and *dropped* (left out of the
sequence). So one model learns joint generation (nothing conditioned), every any-to-any
direction, and, through dropout of all conditions, the unconditional model that
classifier-free guidance needs. Sometimes a generated raster keeps some of its bands clean:
band infilling. The model predicts x0; the loss is the masked MSE of x0 for continuous and
vector modalities and cross-entropy for categorical ones, on generated values only.

:class:`RegressionObjective` trains deterministic models (the U-Net) with the same roles
and losses: each chip splits its present modalities into inputs and targets, targets are
generated at ``t = 1`` (their noisy input is pure noise, which such a model ignores), and
the loss is the same masked MSE / cross-entropy of its one prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from terrasynth.models.base import GenerativeModel
from terrasynth.models.signals import Signal, model_inputs

DROPPED, CONDITIONED, GENERATED = 0, 1, 2


@dataclass
class ObjectiveConfig:
    p_condition: float = 0.7  # a non-generated modality is shown (else dropped)
    p_unconditional: float = 0.1  # drop every condition of a sample (for guidance)
    p_infill: float = 0.15  # a generated raster keeps a random subset of its bands clean
    p_pure_noise: float = 0.25  # t = 1: generation from nothing but the conditions
    logit_normal_std: float = 1.0  # otherwise t = sigmoid(N(0, std))
    # Class maps are one-hot planes at +-1: their class is still readable from x_t up to
    # high noise, so most draws of the continuous schedule teach a categorical modality
    # nothing about its conditions. Their levels lean to high noise instead.
    p_pure_noise_categorical: float = 0.5
    logit_normal_mean_categorical: float = 1.0  # t = sigmoid(N(mean, std))


def sample_roles(
    signals: dict[str, Signal], cfg: ObjectiveConfig, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Role per modality and sample: DROPPED, CONDITIONED or GENERATED (at least one)."""
    names = list(signals)
    b = next(iter(signals.values())).present.shape[0]
    present = torch.stack([signals[n].present for n in names], 1).cpu()  # (B, M)
    roles = torch.zeros(b, len(names), dtype=torch.long)
    for i in range(b):
        idx = torch.nonzero(present[i]).flatten()
        if idx.numel() == 0:
            continue
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = int(torch.randint(1, idx.numel() + 1, (1,), generator=gen))
        roles[i, idx[:k]] = GENERATED
        if float(torch.rand(1, generator=gen)) >= cfg.p_unconditional:
            rest = idx[k:]
            shown = torch.rand(rest.numel(), generator=gen) < cfg.p_condition
            roles[i, rest[shown]] = CONDITIONED
    return {n: roles[:, j] for j, n in enumerate(names)}


def _noise_like(sig: Signal, gen: torch.Generator) -> dict[str, torch.Tensor] | torch.Tensor:
    def randn(x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)

    if sig.groups is not None:
        return {g: randn(x) for g, x in sig.groups.items()}
    return randn(sig.vector)


def training_inputs(
    signals: dict[str, Signal],
    roles: dict[str, torch.Tensor],
    cfg: ObjectiveConfig,
    gen: torch.Generator,
) -> tuple[dict, dict, dict]:
    """Model inputs plus, per modality, the element mask of generated values (the loss)."""
    t, given, take_part, noise, loss_mask = {}, {}, {}, {}, {}
    for name, sig in signals.items():
        # random draws come from the CPU generator (the same stream on any device), the
        # tensors they mask live on the signals' device
        dev = sig.present.device
        role = roles[name].to(dev)
        b = role.shape[0]
        categorical = sig.target is not None
        mean = cfg.logit_normal_mean_categorical if categorical else 0.0
        tt = torch.sigmoid(torch.randn(b, generator=gen) * cfg.logit_normal_std + mean)
        # Every sampler starts at t = 1, which a logit-normal almost never draws.
        p_pure = cfg.p_pure_noise_categorical if categorical else cfg.p_pure_noise
        tt = torch.where(torch.rand(b, generator=gen) < p_pure, torch.ones_like(tt), tt).to(dev)
        t[name] = torch.where(role == GENERATED, tt, torch.zeros_like(tt))
        take_part[name] = role != DROPPED
        noise[name] = _noise_like(sig, gen)
        cond = (role == CONDITIONED).float()
        gen_ = (role == GENERATED).float()
        if sig.groups is not None:
            infill = _infill_bands(sig, role, cfg, gen)
            given[name], loss_mask[name] = {}, {}
            for g, known in sig.known.items():
                keep = infill[g] if infill is not None else torch.zeros_like(known[:, :, :1, :1])
                shown = cond[:, None, None, None] + gen_[:, None, None, None] * keep
                given[name][g] = known * shown.clamp(max=1)
                loss_mask[name][g] = known * gen_[:, None, None, None] * (1 - keep)
        else:
            given[name] = sig.known * cond[:, None]
            loss_mask[name] = sig.known * gen_[:, None]
    return model_inputs(signals, t, given, take_part, noise), loss_mask, t


def _infill_bands(
    sig: Signal, role: torch.Tensor, cfg: ObjectiveConfig, gen: torch.Generator
) -> dict[str, torch.Tensor] | None:
    """Per group (B, C, 1, 1): 1 for bands shown clean although the modality is generated."""
    if sig.target is not None:  # categorical maps have a single band
        return None
    out = {}
    b = role.shape[0]
    dev = role.device
    pick = (torch.rand(b, generator=gen) < cfg.p_infill).to(dev) & (role == GENERATED)
    for g, known in sig.known.items():
        c = known.shape[1]
        band_known = known.flatten(2).amax(-1) > 0  # (B, C)
        draw = (torch.rand(b, c, generator=gen) < 0.5).to(dev)
        out[g] = (draw & band_known & pick[:, None]).float()[:, :, None, None]
    # keep at least one band to generate: if every known band was drawn, generate them all
    total_known = sum(((k.flatten(2).amax(-1) > 0).float()).sum(1) for k in sig.known.values())
    total_shown = sum(v.flatten(1).sum(1) for v in out.values())
    all_shown = total_shown >= total_known
    for g in out:
        out[g] = out[g] * (~all_shown).float()[:, None, None, None]
    return out


def modality_losses(
    pred: dict,
    signals: dict[str, Signal],
    loss_mask: dict,
    continuous: Callable[[str, str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Mean loss per modality over its generated values (modalities with none are left out).

    Vectors: squared error; class maps: cross-entropy; continuous band groups: the summed
    squared error, or ``continuous(name, group, x0, mask)``, a summed score of the group's
    generated values (another objective's)."""
    losses: dict[str, torch.Tensor] = {}
    for name, sig in signals.items():
        if name not in pred:
            continue
        if sig.groups is None:
            m = loss_mask[name]
            if m.sum() > 0:
                losses[name] = (((pred[name] - sig.vector) ** 2) * m).sum() / m.sum()
            continue
        total, count = 0.0, 0.0
        for g, x0 in sig.groups.items():
            m = loss_mask[name][g]
            n = m.sum()
            if n == 0:
                continue
            if sig.target is not None:
                target = torch.where(m[:, 0] > 0, sig.target[g], torch.full_like(sig.target[g], -1))
                ce = F.cross_entropy(
                    pred[name][g].float(), target, ignore_index=-1, reduction="sum"
                )
                total = total + ce
                count = count + (target >= 0).sum()
            else:
                if continuous is None:
                    total = total + (((pred[name][g].float() - x0) ** 2) * m).sum()
                else:
                    total = total + continuous(name, g, x0, m)
                count = count + n
        if float(count) > 0:
            losses[name] = total / count
    return losses


def training_step(
    model: GenerativeModel,
    batch_signals: dict[str, Signal],
    gsd: torch.Tensor,
    cfg: ObjectiveConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One forward pass; returns the loss (mean over modalities) and per-modality values."""
    roles = sample_roles(batch_signals, cfg, gen)
    inputs, loss_mask, _ = training_inputs(batch_signals, roles, cfg, gen)
    # Sequence packing: a modality no sample of the batch takes part with adds only masked
    # tokens, so it is left out of the sequence (same result, far fewer tokens).
    inputs = {n: inp for n, inp in inputs.items() if bool(inp.present.any())}
    pred = model(inputs, gsd)
    losses = modality_losses(pred, batch_signals, loss_mask)
    return total_loss(model, losses)


class FlowObjective:
    """The flow-matching training step as an objective object (the trainer's interface:
    ``objective(model, signals, gsd, generator) -> (loss, per-modality values)``)."""

    def __init__(self, cfg: ObjectiveConfig | None = None) -> None:
        self.cfg = cfg or ObjectiveConfig()

    def __call__(
        self, model, signals: dict[str, Signal], gsd: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return training_step(model, signals, gsd, self.cfg, gen)


def total_loss(model, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean over modalities of their losses, and each as a number. A batch with none
    gives a zero that still reaches every parameter (DDP waits for a gradient of each)."""
    if not losses:
        return sum(p.sum() * 0 for p in model.parameters()), {}
    loss = torch.stack(list(losses.values())).mean()
    return loss, {k: float(v.detach()) for k, v in losses.items()}


def regression_roles(
    signals: dict[str, Signal], names: list[str], gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per chip, a random split of its present modalities among ``names`` into CONDITIONED
    (inputs) and GENERATED (targets), a uniform number of inputs in 1 .. n - 1; chips with
    fewer than two such modalities take no part (all DROPPED). The chip's other present
    modalities (not in ``names``) are CONDITIONED where the chip takes part."""
    b = next(iter(signals.values())).present.shape[0]
    roles = {n: torch.full((b,), DROPPED, dtype=torch.long) for n in signals}
    names = [n for n in names if n in signals]
    if not names:
        return roles
    present = torch.stack([signals[n].present.bool().cpu() for n in names], 1)  # (B, M)
    m = present.shape[1]
    n = present.sum(1)
    order = torch.rand(b, m, generator=gen).masked_fill(~present, 2.0)
    rank = order.argsort(1).argsort(1)  # 0 .. n-1 over present modalities
    k = (torch.rand(b, generator=gen) * (n - 1).clamp_min(0)).floor() + 1
    usable = n >= 2
    given = present & (rank < k[:, None]) & usable[:, None]
    target = present & ~given & usable[:, None]
    for i, name in enumerate(names):
        shown = torch.where(given[:, i], CONDITIONED, DROPPED)
        roles[name] = torch.where(target[:, i], GENERATED, shown)
    for name, sig in signals.items():
        if name not in names:
            shown = sig.present.bool().cpu() & usable
            roles[name] = torch.where(shown, CONDITIONED, DROPPED)
    return roles


class RegressionObjective:
    """Training step of a deterministic model (the U-Net): per chip a random input/target
    split (:func:`regression_roles`) over the modalities the model predicts, targets at
    ``t = 1`` with nothing of them shown, and the mean over target modalities of the MSE
    over known pixels (continuous) or the cross-entropy (categorical) of the prediction."""

    def __init__(self) -> None:
        # targets at pure noise, never band-infilled
        self.cfg = ObjectiveConfig(p_infill=0.0, p_pure_noise=1.0, p_pure_noise_categorical=1.0)

    def __call__(
        self, model, signals: dict[str, Signal], gsd: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        names = list(getattr(model, "module", model).modality_names)
        roles = regression_roles(signals, names, gen)
        inputs, loss_mask, _ = training_inputs(signals, roles, self.cfg, gen)
        inputs = {n: inp for n, inp in inputs.items() if bool(inp.present.any())}
        pred = model(inputs, gsd) if inputs else {}
        losses = modality_losses(pred, signals, loss_mask)
        return total_loss(model, losses)
