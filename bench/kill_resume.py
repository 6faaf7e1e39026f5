"""Kill training and whole-scene generation with SIGKILL at random moments, resume, compare.

    OMP_NUM_THREADS=1 python bench/kill_resume.py --kills 20

*Training*: ``terrasynth train`` (the ``conv_generator`` backbone, its ``tiny`` preset,
batch 2, a checkpoint every step) on a store built by ``terrasynth data build`` from two
real shared sources (the Myanmar S1/DEM/slope series and Zion: stored and derived slope,
relief scaling). *Generation*: ``terrasynth generate --stream`` (the built-in model,
S1 -> S2) on a real Sentinel-1 mosaic (``bench/s1_mosaic.py``) of several tiles.

Each command is first run once without interruption (the reference). Then it is started
again in a new folder and killed (``SIGKILL`` of its process group) after a random, seeded
delay; after every kill the folder is checked (every safetensors, JSON, GeoTIFF and
training state present opens, ``latest`` names a complete checkpoint) and the command is
run again (training: with ``--resume`` once a checkpoint exists), until a run ends by
itself. Its outputs must equal the reference's bit for bit: training compares
``model/model.safetensors``, the last checkpoint's weights and EMA and ``metrics.jsonl``
(without its wall-clock figures); generation compares every GeoTIFF's pixels and
georeferencing. Rounds repeat until ``--kills`` kills of each kind were made. Exits 1 on
any failure: a resume that ended in an error, a corrupt file, or an output that differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STORE_SOURCES = ("s1_timeseries_myanmar_srtm", "zion_landsat8_srtm_nlcd")
TIMING = ("samples_per_s", "tokens_per_s", "elapsed_s", "chips_per_s")  # wall-clock fields
TEMPORARY = (".tmp", ".partial", ".old")  # names an interrupted write may leave (dot files)


@dataclass
class Tally:
    """What happened to one kind of run over all its rounds."""

    kind: str
    kills: int = 0
    resumes: int = 0
    resumes_ok: int = 0
    corrupt: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rounds: int = 0
    after_output: int = 0  # kills that came after the output was in place
    equal: bool = True
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.equal and not self.corrupt and not self.failures and self.rounds > 0


def cli(*args: str) -> list[str]:
    """``terrasynth ARGS`` as this interpreter runs it."""
    return [sys.executable, "-m", "terrasynth.cli.main", *args]


def is_temporary(path: Path) -> bool:
    """A temporary an interrupted write may leave, which the next run replaces or removes."""
    return any(
        part.startswith(".") and (part.endswith(TEMPORARY) or part.startswith(".tmp-"))
        for part in path.parts
    )


# -- checks after a kill -------------------------------------------------------------------
def check_common(path: Path) -> str | None:
    """Why ``path`` (a safetensors, JSON or GeoTIFF file) is corrupt, or None."""
    import rasterio
    from safetensors.numpy import load_file

    try:
        if path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".json" or path.name == ".terrasynth-output":
            json.loads(path.read_text())
        elif path.suffix == ".tif":
            with rasterio.open(path) as f:
                f.read()
                for k in f.overviews(1):  # the overviews too
                    f.read(out_shape=(f.count, max(f.height // k, 1), max(f.width // k, 1)))
    except Exception as exc:  # any failure to open is what is being counted
        return f"{path}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def check_run_folder(run: Path) -> list[str]:
    """Corrupt files of a training run folder, and whether ``latest`` names a whole
    checkpoint (one a resume loads)."""
    from terrasynth.models.factory import load_model
    from terrasynth.training.trainer import checkpoint_to_resume, read_state

    bad: list[str] = []
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        if is_temporary(path.relative_to(run)):
            continue
        why = check_common(path)
        if why is None and path.name == "metrics.jsonl":
            lines = path.read_text().splitlines(keepends=True)
            for i, line in enumerate(lines):
                if not line.endswith("\n"):
                    continue  # a last line cut short: dropped on resume by design
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    why = f"{path}: line {i + 1}: {exc}"
        if why is None and path.name == "optimizer.pt":
            try:
                read_state(path, int(path.parent.name.split("_")[1]))
            except Exception as exc:
                why = f"{path}: {exc}"
        if why is not None:
            bad.append(why)
    if (run / "latest").exists():
        try:
            ckpt = checkpoint_to_resume(run)
            load_model(ckpt)  # config.json + model.safetensors
            read_state(ckpt / "optimizer.pt", int(ckpt.name.split("_")[1]))
        except Exception as exc:
            bad.append(f"{run / 'latest'}: not a complete checkpoint: {exc}")
    if (run / "model" / "model.safetensors").exists():
        try:
            load_model(run / "model")
        except Exception as exc:
            bad.append(f"{run / 'model'}: {exc}")
    return bad


def check_scene_folders(out: Path) -> list[str]:
    """Corrupt files of a whole-scene output and its work folder (zarr metadata included;
    chunks of an unfinished task are rewritten by the resume, so they are not read)."""
    bad = []
    for folder in (out, out.with_name(out.name + ".work")):
        if not folder.exists():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if is_temporary(path.relative_to(folder.parent)):
                continue
            why = check_common(path)
            if why is not None:
                bad.append(why)
    return bad


# -- the kill loop -------------------------------------------------------------------------
Started = Callable[[subprocess.Popen, float], bool]  # has the run's real work begun?


@dataclass
class Timing:
    """An uninterrupted run: seconds to its start of real work (imports, model, data) and
    seconds of work after that."""

    startup: float
    work: float


def launch(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: loader workers die with it
    )


def wait(proc: subprocess.Popen, until: Callable[[], bool], seconds: float) -> None:
    """Wait until ``proc`` ends, ``until()`` holds, or ``seconds`` pass."""
    deadline = time.perf_counter() + seconds
    while proc.poll() is None and not until() and time.perf_counter() < deadline:
        time.sleep(0.005)


def timed_run(argv: list[str], env: dict[str, str], started: Started) -> Timing:
    """Run ``argv`` to the end (it must succeed), timing its start-up and its work."""
    t0 = time.perf_counter()
    proc = launch(argv, env)
    wait(proc, partial(started, proc, t0), 1800)
    t1 = time.perf_counter()
    _, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{err[-3000:]}")
    return Timing(t1 - t0, time.perf_counter() - t1)


@dataclass
class Kind:
    """How to run, watch and check one kind of run."""

    argv: Callable[[], list[str]]  # the command (again)
    started: Started  # its real work began
    ending: Callable[[], bool]  # it is committing its final result
    check: Callable[[], list[str]]  # corrupt files in its folders
    complete: Callable[[], bool] = lambda: False  # its final result is in place


@dataclass
class Plan:
    """The kill moments' settings: environment, seeded generator, the uninterrupted run's
    timing, kills wanted, and where progress goes."""

    env: dict[str, str]
    rng: random.Random
    timing: Timing
    kills: int
    log: Callable[[str], None]


def kill_round(tally: Tally, kind: Kind, plan: Plan) -> None:
    """Start the command, kill it at a random moment, check, start it again, ... until a
    run ends by itself (successfully, or the failure is recorded).

    A kill falls anywhere in the start-up (one in five), or when the run commits its final
    result (one in seven), or else a random time after the run's real work began, up to
    twice an even share of the work, so a round ends after about ``kills`` kills; once
    ``kills`` kills were made, the next run is left to finish."""
    env, rng, timing, kills, log = plan.env, plan.rng, plan.timing, plan.kills, plan.log
    tally.rounds += 1
    first = True
    while True:
        argv = kind.argv()
        mode = rng.choices(("start-up", "work", "end"), weights=(20, 66, 14))[0]
        delay = rng.uniform(0.0, timing.startup if mode == "start-up" else 2 * timing.work / kills)
        if tally.kills >= kills:  # enough: this run goes to its end
            mode, delay = "none", 3600.0
        t0 = time.perf_counter()
        proc = launch(argv, env)
        if not first:
            tally.resumes += 1
        if mode == "work":
            wait(proc, partial(kind.started, proc, t0), 1800)
        if mode == "end":
            wait(proc, kind.ending, 1800)
        else:
            wait(proc, lambda: False, delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            tally.kills += 1
            if not first:
                tally.resumes_ok += 1  # it was still running: no error so far
            found = kind.check()
            tally.corrupt.extend(found)
            when = {"start-up": f"{delay:.2f} s in", "work": f"{delay:.2f} s into the work"}
            log(f"  kill {tally.kills}: {when.get(mode, 'at the end')}; corrupt: {len(found)}")
            first = False
            if kind.complete():
                finish_complete(tally, argv, env, log)
                return
            continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            tally.failures.append(f"{' '.join(argv[3:])} -> {proc.returncode}: {err[-1500:]}")
            log(f"  run failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
            return
        if not first:
            tally.resumes_ok += 1
        log("  finished by itself")
        return


def finish_complete(
    tally: Tally, argv: list[str], env: dict[str, str], log: Callable[[str], None]
) -> None:
    """Killed after its output was in place: the same command again must say the output
    exists (one ``error:`` line, exit code 2) and remove what the killed run left."""
    tally.resumes += 1
    tally.after_output += 1
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    lines = res.stderr.strip().splitlines()
    if res.returncode == 2 and len(lines) == 1 and "already exists" in lines[0]:
        tally.resumes_ok += 1
        log("  the output was in place: the same command says so")
    else:
        tally.failures.append(f"after the output was in place: {res.returncode}: {lines[-3:]}")


def rounds(
    tally: Tally,
    base: Path,
    kind: Callable[[Path], Kind],
    compare: Callable[[Path], list[str]],
    plan: Plan,
) -> None:
    """Kill rounds, each in a new folder ``base_N`` compared with the reference when it is
    done, until ``kills`` kills were made (or something failed)."""
    while tally.kills < plan.kills and not tally.failures:
        folder = base.with_name(f"{base.name}_{tally.rounds}")
        kill_round(tally, kind(folder), plan)
        if tally.failures:
            return
        diffs = compare(folder)
        tally.equal &= not diffs
        plan.log(f"  round {tally.rounds}: {'equal' if not diffs else '; '.join(diffs)}")


# -- training ------------------------------------------------------------------------------
def train_args(store: Path, run: Path, steps: int) -> list[str]:
    return [
        "train", "-d", str(store), "-o", str(run), "--backbone", "conv_generator",
        "--preset", "tiny", "--steps", str(steps), "--batch-size", "2",
        "--checkpoint-every", "1", "--seed", "5", "--no-bf16",
    ]  # fmt: skip


def metrics_without_timing(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def same_training(ref: Path, run: Path) -> list[str]:
    """How ``run``'s final weights, last checkpoint and metrics differ from ``ref``'s."""
    diffs = []
    latest = (ref / "latest").read_text()
    if (run / "latest").read_text() != latest:
        diffs.append(f"latest: {(run / 'latest').read_text()} != {latest}")
    files = ["model/model.safetensors"] + [
        f"checkpoints/{latest}/{n}.safetensors" for n in ("model", "ema")
    ]
    for name in files:
        if not (run / name).exists() or (ref / name).read_bytes() != (run / name).read_bytes():
            diffs.append(f"{name} differs")
    if metrics_without_timing(ref) != metrics_without_timing(run):
        diffs.append("metrics.jsonl differs")
    return diffs


def train_started(run: Path) -> Started:
    """Training began: the trainer (re)wrote ``train_config.json`` after building its model
    and loading the data (and the checkpoint, on resume)."""

    def started(proc: subprocess.Popen, t0: float) -> bool:
        path = run / "train_config.json"
        return path.exists() and path.stat().st_mtime > time.time() - (time.perf_counter() - t0)

    return started


def bench_training(root: Path, kills: int, steps: int, env: dict, rng: random.Random,
                   log: Callable[[str], None]) -> Tally:  # fmt: skip
    tally = Tally("training")
    t0 = time.perf_counter()
    store = root / "store"
    build = cli("data", "build", *(str(DATA / s) for s in STORE_SOURCES), "-o", str(store))
    timed_run(build, env, lambda proc, t: False)
    ref = root / "train_ref"
    timing = timed_run(cli(*train_args(store, ref, steps)), env, train_started(ref))
    log(f"training: start-up {timing.startup:.1f} s, {steps} steps {timing.work:.1f} s")

    def kind(run: Path) -> Kind:
        def argv() -> list[str]:
            resume = ["--resume"] if (run / "latest").exists() else []
            return cli(*train_args(store, run, steps), *resume)

        final = run / "checkpoints" / f"step_{steps:07d}"
        return Kind(argv, train_started(run), final.exists, partial(check_run_folder, run))

    plan = Plan(env, rng, timing, kills, log)
    rounds(tally, root / "train", kind, partial(same_training, ref), plan)
    tally.seconds = time.perf_counter() - t0
    return tally


# -- whole-scene generation ----------------------------------------------------------------
def generate_args(s1: Path, out: Path, tile: int, steps: int = 4) -> list[str]:
    return [
        "generate", "-i", f"s1grd={s1}", "-t", "s2l2a", "-n", "1", "--steps", str(steps),
        "--seed", "3", "--stream", "--tile", str(tile), "-o", str(out),
    ]  # fmt: skip


def same_scene(ref: Path, out: Path) -> list[str]:
    """How ``out``'s GeoTIFFs differ from ``ref``'s (pixels, georeferencing, band names),
    and what a finished run left beside it."""
    import rasterio

    diffs = []
    names = sorted(p.name for p in ref.glob("*.tif"))
    if not out.is_dir() or sorted(p.name for p in out.glob("*.tif")) != names:
        return [f"{out}: not the files {names}"]
    for name in names:
        with rasterio.open(ref / name) as a, rasterio.open(out / name) as b:
            pa, pb = a.profile, b.profile
            for key in ("crs", "transform", "width", "height", "count", "dtype", "nodata"):
                if pa.get(key) != pb.get(key) and not (key == "nodata" and pa[key] != pa[key]):
                    diffs.append(f"{name}: {key} {pb.get(key)} != {pa.get(key)}")
            if a.descriptions != b.descriptions:
                diffs.append(f"{name}: band names differ")
            if a.read().tobytes() != b.read().tobytes():
                diffs.append(f"{name}: pixels differ")
    left = [p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))]
    if sorted(left) != [out.name]:
        diffs.append(f"left beside the output: {sorted(set(left) - {out.name})}")
    return diffs


def scene_started(out: Path) -> Started:
    """Generation began: the run took the work folder's lock (model loaded, inputs read)."""
    lock = out.with_name(out.name + ".work") / ".lock"

    def started(proc: subprocess.Popen, t0: float) -> bool:
        return lock.exists() and lock.read_text().strip() == str(proc.pid)

    return started


def bench_generation(root: Path, kills: int, side: int, tile: int, env: dict,
                     rng: random.Random, log: Callable[[str], None],
                     steps: int = 4) -> Tally:  # fmt: skip
    sys.path.insert(0, str(Path(__file__).parent))
    from s1_mosaic import make_mosaic

    tally = Tally("whole-scene generation")
    t0 = time.perf_counter()
    s1 = make_mosaic(side, root / f"s1_{side}.tif")
    ref = root / "gen_ref"
    timing = timed_run(cli(*generate_args(s1, ref, tile, steps)), env, scene_started(ref))
    log(f"generation: start-up {timing.startup:.1f} s, {side} px {timing.work:.1f} s")

    def kind(out: Path) -> Kind:
        argv = cli(*generate_args(s1, out, tile, steps))
        check = partial(check_scene_folders, out)
        return Kind(lambda: argv, scene_started(out), out.exists, check, out.exists)

    rounds(tally, root / "gen", kind, partial(same_scene, ref), Plan(env, rng, timing, kills, log))
    tally.seconds = time.perf_counter() - t0
    return tally


def table(tallies: list[Tally]) -> str:
    rows = [
        "| run | kills | resumes that succeeded | corrupt files found | final outputs equal "
        "| rounds | wall time (s) |",
        "|---|---:|---:|---:|:---:|---:|---:|",
    ]
    for t in tallies:
        rows.append(
            f"| {t.kind} | {t.kills} | {t.resumes_ok}/{t.resumes} | {len(t.corrupt)} "
            f"| {'yes' if t.equal and t.rounds else 'no'} | {t.rounds} | {t.seconds:.0f} |"
        )
    for t in tallies:
        if t.after_output:
            rows.append(f"\n{t.kind}: {t.after_output} kill(s) came after the output was in place")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs of each kind, at least")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--only", choices=("training", "generation"), help="one kind only")
    ap.add_argument("--steps", type=int, default=40, help="training steps")
    ap.add_argument("--side", type=int, default=512, help="scene side (px)")
    ap.add_argument("--tile", type=int, default=128, help="scene tile (px)")
    ap.add_argument("--work", type=Path, help="folder to work in (default: a temporary one)")
    ap.add_argument("-q", "--quiet", action="store_true", help="only the table")
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rng = random.Random(args.seed)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    with tempfile.TemporaryDirectory(prefix="kill-resume-", dir=args.work) as tmp:
        root = Path(tmp)
        tallies = []
        if args.only in (None, "training"):
            tallies.append(bench_training(root, args.kills, args.steps, env, rng, log))
        if args.only in (None, "generation"):
            tallies.append(bench_generation(root, args.kills, args.side, args.tile, env, rng, log))
    print(table(tallies))
    for t in tallies:
        for line in t.corrupt + t.failures:
            print(f"{t.kind}: {line}")
    return 0 if all(t.ok for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
