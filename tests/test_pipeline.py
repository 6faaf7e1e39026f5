"""Generation from GeoTIFFs with the built-in model: grids, seeds, infilling, joint, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.warp import Resampling, calculate_default_transform, reproject

from terrasynth.atomic import MARKER
from terrasynth.data.store import ChipStore
from terrasynth.errors import TerrasynthError
from terrasynth.models.config import ModelConfig
from terrasynth.models.conv_generator import ConvGenerator
from terrasynth.models.factory import build_model
from terrasynth.pipeline import Pipeline, default_model_path
from tests.conftest import DATA, MICRO_CONV, MICRO_MODEL, ZION, run_cli

pytestmark = pytest.mark.needs_data

SSL4EO_S1 = (
    DATA
    / "ssl4eo_s12/s1/0000200/S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457"
)
BEN_S2 = DATA / "bigearthnet_v1_examples/BigEarthNet-S2-Example/S2A_MSIL2A_20170613T101031_87_48"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained()


@pytest.fixture(scope="module")
def s1_4326(tmp_path_factory) -> Path:
    """A new GeoTIFF: a corner of a real Sentinel-1 scene (SSL4EO-S12, dB), resampled onto
    an EPSG:4326 grid of its own (odd size, other pixel size)."""
    out = tmp_path_factory.mktemp("s1") / "s1_vv_vh_4326.tif"
    srcs = [rasterio.open(SSL4EO_S1 / f"{p}.tif") for p in ("VV", "VH")]
    s0 = srcs[0]
    window = rasterio.windows.Window(150, 170, 61, 53)
    left, bottom, right, top = rasterio.windows.bounds(window, s0.transform)
    tr, w, h = calculate_default_transform(
        s0.crs, "EPSG:4326", 61, 53, left, bottom, right, top, resolution=(1.1e-4, 0.95e-4)
    )
    dst = np.full((2, h, w), np.nan, np.float32)
    for i, s in enumerate(srcs):
        reproject(
            s.read(1),
            dst[i],
            src_transform=s.transform,
            src_crs=s.crs,
            dst_transform=tr,
            dst_crs="EPSG:4326",
            dst_nodata=np.nan,
            resampling=Resampling.bilinear,
        )
    profile = dict(driver="GTiff", width=w, height=h, count=2, dtype="float32", nodata=np.nan)
    with rasterio.open(out, "w", crs="EPSG:4326", transform=tr, **profile) as f:
        f.write(dst)
        f.descriptions = ("VV", "VH")
    return out


cli = run_cli


def test_the_built_in_model_ships_with_the_package():
    folder = default_model_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "MODEL_CARD.md").is_file()
    size_mb = (folder / "model.safetensors").stat().st_size / 2**20
    assert size_mb < 20


def test_outputs_lie_on_the_input_grid_and_the_seed_reproduces_them(pipe, s1_4326, tmp_path):
    a = pipe.generate({"s1grd": s1_4326}, ["s2l2a"], num_samples=3, seed=7, steps=4)
    with rasterio.open(s1_4326) as src:
        assert a.grid.crs == src.crs
        assert a.grid.transform == src.transform
        assert (a.grid.width, a.grid.height) == (src.width, src.height)
    s = a["s2l2a"].samples
    assert s.shape == (3, 12, a.grid.height, a.grid.width)
    assert np.isfinite(s).all()
    assert np.abs(s[0] - s[1]).mean() > 1e-3  # samples differ
    again = pipe.generate({"s1grd": s1_4326}, ["s2l2a"], num_samples=3, seed=7, steps=4)
    assert np.array_equal(s, again["s2l2a"].samples)  # same seed, same samples
    other = pipe.generate({"s1grd": s1_4326}, ["s2l2a"], num_samples=3, seed=8, steps=4)
    assert not np.array_equal(s, other["s2l2a"].samples)
    assert np.allclose(a["s2l2a"].std, s.std(0))
    # reflectance in a physical range
    assert 0.0 < float(np.median(a["s2l2a"].mean[1])) < 0.5
    da = a.to_xarray("s2l2a")
    assert da.dims == ("sample", "band", "y", "x") and da.rio.crs == a.grid.crs
    assert list(da.band.values)[:4] == ["B02", "B03", "B04", "B08"]  # registry order


def test_cli_translation_writes_georeferenced_geotiffs(s1_4326, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        res = cli(
            "generate", "-i", f"s1grd={s1_4326}", "-t", "s2l2a", "-n", "2", "--seed", "3",
            "--steps", "3", "-o", str(out),
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "quicklook.png" in res.stdout
        runs.append(out)
    with rasterio.open(s1_4326) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    names = sorted(p.name for p in runs[0].iterdir() if p.name != MARKER)
    assert names == sorted(
        ["generation.json", "item.json", "quicklook.png", "s2l2a_mean.tif", "s2l2a_std.tif"]
        + [f"s2l2a_sample{i}.tif" for i in range(2)]
    )
    for i in range(2):
        with (
            rasterio.open(runs[0] / f"s2l2a_sample{i}.tif") as f,
            rasterio.open(runs[1] / f"s2l2a_sample{i}.tif") as g,
        ):
            assert f.crs == crs and f.transform == transform and f.shape == shape
            assert f.count == 12 and f.descriptions[2] == "B04"
            assert f.tags()["units"] == "reflectance" and np.isnan(f.nodata)
            assert np.array_equal(f.read(), g.read())
    info = json.loads((runs[0] / "generation.json").read_text())
    assert info["seed"] == 3 and info["output_grid"]["width"] == shape[1]


def test_cli_band_infilling_keeps_given_bands(tmp_path):
    rgb = tmp_path / "rgb.tif"
    bands = []
    for b in ("B04", "B03", "B02"):
        with rasterio.open(BEN_S2 / f"{BEN_S2.name}_{b}.tif") as f:
            bands.append(f.read(1))
            profile = f.profile
    profile.update(count=3)
    with rasterio.open(rgb, "w", **profile) as f:
        f.write(np.stack(bands))
    out = tmp_path / "infill"
    res = cli(
        "generate", "-i", f"s2l2a:B04,B03,B02={rgb}", "--scale", "s2l2a=0.0001",
        "-t", "s2l2a", "-n", "2", "--steps", "3", "-o", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    with rasterio.open(out / "s2l2a_sample1.tif") as g:
        b = g.read()
    with rasterio.open(out / "s2l2a_sample0.tif") as f:
        a = f.read()
        names = f.descriptions
        assert f.tags()["given_bands"] == "B02,B03,B04"
        assert f.shape == (120, 120)
    for band, given in zip(("B04", "B03", "B02"), bands, strict=True):
        i = names.index(band)
        assert np.allclose(a[i], given * 1e-4, atol=1e-5)  # the input's own values
    b8 = names.index("B08")
    assert np.abs(a[b8] - b[b8]).mean() > 1e-4  # generated bands vary between samples
    assert 0.0 < float(np.median(a[b8])) < 1.0


def test_cli_joint_generation_at_a_place(tmp_path):
    out = tmp_path / "joint"
    res = cli(
        "generate", "-t", "s2l2a", "-t", "dem", "--size", "32", "--gsd", "10",
        "--lon", "11.35", "--lat", "46.5", "--date", "2021-07-01", "-n", "2", "--steps", "3",
        "-o", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    with rasterio.open(out / "dem_sample0.tif") as f:
        assert f.crs.to_epsg() == 32632 and f.shape == (32, 32)
        assert f.res == (10.0, 10.0)
        assert np.isfinite(f.read()).all()


def test_joint_generation_without_a_place_generates_one(pipe):
    gen = pipe.generate({}, ["dem"], num_samples=2, size=32, gsd=30, steps=3, seed=1)
    loc = gen["location"].values
    assert len(loc) == 2 and all(-90 <= v["lat"] <= 90 for v in loc)
    assert gen.grid.crs.is_projected and gen.grid.width == 32


def _crop(src: Path, out: Path, window: rasterio.windows.Window) -> Path:
    with rasterio.open(src) as f:
        profile = f.profile | {
            "width": window.width, "height": window.height,
            "transform": f.window_transform(window),
        }  # fmt: skip
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(f.read(window=window))
    return out


def test_categorical_target_gives_legend_codes_probabilities_and_entropy(pipe, tmp_path):
    window = rasterio.windows.Window(400, 500, 72, 56)
    b2 = _crop(ZION / "landsat_b2.tif", tmp_path / "b2.tif", window)
    b3 = _crop(ZION / "landsat_b3.tif", tmp_path / "b3.tif", window)
    gen = pipe.generate(
        [("landsat8:B2", b2), ("landsat8:B3", b3)], ["landcover_nlcd"], num_samples=2, steps=2
    )
    res = gen["landcover_nlcd"]
    codes = {e.code for e in res.modality.legend}
    assert set(np.unique(res.samples)) <= codes
    assert np.allclose(np.nansum(res.probs, 0), 1, atol=1e-3)
    assert (res.entropy >= 0).all() and (res.entropy <= np.log(len(codes)) + 1e-4).all()
    gen.save(tmp_path / "lc")
    with rasterio.open(tmp_path / "lc" / "landcover_nlcd_sample0.tif") as f:
        assert f.dtypes[0] == "uint8" and "legend" in f.tags()


@pytest.mark.parametrize(
    "args, message",
    [
        (["-t", "nonsense"], "cannot generate 'nonsense'"),
        (["-i", "radar=x.tif", "-t", "s2l2a"], "does not know input modality 'radar'"),
        (["-i", "s1grd=missing.tif", "-t", "s2l2a"], "file not found"),
        (["-t", "dem", "--lon", "3"], "both --lon and --lat"),
    ],
)
def test_cli_errors_are_one_line_and_leave_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    res = cli("generate", *args, "-o", str(out))
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not any(tmp_path.glob(".out*"))


def test_corrupt_input_is_refused(tmp_path, s1_4326):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(s1_4326.read_bytes()[:600])
    res = cli("generate", "-i", f"s1grd={bad}", "-t", "s2l2a", "-o", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.startswith("error:")
    assert not (tmp_path / "o").exists()


def test_non_empty_output_folder_is_kept(pipe, s1_4326, tmp_path):
    out = tmp_path / "kept"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    gen = pipe.generate({"s1grd": s1_4326}, ["dem"], num_samples=1, steps=1)
    with pytest.raises(TerrasynthError, match="not empty"):
        gen.save(out)
    assert (out / "mine.txt").read_text() == "user data"


@pytest.fixture(scope="module")
def conv_folder(small_store, tmp_path_factory) -> Path:
    """A micro convolutional generator for the small store's modalities, saved (untrained:
    the plumbing, not the quality, is under test)."""
    store = ChipStore.open(small_store)
    mods = {m: store.registry[m].to_dict() for m in store.modalities}
    cfg = ModelConfig(backbone="conv_generator", modalities=mods, stats=store.stats, **MICRO_CONV)
    torch.manual_seed(0)
    return build_model(cfg).save_pretrained(tmp_path_factory.mktemp("conv") / "model")


@pytest.mark.usefixtures("one_torch_thread")
def test_a_conv_generator_writes_georeferenced_reproducible_samples(conv_folder, s1_utm, tmp_path):
    pipe = Pipeline.from_pretrained(conv_folder)
    assert isinstance(pipe.model, ConvGenerator)
    a = pipe.generate(inputs={"s1grd": s1_utm}, targets=["s2l2a"], num_samples=2, seed=0)
    assert a.info["sampler"]["steps"] == 1  # one-step model
    with rasterio.open(s1_utm) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    assert a.grid.crs == crs and a.grid.transform == transform
    s = a["s2l2a"].samples
    assert s.shape == (2, 12, *shape) and np.isfinite(s).all()
    assert np.abs(s[0] - s[1]).mean() > 1e-4  # two samples, not one twice
    # the same seed, the same samples (from a freshly loaded model too); steps asked of a
    # one-step model change nothing
    again = Pipeline.from_pretrained(conv_folder).generate(
        inputs={"s1grd": s1_utm}, targets=["s2l2a"], num_samples=2, seed=0, steps=8
    )
    assert again.info["sampler"]["steps"] == 1
    assert np.array_equal(s, again["s2l2a"].samples)
    other = pipe.generate(inputs={"s1grd": s1_utm}, targets=["s2l2a"], num_samples=2, seed=1)
    assert not np.array_equal(s, other["s2l2a"].samples)
    out = tmp_path / "out"
    a.save(out)
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == sorted(
        ["generation.json", "item.json", "quicklook.png", "s2l2a_mean.tif", "s2l2a_std.tif"]
        + [f"s2l2a_sample{i}.tif" for i in range(2)]
    )
    for i in range(2):
        with rasterio.open(out / f"s2l2a_sample{i}.tif") as f:
            assert f.crs == crs and f.transform == transform and f.shape == shape
            assert f.count == 12 and f.descriptions[2] == "B04"
            assert np.array_equal(f.read(), s[i])
    info = json.loads((out / "generation.json").read_text())
    assert info["model"] == str(conv_folder) and info["seed"] == 0


@pytest.mark.usefixtures("one_torch_thread")
def test_the_sampling_precision_is_chosen_and_recorded(conv_folder, s1_utm):
    pipe = Pipeline.from_pretrained(conv_folder)
    full = pipe.set_precision("float32").generate({"s1grd": s1_utm}, ["s2l2a"], seed=0)
    fast = pipe.set_precision("bfloat16").generate({"s1grd": s1_utm}, ["s2l2a"], seed=0)
    assert full.info["precision"] == "float32" and fast.info["precision"] == "bfloat16"
    a, b = full["s2l2a"].samples, fast["s2l2a"].samples
    assert not np.array_equal(a, b)
    assert np.abs(a - b).mean() < 0.03 * np.abs(a - a.mean((-2, -1), keepdims=True)).mean()
    with pytest.raises(TerrasynthError, match="unknown precision 'half'"):
        pipe.set_precision("half")


def test_a_backbone_without_bfloat16_sampling_refuses_it(small_store):
    store = ChipStore.open(small_store)
    mods = {m: store.registry[m].to_dict() for m in store.modalities}
    cfg = ModelConfig(modalities=mods, stats=store.stats, **MICRO_MODEL)  # the transformer
    pipe = Pipeline(build_model(cfg))
    assert pipe.set_precision("auto").precision == "float32"
    with pytest.raises(TerrasynthError, match="samples in float32 only"):
        pipe.set_precision("bfloat16")


def test_cli_refuses_an_unknown_precision_in_one_line(tmp_path, s1_utm):
    res = cli("generate", "-i", f"s1grd={s1_utm}", "-t", "s2l2a", "--precision", "half",
              "-o", str(tmp_path / "o"))  # fmt: skip
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: --precision: unknown precision 'half'")
    assert not (tmp_path / "o").exists()
