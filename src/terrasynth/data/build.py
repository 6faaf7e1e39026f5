"""Build a chip store from sources: read -> check -> align -> chip -> store."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from terrasynth.data.align import align_scene
from terrasynth.data.chips import cut_chips, pad_grid
from terrasynth.data.scene import Scene, Source
from terrasynth.data.sources import detect_source, generic_scene
from terrasynth.data.split import SplitConfig
from terrasynth.data.store import StoreWriter
from terrasynth.data.validate import check_layer
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
    warnings: list[str] = field(default_factory=list)


def check_scene_values(scene: Scene, registry: Registry, strict: bool) -> list[str]:
    """Range checks of every layer (see ``terrasynth.data.validate``); returns warnings."""
    warnings = []
    for layer in scene.layers:
        w = check_layer(layer, registry[layer.modality], scene.scene_id, strict=strict)
        if w is not None:
            warnings.append(w)
    return warnings


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
    jobs: list[Iterator[Scene]] = [s.scenes(str(p), registry) for p, s in found]
    if inputs:
        jobs.append(iter([generic_scene(inputs, registry, scaling=scaling)]))
    writer = StoreWriter(output, registry, chip_size, split, overwrite=overwrite)
    report = BuildReport(Path(output), 0, skipped=skipped)
    try:
        for scenes in jobs:
            t0 = time.perf_counter()
            for scene in scenes:
                report.warnings += check_scene_values(scene, registry, strict)
                grid, inside = pad_grid(scene.grid, chip_size)
                aligned = align_scene(replace(scene, grid=grid), registry)
                n = 0
                # In a padded scene, availability is judged on the part the scene covers.
                for chip in cut_chips(aligned, chip_size, split, min_valid, coverage=inside):
                    writer.add(chip, scene)
                    n += 1
                src = scene.source
                report.scenes_per_source[src] = report.scenes_per_source.get(src, 0) + 1
                report.chips_per_source[src] = report.chips_per_source.get(src, 0) + n
                report.chips += n
                if on_scene is not None:
                    on_scene(src, scene, n)
                report.seconds_per_source[src] = (
                    report.seconds_per_source.get(src, 0.0) + time.perf_counter() - t0
                )
                t0 = time.perf_counter()
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
