"""The convolutional generator: a full-resolution U-Net mean plus a one-step residual generator.

Built for sample quality per CPU-hour. Every raster modality enters at full resolution as
values and a given-mask (coarser band groups repeated onto the finest grid):

* **Spectral slots.** Bands of optical sensors that share a wavelength range (the
  registry's ``spectral`` mapping: S2 L1C/L2A B04, Landsat 8 B4, Landsat 7 B3 are all
  ``red``) share one input channel pair and one output channel. Values stay in each
  sensor's store-normalised units; which sensors were given and which one is generated
  are learned conditioning vectors (FiLM), so a band subset or an unseen sensor
  combination still uses what the other sensors taught. Other modalities (radar,
  elevation, class maps) have channels of their own.
* **Trunk.** A U-Net over the stacked inputs, every block modulated by the conditioning
  vector (given sensors, ground sampling distance, location and time when given).
* **Mean.** Per generated modality, a 1 x 1 head on the trunk's full-resolution features
  (FiLM'd by the target sensor): normalised values (continuous) or class logits.
* **Residual generator.** For continuous targets, a small convolutional net maps the
  trunk features and spatially coherent noise to a residual added to the mean. The noise
  is the target's own pixel noise (the sampler's start noise: one field shared by
  overlapping windows, so whole scenes stay seamless) blurred by Gaussians of several widths
  and rescaled to unit variance: a fine map, two low-resolution maps, and a near-constant
  latent (8 px Gaussian) that FiLMs every generator layer. Trained with proper scores
  over an ensemble (``training/score_objective.py``), the residuals carry the conditional
  spread; ``spread_scale`` (per modality, fitted on the validation split) calibrates it.

* **Retrieval** (``retrieval_k``): the nearest training chips' levels condition the mean
  (``models/retrieval.py``). Options measured in docs/design.md (off by default): a mixture
  of the neighbours' levels across samples (``retrieval_mixture``), and per pixel
  (``neighbour_pixels``), so levels and residual spectra come from real chips; level and
  structure apart (``neighbour_level``): the chip's level is the neighbours' alone, and the
  mean head and residual give only the structure within the chip.

The model is a one-step sampler: it reads the target's noisy input at ``t = 1`` as its
noise, and its output there is a sample. ``default_steps`` is 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from terrasynth.errors import TerrasynthError
from terrasynth.modalities import Modality
from terrasynth.modalities.registry import SPECTRAL_SLOTS
from terrasynth.models.base import (
    FullResolutionFeatures,
    PretrainedMixin,
    check_precision,
    native_bf16,
)
from terrasynth.models.config import AMPLITUDE_FLOOR, ModelConfig
from terrasynth.models.filters import gaussian_blur, radius_of, rescale_bands
from terrasynth.models.retrieval import RetrievalIndex, summarise, summary_size
from terrasynth.models.scene_model import ModalityInput
from terrasynth.models.unet import UNet, unet_config

NOISE_CHANNELS = 4  # noise maps per blur width
# how near the retrieved neighbours are (mixture): mean and nearest log distance, place known
DISTANCE_FEATURES = ("mean_log_km", "nearest_log_km", "place_known")
RATE_GAIN = 10.0  # the nearness rate's parameter is scaled up so that Adam moves it in time
RANK = 3  # spectral rank of the residual: each pixel's residual spectrum mixes RANK loadings
NOISE_SIGMAS = (0.0, 1.5, 4.0)  # fine and low-resolution noise maps (Gaussian, base-grid px)
LATENT_SIGMA = 8.0  # the near-constant latent
# with level_correction_bound: the bound's floor (normalised units, 2 % of a band's spread
# over the training set) where the neighbours agree on the level exactly
LEVEL_BOUND_FLOOR = 0.02


def _k(name: str) -> str:
    return name.replace("/", "__").replace(".", "_")


class FiLMBlock(nn.Module):
    """Two 3 x 3 convolutions with GroupNorm and SiLU, modulated by a conditioning vector."""

    def __init__(self, cin: int, cout: int, cond_dim: int) -> None:
        super().__init__()
        # reflect padding: zero padding draws a frame into every window's border
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect")
        self.norm1 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, padding_mode="reflect")
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.film = nn.Linear(cond_dim, 2 * cout)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(c)[:, :, None, None].chunk(2, 1)
        h = F.silu(self.norm1(self.conv1(x)) * (1 + scale) + shift)
        h = self.norm2(self.conv2(h))
        return F.silu(h + self.skip(x))


def _modulate(x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
    scale, shift = film.chunk(2, 1)
    return x * (1 + scale) + shift


def smooth_noise(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Noise blurred by a Gaussian of ``sigma`` pixels, rescaled to unit variance (a
    Gaussian rather than a box: a box's side lobes turn noise into stripes)."""
    if sigma <= 0:
        return noise
    radius = radius_of(sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    gain = float(((k / k.sum()) ** 2).sum())  # variance of white noise after one 1-D pass
    return gaussian_blur(noise, sigma) / gain


def _weighted_level(levels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, C) the neighbours' levels (B, k, C; NaN unknown) averaged with ``weight`` (B, k)
    over the known ones."""
    w = weight[:, :, None] * torch.isfinite(levels)
    return (torch.nan_to_num(levels) * w).sum(1) / w.sum(1).clamp_min(1e-6)


def _level_spread(levels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, C) the weighted standard deviation of the neighbours' levels (B, k, C; NaN
    unknown) around their weighted mean: how much the neighbours disagree on the level."""
    w = weight[:, :, None] * torch.isfinite(levels)
    mean = _weighted_level(levels, weight)
    sq = (torch.nan_to_num(levels) - mean[:, None]) ** 2
    return ((sq * w).sum(1) / w.sum(1).clamp_min(1e-6) + 1e-12).sqrt()  # finite gradient at 0


def _bounded_level(x: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) with its chip level ``m`` (per image and band) replaced by
    ``bound * tanh(m / bound)``: at most ``bound`` (B, C), unchanged where it is small
    against it; the structure within the chip is kept."""
    level = x.mean((2, 3), keepdim=True)
    b = bound[:, :, None, None].to(x)
    return x - level + b * torch.tanh(level / b)


def _rows(inputs: dict[str, ModalityInput], rows: slice) -> dict[str, ModalityInput]:
    """The inputs of some rows of the batch."""
    return {
        n: ModalityInput(
            inp.t[rows],
            inp.present[rows],
            groups=None if inp.groups is None else {g: v[rows] for g, v in inp.groups.items()},
            vector=None if inp.vector is None else inp.vector[rows],
        )
        for n, inp in inputs.items()
    }


def _interleave(samples: list[dict]) -> dict:
    """One batch from per-member outputs: row ``u * len(samples) + i`` is member ``i``'s
    row ``u`` (the order of :meth:`ConvGenerator.forward`'s ``repeats``)."""

    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(parts, 1).flatten(0, 1)

    out = {}
    for name, value in samples[0].items():
        if isinstance(value, dict):
            out[name] = {g: join([s[name][g] for s in samples]) for g in value}
        else:
            out[name] = join([s[name] for s in samples])
    return out


def _uniform_from_noise(noise: torch.Tensor) -> torch.Tensor:
    """(B,) uniform in [0, 1) from a window of unit-variance white noise (B, C, S, S): the
    first channel's mean, rescaled to unit variance, through the normal CDF. Taken from the
    sample's own noise, so a seed decides it and overlapping windows of one scene agree
    the more, the more they overlap."""
    z = noise[:, 0].float().mean((-2, -1)) * math.sqrt(noise[0, 0].numel())
    return (0.5 * (1 + torch.erf(z / math.sqrt(2)))).clamp(0, 1 - 1e-6)


def _given_place(inp: ModalityInput | None) -> torch.Tensor | None:
    """(B, 3) unit vectors of a given location input (NaN rows where it is not given)."""
    if inp is None or inp.vector is None:
        return None
    c = inp.vector.shape[1] // 3
    shown = (inp.present.bool() & (inp.t == 0))[:, None]
    v = inp.vector[:, c : 2 * c].float()
    return torch.where(shown, v, torch.full_like(v, math.nan))


def _anomaly(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (B, C, H, W) minus its mean per image and band (its chip level); with ``keep``
    (B, 1, 1, 1), that share of the chip level stays."""
    level = x.mean((2, 3), keepdim=True)
    return x - level if keep is None else x - (1 - keep) * level


def by_group(mod: Modality, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split ``x`` (B, C, ...), C the bands of all of ``mod``'s groups in order, per group."""
    out, offset = {}, 0
    for g in mod.groups:
        out[g.name] = x[:, offset : offset + len(g.bands)]
        offset += len(g.bands)
    return out


def band_rows(mod: Modality, rows: list[list[float]]) -> dict[str, torch.Tensor]:
    """Per band group, its rows (C, ...) of a table with one row per band of ``mod``."""
    t = torch.as_tensor(rows, dtype=torch.float32)
    return {g: v.transpose(0, 1) for g, v in by_group(mod, t.transpose(0, 1)).items()}


class ConvGenerator(FullResolutionFeatures, PretrainedMixin, nn.Module):
    """Any-to-any generator over raster modalities (see the module docstring)."""

    default_steps = 1  # one-step sampler: the output at t = 1 is a sample
    cpu_bf16 = False  # convolutions: fp32 on CPU (see GenerativeModel.cpu_bf16)
    shares_conditions = True  # the trunk reads the conditions only, never the noise

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        # precision of the trunk's and the residual generator's convolutions out of training
        # ("auto": bfloat16 where the device runs it natively, else float32; base.PRECISIONS).
        # The heads, levels, noise and calibration stay float32: a DEM's relief is far below
        # bfloat16's resolution of its normalised values. Training is always float32 here.
        self.precision = "auto"
        # the modalities are fixed with the layers built for them: parsed once, not per call
        self.registry = config.registry
        self.rasters: list[Modality] = config.raster_modalities()
        self.vectors = config.vector_modalities()
        names = [m.name for m in self.rasters]
        self.modality_names = names + list(self.vectors)
        self.slot_names = list(SPECTRAL_SLOTS)
        n_slots = len(self.slot_names)
        w, cd = list(config.widths), config.cond_dim
        # Fixed band -> slot maps per band group, and the channels of unmapped bands.
        # per band group: the slot of each band (0 for a band without one: its own head
        # overwrites it) and the bands that have a slot. The band -> slot map is one-hot,
        # so gathers and index sums stand for the matrix products it would otherwise take
        self._slot_of: dict[str, torch.Tensor] = {}
        self._slotted: dict[str, torch.Tensor] = {}
        cin = 2 * n_slots
        self._own: dict[str, list[int]] = {}  # group key -> indices of bands without a slot
        for mod in self.rasters:
            slots = mod.spectral_slots
            for g in mod.groups:
                key = f"{mod.name}/{g.name}"
                if mod.kind == "categorical":
                    self._own[key] = list(range(mod.num_classes))
                    cin += mod.num_classes + 1
                    continue
                slot_of, own = [], []
                for i, b in enumerate(g.bands):
                    if b in slots:
                        slot_of.append(self.slot_names.index(slots[b]))
                    else:
                        slot_of.append(0)
                        own.append(i)
                self._slot_of[key] = torch.tensor(slot_of, dtype=torch.long)
                self._slotted[key] = torch.tensor(
                    [i for i in range(len(g.bands)) if i not in own], dtype=torch.long
                )
                self._own[key] = own
                cin += 2 * len(own)
        self.in_channels = cin
        # conditioning: given sensors, target sensors, GSD, location, time
        self.sensor_in = nn.Embedding(len(names), cd)
        self.sensor_out = nn.Embedding(len(names), cd)
        self.cond_mlp = nn.Sequential(nn.Linear(cd + 1 + 8, cd), nn.SiLU(), nn.Linear(cd, cd))
        # trunk: the generator's own (FiLM blocks over spectral slots) or the U-Net's
        self.unet_trunk: UNet | None = None
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        if config.trunk == "unet":
            ucfg = unet_config(config)
            ucfg.widths = list(w)
            self.unet_trunk = UNet(ucfg)
            if config.mean_heads != "unet":  # this model's slot heads read its features
                self.unet_trunk.heads = nn.ModuleDict()
        else:
            self.stem = nn.Conv2d(cin, w[0], 1)  # per-pixel embedding of the stacked inputs
            prev = w[0]
            for width in w:
                self.down.append(FiLMBlock(prev, width, cd))
                prev = width
            for i in range(len(w) - 2, -1, -1):
                self.up.append(nn.Conv2d(w[i + 1], w[i], 1))
                self.merge.append(FiLMBlock(2 * w[i], w[i], cd))
        # heads: FiLM per target sensor, a shared slot head, own heads for unmapped bands
        f0, gch = w[0], config.generator_channels
        self.target_film = nn.Linear(cd, 2 * f0 + 2 * gch)
        nn.init.zeros_(self.target_film.weight)
        nn.init.zeros_(self.target_film.bias)
        slot_heads = config.mean_heads == "slots"  # else the U-Net trunk's own heads
        self.slot_head = nn.Conv2d(f0, n_slots, 1) if slot_heads else None
        # residual = sum over RANK coefficient maps (from the generator) of spectral loadings
        # (from the trunk): a pixel's residual spectrum is a mix of a few plausible spectra,
        # not independent noise per band (which paints fields pure red or green)
        self.coef = nn.Conv2d(gch, RANK, 1)
        self.slot_loadings = nn.Conv2d(f0, RANK * n_slots, 1)
        self.own_head = nn.ModuleDict()
        self.own_residual = nn.ModuleDict()
        self.band_scale = nn.ParameterDict()
        self.band_shift = nn.ParameterDict()
        for mod in self.rasters:
            for g in mod.groups:
                key = f"{mod.name}/{g.name}"
                own = self._own[key]
                if own and slot_heads:
                    self.own_head[_k(key)] = nn.Conv2d(f0, len(own), 1)
                if own and mod.kind != "categorical":
                    self.own_residual[_k(key)] = nn.Conv2d(f0, RANK * len(own), 1)
                if mod.kind != "categorical" and slot_heads:
                    # per-sensor calibration of the shared slots (identity at start)
                    self.band_scale[_k(key)] = nn.Parameter(torch.ones(len(g.bands)))
                    self.band_shift[_k(key)] = nn.Parameter(torch.zeros(len(g.bands)))
        n_noise = NOISE_CHANNELS * len(NOISE_SIGMAS)
        self.gen_in = nn.Conv2d(f0 + n_noise, gch, 3, padding=1, padding_mode="reflect")
        self.gen_mid = nn.Conv2d(gch, gch, 3, padding=1, padding_mode="reflect")
        # the near-constant latent and the conditioning modulate both generator layers
        self.gen_latent = nn.Conv2d(NOISE_CHANNELS, 4 * gch, 1)
        self.gen_cond = nn.Linear(cd, 4 * gch)
        self.vector_head = nn.ModuleDict(
            {_k(n): nn.Linear(w[-1] + cd, size) for n, size in self.vectors.items()}
        )
        # retrieval (models/retrieval.py): what the k most alike training chips' generated
        # modality looked like, embedded into the target's conditioning; the index itself
        # is set by the trainer (set_retrieval) and saved with the weights
        self.retrieval: RetrievalIndex | None = None
        self._typical_within: dict[str, torch.Tensor] = {}  # retrieval_amplitude's yardstick
        self.retrieval_embed = nn.ModuleDict()
        # mixture (config.retrieval_mixture): how near the neighbours are is conditioning
        # too; the level is their mean weighted by nearness (a learned rate per modality);
        # each sample adds a gated share of one neighbour's deviation from that mean
        self.mixture = config.retrieval_k > 0 and config.retrieval_mixture
        self.nearness_rate = nn.ParameterDict()
        if config.retrieval_k > 0:
            for mod in self.rasters:
                n = summary_size(mod)
                n = n if mod.kind == "categorical" else 3 * n // 2
                extra = len(DISTANCE_FEATURES) if self.mixture else 0
                self.retrieval_embed[_k(mod.name)] = nn.Linear(n + 1 + extra, cd)
                if self.mixture:
                    self.nearness_rate[_k(mod.name)] = nn.Parameter(torch.zeros(1))
        if self.mixture:
            self.level_gate = nn.Linear(cd, 1)  # share of a neighbour's deviation
            nn.init.zeros_(self.level_gate.weight)
            share = config.level_gate_init
            nn.init.constant_(self.level_gate.bias, math.log(share / (1 - share)))
        if config.head_level_gate_init > 0:  # share of the head's own level (neighbour_level)
            self.head_level_gate = nn.Linear(cd, 1)
            nn.init.zeros_(self.head_level_gate.weight)
            share = config.head_level_gate_init
            nn.init.constant_(self.head_level_gate.bias, math.log(share / (1 - share)))
        self.neighbour_pixels = self.mixture and config.neighbour_pixels
        if self.neighbour_pixels:  # per pixel: logits over the neighbours (equal at start)
            self.neighbour_logits = nn.Conv2d(config.generator_channels, config.retrieval_k, 1)
            nn.init.zeros_(self.neighbour_logits.weight)
            nn.init.zeros_(self.neighbour_logits.bias)

    def parameter_parts(self) -> dict[str, list[nn.Parameter]]:
        """The parameters in two parts, each once: the trunk (the U-Net's, with its heads
        when they give the mean, or the FiLM blocks) and the rest (conditioning, heads,
        residual generator); the trainer can clip their gradients apart."""
        if self.unet_trunk is not None:
            trunk = list(self.unet_trunk.parameters())
        else:
            trunk = [p for m in (self.stem, self.down, self.up, self.merge) for p in m.parameters()]
        ids = {id(p) for p in trunk}
        return {"trunk": trunk, "rest": [p for p in self.parameters() if id(p) not in ids]}

    def set_retrieval(self, index: RetrievalIndex | None) -> None:
        """Use ``index`` (training chips' summaries) as conditioning from now on."""
        self.retrieval = index
        self._typical_within = {}
        if index is not None and self.config.retrieval_amplitude:
            for mod in self.rasters:
                rows = index.rows(mod.name)
                if rows is None or mod.kind == "categorical":
                    continue
                c = rows.shape[1] // 2
                within = rows[:, c:].nanmedian(0).values
                self._typical_within[mod.name] = torch.nan_to_num(within, nan=1.0).clamp_min(1e-3)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also restores a saved retrieval index (``retrieval.*`` tensors): the saved one
        replaces any index the model holds."""
        state = dict(state_dict)
        index = RetrievalIndex.from_state(state, "retrieval.")
        if index is not None:
            self.set_retrieval(index.to(next(self.parameters()).device))
            state = {k: v for k, v in state.items() if not k.startswith("retrieval.")}
            state.update({f"retrieval.{k}": v for k, v in index.state_dict().items()})
        return super().load_state_dict(state, strict=strict, assign=assign)

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        inputs: dict[str, ModalityInput],
        gsd: torch.Tensor,
        members: int = 1,
        generator: torch.Generator | None = None,
        places: torch.Tensor | None = None,
        repeats: int = 1,
    ):
        """x0 of every generated modality (``t > 0`` for some sample).

        With ``members`` > 1 (training), returns ``(mean, samples)``: the deterministic mean
        and a list of ``members`` samples, the first from the inputs' own noise and the
        others from fresh noise drawn from ``generator``. ``places`` (B, 3), training only:
        the chips' locations, so that retrieval ignores their own surroundings.

        ``repeats`` > 1 (sampling): the batch holds groups of ``repeats`` consecutive rows
        with the same conditions and their own noise (the samples of one window); the
        trunk, retrieval and heads run once per group, the residual once per row. The
        result is the same as without it, in about half the time for 8 samples.
        """
        if repeats > 1:
            if members != 1 or gsd.shape[0] % repeats:
                raise TerrasynthError("repeats: a batch of whole groups, one member each")
            groups = [_rows(inputs, slice(i, None, repeats)) for i in range(repeats)]
            _, samples = self._generate(groups[0], gsd[::repeats], repeats, None, None, groups)
            return _interleave(samples)
        return self._generate(inputs, gsd, members, generator, places, None)

    def _generate(
        self,
        inputs: dict[str, ModalityInput],
        gsd: torch.Tensor,
        members: int,
        generator: torch.Generator | None,
        places: torch.Tensor | None,
        noise_from: list[dict[str, ModalityInput]] | None,
    ):
        """:meth:`forward`; member ``i`` takes its noise from ``noise_from[i]`` if given."""
        targets = [n for n, inp in inputs.items() if bool((inp.t > 0).any())]
        feats, deep, cond = self._trunk(inputs, gsd)
        # regression_trunk: in training the residual path reads the trunk with its gradient
        # stopped, so only the mean's squared error trains the trunk
        cut = self.config.regression_trunk and members > 1

        def cut_grad(x: torch.Tensor) -> torch.Tensor:
            return x.detach() if cut else x

        retrieved, neighbours = self._retrieve(inputs, targets, places, generator)
        continuous = [
            n
            for n in targets
            if inputs[n].groups is not None and self.registry[n].kind != "categorical"
        ]
        # One generator pass per member serves every generated modality: its noise is the
        # sum of theirs (rescaled), so jointly generated modalities vary together.
        gen_feats, picks = [], []
        for i in range(members if continuous else 0):
            if noise_from is not None:
                noise = self._joint_noise(noise_from[i], continuous, False, None)
            else:
                noise = self._joint_noise(inputs, continuous, fresh=i > 0, generator=generator)
            gen_feats.append(self._residual(cut_grad(feats), noise, cut_grad(cond)))
            picks.append(_uniform_from_noise(noise))
        mean: dict = {}
        samples: list[dict] = [{} for _ in range(members)]
        for name in targets:
            inp = inputs[name]
            if inp.groups is None:
                v = self.vector_head[_k(name)](torch.cat([deep.mean((2, 3)), cond], 1))
                mean[name] = v
                for s in samples:
                    s[name] = v
                continue
            mod = self.registry[name]
            ret = retrieved.get(name)
            film, e = self._target_film(name, cond, ret)
            f = _modulate(feats, film[0])
            # the mean: the slot heads on the target's FiLM'd features, or (mean_heads
            # "unet") the U-Net trunk's own head on the unmodulated ones
            mu = (
                self.unet_trunk.head(mod, feats)
                if self.config.mean_heads == "unet"
                else self._head(mod, f)
            )
            # the residual path's FiLM and target vector (their own rows of target_film)
            f0 = self.config.widths[0]
            film_r = self.target_film(e.detach())[:, 2 * f0 :, None, None] if cut else film[1]
            near = neighbours.get(name)
            # neighbour_level: where neighbours were found, the level is theirs alone
            apart = self._level_apart(mod, ret)
            keep = self._head_level_share(e)
            bounded = self._level_bounded(mod, ret)
            spread = self._neighbour_spread(mod, near)  # the level bounds' unit, or None
            if apart is not None:
                mu = {g: torch.where(apart, _anomaly(v, keep), v) for g, v in mu.items()}
            amp = self._amplitude(mod, ret)
            if amp is not None:  # the head's structure within the chip, as rough as theirs
                mu = {g: v + (amp[g] - 1) * _anomaly(v) for g, v in mu.items()}
            if ret is not None:
                mu = self._add_retrieved(mod, mu, ret, near, spread)
            # the mean calibrated per band and spatial scale; the residual (made against
            # the raw mean: the neighbours' levels are deviations from it) is unchanged
            shrink = self.config.mean_bands.get(name)
            rows = band_rows(mod, shrink) if shrink else {}
            mean[name] = {g: rescale_bands(v, rows[g]) if rows else v for g, v in mu.items()}
            if mod.kind == "categorical":
                for s in samples:
                    s[name] = mu
                continue
            scale = float(self.config.spread_scale.get(name, 1.0))
            # calibration per band and spatial scale (models/filters.py), once per modality
            bands = self.config.spread_bands.get(name)
            per_scale = band_rows(mod, bands) if bands else None
            loadings = self._band_loadings(mod, cut_grad(f))
            # regression_mean: in training the scores reach the residual, not the mean
            stop = self.config.regression_mean and members > 1
            base = {g: v.detach() if stop else v for g, v in mean[name].items()}
            smooth = self.config.relief_smoothing if mod.units == "m" else 0.0
            gate = torch.sigmoid(self.level_gate(cut_grad(e))) if near is not None else None
            mu_r = {g: cut_grad(v) for g, v in mu.items()}  # neighbours' deviations from it
            for s, h, u in zip(samples, gen_feats, picks, strict=True):
                res = self._residual_head(mod, loadings, self.coef(_modulate(h, film_r)))
                if smooth > 0:  # elevation varies smoothly at the pixel scale
                    res = {g: gaussian_blur(r, smooth) for g, r in res.items()}
                if amp is not None:
                    res = {g: amp[g] * r for g, r in res.items()}
                if apart is not None:  # the level's spread comes from the neighbours' levels
                    res = {g: torch.where(apart, _anomaly(r, keep), r) for g, r in res.items()}
                elif bounded is not None and self.config.residual_level_bound <= 0:  # no level
                    res = {g: torch.where(bounded, _anomaly(r), r) for g, r in res.items()}
                if near is not None and self.neighbour_pixels:  # each pixel: a mix of levels
                    hf = _modulate(h, film_r)
                    dev = self._pixel_levels(mod, mu_r, near, self.neighbour_logits(hf))
                    res = {g: res[g] + gate[:, :, None, None] * dev[g] for g in res}
                elif near is not None:  # this sample's neighbour: its level, gated
                    dev = self._level_deviation(mod, mu_r, near, u)
                    res = {g: res[g] + gate[:, :, None, None] * dev[g] for g in res}
                if per_scale is not None:
                    res = {g: rescale_bands(r, per_scale[g]) for g, r in res.items()}
                res = {g: scale * r for g, r in res.items()}
                if bounded is not None and self.config.residual_level_bound > 0:
                    res = self._residual_level(mod, res, bounded, spread)
                s[name] = {g: base[g] + res[g] for g in mu}
        if members == 1:
            return samples[0]
        return mean, samples

    # -- embeddings ------------------------------------------------------------------------
    def feature_map(self, inputs: dict[str, ModalityInput], gsd: torch.Tensor) -> torch.Tensor:
        """(B, widths[0], S, S): the trunk's full-resolution features (the last decoder
        block, which every mean head and the residual generator read), conditioned like
        every prediction (given sensors, GSD, location and time when given). Not the
        deepest features (``widths[-1]`` channels at 1/2^(levels-1) resolution): the
        full-resolution ones carry the deep context through the decoder and keep a
        feature per pixel. Nothing is generated: noise and retrieval play no part."""
        return self._trunk(inputs, gsd)[0]

    def _trunk(self, inputs: dict[str, ModalityInput], gsd: torch.Tensor):
        given_ids = self._given_sensors(inputs, gsd)
        b, dev = gsd.shape[0], gsd.device
        emb_in = (given_ids.float() @ self.sensor_in.weight) / given_ids.sum(1, keepdim=True).clamp(
            min=1
        )
        extra = [torch.log10(gsd.clamp_min(1e-3))[:, None].float()]
        for name in ("location", "time"):
            inp = inputs.get(name)
            if inp is not None and inp.vector is not None and name in self.vectors:
                c = inp.vector.shape[1] // 3
                shown = inp.present[:, None].float() * (inp.t == 0).float()[:, None]
                extra += [inp.vector[:, c : 2 * c] * shown, shown]
            else:
                extra += [torch.zeros(b, 3, device=dev), torch.zeros(b, 1, device=dev)]
        cond = self.cond_mlp(torch.cat([emb_in, *extra], 1))
        if self.unet_trunk is not None:  # its own input stack: the slots' is not built
            with self._fast_convolutions(dev):
                h, deep = self.unet_trunk.encode_decode(self.unet_trunk.stack(inputs, gsd))
            return h.float(), deep.float(), cond
        with self._fast_convolutions(dev):
            h = self.stem(self._stack(inputs, gsd))
            skips = []
            for i, block in enumerate(self.down):
                if i > 0:
                    h = F.avg_pool2d(h, 2)
                h = block(h, cond)
                skips.append(h)
            deep = h
            for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
                up_h = F.interpolate(up(h), scale_factor=2, mode="bilinear", align_corners=False)
                h = merge(torch.cat([up_h, skip], 1), cond)
        return h.float(), deep.float(), cond

    def sampling_precision(self, device: torch.device) -> str:
        """What the trunk and the residual generator compute in out of training on
        ``device``: ``"bfloat16"`` or ``"float32"``, as :attr:`precision` says."""
        precision = check_precision(self.precision)
        if precision == "auto":
            return "bfloat16" if native_bf16(device) else "float32"
        return precision

    def _fast_convolutions(self, device: torch.device) -> torch.autocast:
        """bfloat16 autocast for the trunk and the residual generator, out of training, as
        :attr:`precision` says (about 1.3 times faster sampling on a CPU with AVX512-BF16;
        ``bench/tile_latency.py``)."""
        on = not self.training and self.sampling_precision(device) == "bfloat16"
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)

    def _given_sensors(self, inputs: dict[str, ModalityInput], gsd: torch.Tensor) -> torch.Tensor:
        """(B, M) 1 where a raster modality has a given pixel in the row, else 0."""
        given = torch.zeros(gsd.shape[0], len(self.rasters), device=gsd.device)
        for mi, mod in enumerate(self.rasters):
            inp = inputs.get(mod.name)
            if inp is None or inp.groups is None:
                continue
            for xg in (inp.groups[g.name] for g in mod.groups if g.name in inp.groups):
                c = xg.shape[1] // 3
                shown = (xg[:, 2 * c :].flatten(1).amax(1) > 0) & inp.present
                given[:, mi] = torch.maximum(given[:, mi], shown.float())
        return given

    def _stack(self, inputs: dict[str, ModalityInput], gsd: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, S, S) given values and masks on the spectral slots."""
        ref = next(inp for inp in inputs.values() if inp.groups is not None)
        name0 = next(n for n, inp in inputs.items() if inp.groups is not None)
        g0 = next(iter(ref.groups))
        size = ref.groups[g0].shape[-1] * self.registry[name0].group(g0).factor
        b, dev = gsd.shape[0], gsd.device
        n_slots = len(self.slot_names)
        slot_sum = torch.zeros(b, n_slots, size, size, device=dev)
        slot_cnt = torch.zeros(b, n_slots, size, size, device=dev)
        own_parts = []
        for mod in self.rasters:
            inp = inputs.get(mod.name)
            for g in mod.groups:
                key = f"{mod.name}/{g.name}"
                own = self._own[key]
                n_own = len(own) + (1 if mod.kind == "categorical" else len(own))
                if inp is None or inp.groups is None or g.name not in inp.groups:
                    if n_own:
                        own_parts.append(torch.zeros(b, n_own, size, size, device=dev))
                    continue
                xg = inp.groups[g.name].float()
                c = xg.shape[1] // 3
                val, mask = xg[:, c : 2 * c], xg[:, 2 * c :]
                mask = mask * inp.present.float()[:, None, None, None]
                if g.factor > 1:
                    val = F.interpolate(val, scale_factor=g.factor, mode="nearest")
                    mask = F.interpolate(mask, scale_factor=g.factor, mode="nearest")
                if mod.kind == "categorical":
                    onehot = (val + 1) / 2 * mask
                    own_parts.append(torch.cat([onehot, mask.amax(1, keepdim=True)], 1))
                    continue
                bands = self._slotted[key].to(dev)
                slots = self._slot_of[key].to(dev)[bands]
                slot_sum = slot_sum.index_add(1, slots, (val * mask)[:, bands])
                slot_cnt = slot_cnt.index_add(1, slots, mask[:, bands])
                if own:
                    own_parts.append(torch.cat([val[:, own] * mask[:, own], mask[:, own]], 1))
        slots = slot_sum / slot_cnt.clamp_min(1.0)
        return torch.cat([slots, (slot_cnt > 0).float(), *own_parts], 1)

    def _retrieve(
        self,
        inputs: dict[str, ModalityInput],
        targets: list[str],
        places: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per generated raster modality (B, R + 1): what its retrieved neighbours looked
        like (:meth:`RetrievalIndex.retrieved`) and whether any were found (with the
        mixture, then how near they are: :data:`DISTANCE_FEATURES`); and, with the
        mixture, per continuous modality each neighbour's level (B, k, C) and nearness
        weight (B, k). ``places`` (training): the chips' own places, hidden from
        retrieval within a radius drawn per chip from ``config.retrieval_exclusion_m``."""
        if self.retrieval is None or self.config.retrieval_k <= 0:
            return {}, {}
        queries = {}
        for mod in self.rasters:
            inp = inputs.get(mod.name)
            if inp is None or inp.groups is None or mod.name not in self.retrieval.names:
                continue
            values, known = {}, {}
            for g in mod.groups:
                xg = inp.groups.get(g.name)
                if xg is None:
                    break
                c = xg.shape[1] // 3
                values[g.name] = xg[:, c : 2 * c]
                known[g.name] = xg[:, 2 * c :] * inp.present.float()[:, None, None, None]
            if len(values) < len(mod.groups):
                continue
            q = summarise(mod, values, known)
            given = inp.present.bool() & (inp.t == 0)
            q[~given] = math.nan
            if bool(torch.isfinite(q).any()):
                queries[mod.name] = q
        out, near = {}, {}
        rasters = {m.name: m for m in self.rasters}
        exclude, here = None, places
        if self.mixture:
            if places is not None:  # training: how much of the neighbourhood is hidden
                radii = torch.tensor(self.config.retrieval_exclusion_m)
                pick = torch.randint(len(radii), (places.shape[0],), generator=generator)
                exclude = radii[pick]
            else:  # generation: the window's place, when the location is given
                here = _given_place(inputs.get("location"))
        param = next(self.parameters())
        for name in targets:
            mod = rasters.get(name)
            if mod is None or name not in self.retrieval.names:
                continue
            b = inputs[name].t.shape[0]
            k = self.config.retrieval_k
            idx, found = self.retrieval.neighbours(
                name, queries, k, places, batch=b, exclude_m=exclude
            )
            idx = idx.to(self.retrieval.places.device)
            r = self.retrieval.retrieved(mod, idx, found)
            parts = [r, found[:, None].float()]
            if self.mixture:
                km = (
                    self.retrieval.distance_km(here, idx)
                    if here is not None
                    else torch.full(idx.shape, math.nan)
                )
                logd = torch.log10(1 + km) / 4  # 0 at the place, 1 at 10,000 km
                known = torch.isfinite(logd[:, 0])
                logd = torch.nan_to_num(logd) * found[:, None].float()
                parts += [logd.mean(1, keepdim=True), logd[:, :1], known[:, None].float()]
                if mod.kind != "categorical":
                    rate = RATE_GAIN * self.nearness_rate[_k(name)]
                    weight = torch.softmax(-rate.to(logd) * 4 * logd.to(param), 1)
                    levels = self.retrieval.neighbour_levels(mod, idx).to(param)
                    near[name] = (levels * found[:, None, None].to(param), weight)
            out[name] = torch.cat(parts, 1).to(param)
        return out, near

    def _add_retrieved(
        self,
        mod: Modality,
        mu: dict[str, torch.Tensor],
        ret: torch.Tensor,
        near: tuple[torch.Tensor, torch.Tensor] | None = None,
        spread: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The mean head predicts the difference from the neighbours' level: their mean
        per band (continuous; weighted by nearness with the mixture) or the log of their
        class frequencies (class maps). With ``spread`` (``level_correction_bound``: the
        neighbours' spread of levels, :meth:`_neighbour_spread`), an elevation head's own
        chip level (its correction of the neighbours') is at most that many times it where
        neighbours were found."""
        found = self._found(ret)[:, None].to(ret)
        mean = _weighted_level(*near) if near is not None else None
        bound = self.config.level_correction_bound * spread if spread is not None else None
        out, offset = {}, 0
        for g in mod.groups:
            head = mu[g.name]
            if mod.kind == "categorical":
                level = torch.log(ret[:, : mod.num_classes] + 0.02) * found
            elif mean is not None:
                level = mean[:, offset : offset + len(g.bands)]
                if bound is not None:  # no neighbour found: the head's level, unbounded
                    bounded = _bounded_level(head, bound[:, offset : offset + len(g.bands)])
                    head = torch.where(found[:, :, None, None].bool(), bounded, head)
                offset += len(g.bands)
            else:
                level = ret[:, offset : offset + len(g.bands)]
                offset += len(g.bands)
            out[g.name] = head + level[:, :, None, None].to(head.dtype)
        return out

    def _found(self, ret: torch.Tensor) -> torch.Tensor:
        """(B,) bool: whether any neighbour was found, from a row of :meth:`_retrieve`
        (its summary, then the found flag, then the mixture's distance features)."""
        tail = len(DISTANCE_FEATURES) if self.mixture else 0
        return ret[:, ret.shape[1] - 1 - tail] > 0

    def _level_apart(self, mod: Modality, ret: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 1, 1, 1) bool with ``neighbour_level``: the chips whose level comes from
        their neighbours (continuous targets, neighbours found). None otherwise."""
        if ret is None or not self.config.neighbour_level or mod.kind == "categorical":
            return None
        return self._found(ret)[:, None, None, None]

    def _level_bounded(self, mod: Modality, ret: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 1, 1, 1) bool with ``level_correction_bound``: the chips whose level is the
        neighbours' plus the mean head's bounded correction (elevation targets, neighbours
        found). None otherwise."""
        if ret is None or not self._bounds_level(mod):
            return None
        return self._found(ret)[:, None, None, None]

    def _neighbour_spread(
        self, mod: Modality, near: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor | None:
        """(B, C) with ``level_correction_bound``: the neighbours' weighted spread of levels
        plus ``LEVEL_BOUND_FLOOR``, the unit of the level bounds (a constraint, not learnt
        through: the nearness weights are detached). None without neighbours."""
        if near is None or not self._bounds_level(mod):
            return None
        levels, weight = near
        return _level_spread(levels, weight.detach()) + LEVEL_BOUND_FLOOR

    def _residual_level(
        self,
        mod: Modality,
        res: dict[str, torch.Tensor],
        bounded: torch.Tensor,
        spread: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """With ``residual_level_bound``: a sample's whole deviation from the mean per group
        (its residual and neighbours' deviations, calibrated), in the ``bounded`` chips
        (B, 1, 1, 1), with its chip level at most that many times the neighbours' ``spread``
        (B, C), so no calibration factor spreads the level where the neighbours agree."""
        if spread is None:
            return res
        bound = by_group(mod, self.config.residual_level_bound * spread)
        return {g: torch.where(bounded, _bounded_level(r, bound[g]), r) for g, r in res.items()}

    def _bounds_level(self, mod: Modality) -> bool:
        """Whether ``level_correction_bound`` applies to ``mod``: elevation targets (units m),
        whose level the neighbours know best and the head moved most (issue 17, 13th round)."""
        return self.config.level_correction_bound > 0 and mod.units == "m"

    def _head_level_share(self, e: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, 1, 1) with ``head_level_gate_init``: the share of the head's and the
        residual's own chip level kept beside the neighbours' level. None without it."""
        if self.config.head_level_gate_init <= 0:
            return None
        return torch.sigmoid(self.head_level_gate(e))[:, :, None, None]

    def _amplitude(self, mod: Modality, ret: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """Per band group (B, C, 1, 1) with ``retrieval_amplitude``: the neighbours' mean
        within-chip std over the index's median one (at most ``retrieval_amplitude_max``; 1 where no
        neighbour was found). None without it or for class maps."""
        typical = self._typical_within.get(mod.name)
        if ret is None or typical is None:
            return None
        c = typical.shape[0]
        within = ret[:, 2 * c : 3 * c]
        found = self._found(ret)[:, None]
        typical = typical.to(within)
        ratio = ((within + AMPLITUDE_FLOOR * typical) / ((1 + AMPLITUDE_FLOOR) * typical)).clamp(
            max=self.config.retrieval_amplitude_max
        )
        ratio = torch.where(found, ratio, torch.ones_like(ratio))
        return {g: r[:, :, None, None] for g, r in by_group(mod, ratio).items()}

    def _pixel_levels(
        self,
        mod: Modality,
        mu: dict[str, torch.Tensor],
        near: tuple[torch.Tensor, torch.Tensor],
        logits: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per band group on its own grid: each pixel's convex mix of the neighbours' levels
        (weights: ``logits`` (B, k, H, W) plus the log nearness weights) minus their
        weighted mean. Unknown levels count as the mean (no deviation)."""
        levels, weight = near
        mean = _weighted_level(levels, weight)
        filled = torch.where(torch.isfinite(levels), levels, mean[:, None])
        mix = torch.softmax(logits + torch.log(weight.clamp_min(1e-6))[:, :, None, None], 1)
        dev = torch.einsum("bkhw,bkc->bchw", mix, filled - mean[:, None])
        factor = {g.name: g.factor for g in mod.groups}
        return {
            g: (F.avg_pool2d(d, factor[g]) if factor[g] > 1 else d).to(mu[g].dtype)
            for g, d in by_group(mod, dev).items()
        }

    def _level_deviation(
        self,
        mod: Modality,
        mu: dict[str, torch.Tensor],
        near: tuple[torch.Tensor, torch.Tensor],
        u: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per band group (B, C, 1, 1): one neighbour's level minus the weighted mean of all,
        the neighbour drawn by the nearness weights with ``u`` (B,) uniform in [0, 1)."""
        levels, weight = near
        mean = _weighted_level(levels, weight)
        cdf = weight.detach().cumsum(1)
        j = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None].contiguous())
        j = j.clamp(max=levels.shape[1] - 1)[:, 0]
        pick = levels[torch.arange(levels.shape[0], device=levels.device), j]  # (B, C)
        dev = torch.where(torch.isfinite(pick), pick - mean, torch.zeros_like(mean))
        return {g: d[:, :, None, None].to(mu[g].dtype) for g, d in by_group(mod, dev).items()}

    def _target_film(
        self, name: str, cond: torch.Tensor, retrieved: torch.Tensor | None = None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """FiLM (scale, shift) of the generated sensor for the trunk and generator features,
        and the target's conditioning vector they come from."""
        idx = [m.name for m in self.rasters].index(name)
        e = self.sensor_out.weight[idx][None] + cond
        if retrieved is not None:
            e = e + self.retrieval_embed[_k(name)](retrieved)
        f0 = self.config.widths[0]
        film = self.target_film(e)[:, :, None, None]
        return (film[:, : 2 * f0], film[:, 2 * f0 :]), e

    def _band_loadings(self, mod: Modality, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per band group (B, RANK, C, H, W) on the base grid: the spectral loadings the
        residual mixes. They depend on the trunk features only, so they are made once per
        generated modality and shared by every ensemble member."""
        b, _, h, w = f.shape
        slots = self.slot_loadings(f).view(b, RANK, -1, h, w)
        out = {}
        for g in mod.groups:
            key = f"{mod.name}/{g.name}"
            y = slots.index_select(2, self._slot_of[key].to(f.device))
            own = self._own[key]
            if own:
                y = y.clone()
                y[:, :, own] = self.own_residual[_k(key)](f).view(b, RANK, -1, h, w)
            out[g.name] = y
        return out

    def _residual_head(
        self, mod: Modality, loadings: dict[str, torch.Tensor], coef: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per band group on its own grid: the residual, coefficients times loadings."""
        out = {}
        for g in mod.groups:
            y = (loadings[g.name] * coef[:, :, None]).sum(1)
            out[g.name] = F.avg_pool2d(y, g.factor) if g.factor > 1 else y
        return out

    def _head(self, mod: Modality, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per band group on its own grid: slot outputs picked per band, own bands' heads."""
        slots = self.slot_head(f) if mod.kind != "categorical" else None
        out = {}
        for g in mod.groups:
            key = f"{mod.name}/{g.name}"
            if mod.kind == "categorical":
                y = self.own_head[_k(key)](f)
            else:
                y = slots.index_select(1, self._slot_of[key].to(f.device))
                own = self._own[key]
                if own:
                    y = y.clone()
                    y[:, own] = self.own_head[_k(key)](f)
                y = (
                    y * self.band_scale[_k(key)][None, :, None, None]
                    + self.band_shift[_k(key)][None, :, None, None]
                )
            out[g.name] = F.avg_pool2d(y, g.factor) if g.factor > 1 else y
        return out

    def _joint_noise(
        self,
        inputs: dict[str, ModalityInput],
        names: list[str],
        fresh: bool,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """(B, NOISE_CHANNELS, S, S) unit-variance pixel noise of the generated modalities.

        Per modality its first channels (repeated if it has fewer) on the base grid; summed
        over the modalities a sample generates and rescaled by their count's square root."""
        total, count = None, None
        for name in names:
            inp = inputs[name]
            mod = self.registry[name]
            parts = []
            for g in mod.groups:
                xg = inp.groups[g.name]
                c = xg.shape[1] // 3
                n = xg[:, :c].float()
                if fresh:
                    n = torch.randn(n.shape, generator=generator).to(n.device)
                if g.factor > 1:  # repeated coarse noise keeps unit variance per pixel
                    n = F.interpolate(n, scale_factor=g.factor, mode="nearest")
                parts.append(n)
            allnoise = torch.cat(parts, 1)
            n = allnoise[:, [i % allnoise.shape[1] for i in range(NOISE_CHANNELS)]]
            on = (inp.present & (inp.t > 0)).float()[:, None, None, None]
            total = n * on if total is None else total + n * on
            count = on if count is None else count + on
        return total / count.clamp_min(1.0).sqrt()

    def _residual(self, f: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Generator features from trunk features and noise (fine, coarse and latent maps).

        The latent is a map too (the noise blurred by 8 px), not one vector per window, so
        that overlapping windows of a whole scene agree on it."""
        maps = torch.cat([smooth_noise(noise, s) for s in NOISE_SIGMAS], 1).to(f.dtype)
        z = smooth_noise(noise, LATENT_SIGMA).to(f.dtype)
        with self._fast_convolutions(f.device):
            mod = self.gen_latent(z) + self.gen_cond(cond)[:, :, None, None]
            s1, b1, s2, b2 = mod.chunk(4, 1)
            h = F.silu(self.gen_in(torch.cat([f, maps], 1)) * (1 + s1) + b1)
            return F.silu(self.gen_mid(h) * (1 + s2) + b2).float()
