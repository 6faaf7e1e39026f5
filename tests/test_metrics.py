"""Metric formulas against their definitions (pure maths on small made-up arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from terrasynth.evaluation import metrics as M

rng = np.random.default_rng(0)


def test_pointwise_errors():
    t = np.zeros((2, 4, 4))
    p = t + 0.1
    assert M.mae(p, t) == pytest.approx(0.1)
    assert M.rmse(p, t) == pytest.approx(0.1)
    assert M.psnr(p, t, data_range=1.0) == pytest.approx(20.0)
    valid = np.ones((4, 4), bool)
    valid[0] = False
    p2 = p.copy()
    p2[:, 0] = 100  # only where the truth is unknown
    assert M.mae(p2, t, valid) == pytest.approx(0.1)


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    t = rng.uniform(0, 1, (3, 32, 32))
    assert M.ssim(t, t, data_range=1.0) == pytest.approx(1.0)
    noisy = t + rng.normal(0, 0.3, t.shape)
    assert M.ssim(noisy, t, data_range=1.0) < 0.7


def test_spectral_angle():
    t = rng.uniform(0.1, 1, (4, 5, 5))
    assert M.spectral_angle(2 * t, t) == pytest.approx(0.0, abs=1e-4)
    a = np.zeros((2, 1, 1))
    b = np.zeros((2, 1, 1))
    a[0], b[1] = 1, 1
    assert M.spectral_angle(a, b) == pytest.approx(90.0)


def test_crps_matches_pairwise_definition_and_gaussian_closed_form():
    samples = rng.normal(0, 1, (7, 1, 3, 3))
    truth = rng.normal(0, 1, (1, 3, 3))
    x, y = samples.reshape(7, -1), truth.ravel()
    brute = (np.abs(x - y).mean(0) - 0.5 * np.abs(x[:, None] - x[None]).mean((0, 1))).mean()
    assert M.crps_ensemble(samples, truth) == pytest.approx(brute)
    one = samples[:1]
    assert M.crps_ensemble(one, truth) == pytest.approx(M.mae(one[0], truth))
    big = rng.normal(0, 1, (4000, 1, 1, 1))
    closed = 2 / np.sqrt(2 * np.pi) - 1 / np.sqrt(np.pi)  # CRPS of N(0, 1) at y = 0
    assert M.crps_ensemble(big, np.zeros((1, 1, 1))) == pytest.approx(closed, abs=0.01)


def test_coverage_of_a_small_calibrated_ensemble_is_nominal():
    """Eight members drawn from the truth's own distribution: the rank-based interval holds
    the truth at the nominal rate (sample quantiles of 8 members would give about 0.7)."""
    centre = rng.normal(0, 3, (1, 200, 200))
    truth = centre + rng.normal(0, 1, centre.shape)
    samples = centre[None] + rng.normal(0, 1, (8, 1, 200, 200))
    assert M.interval_coverage(samples, truth, 0.9) == pytest.approx(0.9, abs=0.01)
    assert M.interval_coverage(samples, truth, 0.5) == pytest.approx(0.5, abs=0.01)
    q = np.quantile(samples, [0.05, 0.95], axis=0)
    assert float(((truth >= q[0]) & (truth <= q[1])).mean()) < 0.8  # why not quantiles
    wide = centre[None] + rng.normal(0, 3, (8, 1, 200, 200))
    assert M.interval_coverage(wide, truth, 0.9) > 0.97


def test_calibrated_ensemble_has_spread_skill_one_and_nominal_coverage():
    centre = rng.normal(0, 3, (1, 40, 40))
    truth = centre + rng.normal(0, 1, centre.shape)
    samples = centre[None] + rng.normal(0, 1, (30, 1, 40, 40))
    assert M.spread_skill(samples, truth) == pytest.approx(1.0, abs=0.08)
    assert M.interval_coverage(samples, truth, 0.5) == pytest.approx(0.5, abs=0.06)
    assert M.interval_coverage(samples, truth, 0.9) == pytest.approx(0.9, abs=0.05)
    overconfident = centre[None] + rng.normal(0, 0.2, (30, 1, 40, 40))
    assert M.spread_skill(overconfident, truth) < 0.3
    assert M.interval_coverage(overconfident, truth, 0.9) < 0.3
    assert M.diversity(samples) == pytest.approx(2 / np.sqrt(np.pi), rel=0.05)  # E|X - X'|
    assert M.diversity(samples[:1]) == 0.0


def test_distribution_metrics():
    a = rng.normal(0, 1, 5000)
    assert M.band_wasserstein(a, a + 2.0) == pytest.approx(2.0, abs=0.01)
    assert M.range_coverage(a, a) == 1.0
    assert M.range_coverage(a, np.zeros(100)) < 0.1
    real = rng.normal(0, 1, (60, 5))
    same = rng.normal(0, 1, (60, 5))
    far = rng.normal(8, 1, (60, 5))
    good = M.precision_recall_coverage(real, same)
    bad = M.precision_recall_coverage(real, far)
    assert good["precision"] > 0.8 and good["recall"] > 0.8 and good["coverage"] > 0.7
    assert bad["precision"] == 0 and bad["recall"] == 0 and bad["coverage"] == 0
    collapsed = M.precision_recall_coverage(real, np.zeros((60, 5)) + rng.normal(0, 0.01, (60, 5)))
    assert collapsed["recall"] < 0.3  # one mode only: low recall


def test_image_features_shape():
    x = rng.uniform(0, 1, (3, 16, 16))
    assert M.image_features(x).shape == (3 * 6,)


def test_categorical_metrics():
    truth = np.array([[0, 0, 1, 1], [2, 2, -1, -1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    assert M.accuracy(pred, truth) == pytest.approx(4 / 6)
    ious = [1 / 3, 2 / 3, 1 / 2]  # class 0: 1/(3); class 1: 2/3; class 2: 1/2 (valid only)
    assert M.mean_iou(pred, truth, 3) == pytest.approx(np.mean(ious))
    probs = np.zeros((3, 2, 4))
    for c in range(3):
        probs[c][pred == c] = 1.0
    # confident everywhere, right on 4 of 6 known pixels: ECE = 1 - 4/6
    assert M.expected_calibration_error(probs, truth) == pytest.approx(1 - 4 / 6)


def test_gradient_energy_counts_valid_neighbour_pairs_only():
    ramp = np.tile(np.arange(5.0) * 2, (2, 4, 1))  # (2, 4, 5): +2 per column, flat in rows
    total, pairs = M.gradient_energy(ramp)
    assert np.allclose(pairs, 4 * 4 + 3 * 5)  # horizontal + vertical neighbour pairs
    assert np.allclose(total, 4 * 4 * 2.0**2)  # only horizontal steps are non-zero
    valid = np.ones((4, 5), bool)
    valid[:, 2] = False  # cuts every horizontal pair touching column 2
    ramp[:, :, 2] = 1e6  # and what is invalid must not count
    total, pairs = M.gradient_energy(ramp, valid)
    assert np.allclose(pairs, 4 * 2 + 3 * 4)
    assert np.allclose(total, 4 * 2 * 2.0**2)


def smooth_field(shape, sigma=1.5, seed=0):
    from scipy.ndimage import gaussian_filter

    g = np.random.default_rng(seed)
    return gaussian_filter(g.normal(0, 1, shape), (0,) * (len(shape) - 2) + (sigma, sigma))


def test_texture_ratio_sees_smooth_and_noisy_samples():
    truth = smooth_field((2, 32, 32))
    assert M.texture_ratio(truth[None], truth) == pytest.approx(1.0)
    assert M.texture_ratio(2 * truth[None], truth) == pytest.approx(4.0)
    assert M.texture_ratio(np.zeros((3, 2, 32, 32)), truth) == 0.0
    real_like = smooth_field((6, 2, 32, 32), seed=1)  # other draws of the same process
    assert 0.7 < M.texture_ratio(real_like, truth) < 1.4
    from scipy.ndimage import gaussian_filter

    assert M.texture_ratio(gaussian_filter(real_like, (0, 0, 2, 2)), truth) < 0.3
    assert M.texture_ratio(real_like + rng.normal(0, 0.3, real_like.shape), truth) > 5
    # per sample, not of the mean: two samples whose noise cancels in their mean
    noise = rng.normal(0, 0.3, truth.shape)
    pair = np.stack([truth + noise, truth - noise])
    assert M.texture_ratio(pair.mean(0, keepdims=True), truth) == pytest.approx(1.0)
    assert M.texture_ratio(pair, truth) > 5
    assert np.isnan(M.texture_ratio(pair, np.ones_like(truth)))  # a flat truth: undefined


def test_radial_power_spectrum_puts_a_wave_in_its_ring():
    y, x = np.mgrid[:32, :32]
    wave = np.cos(2 * np.pi * 5 * x / 32)[None] + 3.0  # 5 cycles per tile, and an offset
    p = M.radial_power_spectrum(wave)
    assert p.shape == (1, 16) and int(p[0].argmax()) + 1 == 5
    assert p[0, 4] > 100 * np.delete(p[0], [3, 4, 5]).max()  # the Hann window leaks to k +- 1
    white = M.radial_power_spectrum(rng.normal(0, 1, (64, 32, 32))).mean(0)
    assert white[8:].mean() == pytest.approx(white[2:8].mean(), rel=0.2)  # flat


def test_spectrum_ratio_in_log2_units_over_the_high_frequencies():
    truth = smooth_field((2, 32, 32), sigma=1.0)
    assert M.spectrum_ratio(truth[None], truth) == pytest.approx(0.0, abs=1e-9)
    assert M.spectrum_ratio(2 * truth[None], truth) == pytest.approx(2.0, abs=1e-5)  # 4x power
    assert M.spectrum_ratio(np.zeros((2, 2, 32, 32)), truth) == pytest.approx(
        np.log2(M.SPECTRUM_FLOOR), abs=0.01
    )
    from scipy.ndimage import gaussian_filter

    assert M.spectrum_ratio(gaussian_filter(truth, (0, 2, 2))[None], truth) < -3
    noisy = truth[None] + rng.normal(0, 0.3, (4, 2, 32, 32))
    assert M.spectrum_ratio(noisy, truth) > 2
    # only the upper half of the rings counts: a change at low frequency leaves it alone
    y, x = np.mgrid[:32, :32]
    low = truth + 5 * np.cos(2 * np.pi * 2 * x / 32)[None]
    assert M.spectrum_ratio(low[None], truth) == pytest.approx(0.0, abs=0.05)
    # per sample, not of the mean
    noise = rng.normal(0, 0.3, truth.shape)
    assert M.spectrum_ratio(np.stack([truth + noise, truth - noise]), truth) > 2
    assert np.isnan(M.spectrum_log_ratio(np.ones((1, 16)), np.zeros((1, 16))))


def test_sample_spectral_angle_is_of_each_sample_not_of_the_mean():
    truth = np.zeros((3, 2, 2))
    truth[0] = 1.0
    a, b = truth.copy(), truth.copy()
    a[1], b[1] = 1.0, -1.0  # 45 degrees either side: their mean is the truth's direction
    samples = np.stack([a, b])
    assert M.spectral_angle(samples.mean(0), truth) == pytest.approx(0.0, abs=1e-6)
    assert M.sample_spectral_angle(samples, truth) == pytest.approx(45.0)
    t = rng.uniform(0.1, 1, (4, 5, 5))
    assert M.sample_spectral_angle(np.stack([2 * t, 3 * t]), t) == pytest.approx(0.0, abs=1e-3)


# -- elevation ----------------------------------------------------------------------------
def test_relief_and_level_split_the_error_of_a_dem():
    truth = np.array([[[0.0, 2.0], [4.0, 6.0]]])  # mean 3: relief -3, -1, 1, 3
    flat = np.full_like(truth, 10.0)
    assert M.relief_mae(flat, truth) == pytest.approx(2.0)  # mean |true relief|
    assert M.level_mae(flat, truth) == pytest.approx(7.0)
    lifted = truth + 30.0  # the right terrain at the wrong height
    assert M.relief_mae(lifted, truth) == pytest.approx(0.0)
    assert M.level_mae(lifted, truth) == pytest.approx(30.0)
    assert M.mae(lifted, truth) == pytest.approx(30.0)
    flipped = 3.0 - (truth - 3.0)  # the right height, terrain upside down
    assert M.level_mae(flipped, truth) == pytest.approx(0.0)
    assert M.relief_mae(flipped, truth) == pytest.approx(4.0)
    # each band's own mean over its valid pixels; invalid values count nowhere
    valid = np.ones((2, 2), bool)
    valid[1, 1] = False
    spiked = lifted.copy()
    spiked[0, 1, 1] = truth[0, 1, 1] = 1e6
    assert M.relief_mae(spiked, truth, valid) == pytest.approx(0.0)
    assert M.level_mae(spiked, truth, valid) == pytest.approx(30.0)
    # level is weighted by valid pixels per band; mae never exceeds relief + level
    two = rng.normal(100, 20, (2, 6, 6))
    pred = rng.normal(80, 5, (2, 6, 6))
    v = rng.uniform(size=(2, 6, 6)) > 0.3
    levels = [abs(pred[b][v[b]].mean() - two[b][v[b]].mean()) for b in range(2)]
    expect = (levels[0] * v[0].sum() + levels[1] * v[1].sum()) / v.sum()
    assert M.level_mae(pred, two, v) == pytest.approx(expect)
    assert M.mae(pred, two, v) <= M.relief_mae(pred, two, v) + M.level_mae(pred, two, v) + 1e-9


def plane(rise_per_px: float, shape=(1, 8, 8)) -> np.ndarray:
    """Elevation rising ``rise_per_px`` metres per pixel to the east."""
    return np.broadcast_to(np.arange(shape[-1]) * rise_per_px + 500.0, shape).copy()


def test_slope_in_degrees_uses_the_pixel_size():
    truth = plane(10.0)  # 10 m per 10 m pixel: 45 degrees
    fake, true, ok = M.slopes(truth[None], truth, pixel_m=10.0)
    assert ok.all() and np.allclose(true, 45.0) and np.allclose(fake, 45.0)
    _, true20, _ = M.slopes(truth[None], truth, pixel_m=20.0)
    assert np.allclose(true20, np.degrees(np.arctan(0.5)))
    flat = np.full((2, *truth.shape), 700.0)
    assert M.slope_error_median(flat, truth, 10.0) == pytest.approx(45.0)
    assert M.slope_mean_ratio(flat, truth, 10.0) == 0.0
    steep = np.stack([plane(20.0), truth])  # 63.4 and 45 degrees
    assert M.slope_error_median(steep, truth, 10.0) == pytest.approx(
        (np.degrees(np.arctan(2.0)) - 45.0) / 2  # mean over samples of each sample's median
    )
    assert M.slope_mean_ratio(steep, truth, 10.0) == pytest.approx(
        (np.degrees(np.arctan(2.0)) + 45.0) / 2 / 45.0
    )
    assert np.isnan(M.slope_mean_ratio(steep, np.full_like(truth, 3.0), 10.0))  # flat truth


def test_slope_error_is_a_median_over_pixels_whose_neighbours_are_valid():
    truth = plane(10.0)
    bump = truth.copy()
    bump[0, 4, 4] += 100.0  # one wrong pixel: steep slopes around it, the median ignores it
    assert M.slope_error_median(bump[None], truth, 10.0) == pytest.approx(0.0)
    fake, true, ok = M.slopes(bump[None], truth, 10.0)
    assert np.abs(fake - true)[:, ok].mean() > 1  # a mean would not
    valid = np.ones((8, 8), bool)
    valid[2, 2] = False
    hole = truth.copy()
    hole[0, 2, 2] = 1e6  # unknown: neither it nor its neighbours get a slope
    fake, true, ok = M.slopes(hole[None], hole, 10.0, valid)
    assert ok.sum() == 64 - 5 and not ok[0, 1, 2] and not ok[0, 2, 3] and ok[0, 1, 1]
    assert np.allclose(true[ok], 45.0) and np.allclose(fake[:, ok], 45.0)
    assert M.slope_error_median(truth[None], hole, 10.0, valid) == pytest.approx(0.0)
    assert np.isnan(M.slope_error_median(truth[None], truth, 10.0, np.zeros((8, 8), bool)))


def two_group_dem():
    """A made-up elevation modality named ``dem`` with a 10 m and a 20 m band group."""
    from terrasynth.modalities.registry import modality_from_dict

    return modality_from_dict(
        "dem",
        {
            "kind": "continuous", "units": "m", "value_range": [-500, 9000],
            "groups": [
                {"name": "fine", "gsd": 10, "bands": ["a"]},
                {"name": "coarse", "gsd": 20, "bands": ["b"]},
            ],
        },
    )  # fmt: skip


def test_score_tile_gives_elevation_scores_on_each_groups_own_grid():
    import dataclasses

    import torch

    from terrasynth.evaluation.benchmark import Direction, DirectionScores, score_tile
    from terrasynth.models.signals import Signal

    mod = two_group_dem()
    assert [g.factor for g in mod.groups] == [1, 2]
    stats = {"bands": {}}  # identity normalisation: values are metres
    # base grid 10 m: fine 8 x 8 px of 10 m, coarse 4 x 4 px of 20 m, both at 45 degrees
    truth = {"fine": plane(10.0), "coarse": plane(20.0, (1, 4, 4))}
    sig = Signal(
        torch.ones(1, dtype=torch.bool),
        groups={g: torch.from_numpy(v[None]).float() for g, v in truth.items()},
        known={g: torch.ones(1, *v.shape) for g, v in truth.items()},
    )

    def score(samples, gsd=10.0):
        s = DirectionScores(Direction("dem", None), "p", "continuous")
        score_tile(s, mod, {g: v[:, None] for g, v in samples.items()}, sig, stats, 0, gsd)
        return s

    same = score({g: np.stack([v, v]) for g, v in truth.items()})
    out = same.summary()
    assert out["relief_mae"] == 0 and out["level_mae"] == 0
    assert out["slope_error_median"] == 0 and out["slope_mean_ratio"] == pytest.approx(1.0)
    assert same.slope[2] / same.slope[3] == pytest.approx(45.0)  # both groups at 45 degrees
    assert same.slope[1] == 2 * same.slope[3] == 2 * (64 + 16)  # two samples
    lifted = score({g: np.stack([v + 5.0]) for g, v in truth.items()}).summary()
    assert lifted["level_mae"] == pytest.approx(5.0) and lifted["mae"] == pytest.approx(5.0)
    assert lifted["relief_mae"] == pytest.approx(0.0, abs=1e-4)
    assert lifted["slope_error_median"] == pytest.approx(0.0, abs=1e-3)
    # flat samples (the mean baseline): no relief, no slope
    flat = score({g: np.full((1, *v.shape), 600.0) for g, v in truth.items()}).summary()
    assert flat["slope_mean_ratio"] == 0.0
    assert flat["slope_error_median"] == pytest.approx(45.0)
    assert flat["relief_mae"] == pytest.approx(np.abs(plane(10.0) - plane(10.0).mean()).mean())
    # a 30 m base grid: 30 m fine and 60 m coarse pixels, so atan(1/3) degrees
    coarse = score({g: np.stack([v]) for g, v in truth.items()}, gsd=30.0)
    assert coarse.slope[2] / coarse.slope[3] == pytest.approx(np.degrees(np.arctan(1 / 3)))
    # without the pixel size no slope scores; other targets get no elevation scores at all
    none = score({g: np.stack([v]) for g, v in truth.items()}, gsd=None).summary()
    assert "relief_mae" in none and "slope_error_median" not in none
    assert "slope_mean_ratio" not in none
    other = dataclasses.replace(mod, name="ndsm")
    s = DirectionScores(Direction("ndsm", None), "p", "continuous")
    score_tile(s, other, {g: np.stack([v])[:, None] for g, v in truth.items()}, sig, stats, 0, 10.0)
    assert not {"relief_mae", "level_mae", "slope_error_median"} & set(s.summary())
