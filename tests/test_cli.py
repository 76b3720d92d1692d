"""The command line: the demo end to end as a user runs it (a subprocess: the real entry
point, exit status and streams), then segment's outputs and every bad input -> one line naming
the file, exit 2, nothing written, inputs untouched, through ``vbseg.cli.main`` in this process
(the same argument parsing, error handling and streams, without a Python start-up and a cold
JAX per case)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vbseg.io.volume import save_nifti
from vbseg.phantoms import PhantomSpec, make_phantom

BOX = "2:20,2:20,2:20"  # a volume of interest on the CT's grid (CT or MR alone needs one)
OUTPUTS = ["prob.nii.gz", "contour_10.nii.gz", "contour_50.nii.gz", "contour_90.nii.gz",
           "summary.json", "overview.png"]


def run_cli(*args, cwd=None):
    """``python -m vbseg.cli ARGS`` in a subprocess: (returncode, stdout, stderr)."""
    return subprocess.run([sys.executable, "-m", "vbseg.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def main_cli(*args):
    """``vbseg.cli.main(ARGS)`` in this process, its streams captured, a SystemExit (argparse's
    usage errors) turned into the exit status, as the console script does."""
    from vbseg.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    return types.SimpleNamespace(returncode=status, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def interrupted_at(stage: str, marker: Path, *args, launcher=("-m", "vbseg.cli")) -> tuple[int, str]:
    """``python -m vbseg.cli ARGS`` (or ``python LAUNCHER ARGS``) in a subprocess, sent SIGINT
    once it reaches the pause point ``stage`` (:func:`vbseg.interrupts.pause_point`, which
    touches ``marker``): (exit status, stderr). The caller checks ``marker`` exists (the run got
    there)."""
    env = dict(os.environ, VBSEG_TEST_PAUSE_AT=stage, VBSEG_TEST_PAUSE_FILE=str(marker))
    process = subprocess.Popen([sys.executable, *launcher, *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    while not marker.exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    phantom = make_phantom(PhantomSpec(), seed=1)
    phantom.save(folder)
    pet = phantom.pet
    save_nifti(folder / "roi.nii.gz", np.pad(np.ones((10, 10, 10), np.uint8), 7), pet.affine)
    save_nifti(folder / "empty_roi.nii.gz", np.zeros(pet.shape, np.uint8), pet.affine)
    save_nifti(folder / "roi_ct_grid.nii.gz", np.full(phantom.ct.shape, 0.5, np.float32), phantom.ct.affine)
    nan = pet.data.copy()
    nan[3, 4, 5] = np.nan
    save_nifti(folder / "nan.nii.gz", nan, pet.affine)
    save_nifti(folder / "flat.nii.gz", pet.data[:, :, 0], pet.affine)
    save_nifti(folder / "constant.nii.gz", np.full(pet.shape, 2.0, np.float32), pet.affine)
    save_nifti(folder / "complex.nii.gz", pet.data.astype(np.complex64), pet.affine)
    far = phantom.ct.affine.copy()
    far[:3, 3] += 2000.0
    save_nifti(folder / "far_ct.nii.gz", phantom.ct.data, far)
    half = phantom.ct.affine.copy()
    half[:3, 3] += 40.0  # overlaps the PET grid, but not all of it
    save_nifti(folder / "half_ct.nii.gz", phantom.ct.data, half)
    (folder / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file")
    huge = pet.affine.copy()
    huge[:3, :3] *= 1e5  # voxels of hundreds of metres: an affine in the wrong units
    save_nifti(folder / "km_voxels.nii.gz", pet.data, huge)
    negative = pet.data.copy()
    negative[0, 0, :4] = -1.5  # a few negative "SUV" voxels
    save_nifti(folder / "negative_pet.nii.gz", negative, pet.affine)
    return folder


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", out)
    assert result.returncode == 0, result.stderr
    for key in ("true volume", "posterior mean volume", "95% credible interval",
                "Dice of 50% contour", "compile time", "run time"):
        assert key in result.stdout
    assert sorted(OUTPUTS) == sorted(p.name for p in out.iterdir() if p.is_file())
    dice_line = next(line for line in result.stdout.splitlines() if line.startswith("Dice"))
    assert float(dice_line.split()[-1]) >= 0.85
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"] == []  # no warning code fires on the demo
    assert summary["options"]["fusion"]["mode"] == "pet"
    assert summary["options"]["fusion"]["chosen"] == "default"
    # a second demo into a folder the user named needs --overwrite
    again = main_cli("demo", "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_segment_pet_ct_writes_the_documented_outputs(inputs, tmp_path):
    out = tmp_path / "seg"
    before = digest(inputs)
    result = main_cli("segment", inputs / "pet.nii.gz", inputs / "ct.nii.gz", "--modality", "pet,ct",
                     "--box", "4:20,4:20,4:20", "--out", out, "--seed", 3)
    assert result.returncode == 0, result.stderr
    assert digest(inputs) == before
    pet = nib.load(inputs / "pet.nii.gz")
    prob_image = nib.load(out / "prob.nii.gz")
    prob = np.asarray(prob_image.dataobj)
    assert prob.dtype == np.float32 and prob.shape == pet.shape
    np.testing.assert_allclose(prob_image.affine, pet.affine, atol=1e-5)
    outside = np.ones(pet.shape, bool)
    outside[4:20, 4:20, 4:20] = False
    assert np.all(prob[outside] == 0)
    masks = [np.asarray(nib.load(out / f"contour_{lv}.nii.gz").dataobj) for lv in (10, 50, 90)]
    assert all(m.dtype == np.uint8 for m in masks)
    assert np.all(masks[0] >= masks[1]) and np.all(masks[1] >= masks[2]) and masks[2].sum() > 0
    np.testing.assert_array_equal(masks[1], (prob >= 0.5).astype(np.uint8))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("volume_ml", "mtv_ml", "tlg", "model", "parameters", "modality", "resampled",
                "elbo", "diagnostics", "timings_s", "seed", "versions", "inputs"):
        assert key in summary, key
    volume = summary["volume_ml"]
    assert volume["level"] == 0.95 and volume["interval"] == "equal-tailed" and volume["method"]
    assert volume["lower"] <= volume["mean"] <= volume["upper"]
    assert [r["resampled"] for r in summary["resampled"]] == [False, True]
    assert summary["modality"] == ["pet", "ct"] and summary["seed"] == 3
    assert set(summary["timings_s"]) == {"compile", "run"}
    assert summary["inputs"][0]["sha256"] == hashlib.sha256(
        (inputs / "pet.nii.gz").read_bytes()).hexdigest()


def _bad_cases(i: Path, out: Path):
    pet = i / "pet.nii.gz"
    return [
        ("missing file", ["segment", i / "nope.nii.gz", "--out", out], "nope.nii.gz", "not found"),
        ("unreadable", ["segment", i / "garbage.nii.gz", "--out", out], "garbage.nii.gz", "cannot be read"),
        ("not 3D", ["segment", i / "flat.nii.gz", "--out", out], "flat.nii.gz", "3D"),
        ("NaN voxels", ["segment", i / "nan.nii.gz", "--out", out], "nan.nii.gz", "NaN"),
        ("complex dtype", ["segment", i / "complex.nii.gz", "--out", out], "complex.nii.gz", "voxel type"),
        ("constant", ["segment", i / "constant.nii.gz", "--out", out], "constant.nii.gz", "constant"),
        ("no overlap", ["segment", pet, i / "far_ct.nii.gz", "--modality", "pet,ct", "--out", out],
         "far_ct.nii.gz", "does not overlap"),
        ("fractional ROI on another grid", ["segment", pet, "--roi", i / "roi_ct_grid.nii.gz", "--out",
                                            out], "roi_ct_grid.nii.gz", "fractional values"),
        ("empty ROI", ["segment", pet, "--roi", i / "empty_roi.nii.gz", "--out", out],
         "empty_roi.nii.gz", "empty"),
        ("roi and box", ["segment", pet, "--roi", i / "roi.nii.gz", "--box", "0:2,0:2,0:2",
                         "--out", out], "--roi", "not allowed"),
        ("box outside", ["segment", pet, "--box", "0:99,0:4,0:4", "--out", out], "--box", "outside"),
        ("bad levels", ["segment", pet, "--levels", "10,150", "--out", out], "--levels", "between"),
        ("bad classes", ["segment", pet, "--classes", "1", "--out", out], "--classes", "2 to 8"),
        ("bad beta", ["segment", pet, "--beta", "-1", "--out", out], "--beta", ">= 0"),
        ("beta word", ["segment", pet, "--beta", "learn", "--out", out], "--beta", "'auto'"),
        ("bad neighbourhood", ["segment", pet, "--neighbourhood", "18", "--out", out],
         "--neighbourhood", "6 or 26"),
        ("bad emission", ["segment", pet, "--emission", "cauchy", "--out", out], "--emission",
         "one of"),
        ("bad covariance", ["segment", pet, "--covariance", "sparse", "--out", out],
         "--covariance", "one of"),
        ("full with one image", ["segment", pet, "--covariance", "full", "--out", out],
         "--covariance", "two or more images"),
        ("student with full", ["segment", pet, i / "ct.nii.gz", "--modality", "pet,ct",
                               "--emission", "student", "--covariance", "full", "--out", out],
         "--covariance", "cannot be combined"),
        ("lognormal without PET", ["segment", i / "ct.nii.gz", "--modality", "ct", "--box", BOX,
                                   "--tumour-class", "1", "--emission", "lognormal", "--out", out],
         "--emission", "no image is PET"),
        ("bad dof", ["segment", pet, "--emission", "student", "--dof", "0", "--out", out], "--dof",
         "> 0"),
        ("student with PSF", ["segment", pet, "--emission", "student", "--psf-fwhm", "6",
                              "--out", out], "--psf-fwhm", "cannot be combined"),
        ("full with gibbs", ["segment", pet, i / "ct.nii.gz", "--modality", "pet,ct",
                             "--covariance", "full", "--sampler", "gibbs", "--out", out],
         "--sampler", "cannot be combined"),
        ("full beyond the CT", ["segment", pet, i / "half_ct.nii.gz", "--modality", "pet,ct",
                                "--covariance", "full", "--out", out], "half_ct.nii.gz",
         "does not cover the whole volume of interest"),
        ("modality count", ["segment", pet, "--modality", "pet,ct", "--out", out], "--modality",
         "2 modalities"),
        ("CT without a VOI", ["segment", i / "ct.nii.gz", "--modality", "ct", "--tumour-class", "1",
                              "--out", out], "--roi/--box", "required without a PET image"),
        ("CT without tumour class", ["segment", i / "ct.nii.gz", "--modality", "ct", "--box", BOX,
                                     "--out", out], "--tumour-class", "required"),
        ("fusion pet without PET", ["segment", i / "ct.nii.gz", "--modality", "ct", "--box", BOX,
                                    "--tumour-class", "1", "--fusion", "pet", "--out", out],
         "--fusion", "no image is PET"),
        ("unknown fusion", ["segment", pet, "--fusion", "early", "--out", out], "--fusion", "one of"),
        ("fusion with a network", ["segment", pet, i / "ct.nii.gz", "--modality", "pet,ct",
                                   "--model", "cnn", "--fusion", "pet", "--out", out],
         "--fusion", "not of --model cnn"),
        ("intensity field on a first image left out", ["segment", i / "ct.nii.gz", pet, "--modality",
                                                       "ct,pet", "--intensity-field", "all", "--out", out],
         "--intensity-field", "--fusion joint"),
        ("full covariance with PET deciding", ["segment", pet, i / "ct.nii.gz", "--modality", "pet,ct",
                                               "--covariance", "full", "--fusion", "pet", "--out", out],
         "--covariance", "--fusion joint"),
        ("bad PSF", ["segment", pet, "--psf-fwhm", "-2", "--out", out], "--psf-fwhm", ">= 0"),
        ("PSF without PET", ["segment", i / "ct.nii.gz", "--modality", "ct", "--tumour-class", "1",
                             "--box", BOX,
                             "--psf-fwhm", "6", "--out", out], "--psf-fwhm", "no image is PET"),
        ("bad PET noise", ["segment", pet, "--psf-fwhm", "6", "--pet-noise", "loud", "--out", out],
         "--pet-noise", "one of"),
        ("bad sampler", ["segment", pet, "--sampler", "hmc", "--out", out], "--sampler", "one of"),
        ("bad restarts", ["segment", pet, "--restarts", "fine", "--out", out], "--restarts", "one of"),
        ("coarse restarts with a GP intensity field", ["segment", pet, "--restarts", "coarse",
                                                       "--intensity-field", "all", "--out", out],
         "--restarts", "--intensity-field"),
        ("coarse restarts with the GP model", ["segment", pet, "--model", "gp", "--restarts", "coarse",
                                               "--out", out], "--restarts", "hidden Potts"),
        ("coarse restarts with a prior", ["segment", pet, "--prior", "sarcoma", "--restarts", "coarse",
                                          "--out", out], "--restarts", "--prior"),
        ("same-name levels", ["segment", pet, "--levels", "10,10.0000001", "--out", out],
         "--levels", "same file name"),
        ("output under a file", ["segment", pet, "--out", i / "roi.nii.gz" / "sub"], "roi.nii.gz",
         "not a directory"),
        ("output is an input", ["segment", pet, "--out", i], "pet.nii.gz", None),
    ]


def test_every_bad_input_is_one_line_and_exit_2(inputs, tmp_path):
    before = digest(inputs)
    failures = []
    for name, args, subject, problem in _bad_cases(inputs, tmp_path / "out"):
        if name == "output is an input":
            # an input named like an output, in the output folder
            (tmp_path / "clash").mkdir()
            clash = tmp_path / "clash" / "prob.nii.gz"
            clash.write_bytes((inputs / "pet.nii.gz").read_bytes())
            args = ["segment", clash, "--out", tmp_path / "clash", "--overwrite"]
            subject, problem = "prob.nii.gz", "is one of the inputs"
        result = main_cli(*args)
        lines = result.stderr.strip().splitlines()
        ok = (result.returncode == 2 and len(lines) == 1 and lines[0].startswith("vbseg: error: ")
              and subject in lines[0] and (problem is None or problem in lines[0])
              and "Traceback" not in result.stderr)
        if not ok:
            failures.append((name, result.returncode, result.stderr[-400:]))
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), name
    assert not failures, failures
    assert digest(inputs) == before
    assert (tmp_path / "clash" / "prob.nii.gz").read_bytes() == (inputs / "pet.nii.gz").read_bytes()


def test_learned_beta_on_the_26_neighbourhood(inputs, tmp_path):
    """--beta auto --neighbourhood 26: summary.json records the learned beta (inside the
    prior's range, not at its bound), its trace, and the neighbourhood's 13 weights."""
    out = tmp_path / "auto"
    result = main_cli("segment", inputs / "pet.nii.gz", "--box", "4:20,4:20,4:20", "--beta", "auto",
                     "--neighbourhood", "26", "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["beta"] == "auto" and summary["options"]["neighbourhood"] == 26
    assert "beta learned" in summary["options"]["inference"]
    beta = summary["parameters"]["beta"]
    assert 0.0 < beta < 3.0 and not summary["diagnostics"]["beta_at_prior_bound"]
    assert summary["diagnostics"]["beta_trace"][-1] == pytest.approx(beta, rel=1e-6)
    assert len(summary["parameters"]["neighbour_weights"]) == 13


@pytest.mark.parametrize("options,words", [
    (["--emission", "student", "--dof", "5", "--fusion", "joint"], "student-t (5 degrees of freedom"),
    (["--emission", "lognormal", "--covariance", "full"], "full covariance"),
])
def test_emission_options_run_and_are_recorded(inputs, tmp_path, options, words):
    out = tmp_path / "emission"
    result = main_cli("segment", inputs / "pet.nii.gz", inputs / "ct.nii.gz", "--modality", "pet,ct",
                     "--box", "4:20,4:20,4:20", *options, "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert words in summary["options"]["emission"]
    means = np.asarray(summary["parameters"]["class_means"])
    assert means.shape == (2, 2) and means[1, 0] > means[0, 0] > 0  # PET in SUV, tumour hotter
    if "lognormal" in options:
        assert "log scale" in summary["options"]["emission"]
        assert "class median" in summary["parameters"]["units"]
        assert summary["diagnostics"]["log_floored_voxels"] == 0


def test_existing_outputs_need_overwrite(inputs, tmp_path):
    out = tmp_path / "seg"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    result = main_cli("segment", inputs / "pet.nii.gz", "--out", out)
    assert result.returncode == 2 and "summary.json: already exists" in result.stderr
    assert (out / "summary.json").read_text() == "{}"
    assert [p.name for p in out.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("args,subject", [
    (["--noise", "poisson", "--cv", "0"], "phantom"),
    (["--contrast", "nan"], "phantom"),
    (["--diameters", "22,x"], "--diameters"),
])
def test_bad_phantom_options(tmp_path, args, subject):
    result = main_cli("phantom", "--out", tmp_path / "ph", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"vbseg: error: {subject}")
    assert not (tmp_path / "ph").exists()


def test_demo_into_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = main_cli("demo", "--out", tmp_path / "afile")
    assert result.returncode == 2 and "not a directory" in result.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_phantom_command(tmp_path):
    result = main_cli("phantom", "--out", tmp_path / "ph", "--kind", "heterogeneous", "--seed", 2)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "ph").iterdir())
    assert names == ["ct.nii.gz", "pet.nii.gz", "truth.nii.gz", "truth_fraction.nii.gz"]
    again = main_cli("phantom", "--out", tmp_path / "ph")
    assert again.returncode == 2 and "already exists" in again.stderr
