"""The between-patient volume error of a method that uses a population prior (``locate-potts``),
learned by leave-one-out over the prior's training cases: ``vbseg fit-prior
--calibrate-method locate-potts``.

The prior's own ``volume_calibration`` (:mod:`vbseg.cohort.volume_error`) is learned from the
prior method's contours; a method that only *uses* the prior (locate-potts: the prior locates,
hidden Potts delineates) makes different errors, so its volume error is learned from its own
contours: each training case j is segmented by that method (``vbseg.segment``, the method's
default options, no VOI: the whole crop, as the evaluation runs it) with the prior pooled from
the other cases' statistics, and its entry (manual and model volumes, Dice, located) goes into a
located-or-missed mixture whose located component is the regression of log manual volume on
log model volume (``located_model="regression"``). The result is stored in the prior's
``method_calibrations[method]`` and applied by that method to its volume draws, so its own 95 %
interval carries the error it makes on delineated cases, not only its within-scan spread.

The same runs teach locate-potts how far to trust its locator when the locator and the
delineation disagree (:mod:`vbseg.cohort.disagreement`): each run writes both answers, and a
case where they disagreed counts as a win for the answer closer to the manual GTV. The weights
from every case's record are stored with the volume error (``"disagreement"``); case j's own
entry uses the weights of the other cases' records, so its probability map (the mixture, when
they disagreed) and hence its volume entry are what locate-potts with those weights gives.

Case j's entry uses a prior that never saw case j; the mixture for a new scan uses every
training case's entry (none of them saw the new scan). Nested inside an evaluation fold (the
benchmark), nothing of the held-out fold enters either.
"""

from __future__ import annotations

import numpy as np

from vbseg.cohort.disagreement import (
    DELINEATION_FILE,
    LOCATOR_FILE,
    disagreement_record,
    disagreement_weights,
    held_out_weights,
    locator_weight,
)
from vbseg.cohort.population import TrainingCase, held_out_entry, prior_from_statistics
from vbseg.cohort.volume_error import calibration_from_entries
from vbseg.errors import InputError
from vbseg.io.cases import DelineatedCase
from vbseg.methods.registry import MethodResult, get_method
from vbseg.metrics import dice
from vbseg.pipeline import plan_segment
from vbseg.prepare import prepare

# Methods whose volume error fit-prior can learn: they take a prior and use it as it is
CALIBRATED_METHODS = ("locate-potts",)
LOCATED_MODEL = "regression"


def check_calibrate_methods(methods, modalities) -> list[str]:
    """The methods of ``--calibrate-method``; InputError naming the option for any other, or for
    one that cannot run on ``modalities`` (checked before any fit)."""
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in CALIBRATED_METHODS]
    if unknown:
        raise InputError("--calibrate-method", f"cannot learn the volume error of {', '.join(unknown)} "
                                               f"(available: {', '.join(CALIBRATED_METHODS)})")
    for method in methods:
        if get_method(method).needs_pet and "pet" not in modalities:
            raise InputError("--calibrate-method", f"{method} is a PET method, and --modalities has no pet")
    return methods


def held_out_run(method: str, case: DelineatedCase, prior) -> MethodResult:
    """``case`` segmented by ``method`` with ``prior`` (which must not have seen it), as
    ``vbseg.segment`` runs it (its checks, no VOI), with the method's extra maps."""
    if case.name in prior.cases:
        raise ValueError(f"case {case.name} is in the prior's training cases: its entry would be in sample")
    plan = plan_segment(list(case.images), modalities=list(case.modalities), model=method, prior=prior,
                        volume_draws=200)
    return plan.method.run(prepare(list(case.images), plan.modalities), plan.options)


def run_record(case: DelineatedCase, training: TrainingCase, result: MethodResult) -> dict | None:
    """The disagreement record of a run that wrote both answers (locate-potts), else None."""
    if LOCATOR_FILE not in result.maps:
        return None
    locate = result.diagnostics["locate"]
    return disagreement_record(case.name, mixed=locate["mixed"], stratum=locate["stratum"],
                               dice_locator=dice(result.maps[LOCATOR_FILE] >= 0.5, training.tumour),
                               dice_delineation=dice(result.maps[DELINEATION_FILE] >= 0.5, training.tumour))


def reweighted(result: MethodResult, record, weights) -> np.ndarray:
    """The run's probability map with the locator weighted as ``weights`` say (unchanged where
    the two answers agreed or nothing was recorded)."""
    if record is None or not record["mixed"]:
        return result.probability
    weight, _ = locator_weight(weights, record["stratum"])
    mixture = weight * result.maps[LOCATOR_FILE] + (1.0 - weight) * result.maps[DELINEATION_FILE]
    return mixture.astype(np.float32)


def method_calibrations(methods, cases: list[DelineatedCase], training: list[TrainingCase], stats,
                        modalities, *, num_tumour, neighbourhood=6, interaction=False,
                        progress=None) -> dict:
    """{method: located-or-missed mixture (regression located component)} learned by
    leave-one-out over ``cases`` (module doc); ``stats``: their per-case statistics
    (:func:`vbseg.cohort.population.case_statistics`), in the same order."""
    names = [c.name for c in cases]
    calibrations = {}
    for method in methods:
        runs = []
        for j, case in enumerate(cases):
            held_out = prior_from_statistics(list(stats[:j]) + list(stats[j + 1:]), names[:j] + names[j + 1:],
                                             modalities, num_tumour=num_tumour, neighbourhood=neighbourhood,
                                             interaction=interaction)
            runs.append(held_out_run(method, case, held_out))
        records = [run_record(case, train, run) for case, train, run in zip(cases, training, runs)]
        learns_weights = all(record is not None for record in records)
        entries = []
        for j, (case, train, run, record) in enumerate(zip(cases, training, runs, records)):
            weights = held_out_weights(records, j) if learns_weights else None
            entries.append(held_out_entry(train, reweighted(run, record, weights), list(case.modalities),
                                          progress, f"{method} calibration"))
        calibration = calibration_from_entries(entries, located_model=LOCATED_MODEL)
        if calibration is not None and learns_weights:
            calibration["disagreement"] = disagreement_weights(records)
        calibrations[method] = calibration
    return {m: c for m, c in calibrations.items() if c is not None}
