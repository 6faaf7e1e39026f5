"""Sampling: the flow sampler's schedule and steps, and conditional generation on real chips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from terrasynth.data.dataset import ChipDataset, RandomCropFlip, collate_chips
from terrasynth.models.config import ModelConfig
from terrasynth.models.scene_model import SceneModel
from terrasynth.models.signals import batch_signals
from terrasynth.sampling.conditional import generate
from terrasynth.sampling.flow import FlowSampler
from tests.conftest import MICRO_MODEL

TINY = MICRO_MODEL
pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_data = pytest.mark.needs_data


# -- the sampler (pure maths) ---------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_timesteps_fall_from_one_to_zero(steps, shift):
    ts = FlowSampler(steps=steps, shift=shift).timesteps()
    assert ts.shape == (steps + 1,)
    assert float(ts[0]) == pytest.approx(1.0) and float(ts[-1]) == 0.0
    assert (ts[1:] < ts[:-1]).all()


def test_shift_spends_more_steps_at_high_noise():
    plain = FlowSampler(steps=8).timesteps()
    shifted = FlowSampler(steps=8, shift=3.0).timesteps()
    assert (shifted[1:-1] > plain[1:-1]).all()


def test_deterministic_step_with_perfect_prediction_follows_the_path():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    sampler = FlowSampler(steps=4)
    ts = sampler.timesteps()
    x = noise.clone()  # t = 1
    for i in range(sampler.steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        x = sampler.step(x0, x, t, t_next)
        # with the exact x0 the ODE stays on the straight path from noise to x0
        torch.testing.assert_close(x, (1 - t_next) * x0 + t_next * noise)
    torch.testing.assert_close(x, x0)
    assert sampler.step(x0, noise, 0.5, 0.0) is x0


def test_stochastic_step_uses_the_generator():
    x0, xt = torch.zeros(1, 8), torch.ones(1, 8)
    s = FlowSampler(eta=0.5)
    a = s.step(x0, xt, 0.5, 0.25, torch.Generator().manual_seed(1))
    b = s.step(x0, xt, 0.5, 0.25, torch.Generator().manual_seed(1))
    c = s.step(x0, xt, 0.5, 0.25, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # with eta = 0 the same step is the deterministic one
    torch.testing.assert_close(FlowSampler().step(x0, xt, 0.5, 0.25), 0.25 * xt / 0.5)


# -- conditional generation -----------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(small_store):
    ds = ChipDataset(small_store, split="train", transform=RandomCropFlip(16, 64, seed=0))
    src = ds.store.table["source"].to_numpy()[ds.indices]
    pick = list(np.flatnonzero(src == "band_folder")[:2]) + list(
        np.flatnonzero(src == "bigearthnet_v1")[:2]
    )
    batch = collate_chips([ds[int(i)] for i in pick])
    reg = ds.registry
    cfg = ModelConfig({m: reg[m].to_dict() for m in ds.modalities}, ds.store.stats, **TINY)
    torch.manual_seed(0)
    model = SceneModel(cfg).eval()
    with torch.no_grad():  # open the adaLN-Zero gates so the blocks do something
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model, batch_signals(batch, cfg, ds.modalities), batch["gsd"]


def _run(setup, seed=0, **kw):
    model, sig, gsd = setup
    kw.setdefault("targets", ["landsat8", "landcover_nlcd", "corine"])
    kw.setdefault("conditions", ["dem", "s2l2a", "location", "time"])
    return generate(
        model,
        sig,
        kw.pop("targets"),
        kw.pop("conditions"),
        gsd,
        kw.pop("sampler", FlowSampler(steps=2)),
        torch.Generator().manual_seed(seed),
        **kw,
    )


def _values(out) -> list[torch.Tensor]:
    vals = []
    for n in sorted(out):
        g = out[n]
        for d in (g.groups, g.probs):
            if d is not None:
                vals += [d[k] for k in sorted(d)]
        if g.vector is not None:
            vals.append(g.vector)
    return vals


@needs_data
def test_generate_shapes_and_kinds(setup):
    out = _run(setup)
    assert set(out) == {"landsat8", "landcover_nlcd", "corine"}
    assert out["landsat8"].groups["r30m"].shape == (4, 7, 16, 16)
    assert out["landsat8"].probs is None and out["landsat8"].vector is None
    probs = out["landcover_nlcd"].probs["r30m"]
    assert probs.shape == (4, 18, 16, 16) and out["landcover_nlcd"].groups is None
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(4, 16, 16))
    assert out["corine"].vector.shape == (4, 44)
    assert all(torch.isfinite(v).all() for v in _values(out))


@needs_data
def test_generate_is_reproducible_per_seed(setup):
    a, b, c = _run(setup, 0), _run(setup, 0), _run(setup, 1)
    for x, y in zip(_values(a), _values(b), strict=True):
        assert torch.equal(x, y)
    assert any(not torch.allclose(x, z) for x, z in zip(_values(a), _values(c), strict=True))


@needs_data
def test_stochastic_sampler_is_reproducible_per_seed(setup):
    s = FlowSampler(steps=3, eta=0.7)
    a, b = _run(setup, 5, sampler=s), _run(setup, 5, sampler=s)
    for x, y in zip(_values(a), _values(b), strict=True):
        assert torch.equal(x, y)


@needs_data
def test_guidance(setup):
    plain = _run(setup, 3)
    guided = _run(setup, 3, guidance=3.0)
    vals = _values(guided)
    assert [v.shape for v in vals] == [v.shape for v in _values(plain)]
    assert all(torch.isfinite(v).all() for v in vals)
    torch.testing.assert_close(guided["landcover_nlcd"].probs["r30m"].sum(1), torch.ones(4, 16, 16))
    assert any(not torch.allclose(x, y) for x, y in zip(vals, _values(plain), strict=True))


@needs_data
def test_conditions_matter(setup):
    """Without the gates opened the check below could not fail; with them, conditions count."""
    a = _run(setup, 0, targets=["landsat8"], conditions=["dem", "location"])
    b = _run(setup, 0, targets=["landsat8"], conditions=["location"])
    assert not torch.allclose(a["landsat8"].groups["r30m"], b["landsat8"].groups["r30m"])


@needs_data
def test_band_infilling_keeps_shapes(setup):
    given = {
        "s2l2a": {
            "r10m": torch.tensor([1.0, 1.0, 1.0, 0.0])[None, :, None, None].expand(4, -1, -1, -1)
        }
    }
    out = _run(setup, 0, targets=["s2l2a"], conditions=["s1grd", "location"], given_bands=given)
    shapes = {g: tuple(x.shape) for g, x in out["s2l2a"].groups.items()}
    assert shapes == {"r10m": (4, 4, 16, 16), "r20m": (4, 6, 8, 8), "r60m": (4, 2, 4, 4)}
    assert all(torch.isfinite(v).all() for v in _values(out))
    plain = _run(setup, 0, targets=["s2l2a"], conditions=["s1grd", "location"])
    # the BigEarthNet chips (2, 3) hold S2: the given bands change what is generated
    assert not torch.allclose(out["s2l2a"].groups["r10m"][2:], plain["s2l2a"].groups["r10m"][2:])
