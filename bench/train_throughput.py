"""Training throughput of each model preset: samples/s, tokens/s, s/step, memory, FLOPs.

    python bench/train_throughput.py STORE [--presets tiny small base] [--peak-tflops 989]

One training step is what ``Trainer.train`` does per micro-step: ``batch_signals``, the
objective's ``training_step`` (roles, noising, forward, loss) under bf16 autocast or not,
backward, gradient clipping and an AdamW step. Batches are drawn (random crop to the
preset's image size, flips) before the clock starts, so the figures are the model's, not
the DataLoader's (see ``bench/dataloader_throughput.py`` for that).

Each configuration runs in its own process, so its peak RSS is its own. Tokens are counted
as the trainer counts them (``trainer._tokens``: tokens of the modalities a sample holds,
plus the scene tokens). The model, though, runs every modality of the store in every
sequence (absent ones masked out of attention), so the sequence it computes is longer; the
FLOPs estimate uses that computed length: per token ``6 * params`` (forward + backward)
plus attention ``12 * depth * dim * seq``. It overstates the work: a token only passes
through its own modality's patch embedding and head, while ``params`` counts those of
every modality (the "blocks M" column is the transformer trunk alone). With CUDA, the
GPU's peak memory and the model FLOPs utilisation against ``--peak-tflops`` are printed too.

Defaults keep the whole run to about 5 minutes on 2 CPU cores: tiny at batch 16 with bf16
autocast on and off and at batch 8 / 16 / 32, small at batch 8, base at batch 1 with one
warm-up and two measured steps.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from dataclasses import dataclass

import torch

from terrasynth.data.dataset import ChipDataset, ChunkShuffleSampler, RandomCropFlip, collate_chips
from terrasynth.models.config import preset_config
from terrasynth.models.scene_model import SceneModel
from terrasynth.models.signals import batch_signals
from terrasynth.training.objective import ObjectiveConfig, training_step
from terrasynth.training.trainer import _tokens


@dataclass
class Case:
    preset: str
    batch: int
    bf16: bool
    warmup: int
    steps: int


def default_cases(presets: list[str], quick: bool) -> list[Case]:
    cases = []
    if "tiny" in presets:
        cases += [
            Case("tiny", 16, False, 3, 10),
            Case("tiny", 16, True, 3, 10),
            Case("tiny", 8, True, 3, 10),
            Case("tiny", 32, True, 2, 6),
        ]
    if "small" in presets:
        cases.append(Case("small", 8, True, 1, 3))
    if "base" in presets:
        cases.append(Case("base", 1, True, 1, 2))
    if quick:
        cases = [Case(c.preset, c.batch, c.bf16, 1, 1) for c in cases]
    return cases


def computed_sequence(model: SceneModel) -> int:
    """Tokens per sequence the model computes: every modality of the config, scene tokens."""
    cfg = model.config
    per_raster = (cfg.image_size // cfg.patch_size) ** 2
    return (
        per_raster * len(cfg.raster_modalities()) + len(cfg.vector_modalities()) + cfg.scene_tokens
    )


def run_case(store: str, case: Case, seed: int, peak_tflops: float) -> dict:
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = ChipDataset(store, split="train")
    reg = ds.registry
    mcfg = preset_config(case.preset, {m: reg[m].to_dict() for m in ds.modalities}, ds.store.stats)
    ds.transform = RandomCropFlip(mcfg.image_size, ds.chip_size, seed=seed)
    model = SceneModel(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.02, betas=(0.9, 0.99))
    objective = ObjectiveConfig()
    gen = torch.Generator().manual_seed(seed)
    order = list(ChunkShuffleSampler(ds, seed=seed))
    n_batches = case.warmup + case.steps
    batches = []
    for i in range(n_batches):
        idx = order[(i * case.batch) % len(order) :][: case.batch]
        batches.append(collate_chips([ds[j] for j in idx]))
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(batch: dict) -> int:
        batch = {
            k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }
        signals = batch_signals(batch, mcfg, ds.modalities)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16):
            loss, _ = training_step(model, signals, batch["gsd"], objective, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return _tokens(signals, mcfg)

    for b in batches[: case.warmup]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tokens, t0 = 0, time.perf_counter()
    for b in batches[case.warmup :]:
        tokens += step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    params = model.num_parameters()
    seq = computed_sequence(model)
    flops_per_token = 6 * params + 12 * mcfg.depth * mcfg.dim * seq
    flops = flops_per_token * seq * case.batch * case.steps
    trunk = sum(p.numel() for p in model.blocks.parameters())
    out = {
        "params_m": params / 1e6,
        "trunk_m": trunk / 1e6,
        "samples_s": case.batch * case.steps / dt,
        "tokens_s": tokens / dt,
        "useful": tokens / (seq * case.batch * case.steps),
        "s_step": dt / case.steps,
        "seq": seq,
        "tflops": flops / dt / 1e12,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(device),
    }
    if device.type == "cuda":
        out["gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["mfu"] = out["tflops"] / peak_tflops
    return out


def _child(store: str, case: Case, seed: int, peak: float, q: mp.Queue) -> None:
    try:
        q.put(run_case(store, case, seed, peak))
    except Exception as exc:  # report, don't hang the parent
        q.put({"error": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--presets", nargs="*", default=["tiny", "small", "base"])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 bf16 dense)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 1 step per case (smoke)")
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    head = (
        f"{'preset':>6s} {'batch':>5s} {'bf16':>5s} {'params M':>8s} {'blocks M':>8s} "
        f"{'samples/s':>9s} {'tokens/s':>9s} {'s/step':>7s} {'seq':>5s} {'useful':>6s} "
        f"{'TFLOP/s':>8s} {'RSS MiB':>8s}"
    )
    cuda = torch.cuda.is_available()
    if cuda:
        head += f" {'GPU MiB':>8s} {'MFU':>6s}"
    print(head)
    ctx = mp.get_context("spawn")
    results = []
    for case in default_cases(args.presets, args.quick):
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(args.store, case, args.seed, args.peak_tflops, q))
        p.start()
        r = q.get()
        p.join()
        if "error" in r:
            print(f"{case.preset:>6s} {case.batch:5d} {str(case.bf16):>5s} failed: {r['error']}")
            continue
        results.append((case, r))
        line = (
            f"{case.preset:>6s} {case.batch:5d} {str(case.bf16):>5s} {r['params_m']:8.2f} "
            f"{r['trunk_m']:8.2f} "
            f"{r['samples_s']:9.2f} {r['tokens_s']:9.0f} {r['s_step']:7.3f} {r['seq']:5d} "
            f"{r['useful']:6.1%} {r['tflops']:8.4f} {r['rss_mib']:8.0f}"
        )
        if cuda:
            line += f" {r['gpu_mib']:8.0f} {r['mfu']:6.1%}"
        print(line, flush=True)
    tiny = [(c, r) for c, r in results if c.preset == "tiny" and c.bf16]
    if len(tiny) > 1:
        print("tiny, bf16: throughput vs batch size")
        base = min(tiny, key=lambda cr: cr[0].batch)
        for c, r in sorted(tiny, key=lambda cr: cr[0].batch):
            print(
                f"  batch {c.batch:3d}: {r['samples_s']:7.2f} samples/s "
                f"(x{r['samples_s'] / base[1]['samples_s']:.2f} of batch {base[0].batch})"
            )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(
        "seq: tokens per sequence the model computes (every modality of the store); useful: "
        "share of them that belong to modalities the samples hold (the trainer's token count)"
    )


if __name__ == "__main__":
    main()
