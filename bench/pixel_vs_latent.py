"""Pixel-space patch tokens vs learned per-modality latents, at equal CPU budget.

    python bench/pixel_vs_latent.py STORE [--budget 480] [--ae-share 0.3] [--eval-chips 48]

Two arms get the same budget B of training, counted in CPU seconds of this process (all
its threads; data loading included: the DataLoader runs in-process), so that other work on
the machine does not tilt the comparison (480 CPU s is about 240 s of wall time on 2 idle
cores; ``--clock wall`` counts wall-clock seconds instead). They get the same
batches (same seed), the same transformer (``SceneModel``, tiny preset sizes, depth
``--depth``) and the same objective (``terrasynth.training.objective.training_step``), and
are scored the same way.

pixel
    The model as it is: every band group of every raster modality is patchified at its own
    resolution, straight from pixels. Trained for B seconds.

latent
    First, for ``--ae-share`` of B, one small convolutional autoencoder per band group
    (input: the group's values and its known-mask; ``--latent-ch`` channels on a common
    grid 4x coarser than the training crop, so a 10 m group is downsampled 4x, a 20 m group
    2x and a 60 m group not at all; continuous: masked MSE, categorical: one-hot in,
    cross-entropy out). Then, frozen, they encode every group into latents (standardised
    per channel) and the same ``SceneModel`` is trained on them for the rest of B: its
    config is a "latent modality" table (every group ``--latent-ch`` continuous channels at
    factor 1, image and patch size divided by 4, so each modality has exactly as many tokens
    as in the pixel arm, and the GSD given to the model is 4x, so token positions in metres
    are the same). Predictions are decoded with the autoencoders' decoders.

Score: on the val split (the test split for a modality val lacks), each raster modality is
predicted from all the others (plus location and time) with one model call at t = 1 (the
one-step x0 prediction), on the chips that hold it and at least one other raster or label
modality (``--eval-chips`` of them, evenly spread, cut into non-overlapping training-size
tiles). Continuous: MAE in physical units (store statistics undone); categorical: pixel
accuracy. For reference: the training-mean / majority baseline and the latent arm's
floor, the autoencoder's own reconstruction error.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from terrasynth.data.dataset import ChipDataset, RandomCropFlip, collate_chips
from terrasynth.evaluation.translate import _denorm, tiles
from terrasynth.models.config import PRESETS, ModelConfig
from terrasynth.models.scene_model import SceneModel
from terrasynth.models.signals import Signal, batch_signals
from terrasynth.sampling.conditional import generate
from terrasynth.sampling.flow import FlowSampler
from terrasynth.training.objective import ObjectiveConfig, training_step
from terrasynth.training.trainer import ResumableBatches

DOWN = 4  # latent grid: 4x coarser than the training crop's base grid
CLOCK = [time.process_time]  # what budgets count (set by --clock)


# -- autoencoders --------------------------------------------------------------------------
class GroupAE(nn.Module):
    """Conv autoencoder of one band group: (B, 2C, h, w) -> (B, L, h/d, w/d) -> (B, C, h, w)."""

    def __init__(self, channels: int, down: int, latent: int, width: int = 32) -> None:
        super().__init__()
        n = int(math.log2(down))
        enc: list[nn.Module] = [nn.Conv2d(2 * channels, width, 3, padding=1), nn.GELU()]
        for _ in range(n):
            enc += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GELU()]
        enc += [nn.Conv2d(width, latent, 3, padding=1)]
        dec: list[nn.Module] = [nn.Conv2d(latent, width, 3, padding=1), nn.GELU()]
        for _ in range(n):
            dec += [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.GELU()]
        dec += [nn.Conv2d(width, channels, 3, padding=1)]
        self.enc, self.dec = nn.Sequential(*enc), nn.Sequential(*dec)
        self.down = down
        self.register_buffer("mu", torch.zeros(latent))
        self.register_buffer("sd", torch.ones(latent))

    def encode(self, x0: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Raw latents of the signal ``x0`` (zeros where unknown) and its known-mask."""
        return self.enc(torch.cat([x0 * known, known], 1))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mu[:, None, None]) / self.sd[:, None, None]

    def decode(self, z_norm: torch.Tensor) -> torch.Tensor:
        return self.dec(z_norm * self.sd[:, None, None] + self.mu[:, None, None])


def build_aes(cfg: ModelConfig, latent: int) -> nn.ModuleDict:
    aes = nn.ModuleDict()
    for mod in cfg.raster_modalities():
        for g in mod.groups:
            ch = mod.num_classes if mod.kind == "categorical" else len(g.bands)
            aes[_key(mod.name, g.name)] = GroupAE(ch, DOWN // g.factor, latent)
    return aes


def ae_loss(aes: nn.ModuleDict, signals: dict[str, Signal]) -> torch.Tensor | None:
    """Mean reconstruction loss over the groups the batch holds (masked MSE or CE)."""
    losses = []
    for name, s in signals.items():
        if s.groups is None or not bool(s.present.any()):
            continue
        p = s.present
        for g, x0 in s.groups.items():
            ae = aes[_key(name, g)]
            known = s.known[g][p]
            if float(known.sum()) == 0:
                continue
            rec = ae.dec(ae.encode(x0[p], known))
            if s.target is not None:
                losses.append(F.cross_entropy(rec, s.target[g][p], ignore_index=-1))
            else:
                losses.append((((rec - x0[p]) ** 2) * known).sum() / known.sum())
    return torch.stack(losses).mean() if losses else None


@torch.no_grad()
def latent_signals(aes: nn.ModuleDict, signals: dict[str, Signal]) -> dict[str, Signal]:
    """Pixel signals -> latent signals (vector modalities pass through)."""
    out = {}
    for name, s in signals.items():
        if s.groups is None:
            out[name] = s
            continue
        p = s.present
        groups, known = {}, {}
        for g, x0 in s.groups.items():
            ae = aes[_key(name, g)]
            b, _, h, w = x0.shape
            z = torch.zeros(b, ae.mu.numel(), h // ae.down, w // ae.down)
            if bool(p.any()):
                z[p] = ae.normalise(ae.encode(x0[p], s.known[g][p]))
            groups[g] = z
            known[g] = p[:, None, None, None].expand_as(z).float()
        out[name] = Signal(p, groups=groups, known=known)
    return out


@torch.no_grad()
def latent_statistics(
    aes: nn.ModuleDict, ds: ChipDataset, cfg: ModelConfig, chips: int, seed: int
) -> None:
    """Per-channel mean and std of each group's latents, from ``chips`` training chips per
    modality that hold it (so each latent modality enters the flow at about unit scale)."""
    gen = np.random.default_rng(seed)
    for mod in cfg.raster_modalities():
        rows = np.flatnonzero(ds.store.available(mod.name)[ds.indices])
        if not len(rows):
            continue
        rows = gen.choice(rows, min(chips, len(rows)), replace=False)
        batch = collate_chips([ds[int(i)] for i in rows])
        s = batch_signals(batch, cfg, ds.modalities)[mod.name]
        for g, x0 in s.groups.items():
            ae = aes[_key(mod.name, g)]
            z = ae.encode(x0[s.present], s.known[g][s.present]).transpose(0, 1).flatten(1)
            ae.mu.copy_(z.mean(1))
            ae.sd.copy_(z.std(1).clamp_min(1e-3))


def latent_config(cfg: ModelConfig, latent: int) -> ModelConfig:
    """The model config over latent modalities: every group ``latent`` channels, factor 1."""
    reg = cfg.registry
    mods = {}
    for name in cfg.modalities:
        mod = reg[name]
        if not mod.is_raster:
            mods[name] = mod.to_dict()
            continue
        gsd = min(g.gsd for g in mod.groups) * DOWN
        mods[name] = {
            "description": f"latents of {name}",
            "kind": "continuous",
            "units": "latent",
            "groups": [
                {"name": g.name, "gsd": gsd, "bands": [f"{g.name}_z{i}" for i in range(latent)]}
                for g in mod.groups
            ],
            "value_range": [-1e3, 1e3],
        }
    return ModelConfig(
        modalities=mods,
        stats=cfg.stats,
        image_size=cfg.image_size // DOWN,
        patch_size=cfg.patch_size // DOWN,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        scene_tokens=cfg.scene_tokens,
        use_location=cfg.use_location,
        use_time=cfg.use_time,
        preset="latent",
    )


def _key(mod: str, group: str) -> str:
    return f"{mod}__{group}".replace(".", "_")


# -- training ------------------------------------------------------------------------------
@dataclass
class Log:
    steps: int = 0
    seconds: float = 0.0
    wall: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def s_step(self) -> float:
        return self.seconds / max(self.steps, 1)

    @property
    def last_loss(self) -> float:
        tail = self.losses[-20:]
        return sum(tail) / max(len(tail), 1)


def lr_factor(step: int, elapsed: float, budget: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay over the time budget (to 5%)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))


def train_loop(
    params: list[torch.Tensor],
    batches,
    loss_fn,
    budget: float,
    lr: float,
    clip: float = 1.0,
) -> Log:
    """AdamW on ``loss_fn(batch)`` until ``budget`` seconds of ``CLOCK`` have passed (data
    included). ``Log.seconds``: that clock; ``Log.wall``: wall-clock seconds."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.02, betas=(0.9, 0.99))
    log = Log()
    t0, w0 = CLOCK[0](), time.perf_counter()
    while (elapsed := CLOCK[0]() - t0) < budget:
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(log.steps, elapsed, budget)
        loss = loss_fn(next(batches))
        if loss is None:
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        log.steps += 1
        log.losses.append(float(loss.detach()))
    log.seconds = CLOCK[0]() - t0
    log.wall = time.perf_counter() - w0
    return log


def batch_stream(ds: ChipDataset, batch: int, seed: int):
    loader = DataLoader(
        ds, batch_sampler=ResumableBatches(ds, batch, seed), collate_fn=collate_chips
    )
    return iter(loader)


# -- evaluation ----------------------------------------------------------------------------
@dataclass
class Score:
    modality: str
    split: str
    chips: int
    metric: str
    units: str
    pixel: float
    latent: float
    ae: float
    baseline: float


@torch.no_grad()
def evaluate(
    store: str,
    cfg: ModelConfig,
    pixel: SceneModel,
    latent: SceneModel,
    aes: nn.ModuleDict,
    eval_chips: int,
    batch: int,
    seed: int,
) -> list[Score]:
    pixel.eval()
    latent.eval()
    aes.eval()
    reg, stats = cfg.registry, cfg.stats
    sampler = FlowSampler(steps=1)
    scores = []
    splits = {s: ChipDataset(store, split=s) for s in ("val", "test")}
    order = splits["val"].modalities
    others = [m for m in order if m in cfg.modalities and reg[m].kind != "scalar"]
    for mod in cfg.raster_modalities():
        target = mod.name
        partners = [order.index(m) for m in others if m != target]
        split, pick = "test", np.array([], dtype=int)
        for name in ("val", "test"):
            ds = splits[name]
            has = np.stack([ds.store.available(m)[ds.indices] for m in order], 1)
            split = name
            pick = np.flatnonzero(has[:, order.index(target)] & has[:, partners].any(1))
            if len(pick):
                break
        if not len(pick):
            continue
        if len(pick) > eval_chips:
            pick = pick[np.unique(np.linspace(0, len(pick) - 1, eval_chips).astype(int))]
        loader = DataLoader(Subset(ds, pick.tolist()), batch_size=batch, collate_fn=collate_chips)
        sums = dict(pixel=0.0, latent=0.0, ae=0.0, baseline=0.0)
        n = 0.0
        gen_p = torch.Generator().manual_seed(seed)
        gen_l = torch.Generator().manual_seed(seed)
        for chips in loader:
            for tile in tiles(chips, cfg.image_size, ds.chip_size):
                sig = batch_signals(tile, cfg, order)
                conds = [m for m in sig if m != target]
                gsd = tile["gsd"]
                out_p = generate(pixel, sig, [target], conds, gsd, sampler, gen_p)[target]
                lsig = latent_signals(aes, sig)
                out_l = generate(latent, lsig, [target], conds, gsd * DOWN, sampler, gen_l)
                s = sig[target]
                p = s.present
                for g in mod.groups:
                    ae = aes[_key(target, g.name)]
                    z_true = lsig[target].groups[g.name]
                    dec_l = ae.decode(out_l[target].groups[g.name])
                    dec_ae = ae.decode(z_true)
                    if mod.kind == "categorical":
                        tgt = s.target[g.name]
                        ok = (tgt >= 0) & p[:, None, None]
                        majority = int(np.asarray(stats[target]["class_counts"]).argmax())
                        pred_p = out_p.probs[g.name].argmax(1)
                        sums["pixel"] += float((pred_p == tgt)[ok].sum())
                        sums["latent"] += float((dec_l.argmax(1) == tgt)[ok].sum())
                        sums["ae"] += float((dec_ae.argmax(1) == tgt)[ok].sum())
                        sums["baseline"] += float((tgt == majority)[ok].sum())
                        n += float(ok.sum())
                    else:
                        known = s.known[g.name] > 0

                        def phys(x, g=g, st=stats[target], tr=mod.transform):
                            return _denorm(x, st, g.bands, tr)

                        true = phys(s.groups[g.name])
                        for arm, pred in (
                            ("pixel", out_p.groups[g.name]),
                            ("latent", dec_l),
                            ("ae", dec_ae),
                            ("baseline", torch.zeros_like(true)),
                        ):
                            sums[arm] += float((phys(pred) - true).abs()[known].sum())
                        n += float(known.sum())
        if n == 0:
            continue
        metric = "accuracy" if mod.kind == "categorical" else "MAE"
        scores.append(
            Score(
                target, split, len(pick), metric, mod.units, **{k: v / n for k, v in sums.items()}
            )
        )
    return scores


# -- main ----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds of training per arm")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="what --budget counts")
    ap.add_argument("--ae-share", type=float, default=0.3, help="latent arm: share for the AEs")
    ap.add_argument("--latent-ch", type=int, default=8)
    ap.add_argument("--depth", type=int, default=PRESETS["tiny"]["depth"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast for the SceneModel (as the trainer); the AEs run in float32",
    )
    ap.add_argument("--stats-chips", type=int, default=32, help="per modality, latent stats")
    ap.add_argument("--eval-chips", type=int, default=48, help="per modality")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t_all = time.perf_counter()
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    ds = ChipDataset(args.store, split="train")
    reg = ds.registry
    order = ds.modalities
    sizes = {**PRESETS["tiny"], "depth": args.depth}
    cfg = ModelConfig(
        modalities={m: reg[m].to_dict() for m in order},
        stats=ds.store.stats,
        preset="tiny",
        **sizes,
    )
    cfg.validate()
    lcfg = latent_config(cfg, args.latent_ch)
    lcfg.validate()
    ds.transform = RandomCropFlip(cfg.image_size, ds.chip_size, seed=args.seed)
    objective = ObjectiveConfig()
    amp = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.bf16)
    print(
        f"store {args.store}: {len(ds)} training chips, {len(cfg.raster_modalities())} raster "
        f"modalities; budget {args.budget:.0f} {args.clock} s per arm, batch {args.batch}, depth "
        f"{args.depth}, bf16 {args.bf16}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )

    # pixel arm
    torch.manual_seed(args.seed)
    pixel = SceneModel(cfg)
    gen = torch.Generator().manual_seed(args.seed)

    def pixel_loss(batch):
        sig = batch_signals(batch, cfg, order)
        with torch.autocast(**amp):
            loss, _ = training_step(pixel, sig, batch["gsd"], objective, gen)
        return loss

    pixel.train()
    log_p = train_loop(
        list(pixel.parameters()),
        batch_stream(ds, args.batch, args.seed),
        pixel_loss,
        args.budget,
        args.lr,
    )
    print(
        f"pixel : {log_p.steps} steps in {log_p.seconds:.0f} {args.clock} s ({log_p.wall:.0f} wall "
        f"s), {log_p.s_step:.3f} {args.clock} s/step, "
        f"loss (last 20) {log_p.last_loss:.4f}, {pixel.num_parameters() / 1e6:.2f} M params, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    # latent arm: autoencoders, latent statistics, then the model
    torch.manual_seed(args.seed)
    aes = build_aes(cfg, args.latent_ch)
    stream = batch_stream(ds, args.batch, args.seed)
    t_latent = CLOCK[0]()
    ae_budget = args.ae_share * args.budget
    aes.train()
    log_ae = train_loop(
        list(aes.parameters()),
        stream,
        lambda b: ae_loss(aes, batch_signals(b, cfg, order)),
        ae_budget,
        2e-3,
    )
    aes.eval()
    latent_statistics(aes, ds, cfg, args.stats_chips, args.seed)
    for p in aes.parameters():
        p.requires_grad_(False)
    ae_seconds = CLOCK[0]() - t_latent
    ae_params = sum(p.numel() for p in aes.parameters())
    print(
        f"AEs   : {log_ae.steps} steps in {log_ae.seconds:.0f} {args.clock} s ({log_ae.wall:.0f} "
        f"wall s), {log_ae.s_step:.3f} {args.clock} s/step, "
        f"loss (last 20) {log_ae.last_loss:.4f}, {ae_params / 1e6:.2f} M params, "
        f"{len(aes)} group AEs",
        flush=True,
    )

    torch.manual_seed(args.seed)
    latent = SceneModel(lcfg)
    gen_l = torch.Generator().manual_seed(args.seed)

    def latent_loss(batch):
        sig = latent_signals(aes, batch_signals(batch, cfg, order))
        with torch.autocast(**amp):
            loss, _ = training_step(latent, sig, batch["gsd"] * DOWN, objective, gen_l)
        return loss

    latent.train()
    log_l = train_loop(
        list(latent.parameters()),
        stream,
        latent_loss,
        args.budget - ae_seconds,
        args.lr,
    )
    print(
        f"latent: {log_l.steps} steps in {log_l.seconds:.0f} {args.clock} s ({log_l.wall:.0f} wall "
        f"s), {log_l.s_step:.3f} {args.clock} s/step, "
        f"loss (last 20, latent space) {log_l.last_loss:.4f}, "
        f"{latent.num_parameters() / 1e6:.2f} M params; arm total "
        f"{CLOCK[0]() - t_latent:.0f} {args.clock} s, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    t_eval = time.perf_counter()
    scores = evaluate(
        args.store, cfg, pixel, latent, aes, args.eval_chips, args.batch, args.seed + 1
    )
    print(f"evaluation: {time.perf_counter() - t_eval:.0f} s")
    print(
        "\none-step x0 prediction of each modality from all the others "
        "(MAE: lower is better, physical units; accuracy: higher is better)\n"
    )
    print(
        "| modality | split | chips | metric | units | pixel | latent | AE recon (floor) "
        "| mean/majority | winner |"
    )
    print("|---|---|---:|---|---|---:|---:|---:|---:|:---:|")
    wins = {"pixel": 0, "latent": 0}
    for s in scores:
        lower = s.metric == "MAE"
        better_pixel = s.pixel < s.latent if lower else s.pixel > s.latent
        winner = "pixel" if better_pixel else "latent"
        wins[winner] += 1
        print(
            f"| {s.modality} | {s.split} | {s.chips} | {s.metric} | {s.units} | "
            f"{s.pixel:.4g} | {s.latent:.4g} | {s.ae:.4g} | {s.baseline:.4g} | {winner} |"
        )
    cont = [s for s in scores if s.metric == "MAE"]
    cat = [s for s in scores if s.metric == "accuracy"]
    for arm in ("pixel", "latent", "ae"):
        ratios = [getattr(s, arm) / s.baseline for s in cont if s.baseline > 0]
        geo = math.exp(sum(math.log(max(r, 1e-9)) for r in ratios) / max(len(ratios), 1))
        beat = sum(r < 1 for r in ratios)
        acc = sum(getattr(s, arm) - s.baseline for s in cat) / max(len(cat), 1)
        print(
            f"{arm:6s}: MAE / training-mean MAE, geometric mean over {len(ratios)} continuous "
            f"modalities {geo:.3f} (below 1 on {beat}); accuracy - majority accuracy, mean over "
            f"{len(cat)} maps {acc:+.3f}"
        )
    print(
        f"\nwins: pixel {wins['pixel']}, latent {wins['latent']}; {args.clock} s/step: pixel "
        f"{log_p.s_step:.3f}, latent model {log_l.s_step:.3f}, AE {log_ae.s_step:.3f}; "
        f"total {time.perf_counter() - t_all:.0f} s; load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
