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


class Terrain:
    """Elevation predictors with known answers: the truth itself (``truth``), the truth
    raised by ``lift`` normalised units (``lifted``), or a flat plane tilted to ``degrees``
    on the DEM's own pixels (``tilted``, which needs the tile's pixel size)."""

    def __init__(self, name, config, lift=0.0, degrees=None):
        self.name, self.config, self.lift, self.degrees = name, config, lift, degrees

    def sample(self, signals, tile, target, conditions, num_samples, generator):
        from terrasynth.data.stats import normalise

        mod = self.config.registry[target]
        out = {}
        for g in mod.groups:
            x = signals[target].groups[g.name].numpy()  # (B, C, h, w)
            if self.degrees is None:
                out[g.name] = np.repeat(x[None] + self.lift, num_samples, 0)
                continue
            pixel_m = tile["gsd"].numpy()[:, None, None, None] * g.factor
            cols = np.arange(x.shape[-1])[None, None, None]
            metres = 1500.0 + np.tan(np.radians(self.degrees)) * pixel_m * cols + 0 * x
            z = normalise(metres, self.config.stats[target], g.bands, mod.transform)
            out[g.name] = np.repeat(z[None], num_samples, 0)
        return out


@pytest.fixture(scope="module")
def dem_results(small_store, config):
    predictors = [
        MeanBaseline(config),
        Terrain("truth", config),
        Terrain("lifted", config, lift=0.5),
        Terrain("tilted", config, degrees=30.0),
    ]
    out = run_benchmark(
        predictors, config, str(small_store), [Direction("dem", ("landsat8",))],
        split="train", num_samples=2, max_chips=4,
    )  # fmt: skip
    return {r.predictor: r for r in out}


def test_elevation_scores_relief_level_and_slope(dem_results, config, results):
    s = {p: r.summary() for p, r in dem_results.items()}
    truth, lifted, mean, tilted = s["truth"], s["lifted"], s["mean"], s["tilted"]
    assert truth["tiles"] > 0 and dem_results["truth"].direction.name == "landsat8 -> dem"
    for key in ("relief_mae", "level_mae", "slope_error_median"):
        assert truth[key] == 0.0, key
    assert truth["slope_mean_ratio"] == pytest.approx(1.0)
    # the true slope of the Zion DEM on its 30 m pixels: canyons, neither flat nor vertical
    sums = dem_results["truth"].slope
    true_mean = sums[2] / sums[3]
    assert 5 < true_mean < 45
    # the right terrain 0.5 training standard deviations too high
    std = config.stats["dem"]["bands"]["elevation"]["std"]
    assert lifted["level_mae"] == pytest.approx(0.5 * std, rel=1e-4)
    assert lifted["mae"] == pytest.approx(0.5 * std, rel=1e-4)
    assert lifted["relief_mae"] < 0.01 and lifted["slope_error_median"] < 0.01
    # the mean baseline: a flat DEM, so its relief error is the truth's whole relief
    assert mean["slope_mean_ratio"] == 0.0
    assert mean["relief_mae"] > 10 and mean["level_mae"] > 10
    assert mean["mae"] <= mean["relief_mae"] + mean["level_mae"] + 1e-6
    assert 0 < mean["slope_error_median"] < true_mean * 2
    # a plane of 30 degrees on the DEM's pixels (tile gsd x group factor) scores 30 degrees
    t = dem_results["tilted"].slope
    assert t[0] / t[1] == pytest.approx(30.0, abs=0.01)
    assert tilted["slope_mean_ratio"] == pytest.approx(30.0 / true_mean, rel=1e-3)
    assert tilted["relief_mae"] > mean["relief_mae"] * 0.5
    # only elevation targets get them
    for r in results:
        assert "relief_mae" not in r.summary() and "slope_mean_ratio" not in r.summary()


def _table_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "benchmark_table.py"
    spec = importlib.util.spec_from_file_location("benchmark_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_table_columns_dem_table_and_summaries(tmp_path):
    bt = _table_module()

    def rows(direction, predictor, **metrics):
        target = direction.split(" -> ")[1]
        return [
            {"direction": direction, "target": target, "predictor": predictor,
             "metric": k, "value": v}
            for k, v in {"tiles": 8, **metrics}.items()
        ]  # fmt: skip

    good = dict(mae=1.0, crps=0.5, coverage_90=0.9, spread_skill=1.0, texture_ratio=0.8)
    data = {"settings": {}, "rows": [
        *rows("all -> s2l2a", "model", **good, sample_spectral_angle=9.0),
        *rows("all -> s2l2a", "mean", mae=2.0, crps=2.0),
        *rows("s1grd -> s2l2a", "model", **{**good, "coverage_90": 0.5}),
        *rows("s1grd -> s2l2a", "mean", mae=0.1, crps=0.1),
        *rows("all -> dem", "model", **{**good, "spread_skill": 1.5}, relief_mae=3.0,
              level_mae=4.0, slope_error_median=5.0, slope_mean_ratio=0.5),
        *rows("all -> dem", "mean", mae=9.0, crps=9.0, relief_mae=7.0, level_mae=8.0,
              slope_error_median=6.0, slope_mean_ratio=0.0),
        *rows("all -> landcover_nlcd", "model", accuracy=0.6, miou=0.3, ece=0.1),
    ]}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    table, targets = bt.load(tmp_path)
    text = bt.render(table, targets)  # the all -> directions
    head = next(ln for ln in text.splitlines() if "crps" in ln)
    assert "texture_ratio" in head and "sample_spectral_angle" in head
    assert "input_dependence" not in head  # no --shuffle-conditions in this report
    assert "| all -> s2l2a | model | 8 |" in text and "s1grd -> s2l2a" not in text
    dem_head = next(ln for ln in text.splitlines() if "relief_mae" in ln)
    dem_cols = [c.strip() for c in dem_head.split("|")[4:8]]
    assert dem_cols == ["relief_mae", "level_mae", "slope_error_median", "slope_mean_ratio"]
    assert "| all -> dem | mean | 8 | 7 | 8 | 6 | 0 |" in text
    assert "| all -> landcover_nlcd | model | 8 | 0.6 | 0.3 | 0.1 |" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("model ")]
    assert lines == [
        "model coverage_90 within 0.85-0.95 and spread_skill within 0.8-1.2 in 1 of 2 "
        "listed directions",
        "model CRPS lower than mean on 2 of 2 continuous directions",
    ]
    picked = bt.render(table, targets, ["s1grd -> s2l2a", "all -> s2l2a"])
    order = [ln.split("|")[1].strip() for ln in picked.splitlines() if ln.startswith("| ")]
    assert order[1:] == ["s1grd -> s2l2a"] * 2 + ["all -> s2l2a"] * 2
    assert "relief_mae" not in picked and "landcover" not in picked
    assert "in 1 of 2 listed directions" in picked
    assert "model CRPS lower than mean on 1 of 2 continuous directions" in picked
    with pytest.raises(ValueError, match="not in the report"):
        bt.render(table, targets, ["s1grd -> dem"])
    data["rows"] += rows("all -> s2l2a", "model", input_dependence=1.3)
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    assert "input_dependence" in bt.render(*bt.load(tmp_path))


def test_benchmark_table_on_a_real_report(dem_results, results, tmp_path, capsys):
    bt = _table_module()
    write_report([*results, *dem_results.values()], tmp_path / "rep", {"seed": 0})
    bt.main([str(tmp_path / "rep"), "--directions", "landsat8 -> dem", "all -> landsat8"])
    text = capsys.readouterr().out
    assert "| landsat8 -> dem | truth |" in text and "| all -> landsat8 | knn |" in text
    dem_lines = [ln for ln in text.splitlines() if ln.startswith("| landsat8 -> dem")]
    assert len(dem_lines) == 2 * 4  # the continuous table and the elevation table
    assert "| landsat8 -> dem | truth | " in text and "dem -> landsat8" not in text
    assert "in 1 of 1 listed directions" not in text  # the model: untrained, one direction
    assert "in 0 of 1 listed directions" in text
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "relief_mae ↓" in md and "slope_mean_ratio" in md
