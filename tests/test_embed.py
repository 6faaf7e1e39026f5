"""Embeddings of real rasters: feature grids, chips, tiles against one pass, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.warp import transform as warp_transform

from terrasynth.embedding import read_chips
from terrasynth.errors import TerrasynthError, UnknownModalityError
from terrasynth.models.config import ModelConfig
from terrasynth.models.factory import build_model
from terrasynth.models.signals import batch_signals
from terrasynth.pipeline import Pipeline, scene_batch
from terrasynth.sampling.conditional import sampling_inputs
from terrasynth.scenes.embed import embed_scene
from tests.conftest import (
    DATA,
    MICRO_CONV,
    MICRO_MODEL,
    MICRO_UNET,
    ZION,
    one_line_error,
    run_cli,
    write_s1_utm,
)

pytestmark = [pytest.mark.needs_data, pytest.mark.usefixtures("one_torch_thread")]

BEN_S2 = DATA / "bigearthnet_v1_examples/BigEarthNet-S2-Example/S2A_MSIL2A_20170613T101031_87_48"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    """The built-in model (the convolutional generator: a feature per pixel)."""
    return Pipeline.from_pretrained()


def _micro(pipe: Pipeline, backbone: str, sizes: dict) -> Pipeline:
    """An untrained micro model of ``backbone`` over the built-in model's modalities (the
    plumbing, not the quality, is under test)."""
    cfg0 = pipe.model.config
    cfg = ModelConfig(backbone=backbone, modalities=cfg0.modalities, stats=cfg0.stats, **sizes)
    torch.manual_seed(0)
    return Pipeline(build_model(cfg))


@pytest.fixture(scope="module")
def conv(pipe) -> Pipeline:
    """A micro convolutional generator: a feature per pixel."""
    return _micro(pipe, "conv_generator", {**MICRO_CONV, "retrieval_k": 0})


@pytest.fixture(scope="module")
def transformer(pipe) -> Pipeline:
    """A micro transformer: a feature per 8 px patch."""
    return _micro(pipe, "scene_transformer", {**MICRO_MODEL, "image_size": 32})


@pytest.fixture(scope="module")
def s1(tmp_path_factory) -> Path:
    """200 x 136 px of real Sentinel-1 (SSL4EO-S12) on a 10 m UTM grid."""
    return write_s1_utm(tmp_path_factory.mktemp("s1") / "s1.tif", 200, 136)


@pytest.fixture(scope="module")
def s2(tmp_path_factory) -> Path:
    """A real BigEarthNet Sentinel-2 L2A patch, its four 10 m bands in one GeoTIFF."""
    bands = [rasterio.open(BEN_S2 / f"{BEN_S2.name}_{b}.tif") for b in ("B02", "B03", "B04", "B08")]
    out = tmp_path_factory.mktemp("s2") / "s2_10m.tif"
    with rasterio.open(out, "w", **(bands[0].profile | {"count": 4})) as f:
        f.write(np.stack([b.read(1) for b in bands]))
        f.descriptions = ("B02", "B03", "B04", "B08")
    return out


def _grid_of(path: Path):
    with rasterio.open(path) as src:
        return src.crs, src.transform, src.width, src.height


@pytest.mark.parametrize("which", ["transformer", "conv"])
def test_pixels_lie_on_the_input_grid_at_the_feature_resolution(which, transformer, conv, s1):
    p = transformer if which == "transformer" else conv
    f = p.model.feature_factor
    assert f == (8 if which == "transformer" else 1)
    emb = p.embed({"s1grd": s1}, chip_size=32)
    crs, transform, width, height = _grid_of(s1)
    assert emb.grid.crs == crs
    assert emb.grid.transform == transform @ Affine.scale(f)
    assert emb.features.shape == (p.model.feature_channels, -(-height // f), -(-width // f))
    # the feature grid covers the input's extent, less than one feature pixel beyond it
    left, bottom, right, top = emb.grid.bounds
    in_left, in_top = transform @ (0, 0)
    in_right, in_bottom = transform @ (width, height)
    assert (left, top) == (in_left, in_top)
    assert 0 <= right - in_right < f * transform.a and 0 <= in_bottom - bottom < f * transform.a
    # NaN exactly where no input pixel lies under a feature pixel (the scene's NaN border)
    with rasterio.open(s1) as src:
        valid = np.isfinite(src.read()).any(0)
    pad = np.zeros((-(-height // f) * f, -(-width // f) * f), bool)
    pad[:height, :width] = valid
    held = pad.reshape(pad.shape[0] // f, f, pad.shape[1] // f, f).any((1, 3))
    assert not valid.all() and held.mean() > 0.9
    assert np.array_equal(np.isfinite(emb.features).all(0), held)
    assert np.array_equal(np.isfinite(emb.features).any(0), held)
    da = emb.pixels
    assert da.dims == ("band", "y", "x") and da.shape == emb.features.shape
    assert da.rio.crs == crs and da.rio.transform() == emb.grid.transform
    assert list(da.band.values[:2]) == ["emb000", "emb001"]
    assert float(da.x[0]) == in_left + f * transform.a / 2


def test_chips_are_the_means_of_the_pixels_under_them(transformer, s1):
    emb = transformer.embed({"s1grd": s1}, chip_size=64)  # 8 x 8 feature pixels per chip
    chips = emb.chips
    names = emb.names
    assert list(chips.columns[:8]) == ["chip_id", "row", "col", "x", "y", "lon", "lat", "pixels"]
    assert list(chips.columns[8:]) == names
    assert len(names) == transformer.model.feature_channels
    # 200 x 136 px: 4 x 3 chips, the last column and row cut by the scene's edge
    assert len(chips) == 12 and chips.chip_id.is_unique
    for _, c in chips.iterrows():
        r, k = int(c.row), int(c.col)
        block = emb.features[:, r * 8 : (r + 1) * 8, k * 8 : (k + 1) * 8]
        np.testing.assert_allclose(c[names].to_numpy(float), np.nanmean(block, (1, 2)),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        assert c.pixels == np.isfinite(block[0]).sum() > 0
    lon, lat = warp_transform(emb.grid.crs, "EPSG:4326", chips.x.tolist(), chips.y.tolist())
    np.testing.assert_allclose(chips.lon, lon)
    np.testing.assert_allclose(chips.lat, lat)
    first = chips.iloc[0]
    x0, y0 = emb.grid.transform @ (4, 4)  # centre of the first chip
    assert (first.x, first.y) == (x0, y0)
    with pytest.raises(TerrasynthError, match="multiple of the model's feature resolution"):
        emb.chip_table(12)


def test_nodata_is_nan_and_left_out_of_the_chip_means(conv, s1, tmp_path):
    with rasterio.open(s1) as src:
        arr, profile = src.read(), src.profile
    arr[:, :40, :] = np.nan  # a nodata strip, as at a scene edge
    holey = tmp_path / "holey.tif"
    with rasterio.open(holey, "w", **profile) as f:
        f.write(arr)
    emb = conv.embed({"s1grd": holey}, chip_size=32)
    valid = np.isfinite(arr).any(0)
    assert np.array_equal(np.isfinite(emb.features).all(0), valid)
    assert np.isnan(emb.features[:, :40]).all()
    chips = emb.chips
    assert chips.row.min() == 1  # the first chip row holds no input at all
    second = chips[chips.row == 1].iloc[1]
    assert second.pixels == valid[40:64, 32:64].sum() == 24 * 32
    np.testing.assert_allclose(
        second[emb.names].to_numpy(float), emb.features[:, 40:64, 32:64].mean((1, 2)), rtol=1e-5
    )


@pytest.mark.parametrize("which", ["transformer", "conv"])
def test_a_tiled_scene_equals_one_pass_and_overlapping_windows_agree(which, transformer, conv,
                                                                     s1, tmp_path):  # fmt: skip
    p = transformer if which == "transformer" else conv
    f = p.model.feature_factor
    one = p.embed({"s1grd": s1}, chip_size=32)
    files = embed_scene(p, [("s1grd", s1)], tmp_path / "tiled", chip_size=32, tile=64)
    assert sorted(x.name for x in files) == ["chips.parquet", "embedding.json", "embedding.tif"]
    with rasterio.open(tmp_path / "tiled" / "embedding.tif") as src:
        tiled = src.read()
        assert src.crs == one.grid.crs and src.transform == one.grid.transform
        assert src.descriptions[0] == "emb000" and src.dtypes[0] == "float32"
    np.testing.assert_allclose(tiled, one.features, rtol=1e-5, atol=1e-5)
    chips = read_chips(tmp_path / "tiled" / "chips.parquet")
    np.testing.assert_allclose(chips[one.names], one.chips[one.names], rtol=1e-5, atol=1e-5)
    assert chips.attrs["feature_factor"] == f and chips.attrs["chip_size"] == 32
    # a part of the scene (on the window layout) agrees with the whole scene's embedding
    # away from its edges: the same windows see it (the scene centre the model is told
    # moves by 300 m, the only difference)
    part = p.embed({"s1grd": s1}, window=(64, 32, 128, 96))
    whole = one.features[:, 32 // f : (32 + 96) // f, 64 // f : (64 + 128) // f]
    m = p.model.config.window_size // f
    inner = (slice(None), slice(m, -m), slice(m, -m))
    assert part.grid.transform == one.grid.transform @ Affine.translation(64 // f, 32 // f)
    err = np.abs(part.features - whole)[inner].mean() / np.abs(whole).mean()
    assert err < 1e-3, err


def test_a_different_input_gives_a_different_embedding(pipe, s1, s2, tmp_path):
    a = pipe.embed({"s1grd": s1}, window=(0, 0, 120, 120)).features
    b = pipe.embed({"s1grd": s1}, window=(80, 0, 120, 120)).features
    s2_emb = pipe.embed({"s2l2a:B02,B03,B04,B08": s2}, scaling={"s2l2a": (1e-4, 0.0)}).features
    c, f = pipe.model.feature_channels, pipe.model.feature_factor
    assert a.shape == b.shape == s2_emb.shape == (c, 120 // f, 120 // f)
    # (the S1 scene has a NaN border, which a per-pixel embedding keeps)
    assert np.nanmean(np.abs(a - b)) > 0.1 * np.nanmean(np.abs(a))
    assert np.nanmean(np.abs(a - s2_emb)) > 0.1 * np.nanmean(np.abs(a))
    # the same input, the same embedding
    again = pipe.embed({"s1grd": s1}, window=(0, 0, 120, 120)).features
    assert np.array_equal(a, again, equal_nan=True)


def test_every_backbone_gives_a_feature_map(pipe, conv, transformer, s1):
    unet = _micro(pipe, "unet", {**MICRO_UNET, "image_size": 32})
    cfg = pipe.model.config
    from terrasynth.data.align import align_scene
    from terrasynth.data.scene import Scene
    from terrasynth.data.sources.generic import generic_scene

    scene = generic_scene([("s1grd", s1)], registry=cfg.registry)
    grid = scene.layers[0].grid.window(0, 0, 32, 32)
    groups = align_scene(Scene("s", "generic", "user", grid, scene.layers), cfg.registry).groups
    for p in (pipe, conv, transformer, unet):
        batch, order, _ = scene_batch(p.model.config, groups, grid, [], None, None, {"s1grd"})
        sigs = batch_signals(batch, p.model.config, order)
        sigs = {n: s for n, s in sigs.items() if bool(s.present.any())}
        gsd = torch.tensor([10.0])
        fmap = p.model.feature_map(sampling_inputs(sigs, [], {}, 0.0, gsd, None, True), gsd)
        side = 32 // p.model.feature_factor
        assert fmap.shape == (1, p.model.feature_channels, side, side), p.model.config.backbone
        assert torch.isfinite(fmap).all()


def test_the_cli_writes_the_embedding_and_its_chips(s1, pipe, tmp_path):
    out = tmp_path / "emb"
    res = run_cli("embed", "-i", f"s1grd={s1}", "-o", str(out), "--chip-size", "64",
                  "--window", "0,0,160,120")  # fmt: skip
    assert res.returncode == 0, res.stderr
    c = pipe.model.feature_channels  # the built-in model: a feature per pixel
    assert f"embedding.tif: {c} features" in res.stdout
    one = pipe.embed({"s1grd": s1}, chip_size=64, window=(0, 0, 160, 120))
    with rasterio.open(out / "embedding.tif") as src:
        assert src.count == c and src.shape == (120, 160) and src.crs == one.grid.crs
        assert src.transform == one.grid.transform
        np.testing.assert_allclose(src.read(), one.features, rtol=1e-5, atol=1e-5)
    chips = read_chips(out / "chips.parquet")
    assert len(chips) == 6 and list(chips.columns[:7]) == ["chip_id", "row", "col", "x", "y",
                                                           "lon", "lat"]  # fmt: skip
    info = json.loads((out / "embedding.json").read_text())
    assert info["backbone"] == "conv_generator" and info["window"] == [0, 0, 160, 120]
    assert info["chip_size"] == 64 and info["feature_factor"] == 1


def _nothing_left(folder: Path, name: str) -> bool:
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in folder.iterdir())


def test_bad_input_is_one_error_line_and_leaves_nothing(s1, transformer, tmp_path, capsys):
    out = str(tmp_path / "out")
    patches = str(transformer.model.save_pretrained(tmp_path / "patches"))  # per 8 px
    with rasterio.open(s1) as src:
        arr, profile = src.read(), src.profile
    three = tmp_path / "three_bands.tif"
    with rasterio.open(three, "w", **(profile | {"count": 3})) as f:
        f.write(np.concatenate([arr, arr[:1]]))
    truncated = tmp_path / "truncated.tif"
    data = (ZION / "landsat_b2.tif").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    no_crs = tmp_path / "no_crs.tif"
    with rasterio.open(no_crs, "w", **(profile | {"crs": None})) as f:
        f.write(arr)
    far = tmp_path / "far.tif"  # real pixels, placed on the other side of the Earth
    elsewhere = Affine(10, 0, 500000, 0, -10, 0)
    with rasterio.open(far, "w", **(profile | {"transform": elsewhere})) as f:
        f.write(arr)
    cases = [
        (["-i", f"sentinel9={s1}"], "does not know input modality 'sentinel9'"),
        (["-i", f"s1grd={three}"], "expects 2 bands (VV, VH), file has 3"),
        (["-i", f"landsat8:B2={truncated}"], "truncated.tif"),
        (["-i", f"s1grd={no_crs}"], "no CRS"),
        (["-i", f"s1grd={s1}", "-i", f"s1grd={far}"], "does not overlap"),
        (["-m", patches, "-i", f"s1grd={s1}", "--chip-size", "12"], "multiple of the model's"),
        (["-m", patches, "-i", f"s1grd={s1}", "--tile", "100"], "--tile must be a multiple of"),
        (["-i", f"s1grd={s1}", "--window", "500,500,10,10"], "window"),
    ]
    for args, pattern in cases:
        one_line_error(capsys, ["embed", *args, "-o", out], pattern)
        assert _nothing_left(tmp_path, "out"), args
    pipe = Pipeline.from_pretrained()
    with pytest.raises(UnknownModalityError):
        pipe.embed({"sentinel9": s1})
    with pytest.raises(TerrasynthError, match="at least one input"):
        pipe.embed({})


def test_the_python_example_in_the_docs_runs(s1, tmp_path, monkeypatch):
    import re
    import shutil

    doc = (Path(__file__).resolve().parents[1] / "docs" / "embed.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if ".embed(" in b)
    shutil.copy(s1, tmp_path / "s1.tif")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "docs/embed.md", "exec"), scope)  # noqa: S102
    c = Pipeline.from_pretrained().model.feature_channels
    assert scope["da"].shape == (c, 136, 200) and scope["da"].rio.crs is not None
    assert len(scope["first"]) == c and np.isfinite(scope["first"].to_numpy(float)).all()
    assert sorted(p.name for p in (tmp_path / "emb").iterdir() if not p.name.startswith(".")) == [
        "chips.parquet", "embedding.json", "embedding.tif"
    ]  # fmt: skip
