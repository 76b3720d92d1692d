"""NRRD and MetaImage files (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``), read through SimpleITK.

ITK places voxel index ``n = (i, j, k)`` at the physical point ``o + D diag(s) n`` in LPS
coordinates (x towards the patient's left, y posterior, z superior), ``o`` the origin, ``D``
the direction cosines (columns) and ``s`` the spacing; NRRD's own ``space`` field (RAS, LAS, ...)
is converted to LPS by ITK's reader. vbseg's affines are NIfTI's RAS+ (x towards the patient's
right, y anterior, z superior), so the voxel-to-world matrix is ``F [D diag(s) | o]`` with
``F = diag(-1, -1, 1)``, the conversion ITK's own NIfTI writer makes.

SimpleITK's arrays are indexed (k, j, i) (the last index runs fastest, ITK's index 0); vbseg's
are (i, j, k), so the array is transposed. The checks every image gets (3D,
finite, an invertible affine, ...) are :mod:`vbseg.io.volume`'s; this module only reads.
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from vbseg.errors import InputError

# suffix (lower case) -> (ITK ImageIO that reads it, the format's name in messages)
ITK_FORMATS = {
    ".nrrd": ("NrrdImageIO", "NRRD"),
    ".nhdr": ("NrrdImageIO", "NRRD"),
    ".mha": ("MetaImageIO", "MetaImage"),
    ".mhd": ("MetaImageIO", "MetaImage"),
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def itk_suffix(path) -> str | None:
    """The ITK suffix ``path`` ends with (any case), or None."""
    name = os.fspath(path).lower()
    return next((suffix for suffix in ITK_FORMATS if name.endswith(suffix)), None)


def itk_error_text(error: Exception) -> str:
    """The last line of an ITK exception (the cause; the first lines name C++ source files)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1].removeprefix("[nrrd] ") if lines else type(error).__name__


def ras_affine(direction, spacing, origin) -> np.ndarray:
    """The 4 x 4 RAS+ voxel-to-world matrix of an ITK grid (module doc) from its first three
    axes (a 2D grid gets the identity for the missing one; such an image is refused anyway)."""
    dimension = len(spacing)
    n = min(dimension, 3)
    cosines = np.asarray(direction, np.float64).reshape(dimension, dimension)[:n, :n]
    lps = np.eye(4)
    lps[:n, :n] = cosines * np.asarray(spacing, np.float64)[:n]
    lps[:n, 3] = np.asarray(origin, np.float64)[:n]
    affine = np.eye(4)
    affine[:3] = LPS_TO_RAS @ lps[:3]
    return affine


def itk_reader(path) -> tuple[sitk.ImageFileReader, tuple[int, ...], np.ndarray]:
    """(a reader with the header read, grid shape (i, j, ...), RAS+ affine) of a NRRD or
    MetaImage file, its voxels not read yet (``reader.Execute()`` reads them); InputError naming
    ``path`` when the header cannot be read or the file holds several values per voxel (a
    vector image; complex voxels are two values in these formats)."""
    path = os.fspath(path)
    io_name, format_name = ITK_FORMATS[itk_suffix(path)]
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io_name)  # by the suffix: ITK would otherwise try every reader it has
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(path, f"cannot be read as a {format_name} image "
                               f"({itk_error_text(error)})") from None
    components = reader.GetNumberOfComponents()
    if components != 1:
        raise InputError(path, f"holds {components} values per voxel (a vector or colour image); "
                               "expected one")
    shape = tuple(int(size) for size in reader.GetSize())
    return reader, shape, ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())


def read_itk_voxels(path, reader: sitk.ImageFileReader) -> np.ndarray:
    """The voxels (indexed (i, j, ...)) of the file whose header ``reader`` read
    (:func:`itk_reader`); InputError naming ``path`` when they cannot be read."""
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(os.fspath(path), f"cannot be read as a {ITK_FORMATS[itk_suffix(path)][1]} "
                                          f"image ({itk_error_text(error)})") from None
    return sitk.GetArrayFromImage(image).T  # a copy: a view would outlive `image`
