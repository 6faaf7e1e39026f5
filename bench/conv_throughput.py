"""Training throughput and sampling latency of the convolutional generator, CPU or GPU.

    python bench/conv_throughput.py layout STORE OUT.json     # modality table + presence
    python bench/conv_throughput.py run OUT.json [--presets tiny small base] [--device cuda]

``layout`` reads a store's model config (modalities, statistics) and the presence pattern
of every training chip (which modalities it holds) into one small JSON file, so ``run``
needs no store, no GDAL and no zarr: it runs wherever torch does (a GPU machine with
nothing else installed). The figures are the model's: batches hold standard-normal values
(class maps: random classes) with the presence pattern of real chips drawn in turn, and a
retrieval index of the training split's size with random summaries; a convolution costs
the same whatever the values. One training step is the trainer's: ``batch_signals``, the
score objective (roles, ensemble of ``config.ensemble`` members, proper scores), backward,
clipping, AdamW, under bf16 autocast.

Printed per preset and batch: samples/s, s/step, peak memory (GPU: allocated by torch;
CPU: the process's peak RSS so far), and the latency of one ``S1 -> S2 L2A`` sample on a
224 x 224 window (batch 1 and 8, one-step sampler), how it grows with the window side.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch

from terrasynth.models.config import CONV_PRESETS, ModelConfig
from terrasynth.models.conv_generator import ConvGenerator
from terrasynth.models.retrieval import RetrievalIndex, summary_size
from terrasynth.models.scene_model import ModalityInput
from terrasynth.models.signals import batch_signals, location_vector
from terrasynth.training.score_objective import ScoreObjective


def layout(store: str, out: str) -> None:
    from terrasynth.data.dataset import ChipDataset

    ds = ChipDataset(store, split="train")
    reg = ds.registry
    mods = {m: reg[m].to_dict() for m in ds.modalities}
    has = ds._has[ds.indices]
    presence = [[m for j, m in enumerate(ds.modalities) if row[j]] for row in has]
    Path(out).write_text(
        json.dumps({"modalities": mods, "stats": ds.store.stats, "presence": presence})
    )
    print(f"{out}: {len(mods)} modalities, {len(presence)} training chips")


def _batch(cfg: ModelConfig, presence: list[list[str]], start: int, b: int, g) -> dict:
    """A collated batch like the dataset's, random values, real presence pattern."""
    s = cfg.image_size
    names = [m.name for m in cfg.raster_modalities()]
    rows = [presence[(start + i) % len(presence)] for i in range(b)]
    batch: dict = {
        "available": torch.tensor([[n in r for n in names] for r in rows], dtype=torch.bool),
        "location": torch.stack(
            [torch.rand(b, generator=g) * 120 - 60, torch.rand(b) * 360 - 180], 1
        ),
        "time": torch.rand(b, 1, generator=g) * 20000,
        "gsd": torch.full((b,), 10.0),
    }
    for mod in cfg.raster_modalities():
        batch[f"{mod.name}/bands"] = torch.ones(b, sum(len(gr.bands) for gr in mod.groups))
        for gr in mod.groups:
            h = s // gr.factor
            if mod.kind == "categorical":
                x = torch.randint(0, mod.num_classes, (b, h, h), generator=g)
            else:
                x = torch.randn(b, len(gr.bands), h, h, generator=g)
            batch[f"{mod.name}/{gr.name}"] = x
            batch[f"{mod.name}/{gr.name}/valid"] = torch.ones(b, h, h, dtype=torch.bool)
    return batch


def _index(cfg: ModelConfig, presence: list[list[str]], g) -> RetrievalIndex:
    n = len(presence)
    rows = {}
    for mod in cfg.raster_modalities():
        r = torch.randn(n, summary_size(mod), generator=g)
        lacks = torch.tensor([mod.name not in p for p in presence])
        rows[mod.name] = r.masked_fill(lacks[:, None], math.nan)
    lat, lon = torch.rand(n, generator=g) * 120 - 60, torch.rand(n, generator=g) * 360 - 180
    return RetrievalIndex(rows, location_vector(lat, lon))


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_case(base: ModelConfig, presence, preset: str, b: int, device, steps: int) -> dict:
    cfg = ModelConfig.from_dict({**base.to_dict(), **CONV_PRESETS[preset], "preset": preset})
    g = torch.Generator().manual_seed(0)
    model = ConvGenerator(cfg)
    if cfg.retrieval_k > 0:
        model.set_retrieval(_index(cfg, presence, g))
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.02)
    objective = ScoreObjective()
    names = [m.name for m in cfg.raster_modalities()]
    batches = [_batch(cfg, presence, i * b, b, g) for i in range(3 + steps)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(batch: dict) -> None:
        batch = {k: v.to(device) for k, v in batch.items()}
        signals = batch_signals(batch, cfg, names)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = objective(model, signals, batch["gsd"], g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for batch in batches[:3]:
        step(batch)
    _sync(device)
    t0 = time.perf_counter()
    for batch in batches[3:]:
        step(batch)
    _sync(device)
    dt = time.perf_counter() - t0
    return {
        "preset": preset,
        "batch": b,
        "params_m": model.num_parameters() / 1e6,
        "samples_s": b * steps / dt,
        "s_step": dt / steps,
        "peak_mib": _peak_mib(device),
    }


def latency_case(base: ModelConfig, presence, side: int, b: int, device, repeats: int) -> dict:
    """Seconds per S1 -> S2 L2A sample on a ``side`` x ``side`` window."""
    cfg = ModelConfig.from_dict({**base.to_dict(), **CONV_PRESETS["tiny"], "preset": "tiny"})
    g = torch.Generator().manual_seed(0)
    model = ConvGenerator(cfg)
    if cfg.retrieval_k > 0:
        model.set_retrieval(_index(cfg, presence, g))
    model = model.to(device).eval()
    reg = cfg.registry
    inputs = {}
    for name, generated in (("s1grd", False), ("s2l2a", True)):
        groups = {}
        for gr in reg[name].groups:
            h = side // gr.factor
            x = torch.randn(b, len(gr.bands), h, h, generator=g)
            z = torch.zeros_like(x)
            three = [x, z, z] if generated else [x, x, torch.ones_like(x)]
            groups[gr.name] = torch.cat(three, 1).to(device)
        t = torch.full((b,), 1.0 if generated else 0.0, device=device)
        inputs[name] = ModalityInput(
            t, torch.ones(b, dtype=torch.bool, device=device), groups=groups
        )
    gsd = torch.full((b,), 10.0, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        model(inputs, gsd)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(inputs, gsd)
        _sync(device)
    dt = (time.perf_counter() - t0) / repeats
    return {"side": side, "batch": b, "s_per_sample": dt / b}


def run(path: str, presets: list[str], device_name: str, steps: int) -> None:
    device = torch.device(device_name)
    data = json.loads(Path(path).read_text())
    base = ModelConfig(
        backbone="conv_generator", modalities=data["modalities"], stats=data["stats"]
    )
    presence = data["presence"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("\ntraining (bf16 autocast, ensemble of config.ensemble members):")
    print("| preset | batch | params M | samples/s | s/step | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    batches = {"tiny": [24, 96, 384], "small": [24, 96], "base": [8, 32]}
    if device.type == "cpu":
        batches = {"tiny": [24], "small": [8], "base": [2]}
    for preset in presets:
        for b in batches[preset]:
            r = train_case(base, presence, preset, b, device, steps)
            print(
                f"| {r['preset']} | {r['batch']} | {r['params_m']:.2f} | {r['samples_s']:.1f} "
                f"| {r['s_step']:.3f} | {r['peak_mib']:.0f} |"
            )
    print("\nsampling S1 -> S2 L2A, one-step, tiny preset (bf16 autocast):")
    print("| window side | batch | s per sample |")
    print("|---:|---:|---:|")
    for side, b in ((224, 1), (224, 8), (448, 1), (896, 1)):
        r = latency_case(base, presence, side, b, device, repeats=5 if device.type == "cuda" else 2)
        print(f"| {r['side']} | {r['batch']} | {r['s_per_sample']:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("layout")
    a.add_argument("store")
    a.add_argument("out")
    r = sub.add_parser("run")
    r.add_argument("layout")
    r.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if args.cmd == "layout":
        layout(args.store, args.out)
    else:
        run(args.layout, args.presets, args.device, args.steps)


if __name__ == "__main__":
    main()
