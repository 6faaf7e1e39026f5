"""The training objective: roles per modality, loss masks, band infilling, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from terrasynth.data.dataset import ChipDataset, RandomCropFlip, collate_chips
from terrasynth.models.config import ModelConfig
from terrasynth.models.scene_model import SceneModel
from terrasynth.models.signals import Signal, batch_signals
from terrasynth.training.objective import (
    CONDITIONED,
    DROPPED,
    GENERATED,
    ObjectiveConfig,
    modality_losses,
    sample_roles,
    training_inputs,
    training_step,
)
from tests.conftest import MICRO_MODEL

TINY = MICRO_MODEL
pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_data = pytest.mark.needs_data


@pytest.fixture(scope="module")
def real(small_store):
    """Cropped chips of all three sources and their model-space signals."""
    ds = ChipDataset(small_store, split="train", transform=RandomCropFlip(16, 64, seed=0))
    src = ds.store.table["source"].to_numpy()[ds.indices]
    pick = []
    for s in ("band_folder", "bigearthnet_v1", "eopatch"):
        pick += list(np.flatnonzero(src == s)[:3])
    batch = collate_chips([ds[int(i)] for i in pick])
    reg = ds.registry
    cfg = ModelConfig({m: reg[m].to_dict() for m in ds.modalities}, ds.store.stats, **TINY)
    return cfg, batch, batch_signals(batch, cfg, ds.modalities)


@needs_data
def test_roles_generate_at_least_one_present_modality(real):
    _, _, sig = real
    names = list(sig)
    present = torch.stack([sig[n].present for n in names], 1)
    seen = set()
    for seed in range(40):
        roles = sample_roles(sig, ObjectiveConfig(), torch.Generator().manual_seed(seed))
        r = torch.stack([roles[n] for n in names], 1)
        assert r.shape == present.shape
        # absent modalities never take a role
        assert (r[~present] == DROPPED).all()
        # every sample with something present generates at least one of it
        assert ((r == GENERATED).sum(1) >= 1).all()
        seen |= set(r[present].tolist())
    assert seen == {DROPPED, CONDITIONED, GENERATED}


def test_roles_of_a_sample_with_nothing_present():
    sig = {
        "a": Signal(torch.tensor([False, True]), vector=torch.zeros(2, 3)),
        "b": Signal(torch.tensor([False, True]), vector=torch.zeros(2, 3)),
    }
    for seed in range(10):
        roles = sample_roles(sig, ObjectiveConfig(), torch.Generator().manual_seed(seed))
        assert roles["a"][0] == DROPPED and roles["b"][0] == DROPPED
        assert GENERATED in (int(roles["a"][1]), int(roles["b"][1]))


@needs_data
def test_role_probabilities(real):
    _, _, sig = real
    gen = torch.Generator().manual_seed(0)
    # always unconditional: nothing is ever shown
    for _ in range(10):
        roles = sample_roles(sig, ObjectiveConfig(p_unconditional=1.0), gen)
        assert all((r != CONDITIONED).all() for r in roles.values())
    # never unconditional and always shown: every present modality takes part
    for _ in range(10):
        roles = sample_roles(sig, ObjectiveConfig(p_unconditional=0.0, p_condition=1.0), gen)
        for n, r in roles.items():
            assert ((r != DROPPED) == sig[n].present).all()


def test_class_maps_are_trained_at_higher_noise_than_continuous_rasters():
    b = 4000
    ones = torch.ones(b, 1, 2, 2)
    sig = {
        "image": Signal(torch.ones(b, dtype=torch.bool), {"g": ones}, {"g": ones}),
        "classes": Signal(
            torch.ones(b, dtype=torch.bool),
            {"g": ones.repeat(1, 3, 1, 1)},
            {"g": ones.repeat(1, 3, 1, 1)},
            target={"g": torch.zeros(b, 2, 2, dtype=torch.long)},
        ),
    }
    roles = {n: torch.full((b,), GENERATED) for n in sig}
    cfg = ObjectiveConfig(p_infill=0.0)
    _, _, t = training_inputs(sig, roles, cfg, torch.Generator().manual_seed(0))
    pure_image = float((t["image"] == 1).float().mean())
    pure_classes = float((t["classes"] == 1).float().mean())
    assert abs(pure_image - cfg.p_pure_noise) < 0.03
    assert abs(pure_classes - cfg.p_pure_noise_categorical) < 0.03
    # below t = 1 the class maps' levels lean to high noise (logit-normal mean shift)
    mid_image, mid_classes = t["image"][t["image"] < 1], t["classes"][t["classes"] < 1]
    assert abs(float(mid_image.median()) - 0.5) < 0.03
    expected = float(torch.sigmoid(torch.tensor(cfg.logit_normal_mean_categorical)))
    assert abs(float(mid_classes.median()) - expected) < 0.03


def _rasters(sig: dict[str, Signal]) -> list[str]:
    return [n for n, s in sig.items() if s.groups is not None]


@needs_data
def test_loss_masks_cover_generated_known_values_only(real):
    _, _, sig = real
    cfg = ObjectiveConfig(p_infill=0.5)
    for seed in range(15):
        gen = torch.Generator().manual_seed(seed)
        roles = sample_roles(sig, cfg, gen)
        inputs, loss_mask, t = training_inputs(sig, roles, cfg, gen)
        for n, s in sig.items():
            role = roles[n]
            is_gen = role == GENERATED
            assert torch.equal(inputs[n].present, role != DROPPED)
            assert (t[n][~is_gen] == 0).all() and (t[n][is_gen] > 0).all()
            assert (t[n] <= 1).all()
            if s.groups is None:
                m, given = loss_mask[n], inputs[n].vector[:, -s.vector.shape[1] :]
                assert (m[~is_gen] == 0).all()
                assert torch.equal(m[is_gen], s.known[is_gen])
                assert torch.equal(given[role == CONDITIONED], s.known[role == CONDITIONED])
                assert (given[is_gen] == 0).all()
                continue
            for g, known in s.known.items():
                m = loss_mask[n][g]
                c = known.shape[1]
                given = inputs[n].groups[g][:, 2 * c :]
                assert (m[~is_gen] == 0).all()
                assert (m <= known).all()  # never on unknown values
                assert (m * given == 0).all()  # never on values shown clean
                # generated: every known value is either predicted or shown
                torch.testing.assert_close((m + given)[is_gen], known[is_gen])
                # conditioned: all known values shown
                cond = role == CONDITIONED
                assert torch.equal(given[cond], known[cond])
                assert (given[role == DROPPED] == 0).all()


@needs_data
def test_band_infilling_never_shows_every_band(real):
    _, _, sig = real
    cfg = ObjectiveConfig(p_infill=1.0)
    infilled = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        roles = sample_roles(sig, cfg, gen)
        inputs, loss_mask, _ = training_inputs(sig, roles, cfg, gen)
        for n in _rasters(sig):
            s, role = sig[n], roles[n]
            if s.target is not None:  # categorical maps are never infilled
                for g, k in s.known.items():
                    assert (inputs[n].groups[g][:, 2 * k.shape[1] :][role == GENERATED] == 0).all()
                continue
            for i in torch.nonzero(role == GENERATED).flatten().tolist():
                known = sum(float(k[i].sum()) for k in s.known.values())
                if known == 0:
                    continue
                predicted = sum(float(m[i].sum()) for m in loss_mask[n].values())
                shown = known - predicted
                assert predicted > 0, (n, i, seed)  # something is left to generate
                infilled += shown > 0
                # shown bands are whole bands
                for g, k in s.known.items():
                    given = inputs[n].groups[g][i, 2 * k.shape[1] :]
                    per_band = given.flatten(1).amax(1)
                    assert torch.equal(given, k[i] * per_band[:, None, None])
    assert infilled > 10  # infilling did happen


def test_modality_losses_on_made_up_tensors():
    b, k = 2, 3
    x0 = torch.randn(b, 2, 4, 4)
    known = torch.ones_like(x0)
    mask = known.clone()
    mask[1] = 0  # sample 1 not generated
    target = torch.randint(0, k, (b, 4, 4))
    onehot = torch.nn.functional.one_hot(target, k).permute(0, 3, 1, 2).float() * 2 - 1
    sig = {
        "c": Signal(torch.ones(b, dtype=torch.bool), groups={"g": x0}, known={"g": known}),
        "k": Signal(
            torch.ones(b, dtype=torch.bool),
            groups={"g": onehot},
            known={"g": torch.ones_like(onehot)},
            target={"g": target},
        ),
        "v": Signal(torch.ones(b, dtype=torch.bool), vector=torch.zeros(b, 3), known=None),
    }
    masks = {"c": {"g": mask}, "k": {"g": torch.ones_like(onehot)}, "v": torch.zeros(b, 3)}
    pred_c = x0.clone()
    pred_c[1] += 100.0  # errors where nothing is generated do not count
    pred_c[0, 0, 0, 0] += 2.0  # one error of 2 among 32 generated values
    perfect = onehot * 50.0
    out = modality_losses(
        {"c": {"g": pred_c}, "k": {"g": perfect}, "v": torch.ones(b, 3)}, sig, masks
    )
    assert set(out) == {"c", "k"}  # nothing generated for "v": left out
    torch.testing.assert_close(out["c"], torch.tensor(4.0 / 32))
    assert float(out["k"]) < 1e-6
    uniform = torch.zeros_like(onehot)
    out = modality_losses({"k": {"g": uniform}}, sig, masks)
    torch.testing.assert_close(out["k"], torch.tensor(float(np.log(k))))


@needs_data
def test_training_step_overfits_one_real_batch(real):
    cfg, batch, sig = real
    torch.manual_seed(0)
    model = SceneModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    obj = ObjectiveConfig()
    losses = []
    for _ in range(30):
        # the same roles, noise levels and noise every step: one fixed problem
        loss, parts = training_step(model, sig, batch["gsd"], obj, torch.Generator().manual_seed(0))
        assert parts and all(np.isfinite(v) for v in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
