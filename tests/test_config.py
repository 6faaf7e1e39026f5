"""Model configuration: JSON round trip, presets, validation, the modality table."""

from __future__ import annotations

import json

import pytest

from terrasynth.data.store import ChipStore
from terrasynth.errors import TerrasynthError
from terrasynth.modalities import default_registry
from terrasynth.models.config import (
    LOCATION_DIM,
    PRESETS,
    TIME_DIM,
    ModelConfig,
    preset_config,
)
from terrasynth.models.scene_model import SceneModel

TINY = dict(image_size=16, patch_size=8, dim=32, depth=1, heads=2, scene_tokens=2)


def _mods(names: list[str]) -> dict[str, dict]:
    reg = default_registry()
    return {m: reg[m].to_dict() for m in names}


@pytest.fixture(scope="module")
def store_mods(small_store):
    store = ChipStore.open(small_store)
    reg = store.registry
    return {m: reg[m].to_dict() for m in store.modalities}, store.stats


@pytest.mark.needs_data
def test_json_round_trip_with_real_store_table(store_mods, tmp_path):
    mods, stats = store_mods
    cfg = ModelConfig(modalities=mods, stats=stats, use_time=False, mlp_ratio=2.5, **TINY)
    path = tmp_path / "config.json"
    cfg.save(path)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left over
    loaded = ModelConfig.load(path)
    # JSON turns integer legend codes into strings; the registry they describe is the same
    assert loaded.registry == cfg.registry
    assert loaded.stats == json.loads(json.dumps(stats))
    for f in ("image_size", "patch_size", "dim", "depth", "heads", "mlp_ratio", "scene_tokens"):
        assert getattr(loaded, f) == getattr(cfg, f)
    assert loaded.use_time is False and loaded.use_location is True
    assert loaded.vector_modalities() == cfg.vector_modalities()
    # saving the loaded config again gives the same file
    path2 = tmp_path / "again.json"
    loaded.save(path2)
    assert path2.read_text() == path.read_text()
    # and it builds a model of the same shape
    a, b = SceneModel(cfg), SceneModel(loaded)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_from_dict_ignores_unknown_keys():
    cfg = ModelConfig.from_dict({"dim": 64, "heads": 2, "not_a_field": 1, "preset": "x"})
    assert cfg.dim == 64 and cfg.heads == 2 and cfg.preset == "x"
    assert not hasattr(cfg, "not_a_field")


def test_options_added_later_are_off_for_saved_configs_and_on_in_presets():
    saved = ModelConfig.from_dict({"dim": 64, "heads": 2})  # a config.json from before them
    assert not saved.patch_contrast and saved.pixel_context == 0
    assert not saved.blind_at_pure_noise
    for preset in PRESETS.values():
        assert preset["patch_contrast"] and preset["pixel_context"] > 0
        assert preset["blind_at_pure_noise"]


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_presets_validate(name):
    mods = _mods(["s2l2a", "s1grd", "landcover_nlcd", "corine", "dem"])
    cfg = preset_config(name, mods, {})
    assert cfg.preset == name
    for k, v in PRESETS[name].items():
        assert getattr(cfg, k) == v
    cfg.validate()
    assert cfg.image_size % cfg.patch_size == 0


def test_presets_grow():
    sizes = [PRESETS[n]["dim"] * PRESETS[n]["depth"] for n in ("tiny", "small", "base")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(TerrasynthError, match=r"unknown preset 'huge'.*tiny.*small.*base"):
        preset_config("huge", _mods(["dem"]), {})


def test_patch_not_divisible_by_group_factor():
    mods = _mods(["s2l2a"])  # r60m is stored 4x coarser than r10m
    with pytest.raises(TerrasynthError, match="r60m"):
        ModelConfig(modalities=mods, image_size=16, patch_size=2, dim=32, heads=2).validate()
    # a patch of 4 base pixels is one pixel of the 60 m group: allowed
    ModelConfig(modalities=mods, image_size=16, patch_size=4, dim=32, heads=2).validate()
    # a single-resolution modality has no such constraint
    ModelConfig(modalities=_mods(["dem"]), image_size=16, patch_size=2, dim=32, heads=2).validate()


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        (dict(image_size=20, patch_size=8), "multiple of patch_size"),
        (dict(dim=30, heads=4), "multiple of heads"),
    ],
)
def test_validate_errors(kw, pattern):
    base = dict(modalities=_mods(["dem"]), image_size=16, patch_size=8, dim=32, heads=2)
    cfg = ModelConfig(**{**base, **kw})
    with pytest.raises(TerrasynthError, match=pattern):
        cfg.validate()
    with pytest.raises(TerrasynthError, match=pattern):
        SceneModel(cfg)  # the model refuses an invalid config too


def test_vector_modalities():
    reg = default_registry()
    cfg = ModelConfig(modalities=_mods(["s2l2a", "corine", "landcover_nlcd"]), **TINY)
    vec = cfg.vector_modalities()
    assert vec == {"corine": reg["corine"].num_classes, "location": LOCATION_DIM, "time": TIME_DIM}
    assert vec["corine"] == 44
    assert [m.name for m in cfg.raster_modalities()] == ["s2l2a", "landcover_nlcd"]
    cfg.use_location = False
    assert "location" not in cfg.vector_modalities()
    cfg.use_time = False
    assert cfg.vector_modalities() == {"corine": 44}
