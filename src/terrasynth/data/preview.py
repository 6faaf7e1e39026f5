"""Quick-look PNGs of chips with a natural rendering per modality.

Optical: true colour with a 2-98 % stretch. SAR (dB): greyscale of the first band.
Elevation (m): hillshade. Categorical: legend colours. Anything else: a colour map.

Every preview carries a PNG text chunk ``terrasynth``; an existing file is replaced only with
``overwrite`` and only if it carries that chunk (:func:`check_preview`).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LightSource, ListedColormap, to_rgb  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from terrasynth import __version__  # noqa: E402
from terrasynth.data.store import ChipStore  # noqa: E402
from terrasynth.errors import TerrasynthError  # noqa: E402
from terrasynth.modalities import Modality  # noqa: E402

TEXT_KEY = "terrasynth"  # the PNG text chunk marking a preview terrasynth wrote
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_preview(path: str | Path) -> bool:
    """Whether ``path`` is a PNG carrying terrasynth's text chunk (read from the chunks
    before the image data only, each text chunk at most 1 KiB)."""
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            return False
        for _ in range(64):
            head = f.read(8)
            if len(head) < 8:
                return False
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind in (b"IDAT", b"IEND"):
                return False
            if kind == b"tEXt" and length <= 1024:
                if f.read(length).startswith(TEXT_KEY.encode() + b"\0"):
                    return True
                f.seek(4, os.SEEK_CUR)
            else:
                f.seek(length + 4, os.SEEK_CUR)
    return False


def check_preview(output: str | Path, overwrite: bool = False) -> None:
    """Refuse to write ``output`` over a file: one needs ``overwrite`` and must be a preview
    terrasynth wrote (not a link)."""
    output = Path(output)
    if not os.path.lexists(output):
        return
    if output.is_symlink() or not output.is_file() or not is_preview(output):
        raise TerrasynthError(
            f"{output} already exists and was not written by terrasynth (not a terrasynth "
            "preview PNG): choose another file, or move it away yourself"
        )
    if not overwrite:
        raise TerrasynthError(f"{output} already exists (use --overwrite to replace it)")


def _stretch(x: np.ndarray, valid: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """2-98 % stretch of ``x`` (percentiles of ``ref`` where given, so images compare)."""
    src = ref if ref is not None else x
    v = src[valid] if valid.any() else src.ravel()
    v = v[np.isfinite(v)]
    lo, hi = np.percentile(v, [2, 98]) if v.size else (0.0, 1.0)
    return np.clip((x - lo) / max(hi - lo, 1e-9), 0, 1)


def render_chip(
    mod: Modality,
    groups: dict[str, tuple[np.ndarray, np.ndarray]],
    reference: np.ndarray | None = None,
) -> np.ndarray:
    """An (h, w, 3) RGB image in [0, 1] of one chip of ``mod`` (finest group).

    ``reference``: an array shaped like the finest group's data whose percentiles set the
    stretch (to show samples of one scene on one scale)."""
    first = mod.groups[0]
    data, valid = groups[first.name]

    def ref(i: int) -> np.ndarray | None:
        return reference[i] if reference is not None else None

    if mod.kind == "categorical":
        colors = np.array([to_rgb(e.color) for e in mod.legend] + [(0, 0, 0)])
        idx = np.where(valid, data[0].astype(int), len(mod.legend))
        return colors[idx]
    if mod.rgb:
        bands = [first.bands.index(b) for b in mod.rgb]
        img = np.stack([_stretch(data[i], valid, ref(i)) for i in bands], -1)
    elif mod.units == "dB":
        img = np.repeat(_stretch(data[0], valid, ref(0))[..., None], 3, -1)
    elif mod.units == "m":
        ls = LightSource(azdeg=315, altdeg=45)
        shade = ls.hillshade(np.where(valid, data[0], 0.0), vert_exag=2.0)
        tint = plt.get_cmap("terrain")(_stretch(data[0], valid, ref(0)))[..., :3]
        img = 0.55 * tint + 0.45 * shade[..., None]
    else:
        img = plt.get_cmap("viridis")(_stretch(data[0], valid, ref(0)))[..., :3]
    return np.where(valid[..., None], img, 0.0)


def _read_groups(store: ChipStore, mod: Modality, i: int) -> dict:
    return {
        g.name: (
            store.read(f"{mod.name}/{g.name}/data", i),
            store.read(f"{mod.name}/{g.name}/valid", i),
        )
        for g in mod.groups
    }


def render_preview(
    store: ChipStore,
    output: str | Path,
    chips_per_modality: int = 6,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a PNG grid: one row per raster modality, ``chips_per_modality`` chips each.

    The PNG is written to a temporary sibling and renamed into place; an existing
    ``output`` is replaced only as :func:`check_preview` allows (checked before rendering
    and again before the rename)."""
    output = Path(output)
    check_preview(output, overwrite)
    registry = store.registry
    mods = [registry[m] for m in store.modalities if registry[m].is_raster]
    rng = np.random.default_rng(seed)
    n = chips_per_modality
    fig, axes = plt.subplots(len(mods), n, figsize=(1.9 * n + 2.6, 2.0 * len(mods)), squeeze=False)
    for r, mod in enumerate(mods):
        have = np.flatnonzero(store.available(mod.name))
        pick = np.sort(rng.choice(have, min(n, have.size), replace=False))
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= pick.size:
                ax.axis("off")
                continue
            i = int(pick[c])
            ax.imshow(render_chip(mod, _read_groups(store, mod, i)), interpolation="nearest")
            row = store.table.iloc[i]
            ax.set_title(f"{row['source']} · {row['gsd_m']:.3g} m", fontsize=6)
        axes[r, 0].set_ylabel(mod.name, fontsize=9)
        if mod.kind == "categorical":
            present = np.zeros(mod.num_classes, bool)
            for i in pick:
                d, v = _read_groups(store, mod, int(i))[mod.groups[0].name]
                present[np.unique(d[0][v].astype(int))] = True
            handles = [
                Patch(color=e.color, label=e.name[:28])
                for e, p in zip(mod.legend, present, strict=True)
                if p
            ]
            axes[r, -1].legend(
                handles=handles,
                loc="center left",
                bbox_to_anchor=(1.02, 0.5),
                fontsize=5,
                frameon=False,
            )
    fig.suptitle(f"{store.path.name}: {len(store)} chips", fontsize=10)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110, metadata={TEXT_KEY: f"data preview {__version__}"})
        check_preview(output, overwrite)  # again: it may have appeared meanwhile
        tmp.replace(output)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return output


__all__ = ["check_preview", "is_preview", "render_chip", "render_preview", "ListedColormap"]
