"""Retrieval of training chips as conditioning: what the neighbours of a window looked like.

Most of a generated chip's error is its level (each band's chip mean): a radar chip says
little about how bright the optical chip of the same place is, but chips of the training
split whose inputs look alike do (the kNN baseline's strength). The convolutional generator
therefore looks up the ``k`` training chips whose *given* modalities are most alike and
reads what their *generated* modality was: the neighbours' mean per band, the spread of
those means, and their typical within-chip spread (class frequencies for class maps). The
network learns how far to trust that and adds the spatial structure the inputs show.

The index is one summary row per training chip and raster modality (per band: mean and
standard deviation over known pixels, in store-normalised units; class maps: class
frequencies), NaN where a chip lacks the modality or a band. It is built once from the
training split by the trainer and saved inside the model's weights (``retrieval.*``
tensors), so a saved model needs no store to generate. Built by hand: this is a few
thousand rows, a brute-force distance matrix per batch costs less than one convolution,
and a nearest-neighbour library would add a dependency for no gain.

While training, neighbours within ``EXCLUDE_M`` of the chip itself are ignored: the
spatial split puts whole 2.56 km blocks in one split, so a test window never finds its own
place in the index, and training must not learn to rely on finding it.
"""

from __future__ import annotations

import math

import torch
from rich.progress import track
from torch import nn

from terrasynth.modalities import Modality

EXCLUDE_M = 2560.0  # the split's block size: training ignores neighbours nearer than this
MISSING_PENALTY = 2.0  # distance term for a given modality the candidate chip lacks
EARTH_RADIUS_M = 6_371_000.0


def summary_size(mod: Modality) -> int:
    """Numbers per chip summarising ``mod``: class frequencies, or mean and std per band."""
    if mod.kind == "categorical":
        return mod.num_classes
    return 2 * sum(len(g.bands) for g in mod.groups)


def summarise(
    mod: Modality, values: dict[str, torch.Tensor], known: dict[str, torch.Tensor]
) -> torch.Tensor:
    """(B, summary_size) of one modality from its normalised values and known masks per
    band group (categorical: one-hot in [-1, 1]); NaN where nothing is known."""
    parts_mean, parts_std = [], []
    for g in mod.groups:
        x, k = values[g.name].float(), known[g.name].float()
        n = k.sum((-2, -1))
        if mod.kind == "categorical":
            freq = (((x + 1) / 2) * k).sum((-2, -1)) / n.clamp_min(1)
            return torch.where(n > 0, freq, torch.full_like(freq, math.nan))
        mean = (x * k).sum((-2, -1)) / n.clamp_min(1)
        var = (((x - mean[..., None, None]) ** 2) * k).sum((-2, -1)) / n.clamp_min(1)
        nan = torch.full_like(mean, math.nan)
        parts_mean.append(torch.where(n > 0, mean, nan))
        parts_std.append(torch.where(n > 0, var.sqrt(), nan))
    return torch.cat([torch.cat(parts_mean, 1), torch.cat(parts_std, 1)], 1)


def _msd(query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, N) mean squared difference over the numbers known in both; NaN if none.

    Expanded as q^2 + r^2 - 2qr over the jointly known numbers, four (B, S) x (S, N)
    products instead of a (B, N, S) difference tensor (a tenth of a training step)."""
    kq, kr = torch.isfinite(query).float(), torch.isfinite(rows).float()
    q, r = torch.nan_to_num(query), torch.nan_to_num(rows)
    n = kq @ kr.T
    total = (q * q) @ kr.T + kq @ (r * r).T - 2 * q @ r.T
    out = total.clamp_min(0) / n.clamp_min(1)
    return torch.where(n > 0, out, torch.full_like(out, math.nan))


class RetrievalIndex(nn.Module):
    """Summaries of the training chips (see the module docstring), as buffers."""

    def __init__(self, rows: dict[str, torch.Tensor], places: torch.Tensor) -> None:
        super().__init__()
        self.names = list(rows)
        for name, r in rows.items():
            # half precision: summaries are O(1) in normalised units, and it halves the
            # size of the saved model (places stay float32: they decide the exclusion).
            # What is unknown is a mask beside the values, not NaN (NaN != NaN would make
            # equal weights compare unequal)
            known = torch.isfinite(r)
            self.register_buffer(_key(name), torch.where(known, r, 0.0).half())
            self.register_buffer(_key(name, "known"), known)
        self.register_buffer("places", places.float())  # (N, 3) unit vectors on the sphere

    def __len__(self) -> int:
        return int(self.places.shape[0])

    def rows(self, name: str) -> torch.Tensor | None:
        if name not in self.names:
            return None
        r = getattr(self, _key(name)).float()
        return r.masked_fill(~getattr(self, _key(name, "known")), math.nan)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> RetrievalIndex | None:
        """The index saved under ``prefix`` in a state dict (None if there is none)."""
        places = state.get(f"{prefix}places")
        if places is None:
            return None
        rows = {}
        for k, v in state.items():
            if k.startswith(f"{prefix}rows__"):
                name = _name(k[len(prefix) :])
                # runs saved before the mask was kept apart hold NaN for unknown values
                known = state.get(f"{prefix}{_key(name, 'known')}", torch.isfinite(v))
                rows[name] = v.float().masked_fill(~known.bool(), math.nan)
        return cls(rows, places)

    @torch.no_grad()
    def neighbours(
        self,
        target: str,
        queries: dict[str, torch.Tensor],
        k: int,
        places: torch.Tensor | None = None,
        batch: int | None = None,
        exclude_m: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, k) of the ``k`` nearest chips having ``target`` and whether each
        sample found any (B,). ``queries``: per given modality (B, summary) with NaN rows
        where a sample does not give it. ``places`` (B, 3): ignore chips nearer than
        ``exclude_m`` (B,) metres, ``EXCLUDE_M`` if not given (training). ``batch``: B when
        ``queries`` may be empty."""
        rows_t = self.rows(target)
        b = next(iter(queries.values())).shape[0] if queries else int(batch or 0)
        if rows_t is None or not queries or b == 0:
            dev = self.places.device
            return (
                torch.zeros(b, k, dtype=torch.long, device=dev),
                torch.zeros(b, dtype=torch.bool, device=dev),
            )
        has_t = torch.isfinite(rows_t).any(1)
        total = torch.zeros(b, len(self), device=rows_t.device)
        count = torch.zeros(b, 1, device=rows_t.device)
        for name, q in queries.items():
            rows = self.rows(name)
            if rows is None:
                continue
            q = q.to(rows.device)
            given = torch.isfinite(q).any(1)[:, None].float()  # (B, 1)
            d = _msd(q, rows)
            d = torch.where(torch.isnan(d), torch.full_like(d, MISSING_PENALTY), d)
            total = total + given * d
            count = count + given
        dist = total / count.clamp_min(1)
        dist = dist.masked_fill(~has_t[None], math.inf)
        if places is not None:
            chord = torch.cdist(places.float().to(self.places.device), self.places)
            radius = EXCLUDE_M if exclude_m is None else exclude_m.to(chord)[:, None]
            dist = dist.masked_fill(chord < radius / EARTH_RADIUS_M, math.inf)
        kk = min(k, len(self))
        d, idx = dist.topk(kk, dim=1, largest=False)
        found = (count[:, 0] > 0) & torch.isfinite(d[:, 0])
        if kk < k:  # fewer chips than k: repeat the nearest
            idx = torch.cat([idx, idx[:, :1].expand(-1, k - kk)], 1)
            d = torch.cat([d, d[:, :1].expand(-1, k - kk)], 1)
        # beyond the finite candidates, repeat the nearest (keeps statistics honest)
        idx = torch.where(torch.isfinite(d), idx, idx[:, :1])
        return idx, found

    def retrieved(self, mod: Modality, idx: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
        """(B, 3C) for a continuous modality of C bands: the neighbours' mean per band, the
        spread of their means and their mean within-chip spread; (B, classes) of mean class
        frequencies for a class map. Zero where nothing was found."""
        rows = self.rows(mod.name)
        r = rows[idx]  # (B, k, S)
        if mod.kind == "categorical":
            out = torch.nan_to_num(r).mean(1)
        else:
            c = r.shape[-1] // 2
            means, stds = r[..., :c], r[..., c:]
            ok = torch.isfinite(means).float()
            n = ok.sum(1).clamp_min(1)
            m = (torch.nan_to_num(means) * ok).sum(1) / n
            between = (((torch.nan_to_num(means) - m[:, None]) ** 2) * ok).sum(1) / n
            within = (torch.nan_to_num(stds) * ok).sum(1) / n
            out = torch.cat([m, between.sqrt(), within], 1)
        return out * found[:, None].float()

    def neighbour_levels(self, mod: Modality, idx: torch.Tensor) -> torch.Tensor:
        """(B, k, C) each neighbour's mean per band of continuous ``mod`` (NaN: unknown)."""
        r = self.rows(mod.name)[idx]
        return r[..., : r.shape[-1] // 2]

    def distance_km(self, places: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, k) ground distance in km from ``places`` (B, 3 unit vectors) to neighbours
        ``idx`` (B, k); NaN where a place is unknown (not a unit vector)."""
        p = places.float().to(self.places.device)
        chord = (p[:, None] - self.places[idx]).norm(dim=-1).clamp(max=2.0)
        km = 2 * EARTH_RADIUS_M * torch.asin(chord / 2) / 1000
        unit = (p.norm(dim=-1) - 1).abs() < 1e-3
        return torch.where(unit[:, None], km, torch.full_like(km, math.nan))


def _key(name: str, part: str = "rows") -> str:
    return f"{part}__" + name.replace(".", "_dot_")


def _name(key: str) -> str:
    return key[len("rows__") :].replace("_dot_", ".")


@torch.no_grad()
def build_index(dataset, config, progress: bool = True) -> RetrievalIndex:
    """Summaries of every chip of ``dataset`` (a :class:`ChipDataset`, the training split)
    for the raster modalities of ``config``, with a progress bar."""
    from terrasynth.data.dataset import collate_chips
    from terrasynth.models.signals import batch_signals, location_vector

    mods = config.raster_modalities()
    rows: dict[str, list[torch.Tensor]] = {m.name: [] for m in mods}
    places = []
    step = 64
    starts = range(0, len(dataset), step)
    for start in track(starts, "retrieval index", disable=not progress, transient=True):
        batch = collate_chips([dataset[i] for i in range(start, min(start + step, len(dataset)))])
        sig = batch_signals(batch, config, dataset.modalities)
        b = batch["location"].shape[0]
        for mod in mods:
            s = sig.get(mod.name)
            if s is None:
                rows[mod.name].append(torch.full((b, summary_size(mod)), math.nan))
                continue
            r = summarise(mod, s.groups, s.known)
            r[~s.present.bool()] = math.nan
            rows[mod.name].append(r)
        loc = batch["location"].float()
        places.append(torch.nan_to_num(location_vector(loc[:, 0], loc[:, 1]), nan=2.0))
    table = {n: torch.cat(v) for n, v in rows.items() if v}
    table = {n: v for n, v in table.items() if bool(torch.isfinite(v).any())}
    return RetrievalIndex(table, torch.cat(places))
