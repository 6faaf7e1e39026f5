"""The scene model: one transformer over the tokens of every present modality.

Each raster modality becomes a grid of tokens: every band group is patchified at its own
resolution (a 60 m group of S2 uses 4x smaller patches than its 10 m group, so all groups
land on the same token grid) and the group embeddings are summed. Vector modalities
(image-level labels, location, time) are one token each. Learned scene tokens join them:
they hold the scene latent every modality reads from and writes to.

Every token carries its modality's noise level ``t`` (0 = given clean, 1 = pure noise):
it modulates the token through adaLN (DiT-style, per token), so one network serves joint
generation, any-to-any translation and band infilling. Positions are sinusoids of ground
coordinates in metres, so chips of different GSD share one notion of distance. Absent and
dropped modalities are masked out of attention.

The model predicts the clean signal ``x0`` of every modality: normalised values for
continuous modalities, class logits for categorical ones, vectors for one-token modalities.
Sampling (``terrasynth.sampling``) and the training objective (``terrasynth.training``)
are separate from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from terrasynth.errors import TerrasynthError
from terrasynth.models.base import CONFIG, WEIGHTS, PretrainedMixin
from terrasynth.models.config import ModelConfig

__all__ = ["CONFIG", "WEIGHTS", "ModalityInput", "SceneModel"]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of noise levels in [0, 1] (any shape) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
    args = (t.float() * 1000.0)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ground_position_embedding(xy_m: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoids of ground coordinates (..., 2) in metres, wavelengths 1 m to 200 km."""
    quarter = dim // 4
    wavelengths = torch.exp(
        torch.linspace(math.log(1.0), math.log(200_000.0), quarter, device=xy_m.device)
    )
    args = 2 * math.pi * xy_m[..., None] / wavelengths  # (..., 2, quarter)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (..., 2, 2 quarter)
    return emb.flatten(-2)


@dataclass
class ModalityInput:
    """What the model sees of one modality in a batch.

    ``groups``: band group -> (B, 3C, h, w) (raster: noisy values, given values, given mask;
    categorical channels are K one-hot planes) or ``vector``: (B, 3D). ``t``: (B,) noise
    level. ``present``: (B,) whether the modality takes part for that sample.
    """

    t: torch.Tensor
    present: torch.Tensor
    groups: dict[str, torch.Tensor] | None = None
    vector: torch.Tensor | None = None


class Block(nn.Module):
    """Pre-norm transformer block with per-token adaLN-Zero modulation."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + g1 * self.proj(attn.transpose(1, 2).reshape(b, n, d))
        h = self.norm2(x) * (1 + sc2) + sh2
        return x + g2 * self.mlp(h)


class SceneModel(PretrainedMixin, nn.Module):
    """Any-to-any multimodal scene model (see the module docstring)."""

    default_steps = 8
    cpu_bf16 = True
    shares_conditions = False  # the noisy targets are tokens the trunk reads

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.dim
        self.embed: nn.ModuleDict = nn.ModuleDict()
        self.head: nn.ModuleDict = nn.ModuleDict()
        self.patch: dict[str, int] = {}
        # Patch tokens decode each patch on its own; a small residual convolution over the
        # decoded image and the pixel-level input lets neighbouring patches agree at their
        # borders and restores detail finer than a patch (zero-initialised: starts as none).
        self.refine: nn.ModuleDict = nn.ModuleDict()
        # Continuous values are normalised by the store's global statistics, so small local
        # variations (8 m of relief on a DEM whose spread is a kilometre) are tiny numbers
        # that bfloat16 rounds away. With ``patch_contrast`` each patch is also embedded as
        # its log contrast and its shape at unit contrast (see ``patch_contrast``).
        self.contrast: nn.ModuleDict = nn.ModuleDict()
        # Tokens see 8 x 8 patches; a per-pixel relation between modalities (spectra to a
        # class, elevation to slope) is learned far faster at pixel level. With
        # ``pixel_context`` every band group maps its given pixels (1 x 1 convolution) to a
        # few shared channels; their sum over the modalities of a chip joins every
        # refiner's input (see ``_pixel_context``).
        self.context: nn.ModuleDict = nn.ModuleDict()
        names = []
        for mod in config.raster_modalities():
            for g in mod.groups:
                key = f"{mod.name}/{g.name}"
                p = config.patch_size // g.factor
                ch = mod.num_classes if mod.kind == "categorical" else len(g.bands)
                self.embed[_k(key)] = nn.Conv2d(3 * ch, d, kernel_size=p, stride=p)
                self.head[_k(key)] = nn.Linear(d, ch * p * p)
                self.patch[key] = p
                k = config.pixel_context
                if config.refine_channels:
                    self.refine[_k(key)] = _refiner(4 * ch + k, config.refine_channels, ch)
                continuous = mod.kind != "categorical"
                if config.patch_contrast and continuous:
                    self.contrast[_k(key)] = nn.Conv2d(2 * ch, d, kernel_size=p, stride=p)
                if k:  # inputs: given values and mask (and their patch contrast)
                    cin = (4 if continuous and config.patch_contrast else 2) * ch
                    self.context[_k(key)] = nn.Conv2d(cin, k, 1, bias=False)
            names.append(mod.name)
        for name, size in config.vector_modalities().items():
            self.embed[_k(name)] = nn.Sequential(nn.Linear(3 * size, d), nn.SiLU(), nn.Linear(d, d))
            self.head[_k(name)] = nn.Linear(d, size)
            names.append(name)
        self.modality_names = names
        self.modality_embed = nn.Embedding(len(names) + 1, d)  # last row: scene tokens
        self.scene = nn.Parameter(torch.randn(config.scene_tokens, d) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.gsd_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(
            Block(d, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        nn.init.zeros_(self.ada_out[-1].weight)
        nn.init.zeros_(self.ada_out[-1].bias)

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self, inputs: dict[str, ModalityInput], gsd: torch.Tensor
    ) -> dict[str, dict[str, torch.Tensor] | torch.Tensor]:
        """Predict x0 of every modality in ``inputs``. ``gsd``: (B,) metres per pixel."""
        inputs, x, c, spans, contrasts = self._encode(inputs, gsd)
        context = self._pixel_context(inputs, contrasts) if self.config.pixel_context else None
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        x = self.norm_out(x) * (1 + scale) + shift
        out: dict[str, dict[str, torch.Tensor] | torch.Tensor] = {}
        start = 0
        for name, n, grid in spans:
            part = x[:, start : start + n]
            start += n
            if grid is None:
                out[name] = self.head[_k(name)](part[:, 0])
            else:
                out[name] = self._decode_raster(name, part, grid, inputs[name].groups, context)
        return out

    # -- embeddings ------------------------------------------------------------------------
    @property
    def feature_channels(self) -> int:
        return self.config.dim

    @property
    def feature_factor(self) -> int:
        return self.config.patch_size

    def feature_map(self, inputs: dict[str, ModalityInput], gsd: torch.Tensor) -> torch.Tensor:
        """(B, dim, S / patch, S / patch): the patch tokens after the last block (layer-
        normalised, before the output modulation of decoding) as a map on the patch grid,
        averaged over the raster modalities taking part (each has a token per patch, all on
        one grid)."""
        inputs, x, _, spans, _ = self._encode(inputs, gsd)
        x = self.norm_out(x)
        total, count, start = None, None, 0
        for name, n, grid in spans:
            part = x[:, start : start + n]
            start += n
            if grid is None:
                continue
            b, d = part.shape[0], part.shape[-1]
            fmap = part.transpose(1, 2).reshape(b, d, *grid)
            w = inputs[name].present.to(fmap.dtype)[:, None, None, None]
            total = fmap * w if total is None else total + fmap * w
            count = w if count is None else count + w
        if total is None:
            raise TerrasynthError("embedding needs at least one raster input")
        return total / count.clamp_min(1.0)

    def _encode(self, inputs: dict[str, ModalityInput], gsd: torch.Tensor):
        """The token sequence after the transformer blocks: (inputs as the model saw them,
        tokens (B, N, D), their conditioning, spans (name, count, token grid) and the patch
        contrasts made on the way)."""
        d = self.config.dim
        if self.config.blind_at_pure_noise:
            inputs = {n: _blind_at_pure_noise(inp) for n, inp in inputs.items()}
        tokens, conds, keeps, spans = [], [], [], []
        contrasts: dict[str, torch.Tensor] = {}  # patch contrast per group, made once
        b = gsd.shape[0]
        gsd_emb = self.gsd_mlp(timestep_embedding(torch.log10(gsd.clamp_min(1e-3)) / 6 + 0.5, d))[
            :, None
        ]
        for name, inp in inputs.items():
            if name not in self.modality_names:
                raise TerrasynthError(f"the model does not know modality '{name}'")
            mid = self.modality_names.index(name)
            if inp.groups is not None:
                tok, grid = self._embed_raster(name, inp.groups, gsd, contrasts)
                tok = tok + gsd_emb
            else:
                tok = self.embed[_k(name)](inp.vector)[:, None]
                grid = None
            n = tok.shape[1]
            tok = tok + self.modality_embed.weight[mid]
            c = self.t_mlp(timestep_embedding(inp.t, d))[:, None] + self.modality_embed.weight[mid]
            tokens.append(tok)
            conds.append(c.expand(b, n, d))
            keeps.append(inp.present[:, None].expand(b, n))
            spans.append((name, n, grid))
        scene = self.scene[None].expand(b, -1, -1) + self.modality_embed.weight[-1]
        tokens.append(scene)
        conds.append(self.modality_embed.weight[-1].expand(b, scene.shape[1], d))
        keeps.append(torch.ones(b, scene.shape[1], dtype=torch.bool, device=gsd.device))
        x, c, keep = torch.cat(tokens, 1), torch.cat(conds, 1), torch.cat(keeps, 1)
        for block in self.blocks:
            x = block(x, c, keep)
        return inputs, x, c, spans, contrasts

    def _embed_raster(
        self,
        name: str,
        groups: dict[str, torch.Tensor],
        gsd: torch.Tensor,
        contrasts: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens of one raster modality; its groups' patch contrasts go into ``contrasts``."""
        total = None
        for gname, x in groups.items():
            key = f"{name}/{gname}"
            e = self.embed[_k(key)](x)  # (B, D, gh, gw)
            if _k(key) in self.contrast:
                pc = patch_contrast(*_given_and_mask(x), self.patch[key])
                e = e + self.contrast[_k(key)](pc)
                if contrasts is not None:
                    contrasts[key] = pc
            total = e if total is None else total + e
        b, d, gh, gw = total.shape
        tok = total.flatten(2).transpose(1, 2)  # (B, N, D)
        # ground coordinates of token centres, metres from the chip centre
        step = self.config.patch_size * gsd  # (B,)
        ys = torch.arange(gh, device=gsd.device) + 0.5 - gh / 2
        xs = torch.arange(gw, device=gsd.device) + 0.5 - gw / 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        xy = torch.stack([xx.flatten(), -yy.flatten()], -1)[None] * step[:, None, None]
        return tok + ground_position_embedding(xy, d), (gh, gw)

    def _decode_raster(
        self,
        name: str,
        part: torch.Tensor,
        grid: tuple[int, int],
        groups: dict[str, torch.Tensor],
        context: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        gh, gw = grid
        b = part.shape[0]
        out = {}
        for gname in groups:
            key = f"{name}/{gname}"
            p = self.patch[key]
            y = self.head[_k(key)](part)  # (B, N, C p p)
            ch = y.shape[-1] // (p * p)
            y = y.view(b, gh, gw, ch, p, p).permute(0, 3, 1, 4, 2, 5)
            y = y.reshape(b, ch, gh * p, gw * p)
            if self.config.refine_channels:
                parts = [y, groups[gname].to(y.dtype)]
                if context is not None:
                    parts.append(F.adaptive_avg_pool2d(context, y.shape[-2:]).to(y.dtype))
                y = y + self.refine[_k(key)](torch.cat(parts, 1))
            out[gname] = y
        return out

    def _pixel_context(
        self, inputs: dict[str, ModalityInput], contrasts: dict[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """(B, pixel_context, H, W) at the finest grid: summed maps of every given pixel.

        Only given values count (conditions, given bands), never noisy ones, and only for
        samples where the modality takes part, so nothing absent or generated leaks in.
        ``contrasts``: the patch contrasts that ``_embed_raster`` made.
        """
        total = None
        for name, inp in inputs.items():
            for gname, x in (inp.groups or {}).items():
                key = f"{name}/{gname}"
                feats = [*_given_and_mask(x)]
                if key in contrasts:
                    feats.append(contrasts[key])
                f = self.context[_k(key)](torch.cat(feats, 1))
                f = torch.where(inp.present[:, None, None, None], f, torch.zeros_like(f))
                factor = self.config.patch_size // self.patch[key]
                f = F.interpolate(f, scale_factor=factor, mode="nearest") if factor > 1 else f
                total = f if total is None else total + f
        return total


def _blind_at_pure_noise(inp: ModalityInput) -> ModalityInput:
    """``inp`` with its noisy values zeroed for samples at ``t = 1``.

    Pure noise is independent of x0, so the best x0 prediction there is a function of the
    conditions alone; showing zeros makes the model's first sampling step (and its one-step
    conditional-mean estimate) exactly that, instead of something the particular noise draw
    sways. The sampler still moves on from the noise it drew.
    """
    live = (inp.t < 1).float()
    if inp.groups is not None:
        groups = {}
        for g, x in inp.groups.items():
            c = x.shape[1] // 3
            keep = live.to(x.dtype)[:, None, None, None]
            groups[g] = torch.cat([x[:, :c] * keep, x[:, c:]], 1)
        return replace(inp, groups=groups)
    c = inp.vector.shape[1] // 3
    keep = live.to(inp.vector.dtype)[:, None]
    return replace(inp, vector=torch.cat([inp.vector[:, :c] * keep, inp.vector[:, c:]], 1))


def _given_and_mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A raster input's given values and given mask (its channels: noisy, given, mask)."""
    c = x.shape[1] // 3
    return x[:, c : 2 * c], x[:, 2 * c :]


def patch_contrast(x: torch.Tensor, mask: torch.Tensor, p: int, eps: float = 1e-3) -> torch.Tensor:
    """Per ``p`` x ``p`` patch and channel: the given values at unit contrast and log10 contrast.

    (B, C, H, W) values and 0/1 mask -> (B, 2C, H, W): ``(x - patch mean) / (patch std +
    eps)`` and ``log10(patch std + eps)``, both over the patch's masked-in pixels only (a
    chip's nodata border is no cliff) and zero where the mask is. Computed in float32 so
    that relief far below bfloat16's resolution of the raw values still reaches the model.
    """
    x, mask = x.float(), mask.float().clamp(0, 1)

    def patch_mean(v: torch.Tensor) -> torch.Tensor:  # masked mean, spread over the patch
        num, den = F.avg_pool2d(v * mask, p), F.avg_pool2d(mask, p)
        return F.interpolate(num / den.clamp_min(1e-6), scale_factor=p, mode="nearest")

    detail = (x - patch_mean(x)) * mask
    std = patch_mean(detail**2).sqrt()
    return torch.cat([detail / (std + eps), torch.log10(std + eps) * mask], 1)


def _refiner(cin: int, hidden: int, cout: int) -> nn.Sequential:
    last = nn.Conv2d(hidden, cout, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1), nn.GELU(), last)


def _k(key: str) -> str:
    """ModuleDict keys cannot hold '/' or '.'."""
    return key.replace("/", "__").replace(".", "_")
