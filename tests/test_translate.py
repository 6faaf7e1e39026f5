"""Translation evaluation: tiling of chips and the model-vs-baseline table."""

from __future__ import annotations

import math

import pytest
import torch

from terrasynth.data.store import ChipStore
from terrasynth.evaluation.translate import Row, evaluate_translation, format_table, tiles
from terrasynth.models.config import ModelConfig
from terrasynth.models.scene_model import SceneModel
from tests.conftest import MICRO_MODEL, open_micro_conv

TINY = MICRO_MODEL
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch() -> dict:
    b = 2
    base = torch.arange(b * 3 * 64 * 64, dtype=torch.float32).view(b, 3, 64, 64)
    return {
        "m/r10m": base,
        "m/r10m/valid": base[:, 0] > 100,  # (B, h, w)
        "m/r20m": torch.arange(b * 32 * 32).view(b, 1, 32, 32).float(),  # 2x coarser group
        "m/r60m": torch.arange(b * 16 * 16).view(b, 16, 16),  # categorical-like (B, h, w)
        "m/bands": torch.ones(b, 4, dtype=torch.bool),
        "c/labels": torch.ones(b, 44),
        "gsd": torch.tensor([10.0, 10.0]),
        "transform": torch.zeros(b, 6, dtype=torch.float64),
    }


def test_tiles_cover_a_chip_exactly_once():
    batch = _batch()
    out = tiles(batch, 32, 64)
    assert len(out) == 4
    for key, factor in (("m/r10m", 1), ("m/r20m", 2), ("m/r60m", 4)):
        full = batch[key]
        pieces = []
        for tile in out:
            assert tile[key].shape[-2:] == (32 // factor, 32 // factor)
            pieces.append(tile[key])
        # row-major order: top-left, top-right, bottom-left, bottom-right
        top = torch.cat(pieces[:2], -1)
        bottom = torch.cat(pieces[2:], -1)
        assert torch.equal(torch.cat([top, bottom], -2), full)
        # every value of the chip lands in exactly one tile
        values = torch.cat([p.flatten() for p in pieces]).sort().values
        assert torch.equal(values, full.flatten().sort().values)
    assert torch.equal(
        torch.cat(
            [
                torch.cat([t["m/r10m/valid"] for t in out[:2]], -1),
                torch.cat([t["m/r10m/valid"] for t in out[2:]], -1),
            ],
            -2,
        ),
        batch["m/r10m/valid"],
    )
    for tile in out:  # per-chip values are not cut
        for key in ("m/bands", "c/labels", "gsd", "transform"):
            assert tile[key] is batch[key]


def test_tiles_of_the_whole_chip_and_of_small_tiles():
    batch = _batch()
    (whole,) = tiles(batch, 64, 64)
    assert torch.equal(whole["m/r10m"], batch["m/r10m"])
    small = tiles(batch, 16, 64)
    assert len(small) == 16
    total = sum(float(t["m/r10m"].sum()) for t in small)
    assert total == float(batch["m/r10m"].sum())


def test_row_better_and_table():
    rows = [
        Row("dem", "continuous", 3, "MAE", 10.0, 20.0, "m"),
        Row("landcover_nlcd", "categorical", 3, "accuracy", 0.2, 0.5, ""),
    ]
    assert rows[0].better and not rows[1].better
    table = format_table(rows).splitlines()
    assert len(table) == 4
    assert table[2] == "| dem | 3 | MAE | 10 | 20 | m | yes |"
    assert table[3].startswith("| landcover_nlcd | 3 | accuracy | 0.2 | 0.5 |")
    assert table[3].endswith("| NO |")


@pytest.mark.needs_data
def test_evaluate_untrained_model_on_real_chips(small_store):
    store = ChipStore.open(small_store)
    reg = store.registry
    cfg = ModelConfig({m: reg[m].to_dict() for m in store.modalities}, store.stats, **TINY)
    torch.manual_seed(0)
    model = SceneModel(cfg)
    rows = evaluate_translation(model, str(small_store), split="train", steps=1, max_chips=2)
    by = {r.modality: r for r in rows}
    # every raster modality of the training split has partners on its chips
    rasters = {m.name for m in cfg.raster_modalities()}
    assert set(by) == rasters
    for r in rows:
        assert r.chips == 2
        assert math.isfinite(r.model) and math.isfinite(r.baseline)
        assert r.kind == reg[r.modality].kind and r.units == reg[r.modality].units
        if r.kind == "categorical":
            assert r.metric == "accuracy"
            assert 0.0 <= r.model <= 1.0 and 0.0 <= r.baseline <= 1.0
        else:
            assert r.metric == "MAE"
            assert r.model >= 0 and r.baseline >= 0
    # the Zion DEM in metres: the training-mean baseline is off by tens of metres at least
    assert by["dem"].baseline > 10
    table = format_table(rows)
    assert len(table.splitlines()) == 2 + len(rows)
    for r in rows:
        assert f"| {r.modality} | 2 |" in table


@pytest.mark.needs_data
def test_continuous_rows_score_the_mean_of_the_samples(small_store):
    """Without spread the mean of 8 samples is the one sample; with a wide spread it is
    nearer the truth than one sample (averaging removes spread)."""
    model = open_micro_conv(small_store)
    cfg = model.config
    continuous = [m.name for m in cfg.raster_modalities() if m.kind == "continuous"]
    for spread, check in ((0.0, "equal"), (30.0, "nearer")):
        cfg.spread_scale = dict.fromkeys(continuous, spread)
        one = evaluate_translation(model, str(small_store), "train", max_chips=2)
        eight = evaluate_translation(model, str(small_store), "train", max_chips=2, samples=8)
        for a, b in zip(one, eight, strict=True):
            assert a.modality == b.modality and a.baseline == b.baseline
            if a.kind == "categorical" or check == "equal":
                assert b.model == pytest.approx(a.model, rel=1e-6)
            else:
                assert b.model < a.model, a.modality
