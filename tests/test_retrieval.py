"""Retrieval of training chips: summaries, nearest neighbours, what is retrieved, and the
index built from a real store and saved with the convolutional generator."""

from __future__ import annotations

import math

import pytest
import torch

from terrasynth.data.dataset import ChipDataset
from terrasynth.data.store import ChipStore
from terrasynth.modalities import Modality
from terrasynth.models.config import ModelConfig
from terrasynth.models.conv_generator import ConvGenerator
from terrasynth.models.retrieval import (
    EARTH_RADIUS_M,
    EXCLUDE_M,
    RetrievalIndex,
    build_index,
    summarise,
    summary_size,
)
from terrasynth.models.signals import location_vector
from tests.conftest import MICRO_CONV

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mod(name: str, kind: str = "continuous", bands: int = 2) -> Modality:
    from terrasynth.modalities.registry import Registry

    if kind == "categorical":
        entry = {
            "kind": "categorical",
            "groups": [{"name": "g", "gsd": 10, "bands": ["class"]}],
            "legend": {str(i): {"name": f"c{i}"} for i in range(3)},
        }
    else:
        entry = {
            "kind": "continuous",
            "value_range": [0, 1],
            "groups": [{"name": "g", "gsd": 10, "bands": [f"b{i}" for i in range(bands)]}],
        }
    return Registry.from_dict({"modalities": {name: entry}})[name]


# -- summaries -------------------------------------------------------------------------------
def test_summary_is_mean_and_std_per_band_over_known_pixels():
    mod = _mod("a", bands=2)
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 3.0], [100.0, 100.0]])  # bottom row unknown
    x[0, 1] = torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    known = torch.ones_like(x)
    known[0, :, 1] = 0
    s = summarise(mod, {"g": x}, {"g": known})
    assert summary_size(mod) == 4
    assert torch.allclose(s, torch.tensor([[2.0, 2.0, 1.0, 0.0]]))


def test_summary_of_a_class_map_is_its_class_frequencies_and_nan_when_unknown():
    mod = _mod("c", kind="categorical")
    cls = torch.tensor([[[0, 0], [2, 1]]])
    onehot = torch.nn.functional.one_hot(cls, 3).permute(0, 3, 1, 2).float() * 2 - 1
    x = torch.cat([onehot, onehot])
    known = torch.ones_like(x)
    known[1] = 0  # the second sample shows nothing
    s = summarise(mod, {"g": x}, {"g": known})
    assert torch.allclose(s[0], torch.tensor([0.5, 0.25, 0.25]))
    assert bool(torch.isnan(s[1]).all())


# -- neighbours ------------------------------------------------------------------------------
def _index() -> RetrievalIndex:
    """Five chips: input summaries ``a`` (2 bands: mean, mean, std, std), target ``t``."""
    a = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],
            [1.0, 1.0, 1.0, 1.0],
            [2.0, 2.0, 1.0, 1.0],
            [3.0, 3.0, 1.0, 1.0],
            [math.nan] * 4,  # chip 4 lacks the input
        ]
    )
    t = torch.tensor(
        [
            [10.0, 0.5],
            [11.0, 0.5],
            [math.nan, math.nan],  # chip 2 lacks the target
            [13.0, 1.5],
            [14.0, 0.5],
        ]
    )
    lat = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    places = location_vector(lat, torch.zeros(5))
    return RetrievalIndex({"a": a, "t": t}, places)


def test_distance_is_the_mean_squared_difference_over_numbers_known_in_both():
    from terrasynth.models.retrieval import _msd

    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(5, 7, generator=g), torch.randn(40, 7, generator=g)
    q[q > 1.2], r[r > 1.0] = math.nan, math.nan
    r[3] = math.nan  # a row with nothing known
    want = torch.full((5, 40), math.nan)
    for i in range(5):
        for j in range(40):
            ok = torch.isfinite(q[i]) & torch.isfinite(r[j])
            if ok.any():
                want[i, j] = ((q[i, ok] - r[j, ok]) ** 2).mean()
    got = _msd(q, r)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.allclose(got.nan_to_num(-1), want.nan_to_num(-1), atol=1e-5)


def test_nearest_chips_that_have_the_target():
    idx, found = _index().neighbours("t", {"a": torch.tensor([[2.1, 2.1, 1.0, 1.0]])}, k=2)
    assert bool(found.all())
    # chip 2 is nearest but lacks the target; then chips 3 and 1 (distance 0.81 and 1.21)
    assert idx.tolist() == [[3, 1]]


def test_a_chip_lacking_a_given_modality_counts_as_at_a_fixed_distance():
    idx, _ = _index().neighbours("t", {"a": torch.tensor([[0.0, 0.0, 1.0, 1.0]])}, k=5)
    # distances: chip 0: 0, chip 1: 0.5, chip 4 (lacks ``a``): MISSING_PENALTY = 2,
    # chip 3: 4.5; chip 2 lacks the target, so the fifth place repeats the nearest
    assert idx.tolist() == [[0, 1, 4, 3, 0]]


def test_training_ignores_chips_of_the_same_place():
    index = _index()
    here = location_vector(torch.tensor([3.0]), torch.tensor([0.0]))
    q = {"a": torch.tensor([[3.0, 3.0, 1.0, 1.0]])}
    assert index.neighbours("t", q, k=1)[0].item() == 3
    assert index.neighbours("t", q, k=1, places=here)[0].item() != 3
    # a chip just beyond the exclusion distance is found again
    step = math.degrees(1.5 * EXCLUDE_M / EARTH_RADIUS_M)
    near = location_vector(torch.tensor([3.0 + step]), torch.tensor([0.0]))
    assert index.neighbours("t", q, k=1, places=near)[0].item() == 3


def test_nothing_given_finds_nothing():
    q = {"a": torch.full((1, 4), math.nan)}
    _, found = _index().neighbours("t", q, k=2)
    assert not bool(found.any())


def test_retrieved_statistics_of_the_neighbours():
    index = _index()
    mod = _mod("t", bands=1)
    idx = torch.tensor([[0, 3], [0, 1]])
    r = index.retrieved(mod, idx, torch.tensor([True, False]))
    # chips 0 and 3: means 10 and 13 -> mean 11.5, spread 1.5; within-chip std 0.5, 1.5 -> 1
    assert torch.allclose(r[0], torch.tensor([11.5, 1.5, 1.0]))
    assert torch.equal(r[1], torch.zeros(3))  # nothing found: zeros


# -- the index of a real store, saved with the model ----------------------------------------
@pytest.mark.needs_data
def test_index_of_a_real_store_travels_with_the_model(small_store, tmp_path):
    store = ChipStore.open(small_store)
    reg = store.registry
    mods = {m: reg[m].to_dict() for m in store.modalities}
    cfg = ModelConfig(
        backbone="conv_generator",
        modalities=mods,
        stats=store.stats,
        **{**MICRO_CONV, "retrieval_k": 3},
    )
    ds = ChipDataset(small_store, split="train")
    index = build_index(ds, cfg, progress=False)
    assert len(index) == len(ds)
    for name in index.names:  # every summarised chip really has that modality
        has = torch.from_numpy(ds.store.available(name)[ds.indices])
        assert torch.equal(torch.isfinite(index.rows(name)).any(1), has)
    torch.manual_seed(0)
    model = ConvGenerator(cfg).eval()
    model.set_retrieval(index)
    model.save_pretrained(tmp_path / "m")
    loaded = ConvGenerator.from_pretrained(tmp_path / "m").eval()
    assert loaded.retrieval is not None
    for name in index.names:
        torch.testing.assert_close(
            loaded.retrieval.rows(name), index.rows(name), rtol=0, atol=0, equal_nan=True
        )

    # the neighbours' level enters the mean: with and without the index, means differ
    from tests.test_conv_generator import _inputs

    given = [m for m in index.names if reg[m].kind == "continuous"][:1]
    target = [m for m in index.names if m not in given and reg[m].kind == "continuous"][0]
    gen = torch.Generator().manual_seed(0)
    inputs = _inputs(cfg, gen, targets=[target], given=given)
    with torch.no_grad():
        with_index = loaded(inputs, torch.tensor([10.0, 10.0]))
        loaded.set_retrieval(None)
        without = loaded(inputs, torch.tensor([10.0, 10.0]))
    assert not torch.equal(
        next(iter(with_index[target].values())), next(iter(without[target].values()))
    )


def test_no_given_modality_at_all_finds_nothing_for_each_sample():
    idx, found = _index().neighbours("t", {}, k=2, batch=3)
    assert idx.shape == (3, 2) and not bool(found.any())


# -- the mixture's extras: per-chip exclusion radii, distances, levels -----------------------
def test_each_chip_hides_neighbours_within_its_own_radius():
    index = _index()
    here = location_vector(torch.tensor([3.0, 3.0]), torch.tensor([0.0, 0.0]))
    q = {"a": torch.tensor([[3.0, 3.0, 1.0, 1.0]] * 2)}
    # chip 3 is at the place itself, chip 1 two degrees (222 km) away, chip 0 three
    radii = torch.tensor([1000.0, 250_000.0])
    idx, _ = index.neighbours("t", q, k=1, places=here, exclude_m=radii)
    assert idx[0].item() != 3  # the place itself hidden
    assert idx[1].item() == 0  # everything within 250 km hidden: chip 0 (333 km) is left


def test_distance_to_neighbours_in_km_and_nan_for_an_unknown_place():
    index = _index()
    here = torch.cat(
        [location_vector(torch.tensor([0.0]), torch.tensor([0.0])), torch.full((1, 3), math.nan)]
    )
    km = index.distance_km(here, torch.tensor([[0, 1], [0, 1]]))
    degree_km = 2 * math.pi * EARTH_RADIUS_M / 360 / 1000  # 111.2 km
    assert torch.allclose(km[0], torch.tensor([0.0, degree_km]), atol=0.01)
    assert bool(torch.isnan(km[1]).all())


def test_each_neighbours_level_is_its_mean_per_band():
    index = _index()
    levels = index.neighbour_levels(_mod("t", bands=1), torch.tensor([[0, 3, 2]]))
    assert levels.shape == (1, 3, 1)
    assert levels[0, :2, 0].tolist() == [10.0, 13.0]
    assert bool(torch.isnan(levels[0, 2, 0]))  # chip 2 lacks the target
