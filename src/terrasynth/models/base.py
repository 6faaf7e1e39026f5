"""What every model of terrasynth offers, whatever its backbone.

A model maps per-modality inputs (:class:`~terrasynth.models.scene_model.ModalityInput`:
noisy values, given values, given mask, noise level ``t``, presence) and the ground sampling
distance to the x0 estimate of every generated modality: normalised values (continuous),
class logits (categorical) or vectors. Samplers, the trainer, whole-scene generation and
evaluation talk to models through this protocol only; ``terrasynth.models.factory`` builds
or loads the class that a config's ``backbone`` names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file

from terrasynth.errors import TerrasynthError
from terrasynth.models.config import ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively (fast), not emulated.

    On a CPU that is AVX512-BF16 or AMX: without them oneDNN emulates bf16 and a convolution
    runs many times slower than in float32 (see ``GenerativeModel.cpu_bf16``). torch has no
    public test for these instruction sets; ``torch.cpu``'s private ones are used."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else one clear error."""
    if precision not in PRECISIONS:
        raise TerrasynthError(
            f"unknown precision '{precision}' (precisions: {', '.join(PRECISIONS)})"
        )
    return precision


@runtime_checkable
class GenerativeModel(Protocol):
    """The model interface (see the module docstring)."""

    config: ModelConfig
    default_steps: ClassVar[int]  # sampler steps the model is made for (1: one-step)
    # whether bf16 autocast speeds its training up on a CPU: it does for the transformer's
    # matmuls, while convolutions in bf16 run ~20x slower on CPUs without native bf16
    # (AVX2: 3.8 s against 0.19 s for a 64-channel 3x3 conv pair at batch 24, 32 px)
    cpu_bf16: ClassVar[bool]
    # whether ``model(inputs, gsd, repeats=r)`` works: the batch holds groups of ``r``
    # consecutive rows that differ only in the targets' noise (the samples of one window),
    # and what depends on the conditions alone is computed once per group
    shares_conditions: ClassVar[bool]

    def __call__(self, inputs: dict[str, Any], gsd: torch.Tensor) -> dict[str, Any]: ...

    # Embeddings (``Pipeline.embed``): the model's features of its inputs, every input given
    # clean (t = 0) and nothing generated. ``feature_map`` returns (B, feature_channels,
    # S / feature_factor, S / feature_factor) for windows of S base-grid pixels.
    @property
    def feature_channels(self) -> int: ...

    @property
    def feature_factor(self) -> int: ...

    def feature_map(self, inputs: dict[str, Any], gsd: torch.Tensor) -> torch.Tensor: ...

    def save_pretrained(self, folder: str | Path) -> Path: ...

    def num_parameters(self) -> int: ...


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` with ``config.json`` + safetensors weights."""

    config: ModelConfig

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (atomically) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / CONFIG)
        tmp = folder / f".{WEIGHTS}.tmp"
        state = self.state_dict()  # type: ignore[attr-defined]
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(folder / WEIGHTS)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str = "cpu"):
        folder = Path(folder)
        if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
            raise TerrasynthError(f"{folder}: no {CONFIG} and {WEIGHTS} here")
        model = cls(ModelConfig.load(folder / CONFIG))  # type: ignore[call-arg]
        model.load_state_dict(load_file(str(folder / WEIGHTS), device=map_location))
        return model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # type: ignore[attr-defined]


class FullResolutionFeatures:
    """``feature_channels`` / ``feature_factor`` of a backbone whose embedding is its last
    full-resolution decoder features: ``widths[0]`` channels, one per base-grid pixel."""

    config: ModelConfig

    @property
    def feature_channels(self) -> int:
        return self.config.widths[0]

    @property
    def feature_factor(self) -> int:
        return 1


def sampling_steps(model: GenerativeModel, steps: int | None) -> int:
    """The sampler steps to use: the model's own for one-step models or when unset."""
    if steps is None or model.default_steps == 1:
        return model.default_steps
    return int(steps)
