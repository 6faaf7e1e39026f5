"""Samplers for x0-predicting flow models, separate from the model.

The model predicts the clean signal ``x0`` from ``x_t = (1 - t) x0 + t noise``. A sampler
walks ``t`` from 1 to 0: at each step it turns the prediction into a noise estimate and
moves to the next level, deterministically (``eta = 0``, the flow ODE) or re-drawing part of
the noise (``eta > 0``, stochastic). Hand-written because diffusers' flow-matching
scheduler assumes velocity outputs and one noise level per sample, while this model has
one level per modality and predicts x0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FlowSampler:
    """Euler / DDIM-style sampler over noise levels 1 -> 0."""

    steps: int = 8
    eta: float = 0.0  # 0: deterministic; 1: fresh noise every step
    shift: float = 1.0  # >1 spends more steps at high noise
    start: float = 1.0  # < 1: start from a partly noised guess (a cascade's parent level)

    def timesteps(self) -> torch.Tensor:
        """Noise levels t_0 = start > t_1 > ... > t_steps = 0."""
        t = torch.linspace(1.0, 0.0, self.steps + 1)
        return self.start * self.shift * t / (1 + (self.shift - 1) * t)

    def step(
        self,
        x0_hat: torch.Tensor,
        x_t: torch.Tensor,
        t: float,
        t_next: float,
        generator: torch.Generator | None = None,
        fresh: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Move from level ``t`` to ``t_next`` given the model's x0 prediction.

        ``fresh``: the new noise of a stochastic step (drawn from ``generator`` if absent)."""
        if t_next <= 0:
            return x0_hat
        noise_hat = (x_t - (1 - t) * x0_hat) / max(t, 1e-6)
        if self.eta > 0:
            if fresh is None:
                fresh = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype)
            keep = (1 - self.eta**2) ** 0.5
            noise_hat = keep * noise_hat + self.eta * fresh.to(x_t.device)
        return (1 - t_next) * x0_hat + t_next * noise_hat
