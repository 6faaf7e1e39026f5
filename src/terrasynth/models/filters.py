"""Spatial filters of the generator: a Gaussian blur, and scale bands of a residual field
(the same field split by spatial scale, to calibrate the spread of samples scale by scale).

A window ``x`` (B, C, H, W) is the exact sum of its bands: the finest (``x`` minus its
Gaussian blur of ``SIGMAS[0]`` px), the differences of successive blurs, the broadest
blur minus the window's mean, and the window's mean per band (its level). Calibrating a
generator's residual per band (``spread_bands``, fitted on the validation split by
``evaluation/calibration.py``) makes each scale's spread match the error at that scale:
samples whose pixel noise is too strong get smoothed, flat ones get their fine texture
back, invented relief at a few pixels' scale shrinks while an uncertain level keeps its
spread. Difference-of-Gaussians by hand: it is three lines on the blur the generator
already uses, and a wavelet library would add a dependency for it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

SIGMAS = (1.0, 2.0, 4.0, 8.0)  # Gaussian blurs (px of the band group's own grid)
NUM_BANDS = len(SIGMAS) + 2  # finest ... broadest, then the level
NAMES = ("1px", "2px", "4px", "8px", "16px+", "level")


def radius_of(sigma: float) -> int:
    """Half-width of the Gaussian kernel of ``sigma`` pixels."""
    return max(1, math.ceil(3 * sigma))


MATRIX_MAX = 256  # windows up to this side blur by matrix products, larger ones by convolution


def _kernel(sigma: float, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    radius = radius_of(sigma)
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


@functools.lru_cache(maxsize=128)
def _blur_matrix(n: int, sigma: float, mode: str) -> torch.Tensor:
    """(n, n): the 1-D blur of ``n`` samples, borders padded by ``mode``, as a matrix (row
    ``i``: the weights of the inputs on output ``i``), made by blurring unit impulses."""
    radius = radius_of(sigma)
    impulses = torch.eye(n, dtype=torch.float64)[:, None, :]  # (n signals, 1, n samples)
    padded = F.pad(impulses, (radius, radius), mode=mode)
    responses = F.conv1d(padded, _kernel(sigma, torch.float64).view(1, 1, -1))[:, 0]
    return responses.T.contiguous()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` (B, C, H, W) blurred by a separable Gaussian of ``sigma`` pixels, borders
    reflected. A stride-1 filter keeps it translation-equivariant: two overlapping windows
    cut from one field agree where they overlap (up to their borders).

    Windows up to ``MATRIX_MAX`` px a side are blurred as ``Mh @ x @ Mw^T`` with the blur
    written as a matrix per axis: the same operator as the padded convolution, but matrix
    products run several times faster on CPUs than long depthwise convolutions (the
    per-scale calibration blurs every sample's residual four times)."""
    if sigma <= 0:
        return x
    radius = radius_of(sigma)
    h, w = x.shape[-2:]
    mode = "replicate" if radius >= min(h, w) else "reflect"  # reflection needs more pixels
    if max(h, w) <= MATRIX_MAX:
        mh = _blur_matrix(h, float(sigma), mode).to(x.device, x.dtype)
        mw = _blur_matrix(w, float(sigma), mode).to(x.device, x.dtype)
        return mh @ x @ mw.T
    k = _kernel(sigma, x.dtype, x.device)
    c = x.shape[1]
    y = F.pad(x, (radius, radius, radius, radius), mode=mode)
    # separable: a row pass then a column pass
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def split_bands(x: torch.Tensor) -> list[torch.Tensor]:
    """``x`` (B, C, H, W) as ``NUM_BANDS`` fields of its shape that sum to it exactly."""
    level = x.mean((-2, -1), keepdim=True)
    bands, prev = [], x
    for s in SIGMAS:
        blurred = gaussian_blur(x, s)
        bands.append(prev - blurred)
        prev = blurred
    bands.append(prev - level)
    bands.append(level.expand_as(x))
    return bands


def rescale_bands(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) with each scale band multiplied by its factor: ``factors`` is
    (NUM_BANDS,) for every channel alike or (C, NUM_BANDS) per channel (ones: ``x``)."""
    f = torch.as_tensor(factors, dtype=x.dtype, device=x.device)
    if f.shape[-1] != NUM_BANDS or f.dim() > 2 or (f.dim() == 2 and f.shape[0] != x.shape[1]):
        raise ValueError(
            f"spread_bands needs {NUM_BANDS} factors per band of {x.shape[1]}, got {tuple(f.shape)}"
        )
    f = f.expand(x.shape[1], NUM_BANDS)
    return sum(f[:, k, None, None] * b for k, b in enumerate(split_bands(x)))
