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
from terrasynth.models.filters import NUM_BANDS

# Vector modalities have no pixels: each is one token of this many numbers.
LOCATION_DIM = 3  # unit vector on the sphere
TIME_DIM = 3  # sin / cos of day of year, scaled year
AMPLITUDE_FLOOR = 0.05  # retrieval_amplitude: share of the typical roughness always kept


TRUNKS = ("film", "unet")  # the conv generator's trunk networks
MEAN_HEADS = ("slots", "unet")  # the conv generator's mean heads
BACKBONES = ("scene_transformer", "conv_generator", "unet")
# keys of a U-Net folder's config.json saved before the U-Net was a backbone
_LEGACY_UNET_KEYS = {"modalities", "stats", "image_size", "widths", "source"}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (backbone, sizes and modality table).

    ``backbone`` names the model class (``terrasynth.models.factory`` builds it); the
    transformer's fields (patch, dim, depth, ...) and the convolutional generator's
    (``widths``, ``ensemble``, ...) sit side by side, each backbone reading its own. The
    deterministic U-Net (``"unet"``) reads ``widths`` and ``image_size``.
    """

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
    backbone: str = "scene_transformer"  # the model class (see BACKBONES)
    # convolutional generator (backbone "conv_generator"); the U-Net ("unet") reads widths
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels per level
    cond_dim: int = 32  # sensor / place / time conditioning vector
    generator_channels: int = 32  # width of the residual generator
    ensemble: int = 4  # members per chip in training (fair CRPS, energy score)
    spread_scale: dict[str, float] = field(default_factory=dict)  # calibration per modality
    # calibration per modality, band and spatial scale: per band (in the order of the
    # modality's band groups) factors on the residual's scale bands (models/filters.py),
    # fitted on validation so that each scale's spread matches the error at that scale
    # (samples as rough as the truth, relief as large as the error)
    spread_bands: dict[str, list[list[float]]] = field(default_factory=dict)
    # the same for the deterministic mean: per band and scale, the least-squares factor
    # that maps the mean's scale band onto the truth's on validation, so structure the
    # mean invents (roads as relief) shrinks and structure it gets right stays
    mean_bands: dict[str, list[list[float]]] = field(default_factory=dict)
    retrieval_k: int = 0  # training chips looked up per window as conditioning (0: none)
    relief_smoothing: float = 0.0  # Gaussian sigma (px) on elevation targets' residual
    # each sample takes the level of one retrieved neighbour (a mixture, as kNN's ensemble
    # is), weighted by how near the neighbours are on the ground; training hides neighbours
    # nearer than one of these radii (m), drawn per chip, so the model learns both near
    # and far neighbours (a place far from every training chip)
    retrieval_mixture: bool = False
    retrieval_exclusion_m: list[float] = field(default_factory=lambda: [2560.0])
    # with the mixture: each pixel's level is a convex mix of the neighbours' levels
    # (weights from the generator), so residual spectra are mixes of real chips' spectra
    neighbour_pixels: bool = False
    # with the mixture: the share of a neighbour's deviation each sample carries at the start
    # of training (learned from the target's conditioning afterwards); near 1, samples start
    # as kNN's ensemble does, each at one neighbour's level
    level_gate_init: float = 0.5
    # with retrieval: the structure within a generated chip (the mean head's deviation from
    # its chip mean, and the residual) is scaled per band by how rough the neighbours were
    # (their mean within-chip std over the index's median), so where the neighbours are
    # flat (sea, a plain) the model does not invent relief or texture
    retrieval_amplitude: bool = False
    retrieval_amplitude_max: float = 3.0  # at most this many times the typical roughness
    # with retrieval: level and structure apart (continuous targets whose neighbours were
    # found). The chip's level is the neighbours' (weighted) level, as kNN's is; the mean
    # head and the residual give only the structure within the chip (their chip means
    # removed); each sample's level spread is a gated share of a neighbour's deviation
    neighbour_level: bool = False
    # with neighbour_level: a learned share (per chip and target, from its conditioning) of
    # the head's and the residual's chip means is added back, starting at this share; where
    # the inputs fix the level (S2 L2A -> L1C) the model can learn to correct the
    # neighbours, elsewhere it keeps their level (0: no gate, the neighbours' level alone)
    head_level_gate_init: float = 0.0
    # with the mixture, for elevation targets (units m): the mean head's correction of the
    # neighbours' level (its own chip level) is bounded, smoothly (tanh), by this many
    # times the neighbours' spread of levels (their weighted std, plus a small floor), so
    # where near neighbours agree the level stays theirs and where they disagree the head
    # may move it; the residual's chip level is removed (or, with residual_level_bound,
    # bounded), so a sample's level is the bounded mean's plus its gated share of the
    # neighbours' deviations (0: unbounded)
    level_correction_bound: float = 0.0
    # with level_correction_bound: each sample's deviation from the mean (its residual and
    # neighbours' deviations, after calibration) keeps a chip level of its own, bounded
    # (tanh) by this many times the same spread of the neighbours' levels, so where they
    # disagree the samples' levels spread and where they agree they do not, whatever the
    # calibration's factors (0: the residual's own chip level is removed)
    residual_level_bound: float = 0.0
    # the mean as a regression (training): samples are built on the mean with its gradient
    # stopped, so the mean head (and the trunk through it) learns from the squared error of
    # the mean alone, as the U-Net baseline does, and the scores train only the residual
    regression_mean: bool = False
    # with regression_mean: the residual generator also reads the trunk's features and the
    # conditioning with their gradient stopped (training), so the trunk, like the U-Net
    # baseline's, learns from the mean's squared error alone and the scores train only the
    # residual generator's own layers
    regression_trunk: bool = False
    # the trunk's network: "film" (spectral slots, FiLM from the given sensors, GSD and
    # place in every block, reflection padding) or "unet" (the U-Net baseline's network:
    # every sensor's bands on channels of their own, one mask per band group, zero padding,
    # max pooling, transposed convolutions; the conditioning then reaches only the heads and
    # the residual generator). Measured in docs/design.md (issue 17, tenth round)
    trunk: str = "film"
    # the mean's heads: "slots" (the target sensor's FiLM on the trunk's features, one head
    # per spectral slot shared by the sensors, a scale and shift per band) or "unet" (with
    # trunk "unet": the U-Net baseline's own heads, one 1x1 convolution per modality on the
    # unmodulated features). The residual generator is the same with either
    mean_heads: str = "slots"
    # sampling windows (0: the training crop, half-window stride); a fully convolutional
    # model can also slide with a smaller overlap
    window: int = 0
    window_stride: int = 0

    @property
    def window_size(self) -> int:
        """Pixels of the base grid the model sees per window when sampling."""
        return self.window or self.image_size

    @property
    def stride(self) -> int:
        """Base-grid pixels between neighbouring sampling windows."""
        return self.window_stride or self.window_size // 2

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

    def _validate_scale_bands(self) -> None:
        reg = self.registry
        for key, table in (("spread_bands", self.spread_bands), ("mean_bands", self.mean_bands)):
            for name, rows in table.items():
                if name not in self.modalities or reg[name].kind != "continuous":
                    raise TerrasynthError(f"{key}: '{name}' is no continuous modality")
                bands = sum(len(g.bands) for g in reg[name].groups)
                if len(rows) != bands or any(len(r) != NUM_BANDS for r in rows):
                    raise TerrasynthError(
                        f"{key}['{name}']: {bands} rows of {NUM_BANDS} factors expected"
                    )

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise TerrasynthError(
                f"unknown backbone '{self.backbone}' (backbones: {', '.join(BACKBONES)})"
            )
        if self.backbone == "conv_generator":
            multiple = 2 ** (len(self.widths) - 1) * max(
                (g.factor for m in self.raster_modalities() for g in m.groups), default=1
            )
            if self.image_size % multiple:
                raise TerrasynthError(f"image_size must be a multiple of {multiple}")
            for w in self.widths:
                if w % min(8, w):
                    raise TerrasynthError(f"widths must be multiples of 8 (GroupNorm), got {w}")
            if self.retrieval_k < 0:
                raise TerrasynthError("retrieval_k must be 0 (no retrieval) or more")
            if self.ensemble < 2:
                raise TerrasynthError("ensemble must be at least 2 (fair CRPS needs pairs)")
            if self.neighbour_pixels and not (self.retrieval_mixture and self.retrieval_k > 0):
                raise TerrasynthError("neighbour_pixels needs retrieval_mixture and retrieval_k")
            if self.retrieval_amplitude and self.retrieval_k <= 0:
                raise TerrasynthError("retrieval_amplitude needs retrieval_k")
            if self.retrieval_amplitude_max <= AMPLITUDE_FLOOR:
                raise TerrasynthError(
                    f"retrieval_amplitude_max must be more than the floor {AMPLITUDE_FLOOR}"
                )
            if self.trunk not in TRUNKS:
                raise TerrasynthError(f"unknown trunk '{self.trunk}' (trunks: {', '.join(TRUNKS)})")
            if self.mean_heads not in MEAN_HEADS:
                raise TerrasynthError(
                    f"unknown mean_heads '{self.mean_heads}' (mean heads: {', '.join(MEAN_HEADS)})"
                )
            if self.mean_heads == "unet" and self.trunk != "unet":
                raise TerrasynthError('mean_heads "unet" needs trunk "unet"')
            if self.regression_trunk and not self.regression_mean:
                raise TerrasynthError("regression_trunk needs regression_mean")
            if self.neighbour_level and not (self.retrieval_mixture and self.retrieval_k > 0):
                raise TerrasynthError("neighbour_level needs retrieval_mixture and retrieval_k")
            if not 0.0 <= self.head_level_gate_init < 1.0:
                raise TerrasynthError("head_level_gate_init: a share from 0 (no gate) below 1")
            if self.head_level_gate_init > 0 and not self.neighbour_level:
                raise TerrasynthError("head_level_gate_init needs neighbour_level")
            if self.level_correction_bound < 0 or (
                self.level_correction_bound > 0
                and (self.neighbour_level or not (self.retrieval_mixture and self.retrieval_k > 0))
            ):
                raise TerrasynthError(
                    "level_correction_bound: 0 (off) or a positive multiple, with "
                    "retrieval_mixture and retrieval_k, not beside neighbour_level"
                )
            if self.residual_level_bound < 0 or (
                self.residual_level_bound > 0 and self.level_correction_bound <= 0
            ):
                raise TerrasynthError(
                    "residual_level_bound: 0 (removed) or a positive multiple, with "
                    "level_correction_bound"
                )
            if not 0.0 < self.level_gate_init < 1.0:
                raise TerrasynthError("level_gate_init: a share between 0 and 1 (exclusive)")
            if not self.retrieval_exclusion_m or min(self.retrieval_exclusion_m) < 0:
                raise TerrasynthError("retrieval_exclusion_m: one or more radii of 0 m or more")
            self._validate_scale_bands()
            return
        if self.backbone == "unet":
            multiple = 2 ** (len(self.widths) - 1)
            if self.image_size % multiple:
                raise TerrasynthError(f"image_size must be a multiple of {multiple}")
            for w in self.widths:
                if w % min(8, w):
                    raise TerrasynthError(f"widths must be multiples of 8 (GroupNorm), got {w}")
            return
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
        if "backbone" not in d and set(d) <= _LEGACY_UNET_KEYS and "widths" in d:
            # a U-Net folder saved before the U-Net was a backbone: raster modalities,
            # statistics, window and widths; it used neither location nor time
            d = {**d, "backbone": "unet", "use_location": False, "use_time": False}
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
# The convolutional generator: window, widths per level, generator width, ensemble.
# The design measured best on the frozen protocol (docs/design.md, issue 17): retrieval of
# 8 neighbours as a mixture of their levels, per pixel, neighbours hidden in training within
# a radius drawn per chip, elevation residuals smoothed by 2 px.
PIXEL_MIXTURE: dict[str, Any] = dict(
    retrieval_k=8,
    retrieval_mixture=True,
    retrieval_exclusion_m=[600.0, 2560.0, 50000.0],
    neighbour_pixels=True,
    relief_smoothing=2.0,
)
CONV_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        image_size=32,
        widths=[32, 64, 128],
        generator_channels=32,
        ensemble=4,
        window_stride=24,
        **PIXEL_MIXTURE,
    ),
    "small": dict(
        image_size=64, widths=[48, 96, 192], generator_channels=48, ensemble=4, **PIXEL_MIXTURE
    ),
    "base": dict(
        image_size=128,
        widths=[64, 128, 256, 512],
        generator_channels=64,
        ensemble=6,
        **PIXEL_MIXTURE,
    ),
}
# The deterministic U-Net: window and widths per level; it conditions on rasters only.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(image_size=size, widths=widths, use_location=False, use_time=False)
    for name, size, widths in (
        ("tiny", 32, [32, 64, 128]),
        ("small", 64, [48, 96, 192]),
        ("base", 128, [64, 128, 256, 512]),
    )
}


def preset_config(
    name: str, modalities: dict[str, dict], stats: dict, backbone: str = "scene_transformer"
) -> ModelConfig:
    table = {"conv_generator": CONV_PRESETS, "unet": UNET_PRESETS}.get(backbone, PRESETS)
    if name not in table:
        raise TerrasynthError(f"unknown preset '{name}' (presets: {', '.join(table)})")
    cfg = ModelConfig(
        backbone=backbone, modalities=modalities, stats=stats, preset=name, **table[name]
    )
    cfg.validate()
    return cfg
