"""Build a chip store from sources: read -> check -> align -> chip -> store."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from terrasynth.data.align import align_scene
from terrasynth.data.chips import cut_chips
from terrasynth.data.scene import Scene, Source
from terrasynth.data.sources import detect_source, generic_scene
from terrasynth.data.split import SplitConfig
from terrasynth.data.store import StoreWriter
from terrasynth.errors import InputError, TerrasynthError
from terrasynth.modalities import Registry


@dataclass
class BuildReport:
    """What a build did, for the CLI and the benchmarks."""

    path: Path
    chips: int
    scenes_per_source: dict[str, int] = field(default_factory=dict)
    chips_per_source: dict[str, int] = field(default_factory=dict)
    seconds_per_source: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def check_layer_values(scene: Scene, registry: Registry) -> None:
    """Refuse layers whose values are far outside their modality's physical range.

    "Far" means the median of valid values lies outside the range widened by its own width:
    the signature of a unit or scaling mistake (DN given as reflectance, metres as km),
    not of a few outliers.
    """
    for layer in scene.layers:
        mod = registry[layer.modality]
        if mod.kind != "continuous" or mod.value_range is None:
            continue
        values = layer.data[layer.valid_mask()]
        if values.size == 0:
            continue
        lo, hi = mod.value_range
        width = hi - lo
        med = float(np.median(values))
        if med < lo - width or med > hi + width:
            raise InputError(
                f"{scene.scene_id}: {mod.name} values (median {med:.4g}) are far outside its "
                f"range [{lo:g}, {hi:g}] {mod.units}; check the modality, scale and units "
                "(--scale/--offset for your own files)"
            )


def resolve_sources(paths: Iterable[str | Path], strict: bool) -> tuple[list, list[str]]:
    """Pair each path with its reader; unrecognised paths are skipped (or refused)."""
    found: list[tuple[Path, Source]] = []
    skipped: list[str] = []
    paths = [Path(p) for p in paths]
    for p in paths:
        try:
            found.append((p, detect_source(p)))
        except InputError:
            if strict or len(paths) == 1:
                raise
            skipped.append(str(p))
    return found, skipped


def build_store(
    paths: Iterable[str | Path],
    output: str | Path,
    registry: Registry,
    *,
    inputs: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    scaling: dict[str, tuple[float, float]] | None = None,
    chip_size: int = 64,
    min_valid: float = 0.5,
    split: SplitConfig | None = None,
    overwrite: bool = False,
    strict: bool = False,
    on_scene: Callable[[str, Scene, int], None] | None = None,
) -> BuildReport:
    """Build a store at ``output`` from source folders and/or generic ``--input`` files.

    Nothing is left at ``output`` unless the build completes.
    """
    import time

    split = split or SplitConfig()
    found, skipped = resolve_sources(paths, strict)
    if not found and not inputs:
        raise TerrasynthError("no recognised source given")
    jobs: list[tuple[str, Iterator[Scene]]] = [(s.name, s.scenes(str(p))) for p, s in found]
    if inputs:
        jobs.append(("generic", iter([generic_scene(inputs, registry, scaling=scaling)])))
    writer = StoreWriter(output, registry, chip_size, split, overwrite=overwrite)
    report = BuildReport(Path(output), 0, skipped=skipped)
    try:
        for name, scenes in jobs:
            t0 = time.perf_counter()
            for scene in scenes:
                check_layer_values(scene, registry)
                aligned = align_scene(scene, registry)
                n = 0
                for chip in cut_chips(aligned, chip_size, split, min_valid):
                    writer.add(chip, scene)
                    n += 1
                report.scenes_per_source[name] = report.scenes_per_source.get(name, 0) + 1
                report.chips_per_source[name] = report.chips_per_source.get(name, 0) + n
                report.chips += n
                if on_scene is not None:
                    on_scene(name, scene, n)
            report.seconds_per_source[name] = (
                report.seconds_per_source.get(name, 0.0) + time.perf_counter() - t0
            )
        writer.close(
            {
                "build": {
                    "sources": [str(p) for p, _ in found],
                    "chip_size": chip_size,
                    "min_valid": min_valid,
                }
            }
        )
    except BaseException:
        writer.abort()
        raise
    return report
