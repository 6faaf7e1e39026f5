"""A whole-scene generation job: tiles through phases, state on disk, resumable.

A job lives in a work folder:

* ``job.json``: every setting, the input files' sizes and times, the working grid;
* ``state.zarr``: the inputs aligned onto the working grid (``conditions/``), two buffers
  of the targets' noisy state (``buf0/``, ``buf1/``: step ``i`` reads one and writes the
  other) and the finished x0 and class probabilities (``final/``, ``probs/``);
* ``done/PHASE/TILE``: one empty file per finished task, written after its data.

Phases run in order: ``prepare`` (read the inputs under each tile), then ``step0`` ..
``step{S-1}`` (one sampling step: a tile's next state from its region of the current
state, see ``terrasynth.scenes.plan``). Tasks of one phase are independent, so any engine
may run them in any order and on any number of workers; a task only ever writes its own
tile's chunks, and its marker after them, so a killed job resumes at the first unfinished
task and redoes nothing else. Every task is a deterministic function of the seed and the
files, so a resumed or distributed job gives the same arrays as one uninterrupted run.
Finally :meth:`SceneJob.assemble` streams the finished arrays into tiled GeoTIFFs with
overviews, written into a temporary folder that is renamed into place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from rasterio.windows import Window

from terrasynth.arrays import input_header
from terrasynth.atomic import clear_folder, write_marker, write_text
from terrasynth.data.align import AlignedGroup
from terrasynth.data.raster_io import cropped_grid
from terrasynth.data.remote import RasterPath, RemotePath, raster_path
from terrasynth.data.scene import Grid
from terrasynth.errors import InputError, TerrasynthError, UnknownModalityError
from terrasynth.models.base import sampling_steps
from terrasynth.models.signals import batch_signals
from terrasynth.pipeline import (
    VECTOR_NAMES,
    Pipeline,
    days_since_epoch,
    header_working_grid,
    padded_grid,
    scene_batch,
    utm_grid,
)
from terrasynth.sampling.flow import FlowSampler
from terrasynth.sampling.windows import blend_x0, scene_seed, start_noise, step_noise
from terrasynth.scenes.inputs import InputFile, open_inputs, read_region
from terrasynth.scenes.plan import Box, ScenePlan, check_tile


@dataclass
class JobSpec:
    """What a whole-scene job generates; saved in ``job.json`` and compared on resume."""

    inputs: list[tuple[str, str]]
    targets: list[str]
    num_samples: int = 1
    seed: int = 0
    steps: int | None = None  # None: the model's own
    eta: float = 0.0
    guidance: float = 1.0
    scaling: dict[str, tuple[float, float]] = field(default_factory=dict)
    time: str | None = None
    location: tuple[float, float] | None = None  # lon, lat (joint generation)
    size: int | None = None  # joint generation: px per side
    gsd: float | None = None  # joint generation: metres per px
    tile: int = 256
    batch_size: int = 64
    strict: bool = False
    cascade: float | None = None  # coarse GSD (m) generated first, then refined
    cascade_start: float = 0.6  # noise level the fine level starts at from its parent
    window: tuple[int, int, int, int] | None = None  # col, row, width, height of input 1

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobSpec:
        """The inverse of :meth:`to_json`."""
        d = dict(d)
        d["inputs"] = [tuple(x) for x in d["inputs"]]
        d["scaling"] = {k: tuple(v) for k, v in d["scaling"].items()}
        d["location"] = tuple(d["location"]) if d["location"] else None
        d["window"] = tuple(d["window"]) if d.get("window") else None
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [[k, str(raster_path(p).resolve())] for k, p in self.inputs]
        d["scaling"] = {k: list(v) for k, v in sorted(self.scaling.items())}
        d["location"] = list(self.location) if self.location is not None else None
        d["window"] = list(self.window) if self.window is not None else None
        return d


def _file_signature(path: RasterPath) -> list[Any]:
    """A local file's path, size and time; a network location's address (its server
    keeps no time GDAL reports)."""
    if isinstance(path, RemotePath):
        return [path.url, None, None]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


class SceneJob:
    """Plan, state and tasks of one whole-scene job (see the module docstring)."""

    def __init__(
        self,
        pipeline: Pipeline,
        spec: JobSpec,
        folder: str | Path,
        grid: Grid | None = None,
        parent: SceneJob | None = None,
    ) -> None:
        """``grid``: the working grid, when not the inputs' (a cascade's coarse level);
        ``parent``: the finished coarse level this job refines."""
        self.pipe = pipeline
        self.grid_override = grid
        self.model = pipeline.model
        self.cfg = self.model.config
        self.spec = replace(spec, steps=sampling_steps(self.model, spec.steps))
        self.folder = Path(folder)
        self._check_targets()
        check_tile(spec.tile, self.cfg.window_size)
        reg = self.cfg.registry
        self.files: list[InputFile] = []
        self.warnings: list[str] = []
        if spec.inputs:
            region = None
            if spec.window is not None:  # only this part of the first input
                first_grid = input_header(spec.inputs[0][1], spec.inputs[0][0]).grid
                region = cropped_grid(first_grid, Window(*spec.window))
            self.files, self.warnings = open_inputs(
                spec.inputs, reg, spec.scaling, spec.strict, region
            )
            first = self.files[0]
            # only the first input's grid and bands decide the working grid; its pixels are
            # read tile by tile later
            part = region if region is not None else first.grid
            self.grid = header_working_grid(part, first.modality, first.bands, reg, spec.gsd)
        else:
            if spec.location is None:
                raise InputError("whole-scene joint generation needs a place (--lon/--lat)")
            lon, lat = spec.location
            self.grid = utm_grid(lon, lat, spec.size or 2 * self.cfg.window_size, spec.gsd or 10.0)
        if grid is not None:
            self.grid = grid
        self.work = padded_grid(self.grid, self.cfg.window_size)
        size = self.cfg.window_size
        factors = [g.factor for n in self.raster_names for g in reg[n].groups]
        stride = max(self.cfg.stride, max(factors))
        self.plan = ScenePlan(self.work.height, self.work.width, size, stride, spec.tile)
        self.input_names = {f.modality for f in self.files}
        self.held = self._held_bands()
        self.days = days_since_epoch(spec.time)
        self.location = spec.location if spec.location is not None else self.work.center_lonlat()
        self.gsd = self.work.ground_resolution_m()
        self.seed = scene_seed(torch.Generator().manual_seed(spec.seed))
        self.sampler = FlowSampler(steps=self.spec.steps, eta=spec.eta)
        self.parent = None
        if parent is not None:
            self.refine(parent)
        self._store: zarr.Group | None = None

    def refine(self, parent: SceneJob) -> SceneJob:
        """Make this job the fine level of a cascade over ``parent`` (a finished job on the
        same footprint with pixels an integer factor coarser): sampling starts at level
        ``cascade_start`` from the parent's up-sampled result."""
        k = parent.gsd / self.gsd
        if abs(k - round(k)) > 1e-6 or round(k) < 2:
            raise InputError(
                f"a cascade's coarse GSD must be 2, 3, 4... times the working GSD "
                f"({self.gsd:g} m), not {parent.gsd:g} m"
            )
        self.parent, self.cascade_factor = parent, round(k)
        self.sampler = replace(self.sampler, start=self.spec.cascade_start)
        return self

    # -- set-up ----------------------------------------------------------------------------
    @property
    def raster_names(self) -> list[str]:
        """Modalities with rasters in this job: the inputs' and the targets'."""
        names = [f.modality for f in self.files] + list(self.spec.targets)
        return list(dict.fromkeys(names))

    def _check_targets(self) -> None:
        reg = self.cfg.registry
        if not self.spec.targets:
            raise TerrasynthError("no target modality given (use --target MOD)")
        for t in self.spec.targets:
            if t not in self.model.modality_names:
                raise UnknownModalityError(
                    f"the model cannot generate '{t}' "
                    f"(it knows: {', '.join(self.model.modality_names)})"
                )
            if t in VECTOR_NAMES or not reg[t].is_raster:
                raise InputError(
                    f"whole-scene generation makes rasters; '{t}' is one value per scene "
                    "(generate it on a scene of at most 1024 px)"
                )
        for key, _ in self.spec.inputs:
            if key.partition(":")[0] not in self.model.modality_names:
                raise UnknownModalityError(
                    f"the model does not know input modality '{key.partition(':')[0]}'"
                )
        if self.spec.num_samples < 1 or self.spec.steps < 1:
            raise TerrasynthError("num_samples and steps must be at least 1")

    def _held_bands(self) -> dict[str, np.ndarray]:
        """Per input modality, which of its bands the files hold (decided once per job)."""
        reg = self.cfg.registry
        held: dict[str, np.ndarray] = {}
        for f in self.files:
            mod = reg[f.modality]
            mask = held.setdefault(f.modality, np.zeros(len(mod.bands), bool))
            mask |= np.isin(np.array(mod.bands), np.array(f.bands))
        for m in set(held) & set(self.spec.targets):
            if reg[m].kind == "continuous" and held[m].all():
                raise InputError(f"{m}: every band is given; nothing to infill")
        return held

    def signature(self) -> dict[str, Any]:
        """What must match for a work folder to be resumed: settings, files, model (its
        folder and the sha256 of its weights and of its config)."""

        def grid_json(g: Grid) -> dict[str, Any]:
            return {
                "crs": g.crs.to_string(),
                "transform": list(g.transform)[:6],
                "width": g.width,
                "height": g.height,
            }

        return {
            "spec": self.spec.to_json(),
            "grid_override": grid_json(self.grid_override) if self.grid_override else None,
            "parent": str(self.parent.folder.resolve()) if self.parent is not None else None,
            "files": [_file_signature(f.path) for f in self.files],
            "model": self.pipe.source,
            "weights_sha256": self.pipe.weights_sha256,
            "config_sha256": self.pipe.config_sha256,
            # tiles of one scene are made in one precision (a resume in another is refused)
            "precision": self.pipe.precision,
            "grid": grid_json(self.work),
        }

    def open(self, overwrite: bool = False) -> SceneJob:
        """Create the work folder, or reopen it to resume the same job.

        A work folder is only ever cleared if terrasynth wrote it (its marker)."""
        sig_path = self.folder / "job.json"
        if sig_path.exists() and not overwrite:
            found = json.loads(sig_path.read_text())
            if found != json.loads(json.dumps(self.signature())):
                raise TerrasynthError(
                    f"{self.folder} holds the unfinished state of a different job "
                    "(other settings, files or model); use --overwrite to discard it"
                )
            self._store = zarr.open_group(str(self.folder / "state.zarr"), mode="r+")
            return self
        clear_folder(self.folder)  # keeps the lock of the run holding it
        self.folder.mkdir(parents=True, exist_ok=True)
        write_marker(self.folder, "generate (whole-scene work folder)")
        self._create_arrays()
        # job.json last: a folder without it is never resumed
        write_text(sig_path, json.dumps(self.signature(), indent=2))
        return self

    def _create_arrays(self) -> None:
        store = zarr.open_group(str(self.folder / "state.zarr"), mode="w")
        reg = self.cfg.registry
        tile, n = self.plan.tile, self.spec.num_samples

        def make(path: str, shape: tuple, dtype: str, compress: bool, factor: int) -> None:
            *parents, name = path.split("/")
            grp = store
            for p in parents:
                grp = grp.require_group(p)
            kwargs: dict[str, Any] = {} if compress else {"compressors": None}
            chunks = (*shape[:-2], *(min(tile // factor, s) for s in shape[-2:]))
            grp.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, **kwargs)

        for m in self.input_names:
            for g in reg[m].groups:
                grid = self.work.scaled(g.factor)
                shape = (len(g.bands), grid.height, grid.width)
                make(f"conditions/{m}/{g.name}/data", shape, "float32", True, g.factor)
                make(f"conditions/{m}/{g.name}/valid", shape, "bool", True, g.factor)
        for t in self.spec.targets:
            mod = reg[t]
            for g in mod.groups:
                grid = self.work.scaled(g.factor)
                c = mod.num_classes if mod.kind == "categorical" else len(g.bands)
                shape = (n, c, grid.height, grid.width)
                for buf in ("buf0", "buf1", "final"):
                    make(f"{buf}/{t}/{g.name}", shape, "float32", False, g.factor)
                if mod.kind == "categorical":
                    make(f"probs/{t}/{g.name}", shape, "float32", False, g.factor)
        self._store = store

    @property
    def store(self) -> zarr.Group:
        if self._store is None:
            self._store = zarr.open_group(str(self.folder / "state.zarr"), mode="r+")
        return self._store

    # -- tasks -----------------------------------------------------------------------------
    def phases(self) -> list[str]:
        prepare = ["prepare"] if self.files else []
        return prepare + [f"step{i}" for i in range(self.spec.steps)]

    def tiles(self) -> dict[str, Box]:
        return {t.key: t for t in self.plan.tiles()}

    def pending(self, phase: str) -> list[str]:
        """Keys of the tiles whose task in ``phase`` has not finished."""
        done_dir = self.folder / "done" / phase
        done = {p.name for p in done_dir.iterdir()} if done_dir.exists() else set()
        return [k for k in self.tiles() if k not in done]

    def run_task(self, phase: str, key: str) -> None:
        """Run one task and mark it done (the marker is written after the data)."""
        tile = self.tiles()[key]
        if phase == "prepare":
            self._prepare(tile)
        else:
            self._step(int(phase.removeprefix("step")), tile)
        marker = self.folder / "done" / phase / key
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def _prepare(self, tile: Box) -> None:
        grid = self.work.window(tile.col, tile.row, tile.width, tile.height)
        groups = read_region(self.files, grid, self.cfg.registry)
        for (m, g), ag in groups.items():
            f = self.cfg.registry[m].group(g).factor
            rows, cols = tile.scaled(f)
            self.store[f"conditions/{m}/{g}/data"][:, rows, cols] = ag.data
            self.store[f"conditions/{m}/{g}/valid"][:, rows, cols] = ag.valid

    def conditions(self, box: Box) -> dict[tuple[str, str], AlignedGroup]:
        """The aligned inputs under ``box``, read from the work folder."""
        out = {}
        for m in self.input_names:
            for g in self.cfg.registry[m].groups:
                rows, cols = box.scaled(g.factor)
                grid = self.work.window(box.col, box.row, box.width, box.height).scaled(g.factor)
                data = self.store[f"conditions/{m}/{g.name}/data"][:, rows, cols]
                valid = self.store[f"conditions/{m}/{g.name}/valid"][:, rows, cols]
                out[(m, g.name)] = AlignedGroup(g.bands, data, valid.astype(bool), grid)
        return out

    def _state(self, step: int, region: Box) -> dict[str, dict[str, torch.Tensor]]:
        """The targets' state at the start of ``step`` on ``region``: (N, C, h, w) each."""
        reg = self.cfg.registry
        n = self.spec.num_samples
        x: dict[str, dict[str, torch.Tensor]] = {}
        for t in self.spec.targets:
            x[t] = {}
            for g in reg[t].groups:
                f = g.factor
                rows, cols = region.scaled(f)
                if step == 0:
                    c = reg[t].num_classes if reg[t].kind == "categorical" else len(g.bands)
                    h, w = rows.stop - rows.start, cols.stop - cols.start
                    fields = [start_noise(self.seed, t, g.name, s, c) for s in range(n)]
                    noise = torch.stack([fld.crop(rows.start, cols.start, h, w) for fld in fields])
                    if self.parent is not None:  # a cascade: the parent, partly noised
                        t0 = self.sampler.start
                        noise = (1 - t0) * self._parent(t, g.name, rows, cols) + t0 * noise
                    x[t][g.name] = noise
                else:
                    arr = self.store[f"buf{step % 2}/{t}/{g.name}"]
                    x[t][g.name] = torch.from_numpy(arr[:, :, rows, cols])
        return x

    def _parent(self, target: str, group: str, rows: slice, cols: slice) -> torch.Tensor:
        """The parent level's x0 up-sampled (bilinear) onto rows/cols of this level's group
        grid. A coarse pixel of margin makes a crop equal to the same part of the whole
        scene up-sampled at once."""
        k = self.cascade_factor
        arr = self.parent.store[f"final/{target}/{group}"]
        hc, wc = arr.shape[-2:]
        r0, c0 = max(rows.start // k - 1, 0), max(cols.start // k - 1, 0)
        r1, c1 = min(-(-rows.stop // k) + 1, hc), min(-(-cols.stop // k) + 1, wc)
        crop = torch.from_numpy(arr[:, :, r0:r1, c0:c1])
        up = torch.nn.functional.interpolate(crop, scale_factor=k, mode="bilinear")
        dr, dc = rows.start - r0 * k, cols.start - c0 * k
        return up[..., dr : dr + rows.stop - rows.start, dc : dc + cols.stop - cols.start]

    @torch.no_grad()
    def _step(self, i: int, tile: Box) -> None:
        region = self.plan.region(tile)
        rgrid = self.work.window(region.col, region.row, region.width, region.height)
        targets = list(self.spec.targets)
        batch, order, given = scene_batch(
            self.cfg,
            self.conditions(region),
            rgrid,
            targets,
            self.location,
            self.days,
            self.input_names,
            self.held,
        )
        signals = batch_signals(batch, self.cfg, order)
        signals = {n: s for n, s in signals.items() if n in targets or bool(s.present.any())}
        reg = self.cfg.registry
        factors = {
            n: {g.name: g.factor for g in reg[n].groups} for n, s in signals.items() if s.groups
        }
        x = self._state(i, region)
        wins = [(r - region.row, c - region.col) for r, c in self.plan.windows(tile)]
        ts = self.sampler.timesteps()
        t, t_next = float(ts[i]), float(ts[i + 1])
        last = t_next <= 0
        acc, norm, probs = blend_x0(
            self.model, signals, targets, x, wins, t, self.gsd, factors,
            self.spec.guidance, given or None, self.spec.batch_size, with_probs=last,
        )  # fmt: skip
        inner = Box(tile.row - region.row, tile.col - region.col, tile.height, tile.width)
        for n in targets:
            for g, f in factors[n].items():
                rows, cols = inner.scaled(f)
                x0 = acc[n][g][..., rows, cols] / norm[n][g][..., rows, cols]
                keep = given.get(n, {}).get(g) if given else None
                if keep is not None:  # band infilling: given bands are the input's values
                    shown = keep[0, :, 0, 0] > 0
                    x0[:, shown] = signals[n].groups[g][:, shown][..., rows, cols]
                out_rows, out_cols = tile.scaled(f)
                if last:
                    self.store[f"final/{n}/{g}"][:, :, out_rows, out_cols] = x0.numpy()
                    if n in probs:
                        p = probs[n][g][..., rows, cols] / norm[n][g][..., rows, cols]
                        self.store[f"probs/{n}/{g}"][:, :, out_rows, out_cols] = p.numpy()
                    continue
                fresh = None
                if self.sampler.eta > 0:
                    c, h, w = x0.shape[1:]
                    fresh = torch.stack(
                        [
                            step_noise(self.seed, n, g, i, s, c).crop(
                                out_rows.start, out_cols.start, h, w
                            )
                            for s in range(self.spec.num_samples)
                        ]
                    )
                xt = x[n][g][..., rows, cols]
                nxt = self.sampler.step(x0, xt, t, t_next, None, fresh)
                self.store[f"buf{(i + 1) % 2}/{n}/{g}"][:, :, out_rows, out_cols] = nxt.numpy()

    def finished(self) -> bool:
        return all(not self.pending(p) for p in self.phases())
