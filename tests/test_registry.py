import pytest

from terrasynth.errors import TerrasynthError, UnknownModalityError
from terrasynth.modalities import Registry, default_registry


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
