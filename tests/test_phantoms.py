"""Phantoms: deterministic, exact truth, noise at the stated CV, CT aligned in world space."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vbseg.phantoms import NEMA_DIAMETERS_MM, PhantomSpec, make_phantom


def test_same_seed_same_phantom_and_different_seed_differs():
    a, b, c = (make_phantom(PhantomSpec(), seed=s) for s in (4, 4, 5))
    np.testing.assert_array_equal(a.pet.data, b.pet.data)
    np.testing.assert_array_equal(a.ct.data, b.ct.data)
    assert not np.array_equal(a.pet.data, c.pet.data)


@pytest.mark.parametrize("diameters", [(22.0,), NEMA_DIAMETERS_MM])
def test_truth_fraction_integrates_to_the_physical_volume(diameters):
    phantom = make_phantom(PhantomSpec(diameters_mm=diameters), seed=0)
    analytic = sum(4 / 3 * math.pi * (d / 2) ** 3 for d in diameters) / 1000
    assert phantom.volume_ml == pytest.approx(analytic)
    fraction_ml = phantom.truth_fraction.sum() * phantom.pet.voxel_volume_ml
    # 5^3 sub-samples per voxel: boundary quadrature error well under 1 %
    assert fraction_ml == pytest.approx(analytic, rel=0.01)
    assert phantom.truth.dtype == bool and phantom.truth.sum() > 0
    # voxel-centre truth agrees with the fraction: centres inside have fraction > 0
    assert np.all(phantom.truth_fraction[phantom.truth] > 0)


def test_background_noise_has_the_stated_cv():
    for noise, fwhm in (("gaussian", 0.0), ("gaussian", 8.0), ("poisson", 0.0)):
        spec = PhantomSpec(cv=0.15, noise=noise, noise_fwhm_mm=fwhm, shape=(40, 40, 40))
        phantom = make_phantom(spec, seed=1)
        background = phantom.pet.data[phantom.truth_fraction == 0]
        # far from the lesion the PSF leaves the background flat, so sd / mean is the CV
        far = background[: background.size // 2]
        assert far.std() / far.mean() == pytest.approx(0.15, rel=0.08), noise


def test_lesion_contrast_and_ct_on_its_own_grid():
    spec = PhantomSpec(diameters_mm=(37.0,), psf_fwhm_mm=0.0, cv=0.0, contrast=5.0)
    phantom = make_phantom(spec, seed=0)
    assert phantom.pet.data[phantom.truth_fraction == 1].mean() == pytest.approx(5.0)
    assert phantom.pet.data[phantom.truth_fraction == 0].mean() == pytest.approx(1.0)
    assert not np.allclose(phantom.ct.affine, phantom.pet.affine)
    # lesion centroid in world mm agrees between the PET and CT grids
    def centroid(volume, weights):
        idx = np.argwhere(weights > 0.5).astype(float)
        return (volume.affine[:3, :3] @ idx.mean(0)) + volume.affine[:3, 3]
    ct_lesion = phantom.ct.data > (spec.ct_background_hu + spec.ct_lesion_hu) / 2
    np.testing.assert_allclose(centroid(phantom.pet, phantom.truth_fraction),
                               centroid(phantom.ct, ct_lesion), atol=0.5)


def test_a_cold_wall_is_a_shell_without_activity_outside_the_truth():
    """wall_mm: the voxels wholly inside the shell have no activity, the sphere and the rest of
    the background are unchanged, and the truth (volume, fraction, mask) is the sphere's inside."""
    base = dict(diameters_mm=(22.0,), psf_fwhm_mm=0.0, cv=0.0, contrast=4.0, spacing_mm=(1.0, 1.0, 1.0))
    plain = make_phantom(PhantomSpec(**base), seed=0)
    walled = make_phantom(PhantomSpec(**base, wall_mm=3.0), seed=0)
    np.testing.assert_array_equal(plain.truth, walled.truth)
    np.testing.assert_array_equal(plain.truth_fraction, walled.truth_fraction)
    assert walled.volume_ml == plain.volume_ml
    centres = np.stack(np.meshgrid(*[np.arange(n) for n in walled.truth.shape], indexing="ij"), -1)
    world = centres @ walled.pet.affine[:3, :3].T + walled.pet.affine[:3, 3]
    radius = np.linalg.norm(world, axis=-1)  # the sphere is centred on the world origin
    # a voxel (1 mm, half-diagonal 0.87 mm) whose centre lies 0.9-2.1 mm outside the 11 mm surface
    # is wholly inside the 3 mm shell
    shell = (radius >= 11.0 + 0.9) & (radius <= 11.0 + 2.1)
    assert shell.sum() > 100 and np.all(walled.pet.data[shell] == 0.0)
    far = radius > 11.0 + 3.0 + 0.9
    np.testing.assert_array_equal(walled.pet.data[far], plain.pet.data[far])
    np.testing.assert_array_equal(walled.pet.data[walled.truth_fraction == 1],
                                  plain.pet.data[plain.truth_fraction == 1])
    with pytest.raises(ValueError, match="wall_mm"):
        PhantomSpec(wall_mm=-1.0)
    with pytest.raises(ValueError, match="spheres only"):
        PhantomSpec(kind="heterogeneous", wall_mm=1.0)


def test_heterogeneous_lesion_has_cold_core_inside_truth():
    spec = PhantomSpec(kind="heterogeneous", diameters_mm=(40.0,), psf_fwhm_mm=0.0, cv=0.0)
    phantom = make_phantom(spec, seed=2)
    inside = phantom.pet.data[phantom.truth_fraction == 1]
    assert inside.min() == pytest.approx(spec.necrotic_uptake, rel=1e-5)  # the core
    assert inside.max() > spec.contrast  # the hot side of the gradient
    assert phantom.volume_ml == pytest.approx(phantom.truth_fraction.sum() * phantom.pet.voxel_volume_ml)
