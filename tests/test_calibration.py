"""Post-hoc spread calibration of the one-step generator on a non-test split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from terrasynth.data.store import ChipStore
from terrasynth.evaluation.calibration import FACTORS, fit_spread_scale
from terrasynth.models.config import ModelConfig
from terrasynth.models.conv_generator import ConvGenerator
from tests.conftest import MICRO_CONV, run_cli

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.needs_data]


@pytest.fixture(scope="module")
def model(small_store) -> ConvGenerator:
    store = ChipStore.open(small_store)
    reg = store.registry
    mods = {m: reg[m].to_dict() for m in store.modalities}
    cfg = ModelConfig(backbone="conv_generator", modalities=mods, stats=store.stats, **MICRO_CONV)
    torch.manual_seed(0)
    m = ConvGenerator(cfg).eval()
    with torch.no_grad():  # open the zero-initialised FiLM layers so the residual varies
        for p in m.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return m


def _split(store) -> str:
    splits = set(ChipStore.open(store).table["split"])
    return "val" if "val" in splits else "train"


def test_fit_chooses_the_crps_minimum_and_leaves_the_config_as_it_was(model, small_store):
    model.config.spread_scale = {"dem": 3.0}
    fits = fit_spread_scale(model, str(small_store), _split(small_store), 4, 8, progress=False)
    assert model.config.spread_scale == {"dem": 3.0}  # restored after fitting
    model.config.spread_scale = {}
    assert fits, "no continuous modality fitted"
    for fit in fits.values():
        assert fit.values > 0
        assert fit.scale in FACTORS
        assert fit.crps[fit.best] == fit.crps.min()
        r = fit.summary()
        assert r["crps"] <= r["crps_at_1"]
        assert 0.0 <= r["coverage_90"] <= 1.0


def test_a_doubled_residual_is_fitted_half_the_scale(model, small_store):
    split = _split(small_store)
    base = fit_spread_scale(model, str(small_store), split, 4, 8, seed=1, progress=False)
    inflated = ConvGenerator(model.config).eval()
    inflated.load_state_dict(model.state_dict())
    with torch.no_grad():  # residual = coefficients x loadings: scale the coefficients
        inflated.coef.weight.mul_(2.0)
        inflated.coef.bias.mul_(2.0)
    fits = fit_spread_scale(inflated, str(small_store), split, 4, 8, seed=1, progress=False)
    step = np.exp(np.log(FACTORS[1] / FACTORS[0]))
    for name, fit in fits.items():
        ratio = base[name].scale / fit.scale
        if base[name].best in (0, len(FACTORS) - 1):
            continue  # at the edge of the grid the halving cannot show
        assert 2.0 / step <= ratio <= 2.0 * step, (name, ratio)


def test_cli_refuses_the_test_split_and_a_transformer(small_store, tmp_path, model):
    folder = model.save_pretrained(tmp_path / "conv")
    res = run_cli("calibrate", "-m", str(folder), "-d", str(small_store), "--split", "test")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("error:")
    assert "never on the test split" in res.stderr
    res = run_cli("calibrate", "-m", "src/terrasynth/weights/default", "-d", str(small_store))
    assert res.returncode != 0 and "only one-step generators" in res.stderr


def test_cli_writes_the_fitted_scales_into_the_model_config(small_store, tmp_path, model):
    folder = model.save_pretrained(tmp_path / "conv2")
    split = _split(small_store)
    res = run_cli(
        "calibrate", "-m", str(folder), "-d", str(small_store), "--split", split,
        "--members", "4", "--max-chips", "4",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    cfg = ModelConfig.load(folder / "config.json")
    assert cfg.spread_scale
    assert all(np.isclose(FACTORS, v).any() for v in cfg.spread_scale.values())
    assert set(cfg.spread_scale) <= {m.name for m in cfg.raster_modalities()}
