"""The main job on data the installed package can reach: BigEarthNet examples.

The PyPI package ``bigearthnet-common`` (a declared dependency) ships six real BigEarthNet v1
patches (Sentinel-1 + Sentinel-2 pairs with CORINE labels) as archives. The demo unpacks
them, builds a chip store, and writes a preview and an HTML report. Generation joins it
when the built-in model lands.
"""

from __future__ import annotations

import html
import shutil
import tarfile
from importlib import resources
from pathlib import Path

from terrasynth.data.build import build_store
from terrasynth.data.preview import render_preview
from terrasynth.data.store import ChipStore
from terrasynth.modalities import default_registry

ARCHIVES = ("BigEarthNet-S1-Example.tar.bz2", "BigEarthNet-S2-Example.tar.bz2")


def unpack_examples(target: Path) -> Path:
    """Extract the BigEarthNet example archives shipped in ``bigearthnet-common``."""
    folder = target / "bigearthnet_examples"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    package = resources.files("bigearthnet_common")
    for name in ARCHIVES:
        with resources.as_file(package / name) as path, tarfile.open(path) as tar:
            tar.extractall(folder, filter="data")
    return folder


def run_demo(output: Path) -> Path:
    """Run the demo into ``output``; returns the HTML report's path."""
    output.mkdir(parents=True, exist_ok=True)
    data = unpack_examples(output)
    store_path = output / "store"
    build_store([data], store_path, default_registry(), overwrite=True)
    store = ChipStore.open(store_path)
    preview = render_preview(store, output / "preview.png", chips_per_modality=6)
    summary = store.summary()
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{c['train']}</td><td>{c['val']}</td>"
        f"<td>{c['test']}</td></tr>"
        for m, c in summary["modalities"].items()
    )
    report = output / "report.html"
    tmp = output / ".report.html.tmp"
    tmp.write_text(
        "<!doctype html><meta charset='utf-8'><title>terrasynth demo</title>"
        "<h1>terrasynth demo</h1>"
        f"<p>{summary['chips']} chips of {summary['chip_size']} px built from the BigEarthNet "
        "v1 example patches shipped in <code>bigearthnet-common</code> "
        "(CDLA-Permissive-1.0).</p>"
        "<table border=1><tr><th>modality</th><th>train</th><th>val</th><th>test</th></tr>"
        f"{rows}</table>"
        f"<h2>Preview</h2><img src='{preview.name}' style='max-width:100%'>"
        "<p>Generation (S1&rarr;S2, S2&rarr;S1 and more) joins this report when the "
        "built-in model lands.</p>"
    )
    tmp.replace(report)
    return report
