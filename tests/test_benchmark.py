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


def test_texture_and_per_sample_scores(results):
    by = {(r.predictor, r.direction.name): r.summary() for r in results}
    mean = by[("mean", "all -> landsat8")]
    knn = by[("knn", "all -> landsat8")]
    model = by[("model", "all -> landsat8")]
    assert mean["texture_ratio"] == 0.0  # one flat image
    assert mean["spectrum_ratio"] == pytest.approx(np.log2(1e-6), abs=0.01)
    # every sample the same: the per-sample angle is the angle of the mean
    assert mean["sample_spectral_angle"] == pytest.approx(mean["spectral_angle"], rel=1e-4)
    assert 0.1 < knn["texture_ratio"] < 10  # real Landsat 8 from other chips
    assert abs(knn["spectrum_ratio"]) < 3
    assert model["texture_ratio"] > knn["texture_ratio"]  # an untrained model: noise
    assert "texture_ratio" not in by[("knn", "landsat8 -> landcover_nlcd")]


def test_donors_are_other_chips_from_other_scenes_where_possible():
    from terrasynth.evaluation.benchmark import donor_chips

    scenes = np.array(["a"] * 4 + ["b"] * 3 + ["c"] * 3)
    donor = donor_chips(scenes, seed=0)
    assert sorted(donor) == list(range(10))  # a permutation: every chip gives once
    assert (scenes[donor] != scenes).all()  # no scene holds more than half the chips
    assert np.array_equal(donor, donor_chips(scenes, seed=0))
    assert not np.array_equal(donor, donor_chips(scenes, seed=1))
    one = donor_chips(np.array(["a"] * 5), seed=0)  # one scene: at least not itself
    assert sorted(one) == list(range(5)) and (one != np.arange(5)).all()
    big = np.array(["a"] * 7 + ["b"] * 3)
    donor = donor_chips(big, seed=0)
    assert (donor != np.arange(10)).all()
    assert (big[donor][big == "b"] == "a").all()  # the small scene always borrows
    assert len(donor_chips(np.array(["a"]), seed=0)) == 1


class Oracle:
    """Knows the target of every DEM tile it has met: it uses its input completely."""

    name = "oracle"

    def __init__(self) -> None:
        self.memory: dict[tuple[str, bytes], dict[str, np.ndarray]] = {}
        self.calls = 0

    def sample(self, signals, tile, target, conditions, num_samples, generator):
        assert "dem" in conditions and signals["dem"].present.all()
        self.calls += 1
        categorical = signals[target].target is not None
        truth = {  # class probabilities of categorical targets: one-hot in [-1, 1] -> {0, 1}
            g: (v + 1) / 2 if categorical else v for g, v in signals[target].groups.items()
        }
        out = {}
        for g, v in truth.items():
            noise = 0.1 * torch.randn((num_samples, *v.shape), generator=generator).numpy()
            out[g] = noise.astype(np.float32) * (not categorical)
        for k in range(tile["gsd"].shape[0]):
            key = (target, signals["dem"].groups["r30m"][k].numpy().tobytes())
            seen = self.memory.setdefault(key, {g: v[k].numpy() for g, v in truth.items()})
            for g in out:
                out[g][:, k] += seen[g]
        return out


def test_shuffled_conditions_measure_input_dependence(small_store, config):
    direction = [Direction("landsat8", ("dem",)), Direction("landcover_nlcd", ("dem",))]

    def run(shuffle):
        return run_benchmark(
            [Oracle(), MeanBaseline(config)], config, str(small_store), direction,
            split="train", num_samples=2, max_chips=6, shuffle_conditions=shuffle,
        )  # fmt: skip

    plain = {(r.predictor, r.direction.name): r for r in run(False)}
    shuffled = {(r.predictor, r.direction.name): r for r in run(True)}
    oracle = shuffled[("oracle", "dem -> landsat8")]
    s = oracle.summary()
    assert s["crps"] < s["crps_shuffled"] and s["input_dependence"] > 3
    # each chip got another chip's DEM, and the ordinary scores did not change
    assert len(oracle.donors) == 6 and all(a != b for a, b in oracle.donors.items())
    assert sorted(oracle.donors.values()) == sorted(oracle.chip_ids)
    before = plain[("oracle", "dem -> landsat8")].summary()
    assert "crps_shuffled" not in before and "input_dependence" not in before
    for key in ("crps", "mae", "texture_ratio", "spectrum_ratio"):
        assert s[key] == pytest.approx(before[key], rel=1e-6), key
    mean = shuffled[("mean", "dem -> landsat8")].summary()
    assert mean["input_dependence"] == pytest.approx(1.0)  # it ignores its inputs
    assert shuffled[("mean", "dem -> landsat8")].donors == oracle.donors  # the same pairs
    cat = shuffled[("mean", "dem -> landcover_nlcd")].summary()
    assert cat["accuracy_shuffled"] == pytest.approx(cat["accuracy"])
    assert cat["input_dependence"] == pytest.approx(1.0)
