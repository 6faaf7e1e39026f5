"""Model configuration: sizes, presets, and the modality table the model was built for.

A config round-trips to JSON and is saved with every checkpoint, together with the registry
entries of its modalities and the normalisation statistics of the store it was trained on,
so a saved model needs nothing else to generate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from terrasynth.atomic import write_text
from terrasynth.errors import TerrasynthError
from terrasynth.modalities import Modality, Registry

# Vector modalities have no pixels: each is one token of this many numbers.
LOCATION_DIM = 3  # unit vector on the sphere
TIME_DIM = 3  # sin / cos of day of year, scaled year


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (sizes and modality table)."""

    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)  # registry entries
    stats: dict[str, Any] = field(default_factory=dict)  # the store's statistics
    image_size: int = 32  # training crop, pixels of the base grid
    patch_size: int = 8  # base-grid pixels per token side
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    scene_tokens: int = 8
    refine_channels: int = 0  # width of the pixel-level refinement convolution (0: none)
    patch_contrast: bool = False  # also embed each patch's log contrast and normalised shape
    pixel_context: int = 0  # channels of the given pixels of all modalities fed to refiners
    blind_at_pure_noise: bool = False  # at t = 1 the model sees zeros, not the noise
    use_location: bool = True
    use_time: bool = True
    preset: str = "custom"

    @property
    def registry(self) -> Registry:
        return Registry.from_dict({"modalities": self.modalities})

    def raster_modalities(self) -> list[Modality]:
        reg = self.registry
        return [reg[m] for m in self.modalities if reg[m].is_raster]

    def vector_modalities(self) -> dict[str, int]:
        """Name -> vector size of the one-token modalities (labels, location, time)."""
        reg = self.registry
        out = {m: reg[m].num_classes for m in self.modalities if reg[m].kind == "multilabel"}
        if self.use_location:
            out["location"] = LOCATION_DIM
        if self.use_time:
            out["time"] = TIME_DIM
        return out

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise TerrasynthError("image_size must be a multiple of patch_size")
        for mod in self.raster_modalities():
            for g in mod.groups:
                if self.patch_size % g.factor:
                    raise TerrasynthError(
                        f"patch_size {self.patch_size} is not divisible by the factor "
                        f"{g.factor} of {mod.name}/{g.name}"
                    )
        if self.dim % self.heads:
            raise TerrasynthError("dim must be a multiple of heads")
        if self.pixel_context and not self.refine_channels:
            raise TerrasynthError("pixel_context needs refine_channels > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: Path) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# Sizes per preset. tiny: trains usefully in 15 CPU minutes; small: 2 CPU hours; base: GPUs.
_SIZE_FIELDS = (
    "image_size",
    "patch_size",
    "dim",
    "depth",
    "heads",
    "scene_tokens",
    "refine_channels",
)
_SIZES = {
    "tiny": (32, 8, 128, 4, 4, 8, 32),
    "small": (64, 8, 256, 8, 8, 16, 48),
    "base": (64, 4, 512, 12, 8, 32, 64),
}
PRESETS: dict[str, dict[str, Any]] = {
    name: dict(
        zip(_SIZE_FIELDS, sizes, strict=True),
        patch_contrast=True,
        pixel_context=16,
        blind_at_pure_noise=True,
    )
    for name, sizes in _SIZES.items()
}


def preset_config(name: str, modalities: dict[str, dict], stats: dict) -> ModelConfig:
    if name not in PRESETS:
        raise TerrasynthError(f"unknown preset '{name}' (presets: {', '.join(PRESETS)})")
    cfg = ModelConfig(modalities=modalities, stats=stats, preset=name, **PRESETS[name])
    cfg.validate()
    return cfg
