"""A chip store as a PyTorch dataset, a chunk-aware sampler, geometric augmentation, collate.

A sample is a flat dict of tensors whose shapes are the same for every chip of a store (an
absent modality is zeros with its availability flag False), so batches stack directly:

    "<mod>/<group>"        float32 (C, h, w), normalised with the store's statistics
                           (categorical: int64 (h, w) class index, -1 where invalid)
    "<mod>/<group>/valid"  bool (h, w)
    "<mod>/bands"          bool (C_total,)   band-level availability
    "<mod>/labels"         float32 (K,)      image-level labels (multilabel modalities)
    "available"            bool (M,)         one flag per modality, in ``dataset.modalities``
    "location"             float32 (2,)      lat, lon of the chip centre
    "time"                 float32 (1,)      days since 1970 (NaN when unknown)
    "transform"            float64 (6,)      affine of the (augmented) chip grid
    "gsd"                  float32 ()        metres per pixel
    "index"                int64 ()          row in the store
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from terrasynth.data.derived import DERIVATIONS, scale_relief
from terrasynth.data.stats import apply_transform, band_moments
from terrasynth.data.store import CHUNK_CHIPS, ChipStore
from terrasynth.errors import TerrasynthError

Sample = dict[str, Any]


class ChipDataset(Dataset):
    """Chips of one split of a store, normalised, with optional augmentation."""

    def __init__(
        self,
        store: ChipStore | str | Path,
        split: str | None = None,
        modalities: list[str] | None = None,
        transform: Any = None,
        cache_chunks: int = 64,
        derive: bool = False,
        relief_scale: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.store = store if isinstance(store, ChipStore) else ChipStore.open(store)
        self.path = self.store.path
        self.indices = self.store.indices(split)
        self.registry = self.store.registry
        self.modalities = modalities or self.store.modalities
        for m in self.modalities:
            if m not in self.store.modalities:
                raise TerrasynthError(f"modality '{m}' is not in store {self.path}")
        self.transform = transform
        self.cache_chunks = cache_chunks
        # Derived modalities (``data.derived``) filled in where a chip lacks them but holds
        # their source: for training only, evaluation must see what the store holds.
        self.derive = {
            t: src
            for t, (src, _) in DERIVATIONS.items()
            if derive and t in self.modalities and src in self.modalities
        }
        # Relief scaling (``data.derived``): the chance that a chip with DEM and slope gets
        # its relief multiplied by a log-uniform factor in RELIEF_FACTORS and its slope
        # recomputed. Training only.
        if not 0.0 <= relief_scale <= 1.0:
            raise ValueError("relief_scale must lie in [0, 1]")
        self.relief_scale = relief_scale if {"dem", "slope"} <= set(self.modalities) else 0.0
        self._seed = seed
        self._rng: np.random.Generator | None = None  # made per process (see _random)
        self.chip_size = self.store.chip_size
        stats = self.store.stats
        self._norm: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for m in self.modalities:
            mod = self.registry[m]
            if mod.kind != "continuous":
                continue
            self._norm[m] = band_moments(stats.get(m, {}), mod.bands)
        table = self.store.table
        self._location = table[["lat", "lon"]].to_numpy(np.float32)
        self._time = table["time_days"].to_numpy(np.float32)
        self._gsd = table["gsd_m"].to_numpy(np.float32)
        self._affine = np.stack(table["transform"].to_numpy()).astype(np.float64)
        self._has = np.stack([table[f"has_{m}"].to_numpy(bool) for m in self.modalities], 1)
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._absent: dict[str, Sample] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        # zarr handles are reopened in each DataLoader worker.
        state = self.__dict__.copy()
        state["store"] = None
        state["_cache"] = OrderedDict()
        state["_rng"] = None
        return state

    def _random(self) -> np.random.Generator:
        """This process's generator: DataLoader workers each draw their own stream, seeded
        from the dataset's seed and the worker's seed (which the loader derives from its
        own generator, per epoch and worker id)."""
        if self._rng is None:
            worker = _worker_seed()
            key = None if self._seed is None else (self._seed, 0 if worker is None else worker)
            self._rng = np.random.default_rng(key)
        return self._rng

    def reseed(self, key: Sequence[int]) -> None:
        """Restart the random streams of this process (relief scaling, and the transform's
        if it has ``reseed``) from ``key``: a batch made after ``reseed(key)`` depends on
        ``key`` and its chips only, not on what was drawn before or in which process."""
        self._rng = np.random.default_rng([*key, 0])
        reseed = getattr(self.transform, "reseed", None)
        if reseed is not None:
            reseed([*key, 1])

    def _array(self, key: str, index: int) -> np.ndarray:
        """Row ``index`` of array ``key``, read a whole chunk at a time."""
        chunk = index // CHUNK_CHIPS
        hit = self._cache.get((key, chunk))
        if hit is None:
            if self.store is None:
                self.store = ChipStore.open(self.path)
            hit = self.store.read(key, slice(chunk * CHUNK_CHIPS, (chunk + 1) * CHUNK_CHIPS))
            self._cache[(key, chunk)] = hit
            if len(self._cache) > self.cache_chunks * max(1, len(self.modalities) * 3):
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end((key, chunk))
        return hit[index % CHUNK_CHIPS]

    def __getitem__(self, i: int) -> Sample:
        idx = int(self.indices[i])
        sample: Sample = {}
        has = self._has[idx].copy()
        for j, m in enumerate(self.modalities):
            # An absent modality is never read: its zeros come without touching the store.
            if has[j]:
                sample.update(self._read_modality(m, idx))
            elif m in self.derive and has[self.modalities.index(self.derive[m])]:
                sample.update(self._derived_modality(m, idx))
                has[j] = True
            else:
                sample.update(self._absent_modality(m, idx))
        if (
            self.relief_scale
            and has[self.modalities.index("dem")]
            and has[self.modalities.index("slope")]
            and self._random().random() < self.relief_scale
        ):
            lo, hi = np.log10(RELIEF_FACTORS)
            factor = 10 ** self._random().uniform(lo, hi)
            sample.update(self._derived_modality("slope", idx, relief=factor))
        sample["available"] = torch.from_numpy(has)
        sample["location"] = torch.from_numpy(self._location[idx].copy())
        sample["time"] = torch.tensor([self._time[idx]], dtype=torch.float32)
        sample["transform"] = torch.from_numpy(self._affine[idx].copy())
        sample["gsd"] = torch.tensor(self._gsd[idx])
        sample["index"] = torch.tensor(idx)
        if self.transform is not None:
            sample = self.transform(sample)
        return sample

    def _read_modality(self, m: str, idx: int) -> Sample:
        mod = self.registry[m]
        if mod.kind == "multilabel":
            labels = self._array(f"{m}/labels", idx).astype(np.float32)
            return {f"{m}/labels": torch.from_numpy(labels)}
        band_avail = self._array(f"{m}/bands", idx)
        out: Sample = {f"{m}/bands": torch.from_numpy(band_avail.copy())}
        offset = 0
        for group in mod.groups:
            data = self._array(f"{m}/{group.name}/data", idx)
            valid = self._array(f"{m}/{group.name}/valid", idx)
            n = len(group.bands)
            if mod.kind == "categorical":
                x = torch.from_numpy(np.where(valid, data[0].astype(np.int64), -1))
            else:
                sl = slice(offset, offset + n)
                v = self._normalise(m, data, sl) * band_avail[sl, None, None]
                x = torch.from_numpy(v.astype(np.float32))
            out[f"{m}/{group.name}"] = x
            out[f"{m}/{group.name}/valid"] = torch.from_numpy(valid.copy())
            offset += n
        return out

    def _normalise(self, m: str, data: np.ndarray, bands: slice) -> np.ndarray:
        """Physical values (C, H, W) of ``m``'s bands ``bands`` in model units."""
        mean, std = self._norm[m]
        v = apply_transform(data.astype(np.float32), self.registry[m].transform)
        return (v - mean[bands, None, None]) / std[bands, None, None]

    def _derived_modality(self, m: str, idx: int, relief: float = 1.0) -> Sample:
        """``m`` computed from its source modality's stored values (one band, one group).

        ``relief`` != 1: the source's relief is scaled first (``data.derived.scale_relief``)
        and the scaled source comes back too, so the pair stays consistent.
        """
        src, fn = DERIVATIONS[m]
        (sg,), (tg,) = self.registry[src].groups, self.registry[m].groups
        data = self._array(f"{src}/{sg.name}/data", idx)[0].astype(np.float32)
        valid = self._array(f"{src}/{sg.name}/valid", idx)
        pixel_m = float(self._gsd[idx]) * self.chip_size / data.shape[-1]
        out: Sample = {}
        if relief != 1.0:
            data = scale_relief(data, valid, relief)
            source = self._normalise(src, data[None], slice(0, 1)) * valid
            out[f"{src}/{sg.name}"] = torch.from_numpy(source.astype(np.float32))
        v, ok = fn(data, valid, pixel_m)
        v = self._normalise(m, v[None], slice(0, 1))
        out[f"{m}/bands"] = torch.ones(1, dtype=torch.bool)
        out[f"{m}/{tg.name}"] = torch.from_numpy((v * ok).astype(np.float32))
        out[f"{m}/{tg.name}/valid"] = torch.from_numpy(ok)
        return out

    def _absent_modality(self, m: str, idx: int) -> Sample:
        # The same zero tensors serve every chip lacking ``m`` (read-only by contract).
        if m not in self._absent:
            self._absent[m] = self._zeros(m)
        return self._absent[m]

    def _zeros(self, m: str) -> Sample:
        mod = self.registry[m]
        if mod.kind == "multilabel":
            return {f"{m}/labels": torch.zeros(mod.num_classes)}
        out: Sample = {f"{m}/bands": torch.zeros(len(mod.bands), dtype=torch.bool)}
        for group in mod.groups:
            h = self.chip_size // group.factor
            if mod.kind == "categorical":
                out[f"{m}/{group.name}"] = torch.full((h, h), -1, dtype=torch.int64)
            else:
                out[f"{m}/{group.name}"] = torch.zeros(len(group.bands), h, h)
            out[f"{m}/{group.name}/valid"] = torch.zeros(h, h, dtype=torch.bool)
        return out


BALANCE_GROUPS = ("source", "kind")
RELIEF_FACTORS = (0.01, 1.0)  # range of relief scaling factors (log-uniform)


def chip_groups(dataset: ChipDataset, by: str) -> np.ndarray:
    """A group label per chip of the dataset: its source, or its source and modality set."""
    labels = dataset.store.table["source"].to_numpy().astype(str)[dataset.indices]
    if by == "kind":
        has = dataset._has[dataset.indices]
        for j, m in enumerate(dataset.modalities):
            labels = np.char.add(labels, np.where(has[:, j], "|" + m, ""))
    return labels


class ChunkShuffleSampler(Sampler[int]):
    """Random order that visits store chunks one at a time (shuffled chunks, shuffled inside).

    Random access into a chunked store costs a chunk read per chip; this order reads each
    chunk once per visit while keeping batches well mixed across chunks of one source.

    ``balance`` re-weights groups of chips: a group of ``n`` chips contributes about
    ``n ** balance`` shares of an epoch (1: natural proportions, every chip once; 0: every
    group equally often). Small groups are then visited several times per epoch and large
    ones partly, so a store dominated by one source still teaches every modality.
    ``balance_by`` says what a group is: ``"source"`` (every chip of one source) or
    ``"kind"`` (the chips of one source that hold the same modalities, so that a rare
    pairing inside a large source, such as the few labelled chips of a time series, is seen
    as often as a small source).
    """

    def __init__(
        self,
        dataset: ChipDataset,
        seed: int = 0,
        balance: float = 1.0,
        balance_by: str = "source",
    ) -> None:
        if not 0.0 <= balance <= 1.0:
            raise ValueError("balance must lie in [0, 1]")
        if balance_by not in BALANCE_GROUPS:
            raise ValueError(f"balance_by must be one of {', '.join(BALANCE_GROUPS)}")
        self.dataset = dataset
        self.seed = seed
        self.balance = balance
        self.epoch = 0
        groups = chip_groups(dataset, balance_by)
        names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
        share = counts.astype(float) ** balance
        target = len(groups) * share / share.sum()  # chips per epoch for each group
        self.visits = (target / counts)[inverse]  # expected visits of each chip per epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        # whole visits plus one more with the fractional part's probability
        visits = np.floor(self.visits) + (rng.random(len(self.visits)) < self.visits % 1)
        chunks = self.dataset.indices // CHUNK_CHIPS
        rounds = [(c, r) for c in np.unique(chunks) for r in range(int(visits[chunks == c].max()))]
        for i in rng.permutation(len(rounds)):
            c, r = rounds[i]
            members = np.flatnonzero((chunks == c) & (visits > r))
            yield from rng.permutation(members).tolist()


class RandomCropFlip:
    """Crop and flip/rotate every raster of a sample together, keeping groups registered.

    Crop offsets are multiples of the coarsest group factor so each band group is cut at
    the same ground position; the chip's affine transform is updated to match.
    """

    def __init__(
        self,
        size: int,
        chip_size: int,
        max_factor: int = 4,
        flips: bool = True,
        seed: int | None = None,
    ) -> None:
        if size % max_factor or size > chip_size:
            raise ValueError(f"crop size must be a multiple of {max_factor} and <= {chip_size}")
        self.size, self.chip_size, self.max_factor, self.flips = size, chip_size, max_factor, flips
        self.seed = seed
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        self._worker: int | None = None  # the worker seed the generator was derived for

    def reseed(self, key: Sequence[int]) -> None:
        """Restart the crop and flip stream from ``key`` (see ``ChipDataset.reseed``)."""
        self.generator.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))
        self._worker = _worker_seed()

    def _randint(self, n: int) -> int:
        # Each DataLoader worker gets its own copy of this transform: without a stream of
        # its own per worker (and epoch), all workers would draw the same crops.
        worker = _worker_seed()
        if worker is not None and worker != self._worker:
            key = [worker] if self.seed is None else [self.seed, worker]
            self.reseed(key)
        return int(torch.randint(n, (1,), generator=self.generator))

    def __call__(self, sample: Sample) -> Sample:
        steps = (self.chip_size - self.size) // self.max_factor + 1
        r0 = self._randint(steps) * self.max_factor
        c0 = self._randint(steps) * self.max_factor
        k = self._randint(4) if self.flips else 0
        flip = bool(self._randint(2)) if self.flips else False
        out: Sample = {}
        for key, x in sample.items():
            if not is_raster_key(key, x):
                out[key] = x
                continue
            f = self.chip_size // x.shape[-1]
            n = self.size // f
            y = x[..., r0 // f : r0 // f + n, c0 // f : c0 // f + n]
            if flip:
                y = torch.flip(y, dims=(-1,))
            out[key] = torch.rot90(y, k, dims=(-2, -1)).contiguous()
        out["transform"] = _augmented_affine(sample["transform"], r0, c0, self.size, flip, k)
        return out


def _worker_seed() -> int | None:
    """The seed of this DataLoader worker (distinct per worker and per loader iteration,
    derived from the loader's generator), or None in the main process."""
    info = torch.utils.data.get_worker_info()
    return None if info is None else int(info.seed)


def is_raster_key(key: str, x: Any) -> bool:
    """True for the raster entries of a sample or batch (``<mod>/<group>[/valid]``)."""
    return (
        isinstance(x, torch.Tensor)
        and x.ndim >= 2
        and "/" in key
        and not key.endswith(("/bands", "/labels"))
    )


def _augmented_affine(
    t: torch.Tensor, r0: int, c0: int, size: int, flip: bool, k: int
) -> torch.Tensor:
    """Affine of the output pixel grid: crop, then horizontal flip, then ``k`` rot90s."""
    a, b, c, d, e, f = t.tolist()
    m = np.array([[a, b, c], [d, e, f], [0, 0, 1]], np.float64)
    m = m @ np.array([[1, 0, c0], [0, 1, r0], [0, 0, 1]], np.float64)
    if flip:
        m = m @ np.array([[-1, 0, size], [0, 1, 0], [0, 0, 1]], np.float64)
    for _ in range(k):
        # torch.rot90 (counter-clockwise): output (r, c) shows input (c, size - 1 - r);
        # in pixel-corner coordinates input (x, y) = (size - y', x').
        m = m @ np.array([[0, -1, size], [1, 0, 0], [0, 0, 1]], np.float64)
    return torch.tensor([m[0, 0], m[0, 1], m[0, 2], m[1, 0], m[1, 1], m[1, 2]], dtype=torch.float64)


def collate_chips(batch: list[Sample]) -> Sample:
    """Stack samples; availability flags stay per chip ("available", "<mod>/bands")."""
    out = default_collate(batch)
    out["available"] = out["available"].bool()
    return out


def max_group_factor(dataset: ChipDataset) -> int:
    """Coarsest band-group factor among the dataset's modalities."""
    factors = [g.factor for m in dataset.modalities for g in dataset.registry[m].groups]
    return max(factors, default=1) if factors else 1
