"""The scene model: shapes per modality kind, attention masking, persistence, embeddings."""

from __future__ import annotations

import pytest
import torch

from terrasynth.data.store import ChipStore
from terrasynth.errors import TerrasynthError
from terrasynth.models.config import ModelConfig
from terrasynth.models.scene_model import (
    ModalityInput,
    SceneModel,
    ground_position_embedding,
    patch_contrast,
    timestep_embedding,
)
from tests.conftest import MICRO_MODEL, open_zero_layers

pytestmark = [pytest.mark.needs_data, pytest.mark.usefixtures("one_torch_thread")]

TINY = MICRO_MODEL
B = 2


@pytest.fixture(scope="module")
def config(small_store) -> ModelConfig:
    store = ChipStore.open(small_store)
    reg = store.registry
    mods = {m: reg[m].to_dict() for m in store.modalities}
    return ModelConfig(modalities=mods, stats=store.stats, **TINY)


def _model(config: ModelConfig, seed: int = 0) -> SceneModel:
    """A model whose adaLN-Zero gates are opened, so every block really mixes tokens."""
    torch.manual_seed(seed)
    return open_zero_layers(SceneModel(config).eval())


def _inputs(config: ModelConfig, gen: torch.Generator, present=None) -> dict[str, ModalityInput]:
    size = config.image_size
    out = {}
    for mod in config.raster_modalities():
        groups = {}
        for g in mod.groups:
            ch = mod.num_classes if mod.kind == "categorical" else len(g.bands)
            h = size // g.factor
            groups[g.name] = torch.randn(B, 3 * ch, h, h, generator=gen)
        t = torch.rand(B, generator=gen)
        out[mod.name] = ModalityInput(t, torch.ones(B, dtype=torch.bool), groups=groups)
    for name, n in config.vector_modalities().items():
        vec = torch.randn(B, 3 * n, generator=gen)
        out[name] = ModalityInput(
            torch.rand(B, generator=gen), torch.ones(B, dtype=torch.bool), vector=vec
        )
    for name, p in (present or {}).items():
        out[name].present = torch.tensor(p)
    return out


GSD = torch.tensor([10.0, 30.0])


def test_forward_shapes_for_every_kind(config):
    model = _model(config)
    inputs = _inputs(config, torch.Generator().manual_seed(0))
    out = model(inputs, GSD)
    assert set(out) == set(inputs)
    reg = config.registry
    # continuous, several resolutions: every group comes back at its own resolution
    s2 = out["s2l2a"]
    assert s2["r10m"].shape == (B, 4, 16, 16)
    assert s2["r20m"].shape == (B, 6, 8, 8)
    assert s2["r60m"].shape == (B, 2, 4, 4)
    # categorical: K logit planes
    k = reg["landcover_nlcd"].num_classes
    assert out["landcover_nlcd"]["r30m"].shape == (B, k, 16, 16)
    assert out["landcover_lulc"]["r10m"].shape == (B, reg["landcover_lulc"].num_classes, 16, 16)
    assert out["dem"]["r30m"].shape == (B, 1, 16, 16)
    # one-token modalities
    assert out["corine"].shape == (B, 44)
    assert out["location"].shape == (B, 3)
    assert out["time"].shape == (B, 3)
    for v in out.values():
        for x in v.values() if isinstance(v, dict) else [v]:
            assert torch.isfinite(x).all()


def test_subset_of_modalities_and_unknown_modality(config):
    model = _model(config)
    inputs = _inputs(config, torch.Generator().manual_seed(0))
    sub = {k: inputs[k] for k in ("dem", "location")}
    out = model(sub, GSD)
    assert set(out) == {"dem", "location"}
    with pytest.raises(TerrasynthError, match="does not know modality 'nope'"):
        model({"nope": inputs["dem"]}, GSD)


def _flat(out: dict, skip: str, sample: int) -> torch.Tensor:
    parts = []
    for name, v in out.items():
        if name == skip:
            continue
        for x in v.values() if isinstance(v, dict) else [v]:
            parts.append(x[sample].flatten())
    return torch.cat(parts)


@pytest.mark.parametrize("changed", ["s2l2a", "corine", "dem"])
@pytest.mark.parametrize("context", [False, True])
def test_absent_modality_does_not_leak_into_others(config, changed, context):
    """Sample 0 lacks ``changed``, sample 1 holds it: only sample 1 may react to its input."""
    if context:  # the pixel-level path from every modality's given pixels to every refiner
        config = ModelConfig.from_dict(
            {**config.to_dict(), "refine_channels": 8, "patch_contrast": True, "pixel_context": 4}
        )
    model = _model(config)
    inputs = _inputs(config, torch.Generator().manual_seed(1), present={changed: [False, True]})
    with torch.no_grad():
        before = model(inputs, GSD)
        other = _inputs(config, torch.Generator().manual_seed(2), present={changed: [False, True]})
        inputs[changed] = other[changed]  # new values and noise level for both samples
        after = model(inputs, GSD)
    torch.testing.assert_close(_flat(after, changed, 0), _flat(before, changed, 0))
    # the present sample does see it (otherwise the check above proves nothing)
    assert not torch.allclose(_flat(after, changed, 1), _flat(before, changed, 1), atol=1e-4)


def test_masking_a_modality_equals_leaving_it_out(config):
    model = _model(config)
    inputs = _inputs(config, torch.Generator().manual_seed(3))
    inputs["dem"].present = torch.zeros(B, dtype=torch.bool)
    with torch.no_grad():
        masked = model(inputs, GSD)
        without = model({k: v for k, v in inputs.items() if k != "dem"}, GSD)
    for name, v in without.items():
        for a, b in zip(
            v.values() if isinstance(v, dict) else [v],
            masked[name].values() if isinstance(v, dict) else [masked[name]],
            strict=True,
        ):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_save_and_load_give_identical_outputs(config, tmp_path):
    model = _model(config)
    inputs = _inputs(config, torch.Generator().manual_seed(4))
    folder = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = SceneModel.from_pretrained(folder).eval()
    assert loaded.num_parameters() == model.num_parameters()
    with torch.no_grad():
        a, b = model(inputs, GSD), loaded(inputs, GSD)
    for name in a:
        xs = a[name].values() if isinstance(a[name], dict) else [a[name]]
        ys = b[name].values() if isinstance(b[name], dict) else [b[name]]
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y)


def test_from_pretrained_needs_config_and_weights(config, tmp_path):
    with pytest.raises(TerrasynthError, match="no config.json and model.safetensors"):
        SceneModel.from_pretrained(tmp_path)
    _model(config).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(TerrasynthError):
        SceneModel.from_pretrained(tmp_path / "m")


def test_embedding_shapes():
    t = torch.tensor([0.0, 0.25, 1.0])
    assert timestep_embedding(t, 32).shape == (3, 32)
    assert timestep_embedding(torch.rand(2, 5), 32).shape == (2, 5, 32)
    e = timestep_embedding(t, 32)
    assert not torch.allclose(e[0], e[1]) and not torch.allclose(e[1], e[2])
    xy = torch.randn(2, 7, 2) * 1000
    assert ground_position_embedding(xy, 32).shape == (2, 7, 32)
    assert ground_position_embedding(xy, 32).abs().max() <= 1.0


def test_position_embedding_is_in_ground_metres():
    # the same pixel offset at 10 m and 30 m lies at different ground distances
    px = torch.tensor([[3.0, -2.0]])
    at10 = ground_position_embedding(px * 10.0, 64)
    at30 = ground_position_embedding(px * 30.0, 64)
    assert not torch.allclose(at10, at30, atol=1e-3)
    # x and y are embedded separately: swapping them changes the embedding
    assert not torch.allclose(at10, ground_position_embedding(px.flip(-1) * 10.0, 64))
    # the same ground offset is the same embedding whatever the pixel size
    torch.testing.assert_close(
        ground_position_embedding(torch.tensor([[90.0, -60.0]]), 64), at30, atol=1e-5, rtol=0
    )


def test_gsd_changes_token_positions(config):
    model = _model(config)
    groups = _inputs(config, torch.Generator().manual_seed(5))["landsat8"].groups
    same = {g: x[:1].expand(2, -1, -1, -1) for g, x in groups.items()}  # one chip, twice
    tok, grid = model._embed_raster("landsat8", same, torch.tensor([10.0, 30.0]))
    assert grid == (2, 2)
    assert tok.shape == (2, 4, config.dim)
    assert not torch.allclose(tok[0], tok[1], atol=1e-4)
    tok2, _ = model._embed_raster("landsat8", same, torch.tensor([30.0, 30.0]))
    torch.testing.assert_close(tok2[0], tok2[1])


def test_patch_contrast_is_free_of_offset_and_scale():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    ones = torch.ones_like(x)
    a = patch_contrast(x, ones, 8, eps=1e-6)
    b = patch_contrast(5.0 + 1e-2 * x, ones, 8, eps=1e-6)  # 1 % of the relief, offset
    assert a.shape == (2, 6, 16, 16)
    torch.testing.assert_close(b[:, :3], a[:, :3], atol=1e-3, rtol=1e-3)  # same shape
    torch.testing.assert_close(
        b[:, 3:] - a[:, 3:], torch.full_like(a[:, 3:], -2.0), atol=1e-3, rtol=0
    )
    patches = a[:, :3].unfold(2, 8, 8).unfold(3, 8, 8)  # (B, C, 2, 2, 8, 8)
    torch.testing.assert_close(patches.mean((-1, -2)), torch.zeros(2, 3, 2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        patches.pow(2).mean((-1, -2)), torch.ones(2, 3, 2, 2), atol=1e-4, rtol=0
    )


def test_patch_contrast_ignores_masked_out_pixels():
    """A flat field beside nodata (stored as 0) has no contrast; only real values count."""
    x = torch.zeros(1, 1, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    x[..., :3, :] = -0.5  # three valid rows at one elevation, the rest nodata
    mask[..., :3, :] = 1.0
    out = patch_contrast(x, mask, 8, eps=1e-3)
    assert out[:, 0].abs().max() == 0  # no detail
    torch.testing.assert_close(out[0, 1, :3], torch.full((3, 8), -3.0))  # log10(eps): flat
    assert out[0, 1, 3:].abs().max() == 0  # nothing where the mask is 0
    x[..., 0, 0] = -0.49  # one bump of 1 % of the normalised range
    out = patch_contrast(x, mask, 8, eps=1e-3)
    assert float(out[0, 0, 0, 0]) > 3 and float(out[0, 1, 0, 0]) > -3


def test_patch_contrast_lets_tokens_see_faint_relief(config):
    """Metres of relief on a DEM normalised by a kilometre: tokens must still tell it apart."""
    gen = torch.Generator().manual_seed(7)
    relief = 1e-3 * torch.randn(1, 1, 16, 16, generator=gen)  # about 1 m in normalised units
    flat = torch.full((1, 1, 16, 16), 0.7)
    x = lambda v: torch.cat([v, v, torch.ones_like(v)], 1)  # noisy, given, mask  # noqa: E731
    change = {}
    for contrast in (False, True):
        cfg = ModelConfig.from_dict({**config.to_dict(), "patch_contrast": contrast})
        model = _model(cfg)
        assert ("dem__r30m" in model.contrast) == contrast
        gsd = torch.tensor([30.0])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            a, _ = model._embed_raster("dem", {"r30m": x(flat)}, gsd)
            b, _ = model._embed_raster("dem", {"r30m": x(flat + relief)}, gsd)
        change[contrast] = float((a.float() - b.float()).norm() / a.float().norm())
    assert change[False] < 0.01  # without it the relief is all but lost
    assert change[True] > 0.1
    assert not any(k.startswith("landcover") for k in model.contrast)  # continuous only


def test_pixel_context_carries_a_given_pixel_to_another_modality(config):
    """With pixel_context, one changed DEM pixel changes the Landsat output near that pixel."""
    cfg = ModelConfig.from_dict(
        {**config.to_dict(), "refine_channels": 8, "patch_contrast": True, "pixel_context": 4}
    )
    model = _model(cfg)
    gen = torch.Generator().manual_seed(8)
    inputs = _inputs(cfg, gen)
    inputs = {k: inputs[k] for k in ("dem", "landsat8")}
    dem = inputs["dem"].groups["r30m"]
    dem[:, 2:] = 1.0  # the DEM is a condition: given values are its values
    dem[:, 1] = dem[:, 0]
    with torch.no_grad():
        before = model(inputs, GSD)["landsat8"]["r30m"]
        dem[:, 1, 5, 5] += 1.0
        after = model(inputs, GSD)["landsat8"]["r30m"]
    change = (after - before).abs()[0, 0]
    assert change[5, 5] > 0
    assert change.max() == change[4:7, 4:7].max()  # strongest at and next to the pixel
    with pytest.raises(TerrasynthError, match="pixel_context needs refine_channels"):
        ModelConfig.from_dict({**cfg.to_dict(), "refine_channels": 0}).validate()


@pytest.mark.parametrize("blind", [False, True])
def test_blind_at_pure_noise_ignores_the_noise_draw_at_t_1_only(config, blind):
    """With blind_at_pure_noise, x0 predicted at t = 1 depends on the conditions alone."""
    cfg = ModelConfig.from_dict(
        {**config.to_dict(), "refine_channels": 8, "blind_at_pure_noise": blind}
    )
    model = _model(cfg)
    inputs = _inputs(cfg, torch.Generator().manual_seed(9))
    inputs = {k: inputs[k] for k in ("dem", "landsat8", "location")}
    target = inputs["landsat8"]
    target.t = torch.tensor([1.0, 0.6])
    redrawn = {
        k: ModalityInput(v.t, v.present, dict(v.groups or {}) or None, v.vector)
        for k, v in inputs.items()
    }
    c = target.groups["r30m"].shape[1] // 3
    x = target.groups["r30m"].clone()
    x[:, :c] = torch.randn(x[:, :c].shape, generator=torch.Generator().manual_seed(10))
    redrawn["landsat8"].groups["r30m"] = x  # a new noise draw, same conditions
    with torch.no_grad():
        a, b = model(inputs, GSD), model(redrawn, GSD)
    diff = (a["landsat8"]["r30m"] - b["landsat8"]["r30m"]).abs().flatten(1).amax(1)
    assert diff[1] > 0  # at t < 1 the noisy values carry information and are used
    assert (diff[0] == 0) == blind  # at t = 1 only a blind model ignores them
    assert torch.equal(a["dem"]["r30m"][0], b["dem"]["r30m"][0]) == blind
