"""The U-Net backbone: the protocol's shapes, save/load (folders of the old format too),
what reaches it, its objective, a short training through the trainer, generation (Pipeline
and whole scenes) and evaluate."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from terrasynth.data.dataset import ChipDataset, collate_chips
from terrasynth.errors import TerrasynthError
from terrasynth.evaluation.baselines import UNetBaseline, make_baseline
from terrasynth.evaluation.translate import tiles
from terrasynth.models.base import GenerativeModel
from terrasynth.models.config import ModelConfig
from terrasynth.models.factory import build_model, load_model, model_folder
from terrasynth.models.signals import batch_signals
from terrasynth.models.unet import UNet, unet_config
from terrasynth.pipeline import Pipeline
from terrasynth.sampling.conditional import sampling_inputs
from terrasynth.training.objective import (
    CONDITIONED,
    DROPPED,
    GENERATED,
    RegressionObjective,
    regression_roles,
)
from tests.conftest import ZION, run_cli

pytestmark = [pytest.mark.needs_data, pytest.mark.usefixtures("one_torch_thread")]

# chips of the small store's four kinds: Zion (landsat8, nlcd, dem), BigEarthNet (s2l2a,
# s1grd), EOPatch (dem, ndvi, lulc) and EOPatch with S2 L1C (dem, lulc, s2l1c)
CHIPS = [0, 1, 256, 272, 400]
TRAIN_MINUTES = 0.75


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    """The built-in model's config: the U-Net's modalities, statistics and window."""
    return ModelConfig.load(model_folder(None) / "config.json")


@pytest.fixture(scope="module")
def signals(small_store, config):
    ds = ChipDataset(small_store, split="train")
    batch = collate_chips([ds[i] for i in CHIPS])
    tile = tiles(batch, config.image_size, ds.chip_size)[0]
    return batch_signals(tile, config, ds.modalities), tile


def small_unet(config: ModelConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return build_model(replace(unet_config(config), widths=[8, 16, 32])).eval()


def protocol_inputs(sig, targets: list[str], gsd: torch.Tensor, seed: int = 0):
    """``targets`` at t = 1 from their own noise, every other modality of ``sig`` given."""
    gen = torch.Generator().manual_seed(seed)
    x = {
        t: {g: torch.randn(v.shape, generator=gen) for g, v in sig[t].groups.items()}
        for t in targets
    }
    return sampling_inputs(sig, targets, x, 1.0, gsd, None, True)


def old_format_prediction(model: UNet, sig, given: dict[str, torch.Tensor], target: str):
    """What the U-Net predicted before it became a backbone: its input stacked from the
    signals and a per-chip ``given`` flag per modality (known values times the flag, class
    maps as {0, 1} planes, one mask channel per group, nearest-neighbour onto the base
    grid), through the same layers; per group of ``target`` on the group's grid."""
    size = model.config.image_size
    b = next(iter(sig.values())).present.shape[0]
    parts = []
    for mod in model.rasters:
        s, on = sig.get(mod.name), given.get(mod.name)
        for g in mod.groups:
            c = mod.num_classes if mod.kind == "categorical" else len(g.bands)
            if s is None or on is None:
                parts.append(torch.zeros(b, c + 1, size, size))
                continue
            x, k = s.groups[g.name], s.known[g.name]
            w = on.float()[:, None, None, None]
            if mod.kind == "categorical":
                x = (x + 1) / 2
            v = torch.cat([x.float() * k * w, k.amax(1, keepdim=True) * w], 1)
            if g.factor > 1:
                v = F.interpolate(v, scale_factor=g.factor, mode="nearest")
            parts.append(v)
    y = model.heads[target.replace(".", "_")](model.network(torch.cat(parts, 1)))
    mod = model.config.registry[target]
    out, offset = {}, 0
    for g in mod.groups:
        c = mod.num_classes if mod.kind == "categorical" else len(g.bands)
        v = y[:, offset : offset + c]
        out[g.name] = F.avg_pool2d(v, g.factor) if g.factor > 1 else v
        offset += c
    return out


def test_protocol_shapes_and_save_round_trip(config, signals, tmp_path):
    sig, tile = signals
    net = small_unet(config)
    assert isinstance(net, GenerativeModel) and net.default_steps == 1
    assert net.modality_names == [m.name for m in config.raster_modalities()]
    assert net.config.backbone == "unet" and not net.config.vector_modalities()
    rasters = [n for n in net.modality_names if n in sig]
    targets = ["landsat8", "landcover_nlcd", "s2l2a"]
    inputs = protocol_inputs(sig, targets, tile["gsd"])
    with torch.no_grad():
        pred = net(inputs, tile["gsd"])
    assert set(pred) == set(targets)  # generated modalities only (t > 0)
    for name in targets:
        mod = config.registry[name]
        for g in mod.groups:
            c = mod.num_classes if mod.kind == "categorical" else len(g.bands)
            h = config.image_size // g.factor
            assert pred[name][g.name].shape == (len(CHIPS), c, h, h), (name, g.name)
    with torch.no_grad():  # every raster generated, nothing given
        everything = net(protocol_inputs(sig, rasters, tile["gsd"]), tile["gsd"])
    assert set(everything) == set(rasters)
    folder = net.save_pretrained(tmp_path / "u")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((folder / "config.json").read_text())
    assert saved["backbone"] == "unet" and saved["widths"] == [8, 16, 32]
    assert saved["image_size"] == config.image_size
    assert list(saved["modalities"]) == net.modality_names
    for again in (
        load_model(folder),
        UNet.from_pretrained(folder),
        Pipeline(load_model(folder)).model,
    ):
        assert type(again) is UNet
        with torch.no_grad():
            pred2 = again.eval()(inputs, tile["gsd"])
        assert all(torch.equal(pred[n][g], pred2[n][g]) for n in pred for g in pred[n])
    with pytest.raises(TerrasynthError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(TerrasynthError, match="not a U-Net folder"):
        UNetBaseline(config, tmp_path)


def test_old_unet_folders_load_and_predict_as_before(config, signals, tmp_path):
    """A folder of the U-Net before it was a backbone: config.json of its own (no backbone,
    no location or time) and the same weight names."""
    sig, tile = signals
    net = small_unet(config, seed=3)
    names = [m.name for m in config.raster_modalities()]
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(
        json.dumps(
            {
                "modalities": {m: config.modalities[m] for m in names},
                "stats": {m: config.stats[m] for m in names if m in config.stats},
                "image_size": config.image_size,
                "widths": [8, 16, 32],
                "source": "/somewhere/model",
            }
        )
    )
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(old / "model.safetensors"))
    loaded = load_model(old).eval()
    assert type(loaded) is UNet
    cfg = loaded.config
    assert cfg.backbone == "unet" and cfg.widths == [8, 16, 32]
    assert not cfg.use_location and not cfg.use_time and list(cfg.modalities) == names
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    # predictions through the protocol (the baseline's path) are the old ones, bit for bit
    base = make_baseline("unet", config, "store", old)
    assert base.modality_names == names and not base.warnings
    for target, conds in (
        ("landsat8", ["dem", "landcover_nlcd", "location", "time"]),
        ("landcover_nlcd", ["landsat8"]),
        ("dem", [n for n in names if n != "dem"]),
        ("s2l2a", ["s1grd"]),
    ):
        new = base.predict(sig, target, conds, tile["gsd"])
        given = {c: sig[c].present.bool() for c in conds if c in sig and c in names}
        with torch.no_grad():
            ref = old_format_prediction(loaded, sig, given, target)
        for g, v in ref.items():
            v = v.softmax(1) if sig[target].target is not None else v
            assert torch.equal(new[g], v), (target, g)
    # the old folder loads as a model anywhere: Pipeline, and as a run's model
    assert type(Pipeline.from_pretrained(old).model) is UNet


def test_what_is_not_given_does_not_reach_the_output(config, signals, tmp_path):
    sig, tile = signals
    net = small_unet(config)
    gsd = tile["gsd"]
    x = sig["landsat8"].groups["r30m"]
    noisy = dict(sig)
    noisy["landsat8"] = replace(sig["landsat8"], groups={"r30m": x + 3.0})
    absent = dict(noisy)
    absent["landsat8"] = replace(
        noisy["landsat8"], present=torch.zeros(len(CHIPS), dtype=torch.bool)
    )
    out = {}
    with torch.no_grad():
        for key, s, conds in (
            ("none", sig, ["dem"]),
            ("noisy, not a condition", noisy, ["dem"]),
            ("noisy, on no chip", absent, ["dem", "landsat8"]),
            ("noisy, given", noisy, ["dem", "landsat8"]),
        ):
            sigs = {n: s[n] for n in ["landcover_nlcd", *conds]}
            inputs = protocol_inputs(sigs, ["landcover_nlcd"], gsd)
            out[key] = net(inputs, gsd)["landcover_nlcd"]["r30m"]
        # the target's own noise (its noisy input) is never read: a deterministic model
        other = net(
            protocol_inputs(
                {n: sig[n] for n in ["landcover_nlcd", "dem"]}, ["landcover_nlcd"], gsd, seed=9
            ),
            gsd,
        )
    a = out["none"]
    assert torch.equal(a, out["noisy, not a condition"]) and torch.equal(
        a, out["noisy, on no chip"]
    )
    assert torch.equal(a, other["landcover_nlcd"]["r30m"])
    assert not torch.allclose(a[:2], out["noisy, given"][:2])  # the Zion chips hold Landsat 8

    base = UNetBaseline(config, net.save_pretrained(tmp_path / "u"))
    gen = torch.Generator().manual_seed(0)
    conds = ["dem", "landcover_nlcd", "location", "time"]
    got = base.sample(sig, tile, "landsat8", conds, 3, gen)
    same = base.sample(noisy, tile, "landsat8", conds, 3, gen)  # the truth is never read
    assert got["r30m"].shape == (3, *x.shape)
    assert np.array_equal(got["r30m"], same["r30m"])
    assert np.array_equal(got["r30m"][0], got["r30m"][2])  # deterministic: N equal samples
    probs = base.sample(sig, tile, "landcover_nlcd", ["landsat8", "dem"], 2, gen)["r30m"]
    assert np.allclose(probs.sum(2), 1.0, atol=1e-5) and (probs >= 0).all()
    with pytest.raises(TerrasynthError, match="not trained to predict 'corine'"):
        base.predict(sig, "corine", ["s2l2a"], tile["gsd"])
    with pytest.raises(TerrasynthError, match="--unet"):
        make_baseline("unet", config, "store")


def test_regression_roles_give_each_chip_inputs_and_targets(config, signals):
    sig, _ = signals
    sig = dict(sig)
    lone = sig["landsat8"].present.clone()
    # chip 0 keeps one raster modality only: it can be neither input nor target
    for n in ("landcover_nlcd", "dem"):
        p = sig[n].present.clone()
        p[0] = False
        sig[n] = replace(sig[n], present=p)
    names = [m.name for m in config.raster_modalities() if m.name in sig]
    counts: dict[int, set[int]] = {k: set() for k in range(len(CHIPS))}
    for seed in range(30):
        roles = regression_roles(sig, names, torch.Generator().manual_seed(seed))
        assert set(roles) == set(sig)
        for k in range(len(CHIPS)):
            present = {n for n in names if bool(sig[n].present[k])}
            gin = {n for n in names if int(roles[n][k]) == CONDITIONED}
            tgt = {n for n in names if int(roles[n][k]) == GENERATED}
            if k == 0:
                assert bool(lone[0]) and not gin and not tgt
                assert all(int(r[0]) == DROPPED for r in roles.values())
                continue
            assert gin and tgt and not (gin & tgt) and gin | tgt == present
            counts[k].add(len(gin))
            # location and time (not predicted): shown where the chip holds them
            for v in ("location", "time"):
                assert int(roles[v][k]) == (CONDITIONED if bool(sig[v].present[k]) else DROPPED)
    assert counts[1] == {1, 2}  # a Zion chip: 3 modalities, 1 or 2 inputs


def test_regression_objective_is_the_mse_and_cross_entropy_of_one_prediction(config, signals):
    """The loss of a batch equals the one computed chip by chip from the same split."""
    sig, tile = signals
    net = small_unet(config, seed=1)
    sig = {n: s for n, s in sig.items() if n in net.modality_names}  # the U-Net's signals
    gsd = tile["gsd"]
    for seed in (0, 1):
        with torch.no_grad():
            loss, parts = RegressionObjective()(net, sig, gsd, torch.Generator().manual_seed(seed))
        roles = regression_roles(sig, net.modality_names, torch.Generator().manual_seed(seed))
        total: dict[str, float] = {}
        count: dict[str, float] = {}
        for k in range(len(CHIPS)):
            one = {
                n: replace(
                    s,
                    **{
                        f: _chip(getattr(s, f), k) for f in ("present", "groups", "known", "target")
                    },
                )
                for n, s in sig.items()
            }
            tgt = [n for n in one if int(roles[n][k]) == GENERATED]
            conds = [n for n in one if int(roles[n][k]) == CONDITIONED]
            if not tgt:
                continue
            with torch.no_grad():
                pred = net(
                    protocol_inputs({n: one[n] for n in tgt + conds}, tgt, gsd[k : k + 1]),
                    gsd[k : k + 1],
                )
            for n in tgt:
                for g, p in pred[n].items():
                    if one[n].target is not None:
                        cls = one[n].target[g]
                        err = F.cross_entropy(p, cls, ignore_index=-1, reduction="sum")
                        m = float((cls >= 0).sum())
                    else:
                        kn = one[n].known[g]
                        err = ((p - one[n].groups[g]) ** 2 * kn).sum()
                        m = float(kn.sum())
                    total[n] = total.get(n, 0.0) + float(err)
                    count[n] = count.get(n, 0.0) + m
        expect = {n: total[n] / count[n] for n in total if count[n] > 0}
        assert set(parts) == set(expect) and len(expect) >= 3
        for n in expect:
            assert parts[n] == pytest.approx(expect[n], rel=1e-4), n
        assert float(loss) == pytest.approx(np.mean(list(expect.values())), rel=1e-4)


def _chip(x, k: int):
    if x is None:
        return None
    if isinstance(x, dict):
        return {g: v[k : k + 1] for g, v in x.items()}
    return x[k : k + 1]


def one_thread_cli(*args: str):
    """``terrasynth ARGS`` in a fresh interpreter with one torch thread."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        return run_cli(*args)


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory) -> Path:
    """A U-Net trained for TRAIN_MINUTES through the CLI: a run folder of the trainer."""
    out = tmp_path_factory.mktemp("unet") / "unet"
    res = one_thread_cli(
        "baseline", "train-unet", "-d", str(small_store), "-o", str(out),
        "--minutes", str(TRAIN_MINUTES), "--batch-size", "16", "--seed", "0",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "time limit after" in res.stdout and str(out / "model") in res.stdout
    return out


def test_a_short_training_lowers_the_loss(trained, small_store, config):
    assert {"checkpoints", "latest", "metrics.jsonl", "model", "train_config.json"} <= {
        p.name for p in trained.iterdir()
    }
    settings = json.loads((trained / "train_config.json").read_text())
    assert settings["backbone"] == "unet" and settings["schedule"] == "time"
    assert settings["time_limit_min"] == TRAIN_MINUTES and settings["batch_size"] == 16
    logs = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) >= 4  # a log line every 10 steps; how many fit the budget varies with load
    assert [r["step"] for r in logs] == sorted(r["step"] for r in logs)
    assert logs[-1]["elapsed_s"] >= 60 * TRAIN_MINUTES
    # warm-up over 50 steps, then decayed over the time budget: past warm-up, the last log
    # line (written after the budget ran out) is at the cosine's floor; a machine so loaded
    # that the budget ended inside warm-up shows the linear ramp instead
    peak = max(r["lr"] for r in logs)
    if logs[-1]["step"] >= 50:
        assert logs[-1]["lr"] < 0.5 * peak
    else:
        ramp = [r["lr"] / r["step"] for r in logs]
        assert max(ramp) == pytest.approx(min(ramp), rel=0.15), logs
    # how many steps fit the budget varies with the machine's load (40-90 seen), so the
    # training log need only show a fall; the held-out check below carries the margin
    first = np.mean([r["loss"] for r in logs[:2]])
    later = np.mean([r["loss"] for r in logs[len(logs) // 2 :]])
    assert later < first, (first, later)
    net = load_model(trained / "model").eval()
    assert type(net) is UNet and net.config.image_size == config.image_size
    assert net.modality_names == [m.name for m in config.raster_modalities()]
    assert net.config.stats == {m: config.stats[m] for m in net.modality_names if m in config.stats}
    # on held-out chips, with the same input/target splits: better than initial weights
    torch.manual_seed(0)
    initial = build_model(net.config).eval()
    ds = ChipDataset(small_store, split="val")
    pick = np.linspace(0, len(ds) - 1, 24).astype(int).tolist()
    batch = collate_chips([ds[i] for i in pick])
    losses = {"initial": 0.0, "trained": 0.0}
    objective = RegressionObjective()
    with torch.no_grad():
        for i, tile in enumerate(tiles(batch, config.image_size, ds.chip_size)):
            sig = batch_signals(tile, net.config, ds.modalities)
            for key, m in (("initial", initial), ("trained", net)):
                loss, _ = objective(m, sig, tile["gsd"], torch.Generator().manual_seed(i))
                losses[key] += float(loss)
    assert losses["trained"] < 0.85 * losses["initial"], losses


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


@pytest.fixture(scope="module")
def dem_crop(tmp_path_factory) -> Path:
    """96 x 80 px of the Zion SRTM DEM as a GeoTIFF of its own."""
    out = tmp_path_factory.mktemp("dem") / "dem.tif"
    with rasterio.open(ZION / "srtm.tif") as src:
        window = rasterio.windows.Window(300, 400, 96, 80)
        data = src.read(window=window)
        profile = {
            **src.profile,
            "width": 96,
            "height": 80,
            "transform": src.window_transform(window),
        }
    with rasterio.open(out, "w", **profile) as f:
        f.write(data)
    return out


def test_generate_with_the_unet_in_memory_and_as_a_whole_scene(trained, dem_crop, tmp_path):
    """The U-Net is a model like any other: Pipeline and the whole-scene engine run it
    unchanged, one step, every sample the same prediction."""
    pipe = Pipeline.from_pretrained(trained)
    assert type(pipe.model) is UNet and pipe.source == str(trained / "model")
    gen = pipe.generate({"dem": dem_crop}, ["landsat8", "landcover_nlcd"], num_samples=2, seed=0)
    assert gen.info["sampler"]["steps"] == 1
    s = gen["landsat8"].samples
    assert s.shape[0] == 2 and np.isfinite(s).all()
    # the same prediction (up to float rounding: windows batched at other positions)
    landsat = gen["landsat8"]
    assert np.allclose(s[0], s[1], rtol=1e-5, atol=1e-5)
    assert (landsat.std <= 1e-5 * (np.abs(landsat.mean) + 1)).all()
    again = pipe.generate({"dem": dem_crop}, ["landsat8"], num_samples=1, seed=5)
    assert np.allclose(again["landsat8"].samples[0], s[0], rtol=1e-5, atol=1e-5)  # any seed
    out = tmp_path / "scene"
    res = one_thread_cli(
        "generate", "-m", str(trained), "-i", f"dem={dem_crop}", "-t", "landsat8",
        "-n", "2", "--stream", "--tile", "64", "-o", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "whole scene" in res.stdout + res.stderr
    with (
        rasterio.open(out / "landsat8_sample0.tif") as a,
        rasterio.open(out / "landsat8_sample1.tif") as b,
    ):
        x, y = a.read(), b.read()
    assert np.isfinite(x).any() and np.allclose(x, y, rtol=1e-5, atol=1e-5, equal_nan=True)


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
    res = run_cli(
        "baseline", "train-unet", "-d", str(small_store), "-o", str(tmp_path / "u"),
        "--minutes", "0.1",
    )  # fmt: skip
    assert res.returncode == 2 and "not empty" in res.stderr, res.stderr
    assert os.listdir(tmp_path / "u") == ["x"]
