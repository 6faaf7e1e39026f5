"""One facade for generation: GeoTIFFs of a place in, the missing modalities out.

>>> pipe = Pipeline.from_pretrained()          # the built-in model
>>> out = pipe.generate(inputs={"s1grd": "s1.tif"}, targets=["s2l2a"], num_samples=4, seed=0)
>>> out["s2l2a"].mean                           # (bands, H, W) on s1.tif's own grid
>>> out.save("result/")                         # GeoTIFFs, statistics, quick-look panel

Steps: inputs are read and checked like ``data build``'s generic mode; they are aligned onto
a working grid in metres at the model's resolution (the first input's grid when it is
projected, a local UTM grid when it is geographic); the scene is sampled by overlapping
windows (``terrasynth.sampling.windows``); results return to physical units and are warped
onto the first input's grid (same CRS, transform, width and height). With no inputs the
scene is generated jointly on a UTM grid at ``location`` (or at a generated location).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, calculate_default_transform
from rasterio.windows import Window

from terrasynth.arrays import VARIABLES, GeoArray, as_raster, describe_input, input_header
from terrasynth.atomic import atomic_folder, output_files
from terrasynth.cog import cog_options
from terrasynth.data.align import AlignedGroup, align_scene, reference_grid, warp_to_grid
from terrasynth.data.build import check_scene_values
from terrasynth.data.raster_io import (
    GDAL_ERRORS,
    Header,
    cropped_grid,
    first_line,
    pixel_window,
    window_over,
)
from terrasynth.data.scene import Grid, Layer, Scene
from terrasynth.data.sources.generic import generic_scene, input_layout
from terrasynth.data.stats import denormalise, normalise
from terrasynth.devices import model_device, resolve_device
from terrasynth.errors import InputError, TerrasynthError, UnknownModalityError
from terrasynth.modalities import Modality
from terrasynth.models.base import GenerativeModel, check_precision, sampling_steps
from terrasynth.models.config import ModelConfig
from terrasynth.models.factory import load_model
from terrasynth.models.signals import batch_signals, location_from_vector, time_from_vector
from terrasynth.sampling.flow import FlowSampler
from terrasynth.sampling.windows import sample_independent_tiles, sample_scene
from terrasynth.stac import write_item

# Scenes up to this many working pixels per side, whose inputs take at most
# MAX_MEMORY_BYTES read whole, are generated in memory; others go to the whole-scene engine
# (``terrasynth.scenes``: tiles, state on disk, resumable). Decided from headers only.
MAX_SIDE = 1024
MAX_MEMORY_BYTES = 512 * 2**20
BYTES_PER_VALUE = 4 + 1  # beyond the stored value: its float32 copy and validity flag
VECTOR_NAMES = ("location", "time")


def package_versions() -> dict[str, str]:
    """Versions of terrasynth and of the packages its numbers depend on."""
    from importlib.metadata import version

    from terrasynth import __version__

    packages = {n: version(n) for n in ("torch", "numpy", "rasterio", "zarr")}
    return {"terrasynth": __version__, **packages, "gdal": rasterio.__gdal_version__}


def file_sha256(path: Path) -> str:
    """The sha256 of a file (as ``sha256sum`` prints it), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_model_path() -> Path:
    """Folder of the built-in model shipped inside the package."""
    return Path(str(resources.files("terrasynth") / "weights" / "default"))


def utm_crs(lon: float, lat: float) -> CRS:
    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def days_since_epoch(when: str | date | datetime | None) -> float | None:
    """An ISO date (or date) as days since 1970-01-01; None stays None."""
    if when is None:
        return None
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when)
        except ValueError as exc:
            raise InputError(f"time '{when}' is not an ISO date (YYYY-MM-DD)") from exc
    if isinstance(when, datetime):
        when = when.date()
    return float((when - date(1970, 1, 1)).days)


@dataclass
class TargetResult:
    """One generated modality on the output grid.

    Continuous: ``samples`` (N, C, H, W) physical values, ``mean`` and ``std`` (C, H, W).
    Categorical: ``samples`` (N, 1, H, W) legend codes, ``probs`` (K, H, W) mean class
    probabilities over the samples, ``entropy`` (H, W) in nats. One-token modalities:
    ``values`` per sample (location: lat, lon; time: ISO date; labels: probabilities).
    NaN (continuous) or ``nodata`` (codes) marks pixels outside the generated footprint.
    """

    modality: Modality
    bands: tuple[str, ...]
    samples: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    probs: np.ndarray | None = None
    entropy: np.ndarray | None = None
    values: list[Any] = field(default_factory=list)
    given_bands: tuple[str, ...] = ()  # band infilling: these bands are the input's
    nodata: int = 255


@dataclass
class Generation:
    """What :meth:`Pipeline.generate` returns: targets on one grid, plus the inputs."""

    grid: Grid
    targets: dict[str, TargetResult]
    inputs: dict[str, tuple[Modality, tuple[str, ...], np.ndarray]]  # on the output grid
    info: dict[str, Any]

    def __getitem__(self, name: str) -> TargetResult:
        return self.targets[name]

    def to_xarray(self, name: str, what: str = "samples"):
        """A georeferenced ``xarray.DataArray`` (rioxarray CRS and transform) of one target:
        ``samples`` (sample, band, y, x), ``mean``/``std`` (band, y, x), ``probs`` (class,
        y, x) or ``entropy`` (y, x)."""
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        import xarray as xr

        res = self.targets[name]
        arr = getattr(res, what)
        if arr is None:
            raise TerrasynthError(f"{name} has no '{what}' (kind {res.modality.kind})")
        g = self.grid
        xs = (g.transform @ (np.arange(g.width) + 0.5, np.full(g.width, 0.5)))[0]
        ys = (g.transform @ (np.full(g.height, 0.5), np.arange(g.height) + 0.5))[1]
        lead = {
            "samples": ("sample", "band"),
            "mean": ("band",),
            "std": ("band",),
            "probs": ("class",),
            "entropy": (),
        }[what]
        coords: dict[str, Any] = {"y": ys, "x": xs}
        if "band" in lead:
            coords["band"] = list(res.bands) if res.modality.kind != "categorical" else [name]
        if "class" in lead:
            coords["class"] = [e.name for e in res.modality.legend]
        da = xr.DataArray(arr, dims=(*lead, "y", "x"), coords=coords, name=f"{name}_{what}")
        da.attrs["units"] = res.modality.units or ""
        return da.rio.write_crs(g.crs).rio.write_transform(g.transform)

    def to_dataset(self, name: str | None = None):
        """One target as a georeferenced ``xarray.Dataset`` (CRS and transform through
        rioxarray): the variables ``samples`` (sample, band, y, x), ``mean`` and ``std``
        (band, y, x) with band names as coordinates, or for class maps ``samples``,
        ``probs`` (class, y, x) and ``entropy`` (y, x). ``name`` may be left out when there
        is one raster target. A saved folder opens the same way:
        :func:`terrasynth.arrays.open_generation`."""
        import xarray as xr

        rasters = [n for n, r in self.targets.items() if r.samples is not None]
        if name is None:
            if len(rasters) != 1:
                raise TerrasynthError(f"name one of the targets: {', '.join(rasters)}")
            name = rasters[0]
        if name not in rasters:
            raise TerrasynthError(f"no raster target '{name}' (targets: {', '.join(rasters)})")
        res = self.targets[name]
        kind = "categorical" if res.modality.kind == "categorical" else "continuous"
        arrays = {v: self.to_xarray(name, v) for v in VARIABLES[kind]}
        ds = xr.Dataset(arrays)
        ds.attrs.update(modality=name, kind=kind, units=res.modality.units or "")
        ds.attrs.update(seed=self.info.get("seed"), num_samples=self.info.get("num_samples"))
        return ds.rio.write_crs(self.grid.crs).rio.write_transform(self.grid.transform)

    def save(self, folder: str | Path, overwrite: bool = False) -> list[Path]:
        """Write cloud-optimised GeoTIFFs, ``generation.json``, ``quicklook.png`` and the
        STAC Item ``item.json`` into ``folder``.

        Everything is written into a temporary sibling folder first and renamed into place,
        so an interrupted save leaves no half-written output. A non-empty ``folder`` is
        replaced only with ``overwrite`` and only if it is an earlier terrasynth output.
        """
        from terrasynth.quicklook import render_quicklook

        with atomic_folder(folder, overwrite, "generate") as tmp:
            for name, res in self.targets.items():
                _write_target(tmp, name, res, self.grid)
            render_quicklook(self, tmp / "quicklook.png")
            info = dict(self.info)
            modalities = {n: r.modality for n, r in self.targets.items()}
            write_item(tmp, Path(folder).name, self.grid, modalities, info)
            info["files"] = [p.name for p in output_files(tmp)] + ["generation.json"]
            (tmp / "generation.json").write_text(json.dumps(info, indent=2, default=str))
        return output_files(folder)


class Pipeline:
    """Any-to-any generation with any trained model (see the module docstring)."""

    def __init__(self, model: GenerativeModel, source: str = "") -> None:
        self.model = model.eval()
        self.source = source

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> Pipeline:
        """Load a model folder, a run folder (its ``model/``), or the built-in model."""
        folder = Path(path) if path is not None else default_model_path()
        if (folder / "model" / "config.json").exists():
            folder = folder / "model"
        if not (folder / "config.json").exists():
            where = "the built-in model is missing from this installation" if path is None else ""
            raise TerrasynthError(f"{folder}: not a model folder {where}".strip())
        return cls(load_model(folder), source=str(folder))

    def set_precision(self, precision: str) -> Pipeline:
        """Sample in ``precision``: ``"auto"`` (the default: bfloat16 convolutions where the
        device runs them natively, float32 elsewhere), ``"float32"`` or ``"bfloat16"``.
        bfloat16 applies to the convolutional generator's trunk and residual generator
        (about 1.3 times faster on a CPU with AVX512-BF16; samples move by a small fraction
        of their spread, docs/generation.md); other backbones sample in float32 only.
        Returns the pipeline."""
        check_precision(precision)
        if hasattr(self.model, "sampling_precision"):
            self.model.precision = precision
        elif precision == "bfloat16":
            raise TerrasynthError(
                f"the {self.model.config.backbone} backbone samples in float32 only"
            )
        return self

    @property
    def precision(self) -> str:
        """What the model computes in when sampling here: ``bfloat16`` or ``float32``."""
        if hasattr(self.model, "sampling_precision"):
            return self.model.sampling_precision(self.device)
        return "float32"

    @property
    def modalities(self) -> list[str]:
        return self.model.modality_names

    @property
    def device(self) -> torch.device:
        """Where the model runs (:meth:`to`)."""
        return model_device(self.model)

    def to(self, device: str | torch.device) -> Pipeline:
        """Run the model on ``device``: ``cpu`` (the default), ``cuda``, ``cuda:N``, ``mps``
        or ``auto`` (a GPU if there is one). A device that is not available raises
        :class:`TerrasynthError`. Noise is drawn on the CPU wherever the model runs, so a
        seed gives the same starting noise on any device (a GPU's arithmetic may still
        differ in the last bits). Returns the pipeline."""
        self.model = self.model.to(resolve_device(device))
        return self

    @cached_property
    def weights_sha256(self) -> dict[str, str]:
        """sha256 of each weights file of the model folder; for a model made in memory, of
        its state dict. Recorded in ``generation.json`` and in whole-scene work folders."""
        folder = Path(self.source) if self.source else None
        files = sorted(folder.glob("*.safetensors")) if folder and folder.is_dir() else []
        if files:
            return {f.name: file_sha256(f) for f in files}
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        return {"state_dict": h.hexdigest()}

    @cached_property
    def config_sha256(self) -> str:
        """sha256 of the model's config as loaded (its calibration included: ``terrasynth
        calibrate`` rewrites ``spread_scale`` in place, and it changes the samples)."""
        text = json.dumps(self.model.config.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def read_onto(
        self,
        inputs: Iterable[tuple[str, str | Path]],
        grid: Grid,
        scaling: dict[str, tuple[float, float]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Read GeoTIFFs (``(modality[:bands], file)`` as for inputs) onto ``grid``:
        band name -> (H, W) physical values, NaN where invalid. For comparisons with
        generated outputs."""
        scene = generic_scene(list(inputs), registry=self.model.config.registry, scaling=scaling)
        out = {}
        for layer in scene.layers:
            mod = self.model.config.registry[layer.modality]
            valid = layer.valid_mask()
            warped = _warp(layer.data.astype(np.float32), valid, layer.grid, grid, mod)
            out.update({b: warped[i] for i, b in enumerate(layer.bands)})
        return out

    # -- generation ------------------------------------------------------------------------
    def _check_inputs(self, items: list[tuple[str, str | Path]]) -> None:
        for key, _ in items:
            name = key.partition(":")[0]
            if name not in self.modalities:
                raise UnknownModalityError(
                    f"the model does not know input modality '{name}' "
                    f"(it knows: {', '.join(self.modalities)})"
                )

    def input_window(
        self,
        inputs: Iterable[tuple[str, Any]],
        window: Sequence[int] | None = None,
        bbox: Sequence[float] | None = None,
    ) -> Window | None:
        """The pixel window of the first input that ``window`` (COL, ROW, WIDTH, HEIGHT in
        its pixels) or ``bbox`` (WEST, SOUTH, EAST, NORTH in degrees) selects, found from
        its header; None when neither is given."""
        items = list(inputs)
        if window is None and bbox is None:
            return None
        if not items:
            raise InputError("a window or bbox selects part of an input; there is no input")
        key, file = items[0]
        first = input_header(file, key)
        return pixel_window(first.grid, first.path, window, bbox)

    def in_memory_refusal(
        self,
        inputs: Iterable[tuple[str, Any]],
        gsd: float | None = None,
        size: int | None = None,
        window: Window | None = None,
    ) -> str | None:
        """Why :meth:`generate` cannot run these inputs in memory, or None when it can.

        Decided from the files' headers, before any pixel is read: a working grid of more
        than :data:`MAX_SIDE` px per side, or inputs estimated at more than
        :data:`MAX_MEMORY_BYTES` read whole (with ``window``, a pixel window of the first
        input, only that window and the parts of the others under it). Such scenes go to
        the whole-scene engine."""
        items = list(inputs)
        self._check_inputs(items)
        size_px = self.model.config.window_size
        registry = self.model.config.registry
        headers = [input_header(file, key) for key, file in items]
        if not items:
            side = max(size_px, -(-(size or 2 * size_px) // 4) * 4)
            work = None
        else:
            key, file = items[0]
            first = headers[0]
            region = cropped_grid(first.grid, window)
            mod, bands, _ = input_layout(key, first.path, registry, as_raster(file, key))
            grid = header_working_grid(region, mod.name, bands, registry, gsd)
            work = padded_grid(grid, size_px)
            side = max(work.width, work.height)
            if window is not None:
                headers = [_header_part(h, region) for h in headers]
        if side > MAX_SIDE:
            shape = f"{work.width} x {work.height}" if work else f"{side} x {side}"
            gsd_m = work.ground_resolution_m() if work else gsd or 10.0
            return f"the scene is {shape} px at {gsd_m:.1f} m, more than {MAX_SIDE} px per side"
        need = sum(h.nbytes + h.nbytes // h.itemsize * BYTES_PER_VALUE for h in headers)
        if need > MAX_MEMORY_BYTES:
            return (
                f"its inputs take about {need / 2**20:.0f} MiB read whole, more than "
                f"{MAX_MEMORY_BYTES // 2**20} MiB"
            )
        return None

    def _in_memory_part(
        self, items, window, bbox, gsd: float | None, size: int | None, verb: str, hint: str
    ) -> Window | None:
        """Check the inputs' modalities; the part of the first input to work on
        (:meth:`input_window`), refused when it is too large for memory
        (:meth:`in_memory_refusal`)."""
        self._check_inputs(items)
        part = self.input_window(items, window, bbox)
        refusal = self.in_memory_refusal(items, gsd, size, part)
        if refusal is not None:
            raise InputError(f"{refusal}: too large to {verb} in memory ({hint})")
        return part

    def generate(
        self,
        inputs: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
        targets: Iterable[str] = (),
        num_samples: int = 4,
        seed: int = 0,
        *,
        steps: int | None = None,
        eta: float = 0.0,
        guidance: float = 1.0,
        scaling: dict[str, tuple[float, float]] | None = None,
        size: int | None = None,
        gsd: float | None = None,
        location: tuple[float, float] | None = None,
        time: str | date | None = None,
        batch_size: int = 32,
        strict: bool = False,
        progress: Callable[[int, int], None] | None = None,
        windows: str = "shared",
        window: Sequence[int] | None = None,
        bbox: Sequence[float] | None = None,
    ) -> Generation:
        """Generate ``targets`` from ``inputs`` (``{modality[:bands]: GeoTIFF}``; instead of
        a file, a :class:`~terrasynth.arrays.GeoArray`, an ``(array, transform, crs)`` tuple
        or a rioxarray ``DataArray``: ``terrasynth.arrays``).

        ``num_samples`` samples from ``seed`` (same seed, same samples), ``steps`` sampling
        steps (default: the model's own; a one-step generator always takes 1), ``eta`` 0
        deterministic to 1 stochastic, ``guidance`` > 1 classifier-free guidance. A target
        that is also an input (``s2l2a:B04,B03,B02=rgb.tif`` with target ``s2l2a``) has its
        missing bands generated (band infilling). With no inputs the
        scene is generated jointly: ``size`` px at ``gsd`` m, optionally at ``location``
        (lon, lat). ``time`` (ISO date) conditions any generation. ``windows="independent"``
        samples every window on its own (the usual tiling; for seam comparisons only).
        With inputs, ``gsd`` sets the working resolution (outputs still land on the first
        input's grid). ``window`` (COL, ROW, WIDTH, HEIGHT in the first input's pixels) or
        ``bbox`` (WEST, SOUTH, EAST, NORTH in degrees) restricts generation to that part
        of the first input: only it (and the parts of the other inputs under it) is read,
        and the outputs lie on its grid. Inputs may be network locations GDAL reads
        (``https://``, ``s3://``, ``/vsicurl/``, ``/vsis3/``): only the windows needed
        cross the network.
        """
        t_start = _now()
        cfg = self.model.config
        registry = cfg.registry
        items = list(inputs.items() if isinstance(inputs, Mapping) else inputs)
        targets = list(dict.fromkeys(targets))
        if not targets:
            raise TerrasynthError("no target modality given (use --target MOD)")
        for t in targets:
            if t not in self.modalities:
                raise UnknownModalityError(
                    f"the model cannot generate '{t}' (it knows: {', '.join(self.modalities)})"
                )
        steps = sampling_steps(self.model, steps)  # None: the model's own; one-step: 1
        if num_samples < 1 or steps < 1:
            raise TerrasynthError("num_samples and steps must be at least 1")
        days = days_since_epoch(time)
        hint = "use the whole-scene engine: generate --stream"
        part = self._in_memory_part(items, window, bbox, gsd, size, "generate", hint)
        warnings: list[str] = []
        if items:
            scene = generic_scene(items, registry=registry, scaling=scaling, window=part)
            warnings = check_scene_values(scene, registry, strict=strict)
            out_grid = scene.layers[0].grid
            work = working_grid(scene, registry, gsd)
        else:
            size = size or 2 * cfg.window_size
            gsd = gsd or 10.0
            lon, lat = location if location is not None else (0.0, 0.0)
            work = utm_grid(lon, lat, size, gsd)
            out_grid = work
            scene = Scene("joint", "joint", "generated", work, [], None)
            if location is None and "location" not in targets and cfg.use_location:
                targets.append("location")  # the place is generated too, then georeferenced
        work = padded_grid(work, cfg.window_size)
        aligned = align_scene(
            Scene(scene.scene_id, "generic", "user", work, scene.layers), registry
        )
        input_names = {k.partition(":")[0] for k, _ in items}
        batch, order, given = scene_batch(
            cfg, aligned.groups, work, targets, location, days, input_names
        )
        signals = batch_signals(batch, cfg, order)
        if (
            items
            and not any(bool(signals[n].present.any()) for n in signals if n not in targets)
            and not given
        ):
            raise InputError("the inputs hold no valid pixel to condition on")
        gen = torch.Generator().manual_seed(seed)
        sampler = FlowSampler(steps=steps, eta=eta)
        gsd_m = work.ground_resolution_m()
        if windows == "independent":
            out = sample_independent_tiles(
                self.model, signals, targets, gsd_m, num_samples, sampler, gen
            )
        elif windows == "shared":
            out = sample_scene(
                self.model,
                signals,
                targets,
                gsd_m,
                num_samples=num_samples,
                sampler=sampler,
                generator=gen,
                guidance=guidance,
                given_bands=given or None,
                batch_size=batch_size,
                on_step=progress,
            )
        else:
            raise TerrasynthError(f"windows must be 'shared' or 'independent', not '{windows}'")
        if not items and "location" in out and location is None:
            lat_g, lon_g = location_from_vector(out["location"].vector.mean(0))
            work = utm_grid(float(lon_g), float(lat_g), work.width, gsd_m, work.width)
            out_grid = work
        results = {
            n: self._to_output(n, out[n], signals, given, work, out_grid, aligned) for n in targets
        }
        shown = {
            m: (registry[m], g.bands, _warp(g.data, g.valid, g.grid, out_grid, registry[m]))
            for (m, gname), g in aligned.groups.items()
            if gname == registry[m].groups[0].name and m not in targets
        }
        info = {
            "model": self.source,
            "backbone": cfg.backbone,
            "device": str(self.device),
            "precision": self.precision,
            "weights_sha256": self.weights_sha256,
            "config_sha256": self.config_sha256,
            "versions": package_versions(),
            "inputs": [[k, describe_input(v)] for k, v in items],
            "targets": targets,
            "num_samples": num_samples,
            "seed": seed,
            "sampler": {"steps": steps, "eta": eta, "guidance": guidance, "windows": windows},
            "working_grid": {
                "crs": work.crs.to_string(),
                "gsd_m": round(gsd_m, 3),
                "width": work.width,
                "height": work.height,
            },
            "output_grid": {
                "crs": out_grid.crs.to_string(),
                "transform": list(out_grid.transform)[:6],
                "width": out_grid.width,
                "height": out_grid.height,
            },
            "time": time if time is None else str(time),
            "warnings": warnings,
            "seconds": round(_now() - t_start, 2),
        }
        if part is not None:
            info["window"] = [int(part.col_off), int(part.row_off), part.width, part.height]
        return Generation(out_grid, results, shown, info)

    # -- embeddings ------------------------------------------------------------------------
    def embed(
        self,
        inputs: Mapping[str, Any] | Iterable[tuple[str, Any]],
        chip_size: int = 64,
        *,
        scaling: dict[str, tuple[float, float]] | None = None,
        time: str | date | None = None,
        batch_size: int = 32,
        strict: bool = False,
        progress: Callable[[int, int], None] | None = None,
        window: Sequence[int] | None = None,
        bbox: Sequence[float] | None = None,
    ):
        """Embed a place: the model's features of ``inputs`` (as for :meth:`generate`: any
        subset of the modalities it knows, given clean; nothing is generated).

        Returns an :class:`~terrasynth.embedding.Embedding`: ``.pixels``, a georeferenced
        ``xarray.DataArray`` (feature, y, x) at the model's feature resolution (1 working-
        grid pixel for the convolutional backbones, one patch for the transformer) on the
        working grid (the first input's own grid when it is projected in metres), NaN where
        no input lies; ``.chips``, a ``pandas.DataFrame`` of the mean embedding per chip of
        ``chip_size`` working-grid pixels (a multiple of the feature resolution) with chip
        ids and chip-centre coordinates in the CRS and in lon/lat; ``.save(folder)``.
        ``window`` / ``bbox`` restrict it to part of the first input, as for
        :meth:`generate`; ``time`` (ISO date) conditions models that use it. Scenes too
        large for memory (:meth:`in_memory_refusal`) are refused: ``terrasynth embed`` and
        :func:`terrasynth.scenes.embed.embed_scene` stream them tile by tile."""
        from terrasynth.embedding import Embedding, check_chip_size, embedding_grid
        from terrasynth.sampling.windows import embed_layout, embed_windows

        t_start = _now()
        cfg = self.model.config
        registry = cfg.registry
        factor = self.model.feature_factor
        check_chip_size(chip_size, factor)
        items = list(inputs.items() if isinstance(inputs, Mapping) else inputs)
        if not items:
            raise InputError("embedding needs at least one input (MODALITY=FILE)")
        days = days_since_epoch(time)
        part = self._in_memory_part(
            items, window, bbox, None, None, "embed",
            "terrasynth embed streams it tile by tile: terrasynth.scenes.embed.embed_scene",
        )  # fmt: skip
        scene = generic_scene(items, registry=registry, scaling=scaling, window=part)
        warnings = check_scene_values(scene, registry, strict=strict)
        work = working_grid(scene, registry)
        padded = embedding_grid(work, cfg.window_size, factor)
        aligned = align_scene(
            Scene(scene.scene_id, "generic", "user", padded, scene.layers), registry
        )
        input_names = {k.partition(":")[0] for k, _ in items}
        batch, order, _ = scene_batch(cfg, aligned.groups, padded, [], None, days, input_names)
        signals = batch_signals(batch, cfg, order)
        if not any(bool(s.present.any()) for s in signals.values() if s.groups is not None):
            raise InputError("the inputs hold no valid pixel to embed")
        gsd_m = padded.ground_resolution_m()
        total = -(-len(embed_layout(self.model, padded.height, padded.width)) // batch_size)
        done = [0]

        def on_call() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], total)

        feats, valid = embed_windows(self.model, signals, gsd_m, None, batch_size, on_call)
        fgrid = work.scaled(factor)
        feats = feats[:, : fgrid.height, : fgrid.width].numpy()
        valid = valid[: fgrid.height, : fgrid.width].numpy()
        feats = np.where(valid, feats, np.nan).astype(np.float32)
        info = self._embed_info(items, fgrid, factor, warnings, t_start)
        if part is not None:
            info["window"] = [int(part.col_off), int(part.row_off), part.width, part.height]
        return Embedding(fgrid, feats, factor, chip_size, info)

    def _embed_info(self, items, fgrid: Grid, factor: int, warnings, t_start) -> dict:
        """What ``embedding.json`` records of an embedding."""
        cfg = self.model.config
        layer = {
            "conv_generator": "trunk features at full resolution (last decoder block)",
            "unet": "decoder features at full resolution (last decoder block)",
            "scene_transformer": "patch tokens after the last block (layer-normalised), "
            "mean over the raster inputs",
        }.get(cfg.backbone, "feature_map")
        return {
            "model": self.source,
            "backbone": cfg.backbone,
            "layer": layer,
            "weights_sha256": self.weights_sha256,
            "config_sha256": self.config_sha256,
            "versions": package_versions(),
            "inputs": [[k, describe_input(v)] for k, v in items],
            "channels": self.model.feature_channels,
            "feature_factor": factor,
            "feature_gsd_m": round(fgrid.ground_resolution_m(), 3),
            "grid": {
                "crs": fgrid.crs.to_string(),
                "transform": list(fgrid.transform)[:6],
                "width": fgrid.width,
                "height": fgrid.height,
            },
            "window_size": cfg.window_size,
            "warnings": list(warnings),
            "seconds": round(_now() - t_start, 2),
        }

    def _stats(self, mod: Modality) -> dict:
        return self.model.config.stats.get(mod.name, {})

    def _to_output(self, name, gen, signals, given, work, out_grid, aligned) -> TargetResult:
        reg = self.model.config.registry
        if name in VECTOR_NAMES or not reg[name].is_raster:
            return _vector_result(name, gen, reg)
        mod = reg[name]
        if mod.kind == "categorical":
            g = mod.groups[0]
            probs = gen.probs[g.name].numpy()  # (N, K, h, w) on the group grid
            src = work.scaled(g.factor)
            ones = np.ones(probs.shape[-2:], bool)
            warped = np.stack([_warp(p, ones, src, out_grid, mod, force="bilinear") for p in probs])
            inside = np.isfinite(warped[0, 0])
            codes = np.array([e.code for e in mod.legend])
            idx = np.nan_to_num(warped).argmax(1)  # (N, H, W)
            nodata = int(mod.nodata) if mod.nodata is not None else 255
            samples = np.where(inside, codes[idx], nodata)[:, None].astype(np.int32)
            mean_p = np.nanmean(warped, 0) if warped.shape[0] > 1 else warped[0]
            mean_p = np.where(inside, mean_p, np.nan)
            entropy = -np.nansum(np.clip(mean_p, 1e-9, 1) * np.log(np.clip(mean_p, 1e-9, 1)), 0)
            entropy = np.where(inside, entropy, np.nan).astype(np.float32)
            return TargetResult(
                mod,
                mod.bands,
                samples=samples,
                probs=mean_p.astype(np.float32),
                entropy=entropy,
                nodata=nodata,
            )
        parts = []
        shown: list[str] = []
        sig = signals[name]
        for g in mod.groups:
            x0 = gen.groups[g.name].clone()  # (N, C, h, w) normalised
            if name in given:
                keep = given[name][g.name][0, :, 0, 0] > 0
                # the given bands are the input's own values, not the model's
                x0[:, keep] = sig.groups[g.name][:, keep]
                shown += [b for b, k in zip(g.bands, keep.tolist(), strict=True) if k]
            phys = denormalise(x0.numpy(), self._stats(mod), g.bands, mod.transform)  # (N, C, h, w)
            src = work.scaled(g.factor)
            ones = np.ones(phys.shape[-2:], bool)
            parts.append(np.stack([_warp(s, ones, src, out_grid, mod) for s in phys]))
        samples = np.concatenate(parts, 1).astype(np.float32)  # (N, C, H, W)
        return TargetResult(
            mod,
            mod.bands,
            samples=samples,
            mean=samples.mean(0),
            std=samples.std(0),
            given_bands=tuple(shown),
        )


def _header_part(header: Header, region: Grid) -> Header:
    """The header of the part of a raster under ``region`` (what a windowed read takes)."""
    part = window_over(header.grid, region)
    if part is None:
        raise InputError(f"{header.path} does not overlap the region asked for")
    return Header(header.path, cropped_grid(header.grid, part), header.count, header.itemsize)


def scene_batch(
    config: ModelConfig,
    groups: Mapping[tuple[str, str], AlignedGroup],
    work: Grid,
    targets: list[str],
    location: tuple[float, float] | None,
    days: float | None,
    input_names: set[str],
    held_bands: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, dict[str, torch.Tensor]]]:
    """A one-chip batch (the layout ``ChipDataset`` produces) of a working scene.

    ``groups``: the inputs aligned onto ``work`` per (modality, band group). A band counts
    as held where it has a valid pixel, or as ``held_bands`` says (whole-scene jobs decide
    once for the scene, not per tile). Returns the batch, the modality order and the band
    masks of band infilling (per target and group, which bands are shown)."""
    reg = config.registry
    order = [m for m in config.modalities]
    batch: dict[str, torch.Tensor] = {}
    available = []
    given: dict[str, dict[str, torch.Tensor]] = {}
    for m in order:
        mod = reg[m]
        if not mod.is_raster and mod.kind != "multilabel":
            available.append(False)
            continue
        if mod.kind == "multilabel":
            batch[f"{m}/labels"] = torch.zeros(1, mod.num_classes)
            available.append(m in targets)
            continue
        have = any((m, g.name) in groups for g in mod.groups)
        if not have and m not in targets:  # absent: no tokens, no arrays
            available.append(False)
            continue
        band_ok = np.zeros(len(mod.bands), bool)
        offset = 0
        for g in mod.groups:
            h, w = work.scaled(g.factor).height, work.scaled(g.factor).width
            ag = groups.get((m, g.name))
            n = len(g.bands)
            if ag is None:
                data = np.zeros((n, h, w), np.float32)
                valid = np.zeros((n, h, w), bool)
            else:
                data, valid = ag.data, ag.valid
                band_ok[offset : offset + n] = valid.reshape(n, -1).any(1)
            if held_bands is not None and m in held_bands:
                band_ok[offset : offset + n] = held_bands[m][offset : offset + n]
            held = band_ok[offset : offset + n]
            # a pixel is valid where every band the input holds is valid there
            pixel_ok = valid[held].all(0) if held.any() else np.zeros((h, w), bool)
            if mod.kind == "categorical":
                x = torch.from_numpy(np.where(pixel_ok, data[0], -1).astype(np.int64))
            else:
                held_data = data * held[:, None, None]
                stats = config.stats.get(mod.name, {})
                x = torch.from_numpy(normalise(held_data, stats, g.bands, mod.transform))
            batch[f"{m}/{g.name}"] = x[None]
            batch[f"{m}/{g.name}/valid"] = torch.from_numpy(pixel_ok.copy())[None]
            offset += n
        batch[f"{m}/bands"] = torch.from_numpy(band_ok)[None]
        if m in targets and m in input_names and mod.kind == "continuous":
            # band infilling: the bands the input holds are shown, the rest generated
            given[m] = {}
            off = 0
            for g in mod.groups:
                n = len(g.bands)
                mask = torch.from_numpy(band_ok[off : off + n].astype(np.float32))
                given[m][g.name] = mask[None, :, None, None]
                off += n
            if not band_ok.any():
                raise InputError(f"{m}: the input holds no valid pixel to infill from")
            if band_ok.all():
                raise InputError(f"{m}: every band is given; nothing to infill")
        available.append(have or m in targets)
    batch["available"] = torch.tensor([available])
    if location is not None:
        lon, lat = location
    else:
        lon, lat = work.center_lonlat()
    use_location = bool(input_names) or location is not None
    batch["location"] = torch.tensor([[lat, lon]], dtype=torch.float32)
    if not use_location:
        batch["location"] = torch.full((1, 2), float("nan"))
    batch["time"] = torch.tensor([[np.nan if days is None else days]], dtype=torch.float32)
    batch["gsd"] = torch.tensor([work.ground_resolution_m()], dtype=torch.float32)
    return batch, order, given


def _vector_result(name: str, gen, reg) -> TargetResult:
    v = gen.vector.float()
    if name == "location":
        lat, lon = location_from_vector(v)
        values = [
            {"lat": round(float(a), 5), "lon": round(float(o), 5)}
            for a, o in zip(lat, lon, strict=True)
        ]
        mod = Modality(name, "", "scalar", "", ())
    elif name == "time":
        days = time_from_vector(v)
        values = [(date(1970, 1, 1).toordinal() + int(round(float(d)))) for d in days]
        values = [date.fromordinal(o).isoformat() for o in values]
        mod = Modality(name, "", "scalar", "", ())
    else:
        mod = reg[name]
        probs = ((v + 1) / 2).clamp(0, 1)
        values = [
            {e.name: round(float(p), 3) for e, p in zip(mod.legend, row, strict=False)}
            for row in probs
        ]
    return TargetResult(mod, (), values=values)


def header_working_grid(
    grid: Grid, modality: str, bands: tuple[str, ...], registry, gsd: float | None = None
) -> Grid:
    """:func:`working_grid` of a first input known from its header only: its grid and the
    bands it holds (a zero-copy stand-in takes the place of its pixels)."""
    stub = np.broadcast_to(np.float32(0), (len(bands), grid.height, grid.width))
    layer = Layer(modality, bands, stub, grid.crs, grid.transform)
    return working_grid(Scene("header", "generic", "user", grid, [layer]), registry, gsd)


def working_grid(scene: Scene, registry, gsd: float | None = None) -> Grid:
    """The grid generation runs on: metres, at the model's native resolution for the first
    input (its own grid, refined where a band group needs it, when projected in metres),
    or at ``gsd`` metres over the same footprint."""
    first = scene.layers[0]
    ref = reference_grid([first], registry)
    if ref.crs.is_projected and (ref.crs.linear_units_factor or ("", 1.0))[1] == 1.0:
        if gsd is None:
            return ref
        k = gsd / ref.res[0]
        width, height = -(-ref.width // k), -(-ref.height // k)
        return Grid(ref.crs, ref.transform @ Affine.scale(k), int(width), int(height))
    gsd = gsd or ref.ground_resolution_m()
    lon, lat = first.grid.center_lonlat()
    crs = utm_crs(lon, lat)
    try:
        transform, width, height = calculate_default_transform(
            first.grid.crs,
            crs,
            first.grid.width,
            first.grid.height,
            *first.grid.bounds,
            resolution=gsd,
        )
    except GDAL_ERRORS as exc:
        raise InputError(
            f"{first.modality}: its grid cannot be projected to {crs} ({first_line(exc)})"
        ) from exc
    return Grid(crs, transform, int(width), int(height))


def utm_grid(lon: float, lat: float, size: int, gsd: float, width: int | None = None) -> Grid:
    crs = utm_crs(lon, lat)
    from rasterio.warp import transform as warp_transform

    x, y = warp_transform(CRS.from_epsg(4326), crs, [lon], [lat])
    side = (width or size) * gsd
    transform = Affine(gsd, 0, x[0] - side / 2, 0, -gsd, y[0] + side / 2)
    return Grid(crs, transform, width or size, width or size)


def padded_grid(grid: Grid, window: int) -> Grid:
    """``grid`` grown right and down to at least one window and a multiple of 4 px."""
    w = max(window, -(-grid.width // 4) * 4)
    h = max(window, -(-grid.height // 4) * 4)
    return Grid(grid.crs, grid.transform, w, h)


def _warp(
    data: np.ndarray,
    valid: np.ndarray,
    src: Grid,
    dst: Grid,
    mod: Modality,
    force: str | None = None,
) -> np.ndarray:
    """(C, h, w) on ``src`` -> (C, H, W) float32 on ``dst``; NaN where nothing lands."""
    if data.ndim == 2:
        data = data[None]
    if valid.ndim == 2:
        valid = np.broadcast_to(valid, data.shape)
    nearest = mod.kind == "categorical" and force is None
    resampling = Resampling.nearest if nearest else Resampling.bilinear
    warped, ok = warp_to_grid(data, valid, src.transform, src.crs, dst, resampling)
    return np.where(ok, warped, np.nan).astype(np.float32)


def _write_target(folder: Path, name: str, res: TargetResult, grid: Grid) -> list[Path]:
    """Cloud-optimised GeoTIFFs of one target: a file per sample, and its statistics."""
    mod = res.modality
    if res.samples is None:  # one-token modality: JSON only
        path = folder / f"{name}.json"
        path.write_text(json.dumps({"modality": name, "samples": res.values}, indent=2))
        return [path]
    profile = dict(width=grid.width, height=grid.height, crs=grid.crs, transform=grid.transform)
    written = []

    def write(path: Path, arr: np.ndarray, descriptions: list[str], nodata, tags: dict) -> None:
        dtype = "float32" if arr.dtype.kind == "f" else "int32"
        if mod.kind == "categorical" and arr.dtype.kind != "f":
            dtype = "uint8" if arr.max(initial=0) < 256 and nodata < 256 else "int32"
        options = cog_options(dtype, categorical=dtype != "float32")
        with rasterio.open(
            path, "w", count=arr.shape[0], dtype=dtype, nodata=nodata, **profile, **options
        ) as dst:
            dst.write(arr.astype(dtype))
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)
            dst.update_tags(**tags)
        written.append(path)

    base_tags = {"modality": name, "units": mod.units or "", "generator": "terrasynth"}
    if mod.kind == "categorical":
        legend = {str(e.code): e.name for e in mod.legend}
        for i, s in enumerate(res.samples):
            write(
                folder / f"{name}_sample{i}.tif",
                s,
                [name],
                res.nodata,
                {**base_tags, "sample": str(i), "legend": json.dumps(legend)},
            )
        write(
            folder / f"{name}_probs.tif",
            res.probs,
            [e.name for e in mod.legend],
            np.nan,
            {**base_tags, "units": "probability"},
        )
        write(
            folder / f"{name}_entropy.tif",
            res.entropy[None],
            ["entropy"],
            np.nan,
            {**base_tags, "units": "nats"},
        )
        return written
    bands = list(res.bands)
    extra = {"given_bands": ",".join(res.given_bands)} if res.given_bands else {}
    for i, s in enumerate(res.samples):
        write(
            folder / f"{name}_sample{i}.tif",
            s,
            bands,
            np.nan,
            {**base_tags, "sample": str(i), **extra},
        )
    write(folder / f"{name}_mean.tif", res.mean, bands, np.nan, {**base_tags, **extra})
    write(folder / f"{name}_std.tif", res.std, bands, np.nan, {**base_tags, **extra})
    return written


def _now() -> float:
    return time.perf_counter()


__all__ = ["GeoArray", "Generation", "Pipeline", "TargetResult", "default_model_path"]
