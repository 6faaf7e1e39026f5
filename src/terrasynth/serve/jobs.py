"""Generation jobs of the map app: one worker process each, state on disk.

A job lives in ``jobs/ID/``: ``job.json`` (inputs with their server-side paths, targets,
settings), ``state.json`` (status, progress, message; written atomically by the worker),
and ``output/`` (the files ``terrasynth generate`` writes). A page that reloads finds
its job again by id; the id is unguessable, and every path is built by the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from terrasynth.errors import InputError
from terrasynth.serve.inputs import InputStore, check_bands, new_id, valid_id

MAX_SAMPLES = 16
MAX_STEPS = 200
FINISHED = ("done", "failed", "cancelled")
CANCEL_GRACE_S = 5.0


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``path`` atomically (a temporary sibling renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _int(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number") from None
    if not low <= number <= high:
        raise InputError(f"{name} must be between {low} and {high}")
    return number


class JobStore:
    """Starts, follows and cancels jobs under ``root/jobs``."""

    def __init__(self, root: Path, inputs: InputStore, model: str | None, targets: list[str]):
        self.root = root / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.inputs = inputs
        self.model = model
        self.targets = targets
        self.processes: dict[str, subprocess.Popen] = {}

    def folder(self, job_id: str) -> Path:
        """The folder of an existing job; an unknown or malformed id is an InputError."""
        folder = self.root / job_id
        if not valid_id(job_id) or not (folder / "job.json").is_file():
            raise InputError("no such job")
        return folder

    def create(self, request: dict[str, Any]) -> str:
        """Check a job request from the page and start its worker; returns the job id."""
        targets = request.get("targets") or []
        if not isinstance(targets, list) or not targets:
            raise InputError("choose at least one modality to generate")
        for t in targets:
            if t not in self.targets:
                raise InputError(f"the model cannot generate '{t}'")
        inputs = []
        for item in request.get("inputs") or []:
            record = self.inputs.get(str(item.get("id", "")))
            modality = str(item.get("modality", record["modality"]))
            bands = [str(b) for b in item.get("bands", record["bands"])]
            check_bands(record, modality, bands, self.inputs.registry)
            inputs.append(
                {
                    "id": record["id"],
                    "name": record["name"],
                    "path": record["path"],
                    "modality": modality,
                    "bands": bands,
                }
            )
        steps = request.get("steps")
        job = {
            "targets": list(targets),
            "inputs": inputs,
            "num_samples": _int(request.get("num_samples", 4), "samples", 1, MAX_SAMPLES),
            "steps": None if steps in (None, "") else _int(steps, "steps", 1, MAX_STEPS),
            "seed": _int(request.get("seed", 0), "seed", 0, 2**31 - 1),
            "model": self.model,
            "created": time.time(),
        }
        job_id = new_id()
        folder = self.root / job_id
        folder.mkdir()
        job["id"] = job_id
        write_json(folder / "job.json", job)
        write_json(folder / "state.json", {"status": "queued", "done": 0, "total": 0})
        log = open(folder / "worker.log", "wb")  # noqa: SIM115  (the child holds it)
        self.processes[job_id] = subprocess.Popen(
            [sys.executable, "-m", "terrasynth.serve.worker", str(folder)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's settings as the page may see them (no server-side paths)."""
        job = read_json(self.folder(job_id) / "job.json")
        job["inputs"] = [{k: v for k, v in i.items() if k != "path"} for i in job["inputs"]]
        job.pop("model", None)
        return job

    def state(self, job_id: str) -> dict[str, Any]:
        """Status and progress; a worker that died without saying so is reported failed."""
        folder = self.folder(job_id)
        state = read_json(folder / "state.json")
        if state["status"] not in FINISHED and not self._alive(job_id, state):
            state = {**state, "status": "failed", "message": "the worker process stopped"}
            write_json(folder / "state.json", state)
        return state

    def _alive(self, job_id: str, state: dict[str, Any]) -> bool:
        proc = self.processes.get(job_id)
        if proc is not None:
            return proc.poll() is None
        pid = state.get("pid")  # a worker of an earlier run of this server
        if not pid:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.root / job_id).encode() in cmdline

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the worker to stop (it checks between model calls); stop it after a grace
        period if it does not."""
        folder = self.folder(job_id)
        (folder / "cancel").touch()
        proc = self.processes.get(job_id)
        if proc is not None and proc.poll() is None:
            threading.Thread(target=self._stop_later, args=(job_id, proc), daemon=True).start()
        return self.state(job_id)

    def _stop_later(self, job_id: str, proc: subprocess.Popen) -> None:
        try:
            proc.wait(CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            folder = self.root / job_id
            write_json(
                folder / "state.json",
                {**read_json(folder / "state.json"), "status": "cancelled", "message": "cancelled"},
            )

    def outputs(self, job_id: str) -> Path:
        """The output folder of a finished job."""
        folder = self.folder(job_id) / "output"
        if read_json(folder.parent / "state.json")["status"] != "done" or not folder.is_dir():
            raise InputError("the job has no outputs (yet)")
        return folder

    def output_file(self, job_id: str, name: str) -> Path:
        """A file of a finished job's outputs, by a name the job itself lists."""
        folder = self.outputs(job_id)
        files = {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
        if name not in files:
            raise InputError("no such file in the job's outputs")
        return folder / name

    def close(self) -> None:
        """Stop the workers this server started (on shutdown)."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
