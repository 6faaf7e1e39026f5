"""Batches in model space: one-hot maps, known masks, location and time vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from terrasynth.data.dataset import ChipDataset, collate_chips
from terrasynth.models.config import ModelConfig
from terrasynth.models.signals import (
    DAYS_PER_YEAR,
    batch_signals,
    location_from_vector,
    location_vector,
    time_from_vector,
    time_vector,
)

TINY = dict(image_size=16, patch_size=8, dim=32, depth=1, heads=2, scene_tokens=2)


@pytest.fixture(scope="module")
def real(small_store):
    """A batch holding chips of all three sources, with invalid pixels and missing bands."""
    ds = ChipDataset(small_store, split="train")
    src = ds.store.table["source"].to_numpy()[ds.indices]
    zion = np.flatnonzero(src == "band_folder")  # 4 of the 7 Landsat bands, no date
    bad_dem = [i for i in zion if not ds[int(i)]["dem/r30m/valid"].all()]
    assert bad_dem  # the Zion DEM has holes in some chips
    pick = [zion[0], bad_dem[0]]
    pick += list(np.flatnonzero(src == "bigearthnet_v1")[:2])
    pick += list(np.flatnonzero(src == "eopatch")[:2])
    batch = collate_chips([ds[int(i)] for i in pick])
    reg = ds.registry
    cfg = ModelConfig({m: reg[m].to_dict() for m in ds.modalities}, ds.store.stats, **TINY)
    return ds, batch, cfg, batch_signals(batch, cfg, ds.modalities)


needs_data = pytest.mark.needs_data


@needs_data
def test_every_modality_of_the_model_gets_a_signal(real):
    ds, batch, cfg, sig = real
    assert set(sig) == set(ds.modalities) | {"location", "time"}
    avail = batch["available"]
    for j, m in enumerate(ds.modalities):
        assert torch.equal(sig[m].present, avail[:, j])
    assert sig["landsat8"].present.tolist() == [True, True, False, False, False, False]
    assert sig["corine"].present.tolist() == [False, False, True, True, False, False]


@needs_data
@pytest.mark.parametrize(
    ("name", "group"), [("landcover_nlcd", "r30m"), ("landcover_lulc", "r10m")]
)
def test_categorical_is_one_hot_in_minus_one_one(real, name, group):
    ds, batch, cfg, sig = real
    s = sig[name]
    k = cfg.registry[name].num_classes
    x, target, known = s.groups[group], s.target[group], s.known[group]
    raw = batch[f"{name}/{group}"]
    valid = batch[f"{name}/{group}/valid"] & s.present[:, None, None] & (raw >= 0)
    assert x.shape == (len(raw), k, 64, 64)
    assert known.shape == x.shape
    # valid pixels: exactly one +1 (at the class), every other plane -1
    assert set(torch.unique(x[valid.unsqueeze(1).expand_as(x)]).tolist()) <= {-1.0, 1.0}
    assert torch.equal((x == 1).sum(1)[valid], torch.ones(int(valid.sum()), dtype=torch.long))
    assert torch.equal(x.argmax(1)[valid], raw[valid])
    assert torch.equal(target[valid], raw[valid])
    # invalid or absent: all zeros, target -1, unknown
    assert (x.permute(0, 2, 3, 1)[~valid] == 0).all()
    assert (target[~valid] == -1).all()
    assert torch.equal(known[:, 0].bool(), valid)
    assert int(valid.sum()) > 0 and int((~valid).sum()) > 0  # both cases were seen


@needs_data
def test_lulc_invalid_pixels_are_unknown(real):
    _, batch, _, sig = real
    s = sig["landcover_lulc"]
    present = s.present
    assert present.any()
    invalid = ~batch["landcover_lulc/r10m/valid"][present]
    assert invalid.any()  # the EOPatch map really has invalid pixels
    assert (s.target["r10m"][present][invalid] == -1).all()


@needs_data
def test_known_masks_respect_band_availability(real):
    _, batch, cfg, sig = real
    for name in ("landsat8", "s2l2a", "s2l1c", "dem", "s1grd"):
        s = sig[name]
        mod = cfg.registry[name]
        bands = batch[f"{name}/bands"]
        offset = 0
        for g in mod.groups:
            n = len(g.bands)
            known = s.known[g.name]
            valid = batch[f"{name}/{g.name}/valid"]
            expect = (
                bands[:, offset : offset + n, None, None]
                & valid[:, None]
                & s.present[:, None, None, None]
            )
            assert torch.equal(known.bool(), expect), (name, g.name)
            # unknown values are zeroed, known ones are the dataset's normalised values
            x = s.groups[g.name]
            assert (x[~expect] == 0).all()
            assert torch.equal(x[expect], batch[f"{name}/{g.name}"][expect])
            offset += n
    # Zion has 4 of the 7 Landsat bands: the others are never known
    lk = sig["landsat8"].known["r30m"][:2]
    assert lk[:, [1, 2, 3, 4]].all() and not lk[:, [0, 5, 6]].any()
    # a DEM with holes: the holes are unknown
    dem = sig["dem"].known["r30m"][1, 0]
    assert 0 < int(dem.sum()) < dem.numel()


@needs_data
def test_vector_signals(real):
    _, batch, _, sig = real
    loc = sig["location"]
    assert loc.present.all()
    torch.testing.assert_close(loc.vector.norm(dim=-1), torch.ones(6))
    lat, lon = location_from_vector(loc.vector)
    torch.testing.assert_close(lat, batch["location"][:, 0], atol=1e-3, rtol=0)
    torch.testing.assert_close(lon, batch["location"][:, 1], atol=1e-3, rtol=0)
    tm = sig["time"]
    no_time = torch.isnan(batch["time"][:, 0])
    assert no_time[:2].all() and not no_time[2:].any()  # Zion has no acquisition date
    assert torch.equal(tm.present, ~no_time)
    assert torch.isfinite(tm.vector).all() and (tm.vector[no_time] == 0).all()
    assert (tm.known[no_time] == 0).all() and (tm.known[~no_time] == 1).all()
    torch.testing.assert_close(
        time_from_vector(tm.vector[~no_time]), batch["time"][~no_time, 0], atol=0.5, rtol=0
    )
    cor = sig["corine"]
    assert cor.vector.shape == (6, 44)
    assert set(torch.unique(cor.vector[cor.present]).tolist()) == {-1.0, 1.0}
    assert (cor.vector[~cor.present] == 0).all() and (cor.known[~cor.present] == 0).all()
    torch.testing.assert_close(cor.vector[cor.present], batch["corine/labels"][cor.present] * 2 - 1)


def test_location_round_trip():
    lat = torch.tensor([-89.5, -45.0, 0.0, 12.3, 37.2, 60.0, 89.9], dtype=torch.float64)
    lon = torch.tensor([-179.9, -113.0, 0.0, 14.55, 90.0, 135.0, 179.9], dtype=torch.float64)
    v = location_vector(lat, lon)
    assert v.shape == (7, 3)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(7, dtype=torch.float64))
    la, lo = location_from_vector(v)
    torch.testing.assert_close(la, lat)
    torch.testing.assert_close(lo, lon)
    # the inverse only looks at the direction
    la2, lo2 = location_from_vector(3.0 * v)
    torch.testing.assert_close(la2, lat)
    torch.testing.assert_close(lo2, lon)
    # lon 180 and -180 are one place
    a = location_vector(torch.tensor([10.0]), torch.tensor([180.0]))
    b = location_vector(torch.tensor([10.0]), torch.tensor([-180.0]))
    torch.testing.assert_close(a, b)


def test_time_round_trip():
    # a span of years, days on and right next to year boundaries, float64
    base = torch.arange(40, 60, dtype=torch.float64) * DAYS_PER_YEAR  # 2010 .. 2029
    days = torch.cat([base, base + 0.01, base - 0.01, base + 100.5, torch.tensor([0.0, 17532.3])])
    v = time_vector(days)
    assert v.shape == (len(days), 3)
    torch.testing.assert_close(v[:, :2].norm(dim=-1), torch.ones(len(days), dtype=torch.float64))
    torch.testing.assert_close(time_from_vector(v), days, atol=1e-6, rtol=0)
    # the year feature: 0 at 2018, +1 per five years
    assert math.isclose(float(time_vector(torch.tensor([48 * DAYS_PER_YEAR]))[0, 2]), 0.0)
    # float32, as the dataset delivers: within a tenth of a day
    d32 = torch.tensor([16000.0, 17897.25, 19000.5], dtype=torch.float32)
    torch.testing.assert_close(time_from_vector(time_vector(d32)), d32, atol=0.1, rtol=0)
    # unknown time stays NaN
    assert torch.isnan(time_vector(torch.tensor([float("nan")]))).all()
