"""``vbseg segment --batch CASES.json --out DIR``: one segmentation per case of an index, with
the same options for every case, each into its own folder ``DIR/<case>/``.

The index is a CASES.json (:mod:`vbseg.io.cases`, the format of ../shared/data/cases.json), read
with three differences: a case's ``label`` is optional (when given, the first modality's label
is the case's reference delineation, ``segment --reference``); an entry may name a VOI mask,
``"roi": FILE`` (``segment --roi``; relative to the index's folder, like every file); and every
entry is taken, whatever its ``kind``. The images of a case are its modalities in the order
``--modality`` gives (the same for every case), or else all of them in the order pet, ct, mr,
other; the first defines the case's output grid, as in ``segment``.

Before the first fit, every case that will run is checked as ``segment`` checks its inputs
before reading a voxel (:func:`check_cases`): it has the modalities asked for, its files exist
and their headers read as 3D images, the options suit its modalities, its outputs may be
written. Any problem refuses the whole batch, nothing written: one line per bad case (an error
every case shares, such as a bad option, once). Each case then runs
:func:`vbseg.pipeline.segment`, so its result set is written whole or not at all
(:mod:`vbseg.io.result_folder`). A case is finished when ``DIR/<case>/summary.json`` exists (it is
the last file moved into place); a re-run skips finished cases unless ``overwrite``. A case that
fails while it runs (voxels that are NaN, a constant image) records its one-line error and the
batch goes on; an error in an option (its subject is ``--...``) would fail every case alike, so
it stops the batch. ``DIR/batch.json`` records every case (status, output folder, volume and interval,
error), rewritten atomically after each case; Ctrl-C stops the batch after recording it, and
the finished cases stay as they are. The batch holds ``DIR``'s lock (one batch per folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from pathlib import Path

from vbseg.errors import InputError, InputErrors, OutputError, VbsegError
from vbseg.io.cases import entry_modalities, read_index
from vbseg.io.image import MODALITIES
from vbseg.io.result_folder import check_output_folder, check_outputs, locked_folder
from vbseg.io.volume import read_image_grid
from vbseg.io.writing import write_text_atomic
from vbseg.pipeline import NOT_PLANNED, plan_segment, segment

BATCH_RECORD = "batch.json"
# a case's status in batch.json
DONE, SKIPPED, FAILED, NOT_RUN = "done", "skipped (finished before)", "failed", "not run"


@dataclasses.dataclass(frozen=True)
class BatchCase:
    """One case of a batch: its images in order, their modalities, its VOI mask and reference
    delineation (None when the index names none), or ``problem``: why it cannot run."""

    name: str
    images: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    roi: str | None = None
    reference: str | None = None
    problem: InputError | None = None


def check_case_name(index: str, name: str) -> None:
    """A case name is one folder name under ``--out``: not empty, no path separator, not
    hidden (vbseg's own files there start with '.'), not the batch record's name."""
    if not name or name.startswith(".") or "/" in name or os.sep in name or name == BATCH_RECORD:
        raise InputError(index, f"case name {name!r} cannot be a folder name (no '/', not starting "
                                f"with '.', not {BATCH_RECORD!r})")


def read_batch(index, modalities=None) -> list[BatchCase]:
    """The cases of the index (module doc); ``modalities`` (e.g. ["pet", "ct"]) chooses and
    orders every case's images, None: each case's own, pet first. InputError naming the index
    for a problem in its structure; a case without one of ``modalities`` gets a ``problem``."""
    index = os.fspath(index)
    for modality in modalities or ():
        if modality not in MODALITIES:
            raise InputError("--modality", f"unknown modality {modality!r} (one of {', '.join(MODALITIES)})")
    folder = Path(index).parent
    cases = []
    for name, entry in read_index(index).items():
        check_case_name(index, name)
        table = entry_modalities(index, entry, need_label=False)
        roi = entry.get("roi")
        if roi is not None and not (isinstance(roi, str) and roi):
            raise InputError(index, f"case {name!r}: 'roi' must be a file name")
        order = list(modalities) if modalities else [m for m in MODALITIES if m in table]
        missing = [m for m in order if m not in table]
        if missing:
            cases.append(BatchCase(name, problem=InputError(index, f"has no {', '.join(missing)} "
                                                                  "image")))
            continue
        label = table[order[0]].get("label")
        cases.append(BatchCase(name, tuple(str(folder / table[m]["image"]) for m in order), tuple(order),
                               None if roi is None else str(folder / roi),
                               None if not label else str(folder / label)))
    if not cases:
        raise InputError(index, "holds no case")
    return cases


def is_finished(folder: Path) -> bool:
    return (folder / "summary.json").is_file()


def check_case(case: BatchCase, folder: Path, overwrite: bool, segment_options: dict) -> None:
    """What ``segment`` checks before reading a voxel, for one case into ``folder``
    (:func:`vbseg.pipeline.plan_segment`, the outputs), and that its files exist and their
    headers read as 3D images (:func:`vbseg.io.volume.read_image_grid`; a DICOM folder is read
    when the case runs); InputError naming the file or option."""
    if case.problem is not None:
        raise case.problem
    for path in (*case.images, case.roi, case.reference):
        if path is not None and not os.path.isdir(path):
            read_image_grid(path)
    plan = plan_segment(case.images, modalities=list(case.modalities), roi=case.roi,
                        reference_mask=case.reference,
                        **{key: value for key, value in segment_options.items() if key not in NOT_PLANNED})
    check_outputs(folder, plan.outputs, plan.inputs, overwrite)


def check_cases(cases: list[BatchCase], out: Path, overwrite: bool, segment_options: dict) -> None:
    """:func:`check_case` for every case that will run (not those finished, without
    ``overwrite``); raises the problems of all of them together: the one error when every
    case checked has the same (a bad option), else :class:`~vbseg.errors.InputErrors`, one
    line per bad case naming it."""
    checked, problems = 0, []
    for case in cases:
        if not overwrite and is_finished(out / case.name):
            continue
        checked += 1
        try:
            check_case(case, out / case.name, overwrite, segment_options)
        except InputError as error:
            problems.append((case.name, error))
    if not problems:
        return
    if len(problems) == checked and len({str(error) for _, error in problems}) == 1:
        raise problems[0][1]
    raise InputErrors([InputError(error.subject, f"case {name}: {error.problem}")
                       for name, error in problems])


def finished_row(folder: Path) -> dict:
    """The model and volume interval a finished case's summary.json records (None each where
    it cannot be read)."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):
        return {"model": None, "volume_ml": None}
    return {"model": summary.get("model"), "volume_ml": volume_row(summary.get("volume_ml"))}


def volume_row(volume) -> dict | None:
    """The mean, bounds and level of a volume interval, or None when it lacks them."""
    try:
        return {key: volume[key] for key in ("mean", "lower", "upper", "level")}
    except (KeyError, TypeError):
        return None


def status_counts(rows: list[dict]) -> dict[str, int]:
    return {status: sum(row["status"] == status for row in rows)
            for status in (DONE, SKIPPED, FAILED, NOT_RUN)}


def write_record(out: Path, index: str, command: str, rows: list[dict]) -> None:
    record = {"index": os.path.abspath(index), "command": command, "counts": status_counts(rows),
              "cases": rows}
    write_text_atomic(out / BATCH_RECORD, json.dumps(record, indent=2) + "\n")


def run_batch(index, out, *, modalities=None, overwrite: bool = False, command: str = "",
              progress=None, **segment_options) -> dict:
    """Segment every case of ``index`` into ``out/<case>/`` (module doc); ``segment_options``
    are :func:`vbseg.pipeline.segment`'s (the same for every case; not ``roi``,
    ``reference_mask`` or ``modalities``, which are the cases'). ``progress(case, row)`` is
    called after each case. Returns the batch record's counts and rows.

    Raises InputError for a problem with the index, ``out`` or an option, and InputErrors for
    cases that cannot run (:func:`check_cases`), before any case runs (an option found wrong
    only while a case runs stops the batch there; the cases before it stay finished);
    KeyboardInterrupt after recording the cases not run.
    """
    index = os.fspath(index)
    cases = read_batch(index, modalities)
    out = check_output_folder(out)
    check_cases(cases, out, overwrite, segment_options)
    rows = [{"case": case.name, "status": NOT_RUN, "out": str(out / case.name), "model": None,
             "volume_ml": None, "error": None} for case in cases]
    with locked_folder(out) as (out, created):
        try:
            for case, row in zip(cases, rows):
                run_case(case, row, out / case.name, overwrite, segment_options)
                write_record(out, index, command, rows)
                if progress is not None:
                    progress(case, row)
        except InputError:  # an option's: a folder this run made is left empty, so removed
            if not created or any(row["status"] in (DONE, SKIPPED) for row in rows):
                write_record(out, index, command, rows)
            raise
        except KeyboardInterrupt:
            write_record(out, index, command, rows)
            raise
    return {"counts": status_counts(rows), "rows": rows, "record": out / BATCH_RECORD}


def run_case(case: BatchCase, row: dict, folder: Path, overwrite: bool, segment_options: dict) -> None:
    """Run one case (or skip it when finished), filling in its ``row``; an error in an option
    is raised (it would fail every case), any other error is the case's (an unexpected one with
    its traceback)."""
    if not overwrite and is_finished(folder):
        row.update(status=SKIPPED, **finished_row(folder))
        return
    started = time.perf_counter()
    try:
        posterior = segment(case.images, folder, modalities=list(case.modalities), roi=case.roi,
                            reference_mask=case.reference, overwrite=overwrite, **segment_options)
    except VbsegError as error:
        row.update(status=FAILED, error=str(error))
        if isinstance(error, InputError) and not isinstance(error, OutputError) \
                and error.subject.startswith("--"):
            raise
        return
    except Exception as error:  # a defect, not the user's: recorded whole, the batch goes on
        row.update(status=FAILED, error=f"internal error ({type(error).__name__}: {error})",
                   traceback=traceback.format_exc())
        return
    row.update(status=DONE, seconds=round(time.perf_counter() - started, 2), model=posterior.summary["model"],
               volume_ml=volume_row(posterior.volume_interval()))
