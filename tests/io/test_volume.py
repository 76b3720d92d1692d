"""Volumes: validated loading, world-space resampling, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from vbseg.errors import InputError
from vbseg.io.volume import (
    Volume,
    load_map,
    load_mask,
    load_volume,
    parse_box,
    read_mask,
    resample_onto,
    save_nifti,
    write_with,
)
from vbseg.phantoms import PhantomSpec, make_phantom


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
    fractional = save_nifti(tmp_path / "f.nii.gz", phantom.truth_fraction, phantom.pet.affine)
    with pytest.raises(InputError, match="differs from the grid .* holds fractional values"):
        load_mask(fractional, phantom.ct)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.nii.gz", "m.nii.gz", "pet.nii.gz"]


def test_failed_write_leaves_no_file(tmp_path):
    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_with(tmp_path / "out.json", broken)
    assert list(tmp_path.iterdir()) == []


def finer_grid(affine: np.ndarray, factor: int) -> np.ndarray:
    """The grid ``factor`` times finer along every axis over the same world box: coarse voxel
    i holds fine voxels factor * i .. factor * i + factor - 1."""
    fine = affine.copy()
    fine[:3, :3] = affine[:3, :3] / factor
    fine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ np.full(3, (factor - 1) / (2 * factor))
    return fine


def test_label_mask_on_a_2x_finer_grid_gives_the_same_voi(tmp_path):
    """Nearest neighbour in world coordinates: each coarse voxel centre falls between two fine
    voxels of the same coarse voxel, so the VOI is exactly the coarse mask; summary.json's
    record says it was resampled and from what grid."""
    phantom = make_phantom(PhantomSpec(), seed=0)
    fine = np.repeat(np.repeat(np.repeat(phantom.truth, 2, 0), 2, 1), 2, 2).astype(np.int16)
    path = save_nifti(tmp_path / "fine.nii.gz", fine, finer_grid(phantom.pet.affine, 2))
    mask, resampling = read_mask(path, phantom.pet)
    np.testing.assert_array_equal(mask, phantom.truth)
    assert resampling["method"] == "nearest neighbour in world coordinates"
    assert resampling["from_shape"] == list(fine.shape)
    np.testing.assert_allclose(resampling["from_spacing_mm"], phantom.pet.spacing / 2)
    on_grid = save_nifti(tmp_path / "coarse.nii.gz", phantom.truth.astype(np.uint8), phantom.pet.affine)
    assert read_mask(on_grid, phantom.pet)[1] is None


def test_label_mask_on_an_offset_finer_grid_differs_only_at_the_boundary(tmp_path):
    """A ball rasterised on a 1.5x finer grid shifted by a third of a voxel, against the same
    ball rasterised on the image's grid: voxels that differ lie within one coarse voxel of the
    sphere (a nearest-neighbour sample of the finer mask is off by at most half a fine voxel
    diagonal there), and they are few."""
    reference = make_phantom(PhantomSpec(), seed=0).pet
    centre = reference.affine @ np.array([*(np.asarray(reference.shape) / 2 - 0.3), 1.0])
    radius = 15.0
    fine_affine = finer_grid(reference.affine, 1)
    fine_affine[:3, :3] /= 1.5
    fine_affine[:3, 3] += 1.3
    fine_shape = tuple(int(n * 1.5) for n in reference.shape)

    def ball(affine, shape):
        index = np.indices(shape).reshape(3, -1)
        world = affine[:3, :3] @ index + affine[:3, 3:4]
        distance = np.linalg.norm(world - centre[:3, None], axis=0).reshape(shape)
        return distance, distance <= radius

    path = save_nifti(tmp_path / "ball.nii.gz", ball(fine_affine, fine_shape)[1].astype(np.float32),
                      fine_affine)
    mask = load_mask(path, reference)
    distance, expected = ball(reference.affine, reference.shape)
    differ = mask != expected
    assert np.all(np.abs(distance[differ] - radius) <= reference.spacing.max())
    assert differ.sum() <= 0.1 * expected.sum()


def test_mask_outside_the_grid_after_resampling_and_a_map_on_another_grid_are_refused(tmp_path):
    phantom = make_phantom(PhantomSpec(), seed=0)
    corner = np.zeros(phantom.ct.shape, np.uint8)
    corner[-2:, -2:, -2:] = 1
    shifted = phantom.ct.affine.copy()
    shifted[:3, 3] += 40.0  # the corner voxels lie outside the PET's field of view
    path = save_nifti(tmp_path / "corner.nii.gz", corner, shifted)
    with pytest.raises(InputError, match="corner.nii.gz: mask is empty on the grid of"):
        load_mask(path, phantom.pet)
    field = save_nifti(tmp_path / "field.nii.gz", np.ones(phantom.ct.shape, np.float32), phantom.ct.affine)
    with pytest.raises(InputError, match="field.nii.gz: map grid .* must be on the first image's grid"):
        load_map(field, phantom.pet)
