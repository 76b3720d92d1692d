"""NRRD and MetaImage inputs (issue 21, item 5): read into the same Volume as NIfTI (ITK's LPS
grid converted to RAS), with the same checks; a bad file is one line through the CLI.

The files are written here by SimpleITK, the library that reads them, so the ground truth of
each voxel's world position is ITK's own ``TransformIndexToPhysicalPoint``, independent of
vbseg's conversion.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from test_cli import main_cli

from vbseg.errors import InputError
from vbseg.volume import load_map, load_mask, load_volume

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
        "zero voxel size": (zero_spacing_header(folder), "spacing from [1, 1, 1] to [0, 1, 1]"),
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
