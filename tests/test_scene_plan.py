"""Tiles, regions and windows of a whole-scene job (pure geometry)."""

from __future__ import annotations

import numpy as np
import pytest

from terrasynth.scenes.plan import Box, ScenePlan


@pytest.mark.parametrize("height,width,tile", [(200, 332, 64), (256, 256, 128), (40, 96, 64)])
def test_tiles_cover_the_scene_once_and_their_windows_cover_each_tile(height, width, tile):
    plan = ScenePlan(height, width, window=32, stride=16, tile=tile)
    seen = np.zeros((height, width), int)
    all_windows = set()
    for t in plan.tiles():
        seen[t.row : t.row + t.height, t.col : t.col + t.width] += 1
        region = plan.region(t)
        covered = np.zeros((height, width), bool)
        for r, c in plan.windows(t):
            # every window a tile needs lies inside the region the tile reads
            assert region.row <= r and r + 32 <= region.row + region.height
            assert region.col <= c and c + 32 <= region.col + region.width
            covered[r : r + 32, c : c + 32] = True
            all_windows.add((r, c))
        assert covered[t.row : t.row + t.height, t.col : t.col + t.width].all()
    assert (seen == 1).all()
    # together the tiles run exactly the windows of the global layout
    assert all_windows == {(r, c) for r in plan.window_rows for c in plan.window_cols}


def test_a_window_that_only_touches_a_tile_edge_is_not_run_for_it():
    plan = ScenePlan(128, 128, window=32, stride=16, tile=64)
    tile = Box(64, 64, 64, 64)
    windows = plan.windows(tile)
    assert (32, 32) not in windows  # ends exactly where the tile starts
    assert (48, 48) in windows


def test_box_slices_on_coarser_grids():
    rows, cols = Box(64, 128, 64, 32).scaled(4)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (16, 32, 32, 40)


def test_tile_size_must_be_a_multiple_of_64():
    with pytest.raises(ValueError):
        ScenePlan(100, 100, window=32, stride=16, tile=100)
