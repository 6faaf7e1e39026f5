"""The map app's web application (Starlette): the page, its JSON API, tiles and downloads.

>>> app = create_app(ServeConfig(workdir=Path("terrasynth-serve")))
>>> # uvicorn.run(app, host="127.0.0.1", port=8765)

Every script and style the page loads is served here: the app's own files
(``terrasynth/serve/static``) and Leaflet from the installed ``xstatic-leaflet`` package.
API errors are JSON ``{"error": "one line"}`` with status 400 (404: unknown id, 413: too
large), shown in the page.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from terrasynth.errors import InputError, TerrasynthError
from terrasynth.extras import require
from terrasynth.modalities import Modality
from terrasynth.serve.catalogue import SearchStore, missing_extra
from terrasynth.serve.inputs import InputStore, Limits, check_bands, list_folder, new_id
from terrasynth.serve.jobs import JobStore
from terrasynth.serve.tiles import FEATURE, point_values, presets, render_tile

OUTPUT_STEM = re.compile(
    r"^(?P<target>[a-z0-9_]+?)_(?P<what>sample(?P<i>\d+)|mean|std|probs|entropy)$"
)
ROLES = {"mean": "value", "std": "spread", "entropy": "spread", "probs": "probability"}
CHUNK = 1 << 20


@dataclass
class ServeConfig:
    """Settings of one server."""

    workdir: Path
    model: str | None = None  # a model or run folder; None: the built-in model
    folder: Path | None = None  # GeoTIFFs the page may pick from
    limits: Limits = field(default_factory=Limits)
    basemap: str | None = None  # an online basemap URL template ({z}/{x}/{y}), optional


def _modality_json(mod: Modality) -> dict[str, Any]:
    return {
        "name": mod.name,
        "description": mod.description,
        "kind": mod.kind,
        "units": mod.units,
        "bands": list(mod.bands),
        "presets": presets(mod),
        "legend": [{"code": e.code, "name": e.name, "color": e.color} for e in mod.legend],
    }


def output_layers(job: dict[str, Any], files: list[str], registry: Any) -> list[dict[str, Any]]:
    """The map layers of a finished job's files: per target its samples (one layer with a
    sample index), mean and std (or class probabilities and entropy)."""
    layers = []
    for target in job["targets"]:
        mod = registry[target]
        stems = [f[:-4] for f in files if f.endswith(".tif") and f.startswith(f"{target}_")]
        samples = sorted(
            int(m["i"]) for s in stems if (m := OUTPUT_STEM.match(s)) and m["i"] is not None
        )
        base = {"target": target, "modality": target, "kind": mod.kind, "units": mod.units}
        if samples:
            layers.append(
                {
                    **base,
                    "key": f"{target}_samples",
                    "name": f"{target} samples",
                    "stem": f"{target}_sample{{i}}",
                    "samples": len(samples),
                    "presets": presets(mod),
                    "bands": _file_bands(mod),
                }
            )
        for what in ("mean", "std", "probs", "entropy"):
            if f"{target}_{what}" in stems:
                role = ROLES[what]
                bands = (
                    [e.name for e in mod.legend]
                    if what == "probs"
                    else ["entropy"]
                    if what == "entropy"
                    else _file_bands(mod)
                )
                layers.append(
                    {
                        **base,
                        "key": f"{target}_{what}",
                        "name": f"{target} {what}",
                        "stem": f"{target}_{what}",
                        "presets": presets(mod, role),
                        "bands": bands,
                    }
                )
    return layers


def _file_bands(mod: Modality) -> list[str]:
    return [mod.name] if mod.kind == "categorical" else list(mod.bands)


def create_app(config: ServeConfig) -> Any:
    """The Starlette application of ``terrasynth serve``."""
    applications = require("starlette.applications", "serve", FEATURE)
    responses = require("starlette.responses", "serve", FEATURE)
    routing = require("starlette.routing", "serve", FEATURE)
    staticfiles = require("starlette.staticfiles", "serve", FEATURE)
    leaflet = require("xstatic.pkg.leaflet", "serve", FEATURE)
    from terrasynth.pipeline import Pipeline

    JSONResponse, Response = responses.JSONResponse, responses.Response
    pipe = Pipeline.from_pretrained(config.model)
    registry = pipe.model.config.registry
    rasters = [m for m in pipe.modalities if m in registry.modalities and registry[m].is_raster]
    config.workdir.mkdir(parents=True, exist_ok=True)
    inputs = InputStore(config.workdir, registry, rasters, config.limits)
    jobs = JobStore(config.workdir, inputs, pipe.source, rasters)
    searches = SearchStore(config.workdir, inputs, registry)
    stac_missing = missing_extra()
    static = Path(str(resources.files("terrasynth.serve") / "static"))
    empty_png = _empty_png()

    def error(exc: Exception, status: int = 400) -> Any:
        message = " ".join(str(exc).split())
        if message.startswith("no such"):
            status = 404
        return JSONResponse({"error": message}, status_code=status)

    def guarded(handler):
        async def wrapper(request):
            try:
                return await handler(request)
            except TerrasynthError as exc:
                return error(exc)

        return wrapper

    async def index(request):
        return responses.FileResponse(static / "index.html")

    async def settings(request):
        return JSONResponse(
            {
                "modalities": {m: _modality_json(registry[m]) for m in rasters},
                "inputs": rasters,
                "targets": rasters,
                "limits": {
                    "max_bytes": config.limits.max_bytes,
                    "max_pixels": config.limits.max_pixels,
                },
                "folder": config.folder is not None,
                "stac": {"available": stac_missing is None, "missing": stac_missing},
                "basemap": config.basemap,
            }
        )

    async def folder_files(request):
        return JSONResponse({"files": list_folder(config.folder)})

    async def pick(request):
        body = await request.json()
        if config.folder is None:
            raise InputError("the server was started without --folder")
        record = inputs.add_from_folder(config.folder, str(body.get("path", "")))
        return JSONResponse(inputs.public(record))

    async def upload(request):
        name = request.query_params.get("name", "upload.tif")
        declared = request.headers.get("content-length")
        too_large = InputError(
            f"the file is larger than this server's limit of "
            f"{config.limits.max_bytes / 2**20:.0f} MiB"
        )
        if declared is not None and declared.isdigit() and int(declared) > config.limits.max_bytes:
            return error(too_large, 413)
        tmp = inputs.uploads / f".partial-{new_id()}"
        size = 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > config.limits.max_bytes:
                        raise too_large
                    f.write(chunk)
            if size == 0:
                raise InputError("the upload is empty")
            record = inputs.add_upload(tmp, name)
        except InputError as exc:
            return error(exc, 413 if exc is too_large else 400)
        finally:
            tmp.unlink(missing_ok=True)
        return JSONResponse(inputs.public(record))

    async def stac_search(request):
        body = await request.json()
        search_id = searches.start(body if isinstance(body, dict) else {})
        return JSONResponse({"id": search_id})

    async def stac_state(request):
        return JSONResponse(searches.state(request.path_params["search_id"]))

    async def input_info(request):
        return JSONResponse(inputs.public(inputs.get(request.path_params["input_id"])))

    async def input_delete(request):
        inputs.remove(request.path_params["input_id"])
        return JSONResponse({"removed": True})

    def tile_args(request) -> tuple[int, int, int, str | None, str | None]:
        p, q = request.path_params, request.query_params
        return p["z"], p["x"], p["y"], q.get("preset"), q.get("band")

    def png(data: bytes | None) -> Any:
        headers = {"Cache-Control": "no-store"}
        return Response(data or empty_png, media_type="image/png", headers=headers)

    async def input_tile(request):
        record = inputs.get(request.path_params["input_id"])
        q = request.query_params
        modality = q.get("modality", record["modality"])
        bands = q.get("bands")
        bands = bands.split(",") if bands else record["bands"]
        check_bands(record, modality, bands, registry)
        mod = registry[modality]
        z, x, y, preset, band = tile_args(request)
        data = await _threaded(
            render_tile, Path(record["path"]), mod, bands, preset or presets(mod)[0], z, x, y, band
        )
        return png(data)

    async def job_create(request):
        body = await request.json()
        job_id = jobs.create(body if isinstance(body, dict) else {})
        return JSONResponse({"id": job_id})

    async def job_info(request):
        job_id = request.path_params["job_id"]
        job, state = jobs.job(job_id), jobs.state(job_id)
        answer = {"id": job_id, "job": job, "state": state}
        if state["status"] == "done":
            files = state.get("files", [])
            answer["layers"] = output_layers(job, files, registry)
            answer["files"] = files
            answer["item"] = "item.json" in files
        return JSONResponse(answer)

    async def job_cancel(request):
        return JSONResponse({"state": jobs.cancel(request.path_params["job_id"])})

    def output_stem(job_id: str, stem: str) -> tuple[Path, Modality, str]:
        match = OUTPUT_STEM.match(stem)
        job = jobs.job(job_id)
        if match is None or match["target"] not in job["targets"]:
            raise InputError("no such layer")
        path = jobs.output_file(job_id, f"{stem}.tif")
        what = "sample" if match["i"] is not None else match["what"]
        return path, registry[match["target"]], what

    async def job_tile(request):
        job_id = request.path_params["job_id"]
        path, mod, what = output_stem(job_id, request.path_params["stem"])
        z, x, y, preset, band = tile_args(request)
        role = ROLES.get(what, "value")
        with _open(path) as f:
            bands = [d or f"band{i + 1}" for i, d in enumerate(f.descriptions)]
        stats = path
        if what in ("sample", "mean") and mod.kind != "categorical":
            stats = jobs.output_file(job_id, f"{mod.name}_mean.tif")
        data = await _threaded(
            render_tile, path, mod, bands, preset or presets(mod, role)[0], z, x, y, band, stats
        )
        return png(data)

    async def job_point(request):
        job_id = request.path_params["job_id"]
        try:
            lon = float(request.query_params["lon"])
            lat = float(request.query_params["lat"])
        except (KeyError, ValueError):
            raise InputError("give lon and lat as numbers") from None
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise InputError("lon/lat outside the Earth")
        return JSONResponse(
            await _threaded(_point_report, jobs, inputs, registry, job_id, lon, lat)
        )

    async def job_file(request):
        path = jobs.output_file(request.path_params["job_id"], request.path_params["name"])
        media = "application/geo+json" if path.suffix == ".json" else None
        return responses.FileResponse(path, filename=path.name, media_type=media)

    async def job_zip(request):
        job_id = request.path_params["job_id"]
        folder = jobs.outputs(job_id)
        tmp = tempfile.SpooledTemporaryFile(max_size=64 * 2**20)  # noqa: SIM115 (streamed)
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            for p in files:
                z.write(p, f"terrasynth-{job_id[:8]}/{p.name}")
        size = tmp.tell()
        tmp.seek(0)

        def chunks():
            with tmp:
                while block := tmp.read(CHUNK):
                    yield block

        headers = {
            "Content-Disposition": f'attachment; filename="terrasynth-{job_id[:8]}.zip"',
            "Content-Length": str(size),
        }
        return responses.StreamingResponse(chunks(), media_type="application/zip", headers=headers)

    Route, Mount = routing.Route, routing.Mount
    tile = "/{z:int}/{x:int}/{y:int}.png"
    routes = [
        Route("/", index),
        Route("/api/settings", guarded(settings)),
        Route("/api/folder", guarded(folder_files)),
        Route("/api/folder/pick", guarded(pick), methods=["POST"]),
        Route("/api/inputs", guarded(upload), methods=["POST"]),
        Route("/api/stac", guarded(stac_search), methods=["POST"]),
        Route("/api/stac/{search_id}", guarded(stac_state)),
        Route("/api/inputs/{input_id}", guarded(input_info)),
        Route("/api/inputs/{input_id}", guarded(input_delete), methods=["DELETE"]),
        Route("/api/inputs/{input_id}/tiles" + tile, guarded(input_tile)),
        Route("/api/jobs", guarded(job_create), methods=["POST"]),
        Route("/api/jobs/{job_id}", guarded(job_info)),
        Route("/api/jobs/{job_id}/cancel", guarded(job_cancel), methods=["POST"]),
        Route("/api/jobs/{job_id}/point", guarded(job_point)),
        Route("/api/jobs/{job_id}/tiles/{stem}" + tile, guarded(job_tile)),
        Route("/api/jobs/{job_id}/files/{name}", guarded(job_file)),
        Route("/api/jobs/{job_id}/run.zip", guarded(job_zip)),
        Mount("/static", staticfiles.StaticFiles(directory=static)),
        Mount("/vendor/leaflet", staticfiles.StaticFiles(directory=leaflet.BASE_DIR)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        jobs.close()  # the workers this server started stop with it

    app = applications.Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(_security_headers(config.basemap))
    app.state.jobs = jobs
    app.state.inputs = inputs
    app.state.searches = searches
    return app


def _point_report(
    jobs: JobStore, inputs: InputStore, registry: Any, job_id: str, lon: float, lat: float
) -> dict[str, Any]:
    """Values of every layer of a job at lon/lat: each input's bands, and per target the
    samples' values with their mean, std, minimum and maximum."""
    job = jobs.job(job_id)
    layers = []
    for item in job["inputs"]:
        record = inputs.get(item["id"])
        values = point_values(Path(record["path"]), lon, lat)
        layers.append(
            {
                "name": f"input {item['name']}",
                "modality": item["modality"],
                "bands": item["bands"],
                "values": values,
            }
        )
    targets = {}
    if jobs.state(job_id)["status"] == "done":
        folder = jobs.outputs(job_id)
        for target in job["targets"]:
            mod = registry[target]
            paths = sorted(
                folder.glob(f"{target}_sample*.tif"),
                key=lambda p: int(OUTPUT_STEM.match(p.stem)["i"]),
            )
            samples = [point_values(p, lon, lat) for p in paths]
            if not samples or samples[0] is None:
                continue
            arr = np.array([[np.nan if v is None else v for v in s] for s in samples])
            entry: dict[str, Any] = {"bands": _file_bands(mod), "samples": arr.tolist()}
            with np.errstate(all="ignore"):
                if mod.kind == "categorical":
                    names = {e.code: e.name for e in mod.legend}
                    entry["classes"] = [
                        names.get(int(v), "no data") if np.isfinite(v) else None for v in arr[:, 0]
                    ]
                else:
                    for name, stat in (
                        ("mean", np.nanmean),
                        ("std", np.nanstd),
                        ("min", np.nanmin),
                        ("max", np.nanmax),
                    ):
                        entry[name] = [
                            None if not np.isfinite(v) else float(v) for v in stat(arr, axis=0)
                        ]
            entry["samples"] = [
                [None if not np.isfinite(v) else float(v) for v in row] for row in arr
            ]
            targets[target] = entry
    return {"lon": lon, "lat": lat, "inputs": layers, "targets": targets}


async def _threaded(fn, *args):
    """Run blocking work (GDAL reads, rendering) in a worker thread."""
    concurrency = require("starlette.concurrency", "serve", FEATURE)
    return await concurrency.run_in_threadpool(fn, *args)


def _open(path: Path) -> Any:
    return rasterio.open(path)


def _empty_png() -> bytes:
    """A transparent 256 x 256 PNG (tiles where a layer has no data)."""
    models = require("rio_tiler.models", "serve", FEATURE)
    data = np.zeros((1, 256, 256), np.uint8)
    return models.ImageData(np.ma.MaskedArray(data, mask=True)).render(img_format="PNG")


def _security_headers(basemap: str | None) -> Any:
    """Middleware adding a content security policy: scripts, styles and images from this
    server only (and the optional basemap's origin)."""
    base = require("starlette.middleware.base", "serve", FEATURE)
    images = "'self' data: blob:"
    if basemap:
        match = re.match(r"^(https?://[^/{}]+)", basemap)
        if match:
            images += " " + match.group(1)
    policy = (
        f"default-src 'self'; img-src {images}; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'"
    )

    class Headers(base.BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            response = await call_next(request)
            response.headers["Content-Security-Policy"] = policy
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response

    return Headers
