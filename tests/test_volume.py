"""Volumes: validated loading, world-space resampling, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from vbseg.errors import InputError
from vbseg.phantoms import PhantomSpec, make_phantom
from vbseg.volume import (
    Volume,
    load_mask,
    load_volume,
    parse_box,
    resample_onto,
    save_nifti,
    write_with,
)


def test_resampling_onto_own_grid_is_identity():
    phantom = make_phantom(PhantomSpec(), seed=0)
    same, covered = resample_onto(phantom.pet, phantom.pet)
    np.testing.assert_allclose(same.data, phantom.pet.data, rtol=1e-6)
    assert covered.all()


def test_fine_ct_resampled_onto_pet_grid_matches_the_pet_grid_truth():
    """CT (2 x 2 x 3 mm, noise-free) onto PET (4 x 4 x 3 mm) in world space: the lesion
    fraction it carries matches the fraction rasterised directly on the PET grid."""
    spec = PhantomSpec(diameters_mm=(30.0,), ct_noise_hu=0.0)
    phantom = make_phantom(spec, seed=0)
    on_pet, covered = resample_onto(phantom.ct, phantom.pet)
    assert covered.all()
    fraction = (on_pet.data - spec.ct_background_hu) / (spec.ct_lesion_hu - spec.ct_background_hu)
    # same volume, and same centroid to a fraction of a voxel
    assert fraction.sum() == pytest.approx(phantom.truth_fraction.sum(), rel=0.01)
    grid = np.indices(fraction.shape).reshape(3, -1)
    c1 = grid @ fraction.ravel() / fraction.sum()
    c2 = grid @ phantom.truth_fraction.ravel() / phantom.truth_fraction.sum()
    np.testing.assert_allclose(c1, c2, atol=0.05)
    # anti-aliasing: the resampled edge is the voxel mean, not a point sample
    assert np.abs(fraction - phantom.truth_fraction).max() < 0.35


def test_grids_that_do_not_overlap_are_an_error():
    phantom = make_phantom(PhantomSpec(), seed=0)
    far = phantom.ct.affine.copy()
    far[:3, 3] += 1000.0
    moved = Volume(phantom.ct.data, far, "ct", "moved_ct.nii.gz")
    with pytest.raises(InputError, match="moved_ct.nii.gz: does not overlap"):
        resample_onto(moved, phantom.pet)


def test_partial_overlap_reports_coverage():
    phantom = make_phantom(PhantomSpec(), seed=0)
    shifted = phantom.ct.affine.copy()
    shifted[2, 3] += 30.0  # 10 slices of 3 mm
    _, covered = resample_onto(Volume(phantom.ct.data, shifted, "ct"), phantom.pet)
    assert 0 < covered.mean() < 1
    assert covered[:, :, 0].sum() == 0 or covered[:, :, -1].sum() == 0


def test_box_parsing():
    assert parse_box("1:3,0:2,4:8", (5, 5, 9)) == (slice(1, 3), slice(0, 2), slice(4, 8))
    for bad in ("1:3,0:2", "3:1,0:2,0:1", "0:6,0:2,0:1", "a:b,0:1,0:1"):
        with pytest.raises(InputError, match="--box"):
            parse_box(bad, (5, 5, 9))


def test_round_trip_and_mask_grid_check(tmp_path):
    phantom = make_phantom(PhantomSpec(), seed=0)
    path = save_nifti(tmp_path / "pet.nii.gz", phantom.pet.data, phantom.pet.affine)
    loaded = load_volume(path, "pet")
    np.testing.assert_array_equal(loaded.data, phantom.pet.data)
    np.testing.assert_allclose(loaded.affine, phantom.pet.affine, atol=1e-5)
    mask_path = save_nifti(tmp_path / "m.nii.gz", phantom.truth.astype(np.uint8), phantom.pet.affine)
    np.testing.assert_array_equal(load_mask(mask_path, loaded), phantom.truth)
    with pytest.raises(InputError, match="differs from the grid"):
        load_mask(mask_path, phantom.ct)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii.gz", "pet.nii.gz"]


def test_failed_write_leaves_no_file(tmp_path):
    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_with(tmp_path / "out.json", broken)
    assert list(tmp_path.iterdir()) == []
