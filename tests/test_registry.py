import pytest

from terrasynth.errors import TerrasynthError, UnknownModalityError
from terrasynth.modalities import Registry, default_registry
from terrasynth.modalities.registry import SPECTRAL_SLOTS


def test_builtin_entries_have_expected_shapes():
    reg = default_registry()
    s2 = reg["s2l2a"]
    assert len(s2.bands) == 12
    assert [g.factor for g in s2.groups] == [1, 2, 4]
    assert len(reg["s2l1c"].bands) == 13
    assert reg["s1grd"].bands == ("VV", "VH")
    assert reg["s1grd"].units == "dB"
    assert reg["landcover_nlcd"].class_index()[11] == 0
    assert reg["corine"].kind == "multilabel"
    for name in (
        "landsat8",
        "dem",
        "ndvi",
        "aerial",
        "ndsm",
        "landcover_lulc",
        "landcover_flair",
        "location",
        "time",
        "corine19",
    ):
        assert name in reg


def test_unknown_modality_message_lists_known():
    with pytest.raises(UnknownModalityError, match="unknown modality 'sentinel9'.*s2l2a"):
        default_registry()["sentinel9"]


def test_user_modality_from_yaml(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(
        "modalities:\n"
        "  thermal:\n"
        "    kind: continuous\n"
        "    units: K\n"
        "    value_range: [200, 350]\n"
        "    groups:\n"
        "      - {name: r100m, gsd: 100, bands: [lst]}\n"
    )
    reg = default_registry([f])
    assert reg["thermal"].bands == ("lst",)
    assert "s2l2a" in reg
    # round trip through the dict form used in store snapshots
    again = Registry.from_dict(reg.to_dict())
    assert again["thermal"] == reg["thermal"]
    assert again["s2l2a"] == reg["s2l2a"]


@pytest.mark.parametrize(
    "body, message",
    [
        ("  bad:\n    kind: blob\n    groups: []\n", "kind must be one of"),
        (
            "  bad:\n    kind: continuous\n    groups: [{name: a, gsd: 10, bands: [x]}]\n",
            "needs value_range",
        ),
        (
            "  bad:\n    kind: categorical\n    groups: [{name: a, gsd: 10, bands: [c]}]\n",
            "needs a legend",
        ),
        ("  Bad:\n    kind: scalar\n    groups: [{name: a, gsd: 0, bands: [x]}]\n", "lowercase"),
        (
            "  bad:\n    kind: continuous\n    value_range: [0, 1]\n"
            "    groups: [{name: a, gsd: 10, bands: [b1, b2]}]\n"
            "    spectral: {b1: red, b2: ultraviolet}\n",
            "spectral slot 'ultraviolet' of band 'b2' is not one of coastal, blue",
        ),
        (
            "  bad:\n    kind: continuous\n    value_range: [0, 1]\n"
            "    groups: [{name: a, gsd: 10, bands: [b1]}]\n"
            "    spectral: {b7: red}\n",
            "spectral band 'b7' is not one of its bands",
        ),
        (
            "  bad:\n    kind: categorical\n    legend: {1: {name: x}}\n"
            "    groups: [{name: a, gsd: 10, bands: [class]}]\n"
            "    spectral: {class: red}\n",
            "only continuous modalities have spectral slots",
        ),
    ],
)
def test_invalid_user_modality_is_refused(tmp_path, body, message):
    f = tmp_path / "bad.yaml"
    f.write_text("modalities:\n" + body)
    with pytest.raises(TerrasynthError, match=message):
        default_registry([f])


def test_redefining_builtin_differently_is_refused(tmp_path):
    f = tmp_path / "clash.yaml"
    f.write_text(
        "modalities:\n  dem:\n    kind: continuous\n    value_range: [0, 1]\n"
        "    groups: [{name: a, gsd: 90, bands: [z]}]\n"
    )
    with pytest.raises(TerrasynthError, match="already defined"):
        default_registry([f])


def test_builtin_spectral_slots():
    reg = default_registry()
    # the red band of every optical sensor, whatever the sensor calls it
    for name, band in [
        ("s2l2a", "B04"),
        ("s2l1c", "B04"),
        ("landsat8", "B4"),
        ("landsat8_sr", "B4"),
        ("landsat7", "B3"),
        ("aerial", "R"),
        ("rgb_visual", "R"),
    ]:
        assert reg[name].spectral_slots[band] == "red", name
    s2 = reg["s2l2a"].spectral_slots
    assert (s2["B08"], s2["B8A"]) == ("nir", "nir08")  # broad and narrow NIR stay apart
    assert reg["landsat8"].spectral_slots["B5"] == "nir08"  # OLI's NIR is the narrow one
    assert reg["s2l1c"].spectral_slots["B10"] == "cirrus"
    assert reg["landsat7"].spectral_slots["B61"] == reg["landsat7"].spectral_slots["B62"]
    for name, mod in reg.items():
        slots = mod.spectral_slots
        assert set(slots) <= set(mod.bands), name
        assert set(slots.values()) <= set(SPECTRAL_SLOTS), name
        if slots and mod.rgb:  # a sensor's quick-look bands are its red, green and blue
            assert [slots[b] for b in mod.rgb] == ["red", "green", "blue"], name
        if mod.kind != "continuous" or name in ("s1grd", "dem"):
            assert not slots, name


def test_spectral_slots_round_trip_and_stay_optional(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(
        "modalities:\n"
        "  drone:\n"
        "    kind: continuous\n"
        "    units: reflectance\n"
        "    value_range: [0, 1]\n"
        "    groups:\n"
        "      - {name: r01m, gsd: 1, bands: [re, nir, dsm]}\n"
        "    spectral: {re: rededge1, nir: nir}\n"
    )
    drone = default_registry([f])["drone"]
    assert drone.spectral_slots == {"re": "rededge1", "nir": "nir"}  # dsm has no slot
    d = drone.to_dict()
    assert d["spectral"] == {"re": "rededge1", "nir": "nir"}
    assert Registry.from_dict({"drone": d})["drone"] == drone
    # entries without slots keep the dict form they had (store snapshots, saved models)
    assert "spectral" not in default_registry()["s1grd"].to_dict()
    assert default_registry()["s1grd"].spectral_slots == {}
