"""Linear probes: the metrics on made-up arrays, the probe on a separable problem, the MLP
head on a problem no linear probe solves, and ``terrasynth probe`` end to end on a small
real store."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from terrasynth.data.store import ChipStore
from terrasynth.errors import TerrasynthError
from terrasynth.evaluation import metrics as M
from terrasynth.evaluation import probe as probe_module
from terrasynth.evaluation.probe import (
    ProbeRow,
    bootstrap,
    chip_counts,
    class_map_scores,
    confusion,
    fit_linear,
    fit_mlp,
    head,
    label_counts,
    markdown,
    multilabel_scores,
    probe_splits,
    select_and_fit,
)
from terrasynth.models.config import ModelConfig
from terrasynth.models.factory import build_model, model_folder
from terrasynth.models.unet import unet_config
from terrasynth.probe import run_probes
from tests.conftest import DATA, cli_ok, csv_rows, one_line_error

ROOT = Path(__file__).resolve().parents[1]


# -- pure maths ----------------------------------------------------------------------------
def test_class_map_scores_match_the_definitions():
    truth = np.array([0, 0, 0, 1, 1, 2, 2, 2, -1, -1])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 0, 3, 1])
    conf = confusion(pred, truth, 4)
    assert conf.sum() == 8 and conf[0, 0] == 2 and conf[2, 0] == 1  # truth rows, pred columns
    s = class_map_scores(conf)
    assert s["accuracy"] == pytest.approx(M.accuracy(pred, truth)) == pytest.approx(5 / 8)
    assert s["miou"] == pytest.approx(M.mean_iou(pred, truth, 4))
    # per class (0, 1, 2): tp 2, 1, 2; fp 1, 1, 1; fn 1, 1, 1; class 3 never seen
    f1 = [2 * 2 / (4 + 2), 2 * 1 / (2 + 2), 2 * 2 / (4 + 2)]
    assert s["macro_f1"] == pytest.approx(np.mean(f1))
    assert s["miou"] == pytest.approx(np.mean([2 / 4, 1 / 3, 2 / 4]))


def test_multilabel_scores_match_the_definitions():
    truth = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]])
    pred = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0]])
    counts = label_counts(pred, truth)
    assert counts.shape == (4, 4) and counts.sum() == 12
    s = multilabel_scores(counts)
    assert s["accuracy"] == pytest.approx(10 / 12)
    # tp 4, fp 0, fn 2 in all; per label F1: 1, 2/3, 2/3, label 3 never seen
    assert s["micro_f1"] == pytest.approx(8 / 10)
    assert s["macro_f1"] == pytest.approx(np.mean([1, 2 / 3, 2 / 3]))


def test_the_bootstrap_interval_holds_the_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    chips = []
    for _ in range(30):
        truth = rng.integers(0, 3, 50)
        pred = np.where(rng.random(50) < 0.7, truth, rng.integers(0, 3, 50))
        chips.append(confusion(pred, truth, 3))
    per_chip = np.stack(chips)
    out = bootstrap(per_chip, class_map_scores, n=300, seed=5)
    for value, low, high in out.values():
        assert low <= value <= high and high - low > 0
    assert bootstrap(per_chip, class_map_scores, n=300, seed=5) == out
    same = bootstrap(np.stack([chips[0]] * 5), class_map_scores, n=50, seed=0)
    assert all(v == lo == hi for v, lo, hi in same.values())


def test_a_linear_probe_separates_a_separable_problem():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (3, 6))
    y = rng.integers(0, 3, 600)
    x = centres[y] + rng.normal(0, 1, (600, 6))
    chips_x, chips_y = np.split(x, 12), np.split(y, 12)
    probe = select_and_fit((chips_x[:8], chips_y[:8]), (chips_x[8:10], chips_y[8:10]),
                           "categorical", 3)  # fmt: skip
    test = np.concatenate(chips_x[10:])
    assert (probe.predict(test) == np.concatenate(chips_y[10:])).mean() > 0.97
    labels = (x[:, :3] > 0).astype(np.int64)  # each label a half-space
    multi = fit_linear(x[:500], labels[:500], "multilabel", 3, 1e-4)
    s = multilabel_scores(label_counts(multi.predict(x[500:]), labels[500:]))
    assert s["accuracy"] > 0.95 and s["macro_f1"] > 0.9


def test_the_mlp_head_learns_what_a_linear_probe_cannot():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1200, 4))  # two informative features, two of noise
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.int64)  # XOR: no half-space holds it
    cx, cy = np.split(x, 12), np.split(y, 12)
    f1 = {}
    for name in ("linear", "mlp"):
        probe = select_and_fit((cx[:8], cy[:8]), (cx[8:10], cy[8:10]), "categorical", 2,
                               head=head(name, seed=3))  # fmt: skip
        f1[name] = class_map_scores(chip_counts(probe, cx[10:], cy[10:], 2).sum(0))["macro_f1"]
    assert f1["mlp"] > 0.9 and f1["linear"] < 0.7
    labels = np.stack([y, 1 - y], 1)  # label vectors: one sigmoid per label
    multi = fit_mlp(x[:1000], labels[:1000], "multilabel", 2, 1e-2)
    assert multilabel_scores(label_counts(multi.predict(x[1000:]), labels[1000:]))["macro_f1"] > 0.9


def test_the_mlp_head_is_deterministic_given_the_seed():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 5)), rng.integers(0, 3, 300)
    a, b, c = (fit_mlp(x, y, "categorical", 3, 1e-2, seed=s, steps=20) for s in (7, 7, 8))
    assert torch.equal(a.logits(x), b.logits(x)) and not torch.equal(a.logits(x), c.logits(x))
    kept = fit_mlp(x, y, "categorical", 3, 1e-2, start=a, steps=0)  # starts from a's weights
    assert torch.equal(kept.logits(x), a.logits(x))
    with pytest.raises(TerrasynthError, match="unknown probe head 'deep'"):
        head("deep")


# -- on a real store -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    """An untrained small U-Net over the built-in model's rasters."""
    config = ModelConfig.load(model_folder(None) / "config.json")
    torch.manual_seed(0)
    net = build_model(replace(unet_config(config), widths=[8, 16, 32]))
    return net.save_pretrained(tmp_path_factory.mktemp("unet") / "u")


@pytest.mark.needs_data
def test_a_label_set_in_one_split_is_split_again_by_place(small_store):
    st = ChipStore.open(small_store)
    rows, how = probe_splits(st, "landcover_nlcd")
    assert how == "store"
    rows, how = probe_splits(st, "landcover_lulc", seed=0)  # EOPatches: the train split only
    assert how == "by place" and all(len(r) for r in rows.values())
    t = st.table
    places = {s: {(round(a, 3), round(b, 3)) for a, b in t.iloc[r][["lon", "lat"]].to_numpy()}
              for s, r in rows.items()}  # fmt: skip
    assert not places["train"] & places["test"] and not places["train"] & places["val"]
    assert sum(len(r) for r in rows.values()) == int(st.available("landcover_lulc").sum())


@pytest.mark.needs_data
@pytest.mark.usefixtures("one_torch_thread")
def test_the_cli_writes_every_feature_set_and_head(
    small_store, unet_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(probe_module, "MLP_STEPS", 20)  # rows for every head, not their quality
    out = tmp_path / "probe"
    args = ["probe", "-d", str(small_store), "-o", str(out), "--unet", str(unet_folder),
            "--labels", "landcover_nlcd", "--labels", "corine", "--max-chips", "3",
            "--head", "both"]  # fmt: skip
    assert "probe.csv, probe.md" in cli_ok(capsys, args)
    rows = csv_rows(out / "probe.csv")
    assert list(rows[0])[:7] == ["label", "features", "inputs", "metric", "value", "low", "high"]
    assert {r["label"] for r in rows} == {"landcover_nlcd", "corine"}
    for label, metrics in (("landcover_nlcd", {"accuracy", "macro_f1", "miou"}),
                           ("corine", {"accuracy", "micro_f1", "macro_f1"})):  # fmt: skip
        mine = [r for r in rows if r["label"] == label]
        features = {"model", "random_init", "raw_bands", "unet"}
        assert {(r["features"], r["head"]) for r in mine} == {
            (f, h) for f in features for h in ("linear", "mlp")
        }
        assert {r["metric"] for r in mine} == metrics
        for r in mine:
            v, lo, hi = float(r["value"]), float(r["low"]), float(r["high"])
            assert 0 <= lo <= v <= hi <= 1 and r["split"] == "store"
            assert 1 <= int(r["test_places"]) <= int(r["test_chips"]) <= 3
    inputs = {
        label: {r["inputs"] for r in rows if r["label"] == label}
        for label in ("corine", "landcover_nlcd")
    }
    assert inputs == {"corine": {"s2l2a", "s1grd", "s2l2a+s1grd"},
                      "landcover_nlcd": {"landsat8", "dem", "landsat8+dem"}}  # fmt: skip
    md = (out / "probe.md").read_text()
    assert "## landcover_nlcd" in md and "| landsat8+dem | unet | mlp |" in md
    assert "| landcover_nlcd | landsat8 | mlp |" in md  # the summary, per head
    assert (out / ".terrasynth-output").is_file()


@pytest.mark.needs_data
def test_bad_input_is_one_error_line(small_store, tmp_path, capsys):
    from terrasynth.data.build import build_store
    from terrasynth.modalities import default_registry

    bare = tmp_path / "bare"
    build_store([DATA / "landsat8sr_dem_carmel"], bare, default_registry())
    out = str(tmp_path / "out")
    cases = [
        (["-d", str(bare)], "no label modality"),
        (["-d", str(small_store), "--labels", "landsat8"], "'landsat8' is not a label modality"),
        (["-d", str(small_store), "--unet", str(tmp_path)], "not a U-Net folder"),
        (["-d", str(small_store), "--head", "deep"], "--head must be one of linear, mlp, both"),
        (["-d", str(tmp_path / "nowhere")], "nowhere"),
    ]
    for args, pattern in cases:
        one_line_error(capsys, ["probe", *args, "-o", out], pattern)
        assert not (tmp_path / "out").exists()

    class NoFeatures(torch.nn.Module):
        config = ModelConfig.load(model_folder(None) / "config.json")

    with pytest.raises(TerrasynthError, match="has no feature_map"):
        run_probes(NoFeatures(), small_store)


@pytest.mark.needs_data
@pytest.mark.usefixtures("one_torch_thread")
def test_the_python_example_in_the_docs_runs(small_store, tmp_path, monkeypatch):
    doc = (ROOT / "docs" / "probe.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "run_probes" in b)
    (tmp_path / "store").symlink_to(small_store)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "docs/probe.md", "exec"), scope)  # noqa: S102
    assert {r.features for r in scope["rows"]} == {"model", "random_init", "raw_bands"}
    assert scope["best"].metric == "macro_f1" and 0 <= scope["best"].value <= 1
    assert (tmp_path / "probe-out" / "probe.csv").is_file()


def _row(label: str, features: str, value: float, low: float, high: float) -> ProbeRow:
    return ProbeRow(label, features, "s2l2a", "macro_f1", value, low, high, "categorical",
                    "store", 10, 5, 5, 4, 500, 0.01, "linear")  # fmt: skip


def test_the_summary_counts_label_sets_ahead_and_apart():
    rows = [
        # ahead of both, intervals apart
        _row("a", "model", 0.6, 0.55, 0.65), _row("a", "raw_bands", 0.4, 0.35, 0.5),
        _row("a", "random_init", 0.3, 0.2, 0.4),
        # ahead of both, intervals overlapping
        _row("b", "model", 0.5, 0.4, 0.6), _row("b", "raw_bands", 0.45, 0.3, 0.55),
        _row("b", "random_init", 0.3, 0.2, 0.4),
        # behind raw bands
        _row("c", "model", 0.5, 0.4, 0.6), _row("c", "raw_bands", 0.55, 0.5, 0.6),
        _row("c", "random_init", 0.3, 0.2, 0.4),
    ]  # fmt: skip
    md = markdown(rows)
    assert "| a | s2l2a | linear | 0.600 | 0.400 | 0.300 | yes | yes | yes | 4 |" in md
    assert "| b | s2l2a | linear | 0.500 | 0.450 | 0.300 | yes | yes | no | 4 |" in md
    assert "| c | s2l2a | linear | 0.500 | 0.550 | 0.300 | no | yes | no | 4 |" in md
    assert "Ahead of both for some input subset and head: 2 of 3 label sets (a, b)" in md
    assert "apart from both: 1 (a)." in md
