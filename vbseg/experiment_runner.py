"""Running an experiment: each unfinished (case, variant) of a sweep, resumably, then the tables.

:mod:`vbseg.experiment` reads and validates the config and names each run's folder; this module
runs them (in this process or in spawned workers), records each run's result.json atomically and
last, and rebuilds results.csv / results.md with :mod:`vbseg.results`. Apart from the config so
that the tables (which read the config's runs) and the runner (which writes them) do not import
each other.
"""

from __future__ import annotations

import json
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from vbseg.compilation_cache import enable_compilation_cache
from vbseg.errors import InputError
from vbseg.experiment import LEAVE_ONE_OUT, Experiment, Run, result_path, segment_kwargs
from vbseg.metrics import (
    brier_score,
    crps_from_draws,
    dice,
    expected_calibration_error,
    interval_score,
    reliability_sums,
    surface_metrics,
)
from vbseg.phantoms import PhantomSpec, make_phantom
from vbseg.pipeline import segment
from vbseg.population import leave_one_out_prior
from vbseg.posterior import Posterior
from vbseg.results import write_tables
from vbseg.writing import write_text_atomic


def is_finished(out: Path, run: Run) -> bool:
    path = result_path(out, run)
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def _case_inputs(run: Run, folder: Path):
    """(image paths, modalities, truth mask, truth fraction or None, true volume mL, spacing).

    Phantoms also give the exact partial-volume fraction of each voxel inside a lesion, against
    which their calibration is measured; real cases have only the manual mask.
    """
    case = run.case
    if case["kind"] == "phantom":
        spec = dict(case["spec"])
        phantom = make_phantom(PhantomSpec(diameters_mm=(spec.pop("diameters_mm"),), **spec),
                               seed=case["seed"])
        paths = phantom.save(folder / "inputs")
        return ([paths["pet"]], ["pet"], phantom.truth, phantom.truth_fraction, phantom.volume_ml,
                phantom.pet.spacing)
    label = nib.load(case["label"])
    truth = np.asarray(label.dataobj) > 0
    spacing = tuple(float(s) for s in label.header.get_zooms()[:3])
    return (case["images"], case["modalities"], truth, None,
            float(truth.sum() * np.prod(spacing) / 1000.0), spacing)


@dataclass(frozen=True, eq=False)
class CaseFit:
    """One case fitted: the posterior, the truth mask on its grid, the exact partial-volume
    fraction (phantoms) or None, the true volume (mL) and the voxel spacing (mm)."""

    posterior: Posterior
    truth: np.ndarray
    fraction: np.ndarray | None
    true_ml: float
    spacing: tuple


def fit_case(run: Run, folder: Path, out: Path | None, experiment_out: Path | None = None) -> CaseFit:
    """Fit one (case, variant): phantom inputs are written under ``folder``, the outputs into
    ``out`` (None: none written); ``experiment_out`` holds the leave-one-out priors' cache."""
    images, modalities, truth, fraction, true_ml, spacing = _case_inputs(run, folder)
    kwargs = segment_kwargs(run.variant)
    if kwargs.get("prior") == LEAVE_ONE_OUT:
        kwargs["prior"] = _leave_one_out_prior(run.case, experiment_out)
    posterior = segment(images, out, modalities=modalities, seed=run.case["seed"], overwrite=True,
                        title=run.case["name"], **kwargs)
    if posterior.probability.shape != truth.shape:
        raise InputError(run.case.get("label", "truth"), "is not on the first image's grid")
    return CaseFit(posterior, truth, fraction, true_ml, spacing)


def execute(run: Run, out: Path) -> dict:
    """Run one (case, variant); write its outputs and result.json (atomically, last)."""
    folder = out / "runs" / run.run_id
    folder.mkdir(parents=True, exist_ok=True)
    record = {"run_id": run.run_id, "case": run.case["name"], "variant": run.variant_text,
              "settings": run.variant, "case_spec": run.case, "seed": run.case["seed"]}
    started = time.perf_counter()
    try:
        fit = fit_case(run, folder, folder / "outputs", out)
        posterior, truth, fraction, true_ml, spacing = (fit.posterior, fit.truth, fit.fraction,
                                                        fit.true_ml, fit.spacing)
        volume = posterior.volume_interval()
        contour = posterior.probability >= 0.5
        surface = surface_metrics(contour, truth, spacing, tolerance_mm=2.0)
        timings = posterior.summary["timings_s"]
        record.update({
            "status": "ok", "model": posterior.summary["model"],
            "dice50": dice(contour, truth), "hd95_mm": surface["hd95_mm"],
            "asd_mm": surface["asd_mm"], "sdice_2mm": surface["sdice"], "vol_true_ml": true_ml,
            "vol_mean_ml": volume["mean"], "vol_lower_ml": volume["lower"],
            "vol_upper_ml": volume["upper"],
            "covered": bool(volume["lower"] <= true_ml <= volume["upper"]),
            "interval_score": interval_score(volume["lower"], volume["upper"], true_ml),
            "crps_ml": crps_from_draws(posterior.volume_draws_ml, true_ml),
            "ece": expected_calibration_error(posterior.probability, truth, posterior.voi),
            "brier": brier_score(posterior.probability, truth, posterior.voi),
            "compile_s": timings["compile"], "run_s": timings["run"],
            "warnings": [warning["code"] for warning in posterior.summary.get("warnings", [])],
            "fit_voxels": int(np.prod(posterior.probability.shape) if posterior.voi is None
                              else np.count_nonzero(posterior.voi)),
            "reliability": reliability_sums(posterior.probability, truth, posterior.voi),
        })
        if fraction is not None:
            record["reliability_fraction"] = reliability_sums(posterior.probability, fraction,
                                                              posterior.voi)
    except Exception as error:  # a failed run is recorded and the sweep goes on
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        record.update({"status": "failed", "error": f"{type(error).__name__}: {message}",
                       "traceback": traceback.format_exc()})
    record["wall_s"] = time.perf_counter() - started
    write_text_atomic(folder / "result.json", json.dumps(record, indent=2, default=float) + "\n")
    return record


def _leave_one_out_prior(case: dict, out: Path):
    """The prior learned from the case's cohort without it (cached under ``out/priors``)."""
    return leave_one_out_prior(case["index"], case["modalities"], case["cohort"], case["index_case"],
                               out / "priors")


def _execute_in_child(args):
    run, out = args
    enable_compilation_cache()
    return execute(run, Path(out))


def run_experiment(experiment: Experiment, out, *, jobs: int = 1, progress: bool = True) -> dict:
    """Run every unfinished run of ``experiment`` into ``out``; rebuild the tables.

    Returns {"runs", "skipped", "failed", "table"}. ``jobs`` > 1 runs cases in that many spawned
    processes (JAX does not survive fork).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [run for run in experiment.runs if not is_finished(out, run)]
    # leave-one-out priors: the per-case fits they share are cached once, here, before any
    # worker starts (one run per cohort fills the cache)
    cohorts = {}
    for run in todo:
        if run.variant.get("prior") == LEAVE_ONE_OUT:
            cohorts.setdefault((run.case["index"], tuple(run.case["modalities"])), run.case)
    for case in cohorts.values():
        _leave_one_out_prior(case, out)
    skipped = len(experiment.runs) - len(todo)
    bar = tqdm(total=len(experiment.runs), initial=skipped, unit="run", disable=not progress,
               desc=experiment.name, dynamic_ncols=True)
    failed = 0
    try:
        if jobs <= 1:
            for run in todo:
                bar.set_postfix_str(run.label)
                failed += execute(run, out)["status"] != "ok"
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
                for record in pool.map(_execute_in_child, [(run, str(out)) for run in todo]):
                    bar.set_postfix_str(record["case"])
                    failed += record["status"] != "ok"
                    bar.update(1)
    finally:
        bar.close()
        table = write_tables(experiment, out)
    return {"runs": len(experiment.runs), "skipped": skipped, "failed": failed, "table": table}
