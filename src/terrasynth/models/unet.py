"""A deterministic any-to-any U-Net (backbone ``"unet"``): the benchmark's learned,
non-generative baseline, a model like any other.

Input: every raster modality of its config (in the config's order), each band group's
given values and given mask (channels ``c:2c`` and ``2c:3c`` of a
:class:`~terrasynth.models.scene_model.ModalityInput` group) resampled to the window's base
grid (nearest neighbour) and stacked as channels: continuous groups in store-normalised
units, categorical groups as 0/1 one-hot planes, and after each group one mask channel (1
where the group is known and given, 0 where it is absent, unknown or not given). The noisy
values (channels ``0:c``) are never read: the model is deterministic, every sample of a
sampler is its one prediction, and it is a one-step model (``default_steps`` 1). Location,
time and image-level labels are not used.

Network: three levels (``widths``) of two 3 x 3 convolutions with GroupNorm and SiLU,
max-pool down, transposed convolution up, skip connections; one 1 x 1 head per raster
modality (continuous: its normalised bands; categorical: class logits), average-pooled back
to each group's own grid. Trained with
:class:`~terrasynth.training.objective.RegressionObjective` by the one trainer.

Folders saved before the U-Net became a backbone (``config.json`` with ``modalities``,
``stats``, ``image_size``, ``widths`` and ``source`` only) load as they are: their config
is read as a ``"unet"`` config (:meth:`~terrasynth.models.config.ModelConfig.from_dict`)
and their weights carry the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from terrasynth.errors import TerrasynthError
from terrasynth.modalities import BandGroup, Modality
from terrasynth.models.base import FullResolutionFeatures, PretrainedMixin
from terrasynth.models.config import ModelConfig, preset_config
from terrasynth.models.scene_model import ModalityInput


def _channels(mod: Modality, group: BandGroup) -> int:
    return mod.num_classes if mod.kind == "categorical" else len(group.bands)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
    )


def _key(name: str) -> str:
    """ModuleDict keys cannot hold '.'."""
    return name.replace(".", "_")


def unet_config(model: ModelConfig, preset: str = "tiny") -> ModelConfig:
    """A U-Net config (``preset`` sizes) over the raster modalities of ``model``, in its
    order, with its normalisation statistics and its window."""
    names = [m.name for m in model.raster_modalities()]
    cfg = preset_config(
        preset,
        {m: model.modalities[m] for m in names},
        {m: model.stats[m] for m in names if m in model.stats},
        backbone="unet",
    )
    cfg.image_size = model.image_size
    cfg.validate()
    return cfg


class UNet(FullResolutionFeatures, PretrainedMixin, nn.Module):
    """Encoder-decoder with skip connections over all raster modalities (module docstring)."""

    default_steps = 1  # deterministic: one call is the prediction
    cpu_bf16 = False  # convolutions: fp32 on CPU (see GenerativeModel.cpu_bf16)
    shares_conditions = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.rasters: list[Modality] = config.raster_modalities()
        if not self.rasters:
            raise TerrasynthError("a U-Net needs at least one raster modality")
        self.modality_names = [m.name for m in self.rasters]
        w = list(config.widths)
        self.in_channels = sum(_channels(m, g) + 1 for m in self.rasters for g in m.groups)
        self.down = nn.ModuleList()
        prev = self.in_channels
        for width in w:
            self.down.append(_block(prev, width))
            prev = width
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in range(len(w) - 2, -1, -1):
            self.up.append(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2))
            self.merge.append(_block(2 * w[i], w[i]))
        self.heads = nn.ModuleDict(
            {
                _key(m.name): nn.Conv2d(w[0], sum(_channels(m, g) for g in m.groups), 1)
                for m in self.rasters
            }
        )

    @property
    def multiple(self) -> int:
        """The base-grid size must be a multiple of this."""
        return 2 ** (len(self.config.widths) - 1)

    def forward(
        self, inputs: dict[str, ModalityInput], gsd: torch.Tensor
    ) -> dict[str, dict[str, torch.Tensor]]:
        """x0 of every generated raster modality (``t > 0`` for some sample): per band group,
        on the group's grid, normalised values (continuous) or class logits (categorical)."""
        targets = [
            m
            for m in self.rasters
            if m.name in inputs
            and inputs[m.name].groups is not None
            and bool((inputs[m.name].t > 0).any())
        ]
        if not targets:
            return {}
        y = self.network(self.stack(inputs, gsd))
        return {mod.name: self.head(mod, y) for mod in targets}

    def head(self, mod: Modality, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per band group of ``mod`` on the group's grid: its head on the decoder's features."""
        v = self.heads[_key(mod.name)](features)
        groups, offset = {}, 0
        for g in mod.groups:
            c = _channels(mod, g)
            part = v[:, offset : offset + c]
            groups[g.name] = F.avg_pool2d(part, g.factor) if g.factor > 1 else part
            offset += c
        return groups

    def feature_map(self, inputs: dict[str, ModalityInput], gsd: torch.Tensor) -> torch.Tensor:
        """(B, widths[0], S, S): the decoder's last features, which the heads read."""
        return self.network(self.stack(inputs, gsd))

    def network(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, S, S) stacked inputs -> (B, widths[0], S, S) features."""
        return self.encode_decode(x)[0]

    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-resolution features and the deepest ones (B, widths[-1], S / 2^L, ...)."""
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        deep = x
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            x = merge(torch.cat([up(x), skip], 1))
        return x, deep

    def stack(self, inputs: dict[str, ModalityInput], gsd: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, S, S): per raster group of the config, its given values (one-hot
        planes for class maps) and one mask channel, on the base grid; zeros for groups the
        inputs lack."""
        size = self._grid(inputs)
        b, dev = gsd.shape[0], gsd.device
        parts = []
        for mod in self.rasters:
            inp = inputs.get(mod.name)
            for g in mod.groups:
                c, h = _channels(mod, g), size // g.factor
                if inp is None or inp.groups is None or g.name not in inp.groups:
                    parts.append(torch.zeros(b, c + 1, size, size, device=dev))
                    continue
                xg = inp.groups[g.name].float()
                if tuple(xg.shape[1:]) != (3 * c, h, h):
                    raise TerrasynthError(
                        f"{mod.name}/{g.name}: input of shape {tuple(xg.shape[1:])} where the "
                        f"U-Net's registry expects {(3 * c, h, h)}"
                    )
                val, mask = xg[:, c : 2 * c], xg[:, 2 * c :]
                mask = mask * inp.present.float()[:, None, None, None]
                if mod.kind == "categorical":
                    val = (val + 1) / 2  # one-hot in [-1, 1] -> {0, 1}
                v = torch.cat([val * mask, mask.amax(1, keepdim=True)], 1)
                if g.factor > 1:
                    v = F.interpolate(v, scale_factor=g.factor, mode="nearest")
                parts.append(v)
        return torch.cat(parts, 1)

    def _grid(self, inputs: dict[str, ModalityInput]) -> int:
        """Pixels of the base grid of the inputs' rasters."""
        for mod in self.rasters:
            inp = inputs.get(mod.name)
            if inp is not None and inp.groups is not None:
                g = next(g for g in mod.groups if g.name in inp.groups)
                size = inp.groups[g.name].shape[-1] * g.factor
                if size % self.multiple:
                    raise TerrasynthError(
                        f"window of {size} px: the U-Net needs a multiple of {self.multiple}"
                    )
                return size
        raise TerrasynthError("no raster modality of the U-Net in these inputs")


__all__ = ["UNet", "unet_config"]
