import numpy as np
import pytest

from terrasynth.data.align import align_scene
from terrasynth.data.chips import chip_offsets, cut_chips
from terrasynth.data.split import SplitConfig
from terrasynth.modalities import default_registry


def test_chip_offsets_large_axis_does_not_overlap():
    offs = chip_offsets(1428, 64, 4)
    assert len(offs) == 22
    assert all(b - a == 64 for a, b in zip(offs, offs[1:], strict=False))
    assert offs[-1] + 64 <= 1428


def test_chip_offsets_small_axis_overlaps_to_cover():
    assert chip_offsets(120, 64, 4) == [0, 56]
    assert chip_offsets(64, 64, 4) == [0]
    assert chip_offsets(63, 64, 4) == []
    offs = chip_offsets(101, 64, 4)
    assert offs[0] == 0 and offs[-1] + 64 >= 100


@pytest.mark.needs_data
def test_cut_chips_on_zion(zion_scene):
    aligned = align_scene(zion_scene, default_registry())
    chips = list(cut_chips(aligned, 64, SplitConfig(), min_valid=0.5))
    assert 250 < len(chips) <= 22 * 17
    c = chips[0]
    data, valid = c.groups[("landsat8", "r30m")]
    assert data.shape == (7, 64, 64) and valid.shape == (7, 64, 64)  # B1..B7
    assert c.band_available["landsat8"] == {
        "B1": False,
        "B2": True,
        "B3": True,
        "B4": True,
        "B5": True,
        "B6": False,
        "B7": False,
    }
    # chip grids tile the scene grid exactly
    assert c.grid.transform.a == zion_scene.grid.transform.a
    assert c.grid.crs == zion_scene.grid.crs
    splits = {ch.split for ch in chips}
    assert splits == {"train", "val", "test"}
    # a block never spans two splits
    by_block: dict = {}
    for ch in chips:
        by_block.setdefault(ch.block, set()).add(ch.split)
    assert all(len(s) == 1 for s in by_block.values())
    # chips are disjoint: their transforms' origins differ by multiples of 64 pixels
    xs = sorted({round((ch.grid.transform.c - c.grid.transform.c) / 30) for ch in chips})
    assert all(x % 64 == 0 for x in xs)
    assert np.isfinite([ch.lat for ch in chips]).all()
