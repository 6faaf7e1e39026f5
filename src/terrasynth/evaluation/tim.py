"""Thinking in modalities (``terrasynth tim``): generated modalities as extra inputs of a
downstream segmenter.

>>> from terrasynth.evaluation.tim import run_tim, write_tim
>>> rows = run_tim(Pipeline.from_pretrained().model, "store", "landcover_worldcereal",
...                given=["s1grd"], generate="s2l2a", samples=4, max_chips=60)
>>> write_tim(rows, "tim/")              # tim.csv, tim.md

One small convolutional segmenter (:class:`Segmenter`) is trained, with the same seed,
initialisation rule and budget, on four sets of input channels of the same chips:

* ``a``: the given modalities alone;
* ``b1``: the given modalities and one sample of the generated modality;
* ``b2``: the given modalities, the mean of ``samples`` generated samples and their
  per-band standard deviation (the spread);
* ``c``: the given modalities and the real modality (the upper bound), where the chips
  hold it in every split.

**Chips.** The label set's chips that hold every given modality (and, when the real
modality lies on such chips in every split, only those that hold it too, so that all arms
see the same chips), split as ``terrasynth probe`` splits them (the store's split, or again
by place for a label set in one split), at most ``max_chips`` per split, evenly spread.

**Generation.** The benchmark's path (:class:`~terrasynth.evaluation.benchmark.ModelPredictor`
on the benchmark's non-overlapping windows of each chip): the modality is generated from
the given modalities, location and time only; the real modality is never shown to the
model (its target signal is blank). Values are in the store's normalised units.

**Channels.** Each band group of a modality at the chip's base grid (coarser groups
repeated), unknown values 0, and per given or real band group one channel that is 1 where
it is known; all standardised with the training chips' per-channel mean and deviation.

**Segmenter training.** Adam, per-pixel cross-entropy on the known labels, random flips,
``epochs`` epochs (or until ``minutes`` have passed per arm), the epoch with the best
validation macro F1 kept. Scores on the test chips: accuracy, macro F1 and mIoU from the
pooled confusion matrix with bootstrap 95 % intervals over test places (``terrasynth
probe``'s); for arms (b1), (b2) and (c) also their macro F1 minus arm (a)'s
(``macro_f1_vs_a``), its interval from the same resamples of the test places for both arms
(paired).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from terrasynth.atomic import atomic_folder
from terrasynth.data.dataset import ChipDataset, collate_chips
from terrasynth.data.split import SPLITS
from terrasynth.data.store import ChipStore
from terrasynth.errors import TerrasynthError
from terrasynth.evaluation.benchmark import ModelPredictor
from terrasynth.evaluation.probe import (
    METRICS,
    Progress,
    _base_grid,
    _cell,
    class_map_scores,
    confusion,
    csv_text,
    label_modalities,
    place_bootstrap,
    probe_splits,
    spread,
)
from terrasynth.evaluation.translate import tile_offsets, tiles
from terrasynth.models.base import GenerativeModel
from terrasynth.models.signals import Signal, batch_signals
from terrasynth.models.unet import _block

ARMS = {
    "a": "given",
    "b1": "given + 1 generated sample",
    "b2": "given + mean and spread of N generated samples",
    "c": "given + real (upper bound)",
}
GAIN = "macro_f1_vs_a"  # an arm's macro F1 minus arm (a)'s, with a paired interval
CSV_COLUMNS = (
    "label", "arm", "inputs", "metric", "value", "low", "high", "channels", "split",
    "train_chips", "val_chips", "test_chips", "test_places", "test_pixels", "samples",
    "epochs", "seconds",
)  # fmt: skip


@dataclass
class TimRow:
    """One score of one arm: a row of ``tim.csv``."""

    label: str
    arm: str
    inputs: str
    metric: str
    value: float
    low: float
    high: float
    channels: int
    split: str
    train_chips: int
    val_chips: int
    test_chips: int
    test_places: int
    test_pixels: int
    samples: int
    epochs: int
    seconds: float


# -- checks and chips ----------------------------------------------------------------------
def check_task(
    store: ChipStore, model: GenerativeModel | None, label: str, given: list[str], target: str
) -> None:
    """One-line errors for a task the store or the model cannot run."""
    label_modalities(store, [label])
    reg = store.registry
    if reg[label].kind != "categorical":
        raise TerrasynthError(f"'{label}' is a label vector, not a class map: no segmentation")
    if not given:
        raise TerrasynthError("tim needs at least one given modality (--given MOD[,MOD])")
    known = None if model is None else set(model.config.modalities)
    for name in [*given, target]:
        if name not in store.modalities:
            raise TerrasynthError(
                f"unknown modality '{name}' (modalities of {store.path}: "
                f"{', '.join(store.modalities)})"
            )
        mod = reg[name]
        if mod.kind != "continuous" or not mod.is_raster:
            raise TerrasynthError(f"'{name}' is not a continuous raster modality")
        if known is not None and name not in known:
            raise TerrasynthError(f"the model does not know '{name}'")
    if target in given:
        raise TerrasynthError(f"'{target}' is both given and generated")


def tim_chips(
    store: ChipStore, label: str, given: list[str], target: str, seed: int, max_chips: int | None
) -> tuple[dict[str, np.ndarray], str, bool]:
    """Rows per split, how they were split, and whether the real ``target`` is on them
    (module docstring)."""
    held = np.logical_and.reduce([store.available(m) for m in given])
    if not (held & store.available(label)).any():
        raise TerrasynthError(f"no chip of '{label}' holds {' and '.join(given)}")
    found = probe_splits(store, label, seed, held & store.available(target))
    with_real = found is not None
    if found is None:
        found = probe_splits(store, label, seed, held)
    if found is None:
        raise TerrasynthError(
            f"the chips of '{label}' with {' and '.join(given)} lie in fewer than three places: "
            "no training, validation and test split"
        )
    rows, how = found
    return {s: spread(r, max_chips) for s, r in rows.items()}, how, with_real


# -- channels ------------------------------------------------------------------------------
def signal_channels(sig: Signal, chip_size: int, masks: bool = True) -> torch.Tensor:
    """(B, C, S, S): the band groups of a signal at the base grid, then per group a known
    mask (``masks``)."""
    parts = []
    for g, x in sig.groups.items():
        parts.append(_base_grid(x, chip_size))
        if masks:
            parts.append(_base_grid(sig.known[g].amax(1, keepdim=True), chip_size))
    return torch.cat(parts, 1)


def _blank(sig: Signal) -> Signal:
    """A target signal that shows the model nothing of the real values."""
    zeros = {g: torch.zeros_like(x) for g, x in sig.groups.items()}
    ones = {g: torch.ones_like(x) for g, x in sig.groups.items()}
    return Signal(torch.ones_like(sig.present), groups=zeros, known=ones)


def generated_channels(
    predictor: ModelPredictor, batch: dict, order: list[str], given: list[str], target: str,
    chip_size: int, samples: int, generator: torch.Generator,
) -> torch.Tensor:  # fmt: skip
    """(N, B, C, S, S): ``samples`` draws of ``target`` given ``given``, location and time,
    window by window over each chip (the benchmark's tiles), at the base grid."""
    cfg = predictor.model.config
    size = min(cfg.window_size, chip_size)
    out = None
    for (r, c), tile in zip(
        tile_offsets(size, chip_size), tiles(batch, size, chip_size), strict=True
    ):
        sig = batch_signals(tile, cfg, order)
        shown = {n: sig[n] for n in [*given, "location", "time"] if n in sig}
        shown[target] = _blank(sig[target])
        conds = [n for n in shown if n != target]
        draws = predictor.sample(shown, tile, target, conds, samples, generator)
        parts = [_base_grid(torch.from_numpy(v).flatten(0, 1), size) for v in draws.values()]
        x = torch.cat(parts, 1).unflatten(0, (samples, -1))
        if out is None:
            out = torch.zeros(*x.shape[:3], chip_size, chip_size)
        out[..., r : r + size, c : c + size] = x
    assert out is not None
    return out


@dataclass
class ChipArrays:
    """Per arm the (chips, C, S, S) inputs, the (chips, S, S) labels (-1 unknown), the
    store rows and their splits."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    rows: np.ndarray
    splits: np.ndarray


@torch.no_grad()
def chip_arrays(
    model: GenerativeModel, store: ChipStore, rows: dict[str, np.ndarray], label: str,
    given: list[str], target: str, samples: int, with_real: bool, seed: int = 0,
    batch_size: int = 8, progress: Progress | None = None,
) -> ChipArrays:  # fmt: skip
    """The arms' inputs of every chip of ``rows`` (module docstring)."""
    ds = ChipDataset(store)
    order = ds.modalities
    chip = store.chip_size
    predictor = ModelPredictor(model)
    generator = torch.Generator().manual_seed(seed)
    mod = store.registry[label]
    key = f"{label}/{mod.groups[0].name}"
    all_rows = np.concatenate([rows[s] for s in SPLITS])
    splits = np.concatenate([[s] * len(rows[s]) for s in SPLITS])
    parts: dict[str, list[torch.Tensor]] = {arm: [] for arm in ARMS}
    labels = []
    for start in range(0, len(all_rows), batch_size):
        batch = collate_chips([ds[int(i)] for i in all_rows[start : start + batch_size]])
        sig = batch_signals(batch, model.config, order)
        base = torch.cat([signal_channels(sig[m], chip) for m in given], 1)
        draws = generated_channels(predictor, batch, order, given, target, chip, samples,
                                   generator)  # fmt: skip
        parts["a"].append(base)
        parts["b1"].append(torch.cat([base, draws[0]], 1))
        spread_ = draws.std(0) if samples > 1 else torch.zeros_like(draws[0])
        parts["b2"].append(torch.cat([base, draws.mean(0), spread_], 1))
        if with_real:
            parts["c"].append(torch.cat([base, signal_channels(sig[target], chip)], 1))
        y = _base_grid(batch[key].long(), chip)
        ok = _base_grid(batch[f"{key}/valid"].bool(), chip) & (y >= 0)
        labels.append(torch.where(ok, y, torch.full_like(y, -1)))
        if progress is not None:
            progress("generating", min(start + batch_size, len(all_rows)), len(all_rows))
    inputs = {arm: torch.cat(p) for arm, p in parts.items() if p}
    return ChipArrays(inputs, torch.cat(labels), all_rows, splits)


# -- the segmenter -------------------------------------------------------------------------
class Segmenter(nn.Sequential):
    """Two blocks of two 3 x 3 convolutions (GroupNorm, SiLU; the U-Net's blocks) and a
    1 x 1 head: per-pixel class logits at the input's resolution."""

    def __init__(self, channels: int, classes: int, width: int = 32) -> None:
        super().__init__(
            _block(channels, width), _block(width, width), nn.Conv2d(width, classes, 1)
        )


def _predict(net: nn.Module, x: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return torch.cat(
            [net(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        ).numpy()


def _macro_f1(net: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    conf = confusion(_predict(net, x).ravel(), y.numpy().ravel(), classes)
    f1 = class_map_scores(conf)["macro_f1"]
    return f1 if np.isfinite(f1) else -1.0


def train_segmenter(
    x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], classes: int, epochs: int,
    minutes: float | None = None, seed: int = 0, width: int = 32, batch_size: int = 8,
    lr: float = 2e-3, progress: Progress | None = None, what: str = "training",
) -> tuple[nn.Module, int]:  # fmt: skip
    """A :class:`Segmenter` trained on ``x["train"]`` / ``y["train"]`` (module docstring),
    inputs standardised with the training chips' statistics; the epoch of the best
    validation macro F1. Returns the network (standardisation inside) and the epochs run."""
    xt = x["train"]
    mean = xt.mean((0, 2, 3), keepdim=True)
    std = xt.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    torch.manual_seed(seed)
    net = Segmenter(xt.shape[1], classes, width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    xs = {s: (v - mean) / std for s, v in x.items()}
    best, best_f1, done = copy.deepcopy(net.state_dict()), -np.inf, 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            xb, yb = xs["train"][idx], y["train"][idx]
            flip = torch.rand(2, generator=gen) < 0.5
            dims = [d for d, f in zip((-1, -2), flip.tolist(), strict=True) if f]
            if dims:
                xb, yb = xb.flip(dims), yb.flip(dims)
            if (yb >= 0).any():
                loss = F.cross_entropy(net(xb), yb, ignore_index=-1)
                opt.zero_grad()
                loss.backward()
                opt.step()
        done = epoch + 1
        f1 = _macro_f1(net, xs["val"], y["val"], classes)
        if f1 > best_f1:
            best, best_f1 = copy.deepcopy(net.state_dict()), f1
        if progress is not None:
            progress(what, done, epochs)
        if minutes is not None and time.perf_counter() - t0 > 60 * minutes:
            break
    net.load_state_dict(best)
    net.eval()
    return _Standardised(net, mean, std), done


class _Standardised(nn.Module):
    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.net, self.mean, self.std = net, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


# -- the run -------------------------------------------------------------------------------
def run_tim(
    model: GenerativeModel, store: str | Path, label: str, given: list[str], generate: str,
    samples: int = 4, max_chips: int | None = None, epochs: int = 30,
    minutes: float | None = None, seed: int = 0, width: int = 32,
    progress: Progress | None = None, notes: list[str] | None = None,
) -> list[TimRow]:  # fmt: skip
    """Train and score the four arms (module docstring) for one task: ``label`` from
    ``given`` with ``generate`` generated by ``model``."""
    st = ChipStore.open(store)
    check_task(st, model, label, given, generate)
    if samples < 1:
        raise TerrasynthError("--samples must be at least 1")
    rows, how, with_real = tim_chips(st, label, given, generate, seed, max_chips)
    if not with_real and notes is not None:
        notes.append(f"{label}: the chips with {'+'.join(given)} do not hold the real "
                     f"{generate} in every split: no upper bound (arm c)")  # fmt: skip
    model.eval()
    arrays = chip_arrays(model, st, rows, label, given, generate, samples, with_real, seed,
                         progress=progress)  # fmt: skip
    classes = st.registry[label].num_classes
    y = {s: arrays.labels[arrays.splits == s] for s in SPLITS}
    out: list[TimRow] = []
    names = {
        "a": "+".join(given),
        "b1": f"{'+'.join(given)} + {generate} (1 sample)",
        "b2": f"{'+'.join(given)} + {generate} (mean, std of {samples})",
        "c": f"{'+'.join(given)} + real {generate}",
    }
    n = {s: len(rows[s]) for s in SPLITS}
    test_rows = arrays.rows[arrays.splits == "test"]
    counts: dict[str, np.ndarray] = {}
    for arm, inputs in arrays.inputs.items():
        t0 = time.perf_counter()
        x = {s: inputs[arrays.splits == s] for s in SPLITS}
        net, done = train_segmenter(x, y, classes, epochs, minutes, seed, width,
                                    progress=progress, what=f"arm {arm}")  # fmt: skip
        pred = _predict(net, x["test"])
        per_chip = np.stack(
            [confusion(p, t, classes) for p, t in zip(pred, y["test"].numpy(), strict=True)]
        )
        scores, n_places = place_bootstrap(st, test_rows, per_chip, class_map_scores, seed)
        pixels = int((y["test"] >= 0).sum())
        seconds = round(time.perf_counter() - t0, 1)
        counts[arm] = per_chip
        if arm != "a":  # the gain over arm (a), resampled with the same places: paired
            paired = np.stack([counts["a"], per_chip], 1)
            scores.update(place_bootstrap(st, test_rows, paired, gain_over_a, seed)[0])
        for metric in [*METRICS["categorical"], GAIN][: 3 if arm == "a" else 4]:
            out.append(TimRow(label, arm, names[arm], metric, *scores[metric], inputs.shape[1],
                              how, n["train"], n["val"], n["test"], n_places, pixels,
                              samples if arm.startswith("b") else 0, done, seconds))  # fmt: skip
    return out


def gain_over_a(pair: np.ndarray) -> dict[str, float]:
    """Macro F1 of the second of a (2, K, K) pair of confusion matrices minus the first's."""
    return {GAIN: class_map_scores(pair[1])["macro_f1"] - class_map_scores(pair[0])["macro_f1"]}


# -- outputs -------------------------------------------------------------------------------
def markdown(rows: list[TimRow], settings: dict | None = None) -> str:
    """``tim.md``: per task a table of the arms, and each arm's macro F1 minus arm (a)'s
    with its paired bootstrap interval (the same test places resampled for both)."""
    lines = ["# Thinking in modalities", ""]
    if settings:
        lines += [", ".join(f"{k}: {v}" for k, v in settings.items()), ""]
    by = {(r.label, r.arm, r.metric): r for r in rows}
    metrics = METRICS["categorical"]
    for label in dict.fromkeys(r.label for r in rows):
        first = next(r for r in rows if r.label == label)
        lines += [
            f"## {label} (split: {first.split}; chips train/val/test "
            f"{first.train_chips}/{first.val_chips}/{first.test_chips}, test places "
            f"{first.test_places}, test pixels {first.test_pixels})",
            "",
            "| arm | inputs | channels | epochs | " + " | ".join(metrics) + " | macro F1 vs (a) |",
            "|---|---|---:|---:|" + "---:|" * len(metrics) + "---:|",
        ]
        for arm in ARMS:
            r0 = by.get((label, arm, metrics[0]))
            if r0 is None:
                continue
            cells = " | ".join(_cell(by.get((label, arm, m))) for m in metrics)
            g = by.get((label, arm, GAIN))
            diff = "" if g is None else f"{g.value:+.3f} [{g.low:+.3f}, {g.high:+.3f}]"
            lines.append(
                f"| {arm} | {r0.inputs} | {r0.channels} | {r0.epochs} | {cells} | {diff} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_tim(
    rows: list[TimRow], folder: str | Path, settings: dict | None = None, overwrite: bool = False
) -> Path:
    """``tim.csv`` and ``tim.md`` into ``folder``, atomically."""
    folder = Path(folder)
    with atomic_folder(folder, overwrite, "tim") as tmp:
        (tmp / "tim.csv").write_text(csv_text(rows, CSV_COLUMNS))
        (tmp / "tim.md").write_text(markdown(rows, settings))
    return folder
