"""Quick-look rendering (terrasynth.data.preview) of real chips from a built store."""

from __future__ import annotations

import shutil

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from terrasynth.data.preview import render_chip, render_preview
from terrasynth.data.store import ChipStore
from terrasynth.errors import TerrasynthError
from terrasynth.modalities import default_registry
from tests.conftest import ZION

pytestmark = pytest.mark.needs_data


@pytest.fixture(scope="module")
def store(small_store):
    return ChipStore.open(small_store)


def chip(store: ChipStore, modality: str, k: int = 0) -> tuple:
    """The modality and its finest group's (data, valid) of the k-th chip holding it."""
    mod = store.registry[modality]
    i = int(np.flatnonzero(store.available(modality))[k])
    g = mod.groups[0].name
    data = store.array(f"{modality}/{g}/data")[i]
    valid = store.array(f"{modality}/{g}/valid")[i]
    return mod, g, data, valid


def check_image(img: np.ndarray, size: int) -> None:
    assert img.shape == (size, size, 3)
    assert np.isfinite(img).all()
    assert img.min() >= 0.0 and img.max() <= 1.0


def non_decreasing(channel: np.ndarray, key: np.ndarray) -> bool:
    order = np.argsort(key, kind="stable")
    return bool(np.all(np.diff(channel[order]) >= -1e-6))


def test_s2l2a_true_colour(store):
    mod, g, data, valid = chip(store, "s2l2a")
    assert valid.all()
    img = render_chip(mod, {g: (data, valid)})
    check_image(img, 64)
    bands = mod.groups[0].bands
    for c, band in enumerate(("B04", "B03", "B02")):
        x = data[bands.index(band)]
        # each channel is a monotone stretch of its band, using the full [0, 1] range
        assert non_decreasing(img[..., c].ravel(), x.ravel()), band
        assert img[..., c].min() == 0.0 and img[..., c].max() == 1.0
        assert img[..., c][x == x.max()].max() == 1.0
    assert not np.allclose(img[..., 0], img[..., 2])


def test_invalid_pixels_are_black(store):
    mod, g, data, valid = chip(store, "s2l2a", 1)
    valid = valid.copy()
    valid[:10] = False
    img = render_chip(mod, {g: (data, valid)})
    assert (img[:10] == 0).all()
    assert img[10:].max() > 0.5


def test_s1grd_is_grey(store):
    mod, g, data, valid = chip(store, "s1grd")
    assert mod.units == "dB"
    img = render_chip(mod, {g: (data, valid)})
    check_image(img, 64)
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    assert img[..., 0].std() > 0.1
    assert non_decreasing(img[..., 0].ravel(), data[0].ravel())  # the first band: VV


def test_dem_is_hillshaded(store):
    mod, g, data, valid = chip(store, "dem")
    assert valid.all() and data[0].std() > 5.0  # Zion: real relief
    img = render_chip(mod, {g: (data, valid)})
    check_image(img, 64)
    assert img.std() > 0.05
    # a colour map alone commutes with a flip of the terrain; directional shading does not
    flipped = render_chip(mod, {g: (data[:, :, ::-1].copy(), valid[:, ::-1].copy())})
    assert not np.allclose(flipped, img[:, ::-1], atol=0.02)
    # a flat DEM shades evenly
    flat = render_chip(mod, {g: (np.full_like(data, 1500.0), valid)})
    assert np.ptp(flat.reshape(-1, 3), axis=0).max() < 1e-6


@pytest.mark.parametrize("modality", ["landcover_nlcd", "landcover_lulc"])
def test_categorical_uses_legend_colours(store, modality):
    mod, g, data, valid = chip(store, modality)
    img = render_chip(mod, {g: (data, valid)})
    check_image(img, 64)
    colours = np.array([to_rgb(e.color) for e in mod.legend])
    idx = data[0].astype(int)
    assert np.array_equal(img[valid], colours[idx[valid]])
    assert (img[~valid] == 0).all()
    used = {tuple(c) for c in img.reshape(-1, 3)}
    assert used <= {tuple(c) for c in colours} | {(0.0, 0.0, 0.0)}
    assert len(np.unique(idx[valid])) >= 2 and len(used) >= 2


def test_other_continuous_modality_uses_a_colour_map(store):
    mod, g, data, valid = chip(store, "ndvi")
    img = render_chip(mod, {g: (data, valid)})
    check_image(img, 64)
    assert not np.allclose(img[..., 0], img[..., 1])  # not grey


@pytest.fixture(scope="module")
def preview(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("preview")
    out = folder / "sub" / "preview.png"
    return store, out, render_preview(store, out, chips_per_modality=6, seed=0)


def test_render_preview_writes_a_png(preview):
    store, out, returned = preview
    assert returned == out and out.is_file()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(out)
    rows = sum(store.registry[m].is_raster for m in store.modalities)
    assert rows == 8  # corine is image-level, not drawn
    # one row per raster modality: figure height 2 in per row at 110 dpi; 6 chips wide
    assert img.shape == (round(2.0 * rows * 110), round((1.9 * 6 + 2.6) * 110), 4)
    rgb = img[..., :3]
    assert rgb.std() > 0.1
    not_white = (rgb < 0.95).any(axis=-1).mean()
    assert 0.3 < not_white < 0.95


def test_render_preview_is_atomic(preview):
    store, out, _ = preview
    assert sorted(p.name for p in out.parent.iterdir()) == ["preview.png"]
    wide = mpimg.imread(out).shape
    render_preview(store, out, chips_per_modality=1, seed=0, overwrite=True)  # its own file
    assert sorted(p.name for p in out.parent.iterdir()) == ["preview.png"]
    narrow = mpimg.imread(out).shape
    assert narrow[0] == wide[0] and narrow[1] == round((1.9 + 2.6) * 110)


def test_an_earlier_preview_is_replaced_only_with_overwrite(store, tmp_path):
    out = render_preview(store, tmp_path / "p.png", chips_per_modality=1)
    before = out.read_bytes()
    with pytest.raises(TerrasynthError, match="use --overwrite"):
        render_preview(store, out, chips_per_modality=2)
    assert out.read_bytes() == before
    render_preview(store, out, chips_per_modality=2, overwrite=True)
    assert out.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_terrasynth_did_not_write_is_never_replaced(store, tmp_path, overwrite):
    mine = tmp_path / "mine.png"
    plt.imsave(mine, np.linspace(0, 1, 64 * 64).reshape(64, 64))  # a PNG of one's own
    own = tmp_path / "own.tif"
    shutil.copy(ZION / "landsat_b2.tif", own)  # not a PNG at all
    link = tmp_path / "link.png"
    link.symlink_to(render_preview(store, tmp_path / "p.png", chips_per_modality=1))
    for path in (mine, own, link):
        before = path.read_bytes()
        with pytest.raises(TerrasynthError, match="not written by terrasynth"):
            render_preview(store, path, chips_per_modality=1, overwrite=overwrite)
        assert path.read_bytes() == before
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["link.png", "mine.png", "own.tif", "p.png"]


def test_legend_names_are_whole_and_distinct():
    reg = default_registry()
    for name in reg:
        mod = reg[name]
        names = [e.name for e in mod.legend]
        assert len(set(names)) == len(names), name
    nlcd = {e.code: e.name for e in reg["landcover_nlcd"].legend}
    assert nlcd[21] == "Developed, open space"
    corine = {e.code: e.name for e in reg["corine"].legend}
    assert corine[331] == "Beaches, dunes, sands"
