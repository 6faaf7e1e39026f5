"""The baselines' own behaviour beyond the benchmark loop: the noisy U-Net (``unet_noise``),
its standard deviations fitted on the validation split of a small real store."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from terrasynth.data.dataset import ChipDataset, collate_chips
from terrasynth.errors import TerrasynthError
from terrasynth.evaluation.baselines import UNetBaseline, UNetNoiseBaseline, make_baseline
from terrasynth.evaluation.translate import tiles
from terrasynth.models.config import ModelConfig
from terrasynth.models.factory import build_model, model_folder
from terrasynth.models.signals import batch_signals
from terrasynth.models.unet import unet_config

pytestmark = [pytest.mark.needs_data, pytest.mark.usefixtures("one_torch_thread")]

CONDS = ["dem", "location", "time"]


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig.load(model_folder(None) / "config.json")


@pytest.fixture(scope="module")
def unet_folder(config, tmp_path_factory) -> Path:
    """An untrained small U-Net: the noise fit does not care how good it is."""
    torch.manual_seed(0)
    net = build_model(replace(unet_config(config), widths=[8, 16, 32]))
    return net.save_pretrained(tmp_path_factory.mktemp("unet") / "u")


@pytest.fixture(scope="module")
def zion(small_store, config):
    """Signals of one tile of four Zion chips (Landsat 8, DEM, NLCD) of the training split."""
    ds = ChipDataset(small_store, split="train")
    batch = collate_chips([ds[i] for i in (0, 1, 2, 3)])
    tile = tiles(batch, config.window_size, ds.chip_size)[0]
    return batch_signals(tile, config, ds.modalities), tile


def test_sigma_is_the_rms_residual_on_the_validation_split(config, unet_folder, small_store):
    base = UNetNoiseBaseline(config, unet_folder, small_store, max_chips=12)
    real = base.predict

    def off_by_half(sig, target, conditions, gsd):  # a U-Net whose Landsat 8 is the truth + 0.5
        out = real(sig, target, conditions, gsd)
        if target == "landsat8":
            out = {g: sig["landsat8"].groups[g] + 0.5 for g in out}
        return out

    base.predict = off_by_half
    fit = base.fit("landsat8", CONDS)
    val = ChipDataset(small_store, split="val")
    has = {m: val.store.available(m)[val.indices] for m in ("landsat8", "dem")}
    assert fit["split"] == "val" and fit["conditions"] == ["dem"]
    assert fit["chips"] == min(12, int((has["landsat8"] & has["dem"]).sum()))
    seen = [b for b, n in fit["pixels"].items() if n > 0]
    assert seen == ["B2", "B3", "B4", "B5"]  # the Zion folder's bands
    for b, s in fit["sigma"].items():
        assert s == pytest.approx(0.5 if b in seen else 1.0, rel=1e-5), b
    std = config.stats["landsat8"]["bands"]["B3"]["std"]
    assert fit["sigma_physical"]["B3"] == pytest.approx(0.5 * std, rel=1e-5)
    # fitted once per direction: the same conditions reuse it, others get their own
    assert base.fit("landsat8", ["dem", "time"]) is fit
    other = base.fit("landsat8", ["dem", "landcover_nlcd"])
    assert other is not fit and other["conditions"] == ["dem", "landcover_nlcd"]
    json.dumps(base.fitted())  # goes into the report's settings
    # no validation chip holds S2 L1C: the training split stands in
    assert base.fit("s2l1c", ["dem"])["split"] == "train"


def test_samples_scatter_around_the_unet_with_the_fitted_sigma(
    config, unet_folder, small_store, zion
):
    sig, tile = zion
    noisy = make_baseline("unet_noise", config, small_store, unet_folder)
    assert isinstance(noisy, UNetNoiseBaseline) and noisy.name == "unet_noise"
    noisy.max_chips = 8
    plain = UNetBaseline(config, unet_folder)
    gen = torch.Generator().manual_seed(0)
    n = 300
    out = noisy.sample(sig, tile, "landsat8", CONDS, n, gen)["r30m"]  # (N, B, C, h, w)
    ref = plain.sample(sig, tile, "landsat8", CONDS, 1, gen)["r30m"][0]
    sigma = np.array(list(noisy.fits[("landsat8", ("dem",))]["sigma"].values()))
    assert out.shape == (n, *ref.shape) and out.dtype == np.float32
    assert np.all(sigma > 0.05)  # an untrained U-Net is far off
    spread = out.std(0).mean((0, 2, 3))  # per band
    assert spread == pytest.approx(sigma, rel=0.05)
    err = np.abs(out.mean(0) - ref).max((0, 2, 3))
    assert (err < 5 * sigma / np.sqrt(n)).all()
    again = noisy.sample(sig, tile, "landsat8", CONDS, 3, torch.Generator().manual_seed(1))
    same = noisy.sample(sig, tile, "landsat8", CONDS, 3, torch.Generator().manual_seed(1))
    assert np.array_equal(again["r30m"], same["r30m"])
    assert not np.array_equal(again["r30m"][0], again["r30m"][1])
    # land cover: the U-Net's probabilities, no noise
    a = noisy.sample(sig, tile, "landcover_nlcd", CONDS, 2, gen)["r30m"]
    b = plain.sample(sig, tile, "landcover_nlcd", CONDS, 2, gen)["r30m"]
    assert np.array_equal(a, b)


def test_unet_noise_needs_a_unet_folder(config, small_store):
    with pytest.raises(TerrasynthError, match="--baseline unet_noise needs --unet"):
        make_baseline("unet_noise", config, small_store)
