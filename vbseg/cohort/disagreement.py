"""How much to trust the locator when it and the delineation disagree: the mixture weight of
``locate-potts`` (:mod:`vbseg.potts.locate`, step 3), learned by leave-one-out over a prior's
delineated training cases (``vbseg fit-prior --calibrate-method locate-potts``,
:mod:`vbseg.cohort.method_error`).

When the locator's region and the hidden Potts delineation overlap with Dice below
``AGREEMENT_DICE``, locate-potts does not pick one answer: its probability map is the mixture
w P_locator + (1 - w) P_delineation and its volume draws come from both in those shares. With
nothing learned, w = 1/2. Here w is P(the locator's answer is the better one | they disagree),
estimated from the training cases where they disagreed: each such case, segmented with the prior
learned without it, counts as a win for the locator when the locator's 50 % region has the higher
Dice with the manual GTV (a tie counts half). With k wins among n disagreements,
w = (k + 1) / (n + 2), the posterior mean under a uniform prior on the rate (Laplace's rule of
succession), so a stratum with no disagreement keeps w = 1/2 and a few cases move it only part
of the way. Choosing between two predictive distributions by how often each was right out of
sample is the idea of stacking (Yao, Vehtari, Simpson & Gelman, Bayesian Analysis 2018), here
with one weight per stratum and the rate's posterior mean in place of an optimised score.

The weight is learned per stratum of a quantity known for a new scan: the mean PET (SUV) inside
the locator's region, against ``AVID_MEAN_SUV``, the FDG-avidity rule of the evaluation folds
(:mod:`vbseg.experiment.folds`, where it is applied to the manual GTV). In a faint region the
PET-decided delineation has little to go on and the learned locator may know better; in a hot
one the image should have the last word. Whether that holds is what the counts say.
"""

from __future__ import annotations

import numpy as np

FORMAT = "disagreement-weights/1"
# FDG-avid: mean SUV >= this (the evaluation folds' stratum on the manual GTV; here on the
# locator's region, which is what a new scan has)
AVID_MEAN_SUV = 2.0
STRATA = ("faint", "avid")
# locate-potts writes both answers beside prob.nii.gz (their mixture when they disagree)
LOCATOR_FILE, DELINEATION_FILE = "locator.nii.gz", "delineation.nii.gz"
DEFINITION = (
    "among the training cases where locator and delineation disagreed (each segmented with the "
    "prior learned without it), the share where the locator's 50 % region had the higher Dice with "
    "the manual GTV (ties count half), by stratum of the mean PET inside the locator's region "
    f"(faint: < {AVID_MEAN_SUV:g} SUV); weight = (wins + 1) / (disagreements + 2)")


def located_stratum(pet, region) -> str | None:
    """"faint" or "avid" by the mean of ``pet`` (SUV) over ``region`` (bool, same shape); None
    without PET or without a region."""
    if pet is None or not np.any(region):
        return None
    return "avid" if float(np.mean(np.asarray(pet)[np.asarray(region, bool)])) >= AVID_MEAN_SUV else "faint"


def disagreement_record(case: str, *, mixed: bool, stratum, dice_locator: float,
                        dice_delineation: float) -> dict:
    """One training case's outcome: did the two disagree, in which stratum, and whose 50 %
    region was closer to the manual GTV (1, 0.5 for a tie, 0)."""
    win = 0.5 if dice_locator == dice_delineation else float(dice_locator > dice_delineation)
    return {"case": case, "mixed": bool(mixed), "stratum": stratum, "dice_locator": float(dice_locator),
            "dice_delineation": float(dice_delineation), "locator_win": win}


def disagreement_weights(records: list[dict]) -> dict:
    """The weights per stratum from training records (:func:`disagreement_record`)."""
    strata = {}
    for stratum in STRATA:
        disagreed = [r for r in records if r["mixed"] and r["stratum"] == stratum]
        wins = float(sum(r["locator_win"] for r in disagreed))
        strata[stratum] = {"disagreements": len(disagreed), "locator_wins": wins,
                           "weight": (wins + 1.0) / (len(disagreed) + 2.0),
                           "cases": [r["case"] for r in disagreed]}
    return {"format": FORMAT, "avid_mean_suv": AVID_MEAN_SUV, "strata": strata, "records": list(records),
            "definition": DEFINITION}


def locator_weight(weights: dict | None, stratum) -> tuple[float, str]:
    """(w, why): the learned weight of ``stratum``, or 1/2 when nothing was learned for it."""
    if weights is None or weights.get("format") != FORMAT or stratum not in weights.get("strata", {}):
        return 0.5, "equal weights (no learned weight for this scan)"
    row = weights["strata"][stratum]
    return float(row["weight"]), (f"learned for {stratum} locator regions: the locator was closer to the "
                                  f"manual GTV in {row['locator_wins']:g} of {row['disagreements']} "
                                  f"training disagreements, weight (wins + 1) / (n + 2)")


def held_out_weights(records: list[dict], held_out: int) -> dict:
    """The weights without record ``held_out`` (for that case's own leave-one-out entry)."""
    return disagreement_weights(records[:held_out] + records[held_out + 1:])
