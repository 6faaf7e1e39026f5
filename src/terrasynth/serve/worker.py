"""The worker process of one map-app job: ``python -m terrasynth.serve.worker JOB_FOLDER``.

It runs the job through the same code as ``terrasynth generate`` (in memory, or the
whole-scene engine when the inputs' headers say the scene is too large), writes its
progress into ``state.json`` and stops between model calls when ``cancel`` appears.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from terrasynth.errors import TerrasynthError
from terrasynth.serve.jobs import read_json, write_json

PROGRESS_EVERY_S = 0.3


class Cancelled(Exception):
    """The page asked the job to stop."""


class Reporter:
    """Writes progress into ``state.json`` (at most every 0.3 s) and checks for cancel."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.state: dict[str, Any] = {
            "status": "running",
            "done": 0,
            "total": 0,
            "pid": os.getpid(),
            "started": time.time(),
        }
        self.last = 0.0
        self.write()

    def write(self, **changes: Any) -> None:
        self.state.update(changes)
        write_json(self.folder / "state.json", self.state)

    def __call__(self, done: int, total: int | None, phase: str = "sampling") -> None:
        if (self.folder / "cancel").exists():
            raise Cancelled
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S or (total and done >= total):
            self.last = now
            self.write(done=done, total=total or 0, phase=phase)


def run_job(folder: Path) -> None:
    """Run the job in ``folder`` to its end: done, failed (with a message) or cancelled."""
    from terrasynth.pipeline import Pipeline
    from terrasynth.scenes.engine import discard_work, generate_scene, work_folder
    from terrasynth.scenes.job import JobSpec

    job = read_json(folder / "job.json")
    report = Reporter(folder)
    output = folder / "output"
    try:
        report.write(phase="loading the model")
        pipe = Pipeline.from_pretrained(job["model"])
        inputs = [(f"{i['modality']}:{','.join(i['bands'])}", i["path"]) for i in job["inputs"]]
        settings = dict(num_samples=job["num_samples"], seed=job["seed"], steps=job["steps"])
        refusal = pipe.in_memory_refusal(inputs) if inputs else None
        if refusal is None:
            result = pipe.generate(inputs, job["targets"], progress=report, **settings)
            report.write(phase="writing files")
            result.save(output)
            warnings = result.info["warnings"]
        else:
            report.write(phase=f"whole scene: {refusal}")
            spec = JobSpec(inputs=inputs, targets=job["targets"], **settings)
            try:
                generate_scene(pipe, spec, output, progress=lambda phase, d, t: report(d, t, phase))
            except Cancelled:
                discard_work(work_folder(output))
                raise
            warnings = read_json(output / "generation.json")["warnings"]
        files = sorted(p.name for p in output.iterdir() if not p.name.startswith("."))
        report.write(
            status="done", phase="done", files=files, warnings=warnings, finished=time.time()
        )
    except Cancelled:
        report.write(status="cancelled", message="cancelled", finished=time.time())
    except TerrasynthError as exc:
        report.write(status="failed", message=" ".join(str(exc).split()), finished=time.time())
    except Exception as exc:  # shown in the page; the traceback is in worker.log
        report.write(status="failed", message=f"{type(exc).__name__}: {exc}", finished=time.time())
        raise


def main(argv: list[str] | None = None) -> None:
    """Entry point of the worker process."""
    args = sys.argv[1:] if argv is None else argv
    run_job(Path(args[0]))


if __name__ == "__main__":
    main()
