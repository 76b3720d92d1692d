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
from vbseg.cohort.method_error import method_entry
from vbseg.cohort.model import load_prior
from vbseg.cohort.population import fit_population_prior, load_training_case
from vbseg.cohort.volume_error import _located_factor, calibrated_draws, calibration_from_entries
from vbseg.errors import InputError
from vbseg.experiment.folds import fold_prior
from vbseg.io.cases import read_cases
from vbseg.phantoms import make_cohort

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
    # a case none of the priors saw, segmented with each prior
    images = [str(index.parent / f"{cases[5].name}_{m}.nii.gz") for m in MODALITIES]
    summaries = {}
    for label, path in (("plain", plain), ("calibrated", calibrated)):
        out = tmp_path / label
        assert main(["segment", *images, "--modality", "pet,ct,mr", "--model", "locate-potts",
                     "--prior", str(path), "--out", str(out)]) == 0
        summaries[label] = json.loads((out / "summary.json").read_text())
        summaries[label]["prob"] = (out / "prob.nii.gz").read_bytes()
    assert summaries["plain"]["prob"] == summaries["calibrated"]["prob"]  # the map is not changed
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
