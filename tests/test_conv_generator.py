"""The convolutional generator: outputs per band group, the ensemble and its noise, spectral
slots shared across optical sensors, absent modalities, and the noise maps."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from terrasynth.data.store import ChipStore
from terrasynth.errors import TerrasynthError
from terrasynth.modalities.registry import SPECTRAL_SLOTS
from terrasynth.models.config import ModelConfig
from terrasynth.models.conv_generator import (
    DISTANCE_FEATURES,
    LATENT_SIGMA,
    NOISE_SIGMAS,
    ConvGenerator,
    smooth_noise,
)
from terrasynth.models.filters import NUM_BANDS, gaussian_blur, radius_of
from terrasynth.models.retrieval import RetrievalIndex, summary_size
from terrasynth.models.scene_model import ModalityInput
from terrasynth.models.signals import location_vector
from tests.conftest import MICRO_CONV, open_zero_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_data = pytest.mark.needs_data

B = 2
GSD = torch.tensor([10.0, 30.0])


@pytest.fixture(scope="module")
def config(small_store) -> ModelConfig:
    store = ChipStore.open(small_store)
    reg = store.registry
    mods = {m: reg[m].to_dict() for m in store.modalities}
    return ModelConfig(backbone="conv_generator", modalities=mods, stats=store.stats, **MICRO_CONV)


def _model(config: ModelConfig, seed: int = 0) -> ConvGenerator:
    """A model whose zero-initialised FiLM layers are opened, so every condition acts."""
    torch.manual_seed(seed)
    return open_zero_layers(ConvGenerator(config).eval())


def _three(x: torch.Tensor, generated: bool, gen: torch.Generator) -> torch.Tensor:
    """(noisy values, given values, given mask) along dim 1: noise and nothing shown for a
    generated modality (t = 1), the clean values shown everywhere for a given one (t = 0)."""
    if generated:
        noise = torch.randn(x.shape, generator=gen)
        return torch.cat([noise, torch.zeros_like(x), torch.zeros_like(x)], 1)
    return torch.cat([x, x, torch.ones_like(x)], 1)


def _inputs(
    config: ModelConfig,
    gen: torch.Generator,
    targets: tuple[str, ...] | list[str] = (),
    given: tuple[str, ...] | list[str] = (),
    size: int | None = None,
) -> dict[str, ModalityInput]:
    """A batch of B: ``targets`` generated at t = 1, ``given`` shown clean at t = 0."""
    size = size or config.image_size
    reg = config.registry
    vectors = config.vector_modalities()
    out = {}
    for name in [*targets, *given]:
        generated = name in targets
        t = torch.full((B,), 1.0 if generated else 0.0)
        present = torch.ones(B, dtype=torch.bool)
        if name in vectors:
            x = torch.randn(B, vectors[name], generator=gen)
            out[name] = ModalityInput(t, present, vector=_three(x, generated, gen))
            continue
        mod = reg[name]
        groups = {}
        for g in mod.groups:
            h = size // g.factor
            if mod.kind == "categorical":
                cls = torch.randint(0, mod.num_classes, (B, h, h), generator=gen)
                x = F.one_hot(cls, mod.num_classes).permute(0, 3, 1, 2).float() * 2 - 1
            else:
                x = torch.randn(B, len(g.bands), h, h, generator=gen)
            groups[g.name] = _three(x, generated, gen)
        out[name] = ModalityInput(t, present, groups=groups)
    return out


def _tensors(out: dict, name: str) -> list[torch.Tensor]:
    v = out[name]
    return list(v.values()) if isinstance(v, dict) else [v]


def _same(a: dict, b: dict, name: str) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_tensors(a, name), _tensors(b, name), strict=True))


# -- outputs ---------------------------------------------------------------------------------
@needs_data
def test_outputs_per_band_group_for_generated_modalities_only(config):
    model = _model(config)
    targets = ["s2l2a", "landcover_nlcd", "corine", "location"]
    inputs = _inputs(config, torch.Generator().manual_seed(0), targets, ["s1grd", "dem", "time"])
    inputs["dem"].t = torch.tensor([0.0, 1.0])  # generated for one sample only: still a target
    with torch.no_grad():
        out = model(inputs, GSD)
    assert set(out) == {*targets, "dem"}  # s1grd and time are given: not returned
    s2 = out["s2l2a"]
    # every band group on its own grid: 10 m on the base grid, 20 m and 60 m coarser
    assert s2["r10m"].shape == (B, 4, 32, 32)
    assert s2["r20m"].shape == (B, 6, 16, 16)
    assert s2["r60m"].shape == (B, 2, 8, 8)
    assert out["dem"]["r30m"].shape == (B, 1, 32, 32)
    # class maps: one logit plane per class of the legend
    k = config.registry["landcover_nlcd"].num_classes
    assert k > 2 and out["landcover_nlcd"]["r30m"].shape == (B, k, 32, 32)
    assert out["corine"].shape == (B, 44)
    assert out["location"].shape == (B, 3)
    for name in out:
        assert all(torch.isfinite(x).all() for x in _tensors(out, name)), name


@needs_data
def test_ensemble_returns_the_mean_and_members_of_its_noise(config):
    model = _model(config)
    targets = ["s2l2a", "dem", "landcover_nlcd"]
    inputs = _inputs(config, torch.Generator().manual_seed(1), targets, ["s1grd"])
    with torch.no_grad():
        one = model(inputs, GSD)
        mean, samples = model(inputs, GSD, members=3, generator=torch.Generator().manual_seed(0))
        mean2, again = model(inputs, GSD, members=3, generator=torch.Generator().manual_seed(0))
        mean3, other = model(inputs, GSD, members=3, generator=torch.Generator().manual_seed(1))
    assert len(samples) == 3
    assert set(mean) == set(targets) and all(set(s) == set(targets) for s in samples)
    for name in targets:
        # the first member is drawn from the inputs' own noise: the one-member output
        assert _same(samples[0], one, name), name
        # the same generator, the same members; the mean depends on no noise at all
        assert all(_same(a, b, name) for a, b in zip(samples, again, strict=True)), name
        assert _same(mean, mean2, name) and _same(mean, mean3, name), name
        assert _same(other[0], samples[0], name), name
        for s in samples:
            for x, m in zip(_tensors(s, name), _tensors(mean, name), strict=True):
                assert x.shape == m.shape
    for name in ("s2l2a", "dem"):
        # fresh members differ from each other, from another generator's and from the mean
        assert not _same(samples[1], samples[2], name)
        assert not _same(other[1], samples[1], name)
        assert not _same(samples[0], mean, name)
    # class maps carry their uncertainty in the logits: every member is the mean
    for s in samples:
        assert _same(s, mean, "landcover_nlcd")


def _grads(model: ConvGenerator, loss: torch.Tensor) -> dict[str, float]:
    model.zero_grad()
    loss.backward()
    return {n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("regression", [False, True])
def test_regression_mean_stops_the_scores_gradient_at_the_mean(config, regression):
    model = _model(replace(config, regression_mean=regression)).train()
    inputs = _inputs(config, torch.Generator().manual_seed(1), ["s2l2a"], ["s1grd"])
    mean, samples = model(inputs, GSD, members=3, generator=torch.Generator().manual_seed(0))
    on_samples = _grads(model, sum(v.square().sum() for s in samples for v in s["s2l2a"].values()))
    mean, _ = model(inputs, GSD, members=3, generator=torch.Generator().manual_seed(0))
    on_mean = _grads(model, sum(v.square().sum() for v in mean["s2l2a"].values()))
    heads = [n for n in on_mean if n.startswith("slot_head") and on_mean[n] > 0]
    assert heads  # the mean's own head learns from a loss on the mean either way
    # the samples' loss reaches the mean head only without regression_mean
    assert all((on_samples.get(n, 0.0) > 0) != regression for n in heads), on_samples
    # and reaches the residual generator either way
    assert any(n.startswith("coef") and v > 0 for n, v in on_samples.items())
    with torch.no_grad():  # at sampling, the same outputs as without it
        plain = _model(config)(inputs, GSD)
        other = _model(replace(config, regression_mean=regression))(inputs, GSD)
    assert _same(plain, other, "s2l2a")


@pytest.mark.parametrize("net", ["film", "unet"])
@pytest.mark.parametrize("cut", [False, True])
def test_regression_trunk_keeps_the_scores_gradient_out_of_the_trunk(config, cut, net):
    change = dict(regression_mean=True, regression_trunk=cut, trunk=net)
    model = _model(replace(config, **change)).train()
    inputs = _inputs(config, torch.Generator().manual_seed(1), ["s2l2a"], ["s1grd"])
    _, samples = model(inputs, GSD, members=3, generator=torch.Generator().manual_seed(0))
    on_samples = _grads(model, sum(v.square().sum() for s in samples for v in s["s2l2a"].values()))
    layers = ("stem", "down", "unet_trunk", "cond_mlp")
    trunk = [n for n, _ in model.named_parameters() if n.startswith(layers)]
    assert trunk
    # the samples' loss reaches the trunk only without regression_trunk
    assert any(on_samples.get(n, 0.0) > 0 for n in trunk) != cut
    assert not cut or all(on_samples.get(n, 0.0) == 0 for n in trunk)
    # the residual generator's own layers learn from it either way
    for layer in ("gen_in", "gen_mid", "coef", "slot_loadings"):
        assert any(n.startswith(layer) and v > 0 for n, v in on_samples.items()), layer
    with torch.no_grad():  # at sampling, the same outputs as without it
        plain = _model(replace(config, regression_mean=True, trunk=net))(inputs, GSD)
        other = _model(replace(config, **change))(inputs, GSD)
    assert _same(plain, other, "s2l2a")


@needs_data
def test_the_unet_trunk_reads_every_sensor_on_its_own_channels(config):
    model = _model(replace(config, trunk="unet"))
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("unet_trunk.down") for n in names)
    assert not any(n.startswith(("stem", "down.", "merge.", "unet_trunk.heads")) for n in names)
    inputs = _inputs(config, torch.Generator().manual_seed(7), ["s2l2a", "dem"], ["s1grd"])
    with torch.no_grad():
        out = model(inputs, GSD)
    assert out["s2l2a"]["r10m"].shape == (B, 4, 32, 32) and out["dem"]["r30m"].shape[1] == 1
    # the U-Net's input stack: S2 L2A and S2 L1C are different channels, not one slot each
    trunk = model.unet_trunk
    assert trunk is not None and trunk.in_channels > model.in_channels
    with torch.no_grad():  # the input reaches the output through it
        other = dict(
            inputs, s1grd=_inputs(config, torch.Generator().manual_seed(8), (), ["s1grd"])["s1grd"]
        )
        assert not _same(out, model(other, GSD), "s2l2a")


@needs_data
def test_the_unet_heads_give_the_unet_trunks_own_prediction_as_the_mean(config):
    cfg = replace(config, trunk="unet", mean_heads="unet", retrieval_k=0, regression_mean=True)
    model = _model(cfg).train()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("unet_trunk.heads") for n in names)
    assert not any(n.startswith(("slot_head", "own_head", "band_scale")) for n in names)
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["s2l2a", "dem"], ["s1grd"])
    with torch.no_grad():
        mean, samples = model(inputs, GSD, members=2, generator=torch.Generator().manual_seed(0))
        unet = model.unet_trunk(inputs, GSD)
    for name in ("s2l2a", "dem"):  # the mean is the U-Net's prediction, unmodulated
        for g, v in unet[name].items():
            assert torch.equal(mean[name][g], v)
    # the samples spread about it by the residual generator
    assert not _same(samples[0], samples[1], "s2l2a")


@needs_data
@pytest.mark.parametrize("trunk", ["film", "unet"])
def test_the_parts_hold_every_parameter_once_and_the_trunk_apart(config, trunk):
    model = ConvGenerator(replace(config, trunk=trunk, mean_heads="slots"))
    parts = model.parameter_parts()
    ids = [id(p) for params in parts.values() for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # all, each once
    name_of = {id(p): n for n, p in model.named_parameters()}
    prefixes = ("unet_trunk.",) if trunk == "unet" else ("stem.", "down.", "up.", "merge.")
    assert all(name_of[id(p)].startswith(prefixes) for p in parts["trunk"])
    assert not any(name_of[id(p)].startswith(prefixes) for p in parts["rest"])


def test_unknown_or_unmatched_mean_heads_are_refused(config):
    with pytest.raises(TerrasynthError, match="unknown mean_heads 'mlp'"):
        replace(config, mean_heads="mlp").validate()
    with pytest.raises(TerrasynthError, match='mean_heads "unet" needs trunk "unet"'):
        replace(config, mean_heads="unet").validate()


def test_an_unknown_trunk_is_refused(config):
    with pytest.raises(TerrasynthError, match="unknown trunk 'resnet'"):
        replace(config, trunk="resnet").validate()


def test_regression_trunk_needs_regression_mean(config):
    with pytest.raises(TerrasynthError, match="regression_trunk needs regression_mean"):
        replace(config, regression_trunk=True).validate()


@needs_data
def test_the_targets_noise_moves_the_samples_of_all_targets_not_the_mean(config):
    model = _model(config)
    gen = torch.Generator().manual_seed(2)
    inputs = _inputs(config, gen, ["s2l2a", "dem"], ["s1grd"])
    redrawn = dict(inputs)
    groups = dict(inputs["s2l2a"].groups)
    for g, x in groups.items():
        c = x.shape[1] // 3
        x = x.clone()
        x[:, :c] = torch.randn(x[:, :c].shape, generator=gen)
        groups[g] = x
    redrawn["s2l2a"] = ModalityInput(inputs["s2l2a"].t, inputs["s2l2a"].present, groups=groups)
    with torch.no_grad():
        mean_a, a = model(inputs, GSD, members=2, generator=torch.Generator().manual_seed(0))
        mean_b, b = model(redrawn, GSD, members=2, generator=torch.Generator().manual_seed(0))
    for name in ("s2l2a", "dem"):
        assert _same(mean_a, mean_b, name)
        assert not _same(a[0], b[0], name)  # one noise field drives every generated target
        assert _same(a[1], b[1], name)  # fresh members come from the generator only


def _with_and_without(config: ModelConfig, **change):
    """Mean and two samples of s2l2a and dem from s1grd, by a model and by the same weights
    under a changed config: (m0, s0, m1, s1)."""
    base = _model(config)
    changed = ConvGenerator(ModelConfig.from_dict({**config.to_dict(), **change})).eval()
    changed.load_state_dict(base.state_dict())
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["s2l2a", "dem"], ["s1grd"])
    with torch.no_grad():
        m0, s0 = base(inputs, GSD, members=2, generator=torch.Generator().manual_seed(0))
        m1, s1 = changed(inputs, GSD, members=2, generator=torch.Generator().manual_seed(0))
    return m0, s0, m1, s1


@needs_data
def test_spread_scale_scales_the_residual_per_modality(config):
    m0, s0, m1, s1 = _with_and_without(config, spread_scale={"s2l2a": 0.0, "dem": 2.0})
    for i in range(2):
        assert _same(s1[i], m1, "s2l2a")  # no spread at all
        assert not _same(s0[i], m0, "s2l2a")
        torch.testing.assert_close(
            s1[i]["dem"]["r30m"] - m1["dem"]["r30m"], 2 * (s0[i]["dem"]["r30m"] - m0["dem"]["r30m"])
        )
    assert _same(m0, m1, "s2l2a") and _same(m0, m1, "dem")


@needs_data
def test_spread_bands_rescale_the_residual_per_spatial_scale(config):
    only_level = [[0.0] * (NUM_BANDS - 1) + [1.0]]
    ones = [[1.0] * NUM_BANDS for _ in range(12)]
    m0, s0, m1, s1 = _with_and_without(config, spread_bands={"dem": only_level, "s2l2a": ones})
    assert _same(m0, m1, "dem") and _same(m0, m1, "s2l2a")  # the mean is untouched
    for i in range(2):
        for g in s0[i]["s2l2a"]:  # factors of one: the samples as they were
            torch.testing.assert_close(s1[i]["s2l2a"][g], s0[i]["s2l2a"][g], atol=1e-5, rtol=0)
        r0 = s0[i]["dem"]["r30m"] - m0["dem"]["r30m"]
        r1 = s1[i]["dem"]["r30m"] - m1["dem"]["r30m"]
        # only the level band kept: each sample's residual is its chip mean, everywhere
        torch.testing.assert_close(r1, r0.mean((-2, -1), keepdim=True).expand_as(r0))
        assert float(r0.std()) > 10 * float(r1.std((-2, -1)).max())


@needs_data
def test_mean_bands_rescale_the_mean_per_spatial_scale_not_the_residual(config):
    rows = [[0.0] * 4 + [1.0] * 2]  # the dem's structure finer than 16 px removed
    m0, s0, m1, s1 = _with_and_without(config, mean_bands={"dem": rows})
    mean, raw = m1["dem"]["r30m"], m0["dem"]["r30m"]
    assert torch.allclose(mean, gaussian_blur(raw, 8.0), atol=1e-5)
    for i in range(2):  # each sample: the new mean plus the residual it had
        res = s0[i]["dem"]["r30m"] - raw
        assert torch.allclose(s1[i]["dem"]["r30m"], mean + res, atol=1e-5)
        assert _same(s0[i], s1[i], "s2l2a")  # other modalities keep theirs
    ones = _with_and_without(config, mean_bands={"dem": [[1.0] * NUM_BANDS]})
    assert torch.allclose(ones[2]["dem"]["r30m"], raw, atol=1e-5)


@needs_data
def test_relief_smoothing_blurs_the_elevation_residual_only(config):
    m0, s0, m1, s1 = _with_and_without(config, relief_smoothing=2.0)
    assert _same(m0, m1, "dem") and _same(s0[0], s1[0], "s2l2a")  # not optical bands
    for i in range(2):
        r0 = s0[i]["dem"]["r30m"] - m0["dem"]["r30m"]
        r1 = s1[i]["dem"]["r30m"] - m1["dem"]["r30m"]
        torch.testing.assert_close(r1, gaussian_blur(r0, 2.0))

        def roughness(r):
            return float((r[..., 1:, :] - r[..., :-1, :]).pow(2).mean() / r.var())

        assert roughness(r1) < 0.5 * roughness(r0)


def _mixture_model(config: ModelConfig, seed: int = 0, **change) -> ConvGenerator:
    """A model with the retrieval mixture over a made-up index of six chips whose elevation
    levels are 0..5 per band, at one degree of latitude apart; the gate fully open and the
    residual off, so a sample's deviation from the mean is its neighbour's level alone."""
    cfg = ModelConfig.from_dict(
        {**config.to_dict(), "retrieval_mixture": True, "retrieval_k": 3, **change}
    )
    model = _model(cfg, seed)
    rows = {}
    g = torch.Generator().manual_seed(seed)
    for mod in model.rasters:
        rows[mod.name] = torch.rand(6, summary_size(mod), generator=g)
    dem = rows["dem"]
    c = dem.shape[1] // 2
    dem[:, :c] = torch.arange(6.0)[:, None]
    places = location_vector(torch.arange(6.0), torch.zeros(6))
    model.set_retrieval(RetrievalIndex(rows, places))
    with torch.no_grad():
        model.level_gate.bias.fill_(30.0)
        model.coef.weight.zero_()
        model.coef.bias.zero_()
    return model


def _residual_twins(config: ModelConfig, **change) -> tuple[ConvGenerator, ConvGenerator]:
    """Two mixture models with the same weights, the second with ``change``: the residual
    on and the level gate shut (no neighbour's deviation); and their run on three members."""
    base = _mixture_model(config)
    twin = _mixture_model(config, **change)
    twin.load_state_dict(base.state_dict())
    with torch.no_grad():
        for m in (base, twin):
            m.coef.weight.normal_(generator=torch.Generator().manual_seed(1))
            m.level_gate.bias.fill_(-30.0)
    return base, twin


def _run_three(model: ConvGenerator, inputs: dict):
    with torch.no_grad():
        return model(inputs, GSD, members=3, generator=torch.Generator().manual_seed(0))


def _given_location(inputs: dict, lat: float) -> dict:
    v = location_vector(torch.full((B,), lat), torch.zeros(B))
    t = torch.zeros(B)
    inputs["location"] = ModalityInput(
        t, torch.ones(B, dtype=torch.bool), vector=_three(v, False, None)
    )
    return inputs


@needs_data
def test_each_sample_takes_one_neighbours_level(config):
    model = _mixture_model(config)
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"])
    with torch.no_grad():
        mean, samples = model(inputs, GSD, members=24, generator=torch.Generator().manual_seed(0))
    offsets = set()
    for s in samples:
        dev = s["dem"]["r30m"] - mean["dem"]["r30m"]  # (B, C, H, W)
        per_chip = dev[..., :1, :1]
        assert torch.allclose(dev, per_chip.expand_as(dev), atol=1e-5)  # one level per chip
        offsets.add(round(float(per_chip[0, 0]), 3))
    # no place given: the three neighbours weigh alike; their levels differ by whole numbers
    # around their mean, and the 24 samples take more than one of them
    assert len(offsets) > 1
    frac = {round(o - min(offsets), 3) % 1 for o in offsets}
    assert frac == {0.0}


@needs_data
def test_each_pixel_mixes_the_neighbours_levels(config):
    model = _mixture_model(config, neighbour_pixels=True)
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"])
    with torch.no_grad():
        mean, samples = model(inputs, GSD, members=4, generator=torch.Generator().manual_seed(0))
        model.neighbour_logits.weight.zero_()  # as initialised (_model opens zero layers)
        model.neighbour_logits.bias.zero_()
        mean0, equal = model(inputs, GSD, members=2, generator=torch.Generator().manual_seed(0))
        levels = model._retrieve(inputs, ["dem"], None)[1]["dem"][0]  # (B, k, C)
    low = (levels - levels.mean(1, keepdim=True)).amin(1)[..., None, None]
    high = (levels - levels.mean(1, keepdim=True)).amax(1)[..., None, None]
    for s in samples:
        dev = s["dem"]["r30m"] - mean["dem"]["r30m"]
        assert bool(((dev >= low - 1e-4) & (dev <= high + 1e-4)).all())  # inside the hull
        assert float(dev.std()) > 1e-3  # pixels mix differently
    for s in equal:  # equal logits: every pixel at the (equally weighted) mean
        assert float((s["dem"]["r30m"] - mean0["dem"]["r30m"]).abs().max()) < 1e-4
    with torch.no_grad():  # logits that pick neighbour 1 everywhere: its level, per pixel
        model.neighbour_logits.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
        mean, samples = model(inputs, GSD, members=2, generator=torch.Generator().manual_seed(0))
    pick = (levels[:, 1] - levels.mean(1))[..., None, None]
    dev = samples[0]["dem"]["r30m"] - mean["dem"]["r30m"]
    torch.testing.assert_close(dev, pick.expand_as(dev), atol=1e-4, rtol=0)


def test_neighbour_pixels_needs_the_mixture(config):
    cfg = ModelConfig.from_dict({**config.to_dict(), "neighbour_pixels": True})
    with pytest.raises(TerrasynthError, match="neighbour_pixels"):
        cfg.validate()


@pytest.mark.parametrize("share", [0.0, 1.0, 1.5])
def test_level_gate_init_is_a_share_strictly_between_0_and_1(config, share):
    cfg = ModelConfig.from_dict({**config.to_dict(), "level_gate_init": share})
    with pytest.raises(TerrasynthError, match="level_gate_init"):
        cfg.validate()


def test_level_gate_starts_at_the_configured_share(config):
    for share in (0.5, 0.9):
        cfg = ModelConfig.from_dict(
            {**config.to_dict(), "retrieval_mixture": True, "retrieval_k": 3}
            | {"level_gate_init": share}
        )
        cfg.validate()
        model = ConvGenerator(cfg)
        gate = torch.sigmoid(model.level_gate(torch.randn(4, cfg.cond_dim)))
        torch.testing.assert_close(gate, torch.full_like(gate, share))


@needs_data
def test_neighbour_level_takes_each_chips_level_from_its_neighbours(config):
    base, apart = _residual_twins(config, neighbour_level=True)
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"])

    def anomaly(x):
        return x - x.mean((2, 3), keepdim=True)

    (m0, s0), (m1, s1) = _run_three(base, inputs), _run_three(apart, inputs)
    with torch.no_grad():
        levels, weight = apart._retrieve(inputs, ["dem"], None)[1]["dem"]
    want = (levels * weight[:, :, None]).sum(1) / weight.sum(1, keepdim=True)  # (B, C)
    for x in [m1] + s1:  # the mean and every sample: the neighbours' level, exactly
        torch.testing.assert_close(x["dem"]["r30m"].mean((2, 3)), want, atol=1e-5, rtol=0)
    # without neighbour_level the head moves the level; the structure within is the same
    assert float((m0["dem"]["r30m"].mean((2, 3)) - want).abs().max()) > 1e-3
    torch.testing.assert_close(anomaly(m1["dem"]["r30m"]), anomaly(m0["dem"]["r30m"]))
    torch.testing.assert_close(anomaly(s1[1]["dem"]["r30m"]), anomaly(s0[1]["dem"]["r30m"]))
    assert float(anomaly(s1[1]["dem"]["r30m"] - m1["dem"]["r30m"]).std()) > 1e-3


@needs_data
def test_neighbour_level_keeps_the_heads_level_where_no_neighbour_is_found(config):
    model = _mixture_model(config, neighbour_level=True)
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"])
    ret = model._retrieve(inputs, ["dem"], None)[0]["dem"]
    assert bool(model._found(ret).all())  # the found flag, not the place-known feature
    none = ret.clone()
    none[:, ret.shape[1] - 4] = 0.0
    assert model._level_apart(model.config.registry["dem"], none) is not None
    assert not bool(model._level_apart(model.config.registry["dem"], none).any())


@needs_data
def test_the_head_level_gate_spans_the_neighbours_level_to_the_heads(config):
    base = _mixture_model(config)
    apart = _mixture_model(config, neighbour_level=True)
    gated = _mixture_model(config, neighbour_level=True, head_level_gate_init=0.1)
    state = base.state_dict()
    apart.load_state_dict(state)
    gated.load_state_dict(state, strict=False)  # all but the new gate
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"])

    def run(model):
        with torch.no_grad():
            return model(inputs, GSD, members=2, generator=torch.Generator().manual_seed(0))

    e = torch.randn(4, config.cond_dim)
    share = ConvGenerator(gated.config)._head_level_share(e)  # as initialised
    torch.testing.assert_close(share, torch.full_like(share, 0.1))  # starts at the share
    for bias, twin in ((30.0, base), (-30.0, apart)):  # fully open: the head's level; shut:
        with torch.no_grad():  # the neighbours' level alone
            gated.head_level_gate.bias.fill_(bias)
        (m, s), (mt, st) = run(gated), run(twin)
        torch.testing.assert_close(m["dem"]["r30m"], mt["dem"]["r30m"], atol=1e-5, rtol=0)
        torch.testing.assert_close(s[1]["dem"]["r30m"], st[1]["dem"]["r30m"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "change",
    [{"head_level_gate_init": 0.1}, {"neighbour_level": True, "head_level_gate_init": 1.0}],
)
def test_the_head_level_gate_needs_neighbour_level_and_a_share_below_1(config, change):
    cfg = ModelConfig.from_dict(
        {**config.to_dict(), "retrieval_mixture": True, "retrieval_k": 3, **change}
    )
    with pytest.raises(TerrasynthError, match="head_level_gate_init"):
        cfg.validate()


@needs_data
def test_the_level_correction_is_bounded_by_the_neighbours_spread(config):
    model = _mixture_model(config, level_correction_bound=0.5)
    mod = model.config.registry["dem"]
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"])
    with torch.no_grad():
        ret, near = model._retrieve(inputs, ["dem"], None)
    ret, near = ret["dem"], near["dem"]
    levels, weight = near
    w = (weight / weight.sum(1, keepdim=True))[:, :, None]
    want = (levels * w).sum(1)  # (B, C) the neighbours' weighted level
    bound = 0.5 * (((levels - want[:, None]) ** 2 * w).sum(1).sqrt() + 0.02)
    assert float(bound.min()) > 0.1  # the made-up levels 0..5 disagree
    structure = torch.randn(B, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    structure = structure - structure.mean((2, 3), keepdim=True)
    spread = model._neighbour_spread(mod, near)
    for shift in (0.01, 100.0, -100.0):
        out = model._add_retrieved(mod, {"r30m": structure + shift}, ret, near, spread)["r30m"]
        moved = out.mean((2, 3)) - want
        assert bool((moved.abs() <= bound + 1e-5).all())
        if abs(shift) > 1:  # a far correction ends at the bound, on its side
            torch.testing.assert_close(moved, (1 if shift > 0 else -1) * bound)
        else:  # a small one passes (tanh is near linear)
            torch.testing.assert_close(moved, torch.full_like(moved, shift), atol=1e-4, rtol=0)
        torch.testing.assert_close(out - out.mean((2, 3), keepdim=True), structure)
    none = ret.clone()  # no neighbour found: the head's level, unbounded
    none[:, ret.shape[1] - 4] = 0.0
    out = model._add_retrieved(mod, {"r30m": structure + 100.0}, none, near, spread)["r30m"]
    torch.testing.assert_close(out.mean((2, 3)) - want, torch.full_like(want, 100.0))
    # neighbours that agree exactly, or none found: the gradient stays finite
    head = (structure + 1.0).requires_grad_()
    nearness = weight.detach().requires_grad_()
    agree = (torch.ones_like(levels), nearness)
    for row in (ret, none):
        out = model._add_retrieved(
            mod, {"r30m": head}, row, agree, model._neighbour_spread(mod, agree)
        )
        out["r30m"].sum().backward()
        assert bool(torch.isfinite(head.grad).all() and torch.isfinite(nearness.grad).all())


@needs_data
def test_with_the_level_bound_the_residual_gives_no_level(config):
    base, bounded = _residual_twins(config, level_correction_bound=1.0)
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"])

    def levels(model):
        mean, samples = _run_three(model, inputs)
        return [x["dem"]["r30m"].mean((2, 3)) for x in [mean, *samples]]

    (m0, *s0), (m1, *s1) = levels(base), levels(bounded)
    for s in s1:  # every sample at the mean's level
        torch.testing.assert_close(s, m1, atol=1e-5, rtol=0)
    assert max(float((s - m0).abs().max()) for s in s0) > 1e-3  # unbounded: its own level
    # radar is not elevation: its samples keep the residual's level
    radar = _inputs(config, torch.Generator().manual_seed(3), ["s1grd"], ["dem"])
    mean, samples = _run_three(bounded, radar)
    level = {g: v.mean((2, 3)) for g, v in mean["s1grd"].items()}
    assert (
        max(
            float((s["s1grd"][g].mean((2, 3)) - level[g]).abs().max())
            for s in samples
            for g in level
        )
        > 1e-3
    )


@needs_data
def test_with_the_residual_level_bound_each_sample_keeps_a_bounded_level(config):
    """The level of a sample's calibrated deviation from the mean is bounded; its relief is
    the same as with the residual's level removed."""
    # a spread calibration factor of 10: the bound holds after it
    calibrated = {"level_correction_bound": 1.0, "spread_scale": {"dem": 10.0}}
    _, removed = _residual_twins(config, **calibrated)
    _, kept = _residual_twins(config, **calibrated, residual_level_bound=0.5)
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"])
    # each sample its own level; the relief within the chip is the same as where the
    # residual's level is removed
    mean, samples = _run_three(kept, inputs)
    moved = [s["dem"]["r30m"].mean((2, 3)) - mean["dem"]["r30m"].mean((2, 3)) for s in samples]
    assert float((moved[0] - moved[1]).abs().max()) > 1e-3
    for s, r in zip(samples, _run_three(removed, inputs)[1], strict=True):
        s, r = s["dem"]["r30m"], r["dem"]["r30m"]
        torch.testing.assert_close(
            s - s.mean((2, 3), keepdim=True), r - r.mean((2, 3), keepdim=True), atol=1e-4, rtol=1e-4
        )
    mod = kept.config.registry["dem"]
    with torch.no_grad():
        kept.coef.weight.mul_(1e3)  # residual levels far beyond the bound
        bound = 0.5 * kept._neighbour_spread(mod, kept._retrieve(inputs, ["dem"], None)[1]["dem"])
    mean, samples = _run_three(kept, inputs)
    level = mean["dem"]["r30m"].mean((2, 3))
    moved = torch.stack([s["dem"]["r30m"].mean((2, 3)) - level for s in samples])
    assert bool((moved.abs() <= bound + 2e-3).all())  # never beyond it (float32 of 1e4s)
    assert float((moved.abs() / bound).median()) > 0.5  # and near it


@pytest.mark.parametrize(
    "change",
    [{"residual_level_bound": -1.0}, {"residual_level_bound": 1.0, "level_correction_bound": 0.0}],
)
def test_the_residual_level_bound_is_positive_and_needs_the_level_bound(config, change):
    cfg = ModelConfig.from_dict(
        {
            **config.to_dict(),
            "retrieval_mixture": True,
            "retrieval_k": 3,
            "level_correction_bound": 1.0,
            **change,
        }
    )
    with pytest.raises(TerrasynthError, match="residual_level_bound"):
        cfg.validate()


@pytest.mark.parametrize(
    "change",
    [{"level_correction_bound": -1.0}, {"retrieval_k": 0}, {"neighbour_level": True}],
)
def test_the_level_correction_bound_is_positive_and_needs_the_mixture(config, change):
    cfg = ModelConfig.from_dict(
        {**config.to_dict(), "retrieval_mixture": True, "retrieval_k": 3}
        | {"level_correction_bound": 1.0, **change}
    )
    with pytest.raises(TerrasynthError, match="level_correction_bound"):
        cfg.validate()


def test_neighbour_level_needs_the_mixture(config):
    cfg = ModelConfig.from_dict({**config.to_dict(), "neighbour_level": True, "retrieval_k": 3})
    with pytest.raises(TerrasynthError, match="neighbour_level"):
        cfg.validate()


@needs_data
def test_flat_neighbours_flatten_the_structure_within_the_chip(config):
    base = _mixture_model(config)
    amp = _mixture_model(config, retrieval_amplitude=True)
    amp.load_state_dict(base.state_dict())
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["dem", "s2l2a"], ["s1grd"])
    ret = amp._retrieve(inputs, ["dem"], None)[0]["dem"]

    def run(model):
        with torch.no_grad():
            return model(inputs, GSD, members=2, generator=torch.Generator().manual_seed(0))

    def anomaly(x):
        return x - x.mean((2, 3), keepdim=True)

    def expected(typical):
        c = typical.shape[0]
        return ((ret[:, 2 * c : 3 * c] + 0.05 * typical) / (1.05 * typical)).clamp(max=3.0)

    (m0, _), (first, _) = run(base), run(amp)
    r30 = m0["dem"]["r30m"]
    for scale in (1.0, 10.0):  # the index's median roughness; a yardstick ten times rougher
        amp._typical_within["dem"] = amp._typical_within["dem"] * scale
        (m1, _) = run(amp)
        want = expected(amp._typical_within["dem"])[:, :, None, None]
        # the chip's level stays, the structure within it scales by the neighbours' roughness
        torch.testing.assert_close(m1["dem"]["r30m"].mean((2, 3)), r30.mean((2, 3)))
        torch.testing.assert_close(anomaly(m1["dem"]["r30m"]), want * anomaly(r30))
        assert _same(first, m1, "s2l2a")  # the other modality's yardstick did not change
    assert bool((want < 0.2).all())  # flat neighbours: a fifth of the structure or less


def test_retrieval_amplitude_needs_retrieval(config):
    cfg = ModelConfig.from_dict({**config.to_dict(), "retrieval_amplitude": True, "retrieval_k": 0})
    with pytest.raises(TerrasynthError, match="retrieval_amplitude"):
        cfg.validate()


@needs_data
def test_the_nearer_neighbours_weigh_more_when_the_place_is_known(config):
    model = _mixture_model(config)
    with torch.no_grad():
        model.nearness_rate["dem"].fill_(50.0)  # the nearest neighbour takes all the weight
    near = _given_location(
        _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"]), 2.3
    )
    blind = _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"])
    blind.pop("location", None)
    with torch.no_grad():
        idx, _ = model.retrieval.neighbours("dem", {"s1grd": _s1_query(model, near)}, k=3)
        retrieved, neighbours = model._retrieve(near, ["dem"], None)
    levels, weight = neighbours["dem"]
    nearest = int(torch.argmin(model.retrieval.distance_km(_place(near), idx)[0]))
    assert weight[0, nearest] > 0.99
    _, uniform = model._retrieve(blind, ["dem"], None)[1]["dem"]
    assert torch.allclose(uniform, torch.full_like(uniform, 1 / 3))


@needs_data
@pytest.mark.parametrize("radius, found", [(0.0, True), (3e7, False)])
def test_training_hides_neighbours_within_the_configured_radius(config, radius, found):
    model = _mixture_model(config)
    model.config.retrieval_exclusion_m = [radius]  # 30,000 km: the whole Earth
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["dem"], ["s1grd"])
    here = location_vector(torch.full((B,), 2.3), torch.zeros(B))
    retrieved, _ = model._retrieve(inputs, ["dem"], here, torch.Generator().manual_seed(0))
    found_col = -1 - len(DISTANCE_FEATURES)  # the found flag, before the distance features
    assert bool((retrieved["dem"][:, found_col] == 1).all()) is found


def _place(inputs: dict) -> torch.Tensor:
    v = inputs["location"].vector
    return v[:, 3:6]


def _s1_query(model: ConvGenerator, inputs: dict) -> torch.Tensor:
    from terrasynth.models.retrieval import summarise

    mod = model.config.registry["s1grd"]
    values = {
        g: x[:, x.shape[1] // 3 : 2 * x.shape[1] // 3] for g, x in inputs["s1grd"].groups.items()
    }
    known = {g: x[:, 2 * x.shape[1] // 3 :] for g, x in inputs["s1grd"].groups.items()}
    return summarise(mod, values, known)


@needs_data
def test_gsd_conditions_the_output(config):
    model = _model(config)
    inputs = _inputs(config, torch.Generator().manual_seed(4), ["s2l2a"], ["s1grd"])
    with torch.no_grad():
        a = model(inputs, torch.tensor([10.0, 10.0]))["s2l2a"]["r10m"]
        b = model(inputs, torch.tensor([10.0, 60.0]))["s2l2a"]["r10m"]
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[1], b[1], atol=1e-4)


# -- spectral slots --------------------------------------------------------------------------
def _subset_config(config: ModelConfig, names: list[str]) -> ModelConfig:
    d = {**config.to_dict(), "use_location": False, "use_time": False}
    d["modalities"] = {n: config.modalities[n] for n in names}
    return ModelConfig.from_dict(d)


@needs_data
def test_bands_with_a_spectral_slot_add_no_input_channels(config):
    n = len(SPECTRAL_SLOTS)
    cfg = _subset_config(config, ["s2l2a", "landsat8", "s1grd"])
    # values and mask per slot, plus values and mask of each radar band
    assert ConvGenerator(cfg).in_channels == 2 * n + 2 * 2
    # another optical sensor whose bands all have slots shares them
    cfg = _subset_config(config, ["s2l2a", "landsat8", "s1grd", "s2l1c"])
    assert ConvGenerator(cfg).in_channels == 2 * n + 2 * 2
    # bands without a slot have channels of their own; a class map has K planes and a mask
    k = config.registry["landcover_nlcd"].num_classes
    cfg = _subset_config(config, ["s2l2a", "landsat8", "s1grd", "dem", "landcover_nlcd"])
    assert ConvGenerator(cfg).in_channels == 2 * n + 2 * 2 + 2 + k + 1
    assert ConvGenerator(cfg).slot_head.out_channels == n


def _band(config: ModelConfig, name: str, band: str) -> tuple[str, int]:
    for g in config.registry[name].groups:
        if band in g.bands:
            return g.name, g.bands.index(band)
    raise AssertionError(band)


@needs_data
def test_one_slot_head_serves_every_sensor_of_the_slot(config):
    model = _model(config)
    red = SPECTRAL_SLOTS.index("red")
    inputs = _inputs(config, torch.Generator().manual_seed(5), ["s2l2a", "landsat8"], ["s1grd"])
    g2, b04 = _band(config, "s2l2a", "B04")
    mean, _ = model(inputs, GSD, members=2, generator=torch.Generator().manual_seed(0))
    mean["s2l2a"][g2][:, b04].square().sum().backward()
    grad = model.slot_head.weight.grad.flatten(1).abs().sum(1)
    assert grad[red] > 0  # the loss of S2 B04 trains the red slot ...
    assert (grad[torch.arange(len(grad)) != red] == 0).all()  # ... and no other slot
    # Landsat 8 B4 is read from those very weights; its blue band B2 is not
    g8, b4 = _band(config, "landsat8", "B4")
    _, b2 = _band(config, "landsat8", "B2")
    with torch.no_grad():
        before = model(inputs, GSD, members=2)[0]
        model.slot_head.weight[red] += 0.1
        after = model(inputs, GSD, members=2)[0]
    change = (after["landsat8"][g8] - before["landsat8"][g8]).abs().flatten(2).amax(2)
    assert (change[:, b4] > 1e-3).all()
    assert (change[:, b2] == 0).all()


def _only_band(config: ModelConfig, name: str, band: str, x: torch.Tensor) -> ModalityInput:
    """``name`` given with only ``band`` known (values ``x``, (B, 1, S, S) on the base grid)."""
    groups = {}
    for g in config.registry[name].groups:
        h = x.shape[-1] // g.factor
        vals = torch.zeros(B, len(g.bands), h, h)
        mask = torch.zeros_like(vals)
        if band in g.bands:
            i = g.bands.index(band)
            vals[:, i : i + 1], mask[:, i] = x, 1.0
        groups[g.name] = torch.cat([vals, vals, mask], 1)
    return ModalityInput(torch.zeros(B), torch.ones(B, dtype=torch.bool), groups=groups)


@needs_data
def test_two_sensors_give_a_slot_through_the_same_input_channel(config):
    """S2 B04 and Landsat 8 B4 enter as one 'red' channel: only the sensor embedding tells
    which sensor gave it."""
    model = _model(config)
    gen = torch.Generator().manual_seed(6)
    target = _inputs(config, gen, ["dem"])["dem"]
    red = torch.randn(B, 1, 32, 32, generator=gen)
    s2 = {"s2l2a": _only_band(config, "s2l2a", "B04", red), "dem": target}
    l8 = {"landsat8": _only_band(config, "landsat8", "B4", red), "dem": target}
    both = {**s2, **l8}
    with torch.no_grad():
        by_sensor = model(s2, GSD)["dem"]["r30m"], model(l8, GSD)["dem"]["r30m"]
        assert not torch.allclose(*by_sensor, atol=1e-4)  # the sensor is a condition
        model.sensor_in.weight.zero_()  # which sensors were given: no longer seen
        a, b, c = (model(x, GSD)["dem"]["r30m"] for x in (s2, l8, both))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)  # the same red from both: the slot holds their mean


# -- absent modalities ---------------------------------------------------------------------
def _flat(out: dict, skip: str, sample: int) -> torch.Tensor:
    return torch.cat([x[sample].flatten() for n in out if n != skip for x in _tensors(out, n)])


@needs_data
@pytest.mark.parametrize(
    "changed, role",
    [
        ("s2l2a", "given"),
        ("s2l2a", "generated"),
        ("landcover_nlcd", "given"),
        ("location", "given"),
        ("dem", "generated"),
    ],
)
def test_absent_modality_does_not_leak_into_others(config, changed, role):
    """Sample 0 lacks ``changed``, sample 1 holds it: only sample 1 may react to its input."""
    model = _model(config)
    targets = ["landsat8", "s1grd"] + ([changed] if role == "generated" else [])
    given = ["ndvi"] + ([changed] if role == "given" else [])

    def draw(seed: int) -> dict[str, ModalityInput]:
        inputs = _inputs(config, torch.Generator().manual_seed(seed), targets, given)
        inputs[changed].present = torch.tensor([False, True])
        return inputs

    inputs = draw(7)
    with torch.no_grad():
        before = model(inputs, GSD)
        inputs[changed] = draw(8)[changed]  # new values and noise for both samples
        after = model(inputs, GSD)
    torch.testing.assert_close(_flat(after, changed, 0), _flat(before, changed, 0))
    # the present sample does see it (otherwise the check above proves nothing)
    assert not torch.allclose(_flat(after, changed, 1), _flat(before, changed, 1), atol=1e-4)


@needs_data
def test_masking_a_modality_equals_leaving_it_out(config):
    model = _model(config)
    inputs = _inputs(
        config, torch.Generator().manual_seed(9), ["s2l2a", "dem"], ["landcover_nlcd", "s1grd"]
    )
    with torch.no_grad():
        for name in ("landcover_nlcd", "s1grd"):
            masked = dict(inputs)
            masked[name] = ModalityInput(
                inputs[name].t, torch.zeros(B, dtype=torch.bool), groups=inputs[name].groups
            )
            without = {k: v for k, v in inputs.items() if k != name}
            a, b = model(masked, GSD), model(without, GSD)
            for n in ("s2l2a", "dem"):
                for x, y in zip(_tensors(a, n), _tensors(b, n), strict=True):
                    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# -- noise -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [*NOISE_SIGMAS, LATENT_SIGMA])
def test_smooth_noise_has_unit_variance(sigma):
    noise = torch.randn(1, 4, 512, 512, generator=torch.Generator().manual_seed(0))
    out = smooth_noise(noise, sigma)
    assert out.shape == noise.shape
    assert abs(float(out.std()) - 1.0) < 0.1
    assert abs(float(out.mean())) < 0.1


@pytest.mark.parametrize("sigma", [1.5, 4.0])
def test_smooth_noise_of_overlapping_windows_agrees_where_they_overlap(sigma):
    """Two windows cut from one noise field see the same smooth noise in their overlap
    (away from their borders): what keeps a whole scene seamless."""
    field = torch.randn(1, 4, 96, 96, generator=torch.Generator().manual_seed(1))
    a = smooth_noise(field[..., 0:64, 0:64], sigma)
    b = smooth_noise(field[..., 24:88, 24:88], sigma)
    p = radius_of(sigma)
    # field rows/cols [24 + p, 64 - p): local [24 + p, 64 - p) in a, [p, 40 - p) in b
    torch.testing.assert_close(
        a[..., 24 + p : 64 - p, 24 + p : 64 - p], b[..., p : 40 - p, p : 40 - p]
    )
    # and the filter really smooths: neighbours are correlated
    x = smooth_noise(field, sigma)
    r = torch.corrcoef(torch.stack([x[..., :, :-1].flatten(), x[..., :, 1:].flatten()]))[0, 1]
    assert r > 0.5


# -- window sizes ----------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("change", [{"image_size": 16}, {"widths": [12, 24]}])
def test_a_config_that_validates_builds_a_model_that_runs(config, change):
    cfg = ModelConfig.from_dict({**config.to_dict(), **change})
    try:
        cfg.validate()
    except TerrasynthError:
        return  # refused up front, with terrasynth's own error: fine
    model = ConvGenerator(cfg).eval()
    inputs = _inputs(
        cfg, torch.Generator().manual_seed(10), ["s2l2a"], ["s1grd"], size=cfg.image_size
    )
    with torch.no_grad():
        out = model(inputs, GSD)
    assert out["s2l2a"]["r10m"].shape == (B, 4, cfg.image_size, cfg.image_size)


def _repeated(inputs: dict[str, ModalityInput], r: int, gen: torch.Generator) -> dict:
    """Each row ``r`` times in a row, the generated modalities with fresh noise per row:
    the samples of each window side by side, as sampling batches them."""
    out = {}
    for name, inp in inputs.items():
        generated = bool((inp.t > 0).any())

        def rep(x: torch.Tensor, generated: bool = generated) -> torch.Tensor:
            x = x.repeat_interleave(r, 0)
            if generated:
                c = x.shape[1] // 3
                x = x.clone()
                x[:, :c] = torch.randn(x[:, :c].shape, generator=gen)
            return x

        out[name] = ModalityInput(
            inp.t.repeat_interleave(r),
            inp.present.repeat_interleave(r),
            groups=None if inp.groups is None else {g: rep(v) for g, v in inp.groups.items()},
            vector=None if inp.vector is None else rep(inp.vector),
        )
    return out


@needs_data
@pytest.mark.parametrize("mixture", [False, True])
def test_samples_of_one_window_share_the_conditions_work(config, mixture):
    model = _mixture_model(config, neighbour_pixels=True) if mixture else _model(config)
    gen = torch.Generator().manual_seed(4)
    targets = ["s2l2a", "dem", "landcover_nlcd", "location"]
    inputs = _repeated(_inputs(config, gen, targets, ["s1grd", "time"]), 3, gen)
    gsd = GSD.repeat_interleave(3)
    with torch.no_grad():
        each = model(inputs, gsd)
        shared = model(inputs, gsd, repeats=3)
    assert set(shared) == set(each)
    for name in targets:
        for a, b in zip(_tensors(each, name), _tensors(shared, name), strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), name
    # the three rows of a window are three different samples
    s2 = shared["s2l2a"]["r10m"]
    assert not torch.allclose(s2[0], s2[1]) and not torch.allclose(s2[1], s2[2])
    with pytest.raises(TerrasynthError, match="whole groups"):
        model(inputs, gsd, repeats=4)


# -- precision ---------------------------------------------------------------------------------
def _run(model: ConvGenerator, precision: str, inputs: dict) -> dict:
    model.precision = precision
    with torch.no_grad():
        return model(inputs, GSD)


@needs_data
def test_bfloat16_convolutions_move_samples_by_a_small_fraction_of_their_size(config):
    model = _model(config)
    inputs = _inputs(config, torch.Generator().manual_seed(3), ["s2l2a", "dem"], ["s1grd"])
    full, fast = _run(model, "float32", inputs), _run(model, "bfloat16", inputs)
    for name in ("s2l2a", "dem"):
        for a, b in zip(_tensors(full, name), _tensors(fast, name), strict=True):
            assert b.dtype == torch.float32  # the heads and levels stay float32
            rel = float((a - b).abs().mean() / a.abs().mean())
            assert 0 < rel < 0.03, (name, rel)  # bf16 ran (not equal) and moved little


@needs_data
def test_training_runs_in_float32_whatever_the_precision(config):
    model = _model(config).train()
    inputs = _inputs(config, torch.Generator().manual_seed(4), ["s2l2a"], ["s1grd"])
    assert _same(_run(model, "float32", inputs), _run(model, "bfloat16", inputs), "s2l2a")


@needs_data
@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bfloat16_only_where_the_device_runs_it_natively(
    config, monkeypatch, native
):
    monkeypatch.setattr("terrasynth.models.conv_generator.native_bf16", lambda device: native)
    model = _model(config)
    inputs = _inputs(config, torch.Generator().manual_seed(5), ["s2l2a"], ["s1grd"])
    auto = _run(model, "auto", inputs)
    assert _same(auto, _run(model, "bfloat16" if native else "float32", inputs), "s2l2a")
    assert not _same(auto, _run(model, "float32" if native else "bfloat16", inputs), "s2l2a")


@needs_data
def test_an_unknown_precision_is_refused(config):
    model = _model(config)
    inputs = _inputs(config, torch.Generator().manual_seed(6), ["s2l2a"], ["s1grd"])
    with pytest.raises(TerrasynthError, match="unknown precision 'float16'"):
        _run(model, "float16", inputs)
