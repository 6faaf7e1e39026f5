"""Metrics for generated rasters: pointwise, distributional, calibration, categorical.

Conventions: ``samples`` (N, C, H, W) is an ensemble of N generations of one scene,
``truth`` (C, H, W) the real image, ``valid`` (H, W) or (C, H, W) where the truth is known;
all in physical units. Every function returns plain floats (means over valid values).

Written here rather than taken from a library: scikit-image's SSIM and the usual CRPS
packages work on plain arrays without validity masks and would need the same masking code
around them; the formulas are a few lines each and are checked against their definitions
in ``tests/test_metrics.py``.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter
from scipy.stats import wasserstein_distance

from terrasynth.data.derived import slope_degrees


def _mask(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if valid is None:
        return np.ones(shape, bool)
    return np.broadcast_to(valid, shape)


# -- pointwise ----------------------------------------------------------------------------
def mae(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    m = _mask(valid, truth.shape)
    return float(np.abs(pred - truth)[m].mean())


def rmse(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    m = _mask(valid, truth.shape)
    return float(np.sqrt(((pred - truth) ** 2)[m].mean()))


def psnr(pred: np.ndarray, truth: np.ndarray, data_range: float, valid=None) -> float:
    """Peak signal-to-noise ratio in dB for a given data range (e.g. the training p01-p99)."""
    err = rmse(pred, truth, valid)
    return float(20 * np.log10(data_range / max(err, 1e-12)))


def ssim(pred: np.ndarray, truth: np.ndarray, data_range: float, valid=None, win: int = 7):
    """Mean structural similarity over bands (uniform ``win`` x ``win`` window, Wang et al.
    2004 constants), averaged over pixels whose whole window is valid."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for b in range(truth.shape[0]):
        x, y = pred[b].astype(np.float64), truth[b].astype(np.float64)
        m = _mask(valid, truth.shape)[b].astype(np.float64)
        x, y = x * m, y * m
        mx, my = uniform_filter(x, win), uniform_filter(y, win)
        vx = uniform_filter(x * x, win) - mx * mx
        vy = uniform_filter(y * y, win) - my * my
        cxy = uniform_filter(x * y, win) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        full = uniform_filter(m, win) > 1 - 1e-9
        half = win // 2
        full[:half], full[-half:], full[:, :half], full[:, -half:] = False, False, False, False
        if full.any():
            vals.append(s[full].mean())
    return float(np.mean(vals)) if vals else float("nan")


def spectral_angle(pred: np.ndarray, truth: np.ndarray, valid=None) -> float:
    """Mean angle in degrees between predicted and true spectra (multispectral)."""
    m = _mask(valid, truth.shape).all(0)
    p, t = pred[:, m], truth[:, m]
    cos = (p * t).sum(0) / np.maximum(np.linalg.norm(p, axis=0) * np.linalg.norm(t, axis=0), 1e-12)
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean())


def best_of_n_mae(samples: np.ndarray, truth: np.ndarray, valid=None) -> float:
    """MAE of the sample closest to the truth (whole image)."""
    return min(mae(s, truth, valid) for s in samples)


def sample_spectral_angle(samples: np.ndarray, truth: np.ndarray, valid=None) -> float:
    """Mean over samples of each sample's mean spectral angle to the truth (degrees).

    Unlike :func:`spectral_angle` of the sample mean, averaging the samples first cannot
    hide spectra that no single sample gets right (or wrong)."""
    return float(np.mean([spectral_angle(s, truth, valid) for s in samples]))


# -- elevation ----------------------------------------------------------------------------
def relief_mae(pred: np.ndarray, truth: np.ndarray, valid=None) -> float:
    """MAE of the relief: per band, prediction and truth each minus their own mean over the
    valid pixels, then the mean absolute difference over all valid values. The error in the
    shape of the terrain, not in its absolute level (a flat prediction scores the mean
    absolute deviation of the truth from its mean)."""
    m = _mask(valid, truth.shape)
    total, count = 0.0, 0
    for b in range(truth.shape[0]):
        if m[b].any():
            p, t = pred[b][m[b]].astype(np.float64), truth[b][m[b]].astype(np.float64)
            total += float(np.abs((p - p.mean()) - (t - t.mean())).sum())
            count += p.size
    return total / count if count else float("nan")


def level_mae(pred: np.ndarray, truth: np.ndarray, valid=None) -> float:
    """Absolute difference between the mean of the prediction and the mean of the truth
    over the valid pixels, per band, averaged over bands weighted by their valid pixels:
    the error in absolute level that :func:`relief_mae` leaves out."""
    m = _mask(valid, truth.shape)
    total, count = 0.0, 0
    for b in range(truth.shape[0]):
        n = int(m[b].sum())
        if n:
            p, t = pred[b][m[b]].astype(np.float64), truth[b][m[b]].astype(np.float64)
            total += n * abs(p.mean() - t.mean())
            count += n
    return total / count if count else float("nan")


def slopes(
    samples: np.ndarray, truth: np.ndarray, pixel_m: float, valid=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Terrain slope in degrees of every sample (N, C, H, W) and of the truth (C, H, W),
    elevations in metres on ``pixel_m`` metre pixels (finite differences,
    :func:`terrasynth.data.derived.slope_degrees`), and where the slope is defined (C, H, W):
    pixels that are valid with their four neighbours. The samples' slopes use the truth's
    validity, so both are compared on the same pixels."""
    m = _mask(valid, truth.shape)
    true, ok = np.zeros(truth.shape, np.float32), np.zeros(truth.shape, bool)
    fake = np.zeros(samples.shape, np.float32)
    for b in range(truth.shape[0]):
        true[b], ok[b] = slope_degrees(truth[b], m[b], pixel_m)
        for i, s in enumerate(samples):
            fake[i, b] = slope_degrees(s[b], m[b], pixel_m)[0]
    return fake, true, ok


def median_slope_error(fake: np.ndarray, true: np.ndarray, ok: np.ndarray) -> float:
    """Per sample, the median over the pixels ``ok`` of |slope of the sample - true slope|,
    averaged over samples (degrees); arrays as returned by :func:`slopes`."""
    if not ok.any():
        return float("nan")
    return float(np.mean([np.median(np.abs(f[ok] - true[ok])) for f in fake]))


def slope_error_median(samples: np.ndarray, truth: np.ndarray, pixel_m: float, valid=None):
    """Median absolute slope error (degrees) of each sample, averaged over the samples."""
    return median_slope_error(*slopes(samples, truth, pixel_m, valid))


def slope_mean_ratio(samples: np.ndarray, truth: np.ndarray, pixel_m: float, valid=None):
    """Mean slope of the samples (all of them, where the slope is defined) over the mean
    true slope: 1 as steep as the real terrain, 0 flat, > 1 too steep (NaN for a flat
    truth)."""
    fake, true, ok = slopes(samples, truth, pixel_m, valid)
    t = float(true[ok].mean()) if ok.any() else 0.0
    return float(fake[:, ok].mean()) / t if t > 0 else float("nan")


# -- texture ------------------------------------------------------------------------------
def gradient_energy(x: np.ndarray, valid=None) -> tuple[np.ndarray, np.ndarray]:
    """Per band of a (C, H, W) image: the sum of squared finite differences between
    horizontal and vertical neighbours that are both valid, and the number of such pairs."""
    m = _mask(valid, x.shape)
    mx = m[:, :, 1:] & m[:, :, :-1]
    my = m[:, 1:] & m[:, :-1]
    with np.errstate(invalid="ignore", over="ignore"):
        dx = np.where(mx, np.diff(x, axis=2), 0.0)
        dy = np.where(my, np.diff(x, axis=1), 0.0)
    total = (dx.astype(np.float64) ** 2).sum((1, 2)) + (dy.astype(np.float64) ** 2).sum((1, 2))
    return total, (mx.sum((1, 2)) + my.sum((1, 2))).astype(np.float64)


def energy_ratio(
    fake_sum: np.ndarray, fake_n: np.ndarray, true_sum: np.ndarray, true_n: np.ndarray
) -> float:
    """Mean over bands of (fake_sum / fake_n) / (true_sum / true_n): the texture ratio from
    accumulated :func:`gradient_energy` sums. Bands without pairs, or whose truth has no
    gradient at all, are left out (NaN when none is left)."""
    fake_sum, fake_n = np.asarray(fake_sum, float), np.asarray(fake_n, float)
    true_sum, true_n = np.asarray(true_sum, float), np.asarray(true_n, float)
    ok = (fake_n > 0) & (true_n > 0) & (true_sum > 0)
    if not ok.any():
        return float("nan")
    return float(np.mean((fake_sum[ok] / fake_n[ok]) / (true_sum[ok] / true_n[ok])))


def texture_ratio(samples: np.ndarray, truth: np.ndarray, valid=None) -> float:
    """Roughness of the samples against the truth: per band, the mean squared spatial
    gradient (finite differences over valid neighbour pairs) of every sample (not of their
    mean) over that of the truth, averaged over bands. 1: as rough as the real image;
    < 1 too smooth (0 for a constant prediction); >> 1 noise."""
    true_sum, true_n = gradient_energy(truth, valid)
    fake_sum, fake_n = np.zeros_like(true_sum), np.zeros_like(true_n)
    for s in samples:
        a, b = gradient_energy(s, valid)
        fake_sum += a
        fake_n += b
    return energy_ratio(fake_sum, fake_n, true_sum, true_n)


def radial_power_spectrum(x: np.ndarray) -> np.ndarray:
    """Radially averaged power spectrum of each band of a fully valid (C, H, W) image:
    band mean removed, a 2-D Hann window applied, |FFT|^2 averaged over rings of radius
    k = 1 .. n // 2 (n = min(H, W); frequency k / n cycles per pixel). Returns (C, n // 2)."""
    c, h, w = x.shape
    n = min(h, w)
    win = np.hanning(h)[:, None] * np.hanning(w)[None]
    y = (x - x.mean((1, 2), keepdims=True)) * win
    power = np.abs(np.fft.fft2(y.astype(np.float64))) ** 2 / (win**2).sum()
    r = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None]) * n
    ring = np.rint(r).astype(int).ravel()
    keep = (ring >= 1) & (ring <= n // 2)
    counts = np.bincount(ring[keep], minlength=n // 2 + 1)[1:]
    out = np.stack(
        [np.bincount(ring[keep], p.ravel()[keep], minlength=n // 2 + 1)[1:] for p in power]
    )
    return out / np.maximum(counts, 1)


SPECTRUM_FLOOR = 1e-6  # of the truth's power in each ring: a constant scores about -20


def spectrum_log_ratio(fake_power: np.ndarray, true_power: np.ndarray) -> float:
    """Mean over bands of the mean log2 ratio of generated to real power over the upper half
    of the radial frequencies (rings k > K / 2 of K: periods shorter than 4 px). 0: as much
    fine detail as the real image; -1: half the power (too smooth); > 0 noise. Both powers
    get ``SPECTRUM_FLOOR`` times the truth's power of the ring added, so a constant
    prediction scores log2(1e-6), about -20, instead of minus infinity; rings where the
    truth has no power are left out (NaN when none is left)."""
    fake_power, true_power = np.atleast_2d(fake_power), np.atleast_2d(true_power)
    k = true_power.shape[1]
    hi = np.arange(1, k + 1) > k / 2
    f, t = fake_power[:, hi], true_power[:, hi]
    vals = []
    for fb, tb in zip(f, t, strict=True):
        ok = tb > 0
        if ok.any():
            eps = SPECTRUM_FLOOR * tb[ok]
            vals.append(np.mean(np.log2((fb[ok] + eps) / (tb[ok] + eps))))
    return float(np.mean(vals)) if vals else float("nan")


def spectrum_ratio(samples: np.ndarray, truth: np.ndarray) -> float:
    """:func:`spectrum_log_ratio` of the mean power spectrum of the samples (each sample's
    own spectrum, not that of their mean) against the truth's; fully valid images only."""
    fake = np.mean([radial_power_spectrum(s) for s in samples], 0)
    return spectrum_log_ratio(fake, radial_power_spectrum(truth))


# -- calibration --------------------------------------------------------------------------
def crps_ensemble(samples: np.ndarray, truth: np.ndarray, valid=None) -> float:
    """Continuous ranked probability score of the ensemble, per value, averaged:
    E|X - y| - E|X - X'| / 2 (Gneiting & Raftery 2007), the empirical distribution of the
    N samples as the forecast. For one sample it is the absolute error."""
    m = _mask(valid, truth.shape)
    x = samples[:, m]  # (N, V)
    y = truth[m]
    skill = np.abs(x - y[None]).mean(0)
    xs = np.sort(x, axis=0)
    n = x.shape[0]
    # E|X - X'| from sorted samples in O(N log N): sum_i (2i - n - 1) x_(i) * 2 / n^2
    weights = (2 * np.arange(1, n + 1) - n - 1)[:, None]
    spread = 2 * (weights * xs).sum(0) / n**2
    return float((skill - spread / 2).mean())


def spread_skill(samples: np.ndarray, truth: np.ndarray, valid=None) -> float:
    """Ensemble spread (mean std, with the finite-ensemble factor sqrt((N+1)/N)) over the
    RMSE of the ensemble mean: 1 for a calibrated ensemble, < 1 over-confident."""
    m = _mask(valid, truth.shape)
    n = samples.shape[0]
    spread = np.sqrt(samples[:, m].var(0, ddof=1).mean() * (n + 1) / n) if n > 1 else 0.0
    err = np.sqrt(((samples[:, m].mean(0) - truth[m]) ** 2).mean())
    return float(spread / max(err, 1e-12))


def interval_coverage(samples: np.ndarray, truth: np.ndarray, level: float, valid=None):
    """Share of true values inside the ensemble's central ``level`` interval, from the rank
    of the truth among the N samples (its probability integral transform).

    For an ensemble drawn from the right distribution the truth's rank is uniform over the
    N + 1 gaps between sorted samples, so gap r stands for the PIT interval
    [r / (N + 1), (r + 1) / (N + 1)]; the score is the part of that interval inside
    [(1 - level) / 2, (1 + level) / 2], averaged over values. A calibrated ensemble scores
    ``level`` in expectation at any N; empirical sample quantiles would not (with 8 samples
    a calibrated ensemble's 5-95 % sample-quantile interval holds the truth about 70 % of
    the time). Ties count half below, half above."""
    m = _mask(valid, truth.shape)
    x, y = samples[:, m], truth[m]
    n = x.shape[0]
    below = (x < y).sum(0) + 0.5 * (x == y).sum(0)  # rank of the truth, 0 .. N
    lo_pit, hi_pit = below / (n + 1), (below + 1) / (n + 1)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    inside = np.clip(np.minimum(hi_pit, hi) - np.maximum(lo_pit, lo), 0, None) * (n + 1)
    return float(inside.mean()) if y.size else float("nan")


def diversity(samples: np.ndarray, valid=None) -> float:
    """Mean absolute difference between pairs of samples (0 for a deterministic model)."""
    n = samples.shape[0]
    if n < 2:
        return 0.0
    m = _mask(valid, samples.shape[1:])
    x = samples[:, m]
    total = [np.abs(x[i] - x[j]).mean() for i in range(n) for j in range(i + 1, n)]
    return float(np.mean(total))


# -- distributions ------------------------------------------------------------------------
def band_wasserstein(real: np.ndarray, fake: np.ndarray, max_values: int = 50_000) -> float:
    """1-Wasserstein distance between the value distributions of one band (any shapes)."""
    rng = np.random.default_rng(0)
    a, b = real.ravel(), fake.ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size > max_values:
        a = rng.choice(a, max_values, replace=False)
    if b.size > max_values:
        b = rng.choice(b, max_values, replace=False)
    return float(wasserstein_distance(a, b))


def range_coverage(real: np.ndarray, fake: np.ndarray, bins: int = 50) -> float:
    """Share of the real values' histogram bins (p1-p99 span) that generated values reach."""
    a, b = real[np.isfinite(real)], fake[np.isfinite(fake)]
    lo, hi = np.percentile(a, [1, 99])
    if hi <= lo:
        return 1.0
    edges = np.linspace(lo, hi, bins + 1)
    ha, _ = np.histogram(a, edges)
    hb, _ = np.histogram(b, edges)
    occupied = ha > 0
    return float(((hb > 0) & occupied).sum() / max(occupied.sum(), 1))


def image_features(x: np.ndarray) -> np.ndarray:
    """Offline feature vector of a (C, H, W) image: per band mean, standard deviation, mean
    gradient magnitude, and the 10/50/90 % quantiles (a spectral-texture summary that needs
    no pretrained network)."""
    gy, gx = np.gradient(x, axis=(1, 2))
    grad = np.sqrt(gx**2 + gy**2).reshape(x.shape[0], -1).mean(1)
    flat = x.reshape(x.shape[0], -1)
    q = np.quantile(flat, [0.1, 0.5, 0.9], axis=1).T
    return np.concatenate([flat.mean(1), flat.std(1), grad, q.ravel()])


def precision_recall_coverage(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    """Precision and recall (Kynkäänniemi et al. 2019) and coverage (Naeem et al. 2020) of
    generated feature vectors ``fake`` (M, F) against real ones ``real`` (R, F), with
    k-nearest-neighbour balls; features standardised by the real set."""
    mu, sd = real.mean(0), real.std(0) + 1e-9
    r, f = (real - mu) / sd, (fake - mu) / sd
    k = min(k, len(r) - 1, len(f) - 1)
    if k < 1:
        return {"precision": float("nan"), "recall": float("nan"), "coverage": float("nan")}

    def dist(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))

    d_rr, d_ff, d_rf = dist(r, r), dist(f, f), dist(r, f)
    rad_r = np.sort(d_rr, 1)[:, k]  # k-th neighbour (index 0 is the point itself)
    rad_f = np.sort(d_ff, 1)[:, k]
    precision = (d_rf <= rad_r[:, None]).any(0).mean()
    recall = (d_rf <= rad_f[None, :]).any(1).mean()
    coverage = (d_rf.min(1) <= rad_r).mean()
    return {"precision": float(precision), "recall": float(recall), "coverage": float(coverage)}


# -- categorical --------------------------------------------------------------------------
def accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    ok = truth >= 0
    return float((pred[ok] == truth[ok]).mean())


def mean_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean intersection over union over the classes present in truth or prediction."""
    ok = truth >= 0
    p, t = pred[ok], truth[ok]
    ious = []
    for c in range(num_classes):
        inter = ((p == c) & (t == c)).sum()
        union = ((p == c) | (t == c)).sum()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)) if ious else float("nan")


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    """ECE of the arg-max class: |accuracy - confidence| weighted over confidence bins.
    ``probs`` (K, ...) class probabilities, ``truth`` (...) class indices (-1: unknown)."""
    ok = truth >= 0
    conf = probs.max(0)[ok]
    hit = (probs.argmax(0) == truth)[ok]
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(hit[sel].mean() - conf[sel].mean())
    return float(ece)
