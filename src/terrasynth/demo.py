"""The main job on data the installed package can reach: BigEarthNet examples.

The PyPI package ``bigearthnet-common`` (the ``demo`` extra) ships six real BigEarthNet v1
patches (Sentinel-1 + Sentinel-2 pairs with CORINE labels) as archives. The demo unpacks
them, builds a chip store with a preview, and runs the built-in model on their GeoTIFFs:
S1 -> S2, S2 -> S1, S2 -> elevation and land-cover labels, and S2 band infilling from RGB,
several samples each, with GeoTIFF outputs and an HTML report comparing them to the real
images.
"""

from __future__ import annotations

import html
import json
import shutil
import tarfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from terrasynth.atomic import atomic_folder
from terrasynth.data.build import build_store
from terrasynth.data.preview import render_preview
from terrasynth.data.store import ChipStore
from terrasynth.extras import require
from terrasynth.modalities import default_registry
from terrasynth.pipeline import Generation, Pipeline

ARCHIVES = ("BigEarthNet-S1-Example.tar.bz2", "BigEarthNet-S2-Example.tar.bz2")
# 10 m bands first: the first input's grid is the output grid
S2_BANDS = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12", "B01", "B09")
S2_SCALE = {"s2l2a": (1e-4, 0.0)}  # BigEarthNet v1 (2017-18): DN / 10000, no offset
DEMO_PATCHES = 2  # patches the generation jobs run on


def unpack_examples(target: Path) -> Path:
    """Extract the BigEarthNet example archives shipped in ``bigearthnet-common``."""
    folder = target / "bigearthnet_examples"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    package = resources.files(require("bigearthnet_common", "demo", "terrasynth demo"))
    for name in ARCHIVES:
        with resources.as_file(package / name) as path, tarfile.open(path) as tar:
            tar.extractall(folder, filter="data")
    return folder


def example_pairs(folder: Path) -> list[dict]:
    """S1/S2 file sets of the example patches, paired through the S1 metadata."""
    pairs = []
    for s1 in sorted((folder / "BigEarthNet-S1-Example").iterdir()):
        meta = json.loads(next(s1.glob("*_labels_metadata.json")).read_text())
        s2 = folder / "BigEarthNet-S2-Example" / meta["corresponding_s2_patch"]
        pairs.append(
            {
                "name": s2.name,
                "s1": [(f"s1grd:{p}", s1 / f"{s1.name}_{p}.tif") for p in ("VV", "VH")],
                "s2": [(f"s2l2a:{b}", s2 / f"{s2.name}_{b}.tif") for b in S2_BANDS],
                "date": meta["acquisition_time"][:10],
            }
        )
    return pairs


def demo_jobs(pair: dict) -> list[dict]:
    """The generation jobs of one patch: name, inputs, targets, what to compare with."""
    rgb = [(k, f) for k, f in pair["s2"] if k.split(":")[1] in ("B02", "B03", "B04")]
    return [
        {"name": "s1_to_s2", "inputs": pair["s1"], "targets": ["s2l2a"], "truth": pair["s2"]},
        {"name": "s2_to_s1", "inputs": pair["s2"], "targets": ["s1grd"], "truth": pair["s1"]},
        {
            "name": "s2_to_dem_and_labels",
            "inputs": pair["s2"],
            "targets": ["dem", "corine"],
            "truth": [],
        },
        {"name": "s2_infill_from_rgb", "inputs": rgb, "targets": ["s2l2a"], "truth": pair["s2"]},
    ]


def _truth_mae(gen: Generation, target: str, truth: list, pipe: Pipeline) -> float | None:
    """Mean absolute error of the sample mean against the real image, over generated bands,
    in physical units (the real image is read onto the output grid like an input)."""
    res = gen.targets[target]
    if res.mean is None or not truth:
        return None
    real = pipe.read_onto(truth, gen.grid, S2_SCALE)
    errs = []
    for i, band in enumerate(res.bands):
        if band in res.given_bands or band not in real:
            continue
        d = np.abs(res.mean[i] - real[band])
        errs.append(d[np.isfinite(d)])
    return float(np.concatenate(errs).mean()) if errs else None


def _truth_picture(gen: Generation, target: str, truth: list, pipe: Pipeline, path: Path):
    """The real image of ``target`` on the output grid (its own 2-98 % stretch)."""
    import matplotlib.pyplot as plt

    from terrasynth.data.preview import render_chip

    res = gen.targets[target]
    real = pipe.read_onto(truth, gen.grid, S2_SCALE)
    first = res.modality.groups[0]
    arr = np.stack([real[b] for b in first.bands])
    valid = np.isfinite(arr).all(0)
    img = render_chip(res.modality, {first.name: (np.nan_to_num(arr), valid)})
    tmp = path.with_name(f".{path.name}")
    plt.imsave(tmp, img, format="png")
    tmp.replace(path)


def run_demo(
    output: Path,
    num_samples: int = 4,
    model: Path | None = None,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> Path:
    """Run the demo into ``output``; returns the HTML report's path.

    The folder is written whole or not at all; a non-empty ``output`` is replaced only with
    ``overwrite`` and only if it is an earlier terrasynth output."""
    output = Path(output)
    require("bigearthnet_common", "demo", "terrasynth demo")  # before any work
    with atomic_folder(output, overwrite, "demo") as tmp:
        _run_demo(tmp, num_samples, model, log)
    return output / "report.html"


def _run_demo(output: Path, num_samples: int, model: Path | None, log) -> Path:
    t0 = time.perf_counter()
    data = unpack_examples(output)
    store_path = output / "store"
    build_store([data], store_path, default_registry())
    store = ChipStore.open(store_path)
    preview = render_preview(store, output / "preview.png", chips_per_modality=6)
    log(f"store of {len(store)} chips and a preview built")
    pipe = Pipeline.from_pretrained(model)
    sections = []
    for pair in example_pairs(data)[:DEMO_PATCHES]:
        for job in demo_jobs(pair):
            folder = output / "generated" / pair["name"] / job["name"]
            gen = pipe.generate(
                job["inputs"],
                job["targets"],
                num_samples=num_samples,
                seed=0,
                scaling=S2_SCALE,
                time=pair["date"],
            )
            gen.save(folder)
            maes = {t: _truth_mae(gen, t, job["truth"], pipe) for t in job["targets"]}
            if job["truth"]:
                _truth_picture(gen, job["targets"][0], job["truth"], pipe, folder / "real.png")
            log(
                f"{pair['name']} {job['name']}: {gen.info['seconds']:.1f} s"
                + "".join(f", MAE {t} {v:.4g}" for t, v in maes.items() if v is not None)
            )
            sections.append((pair, job, gen, folder, maes))
    report = _write_report(output, store, preview, sections, pipe, time.perf_counter() - t0)
    return report


def _write_report(output, store, preview, sections, pipe, seconds) -> Path:
    summary = store.summary()
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{c['train']}</td><td>{c['val']}</td>"
        f"<td>{c['test']}</td></tr>"
        for m, c in summary["modalities"].items()
    )
    parts = []
    for pair, job, gen, folder, maes in sections:
        rel = folder.relative_to(output)
        lines = []
        for t, res in gen.targets.items():
            if res.samples is None:
                lines.append(
                    f"<li>{html.escape(t)}: " + html.escape(_top_labels(res.values)) + "</li>"
                )
                continue
            unit = html.escape(res.modality.units or "")
            spread = float(np.nanmean(res.std)) if res.std is not None else None
            bits = [f"{len(res.samples)} samples"]
            if spread is not None:
                bits.append(f"mean spread (std) {spread:.4g} {unit}")
            if maes.get(t) is not None:
                bits.append(f"MAE of the sample mean against the real image {maes[t]:.4g} {unit}")
            if res.given_bands:
                bits.append("given bands: " + ", ".join(res.given_bands))
            lines.append(f"<li>{html.escape(t)}: " + "; ".join(bits) + "</li>")
        inputs = ", ".join(sorted({k.split(":")[0] for k, _ in job["inputs"]}))
        parts.append(
            f"<h3>{html.escape(pair['name'])}: {html.escape(job['name'])}</h3>"
            f"<p>from {html.escape(inputs)} &rarr; {html.escape(', '.join(job['targets']))} "
            f"in {gen.info['seconds']:.1f} s; files in <code>{html.escape(str(rel))}</code></p>"
            f"<ul>{''.join(lines)}</ul>"
            f"<img src='{html.escape(str(rel / 'quicklook.png'))}' style='max-width:100%'>"
            + (
                f"<p>The real {html.escape(job['targets'][0])} of this patch: "
                f"<img src='{html.escape(str(rel / 'real.png'))}' width=180></p>"
                if job["truth"]
                else ""
            )
        )
    report = output / "report.html"
    tmp = output / ".report.html.tmp"
    tmp.write_text(
        "<!doctype html><meta charset='utf-8'><title>terrasynth demo</title>"
        "<h1>terrasynth demo</h1>"
        f"<p>Model: <code>{html.escape(pipe.source)}</code>. Whole run: {seconds:.0f} s.</p>"
        f"<p>{summary['chips']} chips of {summary['chip_size']} px built from the BigEarthNet "
        "v1 example patches shipped in <code>bigearthnet-common</code> "
        "(CDLA-Permissive-1.0). These patches also belong to the data the built-in model "
        "was trained on (their training-split chips), so the numbers below show the "
        "pipeline working, not held-out skill; held-out figures are in the model card.</p>"
        "<table border=1><tr><th>modality</th><th>train</th><th>val</th><th>test</th></tr>"
        f"{rows}</table>"
        f"<h2>Preview of the store</h2><img src='{preview.name}' style='max-width:100%'>"
        "<h2>Generation</h2>" + "".join(parts)
    )
    tmp.replace(report)
    return report


def _top_labels(values: list[dict]) -> str:
    """The labels most samples call likely, with their mean probability."""
    names = list(values[0])
    mean = np.mean([[v[n] for n in names] for v in values], 0)
    top = np.argsort(mean)[::-1][:3]
    return "most likely labels: " + "; ".join(f"{names[i]} ({mean[i]:.2f})" for i in top)
