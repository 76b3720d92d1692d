"""Accuracy on the phantom the foundation issue names: a 22 mm sphere, 4:1 contrast, CV 10 %,
4 x 4 x 3 mm voxels, PET alone, whole phantom crop as the VOI, seeds 0-4.

Targets (issue 3): Dice of the 50 % contour against the voxel-centre truth >= 0.85 and the
posterior mean volume within 10 % of the physical sphere volume (5.575 mL), for every seed.

* With the scanner PSF modelled (``psf_fwhm_mm``, the phantom's own 5 or 6 mm; default beta
  1.5): both targets per seed. Measured when written, seeds 0-7: volume ratio 0.95-1.04 (5 mm),
  0.94-1.03 (6 mm); Dice 0.89-0.93 (5 mm), 0.88-0.92 (6 mm).
* Without the PSF term the blur pulls the tumour class mean down and the boundary out: the
  volume comes out high (5 mm: +0 to +10 %; 6 mm: +2 to +15 %). Dice still meets its target;
  the volume is checked here only as the seed-mean overestimate it is (within 10 % at 5 mm).
"""

from __future__ import annotations

import numpy as np
import pytest

import vbseg
from vbseg.io.volume import save_nifti
from vbseg.metrics import dice, expected_calibration_error

SEEDS = range(5)
VARIANTS = {"psf5": (5.0, 5.0), "psf6": (6.0, 6.0), "nopsf5": (5.0, None)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def sphere_fits(request, tmp_path_factory):
    phantom_fwhm, model_fwhm = VARIANTS[request.param]
    fits = []
    for seed in SEEDS:
        phantom = vbseg.make_phantom(vbseg.PhantomSpec(psf_fwhm_mm=phantom_fwhm), seed=seed)
        path = save_nifti(tmp_path_factory.mktemp(f"s{seed}") / "pet.nii.gz",
                          phantom.pet.data, phantom.pet.affine)
        posterior = vbseg.segment([path], modalities=["pet"], seed=seed, psf_fwhm_mm=model_fwhm)
        fits.append((phantom, posterior))
    return request.param, fits


def test_dice_of_the_50_percent_contour(sphere_fits):
    _, fits = sphere_fits
    scores = [dice(post.contour(0.5), ph.truth) for ph, post in fits]
    assert min(scores) >= 0.85, scores


def test_posterior_mean_volume(sphere_fits):
    name, fits = sphere_fits
    errors = [post.volume_interval()["mean"] / ph.volume_ml - 1 for ph, post in fits]
    if name.startswith("psf"):
        assert max(abs(e) for e in errors) <= 0.10, errors
    else:
        assert 0 < np.mean(errors) <= 0.10, errors  # the known overestimate without a PSF term


def test_probabilities_are_calibrated_on_the_crop(sphere_fits):
    """ECE over the whole crop (DESIGN.md) stays small; most voxels are certain background."""
    _, fits = sphere_fits
    eces = [expected_calibration_error(post.probability, ph.truth) for ph, post in fits]
    assert max(eces) <= 0.01, eces


def test_reproducible_with_the_same_seed(sphere_fits, tmp_path):
    name, fits = sphere_fits
    phantom, first = fits[0]
    path = save_nifti(tmp_path / "pet.nii.gz", phantom.pet.data, phantom.pet.affine)
    again = vbseg.segment([path], modalities=["pet"], seed=0, psf_fwhm_mm=VARIANTS[name][1])
    np.testing.assert_array_equal(again.probability, first.probability)
    np.testing.assert_array_equal(again.volume_draws_ml, first.volume_draws_ml)
