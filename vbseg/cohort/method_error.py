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

For locate-potts the same leave-one-out segmentations also give the locator's weight in a
disagreement (:mod:`vbseg.potts.locate`, step 3), by stacking (Yao, Vehtari, Simpson and Gelman,
Bayesian Analysis 2018): for each training case whose locator and delineation disagreed, the
mean log score of its manual GTV's voxel labels under w P_loc + (1 - w) P_delineation over its
VOI, at every w of ``WEIGHT_GRID``; the weight maximising their sum is stored in
``method_calibrations["locate-potts"]["disagreement"]`` (no disagreement: equal weights), and
the volume error is then learned from the entries as that weight would have made them (each
disagreeing entry's model volume, Dice and located flag taken at the chosen weight), so the
two learned parts describe the same method. The weight is chosen with every training case's
entry, its own included: a small leak into the volume error, none into a held-out evaluation
fold, whose cases enter neither.

Case j's entry uses a prior that never saw case j; the mixture for a new scan uses every
training case's entry (none of them saw the new scan). Nested inside an evaluation fold (the
benchmark), nothing of the held-out fold enters either.
"""

from __future__ import annotations

import numpy as np

from vbseg.cohort.population import TrainingCase, held_out_entry, prior_from_statistics
from vbseg.cohort.volume_error import LOCATED_DICE, calibration_from_entries
from vbseg.errors import InputError
from vbseg.io.cases import DelineatedCase
from vbseg.methods.registry import get_method
from vbseg.metrics import dice
from vbseg.pipeline import segment
from vbseg.potts.locate import DELINEATION_FILE, EQUAL_WEIGHT, LOCATOR_FILE, WEIGHT_GRID, mixture

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
    entry = held_out_entry(training, posterior.probability, list(case.modalities), progress,
                           f"{method} calibration")
    if posterior.summary["diagnostics"].get("locate", {}).get("mixed"):
        entry["disagreement"] = disagreement_scores(posterior.maps[LOCATOR_FILE],
                                                    posterior.maps[DELINEATION_FILE], training.tumour,
                                                    posterior.voi, training.voxel_ml)
    return entry


def disagreement_scores(located, delineation, tumour, voi, voxel_ml: float) -> dict:
    """At every weight w of ``WEIGHT_GRID``, what the mixture w ``located`` + (1 - w)
    ``delineation`` gives a case with manual GTV ``tumour``: the mean log score of the GTV's
    voxel labels over ``voi`` (probabilities kept within [1e-6, 1 - 1e-6]), and the entry's
    model volume, Dice of the 50 % contour and whether that contour is empty."""
    tumour, voi = np.asarray(tumour, bool), np.asarray(voi, bool)
    scores = {"log_score": [], "model_ml": [], "dice50": [], "contour_empty": []}
    for weight in WEIGHT_GRID:
        probability = mixture(located, delineation, weight)
        p = np.clip(probability[voi].astype(np.float64), 1e-6, 1 - 1e-6)
        label = tumour[voi]
        scores["log_score"].append(float(np.mean(np.where(label, np.log(p), np.log1p(-p)))))
        scores["model_ml"].append(float(probability.sum(dtype=np.float64)) * voxel_ml)
        scores["dice50"].append(float(dice(probability >= 0.5, tumour)))
        scores["contour_empty"].append(not bool((probability >= 0.5).any()))
    return scores


def learned_weight(entries) -> dict:
    """The stacking weight (module doc) from the entries that carry disagreement scores."""
    scored = [e for e in entries if "disagreement" in e]
    record = {"grid": list(WEIGHT_GRID), "n": len(scored), "cases": [e["case"] for e in scored],
              "criterion": "the weight on the locator maximising the summed mean voxel log score of "
                           "the manual GTV over the training cases whose leave-one-out "
                           "segmentation disagreed"}
    if not scored:
        return {**record, "weight": EQUAL_WEIGHT, "summed_log_score": None}
    total = np.sum([e["disagreement"]["log_score"] for e in scored], axis=0)
    return {**record, "weight": WEIGHT_GRID[int(np.argmax(total))], "summed_log_score": total.tolist()}


def entry_at_weight(entry: dict, weight: float) -> dict:
    """``entry`` as the mixture with ``weight`` on the locator would have made it."""
    scores = entry.get("disagreement")
    if scores is None:
        return entry
    index = WEIGHT_GRID.index(weight)
    overlap = scores["dice50"][index]
    return {**entry, "model_ml": scores["model_ml"][index], "dice50": overlap,
            "located": bool(overlap >= LOCATED_DICE), "contour_empty": scores["contour_empty"][index]}


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
        weight = learned_weight(entries) if method == "locate-potts" else None
        if weight is not None:
            entries = [entry_at_weight(e, weight["weight"]) for e in entries]
        calibrations[method] = calibration_from_entries(entries, located_model=LOCATED_MODEL)
        if weight is not None and calibrations[method] is not None:
            calibrations[method]["disagreement"] = weight
    return {m: c for m, c in calibrations.items() if c is not None}
