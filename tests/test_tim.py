"""Thinking in modalities: ``terrasynth tim`` end to end on a small real store, what each
arm is given, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from terrasynth.data.dataset import ChipDataset, collate_chips
from terrasynth.data.store import ChipStore
from terrasynth.evaluation.benchmark import ModelPredictor
from terrasynth.evaluation.tim import chip_arrays, generated_channels, tim_chips
from terrasynth.pipeline import Pipeline
from tests.conftest import cli_ok, csv_rows, one_line_error

TASK = ["--labels", "landcover_nlcd", "--given", "landsat8", "--generate", "dem"]


@pytest.fixture(scope="module")
def model():
    return Pipeline.from_pretrained().model.eval()


@pytest.mark.needs_data
@pytest.mark.usefixtures("one_torch_thread")
def test_the_cli_scores_the_four_arms(small_store, tmp_path, capsys):
    out = tmp_path / "tim"
    args = ["tim", "-d", str(small_store), "-o", str(out), *TASK, "--samples", "2",
            "--max-chips", "3", "--epochs", "2", "--width", "8"]  # fmt: skip
    assert "4 arms scored" in cli_ok(capsys, args)
    rows = csv_rows(out / "tim.csv")
    assert {r["arm"] for r in rows} == {"a", "b1", "b2", "c"}
    assert {r["metric"] for r in rows} == {"accuracy", "macro_f1", "miou", "macro_f1_vs_a"}
    value = {(r["arm"], r["metric"]): float(r["value"]) for r in rows}
    assert ("a", "macro_f1_vs_a") not in value
    for arm in ("b1", "b2", "c"):  # the paired gain over arm (a)
        gain = value[(arm, "macro_f1")] - value[("a", "macro_f1")]
        assert value[(arm, "macro_f1_vs_a")] == pytest.approx(gain, abs=1e-5)
    channels = {r["arm"]: int(r["channels"]) for r in rows}
    # landsat8: 7 bands + a mask; dem: 1 band (b1), mean + spread (b2), real + mask (c)
    assert channels == {"a": 8, "b1": 9, "b2": 10, "c": 10}
    for r in rows:
        v, lo, hi = float(r["value"]), float(r["low"]), float(r["high"])
        floor = -1 if r["metric"] == "macro_f1_vs_a" else 0
        assert floor <= lo <= v <= hi <= 1 and r["split"] == "store"
        assert int(r["test_chips"]) == 3 and int(r["epochs"]) == 2
    md = (out / "tim.md").read_text()
    assert "## landcover_nlcd" in md and "| c | landsat8 + real dem |" in md
    assert (out / ".terrasynth-output").is_file()


@pytest.mark.needs_data
@pytest.mark.usefixtures("one_torch_thread")
def test_arm_c_gets_the_real_modality_and_b_a_generated_one(small_store, model):
    st = ChipStore.open(small_store)
    rows, how, with_real = tim_chips(st, "landcover_nlcd", ["landsat8"], "dem", 0, 2)
    assert how == "store" and with_real
    arrays = chip_arrays(model, st, rows, "landcover_nlcd", ["landsat8"], "dem", 3, True)
    ds = ChipDataset(st)
    batch = collate_chips([ds[int(i)] for i in arrays.rows])
    real = batch["dem/r30m"].float()  # store-normalised, as the model reads it
    known = batch["dem/r30m/valid"].bool()
    a, b1, b2, c = (arrays.inputs[k] for k in ("a", "b1", "b2", "c"))
    assert torch.equal(b1[:, :8], a) and torch.equal(c[:, :8], a)
    assert torch.equal(c[:, 8][known], real[:, 0][known])  # the real elevation
    assert torch.equal(c[:, 9], known.float())  # and where it is known
    gen, mean, spread = b1[:, 8], b2[:, 8], b2[:, 9]
    assert (gen - real[:, 0]).abs()[known].mean() > 1e-3  # generated, not the real values
    assert not torch.equal(gen, mean) and (spread > 0).float().mean() > 0.5
    assert arrays.labels.shape == (len(arrays.rows), st.chip_size, st.chip_size)


@pytest.mark.needs_data
@pytest.mark.usefixtures("one_torch_thread")
def test_the_generator_never_sees_the_real_modality(small_store, model):
    st = ChipStore.open(small_store)
    ds = ChipDataset(st)
    rows = np.flatnonzero(st.available("landcover_nlcd") & st.available("dem"))[:2]
    batch = collate_chips([ds[int(i)] for i in rows])
    other = {**batch, "dem/r30m": batch["dem/r30m"] * 5 + 3}
    draws = [
        generated_channels(
            ModelPredictor(model),
            b,
            ds.modalities,
            ["landsat8"],
            "dem",
            st.chip_size,
            2,
            torch.Generator().manual_seed(1),
        )  # fmt: skip
        for b in (batch, other)
    ]
    assert draws[0].shape == (2, 2, 1, st.chip_size, st.chip_size)
    assert torch.equal(draws[0], draws[1])


@pytest.mark.needs_data
def test_bad_input_is_one_error_line(small_store, tmp_path, capsys):
    out = str(tmp_path / "out")
    d = ["-d", str(small_store), "-o", out]
    cases = [
        (["--labels", "landsat8", "--given", "dem", "--generate", "ndvi"],
         "'landsat8' is not a label modality"),
        (["--labels", "corine", "--given", "s1grd", "--generate", "s2l2a"], "not a class map"),
        (["--labels", "landcover_nlcd", "--given", "landsat9", "--generate", "dem"],
         "unknown modality 'landsat9'"),
        (["--labels", "landcover_nlcd", "--given", "dem", "--generate", "dem"],
         "both given and generated"),
        (["--labels", "landcover_nlcd", "--given", "s1grd", "--generate", "dem"],
         "no chip of 'landcover_nlcd' holds s1grd"),
        (["--labels", "landcover_nlcd", "--given", "landsat8"], "--generate"),
    ]  # fmt: skip
    for args, pattern in cases:
        one_line_error(capsys, ["tim", *d, *args], pattern)
        assert not (tmp_path / "out").exists()
