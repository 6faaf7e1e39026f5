"""Data-parallel training under torchrun: two CPU processes over gloo."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from terrasynth.models.config import ModelConfig
from terrasynth.models.scene_model import SceneModel
from terrasynth.training.trainer import read_metrics

pytestmark = pytest.mark.needs_data

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_torchrun_two_processes(small_store, tmp_path):
    run = tmp_path / "run"
    args = ["-d", str(small_store), "-o", str(run), "--steps", "4", "--batch-size", "4"]
    res = subprocess.run(
        [*TORCHRUN, "-m", "terrasynth.cli.main", "train", *args, "--checkpoint-every", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("done at step 4") == 1  # rank 0 reports, rank 1 stays quiet
    # one metrics file, one line per logged step (rank 0 only)
    assert [p.name for p in run.glob("*.jsonl")] == ["metrics.jsonl"]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [4]
    assert metrics[0]["samples_per_s"] > 0 and metrics[0]["loss"] > 0
    assert (run / "latest").read_text() == "step_0000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000002",
        "step_0000004",
    ]
    ckpt = run / "checkpoints" / "step_0000004"
    cfg = ModelConfig.load(ckpt / "config.json")
    model = SceneModel(cfg)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert state["step"] == 4
    # each process's data position: 4 batches each, of disjoint parts of one order
    assert [r["data"] for r in state["ranks"]] == [{"epoch": 0, "offset": 4}] * 2
    SceneModel.from_pretrained(run / "model")


SCRIPT = """
import json, sys, types
import torch
import terrasynth.models.config as C
import terrasynth.training.trainer as T

C.PRESETS["tiny"] = dict(image_size=16, patch_size=8, dim=32, depth=1, heads=2, scene_tokens=2)
clock = iter(range(10_000))  # every reading of the clock is one second later
T.time = types.SimpleNamespace(perf_counter=lambda: float(next(clock)))
seen = []
orig = T.batch_signals
def spy(batch, *a, **k):
    seen.append(batch["index"].tolist())
    return orig(batch, *a, **k)
T.batch_signals = spy
store, run = sys.argv[1], sys.argv[2]
cfg = T.TrainConfig(steps=6, batch_size=4, checkpoint_every=100, log_every=1, bf16=False)
tr = T.Trainer(store, run, cfg)
fresh = tr.gen.get_state().tolist()
tr.train()
after = tr.gen.get_state().tolist()
torch.save(tr.model.state_dict(), f"{run}/rank{tr.rank}.pt")
resumed = T.Trainer(store, run, cfg, resume=True)
with open(f"{run}/rank{tr.rank}.json", "w") as f:
    json.dump(dict(seen=seen, fresh=fresh, after=after, resumed=resumed.gen.get_state().tolist(),
                   data=resumed.batches.state()), f)
"""


@pytest.fixture(scope="module")
def ddp_run(small_store, tmp_path_factory):
    """6 steps of a tiny model on two processes, then each process resumes the run."""
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "train_ddp.py"
    script.write_text(textwrap.dedent(SCRIPT))
    run = tmp / "run"
    res = subprocess.run(
        [*TORCHRUN, str(script), str(small_store), str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return run, [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ranks_stay_in_sync_on_disjoint_data(ddp_run):
    run, ranks = ddp_run
    a = torch.load(run / "rank0.pt")
    b = torch.load(run / "rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # gradients were averaged every step
    assert [len(r["seen"]) for r in ranks] == [6, 6]
    chips = [{i for batch in r["seen"] for i in batch} for r in ranks]
    assert len(chips[0]) == len(chips[1]) == 24 and not chips[0] & chips[1]
    # a second per step on the fake clock: 4 chips x 2 processes per second
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(m["samples_per_s"] == pytest.approx(8.0) for m in metrics)
    # each process resumes at its own data position
    assert [r["data"] for r in ranks] == [{"epoch": 0, "offset": 6}] * 2
    # the two processes draw different roles and noise
    assert ranks[0]["fresh"] != ranks[1]["fresh"] and ranks[0]["after"] != ranks[1]["after"]


def test_resumed_ranks_keep_their_own_generator(ddp_run):
    _, ranks = ddp_run
    assert [r["resumed"] for r in ranks] == [r["after"] for r in ranks]
