"""``vbseg calibrate``: fit every case of a one-variant experiment config and record what
:mod:`vbseg.calibration.calibration_file` needs to calibrate a new case's outputs (the model intervals, true
volumes, log-volume scores, false-negative-rate curves and margins, with the fit's identity).

Kept apart from :mod:`vbseg.calibration.calibration_file`, which the pipeline imports to apply a calibration:
this module runs the experiment machinery, which itself runs the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path

from vbseg import __version__
from vbseg.calibration.calibration_file import (
    CALIBRATION_FORMAT,
    CALIBRATION_VERSION,
    CROSS_FIT,
    LAMBDA_GRID,
    MARGIN_CONTOUR_LEVEL,
    MODEL_CODE,
    MODEL_INTERVAL_LEVEL,
    PHANTOM_PSF,
    RISK_MARGIN_GRID_MM,
    SPLIT,
    case_scores,
    fit_identity,
    model_digest,
    scheme_guarantee,
    strata_spec,
    stratify,
)
from vbseg.cohort.method_error import method_calibrations
from vbseg.cohort.population import resolve_prior, source_digest
from vbseg.errors import InputError
from vbseg.experiment.config import (
    LEAVE_ONE_OUT,
    input_files,
    load_experiment,
    phantom_psf_mm,
    segment_kwargs,
)
from vbseg.experiment.folds import fold_prior, load_folds
from vbseg.experiment.task import fit_case
from vbseg.io.cases import read_cases
from vbseg.io.result_folder import output_files
from vbseg.io.volume import sha256_file, write_text_atomic
from vbseg.options import SegmentOptions


def calibration_runs(config):
    """The experiment config's runs and its one variant; InputError (one line) for a sweep, a
    leave-one-out prior or cases with different modalities."""
    experiment = load_experiment(config)
    variants = {json.dumps(run.variant, sort_keys=True) for run in experiment.runs}
    if len(variants) > 1:
        raise InputError(config, f"[model] sweeps {len(variants)} variants; a calibration is of one "
                                 "model variant (give each [model] setting one value)")
    variant = experiment.runs[0].variant
    if variant.get("prior") == LEAVE_ONE_OUT:
        raise InputError(config, "[model] prior = \"leave-one-out\": a calibration needs one fixed "
                                 "model (give a prior JSON or name)")
    modality_sets = {tuple(run.case.get("modalities", ["pet"])) for run in experiment.runs}
    if len(modality_sets) > 1:
        raise InputError(config, "cases have different modalities; a calibration is of one set")
    return experiment.runs, variant, list(modality_sets.pop()), experiment.index


def psf_entries(runs, variant) -> dict:
    """With ``[model] psf_fwhm_mm = "phantom"``: the FWHM range (mm) of the cases' scanner PSFs and
    their values, which the record states and a new case's --psf-fwhm must lie in; else none."""
    if variant.get("psf_fwhm_mm") != PHANTOM_PSF:
        return {}
    values = sorted({phantom_psf_mm(run.case) for run in runs})
    return {"psf_fwhm_mm_range": [values[0], values[-1]], "psf_fwhm_mm_values": values}


def attribution(runs, index) -> str:
    """The licences (with their attribution) of the real cases among ``runs`` as the cases
    ``index`` states them; empty for phantoms."""
    real = [run.case for run in runs if run.case["kind"] == "real"]
    if not real:
        return ""
    cases = read_cases(index, real[0]["modalities"], [case["name"] for case in real])
    return "; ".join(sorted({case.licence for case in cases if case.licence}))


def cross_fit_runs(config, runs, variant, modalities, index, folds_path, prior_folder, command="",
                   progress=None):
    """(runs with each case's fold prior in place of the config's, the record's ``cross_fit``
    entry). The config's prior is the deployed one, learned from every case of the folds; fold
    k's prior (``prior_folder``/fold<k>.json, fitted when absent: :func:`vbseg.experiment.folds.fold_prior`)
    is learned from the other folds' cases, so each case is fitted by a prior that never saw it.
    InputError (one line) when the config has no prior, its cases are not the folds' cases, or
    the deployed prior was learned from other cases, modalities or classes than the fold priors."""
    if "prior" not in variant:
        raise InputError(config, "--folds: [model] needs the deployed prior (a JSON or a packaged name); "
                                 "each case is fitted with its fold's prior in its place")
    record = load_folds(folds_path)
    names = {run.case["name"] for run in runs}  # one modality set: the index's names
    if any(run.case["kind"] != "real" for run in runs) or names != set(record["cases"]):
        raise InputError(config, f"--folds: the config's cases are not the {len(record['cases'])} cases of "
                                 f"{folds_path} (a cross-fitted calibration is over every case of the folds)")
    deployed = resolve_prior(variant["prior"])
    if sorted(deployed.cases) != sorted(record["cases"]):
        raise InputError(config, f"--folds: the deployed prior was learned from {len(deployed.cases)} cases, "
                                 f"not the folds' {len(record['cases'])}: the folds do not describe it")
    fold_of = {name: fold for fold, members in enumerate(record["folds"]) for name in members}
    # a deployed prior that carries methods' volume errors needs fold priors that carry theirs,
    # learned inside each fold, or the cases' scores would not be the deployed model's
    methods = sorted(deployed.method_calibrations)

    def method_errors(cases, training, statistics):
        return method_calibrations(methods, cases, training, statistics, modalities,
                                   num_tumour=deployed.num_tumour,
                                   interaction=deployed.interaction is not None, progress=progress)

    priors = []
    for fold in range(len(record["folds"])):
        if progress is not None:
            progress(f"fold {fold} prior")
        path = fold_prior(index, record, fold, modalities, Path(prior_folder) / f"fold{fold}.json",
                          command=f"{command} (fold {fold}'s prior)",
                          method_errors=method_errors if methods else None, methods=methods)
        learned = resolve_prior(path)
        if (learned.num_tumour, len(learned.class_names)) != (deployed.num_tumour, len(deployed.class_names)):
            raise InputError(path, "has other classes than the deployed prior (fit both with the same "
                                   "--classes)")
        priors.append({"fold": fold, "path": str(path.resolve()), "sha256": sha256_file(path),
                       "held_out": sorted(record["folds"][fold]), "training_cases": len(learned.cases)})
    fitted = [dataclasses.replace(run, variant={**variant, "prior": priors[fold_of[run.case["name"]]]
                                                ["path"]}) for run in runs]
    entry = {"folds": str(Path(folds_path).resolve()), "folds_sha256": sha256_file(folds_path),
             "k": len(record["folds"]), "fold_of": {name: fold_of[name] for name in sorted(fold_of)},
             "fold_priors": priors, "deployed_prior": {"name": str(variant["prior"]),
                                                        "cases": sorted(deployed.cases)}}
    return fitted, entry


def calibration_json(record: dict) -> str:
    """``record`` as indented JSON with each list of numbers, and each list of such lists, on one
    line (a case's risk curves hold hundreds of counts: one per line would triple the file).
    Only a list laid out over lines is joined, and a JSON string holds no raw line break, so no
    string is touched."""
    def join(match) -> str:
        return "[" + ", ".join(part.strip() for part in match.group(1).split(",\n")) + "]"

    number = r"-?[\d.eE+-]+"
    row = r"\[[-\d.eE+, ]*\]"  # a list of numbers already on one line (e.g. a curve's [value, repeats])
    text = re.sub(rf"\[\n\s*({number}(?:,\n\s*{number})*)\n\s*\]", join, json.dumps(record, indent=2))
    return re.sub(rf"\[\n\s*({row}(?:,\n\s*{row})*)\n\s*\]", join, text) + "\n"


def calibrate(config, out, *, strata: dict | None = None, command: str = "", overwrite: bool = False,
              progress=None, folds=None, fold_priors=None) -> dict:
    """Fit every case of ``config`` (one model variant) and write the calibration JSON to ``out``
    (checked, locked and staged beside it: :func:`vbseg.io.result_folder.output_files`); returns
    it. ``strata``: the Mondrian strata (:func:`vbseg.calibration.calibration_file.strata_spec`;
    default none), fixed before any fit. ``folds`` (a folds JSON, :mod:`vbseg.experiment.folds`)
    with ``fold_priors`` (a folder): a cross-fitted calibration (:func:`cross_fit_runs`): each
    case's scores come from a fit with its fold's prior, the identity (and the prior hash a new
    case must match) is the config's deployed prior's. InputError (one line) for a bad config, a
    case that cannot be fitted, or a non-empty stratum with fewer than 19 cases (nothing is written)."""
    out = Path(out)
    strata = strata_spec() if strata is None else strata
    if (folds is None) != (fold_priors is None):
        raise InputError("--folds", "and --fold-priors go together")
    runs, variant, modalities, index = calibration_runs(config)
    options = SegmentOptions.from_values(**segment_kwargs(variant))
    identity = fit_identity(options, modalities)
    with output_files([out], [config, *input_files(runs)], overwrite) as staging:
        cross_fit = None
        if folds is not None:
            runs, cross_fit = cross_fit_runs(config, runs, variant, modalities, index, folds,
                                             fold_priors, command, progress)
        record = calibration_record(config, runs, variant, identity, strata, command, progress,
                                    index=index, cross_fit=cross_fit)
        write_text_atomic(staging / out.name, calibration_json(record))
    return record


def calibration_record(config, runs, variant, identity: dict, strata: dict, command: str,
                       progress=None, *, index=None, cross_fit=None) -> dict:
    """Fit every run's case and return the calibration record (:func:`calibrate`)."""
    cases = []
    for number, run in enumerate(runs, start=1):
        if progress is not None:
            progress(f"case {number}/{len(runs)}: {run.case['name']}")
        with tempfile.TemporaryDirectory(prefix="vbseg-calibrate-") as folder:
            try:
                fit = fit_case(run, Path(folder), None)
                scores = case_scores(fit.posterior, fit.truth, fit.true_ml, fit.spacing)
            except InputError as error:
                raise InputError(config, f"case {run.case['name']}: {error}") from None
        warnings = [w.get("code") for w in fit.posterior.summary.get("warnings", [])]
        extra = {} if cross_fit is None else {"fold": cross_fit["fold_of"][run.case["name"]]}
        cases.append({"name": run.case["name"], "case": run.case, **scores, **extra, "warnings": warnings})
    scheme = SPLIT if cross_fit is None else CROSS_FIT
    record = {
        "format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "command": command,
        "config": str(Path(config).resolve()), "config_sha256": sha256_file(config),
        "vbseg_version": __version__, "source_digest": source_digest(),
        "model_digest": model_digest(), "model_code": list(MODEL_CODE),
        "settings": variant, **identity, **psf_entries(runs, variant), "scheme": scheme,
        "guarantee": scheme_guarantee(scheme),
        **({} if cross_fit is None else {"cross_fit": cross_fit}), "attribution": attribution(runs, index),
        "model_interval_level": MODEL_INTERVAL_LEVEL, "lambda_grid": LAMBDA_GRID.tolist(),
        "risk_margin_grid_mm": RISK_MARGIN_GRID_MM.tolist(),
        "margin_contour_level": MARGIN_CONTOUR_LEVEL, "cases": cases,
    }
    return stratify(record, strata, config)
