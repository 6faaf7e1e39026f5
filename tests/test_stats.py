import numpy as np

from terrasynth.data.stats import StatsAccumulator, apply_transform
from terrasynth.modalities import default_registry


def test_band_statistics_match_numpy():
    reg = default_registry()
    rng = np.random.default_rng(0)
    acc = StatsAccumulator()
    chunks = [rng.normal(1000, 50, (1, 16, 16)).astype(np.float32) for _ in range(5)]
    valid = [np.ones_like(c, bool) for c in chunks]
    valid[0][0, :8] = False
    for c, v in zip(chunks, valid, strict=True):
        acc.add(reg["dem"], ("elevation",), c, v, "train")
    acc.add(
        reg["dem"],
        ("elevation",),
        np.full((1, 16, 16), 9e3, np.float32),
        np.ones((1, 16, 16), bool),
        "test",
    )  # not in the training statistics
    res = acc.result()["dem"]
    assert res["from_split"] == "train"
    allv = np.concatenate([c[v] for c, v in zip(chunks, valid, strict=True)])
    b = res["bands"]["elevation"]
    assert b["count"] == allv.size
    assert abs(b["mean"] - allv.mean()) < 1e-3
    assert abs(b["std"] - allv.std()) < 1e-2
    assert b["max"] < 2000


def test_categorical_counts_and_fallback_to_all():
    reg = default_registry()
    acc = StatsAccumulator()
    data = np.array([[[0, 1], [1, 2]]], np.float32)
    acc.add(reg["landcover_nlcd"], ("class",), data, np.ones_like(data, bool), "val")
    res = acc.result()["landcover_nlcd"]
    assert res["from_split"] == "all"
    assert res["class_counts"][:3] == [1, 2, 1]


def test_log1p_transform():
    assert np.allclose(apply_transform(np.array([0.0, np.e - 1]), "log1p"), [0, 1])
    assert np.allclose(apply_transform(np.array([-1.0]), "log1p"), [0])


def test_normalise_and_denormalise_are_inverse():
    from terrasynth.data.stats import band_moments, denormalise, normalise

    stats = {"bands": {"B1": {"mean": 10.0, "std": 2.0}}}
    mean, std = band_moments(stats, ("B1", "B2"))
    assert mean.tolist() == [10.0, 0.0] and std.tolist() == [2.0, 1.0]  # B2: no statistics
    x = np.array([[[12.0, 8.0]], [[3.0, -1.0]]], np.float32)  # (C=2, H=1, W=2)
    z = normalise(x, stats, ("B1", "B2"), "none")
    assert z.tolist() == [[[1.0, -1.0]], [[3.0, -1.0]]]
    assert np.allclose(denormalise(z[None], stats, ("B1", "B2"), "none")[0], x)  # any lead dims
    logged = normalise(np.full((1, 1, 1), 99.0), {"bands": {}}, ("B1",), "log1p")
    assert np.allclose(denormalise(logged, {"bands": {}}, ("B1",), "log1p"), 99.0, rtol=1e-5)
