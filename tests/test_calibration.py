"""Post-hoc spread calibration of the one-step generator on a non-test split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from terrasynth.data.store import ChipStore
from terrasynth.errors import TerrasynthError
from terrasynth.evaluation.calibration import (
    BAND_FACTOR_RANGE,
    FACTORS,
    LEVEL_BOUND_MULTIPLES,
    MEAN_FACTOR_RANGE,
    band_factors,
    fit_level_bound,
    fit_spread_scale,
    mean_factors,
)
from terrasynth.models.config import ModelConfig
from terrasynth.models.conv_generator import ConvGenerator
from terrasynth.models.factory import build_model
from terrasynth.models.filters import NUM_BANDS, gaussian_blur
from tests.conftest import MICRO_MODEL, open_micro_conv, open_zero_layers, run_cli

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.needs_data]


@pytest.fixture(scope="module")
def model(small_store) -> ConvGenerator:
    return open_micro_conv(small_store)


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
    one = dict(seed=1, progress=False, bands=False, mean=False)  # the one factor alone
    base = fit_spread_scale(model, str(small_store), split, 4, 8, **one)
    inflated = ConvGenerator(model.config).eval()
    inflated.load_state_dict(model.state_dict())
    with torch.no_grad():  # residual = coefficients x loadings: scale the coefficients
        inflated.coef.weight.mul_(2.0)
        inflated.coef.bias.mul_(2.0)
    fits = fit_spread_scale(inflated, str(small_store), split, 4, 8, **one)
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
    cfg = ModelConfig.from_dict(
        {**model.config.to_dict(), "backbone": "scene_transformer", **MICRO_MODEL}
    )
    transformer = build_model(cfg).save_pretrained(tmp_path / "transformer")
    res = run_cli("calibrate", "-m", str(transformer), "-d", str(small_store))
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


def _draws(n: int, gen: torch.Generator, fine: float, smooth: float) -> torch.Tensor:
    """``n`` windows (n, 2, 40, 40) of white noise times ``fine`` plus a field blurred by
    3 px (rescaled to about unit variance) times ``smooth``."""
    white = torch.randn((n, 2, 40, 40), generator=gen)
    blob = gaussian_blur(torch.randn((n, 2, 40, 40), generator=gen), 3.0) * 10.6
    return fine * white + smooth * blob


def _windows(fine: float, smooth: float, members: int = 6, seed: int = 0):
    """Made-up windows: the truth drawn from (1, 1), each member from (fine, smooth)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(6):
        mu = torch.zeros(8, 2, 40, 40)
        res = torch.stack([_draws(8, gen, fine, smooth) for _ in range(members)])
        y = _draws(8, gen, 1.0, 1.0)
        out.append(("g", mu, res, y, torch.ones_like(y, dtype=torch.bool)))
    return out


def test_band_factors_are_one_for_members_drawn_as_the_truth_is():
    factors, ratio = band_factors(_windows(1.0, 1.0), ["g"])
    factors = np.asarray(factors)
    assert factors.shape == (2, NUM_BANDS)  # per band of the group, per scale
    # the level band holds few values (one per window), so it is looser
    np.testing.assert_allclose(factors[:, :-1], 1.0, atol=0.12)
    assert ((factors[:, -1] > 0.6) & (factors[:, -1] < 1.6)).all()
    np.testing.assert_allclose(ratio, 1 / factors, rtol=1e-6)


def test_band_factors_calm_excess_pixel_noise_and_restore_missing_relief():
    factors = np.asarray(band_factors(_windows(3.0, 0.2), ["g"])[0])
    assert (factors[:, 0] < 0.6).all()  # three times too much pixel noise (blobs add a little)
    assert (factors[:, 2:4].max(1) > 2.0).all()  # a fifth of the 3 px structure
    lo, hi = BAND_FACTOR_RANGE
    assert ((lo <= factors) & (factors <= hi)).all()


def test_band_factors_follow_each_band_and_the_groups_order():
    a, b = _windows(1.0, 1.0, seed=1), _windows(3.0, 1.0, seed=2)
    both = [("a", *w[1:]) for w in a] + [("b", *w[1:]) for w in b]
    ab = np.asarray(band_factors(both, ["a", "b"])[0])
    ba = np.asarray(band_factors(both, ["b", "a"])[0])
    np.testing.assert_allclose(ab, np.concatenate([ba[2:], ba[:2]]))
    assert (ab[2:, 0] < 0.6 * ab[:2, 0]).all()  # group b's pixel noise is the excess one
    assert band_factors(both, ["a", "b", "c"]) == ([], [])  # a group without windows


def test_band_factors_skip_windows_with_unknown_truth():
    windows = _windows(1.0, 1.0)
    poisoned = [(g, mu, res, torch.full_like(y, 1e6), k.clone()) for g, mu, res, y, k in windows]
    for *_, known in poisoned:
        known[:, 0, 0, 0] = False  # one unknown pixel per window: none counts
    assert band_factors(windows + poisoned, ["g"]) == band_factors(windows, ["g"])
    assert band_factors(poisoned, ["g"]) == ([], [])


def test_cli_writes_mean_and_spread_factors_per_scale_and_no_flags_remove_them(
    small_store, tmp_path, model
):
    folder = model.save_pretrained(tmp_path / "conv3")
    args = ("calibrate", "-m", str(folder), "-d", str(small_store), "--split",
            _split(small_store), "--members", "4", "--max-chips", "4")  # fmt: skip
    res = run_cli(*args)  # --mean and --bands are the defaults
    assert res.returncode == 0, res.stderr
    assert "per scale" in res.stdout
    assert "the mean per scale" in res.stdout
    cfg = ModelConfig.load(folder / "config.json")
    assert cfg.spread_bands and set(cfg.spread_bands) <= set(cfg.spread_scale)
    lo, hi = BAND_FACTOR_RANGE
    reg = cfg.registry
    for name, rows in cfg.spread_bands.items():
        rows = np.asarray(rows)
        assert rows.shape == (sum(len(g.bands) for g in reg[name].groups), NUM_BANDS)
        assert ((lo <= rows) & (rows <= hi)).all()
    assert cfg.mean_bands and set(cfg.mean_bands) == set(cfg.spread_bands)
    lo, hi = MEAN_FACTOR_RANGE
    for rows in cfg.mean_bands.values():
        assert ((lo <= np.asarray(rows)) & (np.asarray(rows) <= hi)).all()
    assert ModelConfig.load(folder / "config.json").mean_bands == cfg.mean_bands
    res = run_cli(*args, "--no-bands")
    assert res.returncode == 0, res.stderr
    assert ModelConfig.load(folder / "config.json").spread_bands == {}
    res = run_cli(*args, "--no-mean")  # refitted without it
    assert res.returncode == 0, res.stderr
    assert ModelConfig.load(folder / "config.json").mean_bands == {}


@pytest.mark.parametrize("key", ["spread_bands", "mean_bands"])
@pytest.mark.parametrize(
    "bands",
    [{"dem": [[1.0] * (NUM_BANDS - 1)]}, {"dem": [[1.0] * NUM_BANDS] * 2}, {"nope": [[1.0]]}],
)
def test_scale_factors_of_the_wrong_shape_or_modality_are_refused(model, key, bands):
    cfg = {**model.config.to_dict(), key: bands}
    with pytest.raises(TerrasynthError, match=key):
        ModelConfig.from_dict(cfg).validate()


def _mean_windows(mean_of, members: int = 4, seed: int = 0):
    """Made-up windows: the truth drawn from (1, 1), the mean ``mean_of(truth, gen)``, the
    members' residuals zero."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(6):
        y = _draws(8, gen, 1.0, 1.0)
        res = torch.zeros(members, *y.shape)
        out.append(("g", mean_of(y, gen), res, y, torch.ones_like(y, dtype=torch.bool)))
    return out


def test_mean_factors_undo_a_mean_that_is_too_strong_or_too_weak():
    for gain in (2.0, 0.8):
        factors = np.asarray(mean_factors(_mean_windows(lambda y, g, k=gain: k * y), ["g"]))
        assert factors.shape == (2, NUM_BANDS)
        np.testing.assert_allclose(factors[:, :-1], 1 / gain, rtol=1e-5)
        np.testing.assert_allclose(factors[:, -1], 1.0)  # the level is kept
    lo, hi = MEAN_FACTOR_RANGE
    clipped = np.asarray(mean_factors(_mean_windows(lambda y, g: 0.1 * y), ["g"]))
    np.testing.assert_allclose(clipped[:, :-1], hi)  # ten times too weak: at most doubled
    flipped = np.asarray(mean_factors(_mean_windows(lambda y, g: -y), ["g"]))
    np.testing.assert_allclose(flipped[:, :-1], lo)  # anti-correlated: none of it


def test_mean_factors_drop_invented_fine_structure_and_keep_the_true_broad_one():
    def invented(y, gen):  # the truth's 3 px structure plus pixel noise of its own
        return gaussian_blur(y, 3.0) + torch.randn(y.shape, generator=gen)

    factors = np.asarray(mean_factors(_mean_windows(invented), ["g"]))
    assert (factors[:, 0] < 0.2).all()  # the finest band is mostly made up: shrunk
    assert (np.abs(factors[:, 4] - 1) < 0.1).all()  # broad structure is the truth's
    assert ((factors[:, 3] > 1.1) & (factors[:, 3] < 1.5)).all()  # what the blur weakened


def test_mean_factors_leave_to_the_members_what_their_mean_explains():
    windows = []
    for g, mu, res, y, known in _mean_windows(lambda y, g: 0.5 * y):
        res = (0.5 * y).expand(4, *y.shape).clone()  # the members add the other half
        windows.append((g, mu, res, y, known))
    np.testing.assert_allclose(mean_factors(windows, ["g"]), 1.0, rtol=1e-5)
    poisoned = [(g, mu, res, y, k.clone()) for g, mu, res, y, k in windows]
    for *_, known in poisoned:
        known[:, 0, 0, 0] = False
    assert mean_factors(poisoned, ["g"]) == [] and mean_factors(windows, ["h"]) == []


@pytest.fixture(scope="module")
def bounded(small_store) -> ConvGenerator:
    """The micro generator with the retrieval mixture, its elevation level bounded, over an
    index of the store's training chips."""
    from terrasynth.data.dataset import ChipDataset
    from terrasynth.models.retrieval import build_index

    base = open_micro_conv(small_store)
    cfg = ModelConfig.from_dict(
        {**base.config.to_dict(), "retrieval_mixture": True, "level_correction_bound": 1.0}
    )
    torch.manual_seed(0)
    model = open_zero_layers(ConvGenerator(cfg).eval())
    model.set_retrieval(build_index(ChipDataset(small_store, split="train"), cfg, progress=False))
    return model


def test_the_level_bound_is_scored_per_multiple_and_left_as_it_was(bounded, small_store):
    split = _split(small_store)
    scores = fit_level_bound(bounded, str(small_store), split, 4, 4)
    assert bounded.config.level_correction_bound == 1.0  # restored
    assert list(scores) == list(LEVEL_BOUND_MULTIPLES)
    assert all(np.isfinite(v) and v > 0 for v in scores.values())
    assert len(set(scores.values())) > 1  # the bound changes the samples
    again = fit_level_bound(bounded, str(small_store), split, 4, 4)
    assert again == scores  # the same noise for every call and candidate
    assert fit_level_bound(open_micro_conv(small_store), str(small_store), split, 4, 4) is None


def test_cli_writes_the_best_level_bound(bounded, small_store, tmp_path):
    folder = bounded.save_pretrained(tmp_path / "bounded")
    split = _split(small_store)
    args = ["-m", str(folder), "-d", str(small_store), "--split", split, "--members", "4"]
    res = run_cli("calibrate", *args, "--max-chips", "4")
    assert res.returncode == 0, res.stderr
    scores = fit_level_bound(bounded, str(small_store), split, 4, 4)
    best = min(scores, key=scores.__getitem__)
    assert ModelConfig.load(folder / "config.json").level_correction_bound == best
    assert f"-> {best:g}" in res.stdout
