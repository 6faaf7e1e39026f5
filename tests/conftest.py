"""Shared fixtures: the real data in ../shared/data and small stores built from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ZION = DATA / "zion_landsat8_srtm_nlcd"
# A model small enough for unit tests of the model, objective, sampler and trainer.
MICRO_MODEL = dict(image_size=16, patch_size=8, dim=32, depth=1, heads=2, scene_tokens=2)
# The convolutional generator at about that size (32 px: the widest noise filter needs more
# than 16 px).
MICRO_CONV = dict(
    image_size=32, widths=[8, 16], cond_dim=8, generator_channels=8, ensemble=2, retrieval_k=2
)
# The deterministic U-Net at that size.
MICRO_UNET = dict(image_size=16, widths=[8, 16], use_location=False, use_time=False)


def pytest_collection_modifyitems(config, items):
    if not DATA.exists():
        skip = pytest.mark.skip(reason=f"real data folder {DATA} not found")
        for item in items:
            if "needs_data" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def zion_scene():
    """The Zion folder as one Scene, read directly with read_layer (no reader involved)."""
    from terrasynth.data.raster_io import read_layer
    from terrasynth.data.scene import Scene

    layers = [read_layer(ZION / f"landsat_b{b}.tif", "landsat8", [f"B{b}"]) for b in (2, 3, 4, 5)]
    layers.append(read_layer(ZION / "srtm.tif", "dem", ["elevation"]))
    layers.append(read_layer(ZION / "nlcd2011.tif", "landcover_nlcd", ["class"], categorical=True))
    return Scene("zion", "test", "CC0-1.0", layers[0].grid, layers)


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> Path:
    """A store built through the CLI code path from three real sources."""
    from terrasynth.data.build import build_store
    from terrasynth.modalities import default_registry

    out = tmp_path_factory.mktemp("stores") / "small"
    build_store(
        [ZION, DATA / "bigearthnet_v1_examples", DATA / "eolearn_eopatch"],
        out,
        default_registry(),
    )
    return out


@pytest.fixture(scope="session")
def slope_store(tmp_path_factory) -> Path:
    """A store with a stored slope modality (Myanmar: S1, DEM and slope) and chips whose
    slope is derived from their DEM (Zion): training scales their relief at random."""
    from terrasynth.data.build import build_store
    from terrasynth.modalities import default_registry

    out = tmp_path_factory.mktemp("stores") / "slope"
    build_store([DATA / "s1_timeseries_myanmar_srtm", ZION], out, default_registry())
    return out


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory):
    """A real STAC API on loopback with COGs of real data (``stac_catalogue.py``): its URL
    and the request counts of the COG server; started once per session, when asked for."""
    from stac_catalogue import running_catalogue

    with running_catalogue(tmp_path_factory.mktemp("stac")) as served:
        yield served


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def open_micro_conv(store_path: Path):
    """A micro convolutional generator over ``store_path``'s modalities, its zero-initialised
    FiLM layers opened (weights drawn, seed 0) so that its residual varies."""
    import torch

    from terrasynth.data.store import ChipStore
    from terrasynth.models.config import ModelConfig
    from terrasynth.models.conv_generator import ConvGenerator

    store = ChipStore.open(store_path)
    reg = store.registry
    mods = {m: reg[m].to_dict() for m in store.modalities}
    cfg = ModelConfig(backbone="conv_generator", modalities=mods, stats=store.stats, **MICRO_CONV)
    torch.manual_seed(0)
    return open_zero_layers(ConvGenerator(cfg).eval())


def open_zero_layers(model):
    """``model`` with its zero-initialised layers (FiLM, adaLN-Zero gates) drawn small from
    torch's global generator, so every condition acts in tests."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model


def one_line_error(capsys, args: list[str], pattern: str) -> None:
    """``terrasynth ARGS`` in this process stops with one ``error:`` line holding
    ``pattern`` and exit code 2."""
    import pytest

    from terrasynth.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], lines


def cli_ok(capsys, args: list[str]) -> str:
    """``terrasynth ARGS`` in this process exits 0; its standard output."""
    import pytest

    from terrasynth.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    return capsys.readouterr().out


def csv_rows(path: Path) -> list[dict]:
    """The rows of a CSV file as dicts."""
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``terrasynth ARGS`` in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "terrasynth.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


SSL4EO_S1 = (
    DATA
    / "ssl4eo_s12/s1/0000200/S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457"
)


def write_s1_utm(path: Path, width: int, height: int) -> Path:
    """A real Sentinel-1 VV/VH (dB) scene of SSL4EO-S12 warped onto a 10 m UTM grid of
    ``width`` x ``height`` px from its north-west corner (NaN beyond the data)."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.warp import Resampling, reproject

    transform = Affine(10.0, 0, 336030.0, 0, -10.0, 3372750.0)
    dst = np.full((2, height, width), np.nan, np.float32)
    for i, band in enumerate(("VV", "VH")):
        with rasterio.open(SSL4EO_S1 / f"{band}.tif") as src:
            reproject(
                src.read(1), dst[i], src_transform=src.transform, src_crs=src.crs,
                dst_transform=transform, dst_crs="EPSG:32643", dst_nodata=np.nan,
                resampling=Resampling.bilinear,
            )  # fmt: skip
    profile = dict(driver="GTiff", width=width, height=height, count=2, dtype="float32")
    with rasterio.open(
        path, "w", crs="EPSG:32643", transform=transform, nodata=np.nan, **profile
    ) as f:
        f.write(dst)
        f.descriptions = ("VV", "VH")
    return path


@pytest.fixture(scope="session")
def s1_utm(tmp_path_factory) -> Path:
    """96 x 80 px of real Sentinel-1 on a 10 m UTM grid (the working grid itself)."""
    return write_s1_utm(tmp_path_factory.mktemp("s1utm") / "s1_utm.tif", 96, 80)
