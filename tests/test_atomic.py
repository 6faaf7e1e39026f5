"""Whole output folders or nothing, and never a folder terrasynth did not write."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from terrasynth import __version__, atomic
from terrasynth.atomic import MARKER, atomic_folder, clear_folder, locked_folder
from terrasynth.errors import TerrasynthError


def earlier_output(folder):
    """An output folder as an earlier run of terrasynth leaves it."""
    with atomic_folder(folder, command="test") as tmp:
        (tmp / "old.txt").write_text("old")
    return folder


def test_overwrite_replaces_an_earlier_output(tmp_path):
    out = earlier_output(tmp_path / "out")
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "test" and marker["version"] == __version__
    with atomic_folder(out, overwrite=True) as tmp:
        assert tmp != out and tmp.parent == out.parent
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # untouched until the end
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_earlier_output_needs_overwrite(tmp_path):
    out = earlier_output(tmp_path / "out")
    with pytest.raises(TerrasynthError, match="use --overwrite"), atomic_folder(out):
        pass
    assert (out / "old.txt").read_text() == "old"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_terrasynth_did_not_write_is_never_replaced(tmp_path, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with (
        pytest.raises(TerrasynthError, match="not written by terrasynth"),
        atomic_folder(out, overwrite=overwrite),
    ):
        pass
    assert (out / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(TerrasynthError, match="not written by terrasynth"):
        clear_folder(out)
    assert (out / "thesis.tex").exists()


def test_a_user_file_filling_the_folder_meanwhile_is_kept(tmp_path):
    out = tmp_path / "out"
    refused = pytest.raises(TerrasynthError, match="not written by terrasynth")
    with refused, atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
        out.mkdir()
        (out / "mine.txt").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_an_empty_folder_is_filled(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (out / "new.txt").exists() and (out / MARKER).exists()


def test_the_old_folder_is_deleted_only_once_the_new_one_is_in_place(tmp_path, monkeypatch):
    out = earlier_output(tmp_path / "out")
    seen = []
    remove = atomic.remove_folder

    def watch(path):
        seen.append((path.name, sorted(p.name for p in out.iterdir())))
        remove(path)

    monkeypatch.setattr("terrasynth.atomic.remove_folder", watch)
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert seen == [(".out.old", [MARKER, "new.txt"])]


def test_an_error_leaves_the_folder_as_it_was(tmp_path):
    out = earlier_output(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out, overwrite=True) as tmp:
        (tmp / "half.txt").write_text("half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def killed_while_writing(out):
    """The temporary folder a run killed (SIGKILL) while writing ``out`` leaves."""
    code = (
        "import os, signal, sys; from terrasynth.atomic import start_folder; "
        "tmp = start_folder(sys.argv[1], 'test'); (tmp / 'half.txt').write_text('half'); "
        "print(tmp, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    return Path(res.stdout.strip())


def test_leftovers_of_a_killed_run_are_cleared_but_not_a_users_folder(tmp_path):
    out = tmp_path / "out"
    leftover = killed_while_writing(out)
    assert leftover.parent == tmp_path and (leftover / "half.txt").exists()
    with atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    mine = tmp_path / ".out.partial"  # a name earlier versions used, holding a user's file
    mine.mkdir()
    (mine / "mine.txt").write_text("mine")
    with atomic_folder(out, True) as tmp:
        (tmp / "newer.txt").write_text("newer")
    assert (mine / "mine.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "newer.txt"]


def test_two_runs_writing_one_output_keep_their_own_temporary_folders(tmp_path):
    out = tmp_path / "out"
    first = atomic.start_folder(out, "test")
    (first / "first.txt").write_text("first")
    with atomic_folder(out) as second:
        assert second != first
        (second / "second.txt").write_text("second")
    assert (first / "first.txt").read_text() == "first"  # not the second run's to delete
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "second.txt"]
    with pytest.raises(TerrasynthError, match="use --overwrite"):
        atomic.finish_folder(first, out)
    atomic.discard_folder(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "second.txt"]


def killed_between_the_renames(out):
    """What a run replacing ``out`` leaves when killed between finish_folder's renames."""
    out.rename(out.with_name(f".{out.name}.old"))


def test_an_output_left_aside_by_a_killed_run_is_restored_not_deleted(tmp_path):
    out = earlier_output(tmp_path / "out")
    killed_between_the_renames(out)
    with pytest.raises(TerrasynthError, match="use --overwrite"), atomic_folder(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_superseded_output_is_removed_only_under_overwrite(tmp_path):
    out = earlier_output(tmp_path / "out")
    earlier_output(tmp_path / ".out.old")  # killed after the second rename, before the delete
    with pytest.raises(TerrasynthError, match="use --overwrite"), atomic_folder(out):
        pass
    assert (tmp_path / ".out.old" / "old.txt").exists()
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]


def test_a_locked_work_folder_refuses_a_second_holder(tmp_path):
    work = tmp_path / "out.work"
    with locked_folder(work):
        assert (work / MARKER).exists()
        with pytest.raises(TerrasynthError, match="another terrasynth run"), locked_folder(work):
            pass
    with locked_folder(work):  # released with the first holder
        pass
    mine = tmp_path / "mine.work"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(TerrasynthError, match="not written by terrasynth"), locked_folder(mine):
        pass
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
