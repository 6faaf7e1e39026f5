"""Every bad option value ends as one ``error:`` line and exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from terrasynth.cli.main import main
from tests.conftest import run_cli

GEN = ["generate", "-o", "out", "-t", "dem", "--size", "64", "--lon", "11", "--lat", "46"]
EVAL = ["evaluate", "-d", ".", "-o", "report"]
TRAIN = ["train", "-d", ".", "-o", "never"]
FETCH = ["data", "fetch", "--stac", "http://127.0.0.1:9/", "--collections", "c", "-o", "s"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([*GEN, "--tile", "100"], "--tile must be a multiple of 64"),
        ([*GEN, "--tile", "0"], "--tile must be a multiple of 64"),
        ([*GEN, "-n", "0"], "--num-samples must be at least 1, not 0"),
        ([*GEN, "-n", "-3"], "--num-samples must be at least 1"),
        ([*GEN, "--steps", "0"], "--steps must be at least 1"),
        ([*GEN, "--steps", "abc"], "Invalid value for '--steps'"),
        ([*GEN, "--seed", "-1"], "--seed must be between 0 and 4294967295"),
        ([*GEN, "--seed", "99999999999999999999"], "--seed must be between"),
        ([*GEN, "--eta", "5"], "--eta must be between 0.0 and 1.0"),
        ([*GEN, "--eta", "nan"], "--eta must be between"),
        ([*GEN, "--guidance", "-3"], "--guidance must be at least 0"),
        ([*GEN, "--size", "0"], "--size must be at least 1"),
        ([*GEN, "--gsd", "0"], "--gsd must be greater than 0"),
        ([*GEN, "--lat", "95"], "--lat must be between -90 and 90"),
        ([*GEN, "--date", "2020-13-45"], "--date must be an ISO date (YYYY-MM-DD)"),
        ([*GEN, "--lon", "-200"], "--lon must be between -180 and 180"),
        ([*GEN, "--batch-size", "0"], "--batch-size must be at least 1"),
        ([*GEN, "--engine", "spark"], "--engine must be one of local, dask"),
        ([*GEN, "--workers", "0"], "--workers must be at least 1"),
        ([*GEN, "--cascade", "-20"], "--cascade must be greater than 0"),
        ([*GEN, "--cascade-start", "2"], "--cascade-start must be between"),
        ([*GEN, "--frobnicate"], "No such option: --frobnicate"),
        (["generate", "-o", "x"], "Missing option '-t'"),
        ([*EVAL, "--split", "holdout"], "--split must be one of train, val, test"),
        ([*EVAL, "--baseline", "oracle"], "--baseline must be one of mean, knn"),
        ([*EVAL, "-n", "0"], "--num-samples must be at least 1"),
        ([*EVAL, "--max-chips", "0"], "--max-chips must be at least 1"),
        ([*EVAL, "--protocol", "no-such.json"], "--protocol must be an existing file"),
        ([*TRAIN, "--preset", "huge"], "--preset must be one of tiny, small, base"),
        ([*TRAIN, "--backbone", "gan"], "--backbone must be one of scene_transformer"),
        ([*TRAIN, "--steps", "0"], "--steps must be at least 1"),
        ([*TRAIN, "--lr", "0"], "--lr must be greater than 0"),
        ([*TRAIN, "--lr", "inf"], "--lr must be greater than 0"),
        ([*TRAIN, "--accumulate", "0"], "--accumulate must be at least 1"),
        ([*TRAIN, "--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
        ([*TRAIN, "--time-limit", "-1"], "--time-limit must be at least 0"),
        ([*TRAIN, "--schedule", "cosine"], "--schedule must be one of steps, time"),
        ([*TRAIN, "--workers", "-1"], "--workers must be at least 0"),
        ([*TRAIN, "--source-balance", "1.5"], "--source-balance must be between"),
        ([*TRAIN, "--balance-by", "colour"], "--balance-by must be one of kind, source"),
        ([*TRAIN, "--relief-scale", "-0.1"], "--relief-scale must be between"),
        (["calibrate", "-m", ".", "-d", ".", "--members", "1"], "--members must be at least 2"),
        (["calibrate", "-m", ".", "-d", ".", "--split", "x"], "--split must be one of"),
        (["baseline", "train-unet", "-d", ".", "-o", "u", "--minutes", "0"], "--minutes must be"),
        (["demo", "-n", "0"], "--num-samples must be at least 1"),
        (["data", "build", "-o", "s", "--min-valid", "2"], "--min-valid must be between"),
        (["data", "build", "-o", "s", "--block-size", "0"], "--block-size must be greater"),
        (["data", "build", "no-such-folder", "-o", "s"], "must be an existing file or folder"),
        (["data", "preview", ".", "-n", "0"], "--chips must be at least 1"),
        ([*GEN, "--scale", "dem=nan"], "--scale expects MOD=NUMBER (a finite number)"),
        ([*GEN, "--offset", "dem=-inf"], "--offset expects MOD=NUMBER (a finite number)"),
        ([*GEN, "--scale", "=2"], "--scale expects MOD=NUMBER"),
        ([*GEN, "--scale", "dem"], "--scale expects MOD=NUMBER"),
        ([*GEN, "-i", "s1grd"], "--input expects MOD=FILE, got 's1grd'"),
        ([*GEN, "-i", "=x.tif"], "--input expects MOD=FILE, got '=x.tif'"),
        ([*GEN, "-i", "s1grd="], "--input expects MOD=FILE, got 's1grd='"),
        ([*EVAL, "--seam-input", "s1grd="], "--seam-input expects MOD=FILE"),
        (["data", "build", "-o", "s", "--scale", "x=inf"], "--scale expects MOD=NUMBER"),
        (["data", "build", "-o", "s", "--offset", "x=nan"], "--offset expects MOD=NUMBER"),
        (["data", "build", "-o", "s", "--input", "=x.tif"], "--input expects MOD=FILE"),
        ([*FETCH, "--bbox", "1,2,3"], "--bbox expects W,S,E,N in degrees, got '1,2,3'"),
        ([*FETCH, "--bbox", "10,0,5,1"], "must be W,S,E,N with -180 <= W < E <= 180"),
        ([*FETCH, "--bbox", "0,0,1,nan"], "--bbox expects finite numbers"),
        ([*FETCH, "--bbox", "0,0,1,1", "--resolution", "0"], "--resolution must be greater"),
        ([*FETCH, "--bbox", "0,0,1,1", "--max-items", "0"], "--max-items must be at least 1"),
        ([*FETCH, "--bbox", "0,0,1,1", "--mapping", "no.yaml"], "--mapping must be an existing"),
        (["data", "fetch", "--stac", "http://x/", "-o", "s"], "--stac needs --collections"),
        ([*FETCH, "--chip-size", "40"], "--chip-size must be a positive multiple of 16"),
        ([*GEN, "--collections", "c"], "--collections, --datetime and --mapping need --stac"),
        (["serve", "--port", "0"], "--port must be between 1 and 65535"),
        (["serve", "--folder", "no-such-folder"], "--folder must be an existing file or folder"),
        (["serve", "--max-upload-mb", "0"], "--max-upload-mb must be greater than 0"),
        (["serve", "--max-pixels", "0"], "--max-pixels must be at least 1"),
    ],
)
def test_a_bad_option_is_one_error_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, wherever it would go
    with pytest.raises(SystemExit) as exit_:
        main(args)
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert exit_.value.code == 2, out.err
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert message in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_generate_tile_100_is_an_error_line_without_traceback(tmp_path):
    res = run_cli("generate", "-t", "dem", "--size", "64", "--lon", "11", "--lat", "46",
                  "--stream", "--tile", "100", "-o", str(tmp_path / "out"))  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: --tile must be a multiple of 64 px and at least the model's window (32 px), not 100"
    ]
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_are_one_line_too():
    res = run_cli("generate", "-t", "dem", "-o", "x", "--steps", "abc")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Invalid value for '--steps'")
    assert run_cli("--help").returncode == 0


@pytest.mark.needs_data
def test_evaluate_refuses_an_unknown_target(tmp_path, small_store):
    res = run_cli("evaluate", "-d", str(small_store), "-o", str(tmp_path / "r"), "-t", "radar")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: the model cannot generate 'radar'")
    assert not (tmp_path / "r").exists()
