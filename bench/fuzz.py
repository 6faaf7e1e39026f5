"""Fuzzing at scale: mutated real files through every reader, ``data build``, ``generate``
and ``evaluate``, each outcome classified.

Seeds are real files of ``../shared/data``: single GeoTIFFs (the generic mode of
``data build`` and ``generate``), whole source folders (every format reader: described
folders, BigEarthNet v1/v2, SSL4EO, Major TOM, EOPatch, FLAIR, band folders) and a chip
store built from a real source (``evaluate``). Each case copies one seed into a fresh folder
(hard links for the untouched files), mutates one file the readers read (truncation, byte
flips in the header and in the data, a zeroed block, appended garbage, an empty file, a
wrong band count, a NaN plane, absurd georeferencing, a huge declared size) and runs it

* through the readers in a worker process (one per job, reused across cases; a crash or
  a hang only costs a new worker), every case;
* through one command line (``data build``, ``generate`` or ``evaluate``, a fresh
  interpreter) for a sampled fraction of the cases (``--cli-fraction``).

Outcomes: ``ok``; ``error`` (a clean error: a TerrasynthError in the readers; exit status
non-zero with stderr holding exactly one ``error:`` line, after at most some ``warning:``
lines, and no traceback); ``traceback`` (any other exception, or other stderr); ``crash``
(killed by a signal); ``hang`` (past the timeout); ``leftover`` (files left in the case
folder besides the inputs and a successful output). Every case is reproducible on its own
from ``--seed`` and its number (``--case N --keep``). Processes run with their data
segment limited (``--memory-gib``), so an allocation sized by a value read from a file ends
as a traceback, not as the kernel's out-of-memory kill of someone else's job.

    python bench/fuzz.py --cases 10000 --seed 100 --jobs 2 --out fuzz-out
    python bench/fuzz.py --seed 100 --case 4711 --keep --out fuzz-case   # one case again
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUTCOMES = ("ok", "error", "traceback", "crash", "hang", "leftover")
FAILURES = ("traceback", "crash", "hang", "leftover")
READ_EXTS = {".tif", ".tiff", ".json", ".geojson", ".npy", ".parquet", ".mdb", ".csv", ""}


@dataclass(frozen=True)
class Seed:
    """One real input: a GeoTIFF (generic), a source folder (source) or a store (store)."""

    name: str
    kind: str
    path: str  # relative to DATA; the store seed is built under the work folder
    key: str = ""  # generic: MOD[:BANDS]
    target: str = ""  # generic: what generate makes from it
    options: tuple[str, ...] = ()  # generic: --scale and the like
    weight: float = 1.0


SEEDS = (
    Seed("dem_utm", "generic", "athabasca_hls_s30_l30_dem/dem_30m.tif", "dem", "s2l2a", weight=2),
    Seed("dem_lonlat", "generic", "rgbvisual_dem_rockymountains/rmnp_dem_m.tif", "dem", "s2l2a"),
    Seed(
        "s2_rgbn",
        "generic",
        "s2_patagonia/s2_10m_B02_B03_B04_nir.tif",
        "s2l2a:B02,B03,B04,B08",
        "dem",
        ("--scale", "s2l2a=0.0001"),
        weight=2,
    ),
    Seed(
        "s1_vv",
        "generic",
        "ssl4eo_s12/s1/0000200/S1A_IW_GRDH_1SDV_20200607T010800_20200607T010825_032904_03CFBA_D457/VV.tif",
        "s1grd:VV",
        "s2l2a",
    ),
    Seed("nlcd", "generic", "crops/nlcd_256.tif", "landcover_nlcd", "s2l2a", weight=2),
    Seed("togo", "source", "s1_s2l1c_srtm_monthly_togo"),
    Seed("athabasca", "source", "athabasca_hls_s30_l30_dem"),
    Seed("patagonia", "source", "s2_patagonia"),
    Seed("peru", "source", "s1_landsat8sr_peru"),
    Seed("bigearthnet_v1", "source", "bigearthnet_v1_examples"),
    Seed("bigearthnet_v2", "source", "bigearthnet_v2_lmdb", weight=0.25),
    Seed("eopatch", "source", "eolearn_eopatch", weight=0.5),
    Seed("flair", "source", "flair2"),
    Seed("ssl4eo", "source", "ssl4eo_s12"),
    Seed("majortom", "source", "majortom_core", weight=0.25),
    Seed("zion", "source", "zion_landsat8_srtm_nlcd", weight=0.25),
    Seed("store", "store", "store", weight=1.5),
)
# command lines each seed kind goes through
CLI_TARGETS = {"generic": ("build", "generate"), "source": ("build",), "store": ("evaluate",)}


# -- mutations -----------------------------------------------------------------------------
def _flip(rng: random.Random, data: bytearray, lo: int, hi: int, n: int) -> None:
    hi = min(hi, len(data))
    for _ in range(n if hi > lo else 0):
        data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)


def m_truncate(rng, data: bytearray, path: Path) -> bytes:
    return bytes(data[: rng.randrange(0, max(1, len(data)))])


def m_flip_header(rng, data: bytearray, path: Path) -> bytes:
    _flip(rng, data, 0, 1024, rng.randint(1, 8))
    return bytes(data)


def m_flip_data(rng, data: bytearray, path: Path) -> bytes:
    lo = 1024 if len(data) > 2048 else 0
    _flip(rng, data, lo, len(data), rng.randint(1, 64))
    return bytes(data)


def m_zero_block(rng, data: bytearray, path: Path) -> bytes:
    size = rng.choice((64, 512, 4096, 65536))
    start = rng.randrange(0, max(1, len(data)))
    data[start : start + size] = bytes(len(data[start : start + size]))
    return bytes(data)


def m_append_garbage(rng, data: bytearray, path: Path) -> bytes:
    return bytes(data) + rng.randbytes(rng.choice((1, 100, 4096, 65536)))


def m_empty(rng, data: bytearray, path: Path) -> bytes:
    return b""


def _rewrite_raster(path: Path, data: bytes, change) -> bytes:
    """The GeoTIFF ``data`` read and written again after ``change(profile, array)``."""
    import rasterio
    from rasterio.io import MemoryFile

    with MemoryFile(data) as mem, mem.open() as src:
        profile, array = src.profile, src.read()
        descriptions = src.descriptions
    profile, array = change(dict(profile), array)
    profile.update(count=array.shape[0], dtype=array.dtype.name, driver="GTiff")
    with MemoryFile() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an absurd transform is the point here
        with out.open(**profile) as dst, rasterio.Env(GTIFF_SRS_SOURCE="EPSG"):
            dst.write(array)
            if len(descriptions) == array.shape[0]:
                dst.descriptions = descriptions
        return out.read()


def m_wrong_bands(rng, data: bytearray, path: Path) -> bytes:
    import numpy as np

    def change(profile, array):
        if array.shape[0] > 1 and rng.random() < 0.5:
            return profile, array[: rng.randrange(1, array.shape[0])]
        extra = rng.randint(1, 3)
        return profile, np.concatenate([array, array[:1].repeat(extra, 0)])

    return _rewrite_raster(path, bytes(data), change)


def m_nan_plane(rng, data: bytearray, path: Path) -> bytes:
    import numpy as np

    def change(profile, array):
        if array.dtype.kind != "f":
            array = array.astype(np.float32)
        b = rng.randrange(array.shape[0])
        if rng.random() < 0.3:
            array[:] = np.nan
        else:
            array[b] = rng.choice((np.nan, np.inf, -np.inf))
        return profile, array

    return _rewrite_raster(path, bytes(data), change)


ABSURD_TRANSFORMS = (
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),  # zero pixel size
    (float("nan"), 0.0, 0.0, 0.0, -10.0, 0.0),
    (10.0, 0.0, 1e30, 0.0, -10.0, 1e30),  # origin beyond any CRS
    (1e-12, 0.0, 500000.0, 0.0, -1e-12, 0.0),  # a picometre pixel
    (1e9, 0.0, 0.0, 0.0, -1e9, 0.0),  # a pixel bigger than the Earth
    (-10.0, 0.0, 500000.0, 0.0, 10.0, 5000000.0),  # flipped axes
    (10.0, 5.0, 500000.0, 5.0, -10.0, 5000000.0),  # sheared
    (0.0, 10.0, 500000.0, 10.0, 0.0, 5000000.0),  # rotated 90 degrees
    (10.0, 10.0, 0.0, 10.0, 10.0, 0.0),  # singular, not zero
)
ABSURD_CRS = ("EPSG:4326", "EPSG:3857", "EPSG:32601", 'LOCAL_CS["arbitrary"]')


def m_absurd_georef(rng, data: bytearray, path: Path) -> bytes:
    from affine import Affine
    from rasterio.crs import CRS

    def change(profile, array):
        if rng.random() < 0.7:
            profile["transform"] = Affine(*rng.choice(ABSURD_TRANSFORMS))
        else:
            profile["crs"] = CRS.from_user_input(rng.choice(ABSURD_CRS))
        return profile, array

    return _rewrite_raster(path, bytes(data), change)


HUGE_SIZES = ((100_000, 100_000), (2**31 - 1, 1), (1, 2**31 - 1), (70_000, 70_000), (2_000, 2_000))


def set_tiff_size(data: bytes, width: int, height: int) -> bytes:
    """A TIFF whose first image's ImageWidth and ImageLength tags say ``width`` x ``height``
    (the strips or tiles stay as they were: a header that lies about the pixels)."""
    b = bytearray(data)
    end = "<" if b[:2] == b"II" else ">"
    big = struct.unpack(end + "H", b[2:4])[0] == 43
    if big:
        ifd = struct.unpack(end + "Q", b[8:16])[0]
        count, start, size = struct.unpack(end + "Q", b[ifd : ifd + 8])[0], ifd + 8, 20
    else:
        ifd = struct.unpack(end + "I", b[4:8])[0]
        count, start, size = struct.unpack(end + "H", b[ifd : ifd + 2])[0], ifd + 2, 12
    for i in range(count):
        e = start + i * size
        tag = struct.unpack(end + "H", b[e : e + 2])[0]
        if tag in (256, 257):
            value = width if tag == 256 else height
            packed = struct.pack(end + ("HQQ" if big else "HII"), 4, 1, value)
            b[e + 2 : e + size] = packed
    return bytes(b)


def set_npy_shape(data: bytes, shape: tuple[int, ...]) -> bytes:
    """A .npy file whose header declares ``shape`` (the data stay as they were)."""
    import io

    import numpy as np

    fmt = np.lib.format
    f = io.BytesIO(data)
    major, _ = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
    _, fortran, dtype = read(f)
    out = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran}
    np.lib.format.write_array_header_2_0(out, {**header, "shape": shape})
    return out.getvalue() + data[f.tell() :]


def m_huge_size(rng, data: bytearray, path: Path) -> bytes:
    width, height = rng.choice(HUGE_SIZES)
    if path.suffix.lower() in (".tif", ".tiff"):
        return set_tiff_size(bytes(data), width, height)
    if path.suffix == ".npy":
        return set_npy_shape(bytes(data), (rng.choice((1, 4)), height, width, 3))
    meta = json.loads(bytes(data))  # a zarr.json: its array shape and chunk shape
    if "shape" in meta:
        meta["shape"] = [meta["shape"][0], *[height] * (len(meta["shape"]) - 1)]
        if rng.random() < 0.5:
            meta["chunk_grid"]["configuration"]["chunk_shape"] = [height] * len(meta["shape"])
    else:
        meta.setdefault("attributes", {})["chip_size"] = height
    return json.dumps(meta).encode()


BYTE_MUTATIONS = {
    "truncate": m_truncate,
    "flip_header": m_flip_header,
    "flip_data": m_flip_data,
    "zero_block": m_zero_block,
    "append_garbage": m_append_garbage,
    "empty": m_empty,
}
RASTER_MUTATIONS = {
    "wrong_bands": m_wrong_bands,
    "nan_plane": m_nan_plane,
    "absurd_georef": m_absurd_georef,
}
MUTATIONS = {**BYTE_MUTATIONS, **RASTER_MUTATIONS, "huge_size": m_huge_size}


def mutations_for(path: Path) -> list[str]:
    """The mutations that apply to ``path``."""
    names = list(BYTE_MUTATIONS)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        names += [*RASTER_MUTATIONS, "huge_size"]
    elif suffix == ".npy" or (path.name == "zarr.json"):
        names.append("huge_size")
    return names


# -- cases ---------------------------------------------------------------------------------
@dataclass
class Case:
    number: int
    seed: str
    file: str  # relative to the case folder
    mutation: str
    cli: str | None
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # target -> outcome
    seconds: float = 0.0


def seed_root(seed: Seed, work: Path) -> Path:
    """Where a seed's original lies: the shared data, or the work folder for made seeds."""
    made = seed.kind == "store" or seed.path.startswith("crops/")
    return (work / "seeds" if made else DATA) / seed.path


def candidate_files(seed: Seed, work: Path) -> list[str]:
    root = seed_root(seed, work)
    if seed.kind == "generic":
        return [root.name]
    files = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in READ_EXTS and not p.name.startswith(".")
    )
    return files


def plan_case(number: int, master: int, cli_fraction: float, work: Path, files: dict) -> Case:
    """Case ``number`` of run ``master``: the same numbers give the same case."""
    rng = random.Random(f"{master}:{number}")
    seed = rng.choices(SEEDS, weights=[s.weight for s in SEEDS])[0]
    file = rng.choice(files[seed.name])
    mutation = rng.choice(mutations_for(Path(file)))
    cli = rng.choice(CLI_TARGETS[seed.kind]) if rng.random() < cli_fraction else None
    return Case(number, seed.name, file, mutation, cli)


def prepare(case: Case, master: int, work: Path, folder: Path) -> Path:
    """The case's inputs in ``folder`` (hard links, the mutated file a fresh copy); returns
    the input path (a file for generic seeds, a folder otherwise)."""
    seed = next(s for s in SEEDS if s.name == case.seed)
    root = seed_root(seed, work)
    rng = random.Random(f"{master}:{case.number}:mutate")
    if seed.kind == "generic":
        target = folder / Path(seed.path).name
        original = root
        top = target
    else:
        top = folder / root.name
        for path in root.rglob("*"):
            dest = top / path.relative_to(root)
            if path.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            elif not path.is_symlink():
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, dest)
        target = top / case.file
        original = root / case.file
        target.unlink()  # never write through a link into the shared data
    data = bytearray(original.read_bytes())
    target.write_bytes(MUTATIONS[case.mutation](rng, data, target))
    return top


def build_seeds(work: Path) -> None:
    """Seeds made from real data: a 256 px crop of the Zion NLCD land cover, and a store
    built from the Togo source."""
    import rasterio
    from rasterio.windows import Window

    crop = work / "seeds" / "crops" / "nlcd_256.tif"
    if not crop.exists():
        crop.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(DATA / "zion_landsat8_srtm_nlcd" / "nlcd2011.tif") as src:
            window = Window(400, 500, 256, 256)
            profile = {**src.profile, "width": 256, "height": 256}
            profile["transform"] = src.window_transform(window)
            with rasterio.open(crop, "w", **profile) as dst:
                dst.write(src.read(window=window))
    store = work / "seeds" / "store"
    if not store.exists():
        source = DATA / "s1_s2l1c_srtm_monthly_togo"
        done = cli_run(["data", "build", str(source), "-o", str(store)], work, 300)
        if done.returncode != 0:
            raise SystemExit(f"cannot build the store seed: {done.stderr}")


# -- running -------------------------------------------------------------------------------
def _limit(memory_gib: float):
    def apply() -> None:
        os.setsid()
        limit = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    return apply


LIMITS = {"memory_gib": 4.0}  # the data segment of every process the fuzzer starts


def cli_run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``terrasynth ARGS`` in a fresh interpreter; rc None on a timeout (process group killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "terrasynth.cli.main", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
        preexec_fn=_limit(LIMITS["memory_gib"]),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, None, out, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def classify_cli(done: subprocess.CompletedProcess) -> tuple[str, str]:
    if done.returncode is None:
        return "hang", "timeout"
    if done.returncode < 0:
        return "crash", f"signal {-done.returncode}"
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    if "Traceback" in done.stderr:
        return "traceback", " | ".join(lines[-3:])[:500]
    if done.returncode == 0:
        return "ok", ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    others = [ln for ln in lines if not ln.startswith(("error:", "warning:"))]
    if len(errors) == 1 and lines[-1] == errors[0] and not others:
        return "error", errors[0][:300]
    return "traceback", " | ".join(lines[-3:])[:500] or f"exit {done.returncode}, no error line"


def cli_args(case: Case, seed: Seed, top: Path, out: Path) -> list[str]:
    if case.cli == "evaluate":
        return ["evaluate", "-d", str(top), "-o", str(out), "--max-chips", "2", "-n", "1",
                "--steps", "1", "-t", "dem"]  # fmt: skip
    if case.cli == "build" and seed.kind == "source":
        return ["data", "build", str(top), "-o", str(out)]
    spec = f"{seed.key}={top}"
    if case.cli == "build":
        return ["data", "build", "--input", spec, *seed.options, "-o", str(out)]
    return ["generate", "-i", spec, "-t", seed.target, "-n", "1", "--steps", "1",
            *seed.options, "-o", str(out)]  # fmt: skip


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


class Worker:
    """A reader process, reused across cases; replaced after a crash or a hang."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=_limit(LIMITS["memory_gib"]),
        )

    def run(self, request: dict, timeout: float) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            return "hang", "timeout"
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            self.proc = None
            return "crash", f"exit {rc}" if rc >= 0 else f"signal {-rc}"
        reply = json.loads(line)
        return reply["outcome"], reply["detail"]

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
            self.proc = None


def run_case(case: Case, master: int, work: Path, worker: Worker, timeouts, keep: Path | None):
    seed = next(s for s in SEEDS if s.name == case.seed)
    folder = Path(tempfile.mkdtemp(prefix=f"case{case.number}-", dir=work / "cases"))
    t0 = time.perf_counter()
    try:
        top = prepare(case, master, work, folder)
        before = _listing(folder)
        request = {"kind": seed.kind, "path": str(top), "key": seed.key, "options": seed.options}
        outcome = worker.run(request, timeouts[0])
        if outcome[0] in ("ok", "error") and _listing(folder) != before:
            outcome = ("leftover", ", ".join(sorted(_listing(folder) - before))[:300])
        case.results["reader"] = outcome
        if case.cli is not None:
            out = folder / "out"
            done = cli_run(cli_args(case, seed, top, out), folder, timeouts[1])
            outcome = classify_cli(done)
            left = _listing(folder) - before
            if outcome[0] == "ok":
                left = {p for p in left if p != "out" and not p.startswith("out/")}
            if outcome[0] in ("ok", "error") and left:
                outcome = ("leftover", ", ".join(sorted(left))[:300])
            case.results[case.cli] = outcome
    finally:
        case.seconds = round(time.perf_counter() - t0, 2)
        if keep is not None:
            shutil.copytree(folder, keep / folder.name, symlinks=True)
        shutil.rmtree(folder, ignore_errors=True)
    return case


# -- the reader worker ---------------------------------------------------------------------
def read_generic(path: Path, key: str, options: list[str]) -> None:
    """Every reader a GeoTIFF input meets: the in-memory plan from its header, the whole
    read with value checks and alignment, and the whole-scene engine's checks and a tile."""
    from terrasynth.data.align import align_scene
    from terrasynth.data.build import check_scene_values
    from terrasynth.data.scene import Grid
    from terrasynth.data.sources.generic import generic_scene
    from terrasynth.modalities import default_registry
    from terrasynth.scenes.inputs import open_inputs, read_region

    registry = default_registry()
    scaling = {}
    if options:
        mod, _, factor = options[1].partition("=")
        scaling[mod] = (float(factor), 0.0)
    items = [(key, str(path))]
    files, _ = open_inputs(items, registry, scaling)
    g = files[0].grid
    read_region(files, Grid(g.crs, g.transform, min(g.width, 64), min(g.height, 64)), registry)
    if _pipeline().in_memory_refusal(items) is None:
        scene = generic_scene(items, registry=registry, scaling=scaling)
        check_scene_values(scene, registry, strict=False)
        align_scene(scene, registry)


_PIPE = []


def _pipeline():
    if not _PIPE:
        from terrasynth.pipeline import Pipeline

        _PIPE.append(Pipeline.from_pretrained())
    return _PIPE[0]


def read_source(path: Path) -> None:
    from terrasynth.data.align import align_scene
    from terrasynth.data.sources import detect_source
    from terrasynth.modalities import default_registry

    registry = default_registry()
    for scene in detect_source(path).scenes(path):
        align_scene(scene, registry)


def read_store(path: Path) -> None:
    from terrasynth.data.dataset import ChipDataset
    from terrasynth.data.store import ChipStore

    ChipStore.open(path).summary()
    ds = ChipDataset(path, split="test")
    for i in range(len(ds)):
        ds[i]


def worker_main() -> None:
    """Read requests (JSON lines) on stdin, answer each with one JSON line."""
    warnings.simplefilter("ignore")
    from terrasynth.errors import TerrasynthError

    reply_to = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the answers
    for line in sys.stdin:
        req = json.loads(line)
        path = Path(req["path"])
        try:
            if req["kind"] == "generic":
                read_generic(path, req["key"], req["options"])
            elif req["kind"] == "source":
                read_source(path)
            else:
                read_store(path)
            outcome = ("ok", "")
        except TerrasynthError as exc:
            outcome = ("error", str(exc).splitlines()[0][:300] if str(exc) else "")
        except Exception as exc:  # every other exception is what the fuzzer looks for
            frames = traceback.extract_tb(exc.__traceback__)[-3:]
            where = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
            outcome = ("traceback", f"{type(exc).__name__} at {where}: {exc}"[:500])
        reply_to.write(json.dumps({"outcome": outcome[0], "detail": outcome[1]}) + "\n")
        reply_to.flush()


# -- report --------------------------------------------------------------------------------
def table(cases: list[Case]) -> str:
    counts: Counter = Counter()
    for c in cases:
        for target, (outcome, _) in c.results.items():
            counts[(c.mutation, target, outcome)] += 1
    targets = ("reader", "build", "generate", "evaluate")
    head = f"{'mutation':<15} {'target':<9} " + " ".join(f"{o:>9}" for o in OUTCOMES)
    lines = [head, "-" * len(head)]
    for m in MUTATIONS:
        for t in targets:
            row = [counts[(m, t, o)] for o in OUTCOMES]
            if sum(row):
                lines.append(f"{m:<15} {t:<9} " + " ".join(f"{n:>9}" for n in row))
    lines.append("-" * len(head))
    for t in targets:
        row = [sum(counts[(m, t, o)] for m in MUTATIONS) for o in OUTCOMES]
        if sum(row):
            lines.append(f"{'all':<15} {t:<9} " + " ".join(f"{n:>9}" for n in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--cli-fraction", type=float, default=0.02)
    ap.add_argument("--case", type=int, help="run this one case only")
    ap.add_argument("--keep", action="store_true", help="keep the case folders (in --out)")
    ap.add_argument("--reader-timeout", type=float, default=60)
    ap.add_argument("--cli-timeout", type=float, default=180)
    ap.add_argument("--memory-gib", type=float, default=LIMITS["memory_gib"])
    ap.add_argument("--out", type=Path, default=Path("fuzz-out"))
    ap.add_argument("--work", type=Path, help="seeds and case folders (default: a temp folder)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    LIMITS["memory_gib"] = args.memory_gib
    work = args.work or Path(tempfile.mkdtemp(prefix="terrasynth-fuzz-"))
    (work / "cases").mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    build_seeds(work)
    files = {s.name: candidate_files(s, work) for s in SEEDS}
    numbers = [args.case] if args.case is not None else list(range(args.cases))
    cases = [plan_case(n, args.seed, args.cli_fraction, work, files) for n in numbers]
    keep = args.out if args.keep else None
    timeouts = (args.reader_timeout, args.cli_timeout)
    done: list[Case] = []
    lock = threading.Lock()
    todo = list(reversed(cases))
    t0 = time.time()

    def loop() -> None:
        worker = Worker()
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    case = todo.pop()
                run_case(case, args.seed, work, worker, timeouts, keep)
                with lock:
                    done.append(case)
                    log.write(json.dumps(asdict(case)) + "\n")  # partial results survive
                    log.flush()
                    if len(done) % 250 == 0:
                        bad = sum(o in FAILURES for c in done for o, _ in c.results.values())
                        print(f"{len(done)} cases, {bad} failures, {time.time() - t0:.0f} s",
                              flush=True)  # fmt: skip
        finally:
            worker.stop()

    log = open(args.out / "cases.jsonl", "w")  # noqa: SIM115 (closed below)
    threads = [threading.Thread(target=loop) for _ in range(max(1, args.jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    done.sort(key=lambda c: c.number)
    seconds = time.time() - t0
    totals = Counter(o for c in done for o, _ in c.results.values())
    failing = [asdict(c) for c in done if any(o in FAILURES for o, _ in c.results.values())]
    summary = {
        "seed": args.seed,
        "cases": len(done),
        "cli_runs": sum(c.cli is not None for c in done),
        "seconds": round(seconds, 1),
        "outcomes": {o: totals[o] for o in OUTCOMES},
        "cases_ok": sum(all(o == "ok" for o, _ in c.results.values()) for c in done),
        "cases_clean_error": sum(
            any(o == "error" for o, _ in c.results.values())
            and all(o in ("ok", "error") for o, _ in c.results.values())
            for c in done
        ),
        "failing": failing,
        "reproduce": f"python bench/fuzz.py --seed {args.seed} --case N --keep",
    }
    (args.out / "fuzz.json").write_text(json.dumps(summary, indent=1))
    with open(args.out / "cases.csv", "w") as f:
        f.write("case,seed,file,mutation,target,outcome,detail\n")
        for c in done:
            for target, (outcome, detail) in c.results.items():
                detail = detail.replace('"', "'")
                f.write(
                    f'{c.number},{c.seed},"{c.file}",{c.mutation},{target},{outcome},"{detail}"\n'
                )
    print(table(done))
    print(
        f"{len(done)} cases ({summary['cli_runs']} command lines) in {seconds:.0f} s: "
        f"{summary['cases_ok']} ok, {summary['cases_clean_error']} clean error, "
        f"{len(failing)} failing; {args.out / 'fuzz.json'}"
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
