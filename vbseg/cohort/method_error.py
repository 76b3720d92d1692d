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

Case j's entry uses a prior that never saw case j; the mixture for a new scan uses every
training case's entry (none of them saw the new scan). Nested inside an evaluation fold (the
benchmark), nothing of the held-out fold enters either.
"""

from __future__ import annotations

from vbseg.cohort.population import TrainingCase, held_out_entry, prior_from_statistics
from vbseg.cohort.volume_error import calibration_from_entries
from vbseg.errors import InputError
from vbseg.io.cases import DelineatedCase
from vbseg.methods.registry import get_method
from vbseg.pipeline import segment

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


def method_entry(method: str, case: DelineatedCase, training: TrainingCase, prior, *,
                 progress=None) -> dict:
    """``case`` segmented by ``method`` with ``prior`` (which must not have seen it): its
    :func:`~vbseg.cohort.volume_error.calibration_entry`."""
    if case.name in prior.cases:
        raise ValueError(f"case {case.name} is in the prior's training cases: its entry would be in sample")
    posterior = segment(list(case.images), modalities=list(case.modalities), model=method, prior=prior,
                        volume_draws=200)
    return held_out_entry(training, posterior.probability, list(case.modalities), progress,
                          f"{method} calibration")


def method_calibrations(methods, cases: list[DelineatedCase], training: list[TrainingCase], stats,
                        modalities, *, num_tumour, neighbourhood=6, interaction=False,
                        progress=None) -> dict:
    """{method: located-or-missed mixture (regression located component)} learned by
    leave-one-out over ``cases`` (module doc); ``stats``: their per-case statistics
    (:func:`vbseg.cohort.population.case_statistics`), in the same order."""
    names = [c.name for c in cases]
    calibrations = {}
    for method in methods:
        entries = []
        for j, (case, train) in enumerate(zip(cases, training)):
            held_out = prior_from_statistics(list(stats[:j]) + list(stats[j + 1:]), names[:j] + names[j + 1:],
                                             modalities, num_tumour=num_tumour, neighbourhood=neighbourhood,
                                             interaction=interaction)
            entries.append(method_entry(method, case, train, held_out, progress=progress))
        calibrations[method] = calibration_from_entries(entries, located_model=LOCATED_MODEL)
    return {m: c for m, c in calibrations.items() if c is not None}
