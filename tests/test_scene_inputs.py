"""Inputs of whole-scene jobs: checked once, then read window by window."""

from __future__ import annotations

import numpy as np
import pytest

from terrasynth.data.align import align_scene
from terrasynth.data.sources.generic import generic_scene
from terrasynth.errors import InputError
from terrasynth.modalities import default_registry
from terrasynth.scenes.inputs import open_inputs, read_region

pytestmark = pytest.mark.needs_data


def test_a_region_read_equals_the_same_region_of_the_whole_scene(s1_utm):
    reg = default_registry()
    files, warnings = open_inputs([("s1grd", s1_utm)], reg)
    assert warnings == [] and files[0].bands == ("VV", "VH")
    whole = align_scene(generic_scene([("s1grd", s1_utm)], registry=reg), reg).groups
    grid = files[0].grid.window(32, 16, 48, 40)
    part = read_region(files, grid, reg)[("s1grd", "r10m")]
    ref = whole[("s1grd", "r10m")]
    np.testing.assert_allclose(part.data, ref.data[:, 16:56, 32:80], atol=1e-5)
    assert np.array_equal(part.valid, ref.valid[:, 16:56, 32:80])


def test_a_region_beyond_the_file_is_invalid_not_an_error(s1_utm):
    reg = default_registry()
    files, _ = open_inputs([("s1grd", s1_utm)], reg)
    far = files[0].grid.window(1000, 1000, 64, 64)
    group = read_region(files, far, reg)[("s1grd", "r10m")]
    assert not group.valid.any()


def test_bad_inputs_get_one_clear_line(s1_utm, tmp_path):
    reg = default_registry()
    with pytest.raises(InputError, match="dem expects 1 bands.*file has 2"):
        open_inputs([("dem", s1_utm)], reg)  # 2 bands for a 1-band modality
    with pytest.raises(InputError, match="far outside its range"):
        open_inputs([("s1grd", s1_utm)], reg, scaling={"s1grd": (1000.0, 0.0)})
    with pytest.raises(InputError, match="file not found"):
        open_inputs([("s1grd", tmp_path / "missing.tif")], reg)
