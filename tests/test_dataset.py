"""The store as a PyTorch dataset: normalisation, geometry-respecting augmentation, batching."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from terrasynth.data.dataset import (
    ChipDataset,
    ChunkShuffleSampler,
    RandomCropFlip,
    _augmented_affine,
    chip_groups,
    collate_chips,
)

pytestmark = pytest.mark.needs_data


@pytest.fixture(scope="module")
def ds(small_store):
    return ChipDataset(small_store)


def test_sample_keys_and_shapes(ds):
    s = ds[0]
    assert s["available"].shape == (len(ds.modalities),)
    assert s["s2l2a/r10m"].shape == (4, 64, 64)
    assert s["s2l2a/r60m"].shape == (2, 16, 16)
    assert s["landcover_nlcd/r30m"].dtype == torch.int64
    assert s["corine/labels"].shape == (44,)
    assert s["transform"].dtype == torch.float64


def test_normalised_values_are_standardised(ds):
    mi = ds.modalities.index("landsat8")
    xs = [ds[i]["landsat8/r30m"] for i in range(len(ds)) if ds[i]["available"][mi]][:80]
    x = torch.stack(xs)
    assert abs(float(x.mean())) < 0.6
    assert 0.4 < float(x.std()) < 2.0


def test_categorical_invalid_is_minus_one(ds):
    mi = ds.modalities.index("landcover_nlcd")
    s = next(ds[i] for i in range(len(ds)) if not ds[i]["available"][mi])
    assert (s["landcover_nlcd/r30m"] == -1).all()


def test_split_subset(small_store):
    train = ChipDataset(small_store, split="train")
    test = ChipDataset(small_store, split="test")
    assert len(train) > len(test) > 0
    assert not set(train.indices) & set(test.indices)


def test_crop_flip_keeps_groups_registered(ds):
    """Crop/flip/rotate moves 10 m and 60 m S2 groups together; affine follows the pixels."""
    i = next(i for i in range(len(ds)) if ds[i]["available"][ds.modalities.index("s2l2a")])
    s = ds[i]
    aug = RandomCropFlip(48, 64, max_factor=4, seed=1)
    for _ in range(6):
        out = aug(s)
        assert out["s2l2a/r10m"].shape == (4, 48, 48)
        assert out["s2l2a/r60m"].shape == (2, 12, 12)
        # block-averaging the 10 m group to 60 m grid stays aligned with the 60 m group's
        # footprint: the coarse valid mask of r10m equals a pooled r10m mask
        v10 = out["s2l2a/r10m/valid"].float()
        pooled = torch.nn.functional.avg_pool2d(v10[None, None], 4)[0, 0]
        assert pooled.shape == out["s2l2a/r60m/valid"].shape


def test_augmented_affine_maps_pixels_to_the_same_ground():
    t = torch.tensor([10.0, 0, 1000.0, 0, -10.0, 5000.0], dtype=torch.float64)
    img = np.arange(64 * 64).reshape(64, 64)
    for flip in (False, True):
        for k in range(4):
            crop = img[8:56, 4:52]
            y = np.flip(crop, axis=-1) if flip else crop
            y = np.rot90(y, k)
            a = _augmented_affine(t, 8, 4, 48, flip, k).numpy()
            for r, c in ((0, 0), (5, 17), (47, 3)):
                # ground coordinate of output pixel centre
                gx = a[0] * (c + 0.5) + a[1] * (r + 0.5) + a[2]
                gy = a[3] * (c + 0.5) + a[4] * (r + 0.5) + a[5]
                src_c = int((gx - 1000.0) / 10.0)
                src_r = int((gy - 5000.0) / -10.0)
                assert img[src_r, src_c] == y[r, c]


def test_dataloader_with_workers_keeps_availability(small_store):
    ds = ChipDataset(small_store, transform=RandomCropFlip(48, 64, seed=0))
    loader = DataLoader(
        ds,
        batch_size=16,
        sampler=ChunkShuffleSampler(ds, seed=0),
        num_workers=2,
        collate_fn=collate_chips,
    )
    batch = next(iter(loader))
    assert batch["available"].dtype == torch.bool
    assert batch["available"].shape == (16, len(ds.modalities))
    assert batch["s2l2a/r10m"].shape == (16, 4, 48, 48)
    assert batch["s2l2a/bands"].shape == (16, 12)


def _worker_transforms(small_store) -> tuple[list, list]:
    """One chip 8 times through two loader workers: (worker 0's, worker 1's) crop affines."""
    ds = ChipDataset(small_store, transform=RandomCropFlip(16, 64, seed=0))
    loader = DataLoader(
        ds,
        batch_size=1,
        sampler=[0] * 8,
        num_workers=2,
        collate_fn=collate_chips,
        generator=torch.Generator().manual_seed(0),
    )
    seen = [b["transform"][0].tolist() for b in loader]
    return seen[0::2], seen[1::2]  # batches go to the workers in turn


def test_loader_workers_draw_their_own_crops(small_store):
    first, second = _worker_transforms(small_store)
    assert first != second  # the two workers do not repeat each other's crops
    assert _worker_transforms(small_store) == (first, second)  # and are seeded


def test_reseed_makes_a_chips_augmentation_depend_on_the_key_only(slope_store):
    """Relief scaling and crops after ``reseed(key)`` do not depend on earlier draws."""
    ds = ChipDataset(
        slope_store, transform=RandomCropFlip(16, 64, seed=0), derive=True, relief_scale=1.0
    )
    assert ds.relief_scale == 1.0

    def sample(key: tuple[int, ...], before: int) -> dict:
        for i in range(before):  # draws in between
            ds[i]
        ds.reseed(key)
        return ds[5]

    a, b = sample((0, 0, 3, 7), 0), sample((0, 0, 3, 7), 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = sample((0, 0, 3, 8), 0)
    assert not torch.equal(a["transform"], c["transform"])
    assert not torch.equal(a["slope/r30m"], c["slope/r30m"])


def test_chunk_sampler_is_a_permutation(ds):
    order = list(ChunkShuffleSampler(ds, seed=3))
    assert sorted(order) == list(range(len(ds)))
    assert order != list(range(len(ds)))


def test_chunk_sampler_balances_sources(ds):
    sources = ds.store.table["source"].to_numpy()[ds.indices]
    names, counts = np.unique(sources, return_counts=True)
    assert counts.max() > 3 * counts.min()  # the store is unbalanced to begin with
    seen = np.zeros(len(names))
    for epoch in range(4):
        sampler = ChunkShuffleSampler(ds, seed=1, balance=0.0)
        sampler.set_epoch(epoch)
        seen += np.unique(sources[list(sampler)], return_counts=True)[1]
    share = seen / seen.sum()
    assert np.allclose(share, 1 / len(names), atol=0.05)  # every source about equally often
    natural = ChunkShuffleSampler(ds, seed=1, balance=1.0)
    assert sorted(natural) == list(range(len(ds)))


def test_chunk_sampler_balances_kinds_inside_a_source(ds):
    kinds = chip_groups(ds, "kind")
    sources = chip_groups(ds, "source")
    assert all(k.split("|")[0] == s for k, s in zip(kinds, sources, strict=True))
    names, counts = np.unique(kinds, return_counts=True)
    assert len(names) > len(np.unique(sources))  # some source holds chips of several kinds
    seen = np.zeros(len(names))
    for epoch in range(4):
        sampler = ChunkShuffleSampler(ds, seed=2, balance=0.0, balance_by="kind")
        sampler.set_epoch(epoch)
        order = list(sampler)
        seen += np.array([(kinds[order] == n).sum() for n in names])
    share = seen / seen.sum()
    assert np.allclose(share, 1 / len(names), atol=0.05)  # every kind about equally often
    with pytest.raises(ValueError, match="balance_by"):
        ChunkShuffleSampler(ds, balance_by="modality")
