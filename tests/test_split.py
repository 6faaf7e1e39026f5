from terrasynth.data.split import SPLITS, SplitConfig


def test_split_is_deterministic_and_location_based():
    cfg = SplitConfig(block_size_m=2560, seed=3)
    a = cfg.split_of_block(cfg.block_of(13.4, 52.5))
    b = cfg.split_of_block(cfg.block_of(13.4 + 1e-4, 52.5 + 1e-4))  # ~10 m away
    assert a == b
    assert a in SPLITS


def test_split_fractions_roughly_hold():
    cfg = SplitConfig(block_size_m=1000, fractions=(0.7, 0.15, 0.15), seed=0)
    counts = dict.fromkeys(SPLITS, 0)
    for i in range(60):
        for j in range(60):
            counts[cfg.split_of_block((i, j))] += 1
    total = sum(counts.values())
    assert abs(counts["train"] / total - 0.7) < 0.03
    assert abs(counts["test"] / total - 0.15) < 0.03


def test_seed_changes_assignment():
    blocks = [(i, 0) for i in range(200)]
    a = [SplitConfig(seed=0).split_of_block(b) for b in blocks]
    b = [SplitConfig(seed=1).split_of_block(b) for b in blocks]
    assert a != b


def test_roundtrip_dict():
    cfg = SplitConfig(1234.0, (0.8, 0.1, 0.1), 7)
    assert SplitConfig.from_dict(cfg.to_dict()) == cfg
