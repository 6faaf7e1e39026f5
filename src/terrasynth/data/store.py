"""The chip store: a zarr v3 group of chip arrays plus a parquet table of chip metadata.

Layout (see docs/store.md)::

    STORE/
      zarr.json                         attrs: format version, chip size, registry snapshot,
                                        statistics, split config, sources and licences
      chips.parquet                     one row per chip: ids, source, licence, CRS,
                                        transform, GSD, lon/lat, time, split, block,
                                        has_<modality> availability flags
      <modality>/<group>/data           (N, C, h, w) float32 (class index for categorical)
      <modality>/<group>/valid          (N, h, w) bool, pixel validity of available bands
      <modality>/bands                  (N, C_total) bool, band-level availability
      <modality>/labels                 (N, K) bool, image-level labels (multilabel kinds)

Chips of one source are contiguous, so the chunks of a modality a source lacks are never
written (zarr skips chunks equal to the fill value). A store is built in a temporary folder
next to the target and renamed into place only when complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from terrasynth.atomic import check_output, discard_folder, finish_folder, start_folder
from terrasynth.data.chips import Chip
from terrasynth.data.raster_io import first_line
from terrasynth.data.scene import Scene
from terrasynth.data.split import SPLITS, SplitConfig
from terrasynth.data.stats import StatsAccumulator
from terrasynth.errors import TerrasynthError
from terrasynth.modalities import Registry

FORMAT_VERSION = 1
CHUNK_CHIPS = 64
TABLE = "chips.parquet"
MAX_CHUNK_BYTES = 256 * 2**20  # a chunk whose metadata declares more is refused unread
# what zarr, its codecs and pyarrow raise for damaged metadata, chunks or tables
# (pyarrow's ArrowInvalid is a ValueError, its ArrowIOError an OSError)
STORE_ERRORS = (ValueError, TypeError, RuntimeError, OSError, KeyError, AttributeError)
# attributes every store has, with their types
MAX_CHIP_SIZE = 4096
STORE_ATTRS = {"chip_size": int, "modalities": dict, "stats": dict, "sources": dict}


def _epoch_days(t: datetime | None) -> float:
    if t is None:
        return float("nan")
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (t - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() / 86400.0


def _crs_text(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


class StoreWriter:
    """Appends chips to a new store in a temporary folder; ``close()`` moves it into place."""

    def __init__(
        self,
        path: str | Path,
        registry: Registry,
        chip_size: int,
        split: SplitConfig,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        check_output(self.path, overwrite)  # an earlier store of terrasynth's, at most
        self.tmp = start_folder(self.path, "data build")
        self.registry = registry
        self.chip_size = chip_size
        self.split = split
        self.root = zarr.open_group(str(self.tmp), mode="a")  # "w" would drop the marker
        self.rows: list[dict[str, Any]] = []
        self.buffer: list[tuple[Chip, Scene]] = []
        self.n_written = 0
        self.modalities: list[str] = []
        self.stats = StatsAccumulator(seed=split.seed)
        self.sources: dict[str, dict[str, Any]] = {}

    # -- writing ---------------------------------------------------------------------------
    def add(self, chip: Chip, scene: Scene) -> None:
        for mod in list(chip.band_available) + list(scene.labels):
            if mod not in self.modalities:
                self._create_modality(mod)
        self.buffer.append((chip, scene))
        if len(self.buffer) == CHUNK_CHIPS:
            self._flush()

    def _create_modality(self, name: str) -> None:
        mod = self.registry[name]
        n = self.n_written
        g = self.root.require_group(name)
        if mod.kind == "multilabel":
            g.create_array(
                "labels",
                shape=(n, mod.num_classes),
                chunks=(CHUNK_CHIPS, mod.num_classes),
                dtype=bool,
                fill_value=False,
            )
        for group in mod.groups:
            h = self.chip_size // group.factor
            dtype = "uint8" if mod.kind == "categorical" and mod.num_classes < 256 else "float32"
            g.create_array(
                f"{group.name}/data",
                shape=(n, len(group.bands), h, h),
                chunks=(CHUNK_CHIPS, len(group.bands), h, h),
                dtype=dtype,
                fill_value=0,
            )
            g.create_array(
                f"{group.name}/valid",
                shape=(n, h, h),
                chunks=(CHUNK_CHIPS, h, h),
                dtype=bool,
                fill_value=False,
            )
        if mod.groups:
            g.create_array(
                "bands",
                shape=(n, len(mod.bands)),
                chunks=(CHUNK_CHIPS, len(mod.bands)),
                dtype=bool,
                fill_value=False,
            )
        self.modalities.append(name)

    def _flush(self) -> None:
        if not self.buffer:
            return
        b = len(self.buffer)
        start, stop = self.n_written, self.n_written + b
        for name in self.modalities:
            mod = self.registry[name]
            if mod.kind == "multilabel":
                arr = self.root[f"{name}/labels"]
                labels = np.zeros((b, mod.num_classes), bool)
                index = {e.code: i for i, e in enumerate(mod.legend)}
                for i, (_, scene) in enumerate(self.buffer):
                    for code in scene.labels.get(name, []):
                        labels[i, index[code]] = True
                arr.resize((stop, mod.num_classes))
                arr[start:stop] = labels
            for group in mod.groups:
                data_arr = self.root[f"{name}/{group.name}/data"]
                valid_arr = self.root[f"{name}/{group.name}/valid"]
                h = self.chip_size // group.factor
                data = np.zeros((b, len(group.bands), h, h), data_arr.dtype)
                valid = np.zeros((b, h, h), bool)
                for i, (chip, _) in enumerate(self.buffer):
                    got = chip.groups.get((name, group.name))
                    if got is None:
                        continue
                    d, v = got
                    avail = np.array([chip.band_available[name][bd] for bd in group.bands])
                    data[i] = np.where(v, d, 0).astype(data_arr.dtype)
                    valid[i] = v[avail].all(axis=0)
                    self.stats.add(mod, group.bands, d, v & avail[:, None, None], chip.split)
                data_arr.resize((stop, *data_arr.shape[1:]))
                data_arr[start:stop] = data
                valid_arr.resize((stop, h, h))
                valid_arr[start:stop] = valid
            if mod.groups:
                bands_arr = self.root[f"{name}/bands"]
                bands = np.zeros((b, len(mod.bands)), bool)
                for i, (chip, _) in enumerate(self.buffer):
                    for j, bd in enumerate(mod.bands):
                        bands[i, j] = chip.band_available.get(name, {}).get(bd, False)
                bands_arr.resize((stop, len(mod.bands)))
                bands_arr[start:stop] = bands
        for chip, scene in self.buffer:
            self.rows.append(self._row(chip, scene))
        self.n_written = stop
        self.buffer.clear()

    def _row(self, chip: Chip, scene: Scene) -> dict[str, Any]:
        t = chip.grid.transform
        src = self.sources.setdefault(
            scene.source, {"licence": scene.licence, "chips": 0, "scenes": set()}
        )
        src["chips"] += 1
        src["scenes"].add(scene.scene_id)
        row: dict[str, Any] = {
            "chip_id": f"{scene.scene_id}#{chip.index_in_scene}",
            "scene_id": scene.scene_id,
            "source": scene.source,
            "licence": scene.licence,
            "crs": _crs_text(chip.grid.crs),
            "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
            "gsd_m": chip.grid.ground_resolution_m(),
            "lon": chip.lon,
            "lat": chip.lat,
            "time_days": _epoch_days(scene.time),
            "split": chip.split,
            "block_x": chip.block[0],
            "block_y": chip.block[1],
        }
        for name in self.modalities:
            row[f"has_{name}"] = name in chip.band_available or name in scene.labels
        return row

    def close(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        """Finish the store and move it into place; returns its path."""
        self._flush()
        if self.n_written == 0:
            self.abort()
            raise TerrasynthError("no chip had enough valid pixels: nothing to store")
        table = pd.DataFrame(self.rows)
        for name in self.modalities:
            col = f"has_{name}"
            table[col] = table[col].fillna(False).astype(bool) if col in table else False
        table.to_parquet(self.tmp / TABLE, index=False)
        present = {n: self.registry[n].to_dict() for n in self.modalities}
        sources = {
            k: {"licence": v["licence"], "chips": v["chips"], "scenes": len(v["scenes"])}
            for k, v in self.sources.items()
        }
        self.root.attrs.update(
            {
                "terrasynth_store": FORMAT_VERSION,
                "chip_size": self.chip_size,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "modalities": present,
                "stats": self.stats.result(),
                "split": self.split.to_dict(),
                "sources": sources,
                **(extra_attrs or {}),
            }
        )
        return finish_folder(self.tmp, self.path, self.overwrite)

    def abort(self) -> None:
        """Remove the partial store."""
        discard_folder(self.tmp)


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> float:
    return float(np.prod(shape, dtype=np.float64)) * dtype.itemsize


@dataclass
class ChipStore:
    """Read access to a built store."""

    path: Path
    root: zarr.Group
    table: pd.DataFrame

    @classmethod
    def open(cls, path: str | Path) -> ChipStore:
        """The store at ``path``; a missing, damaged or foreign one is a :class:`TerrasynthError`
        (its metadata and table are checked here, its chunks when read)."""
        path = Path(path)
        if not (path / TABLE).exists() or not (path / "zarr.json").exists():
            raise TerrasynthError(f"{path}: not a terrasynth chip store")
        try:
            root = zarr.open_group(str(path), mode="r")
            attrs = dict(root.attrs)
            table = pd.read_parquet(path / TABLE)
        except STORE_ERRORS as exc:
            raise TerrasynthError(
                f"{path}: damaged chip store (unreadable metadata or table: {first_line(exc)})"
            ) from exc
        if attrs.get("terrasynth_store") != FORMAT_VERSION:
            raise TerrasynthError(f"{path}: unsupported store format version")
        for key, kind in STORE_ATTRS.items():
            if not isinstance(attrs.get(key), kind) or attrs.get(key) is True:
                raise TerrasynthError(f"{path}: damaged chip store (attribute '{key}')")
        if not 0 < attrs["chip_size"] <= MAX_CHIP_SIZE:
            raise TerrasynthError(f"{path}: damaged chip store (chip size {attrs['chip_size']})")
        need = {"split", "scene_id", "source"} | {f"has_{m}" for m in attrs["modalities"]}
        missing = sorted(need - set(table.columns))
        if missing:
            raise TerrasynthError(f"{path}: damaged chip store (table lacks {', '.join(missing)})")
        store = cls(path, root, table)
        try:
            store.registry  # noqa: B018 (its modalities' entries are checked here)
        except (TerrasynthError, *STORE_ERRORS) as exc:
            raise TerrasynthError(
                f"{path}: damaged chip store (modality entries: {first_line(exc)})"
            ) from exc
        return store

    def __len__(self) -> int:
        return len(self.table)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    @property
    def chip_size(self) -> int:
        return int(self.root.attrs["chip_size"])

    @cached_property
    def registry(self) -> Registry:
        """The registry entries of the modalities in this store, as they were at build time."""
        return Registry.from_dict({"modalities": self.root.attrs["modalities"]})

    def _row_shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of one chip's row of array ``key`` (None for a key of another kind)."""
        parts = key.split("/")
        if parts[0] not in self.registry.modalities:
            return None
        mod = self.registry[parts[0]]
        if parts[1:] == ["bands"]:
            return (len(mod.bands),)
        if parts[1:] == ["labels"]:
            return (mod.num_classes,)
        group = next((g for g in mod.groups if parts[1:2] == [g.name]), None)
        if group is None or len(parts) != 3:
            return None
        side = self.chip_size // group.factor
        return (len(group.bands), side, side) if parts[2] == "data" else (side, side)

    @property
    def modalities(self) -> list[str]:
        return list(self.root.attrs["modalities"])

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self.root.attrs["stats"])

    def available(self, modality: str) -> np.ndarray:
        return self.table[f"has_{modality}"].to_numpy(bool)

    def indices(self, split: str | None = None) -> np.ndarray:
        if split is None:
            return np.arange(len(self))
        if split not in SPLITS:
            raise TerrasynthError(f"unknown split '{split}' (splits: {', '.join(SPLITS)})")
        return np.flatnonzero(self.table["split"].to_numpy() == split)

    def array(self, key: str) -> zarr.Array:
        """Array ``key``, its metadata checked: one row per chip, chunks of bounded size."""
        try:
            arr = self.root[key]
        except STORE_ERRORS as exc:
            raise TerrasynthError(
                f"{self.path}: array {key} missing or damaged ({first_line(exc)})"
            ) from exc
        row = self._row_shape(key)
        if (
            not isinstance(arr, zarr.Array)
            or arr.shape[:1] != (len(self),)
            or (row is not None and arr.shape[1:] != row)
            or _nbytes(arr.chunks, arr.dtype) > MAX_CHUNK_BYTES
            or _nbytes((arr.chunks[0], *arr.shape[1:]), arr.dtype) > MAX_CHUNK_BYTES
        ):
            raise TerrasynthError(
                f"{self.path}: array {key} is not this store's (damaged metadata: "
                f"shape {getattr(arr, 'shape', '?')}, chunks {getattr(arr, 'chunks', '?')})"
            )
        return arr

    def read(self, key: str, rows: Any, orthogonal: bool = False) -> np.ndarray:
        """Rows ``rows`` (an index, a slice; with ``orthogonal`` an index per axis) of array
        ``key``; a damaged or truncated chunk is a :class:`TerrasynthError`."""
        arr = self.array(key)
        try:
            return arr.oindex[rows] if orthogonal else arr[rows]
        except STORE_ERRORS as exc:
            raise TerrasynthError(
                f"{self.path}: cannot read {key} (damaged or truncated chunk?): {first_line(exc)}"
            ) from exc

    def source_summary(self, source: str) -> dict[str, Any]:
        """One source: licence, scenes, chips per split, modalities with their bands, dates."""
        t = self.table
        rows = (t["source"] == source).to_numpy()
        sub = t[rows]
        registry = self.registry
        modalities: dict[str, list[str]] = {}
        for m in self.modalities:
            has = sub[f"has_{m}"].to_numpy(bool)
            if not has.any():
                continue
            mod = registry[m]
            if mod.groups:
                picked = np.flatnonzero(rows)[has]
                present = self.read(f"{m}/bands", (picked, slice(None)), True).any(axis=0)
                modalities[m] = [b for b, p in zip(mod.bands, present, strict=True) if p]
            else:
                modalities[m] = []
        days = sub["time_days"].dropna()
        dates = sorted({str(d.date()) for d in pd.to_datetime(days, unit="D")})
        return {
            "licence": self.root.attrs["sources"][source]["licence"],
            "scenes": int(sub["scene_id"].nunique()),
            "chips": int(len(sub)),
            "splits": {s: int((sub["split"] == s).sum()) for s in SPLITS},
            "modalities": modalities,
            "dates": {
                "count": len(dates),
                "first": dates[0] if dates else None,
                "last": dates[-1] if dates else None,
            },
        }

    def summary(self) -> dict[str, Any]:
        """Counts per modality and split, for ``terrasynth data info``."""
        t = self.table
        per_mod = {
            m: {s: int((t[f"has_{m}"] & (t["split"] == s)).sum()) for s in SPLITS}
            for m in self.modalities
        }
        return {
            "chips": len(t),
            "chip_size": self.chip_size,
            "splits": {s: int((t["split"] == s).sum()) for s in SPLITS},
            "modalities": per_mod,
            "sources": {name: self.source_summary(name) for name in self.root.attrs["sources"]},
            "crs": sorted(t["crs"].unique().tolist()),
            "gsd_m": sorted({round(float(g), 2) for g in t["gsd_m"]}),
        }
