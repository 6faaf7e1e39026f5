"""A gallery of generations on fixed test chips: what the numbers of the benchmark look like.

    python bench/gallery.py -d STORE [-m MODEL] [--steps N] [-o docs/gallery]
    python bench/gallery.py -d STORE --choose      # once: freeze the chips (already done)

For four directions (S1 -> S2, S2 -> S1, S2 -> DEM and Landsat -> DEM) and the chips frozen
in ``bench/protocols/gallery_chips.json`` (chosen once from the test split of a store of all
of ``../shared/data``), writes one PNG per direction into the output folder: a row per chip
with the input, the truth, the mean of the samples, their spread (per-pixel standard
deviation) and four samples. Generation goes through the benchmark's predictor
(:class:`~terrasynth.evaluation.benchmark.ModelPredictor`) on the model's window at the
centre of each chip, so any model that ``terrasynth.models.factory.load_model`` loads works
and the pictures show exactly what ``terrasynth evaluate`` scores.

Stretches: optical targets in true colour (the modality's ``rgb`` bands, one linear stretch
over the 1-99 % of the truth's three bands, shared by the whole row); Sentinel-1 as VV in dB,
grey, 2-98 % of the truth; elevation in terrain colours over a hillshade (2-98 % of the
truth); the spread in its own scale (0 to the 98 % of the row's spread, in physical units).
Inputs get the same kind of stretch from their own values.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LightSource  # noqa: E402

from terrasynth.data.dataset import ChipDataset, collate_chips, is_raster_key  # noqa: E402
from terrasynth.errors import TerrasynthError  # noqa: E402
from terrasynth.evaluation.benchmark import (  # noqa: E402
    ModelPredictor,
    direction_signals,
    physical_tile,
)
from terrasynth.evaluation.translate import crop  # noqa: E402
from terrasynth.modalities import Modality  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHIPS = ROOT / "bench" / "protocols" / "gallery_chips.json"
OUTPUT = ROOT / "docs" / "gallery"
# (title, candidate inputs in order of preference, target)
DIRECTIONS = [
    ("S1 -> S2", ["s1grd"], "s2l2a"),
    ("S2 -> S1", ["s2l2a"], "s1grd"),
    ("S2 -> DEM", ["s2l2a", "s2l1c", "s2sr_arcsi"], "dem"),
    ("Landsat -> DEM", ["landsat8", "landsat7"], "dem"),
]
ROWS = 3  # chips per direction
SAMPLES = 4


# -- chips --------------------------------------------------------------------------------
def centre_window(batch: dict, size: int, chip_size: int) -> dict:
    """The ``size`` px window at the centre of every chip of a collated batch (its offset a
    multiple of the coarsest band group, so every group is cut on its own grid)."""
    if size > chip_size:
        raise TerrasynthError(f"the model's window ({size} px) is larger than a chip")
    factors = [chip_size // v.shape[-1] for k, v in batch.items() if is_raster_key(k, v)]
    step = max(factors, default=1)
    off = (chip_size - size) // 2 // step * step
    return crop(batch, off, off, size, chip_size)


def _fully_valid(sample: dict, mods: list[str], size: int, chip_size: int) -> bool:
    """Every band group of ``mods`` that the chip holds is valid in the whole window."""
    batch = {k: v[None] if torch.is_tensor(v) else v for k, v in sample.items()}
    win = centre_window(batch, size, chip_size)
    for m in mods:
        keys = [k for k in win if k.startswith(f"{m}/") and k.endswith("/valid")]
        if not keys or not all(bool(win[k].bool().all()) for k in keys):
            return False
    return True


def choose_chips(store: str | Path, split: str = "test", rows: int = ROWS, size: int = 32):
    """The gallery's chips: per direction ``rows`` chips of ``split`` that hold input and
    target, with every band group they hold valid everywhere in the centre ``size`` px
    window. Chips are taken round-robin over sources (in name order), and within a source
    one per scene before a second (chips in a fixed random order), so rows show different
    places. The input is the first candidate of the direction that yields ``rows`` such
    chips (else the one that yields most); directions with none are left out."""
    ds = ChipDataset(store, split=split)
    table = ds.store.table.iloc[ds.indices]
    ids, scenes = table["chip_id"].to_numpy(), table["scene_id"].to_numpy()
    sources = table["source"].to_numpy()
    has = {m: ds.store.available(m)[ds.indices] for m in ds.modalities}

    def pick(src: str, target: str) -> list[int]:
        rng = np.random.default_rng(0)
        cand = np.flatnonzero(has[src] & has[target])
        queues = []
        for source in sorted(set(sources[cand])):
            mine = rng.permutation(cand[sources[cand] == source])
            count: dict[str, int] = {}
            nth = []  # how many chips of the same scene come before this one
            for i in mine:
                nth.append(count.get(str(scenes[i]), 0))
                count[str(scenes[i])] = nth[-1] + 1
            queues.append([int(mine[j]) for j in np.argsort(nth, kind="stable")])
        picked: list[int] = []
        while len(picked) < rows and any(queues):
            for q in queues:
                while q and len(picked) < rows:
                    i = q.pop(0)
                    if _fully_valid(ds[i], [src, target], size, ds.chip_size):
                        picked.append(i)
                        break
        return picked

    chosen = {}
    for title, inputs, target in DIRECTIONS:
        best: tuple[str, list[int]] | None = None
        for src in inputs:
            if src not in has or target not in has:
                continue
            picked = pick(src, target)
            if picked and (best is None or len(picked) > len(best[1])):
                best = (src, picked)
            if len(picked) == rows:
                break
        if best is not None:
            chips = [str(ids[i]) for i in best[1]]
            chosen[f"{best[0]} -> {target}"] = {"title": title, "chips": chips}
    return {"split": split, "window": size, "directions": chosen}


# -- pictures -----------------------------------------------------------------------------
def stretch(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear stretch of ``x`` from [lo, hi] to [0, 1], clipped; NaN stays NaN."""
    return np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)


def rgb_image(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(3, H, W) -> (H, W, 3) true colour in [0, 1]; NaN (unknown) black."""
    return np.nan_to_num(np.moveaxis(stretch(x, lo, hi), 0, -1), nan=0.0)


def hillshade(elev: np.ndarray, lo: float, hi: float, gsd: float) -> np.ndarray:
    """Elevation in terrain colours over a hillshade, (H, W, 3) in [0, 1]."""
    ls = LightSource(azdeg=315, altdeg=45)
    z = np.nan_to_num(elev, nan=lo)
    img = ls.shade(z, cmap=plt.get_cmap("terrain"), vmin=lo, vmax=hi, blend_mode="soft",
                   vert_exag=1.0, dx=gsd, dy=gsd)  # fmt: skip
    img = img[..., :3]
    img[np.isnan(elev)] = 0.0
    return img


class View:
    """How one modality is drawn: which bands, how stretched (from a reference image)."""

    def __init__(
        self,
        mod: Modality,
        bands: list[str],
        ref: np.ndarray,
        gsd: float,
        also: np.ndarray | None = None,
    ) -> None:
        """``ref`` (C, H, W) sets the stretch; elevation also spans ``also`` (N, C, H, W),
        the samples, so that a model far off in height still shows its relief."""
        self.mod, self.gsd = mod, gsd
        rgb = [b for b in mod.rgb if b in bands]
        if len(rgb) == 3:
            self.kind, self.index = "rgb", [bands.index(b) for b in rgb]
            lo, hi = np.nanpercentile(ref[self.index], [1, 99])
        elif mod.name == "dem" or (mod.units == "m" and len(bands) == 1):
            self.kind, self.index = "terrain", [0]
            values = ref[0].ravel() if also is None else np.r_[ref[0].ravel(), also[:, 0].ravel()]
            lo, hi = np.nanpercentile(values, [2, 98])
        else:
            self.kind, self.index = "grey", [0]
            lo, hi = np.nanpercentile(ref[0], [2, 98])
        self.lo = float(lo)
        self.hi = float(hi) if hi > lo else self.lo + 1e-6
        self.label = {
            "rgb": f"true colour ({', '.join(rgb)})",
            "terrain": f"{bands[0]} ({mod.units}) {self.lo:.0f}-{self.hi:.0f}",
            "grey": f"{bands[0]} ({mod.units}) {self.lo:.3g} to {self.hi:.3g}",
        }[self.kind]

    def image(self, x: np.ndarray) -> np.ndarray:
        """(C, H, W) physical values -> an RGB picture."""
        if self.kind == "rgb":
            return rgb_image(x[self.index], self.lo, self.hi)
        if self.kind == "terrain":
            return hillshade(x[0], self.lo, self.hi, self.gsd)
        g = np.nan_to_num(stretch(x[0], self.lo, self.hi), nan=0.0)
        return np.repeat(g[..., None], 3, -1)

    def spread(self, samples: np.ndarray) -> np.ndarray:
        """Per-pixel standard deviation of the samples over the drawn bands (H, W)."""
        return samples[:, self.index].std(0).mean(0)


def _masked(x: np.ndarray, known: np.ndarray) -> np.ndarray:
    return np.where(known, x, np.nan)


def draw_direction(rows: list[dict], title: str, path: Path, settings: str) -> Path:
    """One figure: per row input, truth, mean, spread and the samples."""
    n = max(len(r["samples"]) for r in rows)
    cols = 4 + n
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.15 * len(rows) + 0.5),
                             squeeze=False)  # fmt: skip
    for i, r in enumerate(rows):
        tv, iv = r["target_view"], r["input_view"]
        truth = _masked(r["truth"], r["known"])
        mean = r["samples"].mean(0)
        spread = tv.spread(r["samples"])
        smax = float(np.nanpercentile(spread, 98)) or 1e-6
        panels = [
            (iv.image(r["input"]), f"{_short(r['chip'])}\ninput: {r['input_name']}\n{iv.label}"),
            (tv.image(truth), f"truth: {r['target_name']}\n{tv.label}"),
            (tv.image(mean), f"mean of {len(r['samples'])}"),
        ]
        for ax, (img, t) in zip(axes[i], panels, strict=False):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(t, fontsize=6)
        im = axes[i, 3].imshow(spread, cmap="magma", vmin=0, vmax=smax, interpolation="nearest")
        axes[i, 3].set_title(f"spread (std, {tv.mod.units})", fontsize=6)
        cb = fig.colorbar(im, ax=axes[i, 3], fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=5)
        for j, s in enumerate(r["samples"]):
            axes[i, 4 + j].imshow(tv.image(s), interpolation="nearest")
            axes[i, 4 + j].set_title(f"sample {j + 1}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    fig.suptitle(f"{title}   ({settings})", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _short(chip: str, n: int = 34) -> str:
    return chip if len(chip) <= n else "…" + chip[-(n - 1) :]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def load_any_model(folder: str | Path | None):
    """A model folder, a run folder (its ``model/``) or None (the built-in model)."""
    from terrasynth.models.factory import load_model
    from terrasynth.pipeline import default_model_path

    path = Path(folder) if folder is not None else default_model_path()
    if (path / "model" / "config.json").exists():
        path = path / "model"
    return load_model(path), path


@torch.no_grad()
def make_gallery(
    model,
    store: str | Path,
    chips: dict,
    output: str | Path = OUTPUT,
    steps: int | None = None,
    num_samples: int = SAMPLES,
    seed: int = 0,
    model_name: str = "model",
) -> list[Path]:
    """Generate and draw every direction of ``chips`` (see :func:`choose_chips`)."""
    config = model.config
    ds = ChipDataset(store, split=chips["split"])
    ids = list(ds.store.table["chip_id"].to_numpy()[ds.indices])
    where = {c: i for i, c in enumerate(ids)}
    predictor = ModelPredictor(model, steps=steps)
    steps_used = predictor.sampler.steps
    written = []
    for name, entry in chips["directions"].items():
        src, target = (s.strip() for s in name.split("->"))
        if src not in config.modalities or target not in config.modalities:
            print(f"skip {name}: the model does not know it", file=sys.stderr)
            continue
        missing = [c for c in entry["chips"] if c not in where]
        if missing:
            raise TerrasynthError(f"{name}: chip {missing[0]} not in the {chips['split']} split")
        batch = collate_chips([ds[where[c]] for c in entry["chips"]])
        tile = centre_window(batch, config.window_size, ds.chip_size)
        sig, conditions = direction_signals(tile, config, ds.modalities, target, [src])
        gen = torch.Generator().manual_seed(seed)
        samples = predictor.sample(sig, tile, target, conditions, num_samples, gen)
        reg = config.registry
        if reg[target].kind != "continuous":
            raise TerrasynthError(f"{name}: the gallery draws continuous targets only")
        rows = []
        for k, chip in enumerate(entry["chips"]):
            truth, fake, known, bands = physical_tile(
                reg[target], samples, sig[target], config.stats[target], k
            )
            one = {g: v.numpy()[None] for g, v in sig[src].groups.items()}
            inp, _, inp_known, inp_bands = physical_tile(
                reg[src], one, sig[src], config.stats[src], k
            )
            gsd = float(tile["gsd"][k])
            rows.append(
                {
                    "chip": chip,
                    "input": _masked(inp, inp_known),
                    "input_name": src,
                    "input_view": View(reg[src], inp_bands, _masked(inp, inp_known), gsd),
                    "truth": truth,
                    "known": known,
                    "target_name": target,
                    "target_view": View(reg[target], bands, _masked(truth, known), gsd, fake),
                    "samples": fake,
                }
            )
        settings = f"{model_name}, {steps_used} steps, seed {seed}, {config.window_size} px window"
        out = Path(output) / f"{_slug(entry.get('title', name))}.png"
        written.append(draw_direction(rows, f"{entry.get('title', name)}: {name}", out, settings))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-d", "--data", required=True, help="chip store (of all ../shared/data)")
    ap.add_argument("-m", "--model", default=None, help="model or run folder (default built-in)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (model's default)")
    ap.add_argument("-o", "--output", default=str(OUTPUT), help="folder of the PNGs")
    ap.add_argument("--chips", default=str(CHIPS), help="frozen chips (JSON)")
    ap.add_argument("-n", "--num-samples", type=int, default=SAMPLES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--choose", action="store_true", help="choose the chips and write --chips")
    ap.add_argument("--split", default="test", help="split to choose from (with --choose)")
    args = ap.parse_args(argv)
    if args.choose:
        model, _ = load_any_model(args.model)
        chips = choose_chips(args.data, args.split, ROWS, model.config.window_size)
        Path(args.chips).write_text(json.dumps(chips, indent=2) + "\n")
        print(f"wrote {args.chips}")
        return [Path(args.chips)]
    model, folder = load_any_model(args.model)
    chips = json.loads(Path(args.chips).read_text())
    name = "built-in model" if args.model is None else str(args.model)
    paths = make_gallery(model.eval(), args.data, chips, args.output, args.steps,
                         args.num_samples, args.seed, name)  # fmt: skip
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()
