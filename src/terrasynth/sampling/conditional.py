"""Generate some modalities of a batch from others: the core loop every pipeline uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from terrasynth.devices import model_device, to_device
from terrasynth.models.base import GenerativeModel
from terrasynth.models.scene_model import ModalityInput
from terrasynth.models.signals import Signal
from terrasynth.sampling.flow import FlowSampler


@dataclass
class Generated:
    """x0 of a generated modality: values (continuous/vector) or class probabilities."""

    groups: dict[str, torch.Tensor] | None = None  # continuous: normalised values
    probs: dict[str, torch.Tensor] | None = None  # categorical: (B, K, h, w)
    vector: torch.Tensor | None = None

    @classmethod
    def final(cls, sig: Signal, x0, probs) -> Generated:
        """The payload of a finished target: vector, class probabilities or values."""
        if sig.groups is None:
            return cls(vector=x0)
        if sig.target is not None:
            return cls(probs=probs)
        return cls(groups=x0)


def x0_from_prediction(sig: Signal, pred) -> tuple[object, object]:
    """Model output -> (x0 estimate in signal space, Generated payload)."""
    if sig.groups is None:
        return pred, pred
    if sig.target is not None:
        probs = {g: torch.softmax(p.float(), dim=1) for g, p in pred.items()}
        return {g: 2 * p - 1 for g, p in probs.items()}, probs
    return {g: p.float() for g, p in pred.items()}, None


@torch.no_grad()
def generate(
    model: GenerativeModel,
    signals: dict[str, Signal],
    targets: list[str],
    conditions: list[str],
    gsd: torch.Tensor,
    sampler: FlowSampler | None = None,
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
    given_bands: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Generated]:
    """Sample ``targets`` given ``conditions`` (clean, as far as they are known).

    ``given_bands``: for band infilling, per target and group a (B, C, 1, 1) mask of bands
    that are shown clean. ``guidance`` > 1 applies classifier-free guidance against the
    prediction with every condition dropped.
    """
    sampler = sampler or FlowSampler()
    # conditions no sample holds would only add masked tokens: leave them out
    held = [n for n in conditions if n in signals and bool(signals[n].present.any())]
    names = [n for n in targets if n in signals] + [n for n in held if n not in targets]
    sigs = {n: signals[n] for n in names}
    x: dict[str, object] = {}
    for n in targets:
        sig = sigs[n]
        if sig.groups is not None:
            x[n] = {
                g: torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
                for g, v in sig.groups.items()
            }
        else:
            x[n] = torch.randn(sig.vector.shape, generator=generator).to(sig.vector.device)
    ts = sampler.timesteps()
    result: dict[str, Generated] = {}
    for i in range(sampler.steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        pred = predict(model, sigs, targets, x, t, gsd, given_bands, True)
        if guidance != 1.0:
            unc = predict(model, sigs, targets, x, t, gsd, given_bands, False)
            pred = {n: guide(pred[n], unc[n], guidance) for n in targets}
        for n in targets:
            x0, payload = x0_from_prediction(sigs[n], pred[n])
            x0 = keep_given(x0, sigs[n], (given_bands or {}).get(n))
            if isinstance(x0, dict):
                x[n] = {g: sampler.step(x0[g], x[n][g], t, t_next, generator) for g in x0}
            else:
                x[n] = sampler.step(x0, x[n], t, t_next, generator)
            if t_next <= 0:
                result[n] = Generated.final(sigs[n], x0, payload)
    return result


def keep_given(x0, sig: Signal, given: dict[str, torch.Tensor] | None):
    """Band infilling: the given bands' x0 is their known value, not the model's guess, so
    their noisy state follows the path training showed the model (inpainting-style)."""
    if given is None or not isinstance(x0, dict):
        return x0
    out = {}
    for g, v in x0.items():
        m = given.get(g)
        out[g] = v if m is None else torch.where((sig.known[g] * m) > 0, sig.groups[g], v)
    return out


def guide(cond, unc, w: float):
    if isinstance(cond, dict):
        return {g: unc[g] + w * (cond[g] - unc[g]) for g in cond}
    return unc + w * (cond - unc)


def predict(
    model: GenerativeModel,
    sigs: dict[str, Signal],
    targets: list[str],
    x: dict,
    t: float,
    gsd: torch.Tensor,
    given_bands: dict | None,
    with_conditions: bool,
    repeats: int = 1,
) -> dict:
    """One model call: targets in their current noisy state ``x`` at level ``t``, every
    other modality of ``sigs`` clean (or all dropped: the unconditional branch of guidance).
    A model on another device than the CPU gets its inputs there and returns its
    prediction to the CPU, where sampling keeps its state and draws its noise.
    ``repeats`` > 1: the rows come in groups of that many samples of one window, for a
    model that ``shares_conditions``.
    """
    inputs = sampling_inputs(sigs, targets, x, t, gsd, given_bands, with_conditions)
    extra = {"repeats": repeats} if repeats > 1 else {}
    device = model_device(model)
    if device.type == "cpu":
        return model(inputs, gsd, **extra)
    pred = model(to_device(inputs, device), gsd.to(device), **extra)
    return to_device(pred, torch.device("cpu"))


def sampling_inputs(
    sigs: dict[str, Signal],
    targets: list[str],
    x: dict,
    t: float,
    gsd: torch.Tensor,
    given_bands: dict | None,
    with_conditions: bool,
) -> dict[str, ModalityInput]:
    """The model inputs of :func:`predict`."""
    b = gsd.shape[0]
    inputs: dict[str, ModalityInput] = {}
    for n, sig in sigs.items():
        is_target = n in targets
        level = torch.full((b,), t if is_target else 0.0, device=gsd.device)
        take = sig.present & (is_target or with_conditions)
        if sig.groups is not None:
            groups = {}
            for g, x0 in sig.groups.items():
                if is_target:
                    gb = (given_bands or {}).get(n, {}).get(g)
                    gv = sig.known[g] * gb if gb is not None else torch.zeros_like(x0)
                    groups[g] = torch.cat([x[n][g], x0 * gv, gv], 1)
                else:
                    groups[g] = torch.cat([x0, x0 * sig.known[g], sig.known[g]], 1)
            inputs[n] = ModalityInput(level, take, groups=groups)
        else:
            if is_target:
                z = torch.zeros_like(sig.vector)
                vec = torch.cat([x[n], z, z], 1)
            else:
                vec = torch.cat([sig.vector, sig.vector * sig.known, sig.known], 1)
            inputs[n] = ModalityInput(level, take, vector=vec)
    return inputs
