"""A method's own between-patient volume error (vbseg.cohort.method_error) and the regression
located component of the located-or-missed mixture (vbseg.cohort.volume_error): the regression
against least squares and the Student-t predictive's closed-form quantiles, the leave-one-out
never in sample, the prior's record, and locate-potts applying it without touching its map."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from vbseg.cli import main
from vbseg.cohort.method_error import disagreement_scores, entry_at_weight, learned_weight, method_entry
from vbseg.cohort.model import load_prior
from vbseg.cohort.population import fit_population_prior, load_training_case
from vbseg.cohort.volume_error import _located_factor, calibrated_draws, calibration_from_entries
from vbseg.errors import InputError
from vbseg.experiment.folds import fold_prior
from vbseg.io.cases import read_cases
from vbseg.phantoms import make_cohort
from vbseg.potts import locate

MODALITIES = ["pet", "ct", "mr"]


def entries_from(model_ml, manual_ml):
    return [{"case": f"c{i}", "manual_ml": float(y), "model_ml": float(x), "dice50": 0.8,
             "located": True, "contour_empty": False} for i, (x, y) in enumerate(zip(model_ml, manual_ml))]


def test_regression_component_is_least_squares_with_the_student_t_predictive():
    rng = np.random.default_rng(0)
    model_ml = np.exp(rng.uniform(2.0, 6.0, 12))
    manual_ml = np.exp(0.9 + 0.7 * np.log(model_ml) + rng.normal(0.0, 0.3, 12))
    calibration = calibration_from_entries(entries_from(model_ml, manual_ml), located_model="regression")
    located = calibration["located"]
    slope, intercept = np.polyfit(np.log(model_ml), np.log(manual_ml), 1)
    assert located["slope"] == pytest.approx(slope, abs=1e-9)
    assert located["intercept"] == pytest.approx(intercept, abs=1e-9)
    residuals = np.log(manual_ml) - (intercept + slope * np.log(model_ml))
    assert located["scale"] == pytest.approx(np.sqrt(residuals @ residuals / 10), rel=1e-9)
    assert located["dof"] == 10 and located["n"] == 12
    # every draw at one model volume v: log(v * factor) ~ a + b log v + s sqrt(1 + x'(X'X)^-1 x) t_10
    v = 150.0
    draws = np.full(400_000, v)
    predicted = np.log(draws * _located_factor(np.random.default_rng(1), located, draws))
    x = np.array([1.0, np.log(v)])
    design = np.stack([np.ones(12), np.log(model_ml)], axis=1)
    scale = located["scale"] * np.sqrt(1 + x @ np.linalg.inv(design.T @ design) @ x)
    for q in (0.025, 0.25, 0.5, 0.75, 0.975):
        expected = intercept + slope * np.log(v) + scale * stats.t.ppf(q, 10)
        assert np.quantile(predicted, q) == pytest.approx(expected, abs=0.01 * scale + 2e-3)


def test_regression_needs_four_located_cases_and_varying_volumes():
    few = entries_from([10.0, 20.0, 30.0], [12.0, 18.0, 33.0])
    assert calibration_from_entries(few, located_model="regression")["located"] is None
    same = entries_from([10.0] * 5, [9.0, 11.0, 10.0, 12.0, 8.0])
    assert calibration_from_entries(same, located_model="regression")["located"] is None
    assert calibration_from_entries(same)["located"]["log_ratio_mean"] == pytest.approx(
        np.mean(np.log(np.array([9.0, 11.0, 10.0, 12.0, 8.0]) / 10.0)))
    with pytest.raises(ValueError):
        calibration_from_entries(same, located_model="quadratic")
    # an empty contour: every draw from the training cases' manual volumes
    calibration = calibration_from_entries(entries_from([10, 20, 40, 80, 160], [12, 18, 44, 70, 170]),
                                           located_model="regression")
    volumes, _, missed = calibrated_draws(np.zeros(1000), None, calibration, 0, contour_empty=True)
    assert missed == 1.0 and volumes.min() > 0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    index = make_cohort(folder, 6, seed=3)
    cases = read_cases(index, MODALITIES)
    return index, cases, [load_training_case(c) for c in cases]


def scored_entry(name, truth, located, delineation, voxel_ml=1.0):
    truth = np.asarray(truth, bool)
    voi = np.ones(truth.shape, bool)
    scores = disagreement_scores(np.asarray(located, np.float32), np.asarray(delineation, np.float32),
                                 truth, voi, voxel_ml)
    return {"case": name, "manual_ml": float(truth.sum()) * voxel_ml, "model_ml": 0.0, "dice50": 0.0,
            "located": False, "contour_empty": True, "disagreement": scores}


def test_the_stacking_weight_maximises_the_held_out_log_score():
    """Three voxels, the GTV the first two, the locator saying all three, the delineation none:
    the mixture gives each voxel w, so the mean log score is (2 log w + log(1 - w)) / 3, whose
    maximum is at w = 2/3; on the grid the better neighbour, 0.65."""
    entry = scored_entry("a", [[[1, 1, 0]]], [[[1, 1, 1]]], [[[0, 0, 0]]])
    grid = np.asarray(locate.WEIGHT_GRID)
    expected = (2 * np.log(grid) + np.log1p(-grid)) / 3
    np.testing.assert_allclose(entry["disagreement"]["log_score"], expected, atol=1e-5)
    weight = learned_weight([entry, {"case": "b", "manual_ml": 1.0, "model_ml": 1.0, "dice50": 1.0,
                                     "located": True, "contour_empty": False}])
    assert weight["weight"] == 0.65 and weight["n"] == 1 and weight["cases"] == ["a"]
    assert abs(weight["weight"] - 2 / 3) <= 0.025
    # the entry as the chosen weight makes it: all three voxels at 0.65, Dice 2 x 2 / (3 + 2)
    at = entry_at_weight(entry, 0.65)
    assert at["model_ml"] == pytest.approx(1.95, rel=1e-6) and at["dice50"] == pytest.approx(0.8)
    assert at["located"] and not at["contour_empty"]
    # a case the locator has right and one the delineation has right, a voxel each: their
    # scores sum to log w + log(1 - w), best at 1/2; one case alone hits the grid's bound
    locator_right = scored_entry("l", [[[1, 0]]], [[[1, 0]]], [[[0, 1]]])
    image_right = scored_entry("d", [[[1, 0]]], [[[0, 1]]], [[[1, 0]]])
    assert learned_weight([locator_right, image_right])["weight"] == 0.5
    assert learned_weight([locator_right])["weight"] == 1 - locate.MIN_WEIGHT
    assert learned_weight([image_right])["weight"] == locate.MIN_WEIGHT
    # no disagreement among the training cases: equal weights, the entries as they were
    assert learned_weight([])["weight"] == locate.EQUAL_WEIGHT and learned_weight([])["n"] == 0


def test_a_disagreeing_entry_carries_its_scores_and_reproduces_itself_at_equal_weights(cohort, monkeypatch):
    """A locator that points away from the GTV: the held-out entry (equal weights, the held-out
    prior learned nothing) records the mixture's scores, and at w = 1/2 they give the entry's
    own volume and Dice."""
    _, cases, training = cohort
    prior = fit_population_prior(training[1:], MODALITIES, num_tumour=2, num_background=2, calibrate=False)
    tumour = training[0].tumour

    def fake_locator(prepared, options):
        wrong = np.zeros(tumour.shape, bool)
        wrong[:4, :4, :4] = True
        assert not (wrong & tumour).any()
        return np.where(wrong[prepared.bounds], 4.0, -4.0).astype(np.float32), {"locator": "test"}, 0.0

    monkeypatch.setattr(locate, "locator_logit", fake_locator)
    entry = method_entry("locate-potts", cases[0], training[0], prior)
    scores = entry["disagreement"]
    assert set(scores) == {"log_score", "model_ml", "dice50", "contour_empty"}
    assert all(len(v) == len(locate.WEIGHT_GRID) for v in scores.values())
    half = locate.WEIGHT_GRID.index(0.5)
    assert scores["model_ml"][half] == pytest.approx(entry["model_ml"], rel=1e-5)
    assert scores["dice50"][half] == pytest.approx(entry["dice50"], abs=1e-9)
    assert entry_at_weight(entry, 0.5)["located"] == entry["located"]


def test_an_entry_refuses_a_prior_that_saw_its_case(cohort):
    _, cases, training = cohort
    prior = fit_population_prior(training, MODALITIES, num_tumour=2, num_background=2, calibrate=False)
    with pytest.raises(ValueError, match="in sample"):
        method_entry("locate-potts", cases[0], training[0], prior)


def test_fit_prior_learns_the_locate_potts_error_and_locate_potts_applies_it(tmp_path, cohort, capsys):
    index, cases, _ = cohort
    names = ",".join(c.name for c in cases[:5])
    plain, calibrated = tmp_path / "plain.json", tmp_path / "calibrated.json"
    common = ["fit-prior", str(index), "--modalities", "pet,ct,mr", "--cases", names,
              "--background-classes", "2"]
    assert main([*common, "--out", str(plain)]) == 0
    assert main([*common, "--out", str(calibrated), "--calibrate-method", "locate-potts"]) == 0
    printed = capsys.readouterr().out
    # one leave-one-out segmentation per training case, each with a prior without that case
    assert all(f"locate-potts calibration {c.name}:" in printed for c in cases[:5])
    without, prior = load_prior(plain), load_prior(calibrated)
    assert "method_calibrations" not in json.loads(plain.read_text())
    assert without.training_digest != prior.training_digest
    error = prior.method_calibrations["locate-potts"]
    assert error["n"] == 5 and [e["case"] for e in error["entries"]] == [c.name for c in cases[:5]]
    assert error["located"] is None or error["located"]["model"] == "regression"
    # the locator's weight in a disagreement, learned from the entries that disagreed
    weight = error["disagreement"]
    assert weight["cases"] == [e["case"] for e in error["entries"] if "disagreement" in e]
    assert weight["n"] == len(weight["cases"]) and weight["weight"] in locate.WEIGHT_GRID
    # a case none of the priors saw, segmented with each prior
    images = [str(index.parent / f"{cases[5].name}_{m}.nii.gz") for m in MODALITIES]
    summaries = {}
    for label, path in (("plain", plain), ("calibrated", calibrated)):
        out = tmp_path / label
        assert main(["segment", *images, "--modality", "pet,ct,mr", "--model", "locate-potts",
                     "--prior", str(path), "--out", str(out)]) == 0
        summaries[label] = json.loads((out / "summary.json").read_text())
        summaries[label]["prob"] = (out / "prob.nii.gz").read_bytes()
    # the map is not changed, unless locator and image disagree and the weight learned is not 1/2
    mixed = summaries["calibrated"]["diagnostics"]["locate"]["mixed"]
    same = summaries["plain"]["prob"] == summaries["calibrated"]["prob"]
    assert same or (mixed and weight["weight"] != 0.5)
    assert "volume_error" not in summaries["plain"]["diagnostics"]
    record = summaries["calibrated"]["diagnostics"]["volume_error"]
    assert record["n"] == 5 and "locate-potts" in summaries["calibrated"]["volume_ml"]["method"]
    assert record["uncalibrated_volume_ml"]["mean"] == pytest.approx(
        summaries["plain"]["volume_ml"]["mean"], rel=1e-4)
    assert "volume-error-not-applied" not in [w["code"] for w in summaries["calibrated"]["warnings"]]
    # other settings than the error was learned with: not applied, and said
    other = tmp_path / "other"
    assert main(["segment", *images, "--modality", "pet,ct,mr", "--model", "locate-potts",
                 "--prior", str(calibrated), "--locate-margin", "30", "--out", str(other)]) == 0
    summary = json.loads((other / "summary.json").read_text())
    assert "volume-error-not-applied" in [w["code"] for w in summary["warnings"]]
    assert summary["diagnostics"]["volume_error"] == {"applied": False}
    assert "locate-potts" not in summary["volume_ml"]["method"]


def test_calibrate_method_names_what_it_can_learn(tmp_path, cohort, capsys):
    index, _, _ = cohort
    assert main(["fit-prior", str(index), "--modalities", "pet,ct,mr", "--out", str(tmp_path / "p.json"),
                 "--calibrate-method", "gp"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--calibrate-method" in err and "locate-potts" in err
    assert main(["fit-prior", str(index), "--modalities", "ct,mr", "--out", str(tmp_path / "p.json"),
                 "--calibrate-method", "locate-potts"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--calibrate-method" in err and "no pet" in err
    assert not (tmp_path / "p.json").exists()


def test_a_fold_prior_without_the_methods_volume_error_is_refused(tmp_path, cohort):
    index, cases, _ = cohort
    record = {"folds": [[c.name for c in cases[:3]], [c.name for c in cases[3:]]]}
    path = fold_prior(index, record, 0, MODALITIES, tmp_path / "fold0.json")
    assert load_prior(path).cases == sorted(c.name for c in cases[3:])
    with pytest.raises(InputError, match="no volume error of locate-potts"):
        fold_prior(index, record, 0, MODALITIES, path, methods=["locate-potts"])
