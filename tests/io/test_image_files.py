"""NRRD and MetaImage inputs (issue 21, item 5): read into the same Volume as NIfTI (ITK's LPS
grid converted to RAS), with the same checks; a bad file is one line through the CLI; label
masks on another grid resampled onto the first image's, and summary.json saying so.

The files are written here by SimpleITK, the library that reads them, so the ground truth of
each voxel's world position is ITK's own ``TransformIndexToPhysicalPoint``, independent of
vbseg's conversion.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from tests.io.test_volume import finer_grid
from tests.test_cli import main_cli
from vbseg.errors import InputError
from vbseg.io.volume import load_map, load_mask, load_volume, save_nifti
from vbseg.phantoms import PhantomSpec, make_phantom
from vbseg.pipeline import segment

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SPACING = (0.9, 1.3, 2.5)
ORIGIN = (-12.5, 30.25, 7.0)


def oblique_direction() -> tuple[float, ...]:
    """Direction cosines with a rotation about z (30 degrees) and a flipped third axis."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    return tuple(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]]).ravel())


def itk_image(array_ijk: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=None) -> sitk.Image:
    """A SimpleITK image whose voxel (i, j, k) holds ``array_ijk[i, j, k]``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.T))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction or oblique_direction())
    return image


def written(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


def ramp(shape=(7, 5, 4), dtype=np.float32) -> np.ndarray:
    """Distinct values, so a transposed or flipped axis cannot go unnoticed."""
    return (np.arange(np.prod(shape)).reshape(shape) * 1.5 + 2.0).astype(dtype)


@pytest.mark.parametrize("suffix", ITK_SUFFIXES)
def test_itk_file_matches_the_same_image_saved_as_nifti(tmp_path, suffix):
    """Identical voxels and voxel-centre world coordinates: against ITK's own LPS positions
    (x and y negated for RAS), and against the same image written as NIfTI by ITK."""
    values = ramp()
    image = itk_image(values)
    volume = load_volume(written(image, tmp_path / f"image{suffix}"), "ct")
    nifti = load_volume(written(image, tmp_path / "image.nii.gz"), "ct")
    np.testing.assert_array_equal(volume.data, values)
    np.testing.assert_array_equal(volume.data, nifti.data)
    np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-4)
    for index in [(0, 0, 0), (6, 4, 3), (3, 1, 2), (6, 0, 1)]:
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        ras = volume.affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
        assert volume.data[index] == image.GetPixel(index)
    np.testing.assert_allclose(volume.spacing, SPACING)


def test_masks_and_maps_read_from_itk_files_onto_a_nifti_grid(tmp_path):
    """A NRRD mask and a MetaImage map on the grid of a NIfTI image are on its grid."""
    values = ramp()
    reference = load_volume(written(itk_image(values), tmp_path / "image.nii.gz"))
    mask = (values > values.mean()).astype(np.uint8)
    np.testing.assert_array_equal(load_mask(written(itk_image(mask), tmp_path / "m.nrrd"), reference),
                                  mask.astype(bool))
    field = values - values.mean()
    np.testing.assert_allclose(load_map(written(itk_image(field), tmp_path / "f.mha"), reference),
                               field)


def zero_spacing_header(folder) -> str:
    """A detached NRRD header whose first axis has zero length (ITK will not write one)."""
    (folder / "zero.raw").write_bytes(ramp((3, 3, 3)).tobytes())
    (folder / "zero.nhdr").write_text(
        "NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 3 3 3\n"
        "space directions: (0,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\n"
        "endian: little\nencoding: raw\nspace origin: (0,0,0)\ndata file: zero.raw\n")
    return str(folder / "zero.nhdr")


def bad_files(folder) -> dict:
    """name -> (path, the problem the one-line error must state)."""
    nan = ramp()
    nan[2, 3, 1] = np.nan
    vector = sitk.Compose([itk_image(ramp()), itk_image(ramp())])
    (folder / "garbage.nrrd").write_bytes(b"not an image")
    (folder / "lost.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\n"
                                     "ElementType = MET_FLOAT\nElementDataFile = lost.raw\n")
    (folder / "scan.png").write_bytes(b"\x89PNG")
    return {
        "NaN voxels": (written(itk_image(nan), folder / "nan.nrrd"), "voxels are NaN"),
        "4D": (written(sitk.GetImageFromArray(ramp((2, 4, 5, 6)), isVector=False), folder / "t.mha"),
               "expected a 3D image, got shape (6, 5, 4, 2)"),
        "2D": (written(sitk.GetImageFromArray(ramp((5, 6, 1))[..., 0]), folder / "flat.nrrd"),
               "expected a 3D image"),
        "constant": (written(itk_image(np.ones((4, 4, 4), np.int16)), folder / "c.mhd"), "constant"),
        "vector": (written(vector, folder / "rgb.nrrd"), "2 values per voxel"),
        "zero voxel size": (zero_spacing_header(folder), "affine is singular"),
        "kilometre voxels": (written(itk_image(ramp(), spacing=(1e5, 1e5, 1e5)), folder / "km.nrrd"),
                             "voxel size"),
        "garbage": (str(folder / "garbage.nrrd"), "cannot be read as a NRRD image"),
        "missing data file": (str(folder / "lost.mhd"), "cannot be read as a MetaImage image"),
        "unknown type": (str(folder / "scan.png"), "unknown image file type"),
        "missing": (str(folder / "absent.nhdr"), "file not found"),
    }


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", ["NaN voxels", "4D", "2D", "constant", "vector",
                                  "zero voxel size", "kilometre voxels", "garbage",
                                  "missing data file", "unknown type", "missing"])
def test_bad_itk_file_is_an_input_error_naming_it(bad, name):
    path, problem = bad[name]
    with pytest.raises(InputError) as caught:
        load_volume(path)
    assert str(caught.value).startswith(path) and problem in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_itk_file_through_the_cli_is_one_line_and_writes_nothing(bad, tmp_path):
    path, problem = bad["NaN voxels"]
    result = main_cli("segment", path, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip() == f"vbseg: error: {path}: 1 voxels are NaN or infinite"
    assert not (tmp_path / "out").exists()


def itk_from_volume(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image on the grid of a RAS+ ``affine`` (LPS direction, spacing, origin)."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    return itk_image(data, tuple(spacing), tuple(lps[:, 3]), tuple((lps[:, :3] / spacing).ravel()))


def test_segment_reads_itk_files_resamples_label_masks_and_writes_nifti(tmp_path):
    """PET as NRRD, the VOI as a MetaImage label on a 2x finer grid, the reference as NRRD on
    that grid: the outputs are NIfTI on the PET's grid and affine, summary.json says both masks
    were resampled, and the result equals the run with the VOI on the PET's own grid."""
    phantom = make_phantom(PhantomSpec(), seed=2)
    pet = written(itk_from_volume(phantom.pet.data, phantom.pet.affine), tmp_path / "pet.nrrd")
    roi = np.zeros(phantom.pet.shape, np.uint8)
    roi[4:-4, 4:-4, 4:-4] = 1
    fine_affine = finer_grid(phantom.pet.affine, 2)
    twice = lambda mask: np.repeat(np.repeat(np.repeat(mask, 2, 0), 2, 1), 2, 2)  # noqa: E731
    fine_roi = written(itk_from_volume(twice(roi), fine_affine), tmp_path / "roi.mha")
    fine_truth = written(itk_from_volume(twice(phantom.truth.astype(np.uint8)), fine_affine),
                         tmp_path / "truth.nrrd")
    on_grid_roi = save_nifti(tmp_path / "roi.nii.gz", roi, phantom.pet.affine)
    resampled = segment([pet], tmp_path / "out", roi=fine_roi, reference_mask=fine_truth,
                        model="threshold40")
    plain = segment([pet], None, roi=on_grid_roi, model="threshold40")
    np.testing.assert_array_equal(resampled.probability, plain.probability)
    prob = nib.load(tmp_path / "out" / "prob.nii.gz")
    assert prob.shape == phantom.pet.shape
    np.testing.assert_allclose(prob.affine, phantom.pet.affine, atol=1e-4)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["options"]["voi_resampled"] is True
    assert summary["resampled"][-1] == {
        "path": fine_roi, "role": "roi", "resampled": True,
        "method": "nearest neighbour in world coordinates", "from_shape": list(twice(roi).shape),
        "from_spacing_mm": [2.0, 2.0, 1.5]}
    assert summary["reference_mask"]["resampled"] is True
    assert summary["reference_mask"]["volume_ml"] == pytest.approx(
        phantom.truth.sum() * phantom.pet.voxel_volume_ml)
    assert plain.summary["options"]["voi_resampled"] is False


def test_mgh_and_analyze_files_read_through_nibabel_with_the_same_checks(tmp_path):
    """MGH (.mgz) and Analyze (.hdr/.img, either name) read as nibabel reads them: the voxels
    and nibabel's affine (Analyze 7.5 stores no orientation: nibabel's radiological default);
    MGH keeps the whole affine. A NaN voxel, a missing half of a pair and a 2D image are one
    line naming the file; a .mgz goes through the command line like a NIfTI file."""
    values = ramp()
    affine = np.array([[0.0, -1.5, 0.0, 12.0], [2.0, 0.0, 0.0, -7.5], [0.0, 0.0, 3.0, 4.0],
                       [0.0, 0.0, 0.0, 1.0]])
    nib.save(nib.MGHImage(values, affine), tmp_path / "image.mgz")
    nib.save(nib.AnalyzeImage(values, np.diag([-2.0, 1.5, 3.0, 1.0])), tmp_path / "image.hdr")
    mgh = load_volume(tmp_path / "image.mgz", "ct")
    np.testing.assert_array_equal(mgh.data, values)
    np.testing.assert_allclose(mgh.affine, affine, atol=1e-5)
    for name in ("image.hdr", "image.img"):
        analyze = load_volume(tmp_path / name)
        np.testing.assert_array_equal(analyze.data, values)
        np.testing.assert_allclose(analyze.affine, nib.load(tmp_path / "image.hdr").affine)
        np.testing.assert_allclose(analyze.spacing, [2.0, 1.5, 3.0])
    nan = values.copy()
    nan[1, 2, 3] = np.nan
    nib.save(nib.MGHImage(nan, affine), tmp_path / "nan.mgz")
    nib.save(nib.AnalyzeImage(values[:, :, 0], np.eye(4)), tmp_path / "flat.hdr")
    nib.save(nib.AnalyzeImage(values, np.eye(4)), tmp_path / "half.hdr")
    (tmp_path / "half.img").unlink()
    for name, problem in (("nan.mgz", "1 voxels are NaN or infinite"),
                          ("flat.hdr", "expected a 3D image, got shape (7, 5)"),
                          ("half.hdr", "cannot be read as an Analyze image")):
        with pytest.raises(InputError) as caught:
            load_volume(tmp_path / name)
        text = str(caught.value)
        assert text.startswith(str(tmp_path / name)) and problem in text and "\n" not in text
    result = main_cli("segment", tmp_path / "nan.mgz", "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stderr == (
        f"vbseg: error: {tmp_path / 'nan.mgz'}: 1 voxels are NaN or infinite\n")
    phantom = make_phantom(PhantomSpec(), seed=3)
    nib.save(nib.MGHImage(phantom.pet.data, phantom.pet.affine), tmp_path / "pet.mgz")
    result = main_cli("segment", tmp_path / "pet.mgz", "--model", "threshold40", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert nib.load(tmp_path / "out" / "prob.nii.gz").shape == phantom.pet.shape
