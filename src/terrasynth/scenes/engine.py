"""Run a whole-scene job: in this process, or on a Dask cluster; then write the outputs.

>>> from terrasynth.scenes.engine import generate_scene
>>> generate_scene(pipe, JobSpec(inputs=[("s1grd", "s1.tif")], targets=["s2l2a"]), "out/")

The work folder (``out.work`` beside ``out``) keeps the job's state; running the same job
again after a kill resumes it. ``engine="dask"`` sends the tasks of each phase to a local
cluster of ``workers`` processes (one thread each), or to the scheduler at ``address``
(its workers must see the work folder and the input files under the same paths). Tasks
are pure functions of the job, so every engine gives the same arrays.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch
from affine import Affine
from rasterio.crs import CRS

from terrasynth.atomic import (
    LOCK,
    MARKER,
    atomic_folder,
    check_output,
    locked_folder,
    output_files,
    remove_folder,
)
from terrasynth.data.scene import Grid
from terrasynth.errors import TerrasynthError
from terrasynth.extras import require
from terrasynth.pipeline import Pipeline, package_versions
from terrasynth.scenes.job import JobSpec, SceneJob
from terrasynth.scenes.output import quicklook_generation, write_outputs
from terrasynth.stac import write_item

Progress = Callable[[str, int, int], None]  # (what, done, total)
DASK_FEATURE = "whole scenes on Dask (--engine dask, --scheduler)"


def work_folder(output: str | Path, level: str = "") -> Path:
    """Where the state of the job writing ``output`` lives (``level``: a cascade level)."""
    output = Path(output)
    return output.with_name(output.name + (f".{level}" if level else "") + ".work")


def discard_work(folder: Path) -> None:
    """Remove a finished job's work folder: renamed first to a hidden ``.NAME.trash``
    sibling, so a removal cut short never leaves a state a later run would resume (the next
    run of the same output removes the trash)."""
    trash = folder.with_name(f".{folder.name}.trash")
    remove_folder(trash)
    if folder.exists():
        folder.rename(trash)
    remove_folder(trash)


def remove_trash(output: str | Path) -> None:
    """Remove what a run of ``output`` killed while removing its work folders left."""
    for level in ("", "coarse"):
        work = work_folder(output, level)
        remove_folder(work.with_name(f".{work.name}.trash"))


def run_local(job: SceneJob, progress: Progress | None = None) -> None:
    """Every pending task, phase by phase, in this process."""
    total = len(job.phases()) * len(job.tiles())
    done = total - sum(len(job.pending(p)) for p in job.phases())
    for phase in job.phases():
        for key in job.pending(phase):
            job.run_task(phase, key)
            done += 1
            if progress is not None:
                progress(phase, done, total)


@lru_cache(maxsize=4)
def _worker_job(folder: str) -> SceneJob:
    """The job as a Dask worker process sees it, rebuilt from its ``job.json`` once per
    process (with its cascade parent, if any)."""
    sig = json.loads((Path(folder) / "job.json").read_text())
    torch.set_num_threads(1)
    pipe = _worker_pipeline(sig["model"], sig.get("precision", "auto"))
    grid = None
    if sig.get("grid_override"):
        g = sig["grid_override"]
        grid = Grid(CRS.from_string(g["crs"]), Affine(*g["transform"]), g["width"], g["height"])
    parent = _worker_job(sig["parent"]) if sig.get("parent") else None
    return SceneJob(pipe, JobSpec.from_json(sig["spec"]), folder, grid=grid, parent=parent).open()


@lru_cache(maxsize=2)
def _worker_pipeline(model: str, precision: str) -> Pipeline:
    """The model as the job's client runs it (the precision it resolved, so every tile of a
    scene is made alike whichever machine makes it)."""
    return Pipeline.from_pretrained(model).set_precision(precision)


def _dask_task(folder: str, phase: str, key: str) -> str:
    _worker_job(folder).run_task(phase, key)
    return key


def run_dask(
    job: SceneJob,
    address: str | None = None,
    workers: int = 2,
    progress: Progress | None = None,
) -> None:
    """Every pending task on a Dask cluster; a phase finishes before the next starts."""
    distributed = require("distributed", "dask", DASK_FEATURE)
    as_completed = distributed.as_completed
    cluster = None
    if address is None:
        cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
    client = distributed.Client(address or cluster)
    try:
        total = len(job.phases()) * len(job.tiles())
        done = total - sum(len(job.pending(p)) for p in job.phases())
        folder = str(job.folder.resolve())
        for phase in job.phases():
            keys = job.pending(phase)
            futures = client.map(_dask_task, [folder] * len(keys), [phase] * len(keys), keys,
                                 pure=False)  # fmt: skip
            for fut in as_completed(futures):
                fut.result()  # a task's error stops the job here, with its message
                done += 1
                if progress is not None:
                    progress(phase, done, total)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def generate_scene(
    pipe: Pipeline,
    spec: JobSpec,
    output: str | Path,
    overwrite: bool = False,
    engine: str = "local",
    address: str | None = None,
    workers: int = 2,
    progress: Progress | None = None,
    on_start: Callable[[SceneJob], None] | None = None,
) -> list[Path]:
    """Generate a whole scene into ``output`` (resuming an interrupted run of the same job)."""
    output = Path(output)
    remove_trash(output)
    check_output(output, overwrite)
    if engine not in ("local", "dask"):
        raise TerrasynthError(f"engine must be 'local' or 'dask', not '{engine}'")
    if engine == "dask":
        require("distributed", "dask", DASK_FEATURE)  # before any work
    work = work_folder(output)
    with locked_folder(work, "generate"):  # one run per work folder
        try:
            return _generate_scene(
                pipe, spec, output, overwrite, engine, address, workers, progress, on_start
            )
        except TerrasynthError:
            # refused before any state was written (bad input, bad settings): nothing to
            # resume, so no work folder is left behind
            if set(os.listdir(work)) <= {MARKER, LOCK}:
                discard_work(work)
            raise


def _generate_scene(
    pipe: Pipeline,
    spec: JobSpec,
    output: Path,
    overwrite: bool,
    engine: str,
    address: str | None,
    workers: int,
    progress: Progress | None,
    on_start: Callable[[SceneJob], None] | None,
) -> list[Path]:
    t0 = time.perf_counter()

    def run(job: SceneJob) -> None:
        if on_start is not None:
            on_start(job)
        if engine == "local":
            run_local(job, progress)
        else:
            run_dask(job, address, workers, progress)

    job = SceneJob(pipe, spec, work_folder(output))
    parent = None
    if spec.cascade:
        # the coarse level: the same footprint, k times coarser pixels, sampled in full
        k = round(spec.cascade / job.gsd)
        coarse_spec = replace(spec, cascade=None, gsd=None)
        parent = SceneJob(
            pipe, coarse_spec, work_folder(output, "coarse"), grid=job.work.scaled(max(k, 1))
        ).open(overwrite=overwrite)
        run(parent)
        job.refine(parent)
    job.open(overwrite=overwrite)
    run(job)
    seconds = time.perf_counter() - t0
    info = {
        "model": pipe.source,
        "backbone": pipe.model.config.backbone,
        "mode": "whole scene (streamed tiles)",
        **job.signature(),
        "versions": package_versions(),
        "engine": engine if address is None else f"dask at {address}",
        "workers": workers if engine == "dask" else 1,
        "tiles": len(job.tiles()),
        "cascade": None
        if parent is None
        else {
            "coarse_gsd_m": parent.gsd,
            "factor": job.cascade_factor,
            "start_level": spec.cascade_start,
            "coarse_grid": parent.signature()["grid"],
        },
        "windows_per_step": job.plan.windows_per_step(),
        "warnings": job.warnings,
        "seconds_sampling": round(seconds, 2),
    }
    from terrasynth.quicklook import render_quicklook

    with atomic_folder(output, overwrite, "generate") as tmp:
        write_outputs(job, tmp)
        render_quicklook(quicklook_generation(job, tmp, info), tmp / "quicklook.png")
        modalities = {n: job.cfg.registry[n] for n in spec.targets}
        write_item(tmp, output.name, job.grid, modalities, info)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        info["files"] = [p.name for p in output_files(tmp)] + ["generation.json"]
        (tmp / "generation.json").write_text(json.dumps(info, indent=2, default=str))
    discard_work(job.folder)
    if parent is not None:
        discard_work(parent.folder)
    return output_files(output)
