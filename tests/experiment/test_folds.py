"""Cross-validation folds by case (vbseg.experiment.folds): stratified, seeded, every case held out once,
training lists never holding the held-out case; the committed sarcoma folds match the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vbseg.errors import InputError
from vbseg.experiment.folds import check_folds, load_folds, main, stratified_folds, training_cases
from vbseg.phantoms import make_cohort

COMMITTED = Path(__file__).resolve().parents[2] / "experiments" / "folds" / "sarcoma_5fold.json"


def test_folds_are_stratified_seeded_and_cover_every_case_once():
    strata = {f"c{i:02d}": i % 3 == 0 for i in range(23)}  # 8 of one stratum, 15 of the other
    folds = stratified_folds(strata, 5, seed=1)
    names = [n for fold in folds for n in fold]
    assert sorted(names) == sorted(strata) and len(names) == len(set(names))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    per_fold = [sum(strata[n] for n in fold) for fold in folds]
    assert max(per_fold) - min(per_fold) <= 1  # each stratum spread over the folds
    assert stratified_folds(strata, 5, seed=1) == folds
    assert stratified_folds(strata, 5, seed=2) != folds
    with pytest.raises(InputError, match="--folds"):
        stratified_folds(strata, 1, seed=0)


def test_training_lists_never_hold_the_held_out_fold():
    record = {"folds": [["a", "b"], ["c"], ["d", "e"]]}
    for fold, held_out in enumerate(record["folds"]):
        training = training_cases(record, fold)
        assert not set(training) & set(held_out)
        assert set(training) | set(held_out) == {"a", "b", "c", "d", "e"}


def test_the_cli_writes_a_record_that_checks_against_its_data(tmp_path):
    index = make_cohort(tmp_path / "cohort", 6, seed=3)
    out = tmp_path / "folds.json"
    assert main([str(index), "--folds", "3", "--seed", "7", "--out", str(out)]) == 0
    record = load_folds(out)
    assert record["k"] == 3 and record["seed"] == 7 and len(record["cases"]) == 6
    assert all({"avid", "mean_gtv_suv"} <= set(entry) for entry in record["cases"].values())
    check_folds(record, index)
    changed = dict(record, folds=[record["folds"][1], record["folds"][0], record["folds"][2]])
    with pytest.raises(InputError, match="other folds"):
        check_folds(changed, index)
    (tmp_path / "bad.json").write_text(json.dumps({"folds": [["a"], ["a"]], "cases": {"a": {}}}))
    with pytest.raises(InputError, match="exactly one fold"):
        load_folds(tmp_path / "bad.json")


def test_the_committed_sarcoma_folds_are_stratified():
    record = load_folds(COMMITTED)
    assert record["k"] == 5 and len(record["cases"]) == 21
    avid = [sum(record["cases"][n]["avid"] for n in fold) for fold in record["folds"]]
    assert sum(avid) == 15 and max(avid) - min(avid) <= 1


def test_the_committed_sarcoma_folds_match_the_data(shared_data):
    check_folds(load_folds(COMMITTED), shared_data / "cases.json")
