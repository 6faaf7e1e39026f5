"""Proper scores for the one-step generator: fair CRPS, the patch energy score, and the
training step that weighs them on real chips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from terrasynth.data.dataset import ChipDataset, RandomCropFlip, collate_chips
from terrasynth.errors import TerrasynthError
from terrasynth.models.config import ModelConfig
from terrasynth.models.conv_generator import ConvGenerator
from terrasynth.models.signals import Signal, batch_signals
from terrasynth.training.score_objective import (
    ScoreConfig,
    ScoreObjective,
    energy_score,
    fair_crps,
)
from tests.conftest import MICRO_CONV

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_data = pytest.mark.needs_data


# -- the scores ----------------------------------------------------------------------------
def test_fair_crps_matches_its_formula():
    gen = torch.Generator().manual_seed(0)
    m = 5
    x = torch.randn(m, 3, 4, generator=gen)
    y = torch.randn(3, 4, generator=gen)
    expected = torch.zeros(3, 4)
    for i in range(m):
        expected += (x[i] - y).abs() / m
        for j in range(m):
            if i != j:
                expected -= (x[i] - x[j]).abs() / (2 * m * (m - 1))
    torch.testing.assert_close(fair_crps(x, y), expected)


def test_fair_crps_of_a_degenerate_ensemble_is_its_distance():
    y = torch.tensor([[0.3, -1.2], [2.0, 0.0]])
    assert torch.equal(fair_crps(y.expand(4, 2, 2), y), torch.zeros(2, 2))
    torch.testing.assert_close(fair_crps(y.expand(3, 2, 2) - 0.5, y), torch.full((2, 2), 0.5))


def _crps_standard_normal(y: torch.Tensor) -> torch.Tensor:
    """CRPS of N(0, 1) at ``y`` in closed form."""
    pdf = torch.exp(-0.5 * y**2) / math.sqrt(2 * math.pi)
    return y * (2 * torch.special.ndtr(y) - 1) + 2 * pdf - 1 / math.sqrt(math.pi)


def test_fair_crps_of_two_members_is_unbiased_for_the_distributions_crps():
    """Averaged over many 2-member ensembles of N(0, 1), the fair CRPS is the CRPS of N(0, 1)
    itself (the plain ensemble CRPS would be 0.28 too high with two members)."""
    n = 200_000
    y = torch.tensor([-2.0, 0.0, 0.5, 1.5])
    x = torch.randn(2, n, 4, generator=torch.Generator().manual_seed(1))
    score = fair_crps(x, y.expand(n, 4)).mean(0)
    torch.testing.assert_close(score, _crps_standard_normal(y), atol=0.01, rtol=0)


def test_fair_crps_is_lowest_for_the_true_spread():
    """Truth from N(0, 1): ensembles of the right spread beat too narrow and too wide ones."""
    n = 100_000
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(n, generator=gen)
    z = torch.randn(2, n, generator=gen)
    scores = {s: float(fair_crps(s * z, y).mean()) for s in (0.5, 1.0, 2.0)}
    assert scores[1.0] < scores[0.5] - 0.02 and scores[1.0] < scores[2.0] - 0.02, scores


def test_energy_score_of_one_value_vectors_is_the_fair_crps():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 10, generator=gen)
    y = torch.randn(10, generator=gen)
    torch.testing.assert_close(energy_score(x[..., None], y[..., None]), fair_crps(x, y))


def test_energy_score_matches_its_formula():
    gen = torch.Generator().manual_seed(4)
    m, n, d = 3, 5, 6
    x = torch.randn(m, n, d, generator=gen)
    y = torch.randn(n, d, generator=gen)
    expected = torch.zeros(n)
    for i in range(m):
        expected += (x[i] - y).norm(dim=-1) / m
        for j in range(m):
            if i != j:
                expected -= (x[i] - x[j]).norm(dim=-1) / (2 * m * (m - 1))
    torch.testing.assert_close(energy_score(x, y), expected)


def test_energy_score_ties_bands_together_where_crps_does_not():
    """Two perfectly correlated bands: members with the right marginals but independent
    bands have the same CRPS as correlated members, and a worse energy score."""
    n, m = 50_000, 4
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(n, generator=gen)
    y = torch.stack([z, z], -1)  # (N, 2)
    a = torch.randn(m, n, generator=gen)
    b = torch.randn(m, n, generator=gen)
    joint = torch.stack([a, a], -1)  # (M, N, 2): right correlation
    apart = torch.stack([a, b], -1)  # same marginals, no correlation
    crps = [float(fair_crps(e, y).mean()) for e in (joint, apart)]
    es = [float(energy_score(e, y).mean()) for e in (joint, apart)]
    assert abs(crps[0] - crps[1]) < 0.01
    assert es[0] < es[1] - 0.05, es


def test_patch_energy_counts_known_values_of_each_patch():
    """A degenerate ensemble off by 0.5 scores 0.5 per known value of every 4 x 4 patch (the
    patch vector's norm is rescaled by the square root of its known size); unknown values
    count nothing, whatever the samples hold there."""
    gen = torch.Generator().manual_seed(6)
    y = torch.randn(2, 3, 8, 8, generator=gen)
    ens = (y + 0.5).expand(3, -1, -1, -1, -1)
    mask = torch.ones_like(y)
    total = ScoreObjective._energy(ens, y, mask)
    torch.testing.assert_close(total, torch.tensor(0.5 * y.numel()))
    mask[1, 2, 5, 6] = 0  # one value unknown: its patch is scored on the other 47
    torch.testing.assert_close(
        ScoreObjective._energy(ens, y, mask), torch.tensor(0.5 * (y.numel() - 1))
    )
    mask[1, :, 4:8, 4:8] = 0  # a whole patch unknown: nothing of it counts
    torch.testing.assert_close(
        ScoreObjective._energy(ens, y, mask), torch.tensor(0.5 * (y.numel() - 3 * 16))
    )
    assert float(ScoreObjective._energy(ens, y, torch.zeros_like(y))) == 0.0


# -- the training step on real chips -------------------------------------------------------
@pytest.fixture(scope="module")
def real(small_store):
    """32 px crops of chips of all three sources and their model-space signals."""
    ds = ChipDataset(small_store, split="train", transform=RandomCropFlip(32, 64, seed=0))
    src = ds.store.table["source"].to_numpy()[ds.indices]
    pick = []
    for s in ("band_folder", "bigearthnet_v1", "eopatch"):
        pick += list(np.flatnonzero(src == s)[:3])
    batch = collate_chips([ds[int(i)] for i in pick])
    reg = ds.registry
    mods = {m: reg[m].to_dict() for m in ds.modalities}
    stats = ds.store.stats
    cfg = ModelConfig(backbone="conv_generator", modalities=mods, stats=stats, **MICRO_CONV)
    return cfg, batch, batch_signals(batch, cfg, ds.modalities)


class Oracle(torch.nn.Module):
    """Answers with the truth plus ``offset`` as the mean and as every member (a degenerate
    ensemble; class maps: confident logits of the true class), and records its calls."""

    def __init__(self, config: ModelConfig, signals: dict[str, Signal], offset: float) -> None:
        super().__init__()
        self.config, self.signals, self.offset = config, signals, offset
        self.modality_names = list(signals)  # what the inputs split reads of a model
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[dict] = []

    def forward(self, inputs, gsd, members=1, generator=None):
        self.calls.append({"inputs": inputs, "members": members, "generator": generator})
        mean = {}
        for name, inp in inputs.items():
            if not bool((inp.t > 0).any()):
                continue
            sig = self.signals[name]
            if sig.groups is None:
                mean[name] = sig.vector + self.offset + self.w
            elif sig.target is not None:
                mean[name] = {g: 50.0 * x + self.w for g, x in sig.groups.items()}
            else:
                mean[name] = {g: x + self.offset + self.w for g, x in sig.groups.items()}
        return mean, [mean] * members


@needs_data
def test_score_parts_are_weighted_per_generated_value(real):
    cfg, batch, sig = real
    oracle = Oracle(cfg, sig, offset=1.0)
    gen = torch.Generator().manual_seed(0)
    obj = ScoreObjective(ScoreConfig(energy_weight=0.0, spectral_weight=0.0, mse_weight=0.25))
    loss, parts = obj(oracle, sig, batch["gsd"], gen)
    (call,) = oracle.calls
    assert call["members"] == cfg.ensemble and call["generator"] is gen
    generated = set()
    for name, inp in call["inputs"].items():
        # the generator's only noise level: generated at t = 1, everything else clean
        assert ((inp.t == 0) | (inp.t == 1)).all(), name
        assert (inp.t[~inp.present] == 0).all()
        if bool((inp.t == 1).any()):
            generated.add(name)
    assert parts and set(parts) <= generated
    for name, v in parts.items():
        s = sig[name]
        if s.groups is None:
            assert v == pytest.approx(1.0), name  # MSE of a vector off by 1
        elif s.target is not None:
            assert v < 1e-6, name  # confident and right
        else:
            assert v == pytest.approx(1.25), name  # CRPS 1 + 0.25 x MSE 1, per value
    assert float(loss.detach()) == pytest.approx(float(np.mean(list(parts.values()))))
    loss.backward()  # the loss reaches the model's parameters
    assert oracle.w.grad is not None


def _split_of_each_chip(inputs, signals) -> list[tuple[set, set, set]]:
    """Per chip: (present modalities, generated ones, given ones) of a training call."""
    b = next(iter(signals.values())).present.shape[0]
    out = []
    for i in range(b):
        present = {n for n, s in signals.items() if bool(s.present[i])}
        shown = {n for n, inp in inputs.items() if bool(inp.present[i])}
        generated = {n for n in shown if float(inputs[n].t[i]) == 1.0}
        out.append((present, generated, shown - generated))
    return out


@needs_data
def test_the_inputs_split_gives_every_chip_inputs_and_all_but_its_targets(real):
    """``roles="inputs"`` (the U-Net's split): every chip with two or more modalities has at
    least one given and one generated, and none dropped. The default ``"any"`` split does
    not promise that: over the same draws some chip loses a modality or all its inputs."""
    cfg, batch, sig = real
    seen_any = []
    for seed in range(4):
        for roles in ("inputs", "any"):
            oracle = Oracle(cfg, sig, offset=1.0)
            obj = ScoreObjective(ScoreConfig(roles=roles))
            obj(oracle, sig, batch["gsd"], torch.Generator().manual_seed(seed))
            split = _split_of_each_chip(oracle.calls[0]["inputs"], sig)
            if roles == "any":
                seen_any += split
                continue
            for present, generated, given in split:
                assert len(present) >= 2
                assert generated and given and generated | given == present
                assert not generated & given
    assert any(not given or gen | given != p for p, gen, given in seen_any)


@needs_data
def test_the_mixed_split_takes_the_inputs_split_for_about_half_the_chips(real):
    """``roles="mixed"``: the share of chips split with inputs given and none dropped lies
    between the free split's and 1 (the "inputs" split's), over the same draws."""
    cfg, batch, sig = real

    def share_split_as_inputs(roles: str) -> float:
        ok = []
        for seed in range(8):
            oracle = Oracle(cfg, sig, offset=1.0)
            ScoreObjective(ScoreConfig(roles=roles))(
                oracle, sig, batch["gsd"], torch.Generator().manual_seed(seed)
            )
            for present, gen, given in _split_of_each_chip(oracle.calls[0]["inputs"], sig):
                ok.append(bool(gen) and bool(given) and gen | given == present)
        return float(np.mean(ok))

    free, mixed = share_split_as_inputs("any"), share_split_as_inputs("mixed")
    assert share_split_as_inputs("inputs") == 1.0
    assert free < 0.6 and free + 0.15 < mixed < 0.95, (free, mixed)


def test_an_unknown_split_is_refused():
    with pytest.raises(TerrasynthError, match="unknown role split 'all'"):
        ScoreConfig(roles="all")


@needs_data
def test_patch_energy_adds_one_per_known_value(real):
    cfg, batch, sig = real
    obj = ScoreObjective(ScoreConfig(energy_weight=1.0, spectral_weight=0.0, mse_weight=0.0))
    oracle = Oracle(cfg, sig, offset=1.0)
    _, parts = obj(oracle, sig, batch["gsd"], torch.Generator().manual_seed(0))
    continuous = {n: v for n, v in parts.items() if sig[n].groups and sig[n].target is None}
    assert continuous
    for name, v in continuous.items():
        assert v == pytest.approx(2.0), (name, v)  # CRPS 1 + patch energy 1, per known value


@needs_data
def test_spectral_energy_scores_each_pixel_spectrum_of_multiband_targets(real):
    """An ensemble off by 1 in every band: each pixel spectrum of C bands is sqrt(C) away,
    scaled to 1 per value; a one-band target has no spectrum to score."""
    cfg, batch, sig = real
    obj = ScoreObjective(
        ScoreConfig(energy_weight=0.0, spectral_weight=1.0, mse_weight=0.0, anomaly_weight=0.0)
    )
    oracle = Oracle(cfg, sig, offset=1.0)
    _, parts = obj(oracle, sig, batch["gsd"], torch.Generator().manual_seed(0))
    continuous = {n: v for n, v in parts.items() if sig[n].groups and sig[n].target is None}
    assert continuous
    for name, v in continuous.items():
        bands = max(x.shape[1] for x in sig[name].groups.values())
        if bands == 1:
            assert v == pytest.approx(1.0), name  # the CRPS alone
        else:
            assert v == pytest.approx(2.0), (name, v)  # CRPS 1 + spectral energy 1


@needs_data
def test_training_step_on_real_chips_lowers_the_score(real):
    cfg, batch, sig = real
    torch.manual_seed(0)
    model = ConvGenerator(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    obj = ScoreObjective()
    losses = []
    for step in range(15):
        # the same roles, noise and fresh members every step: one fixed problem
        loss, parts = obj(model, sig, batch["gsd"], torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and parts
        assert all(np.isfinite(v) for v in parts.values())
        assert set(parts) <= set(sig)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            # the ensemble trains the residual generator, the MSE the mean head
            for p in (model.coef.weight, model.gen_in.weight, model.slot_head.weight):
                assert p.grad is not None and p.grad.abs().sum() > 0
            kinds = {("categorical" if sig[n].target is not None else "raster")
                     if sig[n].groups is not None else "vector" for n in parts}  # fmt: skip
            assert kinds == {"categorical", "raster", "vector"}
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
