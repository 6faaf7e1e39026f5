"""The training loop: run folder, checkpoints, resume, and surviving kill -9 and Ctrl-C."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import terrasynth.models.config as model_config
from terrasynth.data import dataset as dataset_module
from terrasynth.errors import TerrasynthError
from terrasynth.models.config import CONV_PRESETS, ModelConfig
from terrasynth.models.conv_generator import ConvGenerator
from terrasynth.models.factory import build_model, load_model, model_folder
from terrasynth.models.scene_model import SceneModel
from terrasynth.models.unet import UNet, unet_config
from terrasynth.training.objective import FlowObjective, RegressionObjective
from terrasynth.training.score_objective import ScoreObjective
from terrasynth.training.trainer import (
    TrainConfig,
    Trainer,
    _lr_lambda,
    objective_for,
    read_metrics,
)
from tests.conftest import MICRO_CONV, MICRO_MODEL, MICRO_UNET, run_cli

pytestmark = [pytest.mark.needs_data, pytest.mark.usefixtures("one_torch_thread")]

MICRO = MICRO_MODEL
CKPT_FILES = ["config.json", "ema.safetensors", "model.safetensors", "optimizer.pt"]


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=4, warmup=2, checkpoint_every=3, log_every=1, bf16=False)
    return TrainConfig(**{**base, **kw})


def test_runs_saved_before_an_option_keep_their_behaviour():
    old = TrainConfig.from_dict({"preset": "tiny", "steps": 10, "source_balance": 0.3})
    assert old.balance_by == "source" and not old.derive and old.relief_scale == 0.0
    new = TrainConfig()
    assert new.balance_by == "kind" and new.derive and new.relief_scale == 0.6


@pytest.fixture
def micro(monkeypatch):
    """The 'tiny' preset shrunk to a model that trains in milliseconds."""
    monkeypatch.setitem(model_config.PRESETS, "tiny", MICRO)


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory):
    """A 6-step run (checkpoints every 3 steps) and its trainer."""
    run = tmp_path_factory.mktemp("runs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(model_config.PRESETS, "tiny", MICRO)
        trainer = Trainer(small_store, run, _cfg(steps=6, bf16=True))
    reason = trainer.train()
    return run, trainer, reason


def _complete(ckpt: Path) -> dict:
    """Check one checkpoint folder holds everything and loads; return its training state."""
    assert sorted(p.name for p in ckpt.iterdir()) == CKPT_FILES, ckpt
    cfg = ModelConfig.load(ckpt / "config.json")
    model = SceneModel(cfg)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    model.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {"optimizer", "scheduler", "step", "ranks"} <= set(state)
    for rank in state["ranks"]:
        assert {"data", "generator", "torch_rng"} <= set(rank)
    assert ckpt.name == f"step_{int(state['step']):07d}"
    return state


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "latest").read_text().strip()


def test_run_folder_after_training(trained):
    run, trainer, reason = trained
    assert reason == "done" and trainer.step == 6
    assert (run / "latest").read_text() == "step_0000006"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_0000003", "step_0000006"]  # no temporary folders left
    for name in names:
        _complete(run / "checkpoints" / name)
    state = _complete(_latest(run))
    assert state["step"] == 6 and [r["data"] for r in state["ranks"]] == [{"epoch": 0, "offset": 6}]
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["steps"] == 6 and saved["batch_size"] == 4
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert m["loss"] > 0 and m["samples_per_s"] > 0 and m["tokens_per_s"] > 0
        assert m["modalities"] and m["lr"] > 0
    # warm-up of 2 steps, then cosine decay
    lrs = [m["lr"] for m in metrics]
    assert lrs[1] == pytest.approx(TrainConfig().lr) and lrs[-1] < lrs[2] < lrs[1]


def test_exported_model_is_the_ema(trained):
    run, trainer, _ = trained
    model = SceneModel.from_pretrained(run / "model")
    assert model.config.dim == 32 and model.config.preset == "tiny"
    ema = trainer.ema.module.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    ckpt_ema = load_file(str(_latest(run) / "ema.safetensors"))
    assert all(torch.equal(ckpt_ema[k], v) for k, v in model.state_dict().items())
    # the EMA differs from the raw weights after training
    raw = load_file(str(_latest(run) / "model.safetensors"))
    assert any(not torch.equal(raw[k], v) for k, v in model.state_dict().items())


def test_resume_continues(trained, small_store, tmp_path):
    src, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    weights = load_file(str(_latest(run) / "model.safetensors"))
    # a different batch size is refused (the saved settings win, except steps)
    with pytest.raises(TerrasynthError, match=r"differ: --batch-size 2 \(saved: --batch-size 4\)"):
        Trainer(small_store, run, _cfg(steps=9, batch_size=2), resume=True)
    trainer = Trainer(small_store, run, _cfg(steps=9, batch_size=4, bf16=True), resume=True)
    assert trainer.step == 6 and trainer.cfg.steps == 9 and trainer.cfg.batch_size == 4
    assert trainer.batches.state() == {"epoch": 0, "offset": 6}
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, weights[k])
    assert trainer.train() == "done" and trainer.step == 9
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 10))
    assert (run / "latest").read_text() == "step_0000009"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000006",
        "step_0000009",
    ]
    assert [r["data"] for r in _complete(_latest(run))["ranks"]] == [{"epoch": 0, "offset": 9}]


def test_resume_without_checkpoint_and_reuse_of_a_run_folder(trained, small_store, tmp_path):
    with pytest.raises(TerrasynthError, match="nothing to resume"):
        Trainer(small_store, tmp_path / "new", _cfg(steps=2), resume=True)
    run, _, _ = trained
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(TerrasynthError, match="already holds a run"):
        Trainer(small_store, run, _cfg(steps=2))
    assert (run / "metrics.jsonl").read_text() == before


def _weights_after(small_store, root: Path, split: bool) -> dict[str, torch.Tensor]:
    # warm-up longer than the run: the learning rate does not depend on cfg.steps
    kw = dict(warmup=100, checkpoint_every=3)
    if split:
        Trainer(small_store, root, _cfg(steps=3, **kw)).train()
        Trainer(small_store, root, _cfg(steps=6, **kw), resume=True).train()
    else:
        Trainer(small_store, root, _cfg(steps=6, **kw)).train()
    return load_file(str(root / "checkpoints" / "step_0000006" / "model.safetensors"))


def test_resume_restores_model_optimiser_rng_and_data_position(
    micro, small_store, tmp_path, monkeypatch
):
    """3 + 3 steps give the 6-step weights exactly (with augmentation switched off)."""
    monkeypatch.setattr(dataset_module.RandomCropFlip, "_randint", lambda self, n: 0)
    a = _weights_after(small_store, tmp_path / "a", split=False)
    b = _weights_after(small_store, tmp_path / "b", split=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_with_augmentation(micro, small_store, tmp_path):
    a = _weights_after(small_store, tmp_path / "a", split=False)
    b = _weights_after(small_store, tmp_path / "b", split=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_while_saving_again_keeps_latest_loadable(micro, small_store, tmp_path, monkeypatch):
    trainer = Trainer(small_store, tmp_path / "run", _cfg(steps=3))
    trainer.train()  # ends at step 3, a checkpoint step: saved in the loop and again after it

    def killed(self, target):
        raise OSError("killed")  # the process dies right here

    monkeypatch.setattr(Path, "rename", killed)
    trainer.save()  # the step's checkpoint exists: nothing is deleted or renamed
    monkeypatch.undo()
    _complete(_latest(tmp_path / "run"))


def test_data_position_with_loader_workers(micro, small_store, tmp_path):
    trainer = Trainer(small_store, tmp_path / "run", _cfg(steps=3, num_workers=1))
    trainer.train()
    assert [r["data"] for r in _complete(_latest(tmp_path / "run"))["ranks"]] == [
        {"epoch": 0, "offset": 3}
    ]


# -- resume: exact, and nothing run from the run folder -----------------------------------
TIMING = ("samples_per_s", "tokens_per_s", "elapsed_s")  # wall-clock figures of a log line


def _final(run: Path) -> tuple[dict, dict, list[dict]]:
    """A run's last weights, EMA weights and metrics without their wall-clock figures."""
    ckpt = _latest(run)
    metrics = [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run)]
    weights, ema = (load_file(str(ckpt / f"{n}.safetensors")) for n in ("model", "ema"))
    return weights, ema, metrics


def test_resume_is_exact_on_a_store_with_slope(micro, slope_store, tmp_path):
    """6 steps in one go, 3 + 3, and 4 steps killed after logging step 4 but before its
    checkpoint, then resumed from step 2 with a loader worker: the same weights, EMA and
    metrics lines. Relief scaling, crops, flips, noise and data order all continue."""
    kw = dict(warmup=100, checkpoint_every=2)
    trainer = Trainer(slope_store, tmp_path / "a", _cfg(steps=6, **kw))
    assert trainer.dataset.relief_scale > 0 and "slope" in trainer.dataset.modalities
    trainer.train()
    Trainer(slope_store, tmp_path / "b", _cfg(steps=3, **kw)).train()
    Trainer(slope_store, tmp_path / "b", _cfg(steps=6, **kw), resume=True).train()
    c = tmp_path / "c"
    Trainer(slope_store, c, _cfg(steps=4, **kw)).train()
    shutil.rmtree(c / "checkpoints" / "step_0000004")  # killed before this checkpoint
    (c / "latest").write_text("step_0000002")
    with open(c / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and while writing a line
    Trainer(slope_store, c, _cfg(steps=6, num_workers=1, **kw), resume=True).train()
    a_weights, a_ema, a_metrics = _final(tmp_path / "a")
    assert [m["step"] for m in a_metrics] == list(range(1, 7))
    for run in (tmp_path / "b", c):
        weights, ema, metrics = _final(run)
        assert all(torch.equal(a_weights[k], weights[k]) for k in a_weights), run.name
        assert all(torch.equal(a_ema[k], ema[k]) for k in a_ema), run.name
        assert metrics == a_metrics, run.name


def test_resume_refuses_settings_that_differ_from_the_saved_ones(trained, small_store, tmp_path):
    src, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = run_cli(
        "train", "-d", str(small_store), "-o", str(run), "--resume", "--steps", "9",
        "--batch-size", "2", "--lr", "0.01", "--bf16", "--workers", "1",
    )  # fmt: skip
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "--batch-size 2 (saved: --batch-size 4)" in lines[0]
    assert "--lr 0.01 (saved: --lr 0.0015)" in lines[0]
    assert "bf16" not in lines[0] and "workers" not in lines[0]  # as saved / may change
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # settings equal to the saved ones, or not given, are fine
    trainer = Trainer(
        small_store, run, _cfg(steps=9), resume=True, given=["batch_size", "seed", "steps"]
    )
    assert trainer.cfg.batch_size == 4 and trainer.cfg.steps == 9


def test_resume_keeps_what_was_not_chosen_and_counts_the_time_trained(
    trained, small_store, tmp_path
):
    src, first, _ = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    # only --time-limit chosen: the saved steps stay (a default --steps must not end the run)
    trainer = Trainer(
        small_store, run, _cfg(steps=2, time_limit_min=30.0), resume=True,
        given=["time_limit_min"],
    )  # fmt: skip
    assert trainer.cfg.steps == first.cfg.steps == 6 and trainer.cfg.time_limit_min == 30.0
    # the time limit and the time schedule count the run's earlier training time
    state = torch.load(run / "checkpoints" / "step_0000006" / "optimizer.pt", weights_only=True)
    assert state["trained_s"] > 0
    assert trainer._elapsed() == pytest.approx(state["trained_s"])


class _WritesAFile:
    """Unpickled, this object writes a file: what a crafted checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "code from the run folder ran"))


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_crafted_optimizer_state_is_refused_and_runs_nothing(trained, small_store, tmp_path, form):
    src, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    # the payload works: unpickled as torch.load(weights_only=False) would, it writes
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_WritesAFile(probe)))
    assert probe.exists()
    marker = tmp_path / "written"
    state = {"optimizer": _WritesAFile(marker), "step": 6}
    optimizer_pt = _latest(run) / "optimizer.pt"
    if form == "torch.save":
        torch.save(state, optimizer_pt)
    else:
        optimizer_pt.write_bytes(pickle.dumps(state))
    res = run_cli("train", "-d", str(small_store), "-o", str(run), "--resume", "--steps", "9")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "not a training state this trainer wrote" in lines[0]
    assert not marker.exists()
    assert (run / "latest").read_text() == "step_0000006"


@pytest.mark.parametrize(
    "latest, message",
    [
        ("../../elsewhere", "does not name a checkpoint"),
        ("step_0000006/../step_0000003", "does not name a checkpoint"),
        ("/tmp/step_0000006", "does not name a checkpoint"),
        ("step_6", "does not name a checkpoint"),
        ("step_0000009", "not a checkpoint folder"),
        ("step_0000099", "not a checkpoint folder"),  # a link to a folder outside
    ],
)
def test_resume_accepts_only_checkpoints_the_trainer_names(
    trained, small_store, tmp_path, latest, message
):
    src, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    outside = tmp_path / "outside"
    shutil.copytree(_latest(run), outside)
    (run / "checkpoints" / "step_0000099").symlink_to(outside, target_is_directory=True)
    (run / "latest").write_text(latest)
    with pytest.raises(TerrasynthError, match=message):
        Trainer(small_store, run, _cfg(steps=9), resume=True)


def test_training_state_is_read_safely_onto_the_cpu(trained, small_store, tmp_path, monkeypatch):
    """weights_only, and onto the CPU whatever device saved it (a GPU run resumes on a CPU;
    the optimiser moves its state to the parameters' device itself)."""
    src, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    seen = {}
    load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    Trainer(small_store, run, _cfg(steps=9, bf16=True), resume=True)
    assert seen["weights_only"] is True and str(seen["map_location"]) == "cpu"


# -- the convolutional generator ---------------------------------------------------------
def test_runs_saved_before_backbones_train_the_transformer():
    assert TrainConfig.from_dict({"preset": "tiny"}).backbone == "scene_transformer"
    assert isinstance(objective_for(ModelConfig()), FlowObjective)
    assert isinstance(objective_for(ModelConfig(backbone="conv_generator")), ScoreObjective)


def test_the_generators_role_split_comes_from_the_train_config():
    """Runs saved before the option split as the flow objective does ("any")."""
    assert TrainConfig.from_dict({"preset": "tiny"}).roles == "any"
    cfg = TrainConfig.from_dict({"backbone": "conv_generator", "roles": "inputs"})
    obj = objective_for(ModelConfig(backbone="conv_generator"), cfg.roles)
    assert obj.cfg.roles == "inputs"
    assert objective_for(ModelConfig(backbone="conv_generator")).cfg.roles == "any"


@pytest.fixture
def micro_conv(monkeypatch):
    """The convolutional 'tiny' preset shrunk to a model that trains in milliseconds."""
    monkeypatch.setitem(model_config.CONV_PRESETS, "tiny", MICRO_CONV)


@pytest.fixture(scope="module")
def trained_conv(small_store, tmp_path_factory):
    """A 4-step run of the convolutional generator (checkpoints every 2 steps, bf16)."""
    run = tmp_path_factory.mktemp("runs") / "conv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(model_config.CONV_PRESETS, "tiny", MICRO_CONV)
        cfg = _cfg(backbone="conv_generator", steps=4, checkpoint_every=2, bf16=True)
        trainer = Trainer(small_store, run, cfg)
    reason = trainer.train()
    return run, trainer, reason


def _complete_conv(ckpt: Path) -> dict:
    """Like ``_complete``, for a checkpoint of the convolutional generator."""
    assert sorted(p.name for p in ckpt.iterdir()) == CKPT_FILES, ckpt
    cfg = ModelConfig.load(ckpt / "config.json")
    assert cfg.backbone == "conv_generator"
    model = build_model(cfg)
    assert isinstance(model, ConvGenerator)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    model.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert ckpt.name == f"step_{int(state['step']):07d}"
    return state


def test_conv_generator_run_folder(trained_conv):
    run, trainer, reason = trained_conv
    assert reason == "done" and trainer.step == 4
    assert isinstance(trainer.model, ConvGenerator)
    assert isinstance(trainer.objective, ScoreObjective)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_0000002", "step_0000004"]
    for name in names:
        _complete_conv(run / "checkpoints" / name)
    assert _complete_conv(_latest(run))["step"] == 4
    assert json.loads((run / "train_config.json").read_text())["backbone"] == "conv_generator"
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert np.isfinite(m["loss"]) and m["modalities"] and m["tokens_per_s"] > 0
    # the exported model is the EMA, and loads by its backbone
    model = load_model(run / "model")
    assert isinstance(model, ConvGenerator)
    assert model.config.widths == MICRO_CONV["widths"] and model.config.preset == "tiny"
    # the training split's retrieval index was built and travels with the model
    assert model.retrieval is not None and len(model.retrieval) == len(trainer.dataset)
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    raw = load_file(str(_latest(run) / "model.safetensors"))
    assert any(not torch.equal(raw[k], v) for k, v in model.state_dict().items())


def test_conv_generator_resume_continues(trained_conv, small_store, tmp_path):
    src, _, _ = trained_conv
    run = tmp_path / "run"
    shutil.copytree(src, run)
    weights = load_file(str(_latest(run) / "model.safetensors"))
    # the saved backbone wins over the (default) one asked for now, and no preset is read:
    # the model config comes from the checkpoint
    # (settings given must equal the saved ones)
    trainer = Trainer(small_store, run, _cfg(steps=6, checkpoint_every=2, bf16=True), resume=True)
    assert trainer.cfg.backbone == "conv_generator" and trainer.step == 4
    assert isinstance(trainer.model, ConvGenerator)
    assert isinstance(trainer.objective, ScoreObjective)
    assert trainer.model.config.widths == MICRO_CONV["widths"]
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert trainer.train() == "done" and trainer.step == 6
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 7))
    assert _complete_conv(_latest(run))["step"] == 6


def test_conv_generator_resume_is_exact(micro_conv, small_store, tmp_path):
    """3 + 3 steps give the 6-step weights exactly: the ensemble's fresh noise, roles and
    crops all continue where they stopped."""
    kw = dict(backbone="conv_generator", warmup=100, checkpoint_every=3)
    Trainer(small_store, tmp_path / "a", _cfg(steps=6, **kw)).train()
    Trainer(small_store, tmp_path / "b", _cfg(steps=3, **kw)).train()
    Trainer(small_store, tmp_path / "b", _cfg(steps=6, **kw), resume=True).train()
    a, b = (
        load_file(str(tmp_path / r / "checkpoints" / "step_0000006" / "model.safetensors"))
        for r in ("a", "b")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_trains_the_conv_generator(small_store, tmp_path):
    run = tmp_path / "run"
    res = run_cli(
        "train", "-d", str(small_store), "-o", str(run), "--backbone", "conv_generator",
        "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "done at step 2" in res.stdout
    model = load_model(run / "model")
    assert isinstance(model, ConvGenerator)
    assert model.config.widths == CONV_PRESETS["tiny"]["widths"]
    assert model.config.image_size == CONV_PRESETS["tiny"]["image_size"]


@pytest.mark.parametrize(
    ("backbone", "preset", "expected"),
    [("scene_transformer", MICRO, True), ("conv_generator", MICRO_CONV, False)],
)
def test_bf16_autocast_on_cpu_only_for_models_it_speeds_up(
    small_store, tmp_path, monkeypatch, backbone, preset, expected
):
    # convolutions in bf16 run ~20x slower on CPUs without native bf16: --bf16 leaves them
    # in fp32 there, while the transformer keeps its autocast
    table = model_config.CONV_PRESETS if backbone == "conv_generator" else model_config.PRESETS
    monkeypatch.setitem(table, "tiny", preset)
    seen = []
    real = torch.autocast

    def recording(device_type, *args, enabled=True, **kw):
        seen.append((device_type, enabled))
        return real(device_type, *args, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", recording)
    trainer = Trainer(small_store, tmp_path / "run", _cfg(backbone=backbone, steps=1, bf16=True))
    trainer.train()
    assert seen and all(s == ("cpu", expected) for s in seen)


def test_unknown_backbone_is_refused_before_the_run_folder_exists(small_store, tmp_path):
    with pytest.raises(TerrasynthError, match="unknown backbone 'unet9'"):
        Trainer(small_store, tmp_path / "bad", _cfg(backbone="unet9"))
    assert not (tmp_path / "bad").exists()


# -- the deterministic U-Net ---------------------------------------------------------------
def test_unet_is_trained_with_the_regression_objective(small_store, tmp_path):
    assert isinstance(objective_for(ModelConfig(backbone="unet")), RegressionObjective)
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(model_config.UNET_PRESETS, "tiny", MICRO_UNET)
        trainer = Trainer(small_store, run, _cfg(backbone="unet", steps=4, checkpoint_every=2))
    assert isinstance(trainer.model, UNet) and isinstance(trainer.objective, RegressionObjective)
    assert trainer.train() == "done" and trainer.step == 4
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert np.isfinite(m["loss"]) and m["loss"] > 0 and m["modalities"]
        assert set(m["modalities"]) <= set(trainer.model.modality_names)  # rasters only
    model = load_model(run / "model")
    assert isinstance(model, UNet) and model.config.widths == MICRO_UNET["widths"]
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    # resume: the saved backbone and config win
    resumed = Trainer(small_store, run, _cfg(steps=6, checkpoint_every=2), resume=True)
    assert resumed.cfg.backbone == "unet" and isinstance(resumed.model, UNet)
    assert resumed.train() == "done" and [m["step"] for m in read_metrics(run)] == list(range(1, 7))


def test_unet_of_a_model_config_with_a_time_budget(small_store, tmp_path):
    """`baseline train-unet`'s setting: a given model config (the built-in model's rasters,
    statistics and window) and a learning rate decaying over the time limit."""
    built_in = ModelConfig.load(model_folder(None) / "config.json")
    cfg = unet_config(built_in)
    cfg.widths = [8, 16]
    run = tmp_path / "run"
    train = _cfg(steps=10**6, time_limit_min=0.05, schedule="time", warmup=2, log_every=5)
    trainer = Trainer(small_store, run, train, model_config=cfg)
    assert trainer.cfg.backbone == "unet" and trainer.cfg.preset == "tiny"
    assert trainer.train() == "time limit"
    metrics = read_metrics(run)
    assert metrics[-1]["step"] == trainer.step and metrics[-1]["elapsed_s"] >= 3.0
    assert metrics[-1]["lr"] < 0.3 * train.lr  # decayed to 5 % at the time limit
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["backbone"] == "unet" and saved["schedule"] == "time"
    model = load_model(run / "model")
    assert isinstance(model, UNet) and model.config.image_size == built_in.image_size
    assert model.modality_names == [m.name for m in built_in.raster_modalities()]
    # a model config none of whose rasters the store holds
    absent = [m.name for m in cfg.raster_modalities() if m.name not in trainer.dataset.modalities]
    other = ModelConfig.from_dict(cfg.to_dict())
    other.modalities = {m: cfg.modalities[m] for m in absent}
    with pytest.raises(TerrasynthError, match="no raster modality of the model config"):
        Trainer(small_store, tmp_path / "none", train, model_config=other)
    assert absent and not (tmp_path / "none").exists()


def test_cli_trains_the_unet_over_a_stores_modalities(small_store, tmp_path):
    run = tmp_path / "run"
    res = run_cli(
        "train", "-d", str(small_store), "-o", str(run), "--backbone", "unet",
        "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "done at step 2" in res.stdout
    model = load_model(run / "model")
    assert isinstance(model, UNet) and model.config.preset == "tiny"
    assert model.config.widths == model_config.UNET_PRESETS["tiny"]["widths"]
    store_rasters = [m.name for m in model.config.raster_modalities()]
    assert model.modality_names == store_rasters and "s2l2a" in store_rasters


def test_unet_time_schedule_decays_over_the_time_limit():
    cfg = TrainConfig(warmup=2, time_limit_min=1.0, schedule="time")
    clock = [0.0]
    f = _lr_lambda(cfg, lambda: clock[0])
    assert f(0) == 0.5 and f(1) == 1.0 and f(1000) == 1.0  # steps do not count
    clock[0] = 30.0
    assert f(5) == pytest.approx(0.525)
    clock[0] = 60.0
    assert f(5) == pytest.approx(0.05)
    clock[0] = 600.0
    assert f(5) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schedule": "time"}, "needs a time limit"),
        ({"schedule": "epochs", "time_limit_min": 1.0}, "unknown schedule 'epochs'"),
    ],
)
def test_unet_schedule_settings_are_checked(small_store, tmp_path, change, message):
    with pytest.raises(TerrasynthError, match=message):
        Trainer(small_store, tmp_path / "bad", _cfg(backbone="unet", **change))
    assert not (tmp_path / "bad").exists()


# -- the command line, killed and interrupted ---------------------------------------------
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun does for its workers


def _start(store: Path, run: Path, *extra: str) -> subprocess.Popen:
    """`terrasynth train` (the real tiny preset) with a checkpoint after every step."""
    args = ["-d", str(store), "-o", str(run), "--batch-size", "2", "--checkpoint-every", "1"]
    return subprocess.Popen(
        [sys.executable, "-m", "terrasynth.cli.main", "train", *args, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        # a normal Ctrl-C disposition, whatever the parent's
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, min_step: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        latest = run / "latest"
        if latest.exists() and int(latest.read_text().split("_")[1]) >= min_step:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended early ({proc.returncode}): {out}\n{err}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint within 180 s")


def test_kill_9_leaves_a_resumable_checkpoint(small_store, tmp_path):
    run = tmp_path / "run"
    proc = _start(small_store, run, "--steps", "1000")
    try:
        _wait_for_checkpoint(proc, run, min_step=3)  # old checkpoints have been pruned too
        time.sleep(0.3)  # somewhere inside a later step or checkpoint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    ckpt = _latest(run)
    step = int(_complete(ckpt)["step"])
    assert step >= 3
    SceneModel.from_pretrained(run / "model")  # the export was complete too (or replaced whole)

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "terrasynth.cli.main",
            "train",
            "-d",
            str(small_store),
            "-o",
            str(run),
            "--resume",
            "--steps",
            str(step + 2),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert res.returncode == 0, res.stderr
    assert f"done at step {step + 2}" in res.stdout
    assert (run / "latest").read_text() == f"step_{step + 2:07d}"
    assert _complete(_latest(run))["step"] == step + 2
    assert read_metrics(run)[-1]["step"] == step + 2


def test_ctrl_c_checkpoints_the_interrupted_step(small_store, tmp_path):
    run = tmp_path / "run"
    proc = _start(small_store, run, "--steps", "1000")
    try:
        _wait_for_checkpoint(proc, run, min_step=1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = [x for x in out.splitlines() if "interrupted at step" in x]
    assert line, out
    step = int(line[0].split("interrupted at step ")[1].split(";")[0])
    assert (run / "latest").read_text() == f"step_{step:07d}"
    assert _complete(_latest(run))["step"] == step
    assert 1 <= step < 1000


def test_clipping_the_parts_apart_bounds_each_part_and_not_only_the_whole(
    micro_conv, small_store, tmp_path
):
    trainer = Trainer(
        small_store,
        tmp_path / "run",
        _cfg(backbone="conv_generator", steps=1, grad_clip=1e-3, grad_clip_parts=True),
    )
    parts = trainer.model.parameter_parts()
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, 1.0)
    before = float(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).norm())
    total, norms = trainer._clip()
    assert float(total) == pytest.approx(before, rel=1e-4)  # the norm before clipping
    assert set(norms) == set(parts) and all(n > 1e-3 for n in norms.values())
    for params in parts.values():
        norm = float(torch.cat([p.grad.flatten() for p in params]).norm())
        assert norm == pytest.approx(1e-3, rel=1e-3)  # each part at the clip, not below it
    trainer.cfg.grad_clip_parts = False  # one clip over all: the parts share it
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, 1.0)
    trainer._clip()
    whole = float(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).norm())
    assert whole == pytest.approx(1e-3, rel=1e-3)
    trainer.cfg.grad_clip_parts = True  # a step logs each part's norm
    trainer.train()
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(rec["grad_norm_parts"]) == {"trunk", "rest"}


def test_clipping_parts_apart_is_refused_for_a_backbone_without_parts(micro, small_store, tmp_path):
    with pytest.raises(TerrasynthError, match="no parts to clip apart"):
        Trainer(small_store, tmp_path / "run", _cfg(steps=1, grad_clip_parts=True))
