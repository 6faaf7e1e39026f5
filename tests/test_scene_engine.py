"""Running whole-scene jobs: a Dask cluster gives the same result; kill -9 and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio

from terrasynth.pipeline import Pipeline
from terrasynth.scenes.engine import generate_scene, work_folder
from terrasynth.scenes.job import JobSpec
from tests.conftest import run_cli, write_s1_utm

pytestmark = pytest.mark.needs_data


@pytest.mark.usefixtures("one_torch_thread")  # as the workers: convolutions sum in the
# order of their threads, so bit-identical arrays need the same torch thread count
def test_a_local_dask_cluster_gives_the_same_arrays_as_this_process(s1_utm, tmp_path):
    pipe = Pipeline.from_pretrained()
    spec = JobSpec(inputs=[("s1grd", str(s1_utm))], targets=["s2l2a", "dem"], num_samples=1,
                   seed=2, steps=2, eta=0.3, tile=64)  # fmt: skip
    generate_scene(pipe, spec, tmp_path / "local")
    generate_scene(pipe, spec, tmp_path / "dask", engine="dask", workers=2)
    for name in ("s2l2a_sample0.tif", "dem_sample0.tif"):
        a = rasterio.open(tmp_path / "local" / name).read()
        b = rasterio.open(tmp_path / "dask" / name).read()
        assert np.array_equal(a, b), name


def test_kill_9_then_the_same_command_resumes_to_the_uninterrupted_result(tmp_path):
    s1 = write_s1_utm(tmp_path / "s1.tif", 320, 320)
    args = ["generate", "-i", f"s1grd={s1}", "-t", "s2l2a", "-n", "1", "--steps", "3",
            "--seed", "4", "--stream", "--tile", "64"]  # fmt: skip
    done = run_cli(*args, "-o", str(tmp_path / "whole"))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "terrasynth.cli.main", *args, "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    markers = work_folder(out) / "done" / "step0"  # the first phase (one-step models: the only)
    deadline = time.time() + 240
    while time.time() < deadline and not (markers.exists() and len(os.listdir(markers)) >= 5):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-written where the result goes
    assert work_folder(out).exists()
    resumed = run_cli(*args, "-o", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stdout
    for name in ("s2l2a_sample0.tif", "s2l2a_mean.tif"):
        with rasterio.open(tmp_path / "whole" / name) as a, rasterio.open(out / name) as b:
            assert np.array_equal(a.read(), b.read())
            assert b.profile["tiled"] and np.isfinite(b.read()).all()


def test_two_runs_on_one_work_folder_the_second_gets_an_error_line(tmp_path):
    # a scene large enough that the first run is still going when the second starts (it
    # is killed then): with 320 px and one sample it could end first on a fast machine
    s1 = write_s1_utm(tmp_path / "s1.tif", 960, 960)
    out = tmp_path / "out"
    args = ["generate", "-i", f"s1grd={s1}", "-t", "s2l2a", "-n", "4", "--steps", "8",
            "--stream", "--tile", "64", "-o", str(out)]  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "terrasynth.cli.main", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    lock = work_folder(out) / ".lock"
    deadline = time.time() + 240
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip()):
        time.sleep(0.05)
    try:
        second = run_cli(*args)
        assert first.poll() is None, "the first run ended before the second started"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: another terrasynth run"), lines
    assert str(first.pid) in lines[0]
    assert not out.exists() and work_folder(out).exists()  # the first run resumes from it
