"""The U-Net baseline: shapes, save/load, what reaches it, a short real training, evaluate."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from terrasynth.data.dataset import ChipDataset, collate_chips
from terrasynth.errors import TerrasynthError
from terrasynth.evaluation.baselines import UNetBaseline, make_baseline
from terrasynth.evaluation.translate import tiles
from terrasynth.evaluation.unet import (
    UNet,
    UNetConfig,
    model_config_of,
    random_split,
    unet_loss,
)
from terrasynth.models.config import ModelConfig
from terrasynth.models.signals import batch_signals
from tests.conftest import run_cli

pytestmark = [pytest.mark.needs_data, pytest.mark.usefixtures("one_torch_thread")]

# chips of the small store's four kinds: Zion (landsat8, nlcd, dem), BigEarthNet (s2l2a,
# s1grd), EOPatch (dem, ndvi, lulc) and EOPatch with S2 L1C (dem, lulc, s2l1c)
CHIPS = [0, 1, 256, 272, 400]
TRAIN_MINUTES = 0.5


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    """The built-in model's config: the U-Net's modalities, statistics and window."""
    return model_config_of(None)[0]


@pytest.fixture(scope="module")
def signals(small_store, config):
    ds = ChipDataset(small_store, split="train")
    batch = collate_chips([ds[i] for i in CHIPS])
    tile = tiles(batch, config.image_size, ds.chip_size)[0]
    return batch_signals(tile, config, ds.modalities), tile


def small_net(config: ModelConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig.from_model_config(config, widths=(8, 16, 32)))


def everything_given(sig) -> dict[str, torch.Tensor]:
    return {n: s.present.bool() for n, s in sig.items() if s.groups is not None}


def test_predictions_on_each_groups_grid_and_save_round_trip(config, signals, tmp_path):
    sig, _ = signals
    net = small_net(config)
    assert net.modality_names == [m.name for m in config.raster_modalities()]
    with torch.no_grad():
        pred = net.predict(sig, everything_given(sig))
    for name in net.modality_names:
        mod = config.registry[name]
        for g in mod.groups:
            p = pred[name][g.name]
            h = config.image_size // g.factor
            c = mod.num_classes if mod.kind == "categorical" else len(g.bands)
            assert p.shape == (len(CHIPS), c, h, h), (name, g.name)
            if name in sig:
                assert p.shape == sig[name].groups[g.name].shape
    folder = net.save_pretrained(tmp_path / "u")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((folder / "config.json").read_text())
    assert saved["widths"] == [8, 16, 32] and saved["image_size"] == config.image_size
    assert list(saved["modalities"]) == net.modality_names
    again = UNet.from_pretrained(folder)
    with torch.no_grad():
        pred2 = again.predict(sig, everything_given(sig))
    for name in pred:
        for g in pred[name]:
            assert torch.equal(pred[name][g], pred2[name][g])
    with pytest.raises(TerrasynthError, match="not a U-Net folder"):
        UNet.from_pretrained(tmp_path)


def test_random_split_gives_each_chip_inputs_and_targets(config, signals):
    sig, _ = signals
    sig = dict(sig)
    lone = sig["landsat8"].present.clone()
    # chip 0 keeps one raster modality only: it can be neither input nor target
    for n in ("landcover_nlcd", "dem"):
        p = sig[n].present.clone()
        p[0] = False
        sig[n] = replace(sig[n], present=p)
    names = [m.name for m in config.raster_modalities()]
    counts: dict[int, set[int]] = {k: set() for k in range(len(CHIPS))}
    for seed in range(30):
        given, target = random_split(sig, names, torch.Generator().manual_seed(seed))
        for k in range(len(CHIPS)):
            present = {n for n in given if bool(sig[n].present[k])}
            gin = {n for n in given if bool(given[n][k])}
            tgt = {n for n in target if bool(target[n][k])}
            if k == 0:
                assert bool(lone[0]) and not gin and not tgt
                continue
            assert gin and tgt and not (gin & tgt) and gin | tgt == present
            counts[k].add(len(gin))
    assert counts[1] == {1, 2}  # a Zion chip: 3 modalities, 1 or 2 inputs


def test_what_is_not_given_does_not_reach_the_output(config, signals, tmp_path):
    sig, tile = signals
    net = small_net(config)
    given = everything_given(sig)
    given.pop("landsat8")
    noisy = dict(sig)
    x = sig["landsat8"].groups["r30m"]
    noisy["landsat8"] = replace(sig["landsat8"], groups={"r30m": x + 3.0})
    with torch.no_grad():
        a = net.predict(sig, given)["landcover_nlcd"]["r30m"]
        b = net.predict(noisy, given)["landcover_nlcd"]["r30m"]
        given["landsat8"] = torch.zeros(len(CHIPS), dtype=torch.bool)  # given on no chip
        b2 = net.predict(noisy, given)["landcover_nlcd"]["r30m"]
        given["landsat8"] = sig["landsat8"].present.bool()
        c = net.predict(noisy, given)["landcover_nlcd"]["r30m"]
    assert torch.equal(a, b) and torch.equal(a, b2)
    assert not torch.allclose(a[:2], c[:2])  # the Zion chips hold Landsat 8

    base = UNetBaseline(config, net.save_pretrained(tmp_path / "u"))
    gen = torch.Generator().manual_seed(0)
    conds = ["dem", "landcover_nlcd", "location", "time"]
    out = base.sample(sig, tile, "landsat8", conds, 3, gen)
    same = base.sample(noisy, tile, "landsat8", conds, 3, gen)  # the truth is never read
    assert out["r30m"].shape == (3, *x.shape)
    assert np.array_equal(out["r30m"], same["r30m"])
    assert np.array_equal(out["r30m"][0], out["r30m"][2])  # deterministic: N equal samples
    probs = base.sample(sig, tile, "landcover_nlcd", ["landsat8", "dem"], 2, gen)["r30m"]
    assert np.allclose(probs.sum(2), 1.0, atol=1e-5) and (probs >= 0).all()
    with pytest.raises(TerrasynthError, match="--unet"):
        make_baseline("unet", config, "store")


def one_thread_cli(*args: str):
    """``terrasynth ARGS`` in a fresh interpreter with one torch thread."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        return run_cli(*args)


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory) -> Path:
    """A U-Net trained for TRAIN_MINUTES through the CLI."""
    out = tmp_path_factory.mktemp("unet") / "unet"
    res = one_thread_cli(
        "baseline", "train-unet", "-d", str(small_store), "-o", str(out),
        "--minutes", str(TRAIN_MINUTES), "--batch-size", "16", "--seed", "0",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "time limit after" in res.stdout and str(out) in res.stdout
    return out


def test_a_short_training_lowers_the_loss(trained, small_store, config):
    assert {p.name for p in trained.iterdir()} == {
        "config.json", "model.safetensors", "metrics.jsonl", "train_config.json",
    }  # fmt: skip
    logs = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) >= 5  # a log line every 10 steps; how many fit the budget varies
    assert [r["step"] for r in logs] == sorted(r["step"] for r in logs)
    assert logs[-1]["elapsed_s"] >= 60 * TRAIN_MINUTES
    first = np.mean([r["loss"] for r in logs[:2]])
    last = np.mean([r["loss"] for r in logs[-2:]])
    assert last < 0.8 * first, (first, last)
    # on held-out chips, with the same input/target splits: better than the initial weights
    settings = json.loads((trained / "train_config.json").read_text())
    assert settings["minutes"] == TRAIN_MINUTES and settings["batch_size"] == 16
    torch.manual_seed(0)  # the initial weights of the run (seed 0)
    initial = UNet(UNetConfig.load(trained / "config.json")).eval()
    net = UNet.from_pretrained(trained)
    ds = ChipDataset(small_store, split="val")
    pick = np.linspace(0, len(ds) - 1, 24).astype(int).tolist()
    batch = collate_chips([ds[i] for i in pick])
    losses = {"initial": 0.0, "trained": 0.0}
    with torch.no_grad():
        for i, tile in enumerate(tiles(batch, config.image_size, ds.chip_size)):
            sig = batch_signals(tile, net.config.model_config(), ds.modalities)
            for key, m in (("initial", initial), ("trained", net)):
                loss, _ = unet_loss(m, sig, torch.Generator().manual_seed(i))
                losses[key] += float(loss)
    assert losses["trained"] < 0.8 * losses["initial"], losses


def test_evaluate_scores_the_unet_baseline(trained, small_store, tmp_path):
    out = tmp_path / "report"
    res = one_thread_cli(
        "evaluate", "-d", str(small_store), "-o", str(out), "--no-model",
        "--baseline", "unet", "--unet", str(trained),
        "-t", "landsat8", "-t", "landcover_nlcd", "--max-chips", "2", "-n", "2",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = {(r["predictor"], r["direction"], r["metric"]): float(r["value"]) for r in rows}
    assert {r["predictor"] for r in rows} == {"unet"}
    directions = {r["direction"] for r in rows if r["predictor"] == "unet"}
    assert {"all -> landsat8", "dem -> landsat8", "landsat8 -> landcover_nlcd"} <= directions
    for d in directions:
        assert val[("unet", d, "tiles")] > 0
        assert val[("unet", d, "diversity")] == 0  # one prediction, N times
        if d.endswith("landsat8"):
            assert val[("unet", d, "crps")] == pytest.approx(val[("unet", d, "mae")], rel=1e-5)
        else:
            assert 0 <= val[("unet", d, "accuracy")] <= 1
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["unet"] == str(trained)


def test_evaluate_needs_a_unet_folder(small_store, tmp_path):
    res = run_cli(
        "evaluate", "-d", str(small_store), "-o", str(tmp_path / "r"), "--no-model",
        "--baseline", "unet",
    )  # fmt: skip
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: --baseline unet needs --unet")
    assert not (tmp_path / "r").exists()


def test_train_unet_refuses_a_used_folder(small_store, tmp_path):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "x").write_text("")
    from terrasynth.evaluation.unet import train_unet

    with pytest.raises(TerrasynthError, match="not empty"):
        train_unet(small_store, tmp_path / "u", minutes=0.1)
    assert os.listdir(tmp_path / "u") == ["x"]
