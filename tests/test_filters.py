"""The generator's spatial filters: Gaussian blur and scale bands (pure maths)."""

from __future__ import annotations

import pytest
import torch

from terrasynth.models import filters
from terrasynth.models.filters import (
    NUM_BANDS,
    SIGMAS,
    gaussian_blur,
    rescale_bands,
    split_bands,
)


def _field(seed: int = 0, shape=(2, 3, 48, 48)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_the_bands_sum_to_the_field_exactly():
    x = _field()
    bands = split_bands(x)
    assert len(bands) == NUM_BANDS
    assert all(b.shape == x.shape for b in bands)
    assert torch.allclose(sum(bands), x, atol=1e-5)


def test_ones_leave_the_field_and_a_factor_scales_only_its_band():
    x = _field(1)
    assert torch.allclose(rescale_bands(x, torch.ones(NUM_BANDS)), x, atol=1e-5)
    for k in range(NUM_BANDS):
        f = [1.0] * NUM_BANDS
        f[k] = 3.0
        diff = rescale_bands(x, torch.tensor(f)) - x
        assert torch.allclose(diff, 2.0 * split_bands(x)[k], atol=1e-5)


def test_a_constant_is_all_level_and_white_noise_is_mostly_fine():
    c = torch.full((1, 2, 32, 32), 4.0)
    bands = split_bands(c)
    assert torch.allclose(bands[-1], c)
    assert all(float(b.abs().max()) < 1e-5 for b in bands[:-1])
    power = [float((b**2).mean()) for b in split_bands(_field(2))]
    assert power[0] == max(power)  # most of white noise's variance lies below 1 px
    assert power[0] > 0.5


def test_a_smooth_field_has_nothing_at_the_finest_scale():
    smooth = gaussian_blur(_field(3), 2 * SIGMAS[-1])
    power = [float((b**2).mean()) for b in split_bands(smooth - smooth.mean((-2, -1), True))]
    assert power[0] < 1e-3 * max(power)


def test_factors_per_channel_scale_each_channel_apart():
    x = _field(4)
    f = torch.ones(3, NUM_BANDS)
    f[1, 0] = 0.0  # channel 1 loses its finest scale, the others keep everything
    y = rescale_bands(x, f)
    torch.testing.assert_close(y[:, [0, 2]], x[:, [0, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:, 1], x[:, 1] - split_bands(x)[0][:, 1], atol=1e-5, rtol=0)


def test_a_wrong_number_of_factors_is_refused():
    with pytest.raises(ValueError, match="factors"):
        rescale_bands(_field(), [1.0, 2.0])
    with pytest.raises(ValueError, match="factors"):
        rescale_bands(_field(), torch.ones(2, NUM_BANDS))  # the field has 3 channels


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 2, 40, 24), (2, 1, 5, 5)])
@pytest.mark.parametrize("sigma", [1.0, 1.5, 8.0])
def test_the_matrix_blur_is_the_padded_convolution(monkeypatch, shape, sigma):
    x = _field(4, shape)
    by_matrix = gaussian_blur(x, sigma)
    monkeypatch.setattr(filters, "MATRIX_MAX", 0)  # every size by convolution
    by_conv = gaussian_blur(x, sigma)
    assert torch.allclose(by_matrix, by_conv, atol=1e-6)
    # a constant stays constant, whichever border rule the size needs
    flat = gaussian_blur(torch.full(shape, 3.0), sigma)
    assert torch.allclose(flat, torch.full(shape, 3.0), atol=1e-5)


def test_the_blur_commutes_with_a_shift_away_from_the_borders():
    x = _field(5, (1, 1, 64, 64))
    a = gaussian_blur(x[..., :48, :48], 2.0)
    b = gaussian_blur(x[..., 8:56, 8:56], 2.0)
    assert torch.allclose(a[..., 14:40, 14:40], b[..., 6:32, 6:32], atol=1e-5)
