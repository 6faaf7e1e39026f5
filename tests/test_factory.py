"""Models by backbone: building, saving and loading any model, the protocol they share, and
the sampler steps each takes."""

from __future__ import annotations

import json

import pytest
import torch

from terrasynth.data.store import ChipStore
from terrasynth.errors import TerrasynthError
from terrasynth.models.base import GenerativeModel, sampling_steps
from terrasynth.models.config import (
    BACKBONES,
    CONV_PRESETS,
    UNET_PRESETS,
    ModelConfig,
    preset_config,
)
from terrasynth.models.conv_generator import ConvGenerator
from terrasynth.models.factory import MODEL_CLASSES, build_model, load_model
from terrasynth.models.scene_model import ModalityInput, SceneModel
from terrasynth.models.unet import UNet
from terrasynth.pipeline import default_model_path
from tests.conftest import MICRO_CONV, MICRO_MODEL, MICRO_UNET

pytestmark = [pytest.mark.needs_data, pytest.mark.usefixtures("one_torch_thread")]

B = 2
GSD = torch.tensor([10.0, 30.0])


@pytest.fixture(scope="module")
def store_modalities(small_store) -> tuple[dict, dict]:
    store = ChipStore.open(small_store)
    reg = store.registry
    return {m: reg[m].to_dict() for m in store.modalities}, store.stats


def _config(store_modalities, backbone: str, **kw) -> ModelConfig:
    mods, stats = store_modalities
    sizes = {"conv_generator": MICRO_CONV, "unet": MICRO_UNET}.get(backbone, MICRO_MODEL)
    return ModelConfig(backbone=backbone, modalities=mods, stats=stats, **{**sizes, **kw})


def _inputs(config: ModelConfig, seed: int) -> dict[str, ModalityInput]:
    """s2l2a and dem generated at t = 1 from Sentinel-1 given at t = 0."""
    gen = torch.Generator().manual_seed(seed)
    reg, size, out = config.registry, config.image_size, {}
    for name, t in (("s2l2a", 1.0), ("dem", 1.0), ("s1grd", 0.0)):
        groups = {}
        for g in reg[name].groups:
            h = size // g.factor
            x = torch.randn(B, len(g.bands), h, h, generator=gen)
            shown = torch.full_like(x, 1.0 - t)
            groups[g.name] = torch.cat([x, x * shown, shown], 1)
        out[name] = ModalityInput(torch.full((B,), t), torch.ones(B, dtype=torch.bool), groups)
    return out


def _saved_conv(store_modalities, folder):
    return build_model(_config(store_modalities, "conv_generator")).save_pretrained(folder)


def _outputs_equal(a: dict, b: dict) -> bool:
    assert set(a) == set(b)
    return all(torch.equal(a[n][g], b[n][g]) for n in a for g in a[n])


def test_every_backbone_has_a_class():
    assert set(MODEL_CLASSES) == set(BACKBONES)
    assert MODEL_CLASSES["conv_generator"] is ConvGenerator
    assert MODEL_CLASSES["scene_transformer"] is SceneModel
    assert MODEL_CLASSES["unet"] is UNet


@pytest.mark.parametrize(
    "backbone, cls, steps",
    [("conv_generator", ConvGenerator, 1), ("scene_transformer", SceneModel, 8), ("unet", UNet, 1)],
)
def test_build_model_picks_the_class_of_the_backbone(store_modalities, backbone, cls, steps):
    model = build_model(_config(store_modalities, backbone))
    assert type(model) is cls
    assert isinstance(model, GenerativeModel)  # the protocol samplers and trainer rely on
    assert model.default_steps == steps
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0
    with torch.no_grad():
        out = model.eval()(_inputs(model.config, 0), GSD)
    h = model.config.image_size // 2
    assert out["s2l2a"]["r20m"].shape == (B, 6, h, h)


def test_unknown_backbone_is_refused(store_modalities, tmp_path):
    cfg = _config(store_modalities, "scene_transformer")
    cfg.backbone = "diffusion_unet"
    with pytest.raises(TerrasynthError, match="unknown backbone 'diffusion_unet'"):
        build_model(cfg)
    with pytest.raises(TerrasynthError, match="unknown backbone"):
        preset_config("tiny", *store_modalities, backbone="diffusion_unet")
    # a saved model whose config names a backbone this version lacks
    folder = _saved_conv(store_modalities, tmp_path / "m")
    d = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**d, "backbone": "diffusion_unet"}))
    with pytest.raises(TerrasynthError, match="unknown backbone 'diffusion_unet'"):
        load_model(folder)


def test_conv_generator_round_trip_gives_identical_outputs(store_modalities, tmp_path):
    cfg = _config(store_modalities, "conv_generator", spread_scale={"s2l2a": 0.7})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # move every weight off its initial value (zero FiLM layers too)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = model.save_pretrained(tmp_path / "conv")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((folder / "config.json").read_text())
    assert saved["backbone"] == "conv_generator"
    assert saved["widths"] == MICRO_CONV["widths"] and saved["spread_scale"] == {"s2l2a": 0.7}
    loaded = load_model(folder).eval()
    assert type(loaded) is ConvGenerator
    as_json = lambda c: json.loads(json.dumps(c.to_dict()))  # noqa: E731  (legend codes: str)
    assert as_json(loaded.config) == as_json(model.config)
    assert dict(loaded.config.registry) == dict(model.config.registry)
    assert loaded.num_parameters() == model.num_parameters()
    inputs = _inputs(cfg, 1)
    with torch.no_grad():
        assert _outputs_equal(model(inputs, GSD), loaded(inputs, GSD))
        ma, sa = model(inputs, GSD, members=3, generator=torch.Generator().manual_seed(5))
        mb, sb = loaded(inputs, GSD, members=3, generator=torch.Generator().manual_seed(5))
    assert _outputs_equal(ma, mb)
    assert all(_outputs_equal(a, b) for a, b in zip(sa, sb, strict=True))
    # the class's own from_pretrained reads the same folder
    assert type(ConvGenerator.from_pretrained(folder)) is ConvGenerator


def test_scene_transformer_round_trip_through_load_model(store_modalities, tmp_path):
    torch.manual_seed(0)
    model = build_model(_config(store_modalities, "scene_transformer")).eval()
    folder = model.save_pretrained(tmp_path / "st")
    assert json.loads((folder / "config.json").read_text())["backbone"] == "scene_transformer"
    loaded = load_model(folder).eval()
    assert type(loaded) is SceneModel
    inputs = _inputs(model.config, 2)
    with torch.no_grad():
        a, b = model(inputs, GSD), loaded(inputs, GSD)
    assert all(torch.equal(a[n][g], b[n][g]) for n in ("s2l2a", "dem") for g in a[n])


def test_unet_round_trip_through_load_model(store_modalities, tmp_path):
    torch.manual_seed(0)
    model = build_model(_config(store_modalities, "unet")).eval()
    folder = model.save_pretrained(tmp_path / "unet")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["backbone"] == "unet" and saved["widths"] == MICRO_UNET["widths"]
    loaded = load_model(folder).eval()
    assert type(loaded) is UNet and loaded.default_steps == 1
    inputs = _inputs(model.config, 3)
    with torch.no_grad():
        a, b = model(inputs, GSD), loaded(inputs, GSD)
    assert set(a) == {"s2l2a", "dem"}  # generated (t > 0) only; s1grd is given
    assert _outputs_equal(a, b)
    for asked in (None, 4):
        assert sampling_steps(loaded, asked) == 1


def test_old_unet_configs_read_as_unet_configs(store_modalities):
    """A U-Net folder's config.json from before the U-Net was a backbone."""
    mods, stats = store_modalities
    old = {"modalities": mods, "stats": stats, "image_size": 32, "widths": [8, 16], "source": ""}
    cfg = ModelConfig.from_dict(old)
    assert cfg.backbone == "unet" and cfg.widths == [8, 16] and cfg.image_size == 32
    assert not cfg.use_location and not cfg.use_time
    assert not {"location", "time"} & set(cfg.vector_modalities())
    # configs of other models keep their backbone, or the transformer's when they lack one
    assert ModelConfig.from_dict({"modalities": mods, "image_size": 32}).backbone == (
        "scene_transformer"
    )
    assert ModelConfig.from_dict({**old, "patch_size": 8}).backbone == "scene_transformer"
    assert ModelConfig.from_dict({**old, "backbone": "conv_generator"}).use_location


def test_a_model_saved_before_backbones_loads_as_a_transformer(store_modalities, tmp_path):
    folder = build_model(_config(store_modalities, "scene_transformer")).save_pretrained(
        tmp_path / "old"
    )
    raw = json.loads((folder / "config.json").read_text())
    del raw["backbone"]  # as saved before the field existed
    (folder / "config.json").write_text(json.dumps(raw))
    model = load_model(folder)
    assert type(model) is SceneModel
    assert model.config.backbone == "scene_transformer"
    assert sampling_steps(model, None) == SceneModel.default_steps


def test_the_built_in_model_is_the_calibrated_one_step_generator():
    model = load_model(default_model_path())
    assert type(model) is ConvGenerator and sampling_steps(model, None) == 1
    assert model.retrieval is not None and len(model.retrieval) > 1000  # its index ships too
    assert model.config.spread_scale and model.config.spread_bands


def test_load_model_needs_config_and_weights(store_modalities, tmp_path):
    with pytest.raises(TerrasynthError, match="no config.json and model.safetensors"):
        load_model(tmp_path)
    folder = _saved_conv(store_modalities, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(TerrasynthError, match="no config.json and model.safetensors"):
        load_model(folder)


def test_sampling_steps_one_step_models_always_take_one(store_modalities):
    conv = build_model(_config(store_modalities, "conv_generator"))
    for asked in (None, 1, 4, 50):
        assert sampling_steps(conv, asked) == 1
    transformer = build_model(_config(store_modalities, "scene_transformer"))
    assert sampling_steps(transformer, None) == 8
    for asked in (1, 3, 20):
        assert sampling_steps(transformer, asked) == asked


def test_conv_presets_validate_and_name_the_backbone(store_modalities):
    for name, sizes in CONV_PRESETS.items():
        cfg = preset_config(name, *store_modalities, backbone="conv_generator")
        assert cfg.backbone == "conv_generator" and cfg.preset == name
        assert cfg.widths == sizes["widths"] and cfg.ensemble >= 2
    # the transformer's presets stay the default
    assert preset_config("tiny", *store_modalities).backbone == "scene_transformer"
    with pytest.raises(TerrasynthError, match="unknown preset 'huge'"):
        preset_config("huge", *store_modalities, backbone="conv_generator")


def test_unet_presets_validate_and_name_the_backbone(store_modalities):
    for name, sizes in UNET_PRESETS.items():
        cfg = preset_config(name, *store_modalities, backbone="unet")
        assert cfg.backbone == "unet" and cfg.preset == name and cfg.widths == sizes["widths"]
        assert not cfg.use_location and not cfg.use_time  # it conditions on rasters only
    cfg = _config(store_modalities, "unet", image_size=20)
    with pytest.raises(TerrasynthError, match="image_size must be a multiple of 2"):
        _config(store_modalities, "unet", image_size=15).validate()
    cfg.validate()  # two levels: any even window
    with pytest.raises(TerrasynthError, match="image_size must be a multiple of 4"):
        _config(store_modalities, "unet", widths=[8, 16, 32], image_size=18).validate()
    with pytest.raises(TerrasynthError, match="widths must be multiples of 8"):
        build_model(_config(store_modalities, "unet", widths=[12, 16]))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"ensemble": 1}, "ensemble must be at least 2"),
        # two levels and S2's 60 m group (4x coarser): windows are multiples of 8 px
        ({"image_size": 36}, "image_size must be a multiple of 8"),
        ({"widths": [8, 16, 32], "image_size": 40}, "image_size must be a multiple of 16"),
    ],
)
def test_conv_config_validation(store_modalities, change, message):
    cfg = _config(store_modalities, "conv_generator", **change)
    with pytest.raises(TerrasynthError, match=message):
        cfg.validate()
    with pytest.raises(TerrasynthError, match=message):
        build_model(cfg)
