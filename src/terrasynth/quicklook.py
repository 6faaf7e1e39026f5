"""Quick-look panel of a generation: inputs, samples, and their spread, one row per target.

Samples of one target share one stretch (that of their mean), so differences between
samples are differences in the data, not in the display. Continuous targets end with the
per-pixel standard deviation (first band), categorical ones with the entropy of the mean
class probabilities.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from terrasynth.data.align import legend_lookup  # noqa: E402
from terrasynth.data.preview import render_chip  # noqa: E402
from terrasynth.modalities import Modality  # noqa: E402

if TYPE_CHECKING:
    from terrasynth.pipeline import Generation

MAX_SAMPLES_SHOWN = 4


def _as_groups(
    mod: Modality, arr: np.ndarray, codes: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(C, H, W) on one grid -> the ``render_chip`` layout. Categorical arrays hold legend
    codes (``codes``) or class indices; NaN or unknown codes are shown as no data."""
    valid = np.isfinite(arr).all(0) if arr.dtype.kind == "f" else np.ones(arr.shape[1:], bool)
    arr = np.nan_to_num(arr)
    if mod.kind == "categorical" and codes:
        idx, known = legend_lookup(arr[:1], mod.class_index())
        valid = valid & known[0]
        arr = idx
    return {mod.groups[0].name: (arr, valid)}


def _map(ax, img: np.ndarray, title: str, cmap: str = "viridis") -> None:
    finite = np.isfinite(img)
    lo, hi = np.percentile(img[finite], [2, 98]) if finite.any() else (0.0, 1.0)
    im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
    ax.set_title(title, fontsize=7)


def render_quicklook(gen: Generation, output: Path) -> Path:
    """Write the panel PNG for ``gen`` (atomically) and return its path."""
    rows = [(n, r) for n, r in gen.targets.items() if r.samples is not None]
    inputs = list(gen.inputs.items())
    n_show = min(MAX_SAMPLES_SHOWN, max((len(r.samples) for _, r in rows), default=0))
    cols = max(len(inputs) + n_show + 1, 2)
    fig, axes = plt.subplots(
        max(len(rows), 1), cols, figsize=(2.1 * cols, 2.2 * max(len(rows), 1)), squeeze=False
    )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for r, (name, res) in enumerate(rows):
        mod = res.modality
        for c, (iname, (imod, bands, arr)) in enumerate(inputs):
            ax = axes[r, c]
            ax.axis("on")
            if len(bands) == len(imod.groups[0].bands):
                groups = _as_groups(imod, arr, codes=False)
                ax.imshow(render_chip(imod, groups), interpolation="nearest")
            else:
                ax.imshow(arr[0], cmap="gray")
            ax.set_title(f"input: {iname}", fontsize=7)
        ref = res.mean if res.mean is not None else None
        for k in range(min(n_show, len(res.samples))):
            ax = axes[r, len(inputs) + k]
            ax.axis("on")
            img = render_chip(mod, _as_groups(mod, res.samples[k]), reference=ref)
            ax.imshow(img, interpolation="nearest")
            ax.set_title(f"{name} sample {k}", fontsize=7)
        ax = axes[r, len(inputs) + n_show]
        ax.axis("on")
        if res.std is not None:
            _map(ax, res.std[0], f"{name} std ({res.bands[0]}, {mod.units})", "magma")
        elif res.entropy is not None:
            _map(ax, res.entropy, f"{name} entropy (nats)", "magma")
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.tight_layout()
    tmp = output.with_name(f".{output.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(output)
    return output
