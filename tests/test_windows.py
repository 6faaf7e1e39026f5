"""Overlapping-window sampling of scenes larger than the model's window."""

from __future__ import annotations

import pytest
import torch

from terrasynth.modalities import default_registry
from terrasynth.models.config import ModelConfig
from terrasynth.models.conv_generator import ConvGenerator
from terrasynth.models.scene_model import SceneModel
from terrasynth.models.signals import Signal
from terrasynth.sampling.flow import FlowSampler
from terrasynth.sampling.windows import blend_weight, sample_scene, window_offsets
from tests.conftest import MICRO_CONV, MICRO_MODEL


def test_window_offsets_cover_the_scene_with_a_flush_last_window():
    assert window_offsets(16, 16, 8) == [0]
    assert window_offsets(10, 16, 8) == [0]
    assert window_offsets(40, 16, 8) == [0, 8, 16, 24]
    offs = window_offsets(44, 16, 8)
    assert offs[-1] == 28 and offs[-1] + 16 == 44
    covered = torch.zeros(44, dtype=torch.bool)
    for o in offs:
        covered[o : o + 16] = True
    assert covered.all()


def test_blend_weight_peaks_in_the_middle_and_stays_positive():
    w = blend_weight(16)
    assert w.shape == (16, 16)
    assert float(w.min()) > 0
    assert float(w[7:9, 7:9].min()) > 0.9 > float(w[0, 0])
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))


@pytest.fixture(scope="module")
def micro():
    reg = default_registry()
    cfg = ModelConfig(
        modalities={m: reg[m].to_dict() for m in ("s1grd", "dem", "landcover_nlcd")},
        **MICRO_MODEL,
    )
    torch.manual_seed(0)
    return SceneModel(cfg).eval()


def _scene(h: int, w: int) -> dict[str, Signal]:
    one = torch.ones(1, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    s1 = torch.randn(1, 2, h, w, generator=g)
    return {
        "s1grd": Signal(one, groups={"r10m": s1}, known={"r10m": torch.ones_like(s1)}),
        "dem": Signal(
            one,
            groups={"r30m": torch.zeros(1, 1, h, w)},
            known={"r30m": torch.zeros(1, 1, h, w)},
        ),
        "landcover_nlcd": Signal(
            one,
            groups={"r30m": torch.zeros(1, 18, h, w)},
            known={"r30m": torch.zeros(1, 18, h, w)},
            target={"r30m": torch.full((1, h, w), -1)},
        ),
        "location": Signal(one, vector=torch.tensor([[0.6, 0.0, 0.8]]), known=torch.ones(1, 3)),
    }


def test_sample_scene_shapes_and_reproducibility(micro):
    scene = _scene(40, 24)
    calls = []

    def run(seed: int):
        return sample_scene(
            micro,
            scene,
            ["dem", "landcover_nlcd", "location"],
            gsd=30.0,
            num_samples=3,
            sampler=FlowSampler(steps=3),
            generator=torch.Generator().manual_seed(seed),
            batch_size=5,
            on_step=lambda done, total: calls.append((done, total)),
        )

    a, b, c = run(0), run(0), run(1)
    dem = a["dem"].groups["r30m"]
    assert dem.shape == (3, 1, 40, 24) and torch.isfinite(dem).all()
    assert torch.equal(dem, b["dem"].groups["r30m"])  # same seed, same samples
    assert not torch.equal(dem, c["dem"].groups["r30m"])
    assert not torch.allclose(dem[0], dem[1])  # samples differ
    probs = a["landcover_nlcd"].probs["r30m"]
    assert probs.shape == (3, 18, 40, 24)
    assert torch.allclose(probs.sum(1), torch.ones(3, 40, 24), atol=1e-4)
    assert a["location"].vector.shape == (3, 3)
    assert calls[-1][0] == calls[-1][1] == 3 * -(-4 * 2 * 3 // 5)  # 4x2 windows, 3 samples


def test_one_window_scene_equals_plain_generation_shapes(micro):
    out = sample_scene(micro, _scene(16, 16), ["dem"], gsd=30.0, num_samples=2)
    assert out["dem"].groups["r30m"].shape == (2, 1, 16, 16)


def test_band_infilling_keeps_the_given_band(micro):
    scene = _scene(24, 24)
    given = {"s1grd": {"r10m": torch.tensor([1.0, 0.0])[None, :, None, None]}}
    out = sample_scene(
        micro, scene, ["s1grd"], gsd=10.0, num_samples=2, given_bands=given,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    x = out["s1grd"].groups["r10m"]
    vv = scene["s1grd"].groups["r10m"][0, 0]
    assert torch.allclose(x[:, 0], vv.expand(2, -1, -1), atol=1e-5)  # VV given: kept
    assert not torch.allclose(x[:, 1], scene["s1grd"].groups["r10m"][0, 1].expand(2, -1, -1))


def test_independent_tiles_cover_the_scene(micro):
    from terrasynth.sampling.windows import sample_independent_tiles

    out = sample_independent_tiles(
        micro, _scene(40, 24), ["dem", "landcover_nlcd"], gsd=30.0, num_samples=2,
        sampler=FlowSampler(steps=2), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    dem = out["dem"].groups["r30m"]
    assert dem.shape == (2, 1, 40, 24) and torch.isfinite(dem).all()
    probs = out["landcover_nlcd"].probs["r30m"]
    assert torch.allclose(probs.sum(1), torch.ones(2, 40, 24), atol=1e-4)


def test_noise_field_crops_are_reproducible_pieces_of_one_field():
    from terrasynth.sampling.windows import NoiseField

    field = NoiseField(seed=3, stream="dem/r30m/start/0", channels=2)
    whole = field.crop(0, 0, 150, 130)
    assert whole.shape == (2, 150, 130)
    assert torch.equal(field.crop(70, 40, 50, 60), whole[:, 70:120, 40:100])  # any crop
    again = NoiseField(3, "dem/r30m/start/0", 2).crop(0, 0, 150, 130)
    assert torch.equal(whole, again)
    assert not torch.equal(whole, NoiseField(4, "dem/r30m/start/0", 2).crop(0, 0, 150, 130))
    assert abs(float(whole.mean())) < 0.02 and abs(float(whole.std()) - 1) < 0.02


def test_results_do_not_depend_on_how_windows_are_batched(micro):
    def run(batch_size: int):
        return sample_scene(
            micro, _scene(40, 24), ["dem"], gsd=30.0, num_samples=2,
            sampler=FlowSampler(steps=3, eta=0.5), batch_size=batch_size,
            generator=torch.Generator().manual_seed(5),
        )["dem"].groups["r30m"]  # fmt: skip

    assert torch.allclose(run(3), run(64), atol=1e-5)


def test_samples_of_a_window_share_one_call_with_the_same_result():
    reg = default_registry()
    cfg = ModelConfig(
        backbone="conv_generator",
        modalities={m: reg[m].to_dict() for m in ("s1grd", "dem", "landcover_nlcd")},
        **{**MICRO_CONV, "image_size": 16, "retrieval_k": 0},
    )
    torch.manual_seed(0)
    model = ConvGenerator(cfg).eval()
    assert model.shares_conditions

    def run(shared: bool) -> tuple[dict, int]:
        model.shares_conditions = shared  # on this instance only
        calls = []
        out = sample_scene(
            model, _scene(40, 24), ["dem", "landcover_nlcd"], gsd=30.0, num_samples=3,
            sampler=FlowSampler(steps=1), generator=torch.Generator().manual_seed(2),
            batch_size=5,
            on_step=lambda done, total: calls.append((done, total)),
        )  # fmt: skip
        assert calls[-1][0] == calls[-1][1]  # progress counts the calls made
        return out, calls[-1][1]

    apart, calls_apart = run(False)
    shared, calls_shared = run(True)
    # 4 x 2 windows of 3 samples: 24 rows in 5 calls of 5, or one window's 3 samples a call
    assert (calls_apart, calls_shared) == (5, 8)
    dem = shared["dem"].groups["r30m"]
    assert torch.allclose(dem, apart["dem"].groups["r30m"], atol=1e-5)
    assert not torch.allclose(dem[0], dem[1])
    probs = shared["landcover_nlcd"].probs["r30m"]
    assert torch.allclose(probs, apart["landcover_nlcd"].probs["r30m"], atol=1e-5)
