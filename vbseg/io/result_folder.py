"""Output folders and files: checked, locked, written whole or not at all (``segment`` and its
batches, and ``experiment``, ``fit-prior``, ``train``, ``calibrate``).

:func:`check_output_folder` and :func:`check_outputs` refuse, before any work, a folder that
cannot be one (empty name, dangling symbolic link, a file, not writable, a name longer than the
file system allows) and outputs that may not be written (an input, or existing without
``--overwrite``); the other commands that write files use them too.

A result set (prob.nii.gz, contour_*.nii.gz, summary.json, overview.png, and the maps and DICOM
files some options add) is only meaningful as a whole: summary.json describes the other files.
So :func:`result_folder` hands the run a temporary folder inside ``--out`` (``.vbseg-partial-*``,
on the same file system, so the final moves are renames), and only when everything is written
moves the files into place, ``summary.json`` last, with Ctrl-C held back for those few renames.
An error or Ctrl-C before then removes the temporary folder: ``--out`` holds the previous
result set, untouched, or nothing. With ``--overwrite`` the previous set's files that this run
does not write (contours of other levels, an intensity field, DICOM outputs) are removed, so
summary.json never sits next to files it does not describe; files vbseg does not write, and
inputs, are never removed.

Two runs into one folder would interleave their files, so a run holds a lock file
(``.vbseg.lock``, created with O_EXCL, holding "PID HOST") from before the inputs are read
until its files are in place. A second run is refused with one line. A lock is stale when its
process is gone: a lock from this host whose PID no longer runs is taken over (two runs that
find the same stale lock at the same instant can both take it: the check is not atomic); a
lock from another host (a shared file system) or one that cannot be read is never judged
stale: the message says to remove it when no run is writing.

The other commands that write files use the same code. ``fit-prior``, ``train`` and
``calibrate`` write one or two files (a prior, a checkpoint and its JSON, a calibration):
:func:`output_files` stages them in a temporary folder beside their destination and moves them
into place together, under a lock of their own, ``.<file name>.vbseg.lock``, so two runs writing
one file are refused while runs writing other files in the same folder go on. ``experiment``
holds its output folder's lock for the whole sweep (:func:`locked_folder`; each shard of
``--shard`` its own, ``.vbseg-shard-I-of-N.lock``, since shards share the folder by design); its
runs are staged one by one (:mod:`vbseg.experiment.task`). ``segment --batch`` holds ``--out``'s
lock while its cases run.

Ctrl-C is held back for the final renames and the removal of the lock
(:func:`vbseg.interrupts.interrupts_held`); the test hook that pauses a run at "publish" is
:func:`vbseg.interrupts.pause_point`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

from vbseg.errors import OutputError
from vbseg.interrupts import interrupts_held, pause_point

LOCK_NAME = ".vbseg.lock"
LOCK_SUFFIX = ".vbseg.lock"
STAGING_PREFIX = ".vbseg-partial-"


def _name_limits(existing: Path) -> tuple[int, int]:
    """(longest file name, longest path) in bytes on the file system of ``existing``."""
    limits = []
    for name, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits.append(os.pathconf(existing, name))
        except (OSError, ValueError, AttributeError):
            limits.append(default)
    return limits[0], limits[1]


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists; OutputError for a dangling symbolic link on
    the way."""
    existing = path
    # os.path's tests, not Path's: they answer False for a name too long instead of raising
    while not os.path.exists(existing) and existing != existing.parent:
        if os.path.islink(existing):
            raise OutputError(existing, "is a dangling symbolic link (its target does not exist)")
        existing = existing.parent
    return existing


def check_output_folder(out_dir) -> Path:
    """Refuse an output folder that is empty (""), a dangling symbolic link (or lies under one),
    a file (or lies under one), not writable, or a name longer than the file system allows;
    returns it as a Path. Everything here is known before any work is done."""
    if os.fspath(out_dir) == "":
        raise OutputError("--out", "is empty; name an output folder")
    out = Path(out_dir)
    existing = existing_ancestor(out)
    name_max, path_max = _name_limits(existing)
    longest = max(len(os.fsencode(part)) for part in out.parts)
    if longest > name_max:
        raise OutputError(out, f"a name in this path is longer than the file system allows "
                               f"({longest} bytes, at most {name_max})")
    if len(os.fsencode(os.path.abspath(out))) >= path_max:
        raise OutputError(out, f"the path is longer than the file system allows (at most {path_max} "
                               "bytes)")
    if existing.exists() and not existing.is_dir():
        raise OutputError(existing, "exists and is not a directory; choose another output folder")
    if existing.exists() and not os.access(existing, os.W_OK):
        raise OutputError(existing, "is not writable")
    return out


def check_outputs(out_dir, names, input_paths, overwrite: bool) -> None:
    """Refuse an output that is an input, is not a regular file, or exists without ``overwrite``."""
    out = check_output_folder(out_dir)
    inputs = {os.path.realpath(p) for p in input_paths}
    for name in names:
        target = out / name
        if os.path.realpath(target) in inputs:
            raise OutputError(target, "is one of the inputs; choose another --out")
        if target.exists() and not target.is_file():
            raise OutputError(target, "exists and is not a regular file")
        if target.exists() and not overwrite:
            raise OutputError(target, "already exists (use --overwrite to replace it)")


def lock_owner_gone(text: str) -> bool:
    """True when the lock's "PID HOST" names a process of this host that no longer runs."""
    try:
        pid_text, host = text.split()
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # runs, as another user
        return False
    return False


@contextlib.contextmanager
def held_lock(folder, name: str = LOCK_NAME):
    """Hold ``folder/<name>`` (default ``.vbseg.lock``) for the block (module doc: who holds it,
    when it is stale)."""
    path = Path(folder) / name
    for attempt in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            try:
                owner = path.read_text()
            except FileNotFoundError:  # its run just finished
                continue
            if attempt == 0 and lock_owner_gone(owner):
                path.unlink(missing_ok=True)
                continue
            raise OutputError(path, f"another vbseg run (pid {' on '.join(owner.split()) or 'unknown'}) "
                                    "is writing into this folder; wait for it, or remove this file "
                                    "if no run is") from None
    else:
        raise OutputError(path, "could not be created (another run keeps taking it)")
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
    try:
        yield path
    finally:
        with interrupts_held():  # a second Ctrl-C must not leave the lock behind
            path.unlink(missing_ok=True)


def publish(staging: Path, out: Path, inputs, overwrite: bool, previous_set=None) -> None:
    """Move every file of ``staging`` into ``out``, summary.json last; with ``overwrite``,
    remove the previous result set's files (``previous_set(out)``; None: no set) this run did
    not write (never an input)."""
    staged = sorted(p.name for p in staging.iterdir())
    stale = previous_set(out) - set(staged) if overwrite and previous_set is not None else set()
    kept = {os.path.realpath(p) for p in inputs}
    for name in staged:
        if name != "summary.json":
            os.replace(staging / name, out / name)
    for name in sorted(stale):
        target = out / name
        if target.is_file() and os.path.realpath(target) not in kept:
            target.unlink()
    if "summary.json" in staged:
        os.replace(staging / "summary.json", out / "summary.json")


def made_folders(out: Path) -> list[Path]:
    """Create ``out`` with its missing parents; returns the folders created, deepest first."""
    missing = []
    folder = out
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    out.mkdir(parents=True, exist_ok=True)
    return missing


@contextlib.contextmanager
def locked_folder(out, lock_name: str = LOCK_NAME):
    """Check ``out`` (:func:`check_output_folder`), create it with its missing parents and hold
    its lock ``lock_name`` for the block; yields (out, the folders created, deepest first). On
    an error or Ctrl-C the lock goes, and so do the folders created when still empty."""
    out = check_output_folder(out)
    created = made_folders(out)
    try:
        with held_lock(out, lock_name):
            yield out, created
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


@contextlib.contextmanager
def result_folder(out, names, inputs, overwrite: bool, *, lock_name: str = LOCK_NAME,
                  previous_set=None):
    """Yield a temporary folder inside ``out`` to write a result set into (module doc).

    Checks first that ``out`` can be a folder and that ``names`` (the files this run writes)
    may be written there (:func:`check_outputs`: not an input, not existing
    without ``overwrite``); takes the lock ``lock_name``; on success moves the files into place
    (:func:`publish`; ``previous_set(out)``: the previous set's files that ``overwrite``
    removes, e.g. :func:`vbseg.posterior.result_set_names`; None: none).
    On any error or Ctrl-C the temporary folder, the lock, and the folders this call created
    (when still empty) are removed.
    """
    with locked_folder(out, lock_name) as (out, _):
        check_outputs(out, names, inputs, overwrite)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
        try:
            yield staging
            pause_point("publish")
            with interrupts_held():
                publish(staging, out, inputs, overwrite, previous_set)
        finally:
            with interrupts_held():  # nor the temporary folder
                shutil.rmtree(staging, ignore_errors=True)


def file_lock_name(path, name_max: int = 255) -> str:
    """The lock of one output file: ``.<its name>.vbseg.lock`` beside it, or, when that would be
    longer than ``name_max`` bytes, ``.<sha256 of its name, 16 hex>.vbseg.lock``."""
    name = Path(path).name
    lock = f".{name}{LOCK_SUFFIX}"
    if len(os.fsencode(lock)) <= name_max:
        return lock
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:16]}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_files(paths, inputs, overwrite: bool):
    """Yield a temporary folder to write the files ``paths`` (all in one folder) into, each
    under its own name; moved into place together when the block ends without an error (module
    doc: the lock is the first file's, :func:`file_lock_name`). Refused before the block when
    one is an input or exists without ``overwrite``."""
    paths = [Path(path) for path in paths]
    folder = paths[0].parent
    if any(path.parent != folder for path in paths):
        raise ValueError(f"output files in several folders: {paths}")
    name_max = _name_limits(existing_ancestor(folder))[0]
    for path in paths:
        if len(os.fsencode(path.name)) > name_max:
            raise OutputError(path, f"the file name is longer than the file system allows "
                                    f"({len(os.fsencode(path.name))} bytes, at most {name_max})")
    with result_folder(folder, [path.name for path in paths], inputs, overwrite,
                       lock_name=file_lock_name(paths[0], name_max), previous_set=None) as staging:
        yield staging
