"""``terrasynth serve``, the map app: its API's safety rules (no browser), and end-to-end
runs in a real headless Chromium (Debian's ``chromium`` driven by Playwright) that upload a
real Sentinel-1 GeoTIFF, generate Sentinel-2 and read the results on the map. The browser
tests take screenshots; they write the ones of ``docs/serve/`` when asked to
(``TERRASYNTH_SCREENSHOTS=docs/serve python -m pytest tests/test_serve.py``), into a
temporary folder otherwise, so a test run leaves the checkout unchanged."""

from __future__ import annotations

import inspect
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
S1_VV = (
    DATA / "bigearthnet_v1_examples/BigEarthNet-S1-Example/"
    "S1A_IW_GRDH_1SDV_20180204T043253_35VPK_57_38/"
    "S1A_IW_GRDH_1SDV_20180204T043253_35VPK_57_38_VV.tif"
)
MAX_BYTES = 2 * 2**20
MAX_PIXELS = 512 * 512


def write_tif(path: Path, data: np.ndarray, crs: str | None = "EPSG:32632", **extra) -> Path:
    """A small GeoTIFF (or, with ``crs=None``, a TIFF without georeferencing)."""
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1],
                   count=data.shape[0], dtype=str(data.dtype))  # fmt: skip
    if crs is not None:
        profile.update(crs=crs, transform=Affine(10, 0, 500000, 0, -10, 5200000))
    with rasterio.open(path, "w", **profile, **extra) as f:
        f.write(data)
    return path


def db_values(h: int = 64, w: int = 64, bands: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(-12, 3, (bands, h, w)).astype(np.float32)


@pytest.fixture(scope="module")
def app_and_dir(tmp_path_factory):
    from terrasynth.serve.app import ServeConfig, create_app
    from terrasynth.serve.inputs import Limits

    work = tmp_path_factory.mktemp("serve-api")
    folder = work / "folder"
    folder.mkdir()
    write_tif(folder / "s1.tif", db_values())
    limits = Limits(max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    app = create_app(ServeConfig(work / "state", folder=folder, limits=limits))
    return app, work


@pytest.fixture(scope="module")
def client(app_and_dir):
    from starlette.testclient import TestClient

    with TestClient(app_and_dir[0]) as c:
        yield c


def uploads(app_and_dir) -> list[str]:
    return sorted(p.name for p in (app_and_dir[1] / "state" / "uploads").iterdir())


def post_file(client, path_or_bytes, name: str):
    body = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return client.post("/api/inputs", params={"name": name}, content=body)


# -- API: safety -----------------------------------------------------------------------------
def test_serve_listens_on_localhost_by_default():
    from terrasynth.cli.main import serve

    default = inspect.signature(serve).parameters["host"].default
    assert default == "127.0.0.1"


def test_page_and_leaflet_come_from_the_app_itself(client):
    page = client.get("/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp
    scripts = [s for s in page.text.split('src="')[1:]]
    assert all(s.startswith("/") for s in scripts), "every script is served by the app"
    assert client.get("/vendor/leaflet/leaflet.js").status_code == 200
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"0" * 200, "not a GeoTIFF"),
        ("no_crs", "no CRS"),
        ("truncated", "truncated"),
        (b"", "empty"),
    ],
)
def test_hostile_uploads_are_refused_and_leave_nothing(
    client, app_and_dir, tmp_path, content, expected
):
    if content == "no_crs":
        content = write_tif(tmp_path / "plain.tif", db_values(), crs=None).read_bytes()
    elif content == "truncated":
        whole = write_tif(tmp_path / "t.tif", db_values(256, 256)).read_bytes()
        content = whole[: len(whole) // 2]
    before = uploads(app_and_dir)
    res = post_file(client, content, "bad.tif")
    assert res.status_code == 400
    assert expected in res.json()["error"]
    assert "\n" not in res.json()["error"]
    assert uploads(app_and_dir) == before  # nothing kept, no partial file left


def test_upload_limits_bytes_and_pixels(client, app_and_dir, tmp_path):
    before = uploads(app_and_dir)
    res = post_file(client, b"II*\x00" + bytes(MAX_BYTES), "big.tif")
    assert res.status_code == 413 and "limit" in res.json()["error"]
    wide = write_tif(tmp_path / "wide.tif", np.zeros((1, 600, 600), np.float32), compress="deflate")
    res = post_file(client, wide, "wide.tif")
    assert res.status_code == 400 and "px per band" in res.json()["error"]
    assert uploads(app_and_dir) == before


def test_path_like_names_never_become_paths(client, app_and_dir, tmp_path):
    s1 = write_tif(tmp_path / "s1.tif", db_values())
    res = post_file(client, s1, "../../../etc/evil VV,VH.tif")
    assert res.status_code == 200
    record = res.json()
    assert record["name"] == "evil VV_VH.tif" and "path" not in record
    assert f"{record['id']}.tif" in uploads(app_and_dir)
    assert not (app_and_dir[1] / "etc").exists()
    assert record["modality"] == "s1grd"  # guessed: two bands of dB
    assert client.delete(f"/api/inputs/{record['id']}").status_code == 200
    assert f"{record['id']}.tif" not in uploads(app_and_dir)


def test_guessing_names_the_modality(tmp_path):
    from terrasynth.modalities import default_registry
    from terrasynth.modalities.guess import guess_modality, summarise

    reg = default_registry()
    dem = write_tif(tmp_path / "dem.tif", np.linspace(200, 2400, 64 * 64).reshape(1, 64, 64))
    codes = np.random.default_rng(0).choice([11, 41, 42, 82], (1, 64, 64)).astype(np.uint8)
    nlcd = write_tif(tmp_path / "classes.tif", codes)
    s1 = write_tif(tmp_path / "scene_VV.tif", db_values(bands=1))
    candidates = ["s2l2a", "s1grd", "dem", "landcover_nlcd", "landcover_lulc"]
    assert guess_modality(summarise(dem), reg, candidates)[0].modality == "dem"
    assert guess_modality(summarise(nlcd), reg, candidates)[0].modality == "landcover_nlcd"
    best = guess_modality(summarise(s1), reg, candidates)[0]
    assert (best.modality, best.bands) == ("s1grd", ("VV",))


def test_folder_picks_only_its_own_files(client):
    files = client.get("/api/folder").json()["files"]
    assert files == ["s1.tif"]
    for path in ("../state/inputs", "/etc/passwd", "../../s1.tif"):
        res = client.post("/api/folder/pick", json={"path": path})
        assert res.status_code == 400 and "not a GeoTIFF of the server's folder" in res.text
    res = client.post("/api/folder/pick", json={"path": "s1.tif"})
    assert res.status_code == 200 and res.json()["source"] == "folder"


def test_ids_are_unguessable_and_paths_come_from_the_server(client, app_and_dir, tmp_path):
    record = post_file(client, write_tif(tmp_path / "s1.tif", db_values()), "s1.tif").json()
    assert len(record["id"]) == 24
    for job_id in ("x", "../../inputs", "A" * 24, record["id"]):
        assert client.get(f"/api/jobs/{job_id}").status_code == 404
        assert client.get(f"/api/jobs/{job_id}/files/generation.json").status_code == 404
    assert client.get("/api/inputs/" + "B" * 24).status_code == 404
    bad = {"targets": ["s2l2a"], "inputs": [{"id": record["id"]}], "num_samples": 99}
    assert "samples must be between" in client.post("/api/jobs", json=bad).json()["error"]
    bad = {"targets": ["s2l2a"], "inputs": [{"id": record["id"], "modality": "dem"}]}
    assert "band" in client.post("/api/jobs", json=bad).json()["error"]
    job = {"targets": ["s2l2a"], "inputs": [{"id": record["id"]}], "steps": 200}
    job_id = client.post("/api/jobs", json=job).json()["id"]
    assert len(job_id) == 24
    info = client.get(f"/api/jobs/{job_id}").json()
    assert "path" not in json.dumps(info["job"])  # server-side paths stay on the server
    for name in ("../job.json", "job.json", "..%2Fjob.json"):
        assert client.get(f"/api/jobs/{job_id}/files/{name}").status_code in (400, 404)
    # cancel: the worker stops between model calls
    client.post(f"/api/jobs/{job_id}/cancel")
    deadline = time.time() + 60
    while (status := client.get(f"/api/jobs/{job_id}").json()["state"]["status"]) not in (
        "cancelled", "failed", "done"
    ) and time.time() < deadline:  # fmt: skip
        time.sleep(0.3)
    assert status == "cancelled"
    folder = app_and_dir[1] / "state" / "jobs" / job_id
    assert not (folder / "output").exists()


# -- the browser -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a real port (uvicorn in a thread), as ``terrasynth serve`` runs it."""
    import uvicorn

    from terrasynth.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(tmp_path_factory.mktemp("serve-browser")))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"errors in the page: {errors}"


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where the browser tests' screenshots go (see the module docstring)."""
    folder = os.environ.get("TERRASYNTH_SCREENSHOTS")
    out = (ROOT / folder) if folder else tmp_path / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def wait_tiles(page, key: str, src: str = "") -> None:
    """Wait until layer ``key`` shows tiles (whose address holds ``src``), all loaded."""
    page.wait_for_function(
        """([key, src]) => {
            const imgs = [...document.querySelectorAll(`.layer-${key} img`)]
                .filter(i => i.src.includes(src));
            return imgs.length > 0 && imgs.every(i => i.classList.contains('leaflet-tile-loaded'));
        }""",
        arg=[key, src],
    )


@pytest.mark.needs_data
def test_browser_upload_generate_and_read_the_map(page, server, tmp_path, shots):
    page.goto(server)
    page.wait_for_selector("body[data-ready='1']")
    page.set_input_files("#upload", str(S1_VV))
    item = page.locator("#input-list li.input-item")
    item.wait_for()
    assert item.locator("select.modality").input_value() == "s1grd"
    assert item.locator("input.bands").input_value() == "VV"
    assert "guessed s1grd" in item.inner_text()
    page.wait_for_function("() => document.querySelectorAll('img.leaflet-tile-loaded').length > 0")

    page.fill("#samples", "4")
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    page.click("#generate")
    page.wait_for_selector("#status[data-status='done']", timeout=120_000)
    wait_tiles(page, "s2l2a_samples")
    keys = page.eval_on_selector_all("#layer-list li", "els => els.map(e => e.dataset.key)")
    assert {"s2l2a_samples", "s2l2a_mean", "s2l2a_std"} <= set(keys)
    page.screenshot(path=str(shots / "result.png"))

    # the sample slider steps through the samples
    page.eval_on_selector(
        "#sample", "el => { el.value = 2; el.dispatchEvent(new Event('input')); }"
    )
    assert page.inner_text("#sample-label") == "3"
    wait_tiles(page, "s2l2a_samples", "s2l2a_sample2")

    # the spread map, and a swipe between the samples and the spread
    page.check("li[data-key='s2l2a_std'] input.visible")
    page.select_option("#swipe-left", "s2l2a_samples")
    page.select_option("#swipe-right", "s2l2a_std")
    page.check("#swipe-on")
    page.eval_on_selector(
        "#swipe", "el => { el.value = 35; el.dispatchEvent(new Event('input')); }"
    )
    clip = page.evaluate(
        "() => [...document.querySelectorAll('.leaflet-pane')]"
        ".map(p => p.style.clip).filter(c => c && c.startsWith('rect'))"
    )
    assert len(clip) == 2, clip
    wait_tiles(page, "s2l2a_std")
    page.screenshot(path=str(shots / "swipe.png"))

    # a click reads every layer at that pixel, with the samples' range
    page.uncheck("#swipe-on")
    box = page.locator("#map").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    table = page.locator("#values table.target-values[data-target='s2l2a']")
    table.wait_for()
    text = table.inner_text()
    assert "4 samples" in text and "B04" in text and "…" in text
    row = table.locator("tr", has_text="B04").inner_text().split("\t")
    mean, low, high = float(row[1]), *(float(v) for v in row[3].split(" … "))
    assert low <= mean <= high
    assert "VV" in page.inner_text("#values table.input-values")
    page.screenshot(path=str(shots / "values.png"))

    # a download is the GeoTIFF on the input's own grid
    with page.expect_download() as info:
        page.click("a[data-file='s2l2a_sample0.tif']")
    saved = tmp_path / "sample0.tif"
    info.value.save_as(saved)
    with rasterio.open(saved) as out, rasterio.open(S1_VV) as src:
        assert out.crs == src.crs and out.transform == src.transform
        assert (out.width, out.height, out.count) == (src.width, src.height, 12)
    assert page.locator("a[data-file='item.json']").count() == 1
    assert page.locator("a[data-file='run.zip']").count() == 1

    # a reload finds the job again (its id is in the address)
    page.reload()
    page.wait_for_selector("#status[data-status='done']")
    wait_tiles(page, "s2l2a_samples")
    assert page.locator("#input-list li.input-item").count() == 1


@pytest.mark.needs_data
def test_browser_truncated_upload_shows_the_error(page, server, tmp_path, shots):
    whole = S1_VV.read_bytes()
    truncated = tmp_path / "truncated_VV.tif"
    truncated.write_bytes(whole[: len(whole) // 3])
    page.goto(server)
    page.wait_for_selector("body[data-ready='1']")
    page.set_input_files("#upload", str(truncated))
    message = page.locator("#message")
    message.wait_for()
    page.wait_for_function(
        "() => document.getElementById('message').textContent.includes('refused')"
    )
    assert "truncated" in message.inner_text()
    assert page.locator("#input-list li").count() == 0
    page.screenshot(path=str(shots / "truncated.png"))


# -- API: searching a STAC catalogue -----------------------------------------------------------
def wait_for(client, path: str, seconds: float = 180) -> dict:
    """Poll ``path`` until its status is final; its last answer (a search's state, or a
    job's)."""
    deadline = time.time() + seconds
    while True:
        answer = client.get(path).json()
        status = answer.get("state", answer)["status"]
        if status in ("done", "failed", "cancelled") or time.time() > deadline:
            return answer
        time.sleep(0.2)


def workdir_files(app_and_dir) -> list[str]:
    """Every file of the server's uploads, inputs and catalogue downloads."""
    state = app_and_dir[1] / "state"
    return sorted(
        str(p.relative_to(state))
        for folder in ("uploads", "inputs", "stac")
        for p in (state / folder).rglob("*")
    )


@pytest.mark.needs_data
def test_stac_search_gives_inputs_a_job_runs_from(client, app_and_dir, catalogue):
    """Search the loopback STAC API: the stacked S2 and S1 GeoTIFFs come back as inputs
    with the modality the fetch mapped and a CRS; a job generates from them."""
    from stac_catalogue import BBOX

    url, _ = catalogue
    settings = client.get("/api/settings").json()
    assert settings["stac"] == {"available": True, "missing": None}
    request = {
        "url": url, "collections": "sentinel-2-l2a, sentinel-1-grd", "bbox": BBOX,
        "datetime": "2020-06-01/2020-06-30",
    }  # fmt: skip
    res = client.post("/api/stac", json=request)
    assert res.status_code == 200, res.text
    state = wait_for(client, f"/api/stac/{res.json()['id']}")
    assert state["status"] == "done", state
    assert "2 STAC items; 2 input(s) of 186 x 181 px of 10 m (EPSG:32643)" in state["message"]
    records = {r["modality"]: r for r in state["inputs"]}
    assert set(records) == {"s2l2a", "s1grd"}
    assert records["s1grd"]["bands"] == ["VV", "VH"]
    assert records["s2l2a"]["bands"] == settings["modalities"]["s2l2a"]["bands"]  # the model's
    for r in records.values():
        assert (r["crs"], r["width"], r["height"], r["source"]) == ("EPSG:32643", 186, 181, "stac")
        assert r["guesses"][0]["reason"].startswith("from the STAC search (sentinel-")
        assert client.get(f"/api/inputs/{r['id']}").json() == r  # listed like an upload
        assert "path" not in r
    assert not list((app_and_dir[1] / "state" / "stac").iterdir())  # downloads removed
    tile = client.get(f"/api/inputs/{records['s2l2a']['id']}/tiles/14/11528/6740.png")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"

    job = {
        "targets": ["dem"], "num_samples": 1, "steps": 2,
        "inputs": [{"id": r["id"]} for r in records.values()],
    }  # fmt: skip
    job_id = client.post("/api/jobs", json=job).json()["id"]
    info = wait_for(client, f"/api/jobs/{job_id}", 300)
    assert info["state"]["status"] == "done", info["state"]
    assert "dem_mean.tif" in info["files"]
    mean = client.get(f"/api/jobs/{job_id}/files/dem_mean.tif")
    with rasterio.MemoryFile(mean.content) as mem, mem.open() as f:
        assert f.crs.to_epsg() == 32643 and (f.width, f.height) == (186, 181)


def test_a_catalogue_pointing_at_local_files_is_refused_before_any_open(monkeypatch, tmp_path):
    """Assets that are not http(s) (a hostile catalogue naming the server's own files) are
    refused before the fetch opens any asset, even for its header."""
    from datetime import datetime

    import terrasynth.data.stac_fetch as stac_fetch
    from terrasynth.errors import InputError
    from terrasynth.modalities import default_registry
    from terrasynth.serve.catalogue import SearchStore

    local = str(tmp_path / "secret.tif")
    acq = stac_fetch.Acquisition(
        "s2l2a", "c", datetime(2020, 6, 1), bands={"B04": [stac_fetch.BandSource(local, 1)]}
    )
    monkeypatch.setattr(stac_fetch, "search", lambda query: ([], {}))
    monkeypatch.setattr(stac_fetch, "plan_acquisitions", lambda *a: ([acq], []))

    def no_open(*args, **kwargs):
        raise AssertionError("an asset was opened before the sources were checked")

    monkeypatch.setattr(stac_fetch, "fetch_grid", no_open)
    query = stac_fetch.Query("http://127.0.0.1:9/", ("c",), (10.0, 46.0, 10.01, 46.01), None)
    with pytest.raises(InputError, match="this server reads only http"):
        stac_fetch.fetch(
            query, tmp_path / "dl", default_registry(), check_sources=SearchStore._sources
        )
    assert not (tmp_path / "dl").exists()


def test_stac_search_refusals_leave_nothing(client, app_and_dir):
    """Bad requests are refused at once; an unreachable catalogue fails in one line; neither
    leaves a file in the workdir."""
    before = workdir_files(app_and_dir)
    good = {"url": "http://127.0.0.1:9/", "collections": "s2", "bbox": "10,46,10.01,46.01"}
    for change, expected in [
        ({"url": "file:///etc/passwd"}, "must be http:// or https://"),
        ({"url": "s3://bucket/catalog.json"}, "must be http:// or https://"),
        ({"collections": ""}, "give at least one collection"),
        ({"bbox": "10,46,9,47"}, "bbox '10,46,9,47' must be W,S,E,N"),
        ({"resolution": "fine"}, "pixel size must be a number"),
    ]:
        res = client.post("/api/stac", json={**good, **change})
        assert res.status_code == 400 and expected in res.json()["error"], res.text
    dead = f"http://127.0.0.1:{_free_port()}/"
    search_id = client.post("/api/stac", json={**good, "url": dead}).json()["id"]
    state = wait_for(client, f"/api/stac/{search_id}", 60)
    assert state["status"] == "failed"
    assert state["message"].startswith(f"STAC catalogue {dead} is unreachable"), state
    assert "\n" not in state["message"]
    assert workdir_files(app_and_dir) == before
    assert client.get("/api/stac/" + "C" * 24).status_code == 404


@pytest.mark.needs_data
def test_stac_search_failures_download_nothing(client, app_and_dir, catalogue):
    """No items, or a grid over the server's pixel limit: one line, before any download."""
    from stac_catalogue import BBOX

    url, _ = catalogue
    before = workdir_files(app_and_dir)
    request = {"url": url, "collections": ["sentinel-1-grd"], "bbox": BBOX}
    for change, expected in [
        ({"datetime": "2019-01-01/2019-02-01"}, "no STAC items found at"),
        ({"resolution": 1}, "more than this server's limit of 262,144 px per band"),
    ]:
        search_id = client.post("/api/stac", json={**request, **change}).json()["id"]
        state = wait_for(client, f"/api/stac/{search_id}", 60)
        assert state["status"] == "failed" and expected in state["message"], state
        assert workdir_files(app_and_dir) == before


def test_without_the_stac_extra_the_search_says_what_to_install(client, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pystac_client", None)
    res = client.post("/api/stac", json={"url": "http://127.0.0.1:9/"})
    assert res.status_code == 400
    assert "pip install 'terrasynth[stac]'" in res.json()["error"]


@pytest.mark.needs_data
def test_browser_stac_search_adds_inputs(page, server, catalogue, shots):
    """The page's catalogue form: an unreachable catalogue is one line; a search of the
    loopback STAC API lists its inputs with their modalities and shows them on the map."""
    from stac_catalogue import BBOX

    url, _ = catalogue
    page.goto(server)
    page.wait_for_selector("body[data-ready='1']")
    page.click("#stac-box summary")
    page.fill("#stac-url", f"http://127.0.0.1:{_free_port()}/")
    page.fill("#stac-collections", "sentinel-2-l2a,sentinel-1-grd")
    page.fill("#stac-bbox", BBOX)
    page.fill("#stac-datetime", "2020-06-01/2020-06-30")
    page.click("#stac-search")
    page.wait_for_selector("#stac-status[data-status='failed']")
    assert "Search failed: STAC catalogue" in page.inner_text("#message")
    assert "unreachable" in page.inner_text("#message")

    page.fill("#stac-url", url)
    page.click("#stac-search")
    page.wait_for_selector("#stac-status[data-status='done']", timeout=60_000)
    items = page.locator("#input-list li.input-item")
    assert items.count() == 2
    modalities = [items.nth(i).locator("select.modality").input_value() for i in range(2)]
    assert sorted(modalities) == ["s1grd", "s2l2a"]
    assert "EPSG:32643" in items.first.inner_text()
    assert "from the STAC search" in items.first.inner_text()
    assert page.locator("#message").is_hidden()
    for i in range(2):
        wait_tiles(page, f"input-{items.nth(i).get_attribute('data-id')}")
    page.wait_for_timeout(400)  # Leaflet fades loaded tiles in
    page.screenshot(path=str(shots / "stac.png"))
