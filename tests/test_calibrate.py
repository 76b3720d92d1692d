"""``vbseg calibrate`` and ``vbseg segment --calibration`` end to end on tiny sphere phantoms
(20 cases at 16 x 16 x 24 voxels, calibrated once per module): the outputs appear and agree with
the conformal math of :mod:`vbseg.conformal`, the calibration file reads back, and every refusal
is one line, exit 2, with nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.test_cli import main_cli
from vbseg.calibration import LAMBDA_GRID, load_calibration, plan_conformal
from vbseg.conformal import conformal_quantile
from vbseg.experiment import load_experiment
from vbseg.options import SegmentOptions
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
    # a smaller miscoverage needs a lower (or equal) probability threshold
    assert entries[1]["contour_crc"]["threshold"] <= entries[0]["contour_crc"]["threshold"]
    assert summary["conformal_calibration"]["source_digest_matches"] is True
    assert "conformal 95% interval" in result.stdout
    # --overwrite without the calibration: its contours go with the rest of the old result set
    again = main_cli("segment", pet, "--out", out, "--volume-draws", 300, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert not list(out.glob("contour_crc*")) and not list(out.glob("contour_margin*"))
    assert "volume_ml_conformal" not in json.loads((out / "summary.json").read_text())


def test_calibration_file_round_trip(calibrated):
    _, config, calibration, _ = calibrated
    record = load_calibration(calibration)
    assert record == json.loads(calibration.read_text())
    names = [run.case["name"] for run in load_experiment(config).runs]
    assert [case["name"] for case in record["cases"]] == names
    assert record["command"].startswith("vbseg calibrate ") and record["lambda_grid"] == LAMBDA_GRID.tolist()
    assert record["options"]["beta"] == 0.5 and record["files"] == {"prior": None, "checkpoint": None}
    for case in record["cases"]:
        assert case["floor_ml"] == pytest.approx(4 * 4 * 3 / 1000)
        assert len(case["fnr"]) == LAMBDA_GRID.size and case["fnr"][-1] == 0.0
        assert np.all(np.diff(case["fnr"]) <= 0)
    plan = plan_conformal(calibration, (80, 90), SegmentOptions(volume_draws=500), ["pet"])
    assert plan.n == 20 and plan.quantiles[0] <= plan.quantiles[1]


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
