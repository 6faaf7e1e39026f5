"""A deterministic any-to-any U-Net: the benchmark's learned, non-generative baseline.

Input: every raster modality of the registry it was built with (the raster modalities of a
model config, in its order), each band group resampled to the window's base grid (nearest
neighbour) and stacked as channels: continuous groups in the store-normalised units of
:func:`~terrasynth.models.signals.batch_signals`, categorical groups as 0/1 one-hot planes,
and after each group one mask channel (1 where the group is known and given as input, 0
where it is absent, unknown or not given). Output: one head per raster modality
(continuous: its normalised bands; categorical: class logits), average-pooled back to each
group's own grid.

Training (:func:`train_unet`): every chip of a batch splits its present raster modalities
at random into inputs and targets (at least one of each); the loss is the MSE over known
pixels of continuous targets plus the cross-entropy of categorical targets, so one network
serves every direction, as the scene model does. Data are the model's: the training split
of a chip store, the same chunk-shuffled sampler with the same source balance, random
crops of the model's window. Training stops at a wall-clock budget, the "same compute" as
a model run on the same machine.

A U-Net folder holds ``config.json`` (sizes, registry entries and normalisation statistics
taken from a model config), ``model.safetensors``, ``train_config.json`` and
``metrics.jsonl`` (step, loss, elapsed_s, chips_per_s); each file is replaced atomically.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from terrasynth.atomic import write_text
from terrasynth.data.dataset import ChipDataset, RandomCropFlip, collate_chips
from terrasynth.data.stats import band_moments
from terrasynth.errors import TerrasynthError
from terrasynth.modalities import BandGroup, Modality
from terrasynth.models.config import ModelConfig
from terrasynth.models.signals import Signal, batch_signals

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WIDTHS = (32, 64, 128)  # channels per level: trains on 2 CPU cores


@dataclass
class UNetConfig:
    """Sizes of the U-Net and the modality table (and statistics) it predicts in."""

    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)  # raster entries
    stats: dict[str, Any] = field(default_factory=dict)  # normalisation of its units
    image_size: int = 32  # training window, pixels of the base grid
    widths: list[int] = field(default_factory=lambda: list(WIDTHS))
    source: str = ""  # model folder the modalities and statistics were taken from

    @classmethod
    def from_model_config(
        cls, config: ModelConfig, widths: tuple[int, ...] = WIDTHS, source: str = ""
    ) -> UNetConfig:
        """The raster modalities (in the model's order), statistics and window of a model."""
        names = [m.name for m in config.raster_modalities()]
        return cls(
            modalities={m: config.modalities[m] for m in names},
            stats={m: config.stats[m] for m in names if m in config.stats},
            image_size=config.image_size,
            widths=list(widths),
            source=source,
        )

    def model_config(self) -> ModelConfig:
        """A model config with the same modalities and statistics, for ``batch_signals``."""
        return ModelConfig(
            modalities=self.modalities,
            stats=self.stats,
            image_size=self.image_size,
            use_location=False,
            use_time=False,
        )

    def save(self, path: Path) -> None:
        write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> UNetConfig:
        d = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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


class UNet(nn.Module):
    """Encoder-decoder with skip connections over all raster modalities (module docstring)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.rasters: list[Modality] = config.model_config().raster_modalities()
        if not self.rasters:
            raise TerrasynthError("a U-Net needs at least one raster modality")
        w = list(config.widths)
        cin = sum(_channels(m, g) + 1 for m in self.rasters for g in m.groups)
        self.down = nn.ModuleList()
        prev = cin
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
    def modality_names(self) -> list[str]:
        return [m.name for m in self.rasters]

    @property
    def multiple(self) -> int:
        """The base-grid size must be a multiple of this."""
        return 2 ** (len(self.config.widths) - 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, C_in, S, S) stacked inputs -> per modality (B, C_out, S, S) on the base grid."""
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            x = merge(torch.cat([up(x), skip], 1))
        return {m.name: self.heads[_key(m.name)](x) for m in self.rasters}

    def inputs(self, signals: dict[str, Signal], given: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stack the given modalities' groups on the base grid with their mask channels.

        ``given``: per modality (B,) bool, the chips on which it is an input; modalities
        missing from ``signals`` or ``given`` are all-zero channels."""
        size, b = self._grid(signals)
        parts = []
        for mod in self.rasters:
            sig = signals.get(mod.name)
            on = given.get(mod.name)
            for g in mod.groups:
                c, h = _channels(mod, g), size // g.factor
                if sig is None or sig.groups is None or on is None:
                    parts.append(torch.zeros(b, c + 1, size, size))
                    continue
                x, k = sig.groups[g.name], sig.known[g.name]
                if tuple(x.shape[1:]) != (c, h, h):
                    raise TerrasynthError(
                        f"{mod.name}/{g.name}: signal of shape {tuple(x.shape[1:])} where the "
                        f"U-Net's registry expects {(c, h, h)}"
                    )
                w = on.float()[:, None, None, None]
                if mod.kind == "categorical":
                    x = (x + 1) / 2  # one-hot in [-1, 1] -> {0, 1}
                v = torch.cat([x.float() * k * w, k.amax(1, keepdim=True) * w], 1)
                if g.factor > 1:
                    v = F.interpolate(v, scale_factor=g.factor, mode="nearest")
                parts.append(v)
        return torch.cat(parts, 1)

    def _grid(self, signals: dict[str, Signal]) -> tuple[int, int]:
        for mod in self.rasters:
            sig = signals.get(mod.name)
            if sig is not None and sig.groups is not None:
                g = mod.groups[0]
                x = sig.groups[g.name]
                size = x.shape[-1] * g.factor
                if size % self.multiple:
                    raise TerrasynthError(
                        f"window of {size} px: the U-Net needs a multiple of {self.multiple}"
                    )
                return size, x.shape[0]
        raise TerrasynthError("no raster modality of the U-Net in this batch")

    def predict(
        self, signals: dict[str, Signal], given: dict[str, torch.Tensor]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Per modality and group, on the group's grid: normalised values (continuous) or
        class logits (categorical)."""
        out = self(self.inputs(signals, given))
        result: dict[str, dict[str, torch.Tensor]] = {}
        for mod in self.rasters:
            y = out[mod.name]
            groups, offset = {}, 0
            for g in mod.groups:
                c = _channels(mod, g)
                v = y[:, offset : offset + c]
                groups[g.name] = F.avg_pool2d(v, g.factor) if g.factor > 1 else v
                offset += c
            result[mod.name] = groups
        return result

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{WEIGHTS}.tmp"
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(tmp))
        tmp.replace(folder / WEIGHTS)
        self.config.save(folder / CONFIG)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> UNet:
        folder = Path(folder)
        if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
            raise TerrasynthError(
                f"{folder}: not a U-Net folder (no {CONFIG} and {WEIGHTS}; train one with "
                "`terrasynth baseline train-unet`)"
            )
        net = cls(UNetConfig.load(folder / CONFIG))
        net.load_state_dict(load_file(str(folder / WEIGHTS)))
        return net.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def random_split(
    signals: dict[str, Signal], names: list[str], generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per chip, split its present modalities among ``names`` into inputs and targets: a
    uniform number of inputs in 1 .. n-1 chosen at random. Chips with fewer than two present
    modalities get neither. Returns (given, target), each per modality (B,) bool."""
    names = [n for n in names if n in signals and signals[n].groups is not None]
    if not names:
        return {}, {}
    present = torch.stack([signals[n].present.bool() for n in names], 1)  # (B, M)
    b, m = present.shape
    n = present.sum(1)
    order = torch.rand(b, m, generator=generator).masked_fill(~present, 2.0)
    rank = order.argsort(1).argsort(1)  # 0 .. n-1 over present modalities
    k = (torch.rand(b, generator=generator) * (n - 1).clamp_min(0)).floor() + 1
    usable = (n >= 2)[:, None]
    given = present & (rank < k[:, None]) & usable
    target = present & ~given & usable
    return (
        {name: given[:, i] for i, name in enumerate(names)},
        {name: target[:, i] for i, name in enumerate(names)},
    )


def unet_loss(
    net: UNet, signals: dict[str, Signal], generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over target modalities of the MSE over known pixels (continuous) or the
    cross-entropy (categorical), for one random input/target split per chip."""
    given, target = random_split(signals, net.modality_names, generator)
    pred = net.predict(signals, given)
    losses, parts = [], {}
    for mod in net.rasters:
        t = target.get(mod.name)
        if t is None or not bool(t.any()):
            continue
        sig = signals[mod.name]
        num = den = None
        for g in mod.groups:
            p = pred[mod.name][g.name]
            if mod.kind == "categorical":
                cls = torch.where(t[:, None, None], sig.target[g.name], -1)
                n = (cls >= 0).sum()
                err = F.cross_entropy(p, cls, ignore_index=-1, reduction="sum") if n else None
            else:
                k = sig.known[g.name] * t[:, None, None, None]
                n = k.sum()
                err = ((p - sig.groups[g.name]) ** 2 * k).sum()
            if err is None or n == 0:
                continue
            num = err if num is None else num + err
            den = n if den is None else den + n
        if num is not None:
            loss = num / den
            losses.append(loss)
            parts[mod.name] = float(loss.detach())
    if not losses:
        return next(net.parameters()).sum() * 0.0, parts
    return torch.stack(losses).mean(), parts


def model_config_of(path: str | Path | None) -> tuple[ModelConfig, str]:
    """The config of a model folder, a run folder (its ``model/``) or, for None, the
    built-in model; with the folder it came from."""
    if path is None:
        from terrasynth.pipeline import default_model_path

        folder = default_model_path()
    else:
        folder = Path(path)
        if (folder / "model" / CONFIG).exists():
            folder = folder / "model"
    if not (folder / CONFIG).exists():
        raise TerrasynthError(f"{folder}: not a model folder (no {CONFIG})")
    return ModelConfig.load(folder / CONFIG), str(folder)


def stats_mismatch(config: UNetConfig | ModelConfig, stats: dict) -> list[str]:
    """Continuous modalities whose normalisation differs between ``config`` and ``stats``
    (values are normalised with one and read back with the other)."""
    reg = config.model_config().registry if isinstance(config, UNetConfig) else config.registry
    out = []
    for name in config.modalities:
        mod = reg[name]
        if mod.kind != "continuous" or name not in stats:
            continue
        a = band_moments(config.stats.get(name, {}), mod.bands)
        b = band_moments(stats[name], mod.bands)
        if not all(np.allclose(x, y, rtol=1e-3, atol=1e-6) for x, y in zip(a, b, strict=True)):
            out.append(name)
    return out


@dataclass
class UNetRun:
    """What a training run did."""

    folder: Path
    steps: int
    chips: int
    seconds: float
    reason: str  # "time limit", "steps" or "interrupted"
    warnings: list[str] = field(default_factory=list)


def train_unet(
    store: str | Path,
    out_dir: str | Path,
    minutes: float,
    batch_size: int = 24,
    seed: int = 0,
    model_config: ModelConfig | str | Path | None = None,
    lr: float = 2e-3,
    weight_decay: float = 0.02,
    widths: tuple[int, ...] = WIDTHS,
    source_balance: float = 0.5,
    num_workers: int = 0,
    log_every: int = 10,
    save_every_min: float = 5.0,
    max_steps: int | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> UNetRun:
    """Train a :class:`UNet` on a store's training split for ``minutes`` of wall time.

    ``model_config``: a config, a model or run folder, or None for the built-in model; its
    raster modalities, statistics and window size are the U-Net's. ``out_dir`` must be new
    or empty. The weights are saved every ``save_every_min`` minutes and at the end
    (Ctrl-C included)."""
    from terrasynth.training.trainer import ResumableBatches  # the model's own sampler

    if minutes <= 0 and max_steps is None:
        raise TerrasynthError("give a training budget: minutes > 0")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise TerrasynthError(f"{out} exists and is not empty")
    source = ""
    if not isinstance(model_config, ModelConfig):
        model_config, source = model_config_of(model_config)
    torch.manual_seed(seed)
    cfg = UNetConfig.from_model_config(model_config, widths, source)
    net = UNet(cfg)
    ds = ChipDataset(store, split="train")
    if len(ds) < batch_size:
        raise TerrasynthError(f"{store}: fewer training chips ({len(ds)}) than one batch")
    if cfg.image_size % net.multiple:
        raise TerrasynthError(f"window {cfg.image_size} px is not a multiple of {net.multiple}")
    known = [m for m in ds.modalities if m in cfg.modalities]
    if not known:
        raise TerrasynthError(f"{store}: no raster modality of the model config in this store")
    warnings = []
    differ = stats_mismatch(cfg, ds.store.stats)
    if differ:
        warnings.append(
            f"the store's normalisation differs from the model's for {', '.join(differ)}: "
            "the U-Net learns the store's units"
        )
    ds.transform = RandomCropFlip(cfg.image_size, ds.chip_size, seed=seed)
    batches = ResumableBatches(ds, batch_size, seed, balance=source_balance)
    loader = DataLoader(
        ds, batch_sampler=batches, collate_fn=collate_chips, num_workers=num_workers
    )
    signal_config = cfg.model_config()
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    budget = 60.0 * minutes
    warmup = 50

    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "store": str(store), "minutes": minutes, "batch_size": batch_size, "seed": seed,
        "lr": lr, "weight_decay": weight_decay, "widths": list(widths),
        "source_balance": source_balance, "max_steps": max_steps, "model_config": source,
        "parameters": net.num_parameters(),
    }  # fmt: skip
    write_text(out / "train_config.json", json.dumps(settings, indent=2))
    net.train()
    step = chips = n_log = 0
    window: list[float] = []
    reason = "time limit"
    t0 = time.perf_counter()
    t_log = t_save = t0
    try:
        for batch in loader:
            elapsed = time.perf_counter() - t0
            scale = min(1.0, (step + 1) / warmup)
            if budget > 0:  # cosine decay over the wall-clock budget, to 5 %
                scale *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            signals = batch_signals(batch, signal_config, ds.modalities)
            loss, _ = unet_loss(net, signals, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            chips += len(batch["index"])
            n_log += len(batch["index"])
            window.append(float(loss.detach()))
            now = time.perf_counter()
            done = (budget > 0 and now - t0 >= budget) or (
                max_steps is not None and step >= max_steps
            )
            if step % log_every == 0 or done:
                rec = {
                    "step": step,
                    "loss": round(sum(window) / len(window), 5),
                    "elapsed_s": round(now - t0, 2),
                    "chips_per_s": round(n_log / max(now - t_log, 1e-9), 2),
                }
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if on_log is not None:
                    on_log(rec)
                window, n_log, t_log = [], 0, now
            if done:
                reason = "steps" if max_steps is not None and step >= max_steps else reason
                break
            if now - t_save >= 60.0 * save_every_min:
                net.save_pretrained(out)
                t_save = now
    except KeyboardInterrupt:
        reason = "interrupted"
    net.eval()
    net.save_pretrained(out)
    return UNetRun(out, step, chips, time.perf_counter() - t0, reason, warnings)


__all__ = ["UNet", "UNetConfig", "UNetRun", "train_unet", "unet_loss", "random_split"]
