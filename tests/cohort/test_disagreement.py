"""The locator's learned weight in locate-potts's mixture (vbseg.cohort.disagreement): the rule
of succession per stratum, ties, the leave-one-out weights, the strata, and 1/2 when nothing
applies."""

from __future__ import annotations

import numpy as np
import pytest

from vbseg.cohort.disagreement import (
    FORMAT,
    disagreement_record,
    disagreement_weights,
    held_out_weights,
    located_stratum,
    locator_weight,
)


def record(case, mixed, stratum, locator, delineation):
    return disagreement_record(case, mixed=mixed, stratum=stratum, dice_locator=locator,
                               dice_delineation=delineation)


RECORDS = [record("a", True, "faint", 0.7, 0.0), record("b", True, "faint", 0.5, 0.2),
           record("c", True, "avid", 0.5, 0.8), record("d", False, "faint", 0.1, 0.9),
           record("e", True, "avid", 0.6, 0.6), record("f", True, None, 0.9, 0.1)]


def test_weights_are_the_rule_of_succession_per_stratum():
    weights = disagreement_weights(RECORDS)
    assert weights["format"] == FORMAT
    faint, avid = weights["strata"]["faint"], weights["strata"]["avid"]
    # faint: a and b disagreed and the locator won both; d agreed and does not count
    assert (faint["disagreements"], faint["locator_wins"], faint["cases"]) == (2, 2.0, ["a", "b"])
    assert faint["weight"] == pytest.approx(3 / 4)
    # avid: c lost, e tied (half a win)
    assert (avid["disagreements"], avid["locator_wins"]) == (2, 0.5)
    assert avid["weight"] == pytest.approx(1.5 / 4)
    # no disagreement in a stratum: 1/2
    assert disagreement_weights(RECORDS[2:3])["strata"]["faint"]["weight"] == 0.5


def test_a_case_own_weights_leave_its_record_out():
    without_a = held_out_weights(RECORDS, 0)
    assert without_a["strata"]["faint"]["cases"] == ["b"]
    assert without_a["strata"]["faint"]["weight"] == pytest.approx(2 / 3)
    assert [r["case"] for r in without_a["records"]] == ["b", "c", "d", "e", "f"]


def test_locator_weight_falls_back_to_one_half():
    weights = disagreement_weights(RECORDS)
    assert locator_weight(weights, "faint")[0] == pytest.approx(3 / 4)
    assert "2 of 2" in locator_weight(weights, "faint")[1]
    assert locator_weight(weights, None)[0] == 0.5  # no PET, or no region
    assert locator_weight(None, "faint")[0] == 0.5  # nothing learned
    assert locator_weight({"format": "other"}, "faint")[0] == 0.5


def test_stratum_is_the_mean_pet_of_the_located_region():
    pet = np.full((4, 4, 4), 1.0)
    pet[:2] = 5.0
    region = np.zeros(pet.shape, bool)
    region[1:3] = True  # half at 5, half at 1: mean 3
    assert located_stratum(pet, region) == "avid"
    region[:2] = False  # only SUV 1
    assert located_stratum(pet, region) == "faint"
    assert located_stratum(pet, np.zeros(pet.shape, bool)) is None
    assert located_stratum(None, region) is None
