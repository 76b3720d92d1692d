"""``vbseg calibrate``: fit every case of a one-variant experiment config and record what
:mod:`vbseg.calibration` needs to calibrate a new case's outputs (the model intervals, true
volumes, log-volume scores, false-negative-rate curves and margins, with the fit's identity).

Kept apart from :mod:`vbseg.calibration`, which the pipeline imports to apply a calibration:
this module runs the experiment machinery, which itself runs the pipeline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from vbseg import __version__
from vbseg.calibration import (
    CALIBRATION_FORMAT,
    CALIBRATION_VERSION,
    LAMBDA_GRID,
    MARGIN_CONTOUR_LEVEL,
    MODEL_CODE,
    MODEL_INTERVAL_LEVEL,
    case_scores,
    fit_identity,
    model_digest,
    strata_spec,
    stratify,
)
from vbseg.errors import InputError
from vbseg.experiment import LEAVE_ONE_OUT, input_files, load_experiment, segment_kwargs
from vbseg.experiment_task import fit_case
from vbseg.options import SegmentOptions
from vbseg.population import source_digest
from vbseg.result_folder import output_files
from vbseg.volume import sha256_file, write_text_atomic


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
    return experiment.runs, variant, list(modality_sets.pop())


def calibrate(config, out, *, strata: dict | None = None, command: str = "", overwrite: bool = False,
              progress=None) -> dict:
    """Fit every case of ``config`` (one model variant) and write the calibration JSON to ``out``
    (checked, locked and staged beside it: :func:`vbseg.result_folder.output_files`); returns
    it. ``strata``: the Mondrian strata (:func:`vbseg.calibration.strata_spec`; default none),
    fixed before any fit. InputError (one line) for a bad config, a case that
    cannot be fitted, or a non-empty stratum with fewer than 19 cases (nothing is written)."""
    out = Path(out)
    strata = strata_spec() if strata is None else strata
    runs, variant, modalities = calibration_runs(config)
    options = SegmentOptions(**segment_kwargs(variant))
    identity = fit_identity(options, modalities)
    with output_files([out], [config, *input_files(runs)], overwrite) as staging:
        record = calibration_record(config, runs, variant, identity, strata, command, progress)
        write_text_atomic(staging / out.name, json.dumps(record, indent=2) + "\n")
    return record


def calibration_record(config, runs, variant, identity: dict, strata: dict, command: str,
                       progress=None) -> dict:
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
        cases.append({"name": run.case["name"], "case": run.case, **scores})
    record = {
        "format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "command": command,
        "config": str(Path(config).resolve()), "config_sha256": sha256_file(config),
        "vbseg_version": __version__, "source_digest": source_digest(),
        "model_digest": model_digest(), "model_code": list(MODEL_CODE),
        "settings": variant, **identity,
        "model_interval_level": MODEL_INTERVAL_LEVEL, "lambda_grid": LAMBDA_GRID.tolist(),
        "margin_contour_level": MARGIN_CONTOUR_LEVEL, "cases": cases,
    }
    return stratify(record, strata, config)
