"""Benchmark report: metrics as JSON and CSV, a Markdown and an HTML page with pictures.

Pictures per direction: example tiles (truth, samples, sample mean), per-band histograms of
real against generated values, and one reliability diagram per kind (continuous: empirical
against nominal coverage of central intervals; categorical: accuracy against confidence).
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from terrasynth.atomic import atomic_folder  # noqa: E402
from terrasynth.evaluation.benchmark import LEVELS, DirectionScores  # noqa: E402

# metric -> True when higher is better (for the tables' reading aid)
HIGHER_IS_BETTER = {
    "mae": False, "rmse": False, "psnr": True, "ssim": True, "spectral_angle": False,
    "mae_best_of_n": False, "crps": False, "spread_skill": None, "coverage_50": None,
    "coverage_90": None, "diversity": None, "wasserstein": False, "range_coverage": True,
    "feature_precision": True, "feature_recall": True, "feature_coverage": True,
    "accuracy": True, "miou": True, "ece": False, "accuracy_best_of_n": True,
    "sample_spectral_angle": False, "texture_ratio": None, "spectrum_ratio": None,
    "crps_shuffled": None, "accuracy_shuffled": None, "input_dependence": True,
    "relief_mae": False, "level_mae": False, "slope_error_median": False,
    "slope_mean_ratio": None,
}  # fmt: skip


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def write_report(
    results: list[DirectionScores],
    folder: Path,
    settings: dict,
    protocol: dict | None = None,
    seams: list[dict] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write everything into ``folder`` (atomically: a temporary sibling, then renamed).

    ``protocol`` (settings and chip ids per direction) is saved as ``protocol.json``: pass
    it back with ``terrasynth evaluate --protocol`` to score exactly the same chips.
    ``seams``: rows of :func:`terrasynth.evaluation.seams.scene_seams` (``seams.json``).
    A non-empty ``folder`` is replaced only with ``overwrite`` and only if terrasynth wrote it.
    """
    folder = Path(folder)
    with atomic_folder(folder, overwrite, "evaluate") as tmp:
        (tmp / "figures").mkdir()
        rows = []
        for r in results:
            for metric, value in r.summary().items():
                rows.append(
                    {
                        "direction": r.direction.name,
                        "target": r.direction.target,
                        "predictor": r.predictor,
                        "metric": metric,
                        "value": value,
                    }
                )
        (tmp / "metrics.json").write_text(
            json.dumps({"settings": settings, "rows": rows}, indent=2, default=float)
        )
        with open(tmp / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["direction", "target", "predictor", "metric", "value"])
            w.writeheader()
            w.writerows(rows)
        if protocol is not None:
            (tmp / "protocol.json").write_text(json.dumps(protocol, indent=2))
        figures = _figures(results, tmp / "figures")
        md = _markdown(results, settings)
        if seams:
            (tmp / "seams.json").write_text(json.dumps(seams, indent=2))
            md += _seams_markdown(seams)
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(_html(md, figures))
    return folder / "report.html"


def _table(results: list[DirectionScores], kind: str) -> str:
    sel = [r for r in results if r.kind == kind]
    if not sel:
        return ""
    metrics: list[str] = []
    for r in sel:
        metrics += [m for m in r.summary() if m not in metrics and m != "tiles"]
    head = "| direction | predictor | tiles | " + " | ".join(
        m + {True: " ↑", False: " ↓", None: ""}[HIGHER_IS_BETTER.get(m)] for m in metrics
    )
    lines = [head + " |", "|---|---|---:|" + "---:|" * len(metrics)]
    for r in sel:
        s = r.summary()
        cells = [f"{s[m]:.4g}" if m in s else "" for m in metrics]
        lines.append(
            f"| {r.direction.name} | {r.predictor} | {s['tiles']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _markdown(results: list[DirectionScores], settings: dict) -> str:
    text = ["# terrasynth benchmark", ""]
    text.append(
        "Settings: " + ", ".join(f"{k} `{v}`" for k, v in settings.items()) + ". Pointwise "
        "scores use the mean of the samples; `best_of_n` the sample closest to the truth; "
        "distribution scores pool all tiles of a direction (features: per-band mean, "
        "standard deviation, gradient magnitude and 10/50/90 % quantiles of a tile). "
        "Texture of every sample, pooled: `texture_ratio` (mean squared gradient of the "
        "samples over the truth's; 1 as rough as real, < 1 too smooth, >> 1 noise) and "
        "`spectrum_ratio` (mean log2 ratio of their radial power spectra over the upper "
        "half of the frequencies; 0 as real). `input_dependence`: the error with another "
        "chip's conditions over the error with the chip's own (about 1: inputs ignored). "
        "Elevation: `relief_mae` (MAE with each tile's own mean removed from prediction and "
        "truth), `level_mae` (error of the tile mean), `slope_error_median` (median "
        "absolute slope error of each sample, degrees) and `slope_mean_ratio` (mean slope "
        "of the samples over the true one)."
    )
    for kind, title in (("continuous", "Continuous targets"), ("categorical", "Land cover")):
        t = _table(results, kind)
        if t:
            text += ["", f"## {title}", "", t]
    return "\n".join(text) + "\n"


def _seams_markdown(seams: list[dict]) -> str:
    lines = [
        "",
        "## Seams of whole scenes",
        "",
        "Gradient energy across window borders over the energy across all other pixel pairs "
        "(about 1: no seam), and over the energy across the model's own patch edges. "
        "`shared`: overlapping windows on one noise field, blended at every step; "
        "`independent`: each window sampled alone, blended by the same cosine window.",
        "",
        "| method | target | seam ratio | vs patch edges | seconds |",
        "|---|---|---:|---:|---:|",
    ]
    for r in seams:
        lines.append(
            f"| {r['method']} | {r['target']} | {r['seam_ratio']:.3f} | "
            f"{r['seam_ratio_vs_patch_edges']:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _html(md: str, figures: list[tuple[str, str]]) -> str:
    body = []
    for block in md.split("\n\n"):
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("|"):
            rows = [ln.strip("|").split("|") for ln in lines if not ln.startswith("|---")]
            cells = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>"
                for row in rows
            )
            body.append(f"<table border=1 cellspacing=0 cellpadding=3>{cells}</table>")
        elif lines and lines[0].startswith("#"):
            level = len(lines[0]) - len(lines[0].lstrip("#"))
            body.append(f"<h{level}>{html.escape(lines[0].lstrip('# '))}</h{level}>")
            if len(lines) > 1:
                body.append(f"<p>{html.escape(' '.join(lines[1:]))}</p>")
        elif lines:
            body.append(f"<p>{html.escape(' '.join(lines))}</p>")
    body.append("<h2>Figures</h2>")
    for title, path in figures:
        body.append(f"<h3>{html.escape(title)}</h3><img src='{path}' style='max-width:100%'>")
    return (
        "<!doctype html><meta charset='utf-8'><title>terrasynth benchmark</title>"
        "<style>body{font-family:sans-serif;font-size:13px} td{text-align:right}</style>"
        + "".join(body)
    )


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def _figures(results: list[DirectionScores], folder: Path) -> list[tuple[str, str]]:
    out = []
    cont = [r for r in results if r.reliability]
    if cont:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
        for r in cont:
            ax.plot(
                LEVELS,
                np.mean(r.reliability, 0),
                marker="o",
                ms=3,
                label=f"{r.predictor}: {r.direction.name}",
            )
        ax.set_xlabel("nominal central-interval level")
        ax.set_ylabel("share of true values inside")
        ax.legend(fontsize=5)
        _save(fig, folder / "reliability_continuous.png")
        out.append(("Reliability (continuous)", "figures/reliability_continuous.png"))
    cat = [r for r in results if r.confidence]
    if cat:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        edges = np.linspace(0, 1, 11)
        for r in cat:
            conf = np.concatenate([c for c, _ in r.confidence])
            hit = np.concatenate([h for _, h in r.confidence])
            which = np.clip(np.digitize(conf, edges) - 1, 0, 9)
            xs = [conf[which == b].mean() for b in range(10) if (which == b).any()]
            ys = [hit[which == b].mean() for b in range(10) if (which == b).any()]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{r.predictor}: {r.direction.name}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=5)
        _save(fig, folder / "reliability_categorical.png")
        out.append(("Reliability (land cover)", "figures/reliability_categorical.png"))
    for r in results:
        slug = _slug(f"{r.predictor}_{r.direction.name}")
        if r.examples:
            ex = r.examples
            n = min(4, len(ex[0]["samples"]))
            fig, axes = plt.subplots(
                len(ex), n + 2, figsize=(1.6 * (n + 2), 1.7 * len(ex)), squeeze=False
            )
            for i, e in enumerate(ex):
                if e["kind"] == "categorical":
                    imgs = [e["truth"]] + list(e["samples"][:n]) + [e["samples"][0]]
                    titles = ["truth"] + [f"sample {k}" for k in range(n)] + ["sample 0"]
                    for ax, img, t in zip(axes[i], imgs, titles, strict=True):
                        ax.imshow(
                            np.where(img < 0, np.nan, img), cmap="tab20", interpolation="nearest"
                        )
                        ax.set_title(t, fontsize=6)
                else:
                    band = 0
                    truth = e["truth"][band]
                    lo, hi = np.nanpercentile(truth, [2, 98])
                    imgs = (
                        [truth]
                        + [s[band] for s in e["samples"][:n]]
                        + [e["samples"][:, band].mean(0)]
                    )
                    titles = ["truth"] + [f"sample {k}" for k in range(n)] + ["mean"]
                    for ax, img, t in zip(axes[i], imgs, titles, strict=True):
                        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
                        ax.set_title(f"{t} ({e['bands'][band]})", fontsize=6)
            for ax in axes.flat:
                ax.set_xticks([])
                ax.set_yticks([])
            fig.suptitle(f"{r.predictor}: {r.direction.name}", fontsize=8)
            _save(fig, folder / f"samples_{slug}.png")
            out.append(
                (f"Samples — {r.predictor}: {r.direction.name}", f"figures/samples_{slug}.png")
            )
        if r.real_values:
            bands = list(r.real_values)[:4]
            fig, axes = plt.subplots(1, len(bands), figsize=(2.6 * len(bands), 2.2), squeeze=False)
            for ax, b in zip(axes[0], bands, strict=True):
                real = np.concatenate(r.real_values[b])
                fake = np.concatenate(r.fake_values[b])
                lo, hi = np.percentile(real, [0.5, 99.5])
                bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
                with np.errstate(invalid="ignore", divide="ignore"):  # all outside the bins
                    ax.hist(real, bins, alpha=0.5, density=True, label="real")
                    ax.hist(fake, bins, alpha=0.5, density=True, label="generated")
                ax.set_title(b, fontsize=7)
                ax.tick_params(labelsize=5)
            axes[0, 0].legend(fontsize=5)
            fig.suptitle(f"{r.predictor}: {r.direction.name}", fontsize=8)
            _save(fig, folder / f"hist_{slug}.png")
            out.append(
                (f"Histograms — {r.predictor}: {r.direction.name}", f"figures/hist_{slug}.png")
            )
    return out
