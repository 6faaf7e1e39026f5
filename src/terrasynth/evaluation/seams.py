"""Seams: does a scene generated window by window show where the windows meet?

``seam_ratio`` compares the gradient energy across window borders with the gradient energy
everywhere else: the mean squared difference between neighbouring pixel columns (rows)
that straddle a border, over the same mean for all other neighbouring pairs. A seamless
image scores about 1; visible tile edges score more.

A patch-token model has its own grid of patch edges (every 8 px for ``tiny``), and window
borders fall on patch edges. ``control`` lines (patch edges that are not window borders)
then make the fair denominator: the ratio says how much worse window borders are than the
patch edges the model shows everywhere.
"""

from __future__ import annotations

import numpy as np


def border_positions(size: int, offsets: list[int], window: int) -> list[int]:
    """Pixel indices ``i`` (0 < i < size) where a window starts or ends: the pair
    (i - 1, i) straddles a border."""
    cuts = {o for o in offsets} | {o + window for o in offsets}
    return sorted(i for i in cuts if 0 < i < size)


def seam_ratio(
    image: np.ndarray,
    rows: list[int],
    cols: list[int],
    control: list[int] | None = None,
) -> float:
    """Gradient energy across the given border rows/columns over the energy elsewhere (or
    across the ``control`` rows and columns, when given).

    ``image``: (C, H, W) or (H, W); NaN pixels are ignored."""
    x = image if image.ndim == 3 else image[None]
    dx = (x[:, :, 1:] - x[:, :, :-1]) ** 2  # pair (c-1, c) at index c-1
    dy = (x[:, 1:, :] - x[:, :-1, :]) ** 2
    col_mask = np.zeros(dx.shape[2], bool)
    col_mask[[c - 1 for c in cols]] = True
    row_mask = np.zeros(dy.shape[1], bool)
    row_mask[[r - 1 for r in rows]] = True
    across = np.concatenate([dx[:, :, col_mask].ravel(), dy[:, row_mask, :].ravel()])
    if control is not None:
        col_mask = np.zeros(dx.shape[2], bool)
        col_mask[[c - 1 for c in control]] = True
        row_mask = np.zeros(dy.shape[1], bool)
        row_mask[[r - 1 for r in control]] = True
        inside = np.concatenate([dx[:, :, col_mask].ravel(), dy[:, row_mask, :].ravel()])
    else:
        inside = np.concatenate([dx[:, :, ~col_mask].ravel(), dy[:, ~row_mask, :].ravel()])
    return float(np.nanmean(across) / max(np.nanmean(inside), 1e-12))
