"""The command line as a user meets it: builds, info, preview, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject

from tests.conftest import DATA, ZION, run_cli

pytestmark = pytest.mark.needs_data


cli = run_cli


def assert_one_line_error(res: subprocess.CompletedProcess, pattern: str) -> None:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in res.stderr


def nothing_left(folder: Path, name: str) -> bool:
    return not any(
        p.name == name or (p.name.startswith(f".{name}.") and p.name.endswith(".partial"))
        for p in folder.iterdir()
    )


@pytest.fixture(scope="module")
def landsat_4326(tmp_path_factory) -> Path:
    """Real Zion Landsat bands reprojected to EPSG:4326, odd size, with a nodata region."""
    out = tmp_path_factory.mktemp("geo") / "zion_landsat_4326.tif"
    srcs = [rasterio.open(ZION / f"landsat_b{b}.tif") for b in (2, 3, 4, 5)]
    s0 = srcs[0]
    window = rasterio.windows.Window(100, 200, 333, 271)
    bounds = rasterio.windows.bounds(window, s0.transform)
    tr, w, h = calculate_default_transform(s0.crs, "EPSG:4326", 333, 271, *bounds)
    dst = np.zeros((4, h, w), np.uint16)
    for i, s in enumerate(srcs):
        reproject(
            s.read(1, window=window),
            dst[i],
            src_transform=s.window_transform(window),
            src_crs=s.crs,
            dst_transform=tr,
            dst_crs="EPSG:4326",
            src_nodata=65535,
            dst_nodata=65535,
            resampling=Resampling.bilinear,
        )
    dst[:, : h // 3, :] = 65535  # a nodata strip, as at a scene edge
    with rasterio.open(
        out,
        "w",
        driver="GTiff",
        width=w,
        height=h,
        count=4,
        dtype="uint16",
        crs="EPSG:4326",
        transform=tr,
        nodata=65535,
    ) as f:
        f.write(dst)
    return out


def test_help_and_unknown_command():
    assert cli("--help").returncode == 0
    assert cli("frobnicate").returncode != 0


def test_build_info_preview_from_several_sources(tmp_path):
    store = tmp_path / "store"
    res = cli(
        "data", "build", str(ZION), str(DATA / "ssl4eo_s12"), str(DATA / "flair2"), "-o", str(store)
    )
    assert res.returncode == 0, res.stderr
    info = cli("data", "info", str(store), "--json")
    s = json.loads(info.stdout)
    assert set(s["sources"]) == {"band_folder", "ssl4eo_s12", "flair"}
    assert (
        s["modalities"]["s1grd"]["train"]
        + s["modalities"]["s1grd"]["test"]
        + s["modalities"]["s1grd"]["val"]
        > 0
    )
    text = cli("data", "info", str(store))
    assert "landcover_flair" in text.stdout and "train" in text.stdout
    png = tmp_path / "p.png"
    res = cli("data", "preview", str(store), "-o", str(png), "-n", "3")
    assert res.returncode == 0, res.stderr
    img = __import__("matplotlib.image", fromlist=["imread"]).imread(png)
    assert img.shape[0] > 300 and img.std() > 0.05
    before = png.read_bytes()
    again = cli("data", "preview", str(store), "-o", str(png), "-n", "2")
    assert_one_line_error(again, "use --overwrite")
    assert png.read_bytes() == before
    res = cli("data", "preview", str(store), "-o", str(png), "-n", "2", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert png.read_bytes() != before


def test_generic_mode_epsg4326_with_nodata(tmp_path, landsat_4326):
    store = tmp_path / "g"
    res = cli(
        "data",
        "build",
        "--input",
        f"landsat8:B2,B3,B4,B5={landsat_4326}",
        "--input",
        f"dem={ZION / 'srtm.tif'}",
        "-o",
        str(store),
        "--chip-size",
        "32",
    )
    assert res.returncode == 0, res.stderr
    from terrasynth.data.store import ChipStore

    st = ChipStore.open(store)
    assert set(st.table["crs"]) == {"EPSG:4326"}
    assert st.table["has_dem"].all()
    valid = st.array("landsat8/r30m/valid")[:]
    assert valid.mean() < 1.0  # the nodata strip is carried as invalid, not filled
    data = st.array("landsat8/r30m/data")[:]
    assert (data[:, 1][valid] > 5000).all()  # real B2 DN where valid


def test_truncated_file_fails_cleanly(tmp_path):
    src = tmp_path / "zion"
    shutil.copytree(ZION, src)
    f = src / "landsat_b4.tif"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    res = cli("data", "build", str(src), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, "landsat_b4.tif")
    assert nothing_left(tmp_path, "out")


def test_band_count_mismatch(tmp_path):
    res = cli(
        "data", "build", "--input", f"s2l2a={ZION / 'landsat_b2.tif'}", "-o", str(tmp_path / "out")
    )
    assert_one_line_error(res, "12 band")
    assert nothing_left(tmp_path, "out")


def test_unknown_modality(tmp_path):
    res = cli(
        "data",
        "build",
        "--input",
        f"sentinel9={ZION / 'landsat_b2.tif'}",
        "-o",
        str(tmp_path / "out"),
    )
    assert_one_line_error(res, "unknown modality 'sentinel9'")


def test_non_overlapping_extents(tmp_path, landsat_4326):
    far = tmp_path / "far.tif"
    with rasterio.open(landsat_4326) as s:
        profile = s.profile
        profile["transform"] = rasterio.Affine(
            s.transform.a, 0, s.transform.c + 40, 0, s.transform.e, s.transform.f
        )
        data = s.read()
    with rasterio.open(far, "w", **profile) as d:
        d.write(data)
    res = cli(
        "data",
        "build",
        "--input",
        f"landsat8:B2,B3,B4,B5={landsat_4326}",
        "--input",
        f"dem={far}",
        "-o",
        str(tmp_path / "out"),
    )
    assert_one_line_error(res, "overlap")
    assert nothing_left(tmp_path, "out")


def test_out_of_range_values_are_refused(tmp_path):
    # 16-bit Landsat DN given as NDVI (range -1..1): a scaling mistake, refused
    res = cli(
        "data", "build", "--input", f"ndvi={ZION / 'landsat_b2.tif'}", "-o", str(tmp_path / "out")
    )
    assert_one_line_error(res, "far outside its range")
    assert nothing_left(tmp_path, "out")


def test_unrecognised_folder_alone_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    res = cli("data", "build", str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    assert_one_line_error(res, "not a recognised source format")


def test_user_modality_from_config_file(tmp_path):
    """A modality defined in a YAML file enters a store with no code change."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(
        "modalities:\n"
        "  oli_red:\n"
        "    description: Landsat 8 OLI red band, DN\n"
        "    kind: continuous\n"
        "    units: DN\n"
        "    value_range: [0, 65535]\n"
        "    groups:\n"
        "      - {name: r30m, gsd: 30, bands: [red]}\n"
    )
    store = tmp_path / "s"
    res = cli(
        "data",
        "build",
        "--modalities",
        str(cfg),
        "--input",
        f"oli_red={ZION / 'landsat_b4.tif'}",
        "--input",
        f"dem={ZION / 'srtm.tif'}",
        "-o",
        str(store),
    )
    assert res.returncode == 0, res.stderr
    from terrasynth.data.store import ChipStore

    st = ChipStore.open(store)
    assert "oli_red" in st.modalities
    assert st.array("oli_red/r30m/data").shape[1:] == (1, 64, 64)
    assert st.stats["oli_red"]["bands"]["red"]["mean"] > 1000


def test_generic_mode_per_resolution_files_and_scaling(tmp_path):
    """S2 L1C delivered as one file per resolution, in DN: bands named by descriptions."""
    folder = DATA / "s2l1c_brandenburg"
    files = sorted(folder.glob("*_[126]0m.tif"))
    assert len(files) == 3
    args = [a for f in files for a in ("--input", f"s2l1c={f}")]
    store = tmp_path / "bb"
    # DN given as reflectance: refused with a hint, nothing left behind
    res = cli("data", "build", *args, "-o", str(store))
    assert_one_line_error(res, "--scale")
    assert nothing_left(tmp_path, "bb")
    res = cli("data", "build", *args, "--scale", "s2l1c=0.0001", "-o", str(store))
    assert res.returncode == 0, res.stderr
    from terrasynth.data.store import ChipStore

    st = ChipStore.open(store)
    assert st.array("s2l1c/bands")[:].all()  # all 13 bands found across the three files
    means = {b: v["mean"] for b, v in st.stats["s2l1c"]["bands"].items()}
    assert means["B10"] < 0.01 < means["B02"] < 0.4  # cirrus band dark, visible plausible


def test_generic_mode_band_subset_in_the_key(tmp_path):
    f = DATA / "s2l2a_dolomites" / "S2_L2A_Tofane_202206_B02B03B04B08.tif"
    store = tmp_path / "d"
    res = cli(
        "data",
        "build",
        "--input",
        f"s2l2a:B02,B03,B04,B08={f}",
        "--scale",
        "s2l2a=0.0001",
        "--offset",
        "s2l2a=-0.1",
        "-o",
        str(store),
    )
    assert res.returncode == 0, res.stderr
    from terrasynth.data.store import ChipStore

    st = ChipStore.open(store)
    avail = st.array("s2l2a/bands")[:]
    assert avail[:, :4].all() and not avail[:, 4:].any()
    res = cli("data", "build", "--input", f"s2l2a:B02,B03={f}", "-o", str(tmp_path / "e"))
    assert_one_line_error(res, "file has 4")
    res = cli("data", "build", "--input", f"s2l2a:B99,B03,B04,B08={f}", "-o", str(tmp_path / "e"))
    assert_one_line_error(res, "no band 'B99'")


def test_evaluate_texture_shuffle_and_noisy_unet(small_store, tmp_path):
    """`evaluate` with the noisy U-Net and the shuffle test: the rows and the fitted sigmas."""
    import csv

    import torch

    from terrasynth.models.config import ModelConfig
    from terrasynth.models.factory import build_model, model_folder
    from terrasynth.models.unet import unet_config

    torch.manual_seed(0)
    cfg = unet_config(ModelConfig.load(model_folder(None) / "config.json"))
    cfg.widths = [8, 16, 32]
    folder = build_model(cfg).save_pretrained(tmp_path / "unet")
    out = tmp_path / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        res = cli(
            "evaluate", "-d", str(small_store), "-o", str(out), "--no-model",
            "--baseline", "unet", "--baseline", "unet_noise", "--unet", str(folder),
            "-t", "landsat8", "--max-chips", "3", "-n", "2", "--shuffle-conditions",
        )  # fmt: skip
    assert res.returncode == 0, res.stderr
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = {(r["predictor"], r["direction"], r["metric"]): float(r["value"]) for r in rows}
    d = "dem -> landsat8"
    for p in ("unet", "unet_noise"):
        for m in ("texture_ratio", "spectrum_ratio", "sample_spectral_angle", "crps_shuffled"):
            assert np.isfinite(val[(p, d, m)]), (p, m)
        assert val[(p, d, "input_dependence")] > 0
    assert val[("unet", d, "diversity")] == 0 and val[("unet_noise", d, "diversity")] > 0
    # white noise on top of the U-Net: rougher than the U-Net itself
    assert val[("unet_noise", d, "texture_ratio")] > val[("unet", d, "texture_ratio")]
    assert val[("unet_noise", d, "spectrum_ratio")] > val[("unet", d, "spectrum_ratio")]
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["shuffle_conditions"] is True
    fits = {(f["target"], tuple(f["conditions"])): f for f in settings["unet_noise_sigmas"]}
    assert fits[("landsat8", ("dem",))]["split"] == "val"
    assert "input_dependence" in (out / "report.md").read_text()
    res = cli("evaluate", "-d", str(small_store), "-o", str(tmp_path / "r2"), "--unet", str(folder))
    assert res.returncode != 0 and "only used with --baseline unet or unet_noise" in res.stderr
