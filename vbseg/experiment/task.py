"""One task of an experiment: a run fitted, scored and recorded, or a per-cohort stage.

A sweep is a list of :class:`Task` objects with dependencies (:func:`plan_tasks`): one task per
unfinished run, and, for leave-one-out priors, one task per case and stage of each cohort
(:class:`vbseg.cohort.population.LeaveOneOutCohort`: every case's constrained fit, then every case's
volume-error entry, then the runs). Executors (:mod:`vbseg.experiment.local_pool` here,
:mod:`vbseg.experiment.cluster` on Dask) only order and place them.

An engine may run a task twice (a worker thought dead still finishes, a task is rescheduled), so
:func:`execute` is idempotent: it first returns the stored record of a finished run, and a new
run is written into a temporary folder (``<out>/.staging/<run id>.<pid>.<random>.<host>``,
``result.json`` last) that is renamed into ``runs/<id>`` as a whole. The run folders stay the
only source of truth: a folder with a ``result.json`` is complete, whoever wrote it; a failed
run's folder is replaced by a later attempt, a finished one never is. Stages write their cached
fits atomically (:class:`~vbseg.cohort.population.LeaveOneOutCohort`), so they are idempotent too.

A score added after some runs had finished (``LATE_SCORES``: surface Dice at 5 mm) is computed
for them from their saved ``prob.nii.gz`` and the truth as the run had it, when a sweep finds
them finished (:func:`rescore`): the record is rewritten atomically with the score added, only
when the saved map reproduces the stored Dice50 and surface Dice at 2 mm exactly (else it is
not the map that was scored).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from vbseg.cohort.population import LeaveOneOutCohort
from vbseg.errors import InputError
from vbseg.experiment.config import LEAVE_ONE_OUT, Run, result_path, segment_kwargs
from vbseg.io.image import Volume
from vbseg.io.result_folder import lock_owner_gone
from vbseg.io.volume import read_label
from vbseg.io.writing import save_nifti, write_text_atomic
from vbseg.metrics import (
    brier_score,
    crps_from_draws,
    dice,
    expected_calibration_error,
    interval_score,
    reliability_sums,
    surface_metrics,
    voi_diagonal_mm,
)
from vbseg.phantoms import PhantomSpec, lesion_voi, make_phantom
from vbseg.pipeline import segment
from vbseg.posterior import Posterior

STAGING = ".staging"
PHANTOMS = "phantoms"


def stored_record(out: Path, run: Run) -> dict | None:
    """The result record of a finished run (status "ok"), or None."""
    try:
        record = json.loads(result_path(Path(out), run).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") == "ok" else None


def is_finished(out: Path, run: Run) -> bool:
    return stored_record(out, run) is not None


def _case_inputs(run: Run, out: Path):
    """(image paths, modalities, truth mask, truth fraction or None, true volume mL, spacing,
    VOI mask path or None).

    Phantoms also give the exact partial-volume fraction of each voxel inside a lesion, against
    which their calibration is measured; real cases have only the manual mask. A phantom's
    images are written once per case under ``out/phantoms/<case>`` (every variant reads the
    same deterministic files; summary.json names them), with ``voi.nii.gz`` when the case has a
    ``voi_margin_mm`` ([phantoms] voi_margin_mm: the fit sees a spherical VOI of the lesion's
    radius + that margin, :func:`vbseg.phantoms.lesion_voi`; without it, the whole grid).
    """
    case = run.case
    if case["kind"] == "phantom":
        spec = dict(case["spec"])
        if "spacing_mm" in spec:
            spec["spacing_mm"] = tuple(spec["spacing_mm"])
        phantom = make_phantom(PhantomSpec(diameters_mm=(spec.pop("diameters_mm"),), **spec),
                               seed=case["seed"])
        pet = out / PHANTOMS / case["name"] / "pet.nii.gz"
        if not pet.is_file():  # written atomically, the same bytes by whoever writes it
            phantom.save(pet.parent)
        voi = None
        if case.get("voi_margin_mm") is not None:
            voi = pet.parent / "voi.nii.gz"
            if not voi.is_file():
                save_nifti(voi, lesion_voi(phantom, case["voi_margin_mm"]).astype(np.uint8),
                           phantom.pet.affine)
            voi = str(voi)
        return ([str(pet)], ["pet"], phantom.truth, phantom.truth_fraction, phantom.volume_ml,
                phantom.pet.spacing, voi)
    truth, affine = read_label(case["label"])
    spacing = tuple(float(s) for s in Volume(truth, affine).spacing)
    return (case["images"], case["modalities"], truth, None,
            float(truth.sum() * np.prod(spacing) / 1000.0), spacing, None)


@dataclass(frozen=True, eq=False)
class CaseFit:
    """One case fitted: the posterior, the truth mask on its grid, the exact partial-volume
    fraction (phantoms) or None, the true volume (mL) and the voxel spacing (mm)."""

    posterior: Posterior
    truth: np.ndarray
    fraction: np.ndarray | None
    true_ml: float
    spacing: tuple


def cohort(case: dict, out: Path) -> LeaveOneOutCohort:
    """The leave-one-out cohort of a real case, its fits cached under ``out/priors``."""
    return LeaveOneOutCohort(case["index"], case["modalities"], case["cohort"], Path(out) / "priors")


def fit_case(run: Run, folder: Path, out: Path | None, experiment_out: Path | None = None) -> CaseFit:
    """Fit one (case, variant): phantom inputs are written under ``folder`` (once per case), the
    outputs into ``out`` (None: none written); ``experiment_out`` holds the leave-one-out
    priors' cache."""
    images, modalities, truth, fraction, true_ml, spacing, roi = _case_inputs(run, Path(folder))
    kwargs = segment_kwargs(run.variant, run.case)
    if kwargs.get("prior") == LEAVE_ONE_OUT:
        kwargs["prior"] = cohort(run.case, experiment_out).prior(run.case["index_case"])
    posterior = segment(images, out, modalities=modalities, roi=roi, seed=run.case["seed"],
                        overwrite=True, title=run.case["name"], **kwargs)
    if posterior.probability.shape != truth.shape:
        raise InputError(run.case.get("label", "truth"), "is not on the first image's grid")
    return CaseFit(posterior, truth, fraction, true_ml, spacing)


def _base_record(run: Run) -> dict:
    return {"run_id": run.run_id, "case": run.case["name"], "variant": run.variant_text,
            "settings": run.variant, "case_spec": run.case, "seed": run.case["seed"],
            "worker": {"host": socket.gethostname(), "pid": os.getpid()}}


# surface Dice tolerances besides the 2 mm one (sdice_2mm): every run's sdice_<t>mm
MORE_TOLERANCES_MM = (5.0,)


def _scores(fit: CaseFit) -> dict:
    posterior, truth = fit.posterior, fit.truth
    volume = posterior.volume_interval()
    contour = posterior.probability >= 0.5
    surface = surface_metrics(contour, truth, fit.spacing, tolerance_mm=2.0,
                              more_tolerances_mm=MORE_TOLERANCES_MM)
    if truth.any() and not contour.any():  # nothing found: as far off as the VOI allows
        voi = posterior.voi if posterior.voi is not None else np.ones(contour.shape, bool)
        surface["hd95_mm"] = voi_diagonal_mm(voi, fit.spacing)
    timings = posterior.summary["timings_s"]
    scores = {
        "status": "ok", "model": posterior.summary["model"],
        "dice50": dice(contour, truth), "hd95_mm": surface["hd95_mm"],
        "asd_mm": surface["asd_mm"], "sdice_2mm": surface["sdice"], "sdice_5mm": surface["sdice_5mm"],
        "vol_true_ml": fit.true_ml,
        "vol_mean_ml": volume["mean"], "vol_lower_ml": volume["lower"],
        "vol_upper_ml": volume["upper"],
        "covered": bool(volume["lower"] <= fit.true_ml <= volume["upper"]),
        "interval_score": interval_score(volume["lower"], volume["upper"], fit.true_ml),
        "crps_ml": crps_from_draws(posterior.volume_draws_ml, fit.true_ml),
        "ece": expected_calibration_error(posterior.probability, truth, posterior.voi),
        "brier": brier_score(posterior.probability, truth, posterior.voi),
        "compile_s": timings["compile"], "run_s": timings["run"],
        "warnings": [warning["code"] for warning in posterior.summary.get("warnings", [])],
        "fit_voxels": int(np.prod(posterior.probability.shape) if posterior.voi is None
                          else np.count_nonzero(posterior.voi)),
        "reliability": reliability_sums(posterior.probability, truth, posterior.voi),
    }
    if fit.fraction is not None:
        scores["reliability_fraction"] = reliability_sums(posterior.probability, fit.fraction,
                                                          posterior.voi)
    return scores


# scores a finished run's record may lack (it was scored before they were added): rescore()
LATE_SCORES = ("sdice_5mm",)


def rescore(run: Run, out) -> bool:
    """Add the ``LATE_SCORES`` a finished run's record lacks (module doc); returns whether the
    record was rewritten. False, and nothing written: nothing missing, not finished, no saved
    map, a map or truth that cannot be read (the run stays as it was), or a map that does not
    reproduce the stored Dice50 and surface Dice at 2 mm exactly."""
    path = result_path(Path(out), run)
    try:
        record = json.loads(path.read_text())
        saved = path.parent / "outputs" / "prob.nii.gz"
        if record.get("status") != "ok" or all(k in record for k in LATE_SCORES) or not saved.is_file():
            return False
        _, _, truth, _, _, spacing, _ = _case_inputs(run, Path(out))
        contour = np.asarray(nib.load(saved).dataobj, np.float32) >= np.float32(0.5)
    except Exception:  # a damaged file keeps its run as it was; the sweep goes on
        return False
    if contour.shape != truth.shape or dice(contour, truth) != record["dice50"]:
        return False
    surface = surface_metrics(contour, truth, spacing, tolerance_mm=2.0,
                              more_tolerances_mm=MORE_TOLERANCES_MM)
    if surface["sdice"] != record.get("sdice_2mm"):  # Dice alone does not pin the contour (e.g. 0)
        return False
    record.update({key: surface[key] for key in LATE_SCORES})
    write_text_atomic(path, json.dumps(record, indent=2, default=float) + "\n")
    return True


def _staging_folder(out: Path, run: Run) -> Path:
    folder = out / STAGING / f"{run.run_id}.{os.getpid()}.{secrets.token_hex(4)}.{socket.gethostname()}"
    folder.mkdir(parents=True)
    return folder


def remove_dead_attempts(out: Path) -> None:
    """Remove the staging folders of attempts whose process (on this host) is gone: a killed
    worker's half-written run. Attempts of other hosts are left to their own hosts."""
    try:
        names = os.listdir(Path(out) / STAGING)
    except OSError:
        return
    for name in names:
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[1].isdigit() and lock_owner_gone(f"{parts[1]} {parts[3]}"):
            shutil.rmtree(Path(out) / STAGING / name, ignore_errors=True)


def tidy_staging(out: Path) -> None:
    """At the end of a sweep: the dead attempts' folders go, and the staging folder when empty."""
    remove_dead_attempts(out)
    try:
        (Path(out) / STAGING).rmdir()
    except OSError:
        pass  # absent, or an attempt (of another host or shard) still writes there


def _publish(out: Path, run: Run, staging: Path, record: dict) -> dict:
    """Write ``record`` as staging/result.json (last), rename the folder into ``runs/<id>``;
    returns what ``runs/<id>`` then holds: this record, or a finished record written first by
    another attempt of the same run (which is never replaced)."""
    write_text_atomic(staging / "result.json", json.dumps(record, indent=2, default=float) + "\n")
    final = result_path(out, run).parent
    final.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        try:
            os.rename(staging, final)  # atomic; fails when final is a non-empty folder
            return record
        except OSError:
            stored = stored_record(out, run)
            if stored is not None:
                return stored
            # a failed (or pre-staging, half-written) attempt's folder: moved aside, then removed
            aside = out / STAGING / f"replaced.{run.run_id}.{secrets.token_hex(4)}"
            try:
                os.rename(final, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"{final}: could not be replaced (another attempt keeps writing it)")


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message``, as the results table shows a failure."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def execute(run: Run, out) -> dict:
    """Run one (case, variant) into ``out/runs/<id>`` (module doc: idempotent, written whole);
    returns its record. A run that fails records its error (status "failed")."""
    out = Path(out)
    stored = stored_record(out, run)
    if stored is not None:
        return stored
    remove_dead_attempts(out)
    staging = _staging_folder(out, run)
    try:
        record = _base_record(run)
        started = time.perf_counter()
        try:
            record.update(_scores(fit_case(run, out, staging / "outputs", out)))
        except Exception as error:  # a failed run is recorded and the sweep goes on
            record.update({"status": "failed", "error": describe_error(error),
                           "traceback": traceback.format_exc()})
        record["wall_s"] = time.perf_counter() - started
        return _publish(out, run, staging, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def record_failure(run: Run, out, reason: str) -> dict:
    """Record ``run`` as failed for a reason found outside it (its worker died, a stage it
    needs failed); a finished record of the run is kept. Returns the run's record."""
    out = Path(out)
    stored = stored_record(out, run)
    if stored is not None:
        return stored
    staging = _staging_folder(out, run)
    try:
        return _publish(out, run, staging, {**_base_record(run), "status": "failed",
                                            "error": reason, "wall_s": None})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- the task graph ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """``function(*args)`` once the tasks named in ``after`` have succeeded. ``key`` is unique
    in a sweep; ``run`` is the run a run task records (None for a stage, which returns None)."""

    key: str
    function: Callable
    args: tuple
    after: tuple[str, ...] = ()
    run: Run | None = None


def call_task(function, args, after=()):
    """What an engine calls: ``after`` (the dependencies' results) only orders the call."""
    del after
    return function(*args)


def cohort_stage(case: dict, out: str, stage: str, name: str) -> None:
    """One stage of a leave-one-out cohort for case ``name`` ("statistics" or "entry")."""
    folds = cohort(case, Path(out))
    if stage == "statistics":
        folds.statistics(name)
    else:
        folds.entry(name)


def plan_tasks(todo: list[Run], out) -> list[Task]:
    """The tasks of the runs ``todo`` in dependency order: each leave-one-out cohort's stages
    (every case's constrained fit, then every case's entry) before its runs."""
    out = str(out)
    tasks, cohort_keys = [], {}
    for run in todo:
        after = ()
        if run.variant.get("prior") == LEAVE_ONE_OUT:
            case = run.case
            tag = (case["index"], tuple(case["modalities"]), tuple(case["cohort"]))
            if tag not in cohort_keys:
                label = "{}-{}".format("+".join(case["modalities"]), hashlib.sha256(
                    json.dumps(tag).encode()).hexdigest()[:8])
                stats = [Task(f"statistics-{label}-{name}", cohort_stage, (case, out, "statistics", name))
                         for name in case["cohort"]]
                entries = [Task(f"entry-{label}-{name}", cohort_stage, (case, out, "entry", name),
                                after=tuple(t.key for t in stats)) for name in case["cohort"]]
                tasks += stats + entries
                cohort_keys[tag] = tuple(t.key for t in entries)
            after = cohort_keys[tag]
        tasks.append(Task(f"run-{run.run_id}", execute, (run, out), after, run))
    return tasks
