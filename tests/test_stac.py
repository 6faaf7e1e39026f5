"""STAC search -> store -> generate, end to end against a real STAC API on loopback (the
``catalogue`` fixture: rustac's STAC API server and real COGs, see ``stac_catalogue.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pytest
import rasterio
from conftest import run_cli
from stac_catalogue import BBOX, COG, free_port

from terrasynth.errors import TerrasynthError

pytestmark = pytest.mark.needs_data


def test_fetch_info_generate(catalogue, tmp_path):
    """STAC search -> store (data fetch) -> data info -> generate --stac, through the CLI."""
    url, counts = catalogue
    store = tmp_path / "store"
    args = [
        "--stac", url, "--collections", "sentinel-2-l2a,sentinel-1-grd", "--bbox", BBOX,
        "--datetime", "2020-06-01/2020-09-30",
    ]  # fmt: skip
    r = run_cli("data", "fetch", *args, "-o", str(store))
    assert r.returncode == 0, r.stderr
    assert "4 STAC items, 4 acquisitions on 186 x 181 px of 10 m" in r.stderr
    assert "EPSG:32643" in r.stderr  # S2 in EPSG:4326 reprojected onto S1's UTM grid
    assert "sentinel-2-l2a: aot" in r.stderr  # a raster asset mapping to no band is named
    assert "28 files fetched, 0 already complete" in r.stderr  # 2 x 12 S2 + 2 x 2 S1 bands
    assert counts["whole"] == 0 and counts["range"] > 0  # GDAL read by ranges only
    fetched = store.with_name("store.fetch")
    with rasterio.open(fetched / "s2l2a" / "20200604_B04.tif") as f:
        red = f.read(1)
        assert f.crs.to_epsg() == 32643 and f.res == (10.0, 10.0)
    assert 0.0 < np.nanmedian(red) < 0.3  # DN * 0.0001: reflectance
    assert not list(fetched.rglob("*.part"))

    info = run_cli("data", "info", str(store), "--json")
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["chips"] > 0
    assert {"s2l2a", "s1grd"} <= set(summary["modalities"])
    (source,) = summary["sources"].values()
    assert source["dates"]["count"] == 3  # S2 06-04 + S1 06-07 pair; 08-13 and 09-03 alone
    assert source["licence"] == "CC-BY-4.0"

    # a rerun of the same query (another store, same downloads) fetches nothing again
    again = run_cli("data", "fetch", *args, "-o", str(tmp_path / "store2"),
                    "--download-dir", str(fetched))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "0 files fetched, 28 already complete" in again.stderr

    out = tmp_path / "gen"
    gen = run_cli(
        "generate", "--stac", url, "--collections", "sentinel-1-grd", "--bbox", BBOX,
        "--datetime", "2020-06-01/2020-09-30", "-t", "s2l2a", "-n", "2", "--steps", "2",
        "-o", str(out),
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    with (
        rasterio.open(out / "s2l2a_mean.tif") as f,
        rasterio.open(fetched / "s1grd" / "20200607_VV.tif") as s1,
    ):
        assert (f.crs, f.transform, f.shape) == (s1.crs, s1.transform, s1.shape)
        assert f.count == 12
    assert (out.with_name("gen.stac") / "inputs" / "s1grd_20200607.tif").is_file()
    assert not list(out.with_name("gen.stac").rglob("*.part"))


def test_errors(catalogue, tmp_path):
    """Unreachable catalogue, no items, assets that map to no modality: one line each."""
    url, _ = catalogue
    dead = f"http://127.0.0.1:{free_port()}/"
    common = ["--bbox", BBOX, "-o", str(tmp_path / "s")]
    r = run_cli("data", "fetch", "--stac", dead, "--collections", "sentinel-2-l2a", *common)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: STAC catalogue {dead} is unreachable")
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("data", "fetch", "--stac", url, "--collections", "sentinel-2-l2a",
                "--datetime", "2019-01-01/2019-02-01", *common)  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.startswith("error: no STAC items found"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("collections:\n  sentinel-1-grd:\n    modality: dem\n")  # VV, VH: no
    r = run_cli("data", "fetch", "--stac", url, "--collections", "sentinel-1-grd",
                "--mapping", str(mapping), *common)  # fmt: skip
    assert r.returncode == 2
    assert "maps to a registry modality" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.fetch").exists()


def test_mapping_by_metadata():
    """Band names, common names and polarisations find registry bands; a mapping file
    overrides modality, bands and scaling."""
    import pystac

    from terrasynth.data.stac_fetch import map_assets, modality_of
    from terrasynth.modalities import default_registry

    reg = default_registry()
    item = pystac.Item("x", None, None, pystac.utils.str_to_datetime("2020-01-01T00:00:00Z"), {})
    item.collection_id = "sentinel-2-l2a"
    item.properties["platform"] = "sentinel-2a"
    for key, extra in {
        "B4": {"eo:bands": [{"name": "B4"}]},
        "nir": {"eo:bands": [{"common_name": "nir"}], "raster:bands": [{"scale": 2.0}]},
        "rededge1": {},
        "visual": {"roles": ["visual"]},
    }.items():
        roles = extra.pop("roles", ["data"])
        item.add_asset(
            key, pystac.Asset(f"{key}.tif", media_type=COG, roles=roles, extra_fields=extra)
        )
    assert modality_of(item, {}, reg) == "s2l2a"
    bands, unmapped = map_assets(item, reg["s2l2a"], {})
    assert {b: s.href for b, s in bands.items()} == {
        "B04": "B4.tif", "B08": "nir.tif", "B05": "rededge1.tif"
    }  # fmt: skip
    assert bands["B08"].scale == 2.0 and unmapped == []
    mapping = {"sentinel-2-*": {"modality": "s2l1c", "assets": {"B4": "B04"}, "scale": 1e-4}}
    bands, unmapped = map_assets(item, reg["s2l1c"], mapping)
    assert modality_of(item, mapping, reg) == "s2l1c"
    assert list(bands) == ["B04"] and bands["B04"].scale == 1e-4
    assert sorted(unmapped) == ["nir", "rededge1"]


def test_an_interrupted_fetch_resumes(catalogue, tmp_path):
    """Files are complete or absent: a rerun after an interruption fetches only the rest."""
    from terrasynth.data.stac_fetch import Query, fetch, parse_bbox
    from terrasynth.modalities import default_registry

    url, _ = catalogue
    query = Query(url, ("sentinel-2-l2a",), parse_bbox(BBOX), "2020-06-01/2020-06-30")

    def stop_at_five(done: int, total: int, what: str) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(query, tmp_path / "dl", default_registry(), on_file=stop_at_five)
    assert len(list((tmp_path / "dl").rglob("*.tif"))) == 5
    (tmp_path / "dl" / "s2l2a" / "20200604_B12.tif.part").write_bytes(b"cut short")
    result = fetch(query, tmp_path / "dl", default_registry())
    assert (len(result.files), result.skipped) == (12, 5)
    assert not list((tmp_path / "dl").rglob("*.part"))  # the cut-short file was redone
    with rasterio.open(tmp_path / "dl" / "s2l2a" / "20200604_B12.tif") as f:
        assert f.descriptions == ("B12",) and np.isfinite(f.read(1)).mean() > 0.99
    other = Query(url, ("sentinel-2-l2a",), parse_bbox(BBOX), "2020-08-01/2020-08-30")
    with pytest.raises(TerrasynthError, match="holds the files of another STAC query"):
        fetch(other, tmp_path / "dl", default_registry())


def test_without_the_stac_extra_one_line_says_what_to_install(tmp_path):
    code = (
        "import sys\nsys.modules['pystac_client'] = None\n"
        "from terrasynth.cli.main import main\n"
        f"main(['data', 'fetch', '--stac', 'http://127.0.0.1:9/', '--collections', 'x',"
        f" '--bbox', '0,0,1,1', '-o', {str(tmp_path / 's')!r}])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: STAC search: needs the optional package 'pystac_client', which is not "
        "installed: pip install 'terrasynth[stac]'"
    )


def test_a_timeless_collection_joins_every_scene(tmp_path):
    """The description pairs dated modalities by day; a 'timeless' one (a DEM) has no
    dates, so it joins every scene, and never anchors."""
    import yaml

    from terrasynth.data.stac_fetch import Acquisition, write_description

    day = datetime(2020, 6, 4, tzinfo=UTC)
    acqs = [Acquisition("dem", "cop-dem", day, timeless=True), Acquisition("s2l2a", "s2", day)]
    desc = yaml.safe_load(write_description(tmp_path, acqs, "n", "CC0", 5).read_text())
    assert desc["anchor"] == "s2l2a" and desc["pair_tolerance_days"] == 5
    layers = {layer["modality"]: layer for layer in desc["layers"]}
    assert "dates" not in layers["dem"] and layers["s2l2a"]["dates"] == {"from_filename": True}
