"""Output folders and files: whole or nothing, and never a folder terrasynth did not write.

Every folder a command creates holds a small marker, ``.terrasynth-output`` (JSON: the
command, the terrasynth version, the time). A command refuses a non-empty folder unless
``--overwrite``, and ``--overwrite`` replaces only a folder holding that marker
(:func:`check_output`). A new folder is built under a temporary sibling unique to the run
(``.NAME.XXXXXXXX.partial``) and swapped in at the end (:func:`atomic_folder`): the old
folder is renamed aside, the new one renamed in, then the old one deleted, so there is no
moment with neither. Work folders that one run at a time may write are locked
(:func:`locked_folder`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from terrasynth import __version__
from terrasynth.errors import TerrasynthError

MARKER = ".terrasynth-output"
LOCK = ".lock"


def is_output(folder: str | Path) -> bool:
    """Whether ``folder`` holds terrasynth's marker of an output it wrote."""
    return (Path(folder) / MARKER).is_file()


def check_output(folder: str | Path, overwrite: bool = False) -> None:
    """Refuse to write ``folder`` if that could lose data terrasynth did not write.

    A missing or empty folder is fine; a non-empty one needs ``overwrite`` and the marker
    of an earlier terrasynth output. Call it before any long work, so a refusal costs
    nothing; :func:`atomic_folder` checks again before it replaces anything. An output a
    killed run left aside (see :func:`finish_folder`) is put back first."""
    folder = Path(folder)
    _restore_aside(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise TerrasynthError(f"{folder} exists and is not a folder")
    if not any(folder.iterdir()):
        return
    if not is_output(folder):
        raise TerrasynthError(
            f"{folder} already exists, is not empty and was not written by terrasynth "
            f"(no {MARKER} in it): "
            "choose another folder, or move its files away yourself"
        )
    if not overwrite:
        raise TerrasynthError(
            f"{folder} already exists and is not empty (use --overwrite to replace it)"
        )


def output_files(folder: str | Path) -> list[Path]:
    """The files of an output folder, without terrasynth's marker."""
    return sorted(p for p in Path(folder).iterdir() if p.name != MARKER)


def _marker_text(command: str) -> str:
    info = {
        "command": command,
        "version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return json.dumps(info, indent=2)


def write_marker(folder: str | Path, command: str) -> Path:
    """Mark ``folder`` as an output of ``command`` (see the module docstring)."""
    return write_text(Path(folder) / MARKER, _marker_text(command))


def remove_folder(path: str | Path) -> None:
    """Delete a folder terrasynth wrote (or an empty one), refusing anything else; its
    marker goes last, so a removal cut short (kill -9) leaves a folder still marked as
    terrasynth's, which the next run removes."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not (
        path.is_dir() and not path.is_symlink() and (is_output(path) or not any(path.iterdir()))
    ):
        raise TerrasynthError(f"{path} is in the way and was not written by terrasynth: remove it")
    for p in path.iterdir():
        if p.name == MARKER:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    (path / MARKER).unlink(missing_ok=True)
    path.rmdir()


_writers: dict[Path, int] = {}  # temporary folders this process writes: their locked marker


def start_folder(folder: str | Path, command: str) -> Path:
    """A new, marked temporary sibling ``.NAME.XXXXXXXX.partial`` of ``folder`` to build the
    output in, unique to this run.

    Its marker stays locked (``flock``) until :func:`finish_folder` or
    :func:`discard_folder`; the lock goes with the process, so the partial folders of killed
    runs are told from those of live ones, and only the former are removed here."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    # the marker is locked before it takes its name, so no marked partial is ever unlocked
    # while its writer lives
    staged = tmp / f"{MARKER}.tmp"
    fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, _marker_text(command).encode())
    staged.rename(tmp / MARKER)
    _writers[tmp] = fd
    return tmp


def _remove_abandoned(folder: Path) -> None:
    """Remove the partial folders of ``folder`` whose writer is gone (its lock with it).

    A partial folder without a marker is left alone: it may be a run's that is just being
    created, or not terrasynth's at all."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(?:[a-z0-9_]{{8}}\.)?partial")
    for path in folder.parent.iterdir():
        if not pattern.fullmatch(path.name) or path.is_symlink() or not is_output(path):
            continue
        try:
            fd = os.open(path / MARKER, os.O_RDONLY)
        except FileNotFoundError:  # finished or removed by its writer meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live run's
            continue
        else:
            if path.exists():
                remove_folder(path)
        finally:
            os.close(fd)


def _release(tmp: Path) -> None:
    fd = _writers.pop(Path(tmp), None)
    if fd is not None:
        os.close(fd)


def discard_folder(tmp: str | Path) -> None:
    """Remove a temporary folder of :func:`start_folder` that will not be finished."""
    tmp = Path(tmp)
    _release(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def _restore_aside(folder: Path) -> None:
    """Put back an output a killed run left at ``.NAME.old``, if ``NAME`` is missing."""
    old = folder.with_name(f".{folder.name}.old")
    if is_output(old) and not old.is_symlink() and not os.path.lexists(folder):
        old.rename(folder)


def finish_folder(tmp: str | Path, folder: str | Path, overwrite: bool = False) -> Path:
    """Swap the finished ``tmp`` in as ``folder``: the old folder (if any) is renamed aside
    to ``.NAME.old``, ``tmp`` renamed in, then the old folder deleted; either is in place
    at every moment.

    A kill between the two renames leaves the old output at ``.NAME.old`` and no ``NAME``:
    the next run puts it back first (:func:`check_output`), so it refuses or needs
    ``--overwrite`` just as if nothing had happened. A kill after them leaves both: the
    ``.NAME.old`` then is a superseded output that run was allowed to replace, and is
    removed here by the next run that may itself replace ``NAME`` (``--overwrite``, or an
    empty ``NAME``); any other run refuses the non-empty ``NAME`` before reaching it."""
    tmp, folder = Path(tmp), Path(folder)
    check_output(folder, overwrite)  # again: it may have been filled since the start
    old = folder.with_name(f".{folder.name}.old")
    if os.path.lexists(old):  # superseded by a run killed before it removed it
        remove_folder(old)
    if folder.exists():
        folder.rename(old)
    try:
        tmp.rename(folder)
    except BaseException:
        if old.exists():
            old.rename(folder)
        raise
    _release(tmp)
    remove_folder(old)
    return folder


@contextmanager
def atomic_folder(
    folder: str | Path, overwrite: bool = False, command: str = "terrasynth"
) -> Iterator[Path]:
    """Yield a marked temporary sibling of ``folder`` to write into; on success it replaces
    ``folder`` (a non-empty one only with ``overwrite`` and only if terrasynth wrote it), on
    any error (Ctrl-C included) it is removed and ``folder`` is untouched."""
    folder = Path(folder)
    check_output(folder, overwrite)
    tmp = start_folder(folder, command)
    try:
        yield tmp
        finish_folder(tmp, folder, overwrite)
    except BaseException:
        discard_folder(tmp)
        raise


def clear_folder(folder: str | Path, keep: tuple[str, ...] = (MARKER, LOCK)) -> None:
    """Empty a folder terrasynth wrote (refusing any other), keeping the names in ``keep``."""
    folder = Path(folder)
    check_output(folder, overwrite=True)
    if not folder.exists():
        return
    for p in folder.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextmanager
def locked_folder(folder: str | Path, command: str = "generate") -> Iterator[Path]:
    """Hold an exclusive lock on a work folder of ``command`` while the block runs.

    The folder is created (marked) if missing; one terrasynth wrote before is fine, any other
    non-empty folder is refused. A second run asking for the lock meanwhile gets a
    :class:`TerrasynthError` at once. The lock (``flock`` on ``.lock``) goes with the process,
    so a killed run leaves no stale lock."""
    folder = Path(folder)
    check_output(folder, overwrite=True)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_output(folder):
        write_marker(folder, command)
    path = folder / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TerrasynthError(
                f"another terrasynth run (process {holder}) is writing {folder}; "
                "wait for it to finish, or write to another output folder"
            ) from None
        # the run that held the lock may have removed the file meanwhile: only the lock on
        # the file now in place counts
        if _same_file(path, fd):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield folder
    finally:
        os.close(fd)  # releases the lock


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:  # removed by the run that held it
        return False


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling, so readers never see half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
