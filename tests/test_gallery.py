"""bench/gallery.py: stretches on made-up arrays; chip choice and pictures on a small real
store with a micro model; the frozen chip list."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from terrasynth.data.dataset import ChipDataset
from terrasynth.data.store import ChipStore
from terrasynth.modalities import default_registry
from terrasynth.models.config import ModelConfig
from terrasynth.models.scene_model import SceneModel
from tests.conftest import MICRO_MODEL

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gallery", ROOT / "bench" / "gallery.py")
G = importlib.util.module_from_spec(spec)
spec.loader.exec_module(G)

rng = np.random.default_rng(0)


def test_stretches_and_views():
    x = np.array([[-1.0, 0.0, 0.5, 2.0, np.nan]])
    s = G.stretch(x, 0.0, 1.0)
    assert np.allclose(s[0, :4], [0, 0, 0.5, 1]) and np.isnan(s[0, 4])
    rgb = G.rgb_image(rng.uniform(0, 0.3, (3, 8, 8)) * np.where(np.eye(8) > 0, np.nan, 1), 0, 0.3)
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert (rgb[np.eye(8) > 0] == 0).all()  # unknown pixels black
    reg = default_registry()
    s2 = reg["s2l2a"]
    bands = list(s2.bands)
    truth = rng.uniform(0.0, 0.3, (len(bands), 8, 8))
    v = G.View(s2, bands, truth, 10.0)
    assert v.kind == "rgb" and [bands[i] for i in v.index] == ["B04", "B03", "B02"]
    assert v.image(truth).shape == (8, 8, 3)
    assert G.View(reg["s1grd"], ["VV", "VH"], rng.normal(-12, 3, (2, 8, 8)), 10.0).kind == "grey"
    dem = 500 + 10.0 * np.mgrid[:8, :8][1][None]  # a slope from 500 to 570 m
    d = G.View(reg["dem"], ["elevation"], dem, 30.0)
    assert d.kind == "terrain" and 500 <= d.lo < 510 and 560 < d.hi <= 570
    img = d.image(dem)
    assert img.shape == (8, 8, 3) and img.min() >= 0 and img.max() <= 1
    far = G.View(reg["dem"], ["elevation"], dem, 30.0, also=dem[None] + 1000)
    assert far.hi > 1400  # the stretch spans samples far off in height
    samples = np.stack([truth, truth + 0.1])
    assert np.allclose(v.spread(samples), 0.05)


def test_centre_window_cuts_every_group_on_its_grid():
    batch = {
        "a/r10m": torch.arange(64 * 64.0).reshape(1, 1, 64, 64),
        "a/r40m": torch.arange(16 * 16.0).reshape(1, 1, 16, 16),
        "gsd": torch.tensor([10.0]),
    }
    w = G.centre_window(batch, 16, 64)
    assert w["a/r10m"].shape[-2:] == (16, 16) and w["a/r40m"].shape[-2:] == (4, 4)
    assert w["a/r10m"][0, 0, 0, 0] == 24 * 64 + 24  # offset 24, a multiple of 4
    assert w["a/r40m"][0, 0, 0, 0] == 6 * 16 + 6
    assert w["gsd"] is batch["gsd"]


@pytest.fixture(scope="module")
def micro_model(small_store, tmp_path_factory) -> Path:
    store = ChipStore.open(small_store)
    reg = store.registry
    mods = {m: reg[m].to_dict() for m in store.modalities}
    torch.manual_seed(0)
    model = SceneModel(ModelConfig(modalities=mods, stats=store.stats, **MICRO_MODEL))
    return model.save_pretrained(tmp_path_factory.mktemp("micro") / "model")


@pytest.mark.needs_data
@pytest.mark.usefixtures("one_torch_thread")
def test_choose_chips_and_draw_the_gallery(small_store, micro_model, tmp_path):
    chips = G.choose_chips(small_store, "train", rows=2, size=16)
    assert chips == G.choose_chips(small_store, "train", rows=2, size=16)  # no chance
    names = set(chips["directions"])
    assert {"s1grd -> s2l2a", "s2l2a -> s1grd", "landsat8 -> dem"} <= names
    ds = ChipDataset(small_store, split="train")
    table = ds.store.table.iloc[ds.indices].reset_index(drop=True)
    where = {c: i for i, c in enumerate(table["chip_id"])}
    for name, entry in chips["directions"].items():
        src, target = name.split(" -> ")
        assert len(entry["chips"]) == 2
        for c in entry["chips"]:
            i = where[c]
            assert table[f"has_{src}"][i] and table[f"has_{target}"][i]
            assert G._fully_valid(ds[i], [src, target], 16, ds.chip_size)
    # one chip per scene first: BigEarthNet has several patches
    assert len({c.split("#")[0] for c in chips["directions"]["s1grd -> s2l2a"]["chips"]}) == 2
    frozen = tmp_path / "chips.json"
    frozen.write_text(json.dumps(chips))
    out = tmp_path / "gallery"
    args = ["-d", str(small_store), "-m", str(micro_model), "--chips", str(frozen)]
    paths = G.main([*args, "-o", str(out), "--steps", "2", "-n", "3"])
    assert sorted(p.name for p in paths) == sorted(
        f"{G._slug(e['title'])}.png" for e in chips["directions"].values()
    )
    import matplotlib.image as mpimg

    for p in paths:
        img = mpimg.imread(p)
        assert img.shape[1] > img.shape[0] > 200 and img.std() > 0.05, p.name
    assert not any(p.name.startswith(".") for p in out.iterdir())
    bad = dict(chips, directions={"landsat8 -> dem": {"chips": ["no-such#0"]}})
    frozen.write_text(json.dumps(bad))
    with pytest.raises(Exception, match="not in the train split"):
        G.main([*args, "-o", str(out)])


def test_the_frozen_chips():
    chips = json.loads(G.CHIPS.read_text())
    assert chips["split"] == "test"
    titles = [e["title"] for e in chips["directions"].values()]
    assert titles == [t for t, _, _ in G.DIRECTIONS]
    for name, entry in chips["directions"].items():
        src, target = name.split(" -> ")
        cands = {t: (inputs, tgt) for t, inputs, tgt in G.DIRECTIONS}[entry["title"]]
        assert src in cands[0] and target == cands[1]
        assert len(entry["chips"]) == G.ROWS and len(set(entry["chips"])) == G.ROWS
