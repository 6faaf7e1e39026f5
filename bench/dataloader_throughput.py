"""Chips per second from a store through a PyTorch DataLoader, and peak memory.

    python bench/dataloader_throughput.py STORE [--batch 64] [--batches 40]

Measures every worker count in --workers, with and without augmentation (random 48 px crop
with flips), over all modalities of the store, and how throughput scales with the number
of chips read (the first N batches vs all).
"""

from __future__ import annotations

import argparse
import resource
import time

from torch.utils.data import DataLoader

from terrasynth.data.dataset import (
    ChipDataset,
    ChunkShuffleSampler,
    RandomCropFlip,
    collate_chips,
    max_group_factor,
)


def measure(store: str, workers: int, batch: int, batches: int, augment: bool) -> tuple:
    ds = ChipDataset(store)
    if augment:
        ds.transform = RandomCropFlip(48, ds.chip_size, max_group_factor(ds), seed=0)
    loader = DataLoader(
        ds,
        batch_size=batch,
        sampler=ChunkShuffleSampler(ds, seed=0),
        num_workers=workers,
        collate_fn=collate_chips,
        persistent_workers=False,
        drop_last=False,
    )
    n, t0, first = 0, time.perf_counter(), None
    epochs = 0
    while n < batch * batches:
        for b in loader:
            n += len(b["index"])
            if first is None:
                first = time.perf_counter() - t0
            if n >= batch * batches:
                break
        epochs += 1
    dt = time.perf_counter() - t0
    return n, dt, first, epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("store")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    args = ap.parse_args()
    ds = ChipDataset(args.store)
    keys = [k for k in ds[0] if "/" in k and not k.endswith(("valid", "bands", "labels"))]
    print(
        f"store {args.store}: {len(ds)} chips, modalities {', '.join(ds.modalities)}; "
        f"{len(keys)} raster arrays per chip"
    )
    print(
        f"{'workers':>7s} {'augment':>7s} {'chips':>6s} {'seconds':>8s} {'chips/s':>8s} "
        f"{'first batch s':>13s}"
    )
    for w in args.workers:
        for aug in (False, True):
            n, dt, first, _ = measure(args.store, w, args.batch, args.batches, aug)
            print(f"{w:7d} {str(aug):>7s} {n:6d} {dt:8.2f} {n / dt:8.0f} {first:13.2f}")
    print("scaling with chips read (workers=0, no augmentation):")
    for nb in (5, 20, args.batches * 2):
        n, dt, _, _ = measure(args.store, 0, args.batch, nb, False)
        print(f"  {n:6d} chips: {n / dt:8.0f} chips/s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the main process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
