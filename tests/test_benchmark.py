"""The benchmark loop, its baselines and its report, on a small real store."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from terrasynth.data.dataset import ChipDataset
from terrasynth.data.store import ChipStore
from terrasynth.errors import TerrasynthError
from terrasynth.evaluation.baselines import KNNBaseline, MeanBaseline
from terrasynth.evaluation.benchmark import (
    Direction,
    ModelPredictor,
    default_directions,
    run_benchmark,
)
from terrasynth.evaluation.report import write_report
from terrasynth.models.config import ModelConfig
from terrasynth.models.scene_model import SceneModel
from tests.conftest import MICRO_MODEL

pytestmark = pytest.mark.needs_data


@pytest.fixture(scope="module")
def config(small_store) -> ModelConfig:
    store = ChipStore.open(small_store)
    reg = store.registry
    mods = {m: reg[m].to_dict() for m in store.modalities}
    return ModelConfig(modalities=mods, stats=store.stats, **MICRO_MODEL)


@pytest.fixture(scope="module")
def results(small_store, config, one_torch_thread):
    torch.manual_seed(0)
    model = SceneModel(config)
    predictors = [
        ModelPredictor(model, steps=2),
        MeanBaseline(config),
        KNNBaseline(config, str(small_store), max_train=40),
    ]
    directions = [
        Direction("landsat8", None),
        Direction("landsat8", ("dem",)),
        Direction("landcover_nlcd", ("landsat8",)),
    ]
    return run_benchmark(
        predictors, config, str(small_store), directions, split="train", num_samples=3,
        max_chips=4,
    )  # fmt: skip


def test_default_directions_pair_modalities_found_together(small_store, config):
    ds = ChipDataset(small_store, split="train")
    names = {d.name for d in default_directions(ds, config)}
    assert "all -> landsat8" in names and "dem -> landsat8" in names
    assert "landsat8 -> landcover_nlcd" in names
    assert not any(n.startswith("s1grd ->") and n.endswith("landcover_nlcd") for n in names)


def test_every_predictor_scores_every_direction(results):
    assert len(results) == 9
    for r in results:
        s = r.summary()
        assert s["tiles"] > 0
        if r.kind == "continuous":
            for key in ("mae", "rmse", "psnr", "ssim", "crps", "mae_best_of_n", "wasserstein"):
                assert np.isfinite(s[key]), (r.predictor, r.direction.name, key)
            assert s["crps"] >= 0 and 0 <= s["range_coverage"] <= 1
        else:
            assert 0 <= s["accuracy"] <= 1 and 0 <= s["ece"] <= 1


def test_mean_baseline_is_deterministic_and_knn_is_not(results):
    by = {(r.predictor, r.direction.name): r.summary() for r in results}
    mean = by[("mean", "all -> landsat8")]
    knn = by[("knn", "all -> landsat8")]
    assert mean["diversity"] == 0 and mean["crps"] == pytest.approx(mean["mae"])
    assert knn["diversity"] > 0


def test_report_files(results, tmp_path):
    report = write_report(results, tmp_path / "rep", {"split": "train", "seed": 0})
    folder = tmp_path / "rep"
    assert report == folder / "report.html" and report.is_file()
    data = json.loads((folder / "metrics.json").read_text())
    assert data["settings"]["seed"] == 0 and len(data["rows"]) > 50
    with open(folder / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["predictor"] for r in rows} == {"model", "mean", "knn"}
    md = (folder / "report.md").read_text()
    assert "| all -> landsat8 | knn |" in md and "accuracy" in md
    figs = sorted(p.name for p in (folder / "figures").iterdir())
    assert "reliability_continuous.png" in figs and "reliability_categorical.png" in figs
    assert any(f.startswith("samples_model") for f in figs)
    assert any(f.startswith("hist_knn") for f in figs)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_frozen_protocol_scores_the_same_chips(small_store, config, results, tmp_path):
    from terrasynth.evaluation.benchmark import parse_direction, protocol_of

    settings = {"split": "train", "num_samples": 3, "steps": 2, "eta": 0.0, "seed": 0}
    proto = protocol_of(results, settings)
    name = "dem -> landsat8"
    assert parse_direction(name) == Direction("landsat8", ("dem",))
    assert parse_direction("all -> landsat8") == Direction("landsat8", None)
    chosen = proto["directions"][name]
    assert 0 < len(chosen) <= 4
    again = run_benchmark(
        [MeanBaseline(config)], config, str(small_store), [parse_direction(name)],
        split="train", num_samples=3, chips={name: chosen[:2]},
    )  # fmt: skip
    assert again[0].chip_ids == chosen[:2]
    with pytest.raises(TerrasynthError, match="not usable"):
        run_benchmark(
            [MeanBaseline(config)], config, str(small_store), [parse_direction(name)],
            split="train", chips={name: ["no-such-chip#0"]},
        )  # fmt: skip
    report = write_report(results, tmp_path / "r", settings, proto)
    assert json.loads((report.parent / "protocol.json").read_text())["directions"][name] == chosen
