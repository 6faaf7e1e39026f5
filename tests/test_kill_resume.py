"""Killed at any moment: training and whole-scene generation resume to the uninterrupted
result (``bench/kill_resume.py``), and the commit points a random kill rarely hits."""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import pytest

import terrasynth.models.config as model_config
from terrasynth.atomic import write_marker
from terrasynth.scenes.engine import discard_work, generate_scene, work_folder
from terrasynth.scenes.job import JobSpec
from terrasynth.training.trainer import TrainConfig, Trainer, read_metrics
from tests.conftest import MICRO_CONV, run_cli, write_s1_utm

pytestmark = [pytest.mark.needs_data, pytest.mark.usefixtures("one_torch_thread")]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kill_resume as bench  # noqa: E402


def _cfg(**kw) -> TrainConfig:
    base = dict(backbone="conv_generator", batch_size=2, warmup=100, log_every=1, bf16=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def micro_conv(monkeypatch):
    monkeypatch.setitem(model_config.CONV_PRESETS, "tiny", MICRO_CONV)


def test_two_kills_of_each_kind_resume_to_the_uninterrupted_result(tmp_path):
    """The bench itself, on its smallest settings: 2 SIGKILLs of ``terrasynth train`` and
    of ``terrasynth generate --stream``, no corrupt file, outputs equal bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    train = bench.bench_training(tmp_path, 2, 4, env, rng, lambda msg: None)
    scene = bench.bench_generation(tmp_path, 2, 256, 128, env, rng, lambda msg: None, steps=1)
    for tally in (train, scene):
        assert tally.kills >= 2 and tally.ok, (tally.corrupt, tally.failures, tally.equal)
        assert tally.resumes_ok == tally.resumes


def test_kill_between_checkpoint_and_latest_still_finishes_the_run(
    micro_conv, slope_store, tmp_path
):
    """Killed after renaming its last checkpoint but before naming it in ``latest`` and
    exporting it: the resumed run names it and exports it (it used to end with ``latest``
    one checkpoint behind and a stale ``model/``)."""
    run = tmp_path / "run"
    Trainer(slope_store, run, _cfg(steps=4, checkpoint_every=2)).train()
    ckpts = run / "checkpoints"
    (run / "latest").write_text("step_0000002")
    shutil.copy(ckpts / "step_0000002" / "ema.safetensors", run / "model" / "model.safetensors")
    Trainer(slope_store, run, _cfg(steps=4, checkpoint_every=2), resume=True).train()
    assert (run / "latest").read_text() == "step_0000004"
    exported = (run / "model" / "model.safetensors").read_bytes()
    assert exported == (ckpts / "step_0000004" / "ema.safetensors").read_bytes()


def test_a_new_run_drops_the_log_of_one_killed_before_its_first_checkpoint(
    micro_conv, slope_store, tmp_path
):
    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "train")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    Trainer(slope_store, run, _cfg(steps=2)).train()
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    assert read_metrics(run)[0]["loss"] != 9.0


def test_a_work_folder_removal_cut_short_is_never_resumed(tmp_path):
    """The finished job's work folder is renamed to a trash folder before it is deleted
    (marker last); the next run of the output removes what a kill left of it."""
    s1 = write_s1_utm(tmp_path / "s1.tif", 64, 64)
    spec = JobSpec(inputs=[("s1grd", str(s1))], targets=["s2l2a"], num_samples=1, steps=1)
    from terrasynth.pipeline import Pipeline

    out = tmp_path / "out"
    work = work_folder(out)
    work.mkdir()
    write_marker(work, "generate")
    (work / "job.json").write_text("{}")
    discard_work(work)
    assert not work.exists() and not (tmp_path / ".out.work.trash").exists()
    trash = tmp_path / ".out.work.trash"  # killed half-way through removing it
    trash.mkdir()
    write_marker(trash, "generate")
    (trash / "state.zarr").mkdir()
    generate_scene(Pipeline.from_pretrained(), spec, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s1.tif"]
    trash.mkdir()  # killed there after the output was in place: the same command says so
    write_marker(trash, "generate")
    res = run_cli("generate", "-i", f"s1grd={s1}", "-t", "s2l2a", "--stream", "-o", str(out))
    assert res.returncode == 2 and "already exists" in res.stderr
    assert not trash.exists()
