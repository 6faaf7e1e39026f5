"""No command deletes or fills a folder terrasynth did not write; --overwrite replaces only
an earlier terrasynth output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from terrasynth.atomic import MARKER
from tests.conftest import ZION, run_cli

pytestmark = pytest.mark.needs_data


def users_folder(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    return path


def assert_refused(res, folder: Path) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "not written by terrasynth" in lines[0], lines[0]
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]
    assert (folder / "thesis.tex").read_text() == "years of work"
    assert not any(p.name.startswith(f".{folder.name}.") for p in folder.parent.iterdir())


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_evaluate_keeps_a_users_folder(small_store, tmp_path, overwrite):
    out = users_folder(tmp_path / "report")
    res = run_cli("evaluate", "-d", str(small_store), "-o", str(out), "--no-model",
                  "--baseline", "mean", "-n", "1", "--max-chips", "1", *overwrite)  # fmt: skip
    assert_refused(res, out)


def test_evaluate_replaces_its_own_report_only_with_overwrite(small_store, tmp_path):
    out = tmp_path / "report"
    args = ["evaluate", "-d", str(small_store), "-o", str(out), "--no-model",
            "--baseline", "mean", "-n", "1", "--max-chips", "1"]  # fmt: skip
    assert run_cli(*args).returncode == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "evaluate" and marker["version"]
    again = run_cli(*args)
    assert again.returncode == 2 and "use --overwrite" in again.stderr, again.stderr
    replaced = run_cli(*args, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "metrics.json").exists() and (out / MARKER).exists()


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "-t", "dem", "--size", "64", "--lon", "11", "--lat", "46", "-n", "1",
         "--overwrite"],
        ["data", "build", str(ZION), "--overwrite"],
        ["demo", "-n", "1", "--overwrite"],
        ["train", "-d", "STORE", "--steps", "1"],
    ],
)  # fmt: skip
def test_other_commands_keep_a_users_folder_even_with_overwrite(command, small_store, tmp_path):
    out = users_folder(tmp_path / "out")
    command = [str(small_store) if a == "STORE" else a for a in command]
    assert_refused(run_cli(*command, "-o", str(out)), out)


def test_a_users_folder_in_the_place_of_a_work_folder_is_kept(s1_utm, tmp_path):
    work = users_folder(tmp_path / "out.work")
    res = run_cli("generate", "-i", f"s1grd={s1_utm}", "-t", "s2l2a", "-n", "1", "--steps", "1",
                  "--stream", "--tile", "64", "-o", str(tmp_path / "out"))  # fmt: skip
    assert_refused(res, work)
    assert not (tmp_path / "out").exists()
