"""Training loop: AdamW with warm-up and cosine decay, EMA, bf16 autocast, clipping,
accumulation, metrics log, atomic checkpoints, resume, Ctrl-C, and DDP under torchrun.

A run folder holds::

    RUN/train_config.json       the training settings (model config is in each checkpoint)
    RUN/metrics.jsonl           one JSON line per logged step (loss per modality, lr, speed)
    RUN/checkpoints/step_N/     config.json, model.safetensors, ema.safetensors,
                                optimizer.pt (optimiser, scheduler, RNG and data position)
    RUN/latest                  name of the newest complete checkpoint
    RUN/model/                  the EMA weights as a from_pretrained folder

A checkpoint is written to a temporary folder and renamed into place; ``latest`` is
replaced atomically after it, so a run killed at any moment resumes from a whole
checkpoint.

A run folder may come from someone else, so a resume runs no code from it: ``latest``
must name a checkpoint as this trainer names them, inside ``RUN/checkpoints``, and
``optimizer.pt`` holds only tensors and plain values, read with ``weights_only=True``.

A resume is exact: the model, optimiser, scheduler, EMA, the trainer's generator, torch's
global generator and the data position are restored, and every batch's augmentation
(relief scaling, crops, flips) is seeded from its position in the data order
(``SeededBatches``), so it neither depends on what came before nor on which loader worker
makes it. ``metrics.jsonl`` is cut back to the checkpoint's step, so every step is logged
once; settings that would change the run refuse to resume instead of being ignored.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler

from terrasynth.atomic import write_text
from terrasynth.data.dataset import ChipDataset, ChunkShuffleSampler, RandomCropFlip, collate_chips
from terrasynth.devices import resolve_device
from terrasynth.errors import TerrasynthError
from terrasynth.models.config import ModelConfig, preset_config
from terrasynth.models.factory import build_model
from terrasynth.models.retrieval import build_index
from terrasynth.models.signals import batch_signals
from terrasynth.training.objective import FlowObjective, RegressionObjective
from terrasynth.training.score_objective import ScoreConfig, ScoreObjective

KEEP_CHECKPOINTS = 2
CHECKPOINT_NAME = re.compile(r"step_(\d{7,})")  # as ``Trainer.save`` names them
# Settings a resume may change; any other differing from the saved ones refuses to resume.
RESUMABLE = ("steps", "time_limit_min", "num_workers")
FLAG_NAMES = {"time_limit_min": "time-limit", "num_workers": "workers"}


@dataclass
class TrainConfig:
    """Training settings, saved as ``train_config.json`` in the run folder."""

    preset: str = "tiny"
    backbone: str = "scene_transformer"  # or "conv_generator", "unet"
    steps: int = 1400
    batch_size: int = 24  # per process and micro-step
    accumulate: int = 1
    lr: float = 1.5e-3
    weight_decay: float = 0.02
    warmup: int = 100
    grad_clip: float = 1.0
    # clip each of the model's parts (``model.parameter_parts()``) to ``grad_clip`` on its
    # own, so one part's large gradient does not shrink another's step (a design option,
    # measured in docs/design.md; off: one clip over all parameters)
    grad_clip_parts: bool = False
    ema_decay: float = 0.995
    bf16: bool = True
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    source_balance: float = 0.5  # 1: groups in store proportions; 0: equally often
    balance_by: str = "kind"  # groups: "source", or "kind" (source and modality set)
    derive: bool = True  # fill derived modalities (slope from DEM) into training chips
    relief_scale: float = 0.6  # chance to flatten a chip's DEM and recompute its slope
    time_limit_min: float = 0.0  # stop (and checkpoint) after this many minutes in all; 0: none
    # learning-rate decay: "steps" (cosine over ``steps``) or "time" (cosine over the time
    # limit, wall clock of the whole run, a resumed run's earlier time included: a compute
    # budget in minutes, not steps)
    schedule: str = "steps"
    # the convolutional generator's split of each chip's modalities into generated and
    # given (training/score_objective.py): "any" (as the flow objective), "inputs" (as
    # the U-Net: at least one given, all that are not generated given) or "mixed" (one of
    # the two per chip)
    roles: str = "any"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        # runs saved before these options
        d = {
            "balance_by": "source",
            "derive": False,
            "relief_scale": 0.0,
            "backbone": "scene_transformer",
            **d,
        }
        return cls(**{k: v for k, v in d.items() if k in known})


class ResumableBatches(Sampler[list[int]]):
    """Endless batches of chunk-shuffled indices; the position can be saved and restored.

    Under DDP each process takes every ``world``-th batch of one shared order, so processes
    see disjoint data and a global batch spans them.
    """

    def __init__(
        self,
        dataset: ChipDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        balance: float = 1.0,
        balance_by: str = "source",
    ) -> None:
        self.sampler = ChunkShuffleSampler(dataset, seed, balance, balance_by)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.epoch, self.offset = 0, 0  # offset: batches of the epoch already drawn
        # Loader workers draw batches ahead of training; the position after each drawn
        # batch is kept so a checkpoint records what was trained on, not what was drawn.
        self._start = self.state()
        self._after: list[dict[str, int]] = []

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def state_after(self, n: int) -> dict[str, int]:
        """The position after the first ``n`` batches drawn since the start or last load."""
        return self._after[n - 1] if n > 0 else dict(self._start)

    def load_state(self, s: dict[str, int]) -> None:
        self.epoch, self.offset = int(s["epoch"]), int(s["offset"])
        self._start, self._after = self.state(), []

    def __iter__(self) -> Iterator[list[int]]:
        for _, _, batch in self.positions():
            yield batch

    def positions(self) -> Iterator[tuple[int, int, list[int]]]:
        """Endless (epoch, batch number in the epoch, chip indices)."""
        while True:
            self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)
            batches = [
                order[i : i + self.batch_size]
                for i in range(0, len(order) - self.batch_size + 1, self.batch_size)
            ]
            if not batches:
                raise TerrasynthError("fewer training chips than one batch")
            mine = batches[self.rank :: self.world]
            while self.offset < len(mine):
                position = (self.epoch, self.offset)
                self.offset += 1
                self._after.append(self.state())
                yield (*position, mine[position[1]])
            self.epoch, self.offset = self.epoch + 1, 0


class _Positions:
    """``ResumableBatches.positions`` as a DataLoader sampler."""

    def __init__(self, batches: ResumableBatches) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        return self.batches.positions()


class SeededBatches(Dataset):
    """Whole batches of a dataset, each with random streams seeded from its position.

    ``batch[(epoch, number, indices)]`` restarts the dataset's streams (relief scaling,
    crops and flips) from (seed, rank, epoch, number) and collates the chips: a batch is
    the same in whichever loader worker it is made and whether or not the run was resumed
    before it, so the data position in a checkpoint stands for those generators' states.
    """

    def __init__(self, dataset: ChipDataset, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int, list[int]]) -> dict:
        epoch, number, indices = item
        self.dataset.reseed((self.seed, self.rank, epoch, number))
        return collate_chips([self.dataset[i] for i in indices])


def _as_is(batch: dict) -> dict:
    return batch


def _lr_lambda(
    cfg: TrainConfig, elapsed: Callable[[], float] | None = None
) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 5 % over the steps, or (``elapsed``: seconds
    trained so far) over the time limit."""

    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if elapsed is not None:
            progress = elapsed() / (60.0 * cfg.time_limit_min)
        else:
            progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def _dist(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun (NCCL when the
    processes train on CUDA devices, else Gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _train_device(name: str | torch.device) -> torch.device:
    """The device one training process uses: ``name`` checked (``resolve_device``); under
    torchrun a bare ``cuda`` (or ``auto`` finding CUDA) is this process's
    ``cuda:LOCAL_RANK``."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2))


def _flag(name: str, value: Any) -> str:
    """A setting as the command-line flag that gives it."""
    flag = FLAG_NAMES.get(name, name.replace("_", "-"))
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def resumed_config(
    saved: dict[str, Any], cfg: TrainConfig, given: Collection[str] | None
) -> TrainConfig:
    """The settings of a resumed run: the saved ones, with ``RESUMABLE`` ones from ``cfg``.

    ``given`` names the settings the caller chose (None: those of ``cfg`` that differ from
    the defaults); one that differs from the saved value is refused, not ignored.
    """
    known = {f.name: f for f in fields(TrainConfig)}
    for k, v in saved.items():
        want = type(getattr(TrainConfig(), k)) if k in known else None
        if want is not None and not isinstance(v, want) and not (want is float and type(v) is int):
            raise TerrasynthError(f"train_config.json: '{k}' should be a {want.__name__}")
    old = TrainConfig.from_dict(saved)
    if given is None:
        given = [k for k in known if getattr(cfg, k) != getattr(TrainConfig(), k)]
    clash = [k for k in given if k not in RESUMABLE and getattr(cfg, k) != getattr(old, k)]
    if clash:
        asked = ", ".join(
            f"{_flag(k, getattr(cfg, k))} (saved: {_flag(k, getattr(old, k))})" for k in clash
        )
        raise TerrasynthError(
            f"a resumed run keeps its saved settings; these differ: {asked}. "
            "Leave them out, or train a new run"
        )
    # only what the caller chose: an unchosen --steps must not replace the saved one
    return replace(old, **{k: getattr(cfg, k) for k in RESUMABLE if k in given})


def checkpoint_to_resume(run: Path) -> Path:
    """The checkpoint folder ``RUN/latest`` names, if it is one this trainer wrote."""
    if not (run / "latest").is_file():
        raise TerrasynthError(f"{run / 'latest'}: not a file")
    with open(run / "latest", "rb") as f:
        text = f.read(64)
    name = text.decode("ascii", "replace").strip()
    m = CHECKPOINT_NAME.fullmatch(name)
    if m is None or name != f"step_{int(m[1]):07d}":
        raise TerrasynthError(f"{run / 'latest'}: does not name a checkpoint (step_NNNNNNN)")
    base = (run / "checkpoints").resolve()
    ckpt = run / "checkpoints" / name
    if ckpt.resolve().parent != base or not ckpt.is_dir():
        raise TerrasynthError(f"{run / 'latest'}: {name} is not a checkpoint folder in {base}")
    for f in ("config.json", "model.safetensors", "ema.safetensors", "optimizer.pt"):
        if not (ckpt / f).resolve().is_relative_to(base) or not (ckpt / f).is_file():
            raise TerrasynthError(f"{ckpt}: no {f} of its own")
    return ckpt


def read_state(path: Path, step: int) -> dict[str, Any]:
    """The training state in a checkpoint's ``optimizer.pt``, read with ``weights_only``:
    tensors and plain values only, on the CPU (a GPU run resumes anywhere)."""
    try:
        with warnings.catch_warnings():  # a crafted file's pickle protocol: one error line
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise TerrasynthError(
            f"{path}: not a training state this trainer wrote ({type(exc).__name__}); "
            "nothing in it was run"
        ) from exc
    if (
        not isinstance(state, dict)
        or not {"optimizer", "scheduler", "step", "ranks"} <= state.keys()
        or state["step"] != step
        or not isinstance(state["ranks"], list)
        or not all(
            isinstance(r, dict) and {"data", "generator", "torch_rng"} <= r.keys()
            for r in state["ranks"]
        )
    ):
        raise TerrasynthError(f"{path}: not the training state of step {step}")
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` logged after ``step`` (by a run killed after its
    last checkpoint) and a last line cut short, so a resume logs every step once."""
    if not path.exists():
        return
    keep = []
    for i, line in enumerate(path.read_text().splitlines(keepends=True)):
        if not line.endswith("\n"):  # the last line, cut short while being written
            break
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TerrasynthError(f"{path}: line {i + 1} is not JSON ({exc})") from exc
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise TerrasynthError(f"{path}: line {i + 1} has no step")
        if rec["step"] <= step:
            keep.append(line)
    write_text(path, "".join(keep))


def objective_for(config: ModelConfig, roles: str = "any"):
    """The training objective of a model's backbone: flow matching for the transformer,
    proper scores over an ensemble for the one-step convolutional generator (its chips'
    modalities split as ``roles`` says), MSE / cross-entropy of one prediction for the
    deterministic U-Net."""
    if config.backbone == "conv_generator":
        return ScoreObjective(ScoreConfig(roles=roles))
    if config.backbone == "unet":
        return RegressionObjective()
    return FlowObjective()


class Trainer:
    """Trains any model of ``terrasynth.models.factory`` on a chip store into a run folder.

    The model config is the preset of ``cfg.backbone`` over the store's modalities and
    statistics, or ``model_config`` when given (its backbone and preset then win over
    ``cfg``'s), or on resume the checkpoint's. On resume, ``given`` names the settings of
    ``cfg`` the caller chose (see ``resumed_config``)."""

    def __init__(
        self,
        store: str | Path,
        run: str | Path,
        cfg: TrainConfig,
        resume: bool = False,
        model_config: ModelConfig | None = None,
        given: Collection[str] | None = None,
        device: str | torch.device = "auto",
    ) -> None:
        self.run = Path(run)
        self.device = _train_device(device)
        self.rank, self.world = _dist(self.device)
        latest = self.run / "latest"
        if resume and not latest.exists():
            raise TerrasynthError(f"{self.run}: nothing to resume (no checkpoint yet)")
        if not resume and latest.exists():
            raise TerrasynthError(f"{self.run} already holds a run; use --resume or a new folder")
        ckpt = checkpoint_to_resume(self.run) if resume else None
        if resume:
            try:
                saved = json.loads((self.run / "train_config.json").read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise TerrasynthError(f"{self.run}: no readable train_config.json ({exc})") from exc
            if not isinstance(saved, dict):
                raise TerrasynthError(f"{self.run}/train_config.json: not a settings object")
            cfg = resumed_config(saved, cfg, given)
        elif model_config is not None:
            cfg = replace(cfg, backbone=model_config.backbone, preset=model_config.preset)
        if cfg.schedule not in ("steps", "time"):
            raise TerrasynthError(f"unknown schedule '{cfg.schedule}' (schedules: steps, time)")
        if cfg.schedule == "time" and cfg.time_limit_min <= 0:
            raise TerrasynthError("a learning rate decaying over time needs a time limit")
        if cfg.seed < 0:
            raise TerrasynthError("the seed must be >= 0")
        self.cfg = cfg
        torch.manual_seed(cfg.seed + self.rank)
        self.dataset = ChipDataset(
            store,
            split="train",
            derive=cfg.derive,
            relief_scale=cfg.relief_scale,
            seed=cfg.seed + 1000 * self.rank,
        )
        if len(self.dataset) == 0:
            raise TerrasynthError(f"{store}: no training chips")
        if ckpt is not None:
            model_cfg = ModelConfig.load(ckpt / "config.json")
        elif model_config is not None:
            model_cfg = model_config
            if not any(m.name in self.dataset.modalities for m in model_cfg.raster_modalities()):
                raise TerrasynthError(f"{store}: no raster modality of the model config here")
        else:
            reg = self.dataset.registry
            mods = {m: reg[m].to_dict() for m in self.dataset.modalities}
            model_cfg = preset_config(cfg.preset, mods, self.dataset.store.stats, cfg.backbone)
        self.dataset.transform = RandomCropFlip(
            model_cfg.image_size, self.dataset.chip_size, seed=cfg.seed + 1000 * self.rank
        )
        self.model = build_model(model_cfg)
        # the parts to clip apart, listed once (``grad_clip_parts``); None: no parts
        self._parts = getattr(self.model, "parameter_parts", lambda: None)()
        if cfg.grad_clip_parts and self._parts is None:
            raise TerrasynthError(
                f"grad_clip_parts: the {cfg.backbone} backbone has no parts to clip apart"
            )
        if getattr(model_cfg, "retrieval_k", 0) > 0 and hasattr(self.model, "set_retrieval"):
            # the training split's summaries, looked up as conditioning (models/retrieval.py)
            plain = ChipDataset(store, split="train")
            self.model.set_retrieval(build_index(plain, model_cfg))
        self.model = self.model.to(self.device)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99)
        )
        self._t_start: float | None = None  # when train() started (the time schedule)
        self._trained_s = 0.0  # seconds trained before this (re)start, from the checkpoint
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, _lr_lambda(cfg, self._elapsed if cfg.schedule == "time" else None)
        )
        self.batches = ResumableBatches(
            self.dataset,
            cfg.batch_size,
            cfg.seed,
            self.rank,
            self.world,
            cfg.source_balance,
            cfg.balance_by,
        )
        self.gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.rank)
        self.objective = objective_for(model_cfg, cfg.roles)
        self.step = 0
        self.trained_batches = 0  # micro-batches trained since the start or the resume
        self._window: list[float] = []  # losses of the steps since the last log line
        if ckpt is not None:
            self._load(ckpt)
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=True
            )
        if self.rank == 0:
            (self.run / "checkpoints").mkdir(parents=True, exist_ok=True)
            _write_json(self.run / "train_config.json", asdict(cfg))
            # on resume, drop lines logged after the checkpoint; a new run drops those of
            # a run killed in this folder before its first checkpoint
            truncate_metrics(self.run / "metrics.jsonl", self.step)

    def _elapsed(self) -> float:
        """Seconds trained in all (earlier starts included): the time schedule and limit."""
        now = 0.0 if self._t_start is None else time.perf_counter() - self._t_start
        return self._trained_s + now

    # -- checkpoints -----------------------------------------------------------------------
    def _load(self, ckpt: Path) -> None:
        state = read_state(ckpt / "optimizer.pt", int(ckpt.name.split("_")[1]))
        if len(state["ranks"]) != self.world:
            raise TerrasynthError("resume with as many processes as the run was saved with")
        mine = state["ranks"][self.rank]
        try:
            self.model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            self.ema.module.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.batches.load_state(mine["data"])
            self.gen.set_state(mine["generator"])
            torch.set_rng_state(mine["torch_rng"])
            self.ema.n_averaged.fill_(int(state.get("ema_n", 1)))
            self._window = [float(x) for x in state.get("log_window", [])]
            self._trained_s = float(state.get("trained_s", 0.0))  # runs saved before: 0
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            why = " ".join(str(exc).split())[:300]  # one line
            raise TerrasynthError(f"{ckpt}: does not fit this run ({why})") from exc
        self.step = int(state["step"])

    def save(self) -> Path:
        """Write a checkpoint atomically (rank 0) and export the EMA model."""
        # The dataset's relief and crop generators need no state of their own: each batch
        # reseeds them from its data position (SeededBatches).
        mine = {
            "data": self.batches.state_after(self.trained_batches),
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        ranks = [mine]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine)
        if self.rank != 0:
            return self.run
        name = f"step_{self.step:07d}"
        final = self.run / "checkpoints" / name
        # Already saved at this step (by this run, or by one killed before it renamed
        # ``latest`` or exported: a renamed checkpoint is whole, and a resume is exact):
        # keep it, but still name it in ``latest`` and export it.
        if not final.exists():
            tmp = self.run / "checkpoints" / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.model.config.save(tmp / "config.json")
            save_file(_cpu(self.model.state_dict()), str(tmp / "model.safetensors"))
            save_file(_cpu(self.ema.module.state_dict()), str(tmp / "ema.safetensors"))
            torch.save(
                {
                    "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "step": self.step,
                    "ranks": ranks,
                    "ema_n": int(self.ema.n_averaged),
                    "log_window": list(self._window),  # losses since the last metrics line
                    "trained_s": self._elapsed(),  # the time limit counts the whole run
                },
                tmp / "optimizer.pt",
            )
            tmp.rename(final)
        latest_tmp = self.run / ".latest.tmp"
        latest_tmp.write_text(name)
        latest_tmp.replace(self.run / "latest")
        export = self.run / "model"
        self.ema.module.save_pretrained(export)
        olds = sorted(p for p in (self.run / "checkpoints").iterdir() if p.name.startswith("step_"))
        for old in olds[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # -- loop ------------------------------------------------------------------------------
    def train(self, on_log: Callable[[dict], None] | None = None) -> str:
        """Train to ``cfg.steps`` (or the time limit); returns why it stopped."""
        cfg = self.cfg
        loader = DataLoader(
            SeededBatches(self.dataset, cfg.seed, self.rank),
            sampler=_Positions(self.batches),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=cfg.num_workers,
            # its own generator: making the loader's iterator draws no global random number
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        it = iter(loader)
        t_start = self._t_start = time.perf_counter()
        t_log, n_log, tokens_log = t_start, 0, 0
        window = self._window  # losses of the steps since the last log line
        # --bf16 where it pays: on a CPU only for models whose class says so (cpu_bf16)
        bf16 = cfg.bf16 and (self.device.type != "cpu" or type(self.model).cpu_bf16)
        reason = "done"
        self.model.train()
        try:
            while self.step < cfg.steps:
                self.opt.zero_grad(set_to_none=True)
                parts_sum: dict[str, float] = {}
                loss_sum = 0.0
                for _ in range(cfg.accumulate):
                    batch = next(it)
                    self.trained_batches += 1
                    signals = batch_signals(
                        _to(batch, self.device), self.model.config, self.dataset.modalities
                    )
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss, parts = self.objective(
                            self.net, signals, batch["gsd"].to(self.device), self.gen
                        )
                    (loss / cfg.accumulate).backward()
                    loss_sum += float(loss.detach()) / cfg.accumulate
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.accumulate
                    n_log += len(batch["index"])
                    tokens_log += _tokens(signals, self.model.config)
                gnorm, part_norms = self._clip()
                self.opt.step()
                self.sched.step()
                self.ema.update_parameters(self.model)
                self.step += 1
                window.append(loss_sum)
                out_of_time = bool(cfg.time_limit_min) and self._all_agree(
                    self._elapsed() > 60 * cfg.time_limit_min
                )
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or out_of_time:
                    now = time.perf_counter()
                    rec = {
                        "step": self.step,
                        "loss": round(sum(window) / len(window), 5),  # mean since last log
                        "last_loss": round(loss_sum, 5),
                        "lr": self.sched.get_last_lr()[0],
                        "grad_norm": float(gnorm),
                        **({"grad_norm_parts": part_norms} if part_norms else {}),
                        "samples_per_s": n_log * self.world / (now - t_log),
                        "elapsed_s": round(now - t_start, 1),  # since this (re)start
                        "tokens_per_s": tokens_log * self.world / (now - t_log),
                        "modalities": {k: round(v, 5) for k, v in parts_sum.items()},
                    }
                    t_log, n_log, tokens_log = now, 0, 0
                    window.clear()
                    if self.rank == 0:
                        with open(self.run / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        if on_log is not None:
                            on_log(rec)
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
                if out_of_time:
                    reason = "time limit"
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
        if self.step > 0:
            self.save()
        if self.world > 1:
            dist.barrier()
        return reason

    def _clip(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Clip the gradient to ``grad_clip``: of all parameters at once, or of each of the
        model's parts on its own (``grad_clip_parts``). The norm over all before clipping,
        and each part's (empty without parts)."""
        cfg = self.cfg
        if not cfg.grad_clip_parts or self._parts is None:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip), {}
        norms = {
            name: torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for name, params in self._parts.items()
        }
        total = torch.stack(list(norms.values())).square().sum().sqrt()
        return total, {name: round(float(n), 4) for name, n in norms.items()}

    def _all_agree(self, stop: bool) -> bool:
        """Under DDP, stop only together (any rank's clock may say so first)."""
        if self.world == 1:
            return stop
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _to(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def _tokens(signals: dict, config: ModelConfig) -> int:
    """Tokens in a batch's sequences (for throughput figures)."""
    if config.backbone in ("conv_generator", "unet"):  # pixels of the base grid, not tokens
        per_raster = config.image_size**2
    else:
        per_raster = (config.image_size // config.patch_size) ** 2
    n = 0
    for s in signals.values():
        n += int(s.present.sum()) * (per_raster if s.groups is not None else 1)
    b = next(iter(signals.values())).present.shape[0]
    return n + b * config.scene_tokens


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["TrainConfig", "Trainer", "read_metrics"]
