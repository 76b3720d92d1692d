"""Accuracy on the phantom the foundation issue names: a 22 mm sphere, 4:1 contrast, CV 10 %,
4 x 4 x 3 mm voxels, scanner PSF 5 mm FWHM, PET alone, whole phantom crop as the VOI.

Targets: Dice of the 50 % contour against the voxel-centre truth >= 0.85 for every seed; the
posterior mean volume within 10 % of the physical sphere volume (5.575 mL), averaged over the
seeds. The model has no PSF term, so blurring pulls the tumour class mean down and the volume
comes out high (measured per seed at 5 mm: +0 to +10 %; at 6 mm: +2 to +15 %); the per-seed
figures are in the closing note of the foundation issue."""

from __future__ import annotations

import numpy as np
import pytest

import vbseg
from vbseg.metrics import dice, expected_calibration_error
from vbseg.volume import save_nifti

SEEDS = range(5)


@pytest.fixture(scope="module")
def sphere_fits(tmp_path_factory):
    fits = []
    for seed in SEEDS:
        phantom = vbseg.make_phantom(vbseg.PhantomSpec(psf_fwhm_mm=5.0), seed=seed)
        path = save_nifti(tmp_path_factory.mktemp(f"s{seed}") / "pet.nii.gz",
                          phantom.pet.data, phantom.pet.affine)
        fits.append((phantom, vbseg.segment([path], modalities=["pet"], seed=seed)))
    return fits


def test_dice_of_the_50_percent_contour(sphere_fits):
    scores = [dice(post.contour(0.5), ph.truth) for ph, post in sphere_fits]
    assert min(scores) >= 0.85, scores


def test_posterior_mean_volume(sphere_fits):
    errors = [post.volume_interval()["mean"] / ph.volume_ml - 1 for ph, post in sphere_fits]
    assert abs(np.mean(errors)) <= 0.10, errors
    assert all(e > -0.10 for e in errors), errors  # never an underestimate beyond 10 %


def test_probabilities_are_calibrated_on_the_crop(sphere_fits):
    """ECE over the whole crop (DESIGN.md) stays small; most voxels are certain background."""
    eces = [expected_calibration_error(post.probability, ph.truth) for ph, post in sphere_fits]
    assert max(eces) <= 0.01, eces


def test_reproducible_with_the_same_seed(sphere_fits, tmp_path):
    phantom, first = sphere_fits[0]
    path = save_nifti(tmp_path / "pet.nii.gz", phantom.pet.data, phantom.pet.affine)
    again = vbseg.segment([path], modalities=["pet"], seed=0)
    np.testing.assert_array_equal(again.probability, first.probability)
    np.testing.assert_array_equal(again.volume_draws_ml, first.volume_draws_ml)
