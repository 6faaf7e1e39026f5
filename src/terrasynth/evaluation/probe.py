"""Linear probes (and a small MLP head) of embeddings on a store's label modalities
(``terrasynth probe``).

>>> from terrasynth.probe import run_probes, write_probes
>>> rows = run_probes(Pipeline.from_pretrained().model, "store", unet="runs/unet")
>>> write_probes(rows, "probe/")          # probe.csv, probe.md

For every label modality of the store (class maps: ``categorical``; image-level label
vectors: ``multilabel``) a linear probe is fitted on the training chips' features, its
weight decay picked on the validation chips (macro F1) and scored on the test chips, with
bootstrap 95 % intervals over the test chips (a fixed seed), the chips of one place (the
same square of ground on other dates) resampled together.

**Chips.** A label set's chips are those of the store's spatial split that hold it. When
that split leaves it without training, validation or test chips (a source that fell in one
split), its chips are split again by place: squares of one chip's footprint on the ground
(the same place on other dates stays together), ordered by a seeded hash and cut at 70 % /
85 % of the chips, at least one square per split; the row's ``split`` says ``by place``.
Models trained on the store's training split have seen those chips (and, if the label set
is one of their modalities, their labels).

**Inputs.** Each continuous raster modality of the model that lies on the label set's
chips in every split, alone, and all of them together (each chip given those it holds).
Label modalities are never inputs. Location and time are given to the models as
``terrasynth embed`` gives them.

**Feature sets.**

* ``model``: :meth:`~terrasynth.models.base.GenerativeModel.feature_map` of the model,
  every input clean (t = 0), on non-overlapping windows of the model's size (the
  benchmark's tiles of each chip);
* ``random_init``: the same of a randomly initialised model of the same config (seeded);
* ``raw_bands``: per feature pixel the mean and standard deviation of each given band's
  known values under it and the fraction known (the band statistics of the inputs);
* ``unet``: the U-Net baseline's ``feature_map`` (when a U-Net is given), on its tiles.

Every feature set lies on one probe grid, the coarsest feature resolution among them (the
built-in transformer's 8 px patches), finer maps averaged onto it, so all are scored on the
same labels.

**Targets.** Class maps: per probe-grid pixel, the majority class of the known labels
under it (pixels with none, or with no input under them, are left out); the probe is a
softmax regression on pixels; scores ``accuracy``, ``macro_f1`` and ``miou`` over the
classes present in the truth or the prediction, from the test pixels' pooled confusion.
Label vectors: one sample per chip, the mean of its valid feature pixels (``raw_bands``:
each band's mean and standard deviation over the chip, as the retrieval baseline describes
chips, and a presence flag per input); one sigmoid per label, threshold 0.5; scores
``accuracy`` (over chip x label), ``micro_f1`` and ``macro_f1`` (labels present in truth or
prediction).

**Probe.** Features standardised with the training mean and standard deviation; a linear
layer trained by full-batch L-BFGS on the mean cross-entropy plus ``weight_decay / 2 *
||W||^2`` from zeros (a convex problem: deterministic); the training pixels of a chip are
at most ``MAX_FIT_PIXELS`` (seeded draw), test pixels are all kept.

**MLP head** (``heads`` holding ``mlp``): on the same standardised features and targets,
``gelu(z @ W1 + b1) @ W2 + b2`` with ``MLP_HIDDEN`` hidden units and dropout
``MLP_DROPOUT`` while training, trained by AdamW (learning rate ``MLP_LR``, decoupled
weight decay on ``W1`` and ``W2`` from ``MLP_WEIGHT_DECAYS``, picked on the validation chips
as the linear probe's) for ``MLP_STEPS`` steps of ``MLP_BATCH`` samples, every decay from
the same initialisation; draws, initialisation and dropout from a ``torch.Generator`` of
the seed, so deterministic. The head is trained on frozen features: the backbone is never
updated (no end-to-end fine-tuning).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from terrasynth.atomic import atomic_folder
from terrasynth.data.dataset import ChipDataset, collate_chips
from terrasynth.data.split import SPLITS, SplitConfig
from terrasynth.data.store import ChipStore
from terrasynth.devices import model_device, to_device
from terrasynth.errors import TerrasynthError
from terrasynth.evaluation.baselines import band_statistics, load_unet
from terrasynth.evaluation.translate import tile_offsets, tiles
from terrasynth.modalities import Modality
from terrasynth.models.base import GenerativeModel
from terrasynth.models.signals import Signal, batch_signals
from terrasynth.sampling.conditional import sampling_inputs

LABEL_KINDS = ("categorical", "multilabel")
FEATURE_SETS = ("model", "random_init", "raw_bands", "unet")
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
HEADS = ("linear", "mlp")
MLP_WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)  # AdamW's decoupled decay
MLP_HIDDEN = 64
MLP_DROPOUT = 0.1
MLP_STEPS = 300
MLP_BATCH = 256
MLP_LR = 3e-3
MAX_FIT_PIXELS = 128  # training / validation pixels per chip (class maps)
BOOTSTRAP = 1000
LEVEL = 0.95
METRICS = {
    "categorical": ("accuracy", "macro_f1", "miou"),
    "multilabel": ("accuracy", "micro_f1", "macro_f1"),
}
CSV_COLUMNS = (
    "label", "features", "inputs", "metric", "value", "low", "high", "kind", "split",
    "train_chips", "val_chips", "test_chips", "test_places", "test_samples", "weight_decay",
    "head",
)  # fmt: skip

Progress = Callable[[str, int, int], None]  # (what, done, total)


# -- metrics -------------------------------------------------------------------------------
def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts of truth (rows) x prediction (columns) where ``truth >= 0``."""
    ok = truth >= 0
    idx = truth[ok].astype(np.int64) * num_classes + pred[ok].astype(np.int64)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_map_scores(conf: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1 and mIoU of a confusion matrix; the means over the classes
    present in the truth or the prediction (``metrics.mean_iou``'s rule)."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    seen = (tp + fp + fn) > 0
    total = conf.sum()
    if total == 0 or not seen.any():
        return {m: float("nan") for m in METRICS["categorical"]}
    return {
        "accuracy": float(tp.sum() / total),
        "macro_f1": float(np.mean(2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen]))),
        "miou": float(np.mean(tp[seen] / (tp[seen] + fp[seen] + fn[seen]))),
    }


def label_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(L, 4) true positives, false positives, false negatives, true negatives per label
    of (N, L) 0/1 predictions and truths."""
    p, t = pred.astype(bool), truth.astype(bool)
    parts = [(p & t), (p & ~t), (~p & t), (~p & ~t)]
    return np.stack([x.sum(0) for x in parts], 1)


def multilabel_scores(counts: np.ndarray) -> dict[str, float]:
    """Accuracy over sample x label, micro F1, and macro F1 over the labels present in the
    truth or the prediction, of (L, 4) counts (:func:`label_counts`)."""
    c = counts.astype(np.float64)
    tp, fp, fn, tn = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    total = c.sum()
    if total == 0:
        return {m: float("nan") for m in METRICS["multilabel"]}
    seen = (tp + fp + fn) > 0
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "accuracy": float((tp.sum() + tn.sum()) / total),
        "micro_f1": float(2 * tp.sum() / denom) if denom else float("nan"),
        "macro_f1": (
            float(np.mean(2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])))
            if seen.any()
            else float("nan")
        ),
    }


def bootstrap(
    per_chip: np.ndarray,
    score: Callable[[np.ndarray], dict[str, float]],
    n: int = BOOTSTRAP,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, tuple[float, float, float]]:
    """Per metric of ``score`` (a function of summed counts): the estimate on all chips and
    the percentile interval of ``level`` over ``n`` resamples of the chips with
    replacement. ``per_chip``: (chips, ...) counts, e.g. confusion matrices."""
    point = score(per_chip.sum(0))
    chips = len(per_chip)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(chips, np.full(chips, 1.0 / chips), size=n).astype(np.float64)
    sums = draws @ per_chip.reshape(chips, -1).astype(np.float64)
    values: dict[str, list[float]] = {k: [] for k in point}
    for s in sums:
        for k, v in score(s.reshape(per_chip.shape[1:])).items():
            values[k].append(v)
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    out = {}
    for k, v in point.items():
        arr = np.asarray(values[k])
        arr = arr[np.isfinite(arr)]
        lo, hi = np.percentile(arr, q) if len(arr) else (float("nan"),) * 2
        out[k] = (v, float(lo), float(hi))
    return out


def place_bootstrap(
    store: ChipStore,
    rows: list[int] | np.ndarray,
    per_chip: np.ndarray,
    score: Callable[[np.ndarray], dict[str, float]],
    seed: int = 0,
) -> tuple[dict[str, tuple[float, float, float]], int]:
    """:func:`bootstrap` of the test chips ``rows`` (store rows, in ``per_chip``'s order)
    by place: the chips of one place (other dates) are resampled together, since they are
    not independent. Also returns the number of places."""
    where = places(store, np.asarray(rows), seed)
    per_place = np.stack([per_chip[where == p].sum(0) for p in range(int(where.max()) + 1)])
    return bootstrap(per_place, score, seed=seed), len(per_place)


# -- the probe -----------------------------------------------------------------------------
class Probe:
    """A head on standardised features: ``logits`` of (N, C) features, and ``predict``."""

    kind: str
    mean: torch.Tensor
    std: torch.Tensor
    weight_decay: float

    def standardised(self, x: np.ndarray) -> torch.Tensor:
        """(N, C) features standardised with the training mean and standard deviation."""
        return (torch.as_tensor(x, dtype=torch.float32) - self.mean) / self.std

    def logits(self, x: np.ndarray) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no logits")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices (N,), or 0/1 labels (N, L)."""
        logits = self.logits(x)
        if self.kind == "multilabel":
            return (logits > 0).numpy().astype(np.int64)
        return logits.argmax(1).numpy()


@dataclass
class LinearProbe(Probe):
    """A linear layer on standardised features: softmax over classes, or one sigmoid per
    label."""

    kind: str
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float

    def logits(self, x: np.ndarray) -> torch.Tensor:
        return self.standardised(x) @ self.weight + self.bias


@dataclass
class MLPProbe(Probe):
    """Two layers on standardised features: ``gelu(z @ w1 + b1) @ w2 + b2`` (dropout only
    while training); softmax over classes, or one sigmoid per label."""

    kind: str
    mean: torch.Tensor
    std: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    weight_decay: float

    def logits(self, x: np.ndarray) -> torch.Tensor:
        return F.gelu(self.standardised(x) @ self.w1 + self.b1) @ self.w2 + self.b2


def _standardised(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training mean and standard deviation of (N, C) features, and the features
    standardised with them."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    mean = xt.mean(0)
    std = xt.std(0, unbiased=False).clamp_min(1e-6)
    return mean, std, (xt - mean) / std


def _data_loss(y: np.ndarray, kind: str) -> Callable[..., torch.Tensor]:
    """The mean cross-entropy of logits against ``y``: softmax (class indices) or one
    sigmoid per label (``multilabel``); ``loss(logits, rows)``: of those rows only."""
    if kind == "multilabel":
        target = torch.as_tensor(y, dtype=torch.float32)

        def loss(logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
            t = target if rows is None else target[rows]
            return F.binary_cross_entropy_with_logits(logits, t)

        return loss
    classes = torch.as_tensor(y, dtype=torch.int64)

    def loss(logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(logits, classes if rows is None else classes[rows])

    return loss


def fit_linear(
    x: np.ndarray, y: np.ndarray, kind: str, outputs: int, weight_decay: float,
    max_iter: int = 100, start: LinearProbe | None = None,
) -> LinearProbe:  # fmt: skip
    """Fit a :class:`LinearProbe` (module docstring) on (N, C) features and (N,) class
    indices (``categorical``) or (N, L) 0/1 labels (``multilabel``). ``start``: a probe
    of the same features to start from (else zeros; the optimum is the same)."""
    mean, std, z = _standardised(x)
    w = torch.zeros(z.shape[1], outputs) if start is None else start.weight.clone()
    b = torch.zeros(outputs) if start is None else start.bias.clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    data_loss = _data_loss(y, kind)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-5, tolerance_change=1e-7,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = data_loss(z @ w + b) + 0.5 * weight_decay * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(kind, mean, std, w.detach(), b.detach(), weight_decay)


def fit_mlp(
    x: np.ndarray, y: np.ndarray, kind: str, outputs: int, weight_decay: float,
    start: MLPProbe | None = None, seed: int = 0, hidden: int = MLP_HIDDEN,
    steps: int | None = None, batch: int = MLP_BATCH,
) -> MLPProbe:  # fmt: skip
    """Fit an :class:`MLPProbe` (module docstring) on the arguments of :func:`fit_linear`:
    AdamW (decoupled ``weight_decay`` on the weight matrices) for ``steps`` (default
    ``MLP_STEPS``) steps of ``batch`` samples (all of them if fewer), in seeded epochs.
    ``start``: a probe of the same features to start from, else a seeded initialisation
    (``nn.Linear``'s uniform bounds); dropout and draws come from a ``torch.Generator`` of
    ``seed``: deterministic."""
    mean, std, z = _standardised(x)
    gen = torch.Generator().manual_seed(seed)
    if start is None:
        params = []
        for fan_in, fan_out in ((z.shape[1], hidden), (hidden, outputs)):
            bound = fan_in**-0.5
            for shape in ((fan_in, fan_out), (fan_out,)):
                params.append((torch.rand(shape, generator=gen) * 2 - 1) * bound)
    else:
        params = [t.clone() for t in (start.w1, start.b1, start.w2, start.b2)]
    w1, b1, w2, b2 = (p.requires_grad_(True) for p in params)
    groups = [{"params": [w1, w2], "weight_decay": weight_decay}, {"params": [b1, b2]}]
    opt = torch.optim.AdamW(groups, lr=MLP_LR, weight_decay=0.0)
    data_loss = _data_loss(y, kind)
    n = len(z)
    size = min(batch, n)
    order = torch.randperm(n, generator=gen)
    at = 0
    with torch.enable_grad():
        for _ in range(MLP_STEPS if steps is None else steps):
            if at + size > n:
                order, at = torch.randperm(n, generator=gen), 0
            rows = order[at : at + size]
            at += size
            h = F.gelu(z[rows] @ w1 + b1)
            keep = torch.rand(h.shape, generator=gen) >= MLP_DROPOUT
            h = h * keep / (1 - MLP_DROPOUT)
            opt.zero_grad()
            data_loss(h @ w2 + b2, rows).backward()
            opt.step()
    w1, b1, w2, b2 = (p.detach() for p in (w1, b1, w2, b2))
    return MLPProbe(kind, mean, std, w1, b1, w2, b2, weight_decay)


Fitter = Callable[..., Probe]  # (x, y, kind, outputs, weight_decay, start=None) -> Probe


@dataclass(frozen=True)
class Head:
    """A probe kind: its fitter (:func:`fit_linear`'s arguments), the weight decays it picks
    from, and whether each decay's fit starts from the previous (larger) decay's probe."""

    name: str
    fit: Fitter
    weight_decays: tuple[float, ...]
    warm_start: bool


LINEAR = Head("linear", fit_linear, WEIGHT_DECAYS, warm_start=True)


def head(name: str, seed: int = 0) -> Head:
    """The :class:`Head` called ``name`` (one of :data:`HEADS`); ``seed``: the MLP's."""
    if name == "linear":
        return LINEAR
    if name == "mlp":  # every decay from the same seeded start: the pick ignores their order
        return Head("mlp", partial(fit_mlp, seed=seed), MLP_WEIGHT_DECAYS, warm_start=False)
    raise TerrasynthError(f"unknown probe head '{name}' (heads: {', '.join(HEADS)})")


def chip_counts(probe: Probe, xs: list[np.ndarray], ys: list[np.ndarray], outputs: int):
    """Per chip: its confusion matrix (class maps) or label counts (label vectors)."""
    if probe.kind == "multilabel":
        return np.stack([label_counts(probe.predict(x), y) for x, y in zip(xs, ys, strict=True)])
    return np.stack([confusion(probe.predict(x), y, outputs) for x, y in zip(xs, ys, strict=True)])


def scores_of(kind: str) -> Callable[[np.ndarray], dict[str, float]]:
    return multilabel_scores if kind == "multilabel" else class_map_scores


def select_and_fit(
    train: tuple[list[np.ndarray], list[np.ndarray]],
    val: tuple[list[np.ndarray], list[np.ndarray]],
    kind: str,
    outputs: int,
    weight_decays: tuple[float, ...] | None = None,
    head: Head = LINEAR,
) -> Probe:
    """The ``head``'s probe of the weight decay (default: the head's) with the best
    validation macro F1 (the larger decay on ties), fitted on the training samples."""
    x = np.concatenate(train[0])
    y = np.concatenate(train[1])
    best, best_score, probe = None, -np.inf, None
    for wd in sorted(weight_decays or head.weight_decays, reverse=True):
        probe = head.fit(x, y, kind, outputs, wd, start=probe if head.warm_start else None)
        counts = chip_counts(probe, val[0], val[1], outputs).sum(0)
        s = scores_of(kind)(counts)["macro_f1"]
        s = -1.0 if not np.isfinite(s) else s
        if s > best_score:
            best, best_score = probe, s
    assert best is not None
    return best


# -- chips, splits and inputs --------------------------------------------------------------
def label_modalities(store: ChipStore, names: list[str] | None = None) -> list[str]:
    """The store's label modalities (``names``: only these, checked)."""
    reg = store.registry
    labels = [
        m for m in store.modalities if reg[m].kind in LABEL_KINDS and store.available(m).any()
    ]
    if not labels:
        raise TerrasynthError(
            f"{store.path}: no label modality (class map or label vector) in this store"
        )
    for n in names or []:
        if n not in labels:
            raise TerrasynthError(
                f"'{n}' is not a label modality of {store.path} (its label modalities: "
                f"{', '.join(labels)})"
            )
    return [m for m in labels if m in names] if names else labels


def places(store: ChipStore, rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """The place of each chip of ``rows``: squares of one chip's footprint on the ground
    (at the rows' median pixel size), numbered in the order of a seeded hash."""
    table = store.table
    gsd = float(np.median(table["gsd_m"].to_numpy()[rows])) if len(rows) else 1.0
    cfg = SplitConfig(block_size_m=store.chip_size * gsd, seed=seed)
    lon, lat = table["lon"].to_numpy()[rows], table["lat"].to_numpy()[rows]
    blocks = [cfg.block_of(float(a), float(b)) for a, b in zip(lon, lat, strict=True)]
    order = sorted(
        set(blocks), key=lambda b: hashlib.sha256(f"{seed}:{b[0]}:{b[1]}".encode()).digest()
    )
    rank = {p: i for i, p in enumerate(order)}
    return np.array([rank[b] for b in blocks], dtype=np.int64)


def place_split(store: ChipStore, rows: np.ndarray, seed: int) -> dict[str, np.ndarray] | None:
    """``rows`` split by place (module docstring); None with fewer than three places."""
    of = places(store, rows, seed)
    n_places = int(of.max()) + 1 if len(of) else 0
    if n_places < 3:
        return None
    cum = np.cumsum(np.bincount(of, minlength=n_places)) / len(rows)
    n_train = int(np.clip(np.searchsorted(cum, 0.7) + 1, 1, n_places - 2))
    n_val = int(np.clip(np.searchsorted(cum, 0.85) + 1, n_train + 1, n_places - 1))
    return {
        "train": rows[of < n_train],
        "val": rows[(of >= n_train) & (of < n_val)],
        "test": rows[of >= n_val],
    }


def probe_splits(
    store: ChipStore, label: str, seed: int = 0, only: np.ndarray | None = None
) -> tuple[dict[str, np.ndarray], str] | None:
    """Rows of the label set's chips per split and how they were split (``store`` or
    ``by place``); None when they cannot be split. ``only``: a (chips,) bool mask of the
    store's chips to keep (e.g. those holding some inputs) before splitting."""
    has = store.available(label) if only is None else store.available(label) & only
    split = store.table["split"].to_numpy()
    rows = {s: np.flatnonzero(has & (split == s)) for s in SPLITS}
    if all(len(r) for r in rows.values()):
        return rows, "store"
    again = place_split(store, np.flatnonzero(has), seed)
    return (again, "by place") if again is not None else None


def spread(rows: np.ndarray, n: int | None) -> np.ndarray:
    """At most ``n`` of ``rows``, evenly spread over them (not the first source only)."""
    if n is None or len(rows) <= n:
        return rows
    return rows[np.linspace(0, len(rows) - 1, n).astype(int)]


def input_subsets(
    store: ChipStore, rows: dict[str, np.ndarray], known: list[str]
) -> list[tuple[str, ...]]:
    """Each continuous raster modality in ``known`` found on chips of every split, alone,
    then all of them (module docstring)."""
    reg = store.registry
    singles = [
        m
        for m in store.modalities
        if reg[m].kind == "continuous" and reg[m].is_raster and m in known
        and all(store.available(m)[r].any() for r in rows.values())
    ]  # fmt: skip
    out = [(m,) for m in singles]
    return out + [tuple(singles)] if len(singles) > 1 else out


# -- features ------------------------------------------------------------------------------
def _select(batch: dict, keep: torch.Tensor) -> dict:
    return {k: v[keep] if torch.is_tensor(v) else v for k, v in batch.items()}


def _given(sig: dict[str, Signal], inputs: tuple[str, ...]) -> dict[str, Signal]:
    """The signals a model is given: the inputs, then location and time."""
    return {n: sig[n] for n in [*inputs, "location", "time"] if n in sig}


@torch.no_grad()
def model_features(
    model: GenerativeModel, batch: dict, order: list[str], inputs: tuple[str, ...],
    chip_size: int, factor: int,
) -> torch.Tensor | None:  # fmt: skip
    """(B, C, S / factor, S / factor) features of ``model`` given ``inputs`` (those it
    knows; None if none), window by window over each chip (the benchmark's tiles),
    averaged onto the probe grid."""
    cfg = model.config
    if not any(m in cfg.modalities for m in inputs):
        return None
    f = model.feature_factor
    size = min(cfg.window_size, chip_size)
    b = batch["gsd"].shape[0]
    out = torch.zeros(b, model.feature_channels, chip_size // f, chip_size // f)
    device = model_device(model)
    for (r, c), tile in zip(
        tile_offsets(size, chip_size), tiles(batch, size, chip_size), strict=True
    ):
        sig = _given(batch_signals(tile, cfg, order), inputs)
        gsd = tile["gsd"].float()
        given = sampling_inputs(sig, [], {}, 0.0, gsd, None, True)
        if device.type != "cpu":
            given, gsd = to_device(given, device), gsd.to(device)
        feats = model.feature_map(given, gsd).float().cpu()
        out[:, :, r // f : (r + size) // f, c // f : (c + size) // f] = feats
    return F.avg_pool2d(out, factor // f) if factor > f else out


def _base_grid(x: torch.Tensor, chip_size: int) -> torch.Tensor:
    up = chip_size // x.shape[-1]
    return x.repeat_interleave(up, -2).repeat_interleave(up, -1) if up > 1 else x


def raw_features(sig: dict[str, Signal], inputs: tuple[str, ...], chip_size: int, factor: int):
    """(B, C, S / factor, S / factor): per feature pixel and given band, the mean and
    standard deviation of its known values and the fraction known."""
    parts = []
    for name in inputs:
        if name not in sig:
            continue
        for g, x in sig[name].groups.items():
            k = _base_grid(sig[name].known[g], chip_size)
            x = _base_grid(x, chip_size)
            n = F.avg_pool2d(k, factor)
            mean = F.avg_pool2d(x * k, factor) / n.clamp_min(1e-6)
            sq = F.avg_pool2d(x * x * k, factor) / n.clamp_min(1e-6)
            std = (sq - mean**2).clamp_min(0).sqrt()
            parts += [mean, std, F.avg_pool2d(k.amax(1, keepdim=True), factor)]
    return torch.cat(parts, 1)


def raw_chip_features(sig: dict[str, Signal], inputs: tuple[str, ...]) -> np.ndarray:
    """(B, C): per given band its mean and standard deviation over the chip's known pixels,
    and a presence flag per input."""
    parts = []
    for name in inputs:
        if name not in sig:
            continue
        s = sig[name]
        parts += [band_statistics(s.groups, s.known), s.present.float().numpy()[:, None]]
    return np.concatenate(parts, 1)


def input_valid(sig: dict[str, Signal], inputs: tuple[str, ...], chip_size: int, factor: int):
    """(B, S / factor, S / factor) bool: some band of some input is known under the pixel."""
    out = None
    for name in inputs:
        if name not in sig:
            continue
        for k in sig[name].known.values():
            v = _base_grid(k.amax(1), chip_size) > 0
            out = v if out is None else out | v
    assert out is not None
    return F.max_pool2d(out[:, None].float(), factor)[:, 0] > 0


def class_cells(batch: dict, mod: Modality, chip_size: int, factor: int) -> torch.Tensor:
    """(B, S / factor, S / factor): the majority class of the known labels under each
    probe-grid pixel, -1 where none is known."""
    y = _base_grid(batch[f"{mod.name}/{mod.groups[0].name}"], chip_size)
    ok = y >= 0
    onehot = F.one_hot(y.clamp_min(0), mod.num_classes).permute(0, 3, 1, 2).float()
    counts = F.avg_pool2d(onehot * ok[:, None], factor)
    cls = counts.argmax(1)
    return torch.where(counts.sum(1) > 0, cls, torch.full_like(cls, -1))


# -- the run -------------------------------------------------------------------------------
@dataclass
class ProbeRow:
    """One score of one probe: a row of ``probe.csv``."""

    label: str
    features: str
    inputs: str
    metric: str
    value: float
    low: float
    high: float
    kind: str
    split: str
    train_chips: int
    val_chips: int
    test_chips: int
    test_places: int
    test_samples: int
    weight_decay: float
    head: str  # the probe: linear or mlp


@dataclass
class _Samples:
    """Per split, per chip: features (n, C), targets (n,) or (1, L), and its store row."""

    x: dict[str, list[np.ndarray]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    y: dict[str, list[np.ndarray]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    rows: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in SPLITS})

    def add(self, split: str, x: np.ndarray, y: np.ndarray, row: int) -> None:
        if len(x):
            self.x[split].append(x.astype(np.float32))
            self.y[split].append(y)
            self.rows[split].append(int(row))


def _unet_model(unet: str | Path | GenerativeModel | None) -> GenerativeModel | None:
    """A U-Net given as a run or model folder loaded as the benchmark loads it."""
    return load_unet(unet) if isinstance(unet, (str, Path)) else unet


def _encoders(model, unet, seed: int) -> dict[str, GenerativeModel]:
    from terrasynth.models.factory import build_model

    if not callable(getattr(model, "feature_map", None)):
        raise TerrasynthError(
            f"the model ({type(model).__name__}) has no feature_map: it cannot be probed"
        )
    torch.manual_seed(seed)
    random = build_model(copy.deepcopy(model.config)).to(model_device(model)).eval()
    encoders = {"model": model.eval(), "random_init": random}
    if unet is not None:
        if not callable(getattr(unet, "feature_map", None)):
            raise TerrasynthError("the U-Net has no feature_map: it cannot be probed")
        encoders["unet"] = unet.eval()
    return encoders


def run_probes(
    model: GenerativeModel,
    store: str | Path,
    unet: str | Path | GenerativeModel | None = None,
    labels: list[str] | None = None,
    max_chips: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: Progress | None = None,
    notes: list[str] | None = None,
    heads: tuple[str, ...] = ("linear",),
) -> list[ProbeRow]:
    """Probe every label set of ``store`` (module docstring) with ``model``'s embeddings
    and the comparison feature sets. ``unet``: a U-Net (folder or model) whose features
    are compared too. ``max_chips``: at most this many chips per label set and split
    (evenly spread). ``notes`` collects why a label set or input was left out. ``heads``:
    the probes fitted on every feature set (of :data:`HEADS`)."""
    probes = [head(h, seed) for h in heads]
    st = ChipStore.open(store)
    names = label_modalities(st, labels)
    encoders = _encoders(model, _unet_model(unet), seed)
    factor = max(e.feature_factor for e in encoders.values())
    chip = st.chip_size
    if chip % factor:
        raise TerrasynthError(f"chips of {chip} px are not a multiple of the features' {factor} px")
    notes = notes if notes is not None else []
    ds = ChipDataset(st)
    order = ds.modalities
    plans = []
    for name in names:
        found = probe_splits(st, name, seed)
        if found is None:
            notes.append(f"{name}: its chips lie in fewer than three places; not probed")
            continue
        rows, how = found
        rows = {s: spread(r, max_chips) for s, r in rows.items()}
        subsets = input_subsets(st, rows, list(model.config.modalities))
        if not subsets:
            notes.append(f"{name}: no input modality of the model on its chips in every split")
            continue
        plans.append((name, rows, how, subsets))
    total = sum(sum(len(r) for r in p[1].values()) for p in plans)
    done = 0
    out: list[ProbeRow] = []
    for name, rows, how, subsets in plans:
        mod = st.registry[name]
        samples = {(s, e): _Samples() for s in subsets for e in [*encoders, "raw_bands"]}
        rng = np.random.default_rng(seed)
        split_of = {int(i): s for s, r in rows.items() for i in r}
        order_rows = np.sort(np.concatenate(list(rows.values())))
        for start in range(0, len(order_rows), batch_size):
            part = order_rows[start : start + batch_size]
            batch = collate_chips([ds[int(i)] for i in part])
            for subset in subsets:
                have = batch["available"][:, [order.index(m) for m in subset]].any(1)
                if not have.any():
                    continue
                sub = _select(batch, have)
                chips_here = part[have.numpy()]
                _extract(
                    samples, subset, sub, order, mod, encoders, chip, factor, chips_here,
                    split_of, rng,
                )  # fmt: skip
            done += len(part)
            if progress is not None:
                progress(f"features: {name}", done, total)
        for k, (subset, enc) in enumerate(samples):
            if progress is not None:
                progress(f"probes: {name} ({k + 1}/{len(samples)})", done, total)
            for h in probes:
                out += _probe(samples[(subset, enc)], name, mod, enc, subset, how, seed, st, h)
    return out


def _extract(samples, subset, batch, order, mod, encoders, chip, factor, rows, split_of, rng):
    """Add one batch's features of every feature set given ``subset`` to ``samples``."""
    main = encoders["model"].config
    sig = batch_signals(batch, main, order)
    valid = input_valid(sig, subset, chip, factor)
    multilabel = mod.kind == "multilabel"
    if multilabel:
        targets = batch[f"{mod.name}/labels"].numpy().astype(np.int64)
    else:
        targets = class_cells(batch, mod, chip, factor)
        valid = valid & (targets >= 0)
    maps = {e: model_features(m, batch, order, subset, chip, factor) for e, m in encoders.items()}
    maps["raw_bands"] = raw_features(sig, subset, chip, factor)
    chip_raw = raw_chip_features(sig, subset) if multilabel else None
    for i, row in enumerate(rows):
        split = split_of[int(row)]
        ok = valid[i]
        if not ok.any():
            continue
        for enc, fmap in maps.items():
            if fmap is None:
                continue
            if multilabel:
                x = (
                    chip_raw[i : i + 1]
                    if enc == "raw_bands"
                    else fmap[i][:, ok].mean(1).numpy()[None]
                )
                samples[(subset, enc)].add(split, x, targets[i : i + 1], row)
                continue
            x = fmap[i][:, ok].T.numpy()
            y = targets[i][ok].numpy()
            if split != "test" and len(y) > MAX_FIT_PIXELS:
                keep = np.sort(rng.choice(len(y), MAX_FIT_PIXELS, replace=False))
                x, y = x[keep], y[keep]
            samples[(subset, enc)].add(split, x, y, row)


def _probe(
    data: _Samples, name, mod, enc, subset, how, seed, store, head: Head = LINEAR
) -> list[ProbeRow]:
    """The scores of ``head`` fitted on one feature set's samples (none without samples
    in every split)."""
    if not all(data.x[s] for s in SPLITS):
        return []
    kind = mod.kind
    outputs = mod.num_classes
    probe = select_and_fit((data.x["train"], data.y["train"]), (data.x["val"], data.y["val"]),
                           kind, outputs, head=head)  # fmt: skip
    per_chip = chip_counts(probe, data.x["test"], data.y["test"], outputs)
    scores, n_places = place_bootstrap(store, data.rows["test"], per_chip, scores_of(kind), seed)
    n = {s: len(data.x[s]) for s in SPLITS}
    samples = int(sum(len(y) for y in data.y["test"]))
    return [
        ProbeRow(
            name,
            enc,
            "+".join(subset),
            metric,
            *scores[metric],
            kind,
            how,
            n["train"],
            n["val"],
            n["test"],
            n_places,
            samples,
            probe.weight_decay,
            head.name,
        )  # fmt: skip
        for metric in METRICS[kind]
    ]


# -- outputs -------------------------------------------------------------------------------
def csv_text(rows: list, columns: tuple[str, ...] = CSV_COLUMNS) -> str:
    """CSV of dataclass rows (``columns``: their fields), floats to 6 significant digits."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        d = asdict(r)
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in d.items()})
    return buf.getvalue()


def _cell(r) -> str:
    """``value [low, high]`` of a row with an interval, ``-`` if none."""
    if r is None or not np.isfinite(r.value):
        return "-"
    return f"{r.value:.3f} [{r.low:.3f}, {r.high:.3f}]"


def markdown(rows: list[ProbeRow], settings: dict | None = None) -> str:
    """``probe.md``: per label set a table of every input subset x feature set x head, then
    which input subsets put the model ahead of raw band statistics and of the random-init
    model on macro F1 (with the same head), by point estimate and with the 95 % intervals
    apart, and on how many label sets."""
    heads = list(dict.fromkeys(r.head for r in rows))
    title = "Linear probes" if heads == ["linear"] else "Probes (heads: " + ", ".join(heads) + ")"
    lines = [f"# {title}", ""]
    if settings:
        lines += [", ".join(f"{k}: {v}" for k, v in settings.items()), ""]
    by = {(r.label, r.inputs, r.features, r.head, r.metric): r for r in rows}
    summary = []
    ahead_sets: dict[str, None] = {}
    apart_sets: dict[str, None] = {}
    for label in dict.fromkeys(r.label for r in rows):
        first = next(r for r in rows if r.label == label)
        metrics = METRICS[first.kind]
        lines += [
            f"## {label} ({first.kind}; split: {first.split})",
            "",
            "| inputs | features | head | chips train/val/test | test places | test samples | "
            "weight decay | " + " | ".join(metrics) + " |",
            "|---|---|---|---|---:|---:|---:|" + "---:|" * len(metrics),
        ]
        for inputs in dict.fromkeys(r.inputs for r in rows if r.label == label):
            for enc, h in ((e, h) for e in FEATURE_SETS for h in heads):
                r0 = by.get((label, inputs, enc, h, metrics[0]))
                if r0 is None:
                    continue
                cells = " | ".join(_cell(by.get((label, inputs, enc, h, m))) for m in metrics)
                lines.append(
                    f"| {inputs} | {enc} | {h} | {r0.train_chips}/{r0.val_chips}/"
                    f"{r0.test_chips} | {r0.test_places} | {r0.test_samples} | "
                    f"{r0.weight_decay:g} | {cells} |"
                )
            for h in heads:
                m = by.get((label, inputs, "model", h, "macro_f1"))
                others = [
                    by.get((label, inputs, e, h, "macro_f1")) for e in ("raw_bands", "random_init")
                ]
                if m is not None and all(o is not None for o in others):
                    ahead = ["yes" if m.value > o.value else "no" for o in others]
                    apart = all(m.low > o.high for o in others)
                    if ahead == ["yes", "yes"]:
                        ahead_sets[label] = None
                    if apart:
                        apart_sets[label] = None
                    summary.append(
                        f"| {label} | {inputs} | {h} | {m.value:.3f} | {others[0].value:.3f} | "
                        f"{others[1].value:.3f} | {ahead[0]} | {ahead[1]} | "
                        f"{'yes' if apart else 'no'} | {m.test_places} |"
                    )
        lines.append("")
    if summary:
        lines += [
            "## Model ahead? (macro F1)",
            "",
            "Point estimates; *apart*: the model's 95 % interval lies above both others' "
            "(with one test place an interval is a point, so apart says little there).",
            "",
            "| label | inputs | head | model | raw bands | random init | ahead of raw | "
            "ahead of random | apart from both | test places |",
            "|---|---|---|---:|---:|---:|:---:|:---:|:---:|---:|",
            *summary,
            "",
            f"Ahead of both for some input subset and head: {len(ahead_sets)} of "
            f"{len({r.label for r in rows})} label sets ({', '.join(ahead_sets) or 'none'}); "
            f"apart from both: {len(apart_sets)} ({', '.join(apart_sets) or 'none'}).",
            "",
        ]
    return "\n".join(lines)


def write_probes(
    rows: list[ProbeRow], folder: str | Path, settings: dict | None = None,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """``probe.csv`` and ``probe.md`` into ``folder``, atomically."""
    folder = Path(folder)
    with atomic_folder(folder, overwrite, "probe") as tmp:
        (tmp / "probe.csv").write_text(csv_text(rows))
        (tmp / "probe.md").write_text(markdown(rows, settings))
    return folder
