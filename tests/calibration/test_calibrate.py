"""``vbseg calibrate`` and ``vbseg segment --calibration`` end to end on tiny sphere phantoms
(20 cases at 16 x 16 x 24 voxels, calibrated once per module): the outputs appear and agree with
the conformal math of :mod:`vbseg.calibration.conformal`, the calibration file reads back, and every refusal
is one line, exit 2, with nothing written."""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.test_cli import main_cli
from vbseg.calibration.calibration_file import (
    LAMBDA_GRID,
    MODEL_CODE,
    PACKAGED_CALIBRATIONS,
    calibration_file,
    expand_runs,
    load_calibration,
    model_digest,
    plan_conformal,
    run_lengths,
    strata_spec,
    stratify,
    stratum_of,
)
from vbseg.calibration.conformal import conformal_quantile, dilate_by, risk_control_margin
from vbseg.cohort.population import PACKAGED_PRIORS
from vbseg.errors import InputError
from vbseg.experiment.config import load_experiment, segment_kwargs
from vbseg.io.volume import sha256_file
from vbseg.options import SegmentOptions, default_beta
from vbseg.phantoms import PhantomSpec, make_phantom

CONFIG = """
[phantoms]
diameters_mm = [10, 13]
contrast = 4.0
cv = [0.1]
seeds = 10

[model]
{model}
volume_draws = 200
"""


def write_config(folder: Path, name: str, model: str = "") -> Path:
    path = folder / name
    path.write_text(CONFIG.format(model=model))
    return path


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(folder, config, calibration.json, a new phantom's PET) with the default model."""
    folder = tmp_path_factory.mktemp("calibrate")
    config = write_config(folder, "cal.toml")
    out = folder / "calibration.json"
    result = main_cli("calibrate", config, "--out", out)
    assert result.returncode == 0, result.stderr
    phantom = make_phantom(PhantomSpec(diameters_mm=(12.0,)), seed=1234)
    pet = phantom.save(folder / "new")["pet"]
    return folder, config, out, pet


def assert_refused(result, *phrases):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vbseg: error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_calibrate_then_segment_adds_conformal_outputs(calibrated, tmp_path):
    _, _, calibration, pet = calibrated
    out = tmp_path / "seg"
    result = main_cli("segment", pet, "--out", out, "--volume-draws", 300, "--calibration", calibration)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    entries = summary["volume_ml_conformal"]
    assert [e["level"] for e in entries] == [0.9, 0.95]
    record = json.loads(calibration.read_text())
    scores = [case["volume_score"] for case in record["cases"]]
    probability = np.asarray(nib.load(out / "prob.nii.gz").dataobj)
    contour50 = np.asarray(nib.load(out / "contour_50.nii.gz").dataobj) > 0
    model = summary["volume_ml"]
    for entry, alpha in zip(entries, ("10", "5")):
        assert set(entry) >= {"level", "lower", "upper", "n", "stratum", "score", "guarantee"}
        assert entry["n"] == 20 and "exchangeab" in entry["guarantee"]
        assert entry["score"] == pytest.approx(conformal_quantile(scores, 1 - entry["level"]))
        # the model's own interval misses these phantoms (scores > 0): the conformal one widens it
        assert entry["score"] > 0
        assert entry["lower"] < model["lower"] and entry["upper"] > model["upper"]
        floor_ml = 4 * 4 * 3 / 1000  # one voxel
        assert entry["lower"] == pytest.approx(max(model["lower"], floor_ml) * math.exp(-entry["score"]))
        crc = np.asarray(nib.load(out / f"contour_crc{alpha}.nii.gz").dataobj) > 0
        threshold = entry["contour_crc"]["threshold"]
        np.testing.assert_array_equal(crc, probability.astype(np.float64) >= threshold)
        margin = np.asarray(nib.load(out / f"contour_margin{alpha}.nii.gz").dataobj) > 0
        assert (margin >= contour50).all() and margin.sum() > contour50.sum()
        # risk control over the dilations of the 50 % contour: the calibrated distance, written
        dilation = entry["contour_crc_margin"]
        assert dilation["file"] == f"contour_crcmargin{alpha}.nii.gz" and "dilations" in dilation["guarantee"]
        losses = [case["fnr_margin"] for case in load_calibration(calibration)["cases"]]
        expected = risk_control_margin(losses, record["risk_margin_grid_mm"], 1 - entry["level"])
        assert dilation["margin_mm"] == expected and math.isfinite(expected)
        written = np.asarray(nib.load(out / dilation["file"]).dataobj) > 0
        np.testing.assert_array_equal(written, dilate_by(contour50, expected, (4.0, 4.0, 3.0)))
    assert entries[1]["contour_crc_margin"]["margin_mm"] >= entries[0]["contour_crc_margin"]["margin_mm"]
    # a smaller miscoverage needs a lower (or equal) probability threshold
    assert entries[1]["contour_crc"]["threshold"] <= entries[0]["contour_crc"]["threshold"]
    assert summary["conformal_calibration"]["source_digest_matches"] is True
    assert summary["conformal_calibration"]["model_digest_matches"] is True
    assert "conformal 95% interval" in result.stdout
    lines = [line for line in result.stdout.splitlines() if "contour_crcmargin5.nii.gz" in line]
    assert len(lines) == 1
    dilation = entries[1]["contour_crc_margin"]["margin_mm"]
    assert f"contour_crcmargin5.nii.gz: the 50 % contour + {dilation:g} mm (E[FNR] <= 0.05)" in lines[0]
    assert f"contour_crc5.nii.gz: P >= {entries[1]['contour_crc']['threshold']:.3g}" in lines[0]
    # --overwrite without the calibration: its contours go with the rest of the old result set
    again = main_cli("segment", pet, "--out", out, "--volume-draws", 300, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert not list(out.glob("contour_crc*")) and not list(out.glob("contour_margin*"))
    assert "volume_ml_conformal" not in json.loads((out / "summary.json").read_text())


def test_calibration_file_round_trip(calibrated):
    _, config, calibration, _ = calibrated
    record = load_calibration(calibration)
    stored = json.loads(calibration.read_text())
    assert {**record, "cases": None} == {**stored, "cases": None}
    # the file holds voxel counts as [value, repeats] runs; loading adds the rates, exactly
    # count / true voxels
    rates = {"fnr": "missed_voxels", "stretch": "contour_voxels", "fnr_margin": "margin_missed_voxels",
             "stretch_margin": "margin_contour_voxels"}
    for case, raw in zip(record["cases"], stored["cases"]):
        assert not set(rates) & set(raw)
        assert case == {**raw, **{rate: [c / raw["truth_voxels"] for c in expand_runs(raw[counts])]
                                  for rate, counts in rates.items()}}
        assert len(case["fnr_margin"]) == len(record["risk_margin_grid_mm"]) + 1
        assert case["fnr_margin"][-1] == 0.0 and np.all(np.diff(case["fnr_margin"]) <= 0)
        assert np.all(np.diff(case["stretch_margin"]) >= 0) and np.all(np.diff(case["stretch"]) >= 0)
    names = [run.case["name"] for run in load_experiment(config).runs]
    assert [case["name"] for case in record["cases"]] == names
    assert record["command"].startswith("vbseg calibrate ") and record["lambda_grid"] == LAMBDA_GRID.tolist()
    assert record["options"]["beta"] == 0.5 and record["files"] == {"prior": None, "checkpoint": None}
    for case in record["cases"]:
        assert case["floor_ml"] == pytest.approx(4 * 4 * 3 / 1000)
        assert len(case["fnr"]) == LAMBDA_GRID.size and case["fnr"][-1] == 0.0
        assert np.all(np.diff(case["fnr"]) <= 0)
    assert record["strata"] == {"by": [], "bins": {}, "features": {}}
    assert all(case["stratum"] == "all" and case["contrast_to_noise"] > 0 for case in record["cases"])
    plan = plan_conformal(calibration, (80, 90), SegmentOptions.from_values(volume_draws=500), ["pet"])
    pooled = plan.by_stratum["all"]
    assert list(plan.by_stratum) == ["all"] and pooled.n == 20 and pooled.quantiles[0] <= pooled.quantiles[1]
    assert pooled.risk_margins_mm[0] <= pooled.risk_margins_mm[1]
    assert "contour_crcmargin20.nii.gz" in plan.output_names()


def test_a_calibration_with_rates_only_still_applies(calibrated, tmp_path):
    """A calibration written before the risk curves were stored as counts (its cases carry the
    FNR rates, no dilation curve) gives the same threshold contours and no crcmargin contour."""
    _, _, calibration, _ = calibrated
    stored = json.loads(calibration.read_text())
    for case in stored["cases"]:
        case["fnr"] = [c / case["truth_voxels"] for c in expand_runs(case["missed_voxels"])]
        for key in ("truth_voxels", "missed_voxels", "contour_voxels", "margin_missed_voxels",
                    "margin_contour_voxels"):
            del case[key]
    del stored["risk_margin_grid_mm"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(stored))
    options = SegmentOptions.from_values(volume_draws=500)
    plan, new = (plan_conformal(path, (90, 95), options, ["pet"]) for path in (old, calibration))
    assert plan.by_stratum["all"].risk_margins_mm is None
    assert plan.by_stratum["all"].lambdas == new.by_stratum["all"].lambdas
    assert not any("crcmargin" in name for name in plan.output_names())
    stored["cases"][0]["missed_voxels"] = [1, 2]  # counts without the true voxels: refused
    old.write_text(json.dumps(stored))
    with pytest.raises(InputError, match="risk counts are malformed"):
        load_calibration(old)


@pytest.mark.parametrize("edit, problem", [
    (lambda case, record: case.update(missed_voxels=[[1, 10**30]]), "cover"),  # would never expand
    (lambda case, record: case.update(missed_voxels=[[1, 200], [0, 2]]), "cover 202 grid points"),
    (lambda case, record: case.update(missed_voxels=[[1, 1.5e308]]), "non-negative integers"),
    (lambda case, record: case.update(contour_voxels=[[-1, 201]]), "non-negative integers"),
    (lambda case, record: case.update(missed_voxels=[[case["truth_voxels"] + 1, 201]]), "exceeds"),
    (lambda case, record: case.update(truth_voxels=0), "positive integer"),
    (lambda case, record: record.pop("risk_margin_grid_mm"), "without risk_margin_grid_mm"),
    (lambda case, record: record.update(risk_margin_grid_mm=["a", None]), "risk_margin_grid_mm must be"),
    (lambda case, record: record.update(risk_margin_grid_mm=[1.0, 0.5]), "risk_margin_grid_mm must be"),
])
def test_malformed_risk_counts_are_refused_in_one_line(calibrated, tmp_path, edit, problem):
    _, _, calibration, pet = calibrated
    record = json.loads(calibration.read_text())
    edit(record["cases"][0], record)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(record))
    with pytest.raises(InputError, match=problem):
        load_calibration(bad)
    result = main_cli("segment", pet, "--out", tmp_path / "seg", "--calibration", bad)
    assert_refused(result, "bad.json", "is not a vbseg calibration")
    assert not (tmp_path / "seg").exists()


def test_other_fit_options_are_refused(calibrated, tmp_path):
    _, _, calibration, pet = calibrated
    out = tmp_path / "seg"
    result = main_cli("segment", pet, "--out", out, "--beta", "1.0", "--calibration", calibration)
    assert_refused(result, "calibration.json", "option beta", "0.5", "1.0")
    assert not out.exists() or not any(out.iterdir())


def test_a_level_the_cases_cannot_support_is_refused(calibrated, tmp_path):
    _, _, calibration, pet = calibrated
    out = tmp_path / "seg"
    result = main_cli("segment", pet, "--out", out, "--calibration", calibration,
                      "--conformal-levels", "90,99")
    assert_refused(result, "20 cases cannot calibrate level 0.99", "at least 99")
    assert not out.exists() or not any(out.iterdir())


def test_a_file_that_is_not_a_calibration_is_refused(calibrated, tmp_path):
    _, _, _, pet = calibrated
    fake = tmp_path / "fake.json"
    fake.write_text(json.dumps({"cases": []}))
    result = main_cli("segment", pet, "--out", tmp_path / "seg", "--calibration", fake)
    assert_refused(result, "fake.json", "is not a vbseg calibration")
    result = main_cli("segment", pet, "--out", tmp_path / "seg", "--conformal-levels", "90")
    assert_refused(result, "--conformal-levels", "goes with --calibration")


def test_a_sweep_config_is_refused(tmp_path):
    config = write_config(tmp_path, "sweep.toml", "beta = [0.5, 1.0]")
    result = main_cli("calibrate", config, "--out", tmp_path / "calibration.json")
    assert_refused(result, "sweep.toml", "sweeps 2 variants")
    assert not (tmp_path / "calibration.json").exists()


def two_strata(calibration: Path, folder: Path, bins=(3.0,), small_ml=None) -> tuple[Path, list, list]:
    """A 40-case calibration with volume strata: the fixture's 20 cases (their mean volumes,
    about 0.5-1.7 mL, or ``small_ml``) and 20 copies moved to 20 mL with every volume score
    raised by 1. Returns the file and each stratum's scores."""
    record = json.loads(calibration.read_text())
    small = [dict(case, mean_ml=small_ml or case["mean_ml"]) for case in record["cases"]]
    large = [dict(case, name=case["name"] + "_large", mean_ml=20.0, volume_score=case["volume_score"] + 1)
             for case in record["cases"]]
    stratified = stratify({**record, "cases": small + large}, strata_spec("volume", list(bins)), "test")
    path = folder / "strata.json"
    path.write_text(json.dumps(stratified))
    return path, [c["volume_score"] for c in small], [c["volume_score"] for c in large]


def test_segment_applies_the_new_cases_own_stratum(calibrated, tmp_path):
    _, _, calibration, pet = calibrated
    path, small, large = two_strata(calibration, tmp_path)
    out = tmp_path / "seg"
    result = main_cli("segment", pet, "--out", out, "--volume-draws", 300, "--calibration", path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["volume_ml"]["mean"] < 3.0  # the 12 mm sphere falls in the small stratum
    for entry in summary["volume_ml_conformal"]:
        assert entry["stratum"] == "volume <3 mL" and entry["n"] == 20
        assert entry["score"] == pytest.approx(conformal_quantile(small, 1 - entry["level"]))
        assert entry["score"] < conformal_quantile(small + large, 1 - entry["level"])  # not pooled
        assert "Mondrian" in entry["guarantee"] and "volume <3 mL" in entry["guarantee"]
    record = summary["conformal_calibration"]
    assert record["stratum"] == "volume <3 mL" and record["strata"]["by"] == ["volume"]
    assert record["strata"]["n"] == {"volume <3 mL": 20, "volume >=3 mL": 20}
    assert record["features"]["mean_ml"] == pytest.approx(summary["volume_ml"]["mean"])
    assert record["features"]["contrast_to_noise"] == summary["parameters"]["contrast_to_noise"]
    assert "stratum volume <3 mL" in result.stdout


def test_an_empty_stratum_or_a_level_a_stratum_cannot_support_is_refused(calibrated, tmp_path):
    _, _, calibration, pet = calibrated
    path, _, _ = two_strata(calibration, tmp_path, bins=(3.0, 10.0), small_ml=5.0)
    out = tmp_path / "seg"
    result = main_cli("segment", pet, "--out", out, "--calibration", path)
    assert_refused(result, "strata.json", "this case falls in stratum 'volume <3 mL', which has no "
                                          "calibration cases", "volume 3-10 mL, volume >=10 mL")
    assert not out.exists() or not any(out.iterdir())
    path, _, _ = two_strata(calibration, tmp_path)
    result = main_cli("segment", pet, "--out", out, "--calibration", path, "--conformal-levels", "90,99")
    assert_refused(result, "strata.json", "stratum 'volume <3 mL': 20 cases cannot calibrate level 0.99")
    assert not out.exists() or not any(out.iterdir())


def test_a_small_stratum_is_kept_and_refused_when_a_case_falls_in_it(calibrated, tmp_path):
    """Strata of 20 cases (< 3 mL) and 5 (>= 3 mL): the calibration is accepted; a case in the
    large stratum is scored as usual (and the summary names the small stratum as refused), a
    case in the small one is refused in one line naming the stratum and why."""
    _, _, calibration, pet = calibrated
    record = json.loads(calibration.read_text())
    large = [dict(case, name=case["name"] + "_large", mean_ml=20.0) for case in record["cases"][:5]]
    stratified = stratify({**record, "cases": record["cases"] + large}, strata_spec("volume", "3"), "test")
    path = tmp_path / "few.json"
    path.write_text(json.dumps(stratified))
    plan = plan_conformal(path, (90, 95), SegmentOptions.from_values(volume_draws=300), ["pet"])
    assert list(plan.by_stratum) == ["volume <3 mL"]
    assert plan.refused == {"volume >=3 mL": "5 cases cannot calibrate level 0.9: that needs at least 9"}
    with pytest.raises(InputError, match=r"few.json: this case falls in stratum 'volume >=3 mL', whose "
                                         r"5 cases cannot calibrate level 0.9"):
        plan.stratum({"mean_ml": 20.0})
    out = tmp_path / "seg"
    result = main_cli("segment", pet, "--out", out, "--volume-draws", 300, "--calibration", path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conformal_calibration"]["stratum"] == "volume <3 mL"
    assert summary["conformal_calibration"]["strata"]["refused"] == plan.refused


def test_strata_that_are_all_small_are_refused(calibrated, tmp_path):
    _, _, calibration, _ = calibrated
    record = load_calibration(calibration)
    small = r"no stratum has >= 19 cases \(the largest, 'volume [^']+ mL', has \d+\)"
    with pytest.raises(InputError, match="cal.toml: " + small):
        stratify(record, strata_spec("volume", "1.2,3"), "cal.toml")
    # a stored calibration whose strata are all too small is refused too (before any fit)
    path = tmp_path / "small.json"
    path.write_text(json.dumps({**record, "strata": strata_spec("volume", "1.2,3")}))
    with pytest.raises(InputError, match="small.json: " + small):
        plan_conformal(path, (90,), SegmentOptions.from_values(volume_draws=200), ["pet"])
    path.write_text(json.dumps({**record, "strata": {"by": ["volume"], "bins": {}}}))
    with pytest.raises(InputError, match="small.json: is not a vbseg calibration .its strata lack"):
        load_calibration(path)


def test_calibrate_refuses_a_small_stratum_and_bad_strata_options(tmp_path):
    config = tmp_path / "two.toml"
    config.write_text(CONFIG.replace("seeds = 10", "seeds = 1").format(model=""))
    out = tmp_path / "calibration.json"
    result = main_cli("calibrate", config, "--out", out, "--strata", "volume")
    assert_refused(result, "two.toml", "no stratum has >= 19 cases (the largest, 'volume <5 mL', has 2)")
    assert not out.exists()
    volume = ["--strata", "volume", "--volume-bins"]
    for options, phrases in ((["--strata", "size"], ("--strata", "volume, contrast, psf")),
                             (["--strata", "psf,psf"], ("--strata", "distinct")),
                             (["--psf-bins", "6"], ("--psf-bins", "goes with --strata psf")),
                             (["--strata", "psf", "--psf-bins", "0"], ("--psf-bins", "positive")),
                             (volume + ["5,1"], ("--volume-bins", "increasing")),
                             (volume + ["0,5"], ("--volume-bins", "positive")),
                             (volume + ["a"], ("--volume-bins", "comma-separated numbers")),
                             (["--contrast-bins", "10"], ("--contrast-bins", "goes with --strata contrast"))):
        result = main_cli("calibrate", config, "--out", out, *options)
        assert_refused(result, *phrases)
        assert not out.exists()


def test_psf_strata_bin_the_fwhm_each_case_was_fitted_with():
    spec = strata_spec("volume,psf", "2", None, "5,7")
    assert spec["by"] == ["volume", "psf"] and spec["bins"]["psf"] == [5.0, 7.0]
    labels = [stratum_of({"mean_ml": 1.0, "psf_fwhm_mm": fwhm}, spec) for fwhm in (4.0, 5.0, 6.9, 7.0)]
    assert labels == ["volume <2 mL, FWHM <5 mm", "volume <2 mL, FWHM 5-7 mm", "volume <2 mL, FWHM 5-7 mm",
                      "volume <2 mL, FWHM >=7 mm"]
    # a model fitted without a PSF term records no FWHM: psf strata cannot be formed
    with pytest.raises(InputError, match="psf strata need each fit's psf_fwhm_mm"):
        stratum_of({"mean_ml": 1.0, "psf_fwhm_mm": None}, spec)


def test_packaged_calibrations_match_the_model_code():
    """Each packaged calibration was made by the model code of this checkout (the digest of
    vbseg.calibration.calibration_file.MODEL_CODE, not of the whole package: an edit elsewhere
    leaves the scores as they were), by the one command it records, and stays small."""
    assert model_digest() == model_digest() and len(MODEL_CODE) >= 5
    package = resources.files("vbseg")
    missing = [part for part in MODEL_CODE
               if not (package / part).is_file() and not (package / part).is_dir()]
    assert not missing, f"MODEL_CODE names what vbseg/ does not hold: {missing}"
    for name, resource in PACKAGED_CALIBRATIONS.items():
        with calibration_file(name) as path:
            size = path.stat().st_size
            record = load_calibration(path)
        assert size < 1_500_000, f"{name}: {size} bytes"  # pet-phantom: 540 cases, the issue's n_cal
        command = record["command"]
        assert command.startswith("vbseg calibrate ") and f"--out vbseg/data/{resource}" in command
        assert record["model_code"] == list(MODEL_CODE)
        assert record["model_digest"] == model_digest(), (
            f"{name} was made by other model code: regenerate it with `{record['command']}`")
    plan = plan_conformal("pet-phantom", (90, 95), SegmentOptions(), ["pet"])
    strata = {f"volume {v}, CNR {c}" for v in ("<2 mL", ">=2 mL") for c in ("<10", ">=10")}
    assert set(plan.by_stratum) == strata
    assert all(stratum.n >= 19 for stratum in plan.by_stratum.values())
    assert sum(stratum.n for stratum in plan.by_stratum.values()) >= 500  # the issue's n_cal


def test_segment_with_a_packaged_calibration_by_name(calibrated, tmp_path):
    _, _, _, pet = calibrated
    out = tmp_path / "seg"
    result = main_cli("segment", pet, "--out", out, "--volume-draws", 200, "--calibration", "pet-phantom",
                      "--conformal-levels", "90")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    record = summary["conformal_calibration"]
    assert record["path"] == "pet-phantom" and record["model_digest_matches"] is True
    [entry] = summary["volume_ml_conformal"]
    assert entry["stratum"].startswith("volume <2 mL, CNR ")
    assert entry["n"] == record["strata"]["n"][entry["stratum"]]
    result = main_cli("segment", pet, "--out", tmp_path / "other", "--beta", "1.0", "--calibration",
                      "pet-phantom")
    assert_refused(result, "pet-phantom", "option beta")


CROSS_FIT_CONFIG = """
[real]
index = "{index}"
cases = "all"
modalities = ["pet", "ct", "mr"]

[model]
name = "locate-potts"
prior = "{prior}"
volume_draws = 200
"""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(folder, cases.json, folds.json, the deployed prior learned from all four cases) of a tiny
    synthetic PET/CT/MR cohort in two folds."""
    from vbseg.cohort.population import fit_prior
    from vbseg.phantoms import make_cohort

    folder = tmp_path_factory.mktemp("cohort")
    index = make_cohort(folder / "cases", 4, seed=3, shape=(16, 16, 10))
    folds = folder / "folds.json"
    folds.write_text(json.dumps({"folds": [["syn00", "syn02"], ["syn01", "syn03"]],
                                 "cases": {f"syn0{i}": {"avid": True} for i in range(4)}}))
    deployed = folder / "deployed.json"
    fit_prior(index, ["pet", "ct", "mr"], deployed, calibrate=False)
    return folder, index, folds, deployed


def cross_fit_config(folder: Path, index: Path, prior: Path) -> Path:
    path = folder / f"cross_{prior.stem}.toml"
    path.write_text(CROSS_FIT_CONFIG.format(index=index, prior=prior))
    return path


def test_cross_fitted_calibration_fits_each_case_with_its_folds_prior(cohort, tmp_path):
    """Each case is scored by a fit with the prior of its fold (learned from the other fold
    only), the record keeps every fold prior's hash and the deployed prior's, says it is a
    cross-validation calibration, and applies with the deployed prior only."""
    folder, index, folds, deployed = cohort
    out, priors = tmp_path / "cal.json", tmp_path / "priors"
    result = main_cli("calibrate", cross_fit_config(folder, index, deployed), "--folds", folds,
                      "--fold-priors", priors, "--out", out)
    assert result.returncode == 0, result.stderr
    record = load_calibration(out)
    assert record["scheme"] == "cross-fit" and "not split conformal" in record["guarantee"]
    assert "no finite-sample guarantee" in record["guarantee"]
    entry = record["cross_fit"]
    assert entry["fold_of"] == {"syn00": 0, "syn01": 1, "syn02": 0, "syn03": 1}
    for fold, held_out in enumerate([["syn00", "syn02"], ["syn01", "syn03"]]):
        prior = json.loads((priors / f"fold{fold}.json").read_text())
        assert not set(prior["cases"]) & set(held_out) and len(prior["cases"]) == 2
        assert entry["fold_priors"][fold]["sha256"] == sha256_file(priors / f"fold{fold}.json")
        assert entry["fold_priors"][fold]["held_out"] == held_out
    assert record["files"]["prior"] == sha256_file(deployed)
    assert entry["deployed_prior"]["cases"] == ["syn00", "syn01", "syn02", "syn03"]
    assert [case["fold"] for case in record["cases"]] == [0, 1, 0, 1]
    options = SegmentOptions.from_values(model="locate-potts", prior=str(deployed))
    with pytest.raises(InputError, match="4 cases cannot calibrate level 0.9"):
        plan_conformal(out, (90,), options, ["pet", "ct", "mr"])
    with pytest.raises(InputError, match="the prior file's sha256"):
        fold_options = SegmentOptions.from_values(model="locate-potts", prior=str(priors / "fold0.json"))
        plan_conformal(out, (50,), fold_options, ["pet", "ct", "mr"])
    plan = plan_conformal(out, (50,), options, ["pet", "ct", "mr"])
    assert plan.scheme == "cross-fit" and plan.by_stratum["all"].n == 4


def test_a_cross_fitted_calibration_refuses_priors_that_do_not_fit_the_folds(cohort, tmp_path):
    """One line, exit 2, nothing written: --folds without --fold-priors, a deployed prior
    learned from other cases than the folds', and a fold prior that saw its held-out cases."""
    folder, index, folds, deployed = cohort
    config = cross_fit_config(folder, index, deployed)
    out = tmp_path / "cal.json"
    assert_refused(main_cli("calibrate", config, "--folds", folds, "--out", out), "--fold-priors")
    priors = tmp_path / "priors"
    priors.mkdir()
    (priors / "fold0.json").write_text(deployed.read_text())  # learned from every case
    assert_refused(main_cli("calibrate", config, "--folds", folds, "--fold-priors", priors, "--out", out),
                   "fold0.json", "is not fold 0's prior")
    partial = folder / "partial.json"
    from vbseg.cohort.population import fit_prior

    fit_prior(index, ["pet", "ct", "mr"], partial, names=["syn01", "syn03"], calibrate=False)
    assert_refused(main_cli("calibrate", cross_fit_config(folder, index, partial), "--folds", folds,
                            "--fold-priors", tmp_path / "other", "--out", out),
                   "deployed prior was learned from 2 cases")
    assert not out.exists()


def test_the_sarcoma_calibration_is_cross_fitted_and_keeps_its_priors_hashes():
    """The packaged sarcoma calibration: out-of-fold scores of 21 cases in 5 folds, each fold
    prior's hash recorded with the packaged prior's (the one a new case must use), its
    guarantee a cross-validation one, the data's attribution kept (no accuracy is asserted)."""
    with calibration_file("sarcoma") as path:
        record = load_calibration(path)
    entry = record["cross_fit"]
    assert record["scheme"] == "cross-fit" and "not split conformal" in record["guarantee"]
    assert entry["k"] == 5 and len(entry["fold_priors"]) == 5 and len(record["cases"]) == 21
    held_out = [name for fold in entry["fold_priors"] for name in fold["held_out"]]
    assert sorted(held_out) == sorted(c["name"] for c in record["cases"]) == entry["deployed_prior"]["cases"]
    assert all(len(fold["sha256"]) == 64 for fold in entry["fold_priors"])
    assert all(case["fold"] == entry["fold_of"][case["name"]] for case in record["cases"])
    with resources.as_file(resources.files("vbseg") / "data" / PACKAGED_PRIORS["sarcoma"]) as prior:
        assert record["files"]["prior"] == sha256_file(prior)
    assert "CC BY 3.0" in record["attribution"] and "Vallieres" in record["attribution"]
    modalities = ["pet", "ct", "mr"]
    for given in ({}, {"locator": "prior"}, {"prior": "sarcoma"}):
        options = SegmentOptions.from_values(model="locate-potts", **given)
        plan = plan_conformal("sarcoma", (90, 95), options, modalities)
        assert plan.scheme == "cross-fit" and plan.by_stratum["all"].n == 21


def test_segment_with_the_sarcoma_calibration_on_a_phantom_crop(tmp_path):
    """``--calibration sarcoma`` with locate-potts and the packaged prior on a body-phantom crop
    adds the conformal outputs with the cross-validation guarantee; another prior (the same
    numbers, another file) is refused in one line, exit 2, before any fit."""
    from vbseg.body_phantom import make_body_phantom

    make_body_phantom(seed=4).save(tmp_path)
    images = [tmp_path / f"{m}.nii.gz" for m in ("pet", "ct", "mr")]
    out = tmp_path / "out"
    result = main_cli("segment", *images, "--modality", "pet,ct,mr", "--model", "locate-potts",
                      "--volume-draws", 200, "--calibration", "sarcoma", "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conformal_calibration"]["scheme"] == "cross-fit"
    assert summary["conformal_calibration"]["model_digest_matches"] is True
    for entry in summary["volume_ml_conformal"]:
        assert entry["n"] == 21 and "no finite-sample guarantee" in entry["guarantee"]
        assert 0 < entry["lower"] <= entry["upper"] and entry["contour_crc"]["file"] in os.listdir(out)
    with resources.as_file(resources.files("vbseg") / "data" / PACKAGED_PRIORS["sarcoma"]) as prior:
        other = tmp_path / "other_prior.json"
        other.write_text(prior.read_text() + "\n")
    result = main_cli("segment", *images, "--modality", "pet,ct,mr", "--model", "locate-potts", "--prior",
                      other, "--calibration", "sarcoma", "--out", tmp_path / "refused")
    assert_refused(result, "sarcoma", "the prior file's sha256")
    assert not (tmp_path / "refused").exists()


PSF_CONFIG = """
[phantoms]
diameters_mm = [10]
contrast = 4.0
psf_fwhm_mm = {fwhms}
seeds = {seeds}

[model]
psf_fwhm_mm = {model}
volume_draws = 200
"""


def psf_config(folder: Path, fwhms="[5.0, 7.0]", seeds="[3, 4]", model='"phantom"', name="psf.toml") -> Path:
    path = folder / name
    path.write_text(PSF_CONFIG.format(fwhms=fwhms, seeds=seeds, model=model))
    return path


def test_psf_phantom_setting_fits_each_case_with_its_own_fwhm(tmp_path):
    experiment = load_experiment(psf_config(tmp_path))
    assert [(run.case["spec"]["psf_fwhm_mm"], run.case["seed"]) for run in experiment.runs] == \
        [(5.0, 3), (5.0, 4), (7.0, 3), (7.0, 4)]
    for run in experiment.runs:
        assert run.variant == {"psf_fwhm_mm": "phantom", "volume_draws": 200}
        assert segment_kwargs(run.variant, run.case) == {
            "model": "potts", "psf_fwhm_mm": run.case["spec"]["psf_fwhm_mm"], "volume_draws": 200}
    assert segment_kwargs({"psf_fwhm_mm": 0}) == {"model": "potts", "psf_fwhm_mm": None}
    # without [phantoms] psf_fwhm_mm a phantom has the PhantomSpec default
    plain = load_experiment(write_config(tmp_path, "plain.toml", 'psf_fwhm_mm = "phantom"'))
    assert {segment_kwargs(run.variant, run.case)["psf_fwhm_mm"] for run in plain.runs} == {6.0}


def test_psf_config_errors_are_one_line(tmp_path):
    index = tmp_path / "cases.json"
    index.write_text(json.dumps([{"case": "p1", "kind": "patient",
                                  "modalities": {"pet": {"image": "p1.nii.gz", "label": "l1.nii.gz"}}}]))
    for name in ("p1.nii.gz", "l1.nii.gz"):  # real files: the index's files are checked first
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / name)
    real = tmp_path / "real.toml"
    real.write_text(f'[real]\nindex = "{index}"\n\n[model]\npsf_fwhm_mm = "phantom"\n')
    for config, phrases in (
            (psf_config(tmp_path, model='"nominal"', name="a.toml"),
             ("a.toml", "[model] psf_fwhm_mm: expected a number or \"phantom\"", "'nominal'")),
            (psf_config(tmp_path, fwhms="[0.0, 6.0]", name="b.toml"),
             ("b.toml", "[phantoms] psf_fwhm_mm: must be > 0 with [model] psf_fwhm_mm = \"phantom\"",
              "got 0")),
            (real, ("real.toml", "psf_fwhm_mm = \"phantom\": needs phantom cases only", "not p1")),
            (psf_config(tmp_path, seeds="[1, 1]", name="c.toml"),
             ("c.toml", "[phantoms] seeds: a list needs distinct seeds >= 0", "[1, 1]")),
            (psf_config(tmp_path, seeds="[-1]", name="d.toml"), ("d.toml", "distinct seeds >= 0")),
            (psf_config(tmp_path, seeds="0", name="e.toml"), ("e.toml", "[phantoms] seeds: must be >= 1")),
            (psf_config(tmp_path, seeds='["x"]', name="f.toml"),
             ("f.toml", "[phantoms] seeds: expected int"))):
        out = tmp_path / "calibration.json"
        assert_refused(main_cli("calibrate", config, "--out", out), *phrases)
        assert not out.exists()


def test_calibrate_over_a_psf_range_records_the_range(tmp_path):
    config = psf_config(tmp_path)
    out = tmp_path / "psf.json"
    result = main_cli("calibrate", config, "--out", out)
    assert result.returncode == 0, result.stderr
    record = load_calibration(out)
    assert {**record, "cases": None} == {**json.loads(out.read_text()), "cases": None}
    assert record["psf_fwhm_mm_range"] == [5.0, 7.0] and record["psf_fwhm_mm_values"] == [5.0, 7.0]
    assert record["options"]["psf_fwhm_mm"] == "phantom" and record["settings"]["psf_fwhm_mm"] == "phantom"
    assert record["options"]["beta"] == default_beta(SegmentOptions.from_values(psf_fwhm_mm=6.0).model)
    assert [(c["case"]["spec"]["psf_fwhm_mm"], c["case"]["seed"]) for c in record["cases"]] == \
        [(5.0, 3), (5.0, 4), (7.0, 3), (7.0, 4)]
    # each case records the FWHM it was fitted with (the feature of --strata psf)
    assert [c["psf_fwhm_mm"] for c in record["cases"]] == [5.0, 5.0, 7.0, 7.0]
    # a record with psf_fwhm_mm = "phantom" and no (or a bad) range is not a calibration
    for bounds in (None, [7.0, 5.0], [0.0, 5.0], ["a", 5.0], [5.0]):
        broken = {**record, "psf_fwhm_mm_range": bounds}
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(InputError, match="broken.json: is not a vbseg calibration .psf_fwhm_mm = "
                                             "\"phantom\" needs psf_fwhm_mm_range"):
            load_calibration(path)


def test_the_psf_calibration_accepts_a_fwhm_within_its_range_and_refuses_others(calibrated, tmp_path):
    _, _, _, pet = calibrated
    with calibration_file("pet-phantom-psf") as path:
        record = load_calibration(path)
    assert record["psf_fwhm_mm_range"] == [4.0, 8.0] and record["options"]["psf_fwhm_mm"] == "phantom"
    assert record["command"] == ("vbseg calibrate benchmarks/configs/conformal_phantoms_psf.toml --strata "
                                 "volume,psf --volume-bins 2,30 --psf-bins 6 --out "
                                 "vbseg/data/calibrations/pet-phantom-psf.json --overwrite")
    plan = plan_conformal("pet-phantom-psf", (90, 95), SegmentOptions.from_values(psf_fwhm_mm=4.0), ["pet"])
    # every lesion-sized stratum (< 30 mL) by FWHM is usable; fits above any lesion of the cohort
    # (the tumour class on the background) are too few and refused when a case falls there
    assert set(plan.by_stratum) == {f"volume {v}, FWHM {f}6 mm" for v in ("<2 mL", "2-30 mL")
                                    for f in ("<", ">=")}
    assert all(stratum.n >= 19 for stratum in plan.by_stratum.values())
    assert all(label.startswith("volume >=30 mL") for label in plan.refused)
    in_range = "calibrated for --psf-fwhm 4-8 mm (each case fitted with its scanner's FWHM), this run has "
    for refused, phrases in (((), (in_range + "no --psf-fwhm",)),
                             (("--psf-fwhm", "8.5"), (in_range + "--psf-fwhm 8.5",)),
                             (("--psf-fwhm", "3.9"), (in_range + "--psf-fwhm 3.9",)),
                             (("--psf-fwhm", "6", "--beta", "0.5"), ("option beta",))):
        out = tmp_path / "refused"
        result = main_cli("segment", pet, "--out", out, *refused, "--calibration", "pet-phantom-psf")
        assert_refused(result, "pet-phantom-psf", *phrases)
        assert not out.exists() or not any(out.iterdir())
    # the calibration without a PSF term refuses --psf-fwhm as before
    result = main_cli("segment", pet, "--out", tmp_path / "plain", "--psf-fwhm", "6", "--beta", "0.5",
                      "--calibration", "pet-phantom")
    assert_refused(result, "pet-phantom", "option psf_fwhm_mm = None, this run has 6.0")
    out = tmp_path / "seg"
    result = main_cli("segment", pet, "--out", out, "--psf-fwhm", "6.5", "--volume-draws", 200,
                      "--calibration", "pet-phantom-psf", "--conformal-levels", "90")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    [entry] = summary["volume_ml_conformal"]
    assert summary["conformal_calibration"]["path"] == "pet-phantom-psf"
    assert summary["conformal_calibration"]["features"]["psf_fwhm_mm"] == 6.5  # what psf strata bin
    assert entry["stratum"].endswith("FWHM >=6 mm")
    assert entry["n"] == summary["conformal_calibration"]["strata"]["n"][entry["stratum"]]
    assert entry["lower"] < summary["volume_ml"]["lower"] or entry["score"] <= 0


def test_calibration_json_joins_number_lists_and_leaves_strings():
    from vbseg.calibration.calibrate import calibration_json

    record = {"counts": [1, 20, 300], "rates": [0.5, -2.5e-05, 1e+20], "names": ["a", "b"], "empty": [],
              "runs": [[5, 3], [2, 1]], "mixed": [["s", 1]], "command": "vbseg calibrate x --bins [1,2]"}
    text = calibration_json(record)
    assert json.loads(text) == record
    assert '"counts": [1, 20, 300]' in text and '"rates": [0.5, -2.5e-05, 1e+20]' in text
    assert '"runs": [[5, 3], [2, 1]]' in text and '"s",\n' in text
    assert '"vbseg calibrate x --bins [1,2]"' in text and '"a",\n' in text


def test_run_lengths_round_trip():
    for counts in ([5, 5, 5, 3, 3, 0], [1], [0, 1, 2, 3], [7, 7]):
        assert expand_runs(run_lengths(counts)) == counts
    assert run_lengths([5, 5, 5, 3, 3, 0]) == [[5, 3], [3, 2], [0, 1]]
